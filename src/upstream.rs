//! Connections to upstream endpoints: a keep-alive pool per endpoint and worker thread, hyper's
//! HTTP/1.1 client connections, and the response body that returns its connection to the pool
//! once the response has been read to the end.
//!
//! The proxy gets a connection before it hands a request over. So when no connection can be
//! made, the request is still whole (head and body) and can be sent elsewhere; once hyper has
//! written any of it, it is never replayed. The one exception is safe: a pooled connection
//! that turns out to be closed before anything was written gives the request back, and it goes
//! out on another connection to the same endpoint.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::MAX_WORKERS;
use crate::routing::Endpoint;
use crate::workers::current_worker;

/// Connection settings of a backend; a reload that changes them starts fresh pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Idle pooled connections older than this are not reused; keep it below the upstreams'
    /// own keep-alive timeout so the proxy never writes into a connection being closed.
    pub idle_timeout: Duration,
}

/// How a backend connects to its endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    settings: UpstreamSettings,
}

/// The body of a request sent upstream: the client's own, streamed.
pub type ForwardBody = Incoming;

/// Why no connection to an endpoint could be made (nothing of the request was sent).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    #[error("HTTP/1.1 handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("the new connection closed before the request could be sent: {0}")]
    Closed(#[source] hyper::Error),
}

/// Why an exchange with an upstream failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection: the request comes back untouched, for another endpoint or backend.
    NotSent {
        request: Box<Request<ForwardBody>>,
        error: ConnectError,
    },
    /// The request was (perhaps partly) sent and then the exchange failed.
    Failed(hyper::Error),
}

/// Idle keep-alive connections of one endpoint, one list per worker thread: a connection is
/// driven by the runtime that opened it, so each worker only reuses its own. Each list is
/// ordered oldest first; the newest connections are reused first, and expired ones are dropped
/// from the old end whenever a connection comes back.
#[derive(Debug)]
pub struct ConnectionPool {
    idle: Box<[Mutex<VecDeque<IdleConnection>>]>,
}

/// Idle connections kept per endpoint and worker; beyond this a returning one is closed.
const MAX_IDLE: usize = 512;

#[derive(Debug)]
struct IdleConnection {
    sender: SendRequest<ForwardBody>,
    since: Instant,
}

impl IdleConnection {
    fn is_stale(&self, idle_timeout: Duration) -> bool {
        self.sender.is_closed() || self.since.elapsed() >= idle_timeout
    }
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            idle: (0..MAX_WORKERS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl ConnectionPool {
    fn mine(&self) -> std::sync::MutexGuard<'_, VecDeque<IdleConnection>> {
        self.idle[current_worker() % self.idle.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used connection that can take a request now. A connection still
    /// busy (an upstream answered before it had read the whole request body, which is still
    /// being written) stays pooled for later instead of making this request wait behind it.
    fn checkout(&self, idle_timeout: Duration) -> Option<SendRequest<ForwardBody>> {
        let mut idle = self.mine();
        let mut index = idle.len();
        while index > 0 {
            index -= 1;
            if idle[index].is_stale(idle_timeout) {
                idle.remove(index);
            } else if idle[index].sender.is_ready() {
                return idle.remove(index).map(|c| c.sender);
            }
        }
        None
    }

    fn checkin(&self, sender: SendRequest<ForwardBody>, idle_timeout: Duration) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.mine();
        while idle.front().is_some_and(|c| c.is_stale(idle_timeout)) {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(IdleConnection {
                sender,
                since: Instant::now(),
            });
        }
    }
}

impl Upstream {
    pub fn new(settings: UpstreamSettings) -> Self {
        Upstream { settings }
    }

    pub fn settings(&self) -> UpstreamSettings {
        self.settings
    }

    /// Sends a request to `endpoint` on a pooled or new connection; resolves when the
    /// response head has arrived.
    pub async fn send(
        &self,
        endpoint: &Arc<Endpoint>,
        mut request: Request<ForwardBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        loop {
            let (mut sender, reused) = match endpoint.pool.checkout(self.settings.idle_timeout) {
                Some(sender) => (sender, true),
                None => match self.connect(endpoint).await {
                    Ok(sender) => (sender, false),
                    Err(error) => {
                        let request = Box::new(request);
                        return Err(SendError::NotSent { request, error });
                    }
                },
            };
            if let Err(error) = sender.ready().await {
                if reused {
                    continue;
                }
                let error = ConnectError::Closed(error);
                let request = Box::new(request);
                return Err(SendError::NotSent { request, error });
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // A switched protocol keeps the connection; it never returns to the pool.
                    let pooled = (response.status() != http::StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| (sender, endpoint.clone()));
                    let idle_timeout = self.settings.idle_timeout;
                    return Ok(response.map(|inner| UpstreamBody {
                        inner,
                        pooled,
                        idle_timeout,
                        ended: false,
                    }));
                }
                Err(mut failure) => match failure.take_message() {
                    // Closed before anything was written: safe to send again.
                    Some(unsent) if reused => request = unsent,
                    Some(unsent) => {
                        let error = ConnectError::Closed(failure.into_error());
                        return Err(SendError::NotSent {
                            request: Box::new(unsent),
                            error,
                        });
                    }
                    None => return Err(SendError::Failed(failure.into_error())),
                },
            }
        }
    }

    /// Opens a TCP connection (TCP_NODELAY) and runs the HTTP/1.1 client on it in a task of
    /// this worker's runtime.
    async fn connect(&self, endpoint: &Endpoint) -> Result<SendRequest<ForwardBody>, ConnectError> {
        let timeout = self.settings.connect_timeout;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(endpoint.authority.as_str()))
            .await
            .map_err(|_| ConnectError::TimedOut(timeout))?
            .map_err(ConnectError::Io)?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let url = endpoint.url.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(endpoint = %url, %error, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// A response body from upstream. When it has been read to the end, its connection goes back
/// to the endpoint's pool; dropped earlier (a client gone mid-body), the connection closes.
pub struct UpstreamBody {
    inner: Incoming,
    pooled: Option<(SendRequest<ForwardBody>, Arc<Endpoint>)>,
    idle_timeout: Duration,
    ended: bool,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some((sender, endpoint)) = self.pooled.take()
            && (self.ended || self.inner.is_end_stream())
        {
            endpoint.pool.checkin(sender, self.idle_timeout);
        }
    }
}

/// A response from upstream, or one the proxy made itself (errors).
pub type ResponseBody = http_body_util::Either<UpstreamBody, http_body_util::Full<Bytes>>;

/// A response as the proxy hands it to hyper.
pub type ProxyResponse = Response<ResponseBody>;
