//! Connections to upstream endpoints: a keep-alive pool per endpoint and worker thread, and the
//! HTTP/1.1 exchange on a pooled connection, driven by the request's own task; or, for a
//! backend whose `protocol` is h2c, HTTP/2 on multiplexed connections (`h2`).
//!
//! The exchange is ours rather than hyper's client: hyper runs each client connection as a task
//! of its own, reached through a channel and a oneshot, with the response body behind another
//! channel, so a proxied request crossed tasks four times. Here the task that serves the client
//! writes the request, reads the response head, and the response body reads straight from the
//! upstream socket while the client connection polls it (writing the rest of the request body
//! as it goes, so an upstream may answer while it still reads). See README, Benchmarks.
//!
//! The proxy gets a connection before it writes anything, so when no connection can be made the
//! request is still whole (head and body) and can be sent elsewhere. A connection that fails
//! before any byte of the request was written or any of its body taken gives the request back:
//! a pooled one is replaced by a new connection to the same endpoint, a new one counts as a
//! failed connect. A request of which anything was written is never replayed.
//!
//! This file holds what the proxy sees: [`Upstream::send`], the [`Peer`] each routing endpoint
//! holds, the settings and the errors. Beneath it:
//! - `pool`: a peer's idle keep-alive connections, one list per worker thread.
//! - `exchange`: one request/response on a connection up to the response head: writing the
//!   request, the timeouts by phase, and when a request may be sent again.
//! - `body`: the client's request body on its way up, and the response body read from the
//!   connection, which hands the connection back to the pool at its end.
//! - `h2`: HTTP/2 to upstreams: hyper's client on connections shared by many requests, one
//!   pool per endpoint and worker thread, and the exchange with its phase timeouts.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::http1::body::MessageError;
use crate::http1::head::recycle_map;

mod body;
mod exchange;
mod h2;
mod pool;
mod stream;

pub use body::{
    BodyEnd, BodyTap, Ending, ForwardBody, ForwardBodyError, ProxyResponse, UpstreamBody,
};
pub use h2::is_grpc;
pub use stream::UpstreamStream;

use crate::config::UpstreamProtocol;
use body::finish_head;
use exchange::{Attempt, Exchange, Failure, Phase, PhaseClock, is_idempotent};
use h2::H2Pool;
use pool::{Connection, ConnectionPool};

/// Connection settings of a backend. A reload that changes them keeps the endpoints and their
/// pools: the new values apply from the next connect, checkout or checkin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Idle pooled connections older than this are not reused; keep it below the upstreams'
    /// own keep-alive timeout so the proxy never writes into a connection being closed.
    pub idle_timeout: Duration,
    /// HTTP/1.1, or HTTP/2 (h2c, h2).
    pub protocol: UpstreamProtocol,
}

/// How a backend connects to its endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    settings: UpstreamSettings,
}

/// One endpoint as the upstream side knows it: where requests go, and its idle keep-alive
/// connections. The upstream module owns the pool; the routing table's endpoint holds its
/// `Peer` and hands it to [`Upstream::send`]. Shared (`Arc`): a response body still being read
/// returns its connection here after the table that routed it was replaced.
#[derive(Debug)]
pub struct Peer {
    /// The URL as configured, for logs.
    pub url: String,
    /// `host:port` that requests are sent to.
    pub authority: Authority,
    /// For an `https://` endpoint: how its connections are secured.
    pub tls: Option<PeerTls>,
    /// Idle keep-alive connections to this endpoint, kept with it across table changes.
    pool: ConnectionPool,
    /// HTTP/2 connections to this endpoint (a backend whose protocol is h2c or h2).
    h2: H2Pool,
}

/// How an `https://` endpoint's connections are secured: the client config (trust, ALPN)
/// and the name sent in SNI and verified.
#[derive(Clone)]
pub struct PeerTls {
    pub config: Arc<rustls::ClientConfig>,
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl PeerTls {
    /// TLS with `config`, verifying `server_name`, or else the authority's host.
    pub fn new(
        config: Arc<rustls::ClientConfig>,
        server_name: Option<&ServerName<'static>>,
        authority: &Authority,
    ) -> Result<Self, String> {
        let server_name = match server_name {
            Some(name) => name.clone(),
            None => {
                // An IPv6 authority's host keeps its brackets.
                let host = authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                ServerName::try_from(host.to_owned())
                    .map_err(|_| format!("{host:?} is not a name TLS can verify"))?
            }
        };
        Ok(PeerTls {
            connector: tokio_rustls::TlsConnector::from(config.clone()),
            config,
            server_name,
        })
    }
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A TLS connection to `authority`: TCP, then the handshake, both within `timeout`. Boxed
/// and out of line: the handshake's state (a kilobyte and more) and code would otherwise be
/// part of every request's future and of the send path, plain requests' too (measured with
/// callgrind: the request's future grew past 4 KiB, +400 instructions per request).
#[inline(never)]
fn tls_connect<'a>(
    authority: &'a Authority,
    tls: &'a PeerTls,
    timeout: Duration,
) -> Pin<Box<dyn Future<Output = Result<UpstreamStream, ConnectError>> + Send + 'a>> {
    Box::pin(async move {
        let stream = tokio::time::timeout(timeout, connect_tls(authority, tls))
            .await
            .map_err(|_| ConnectError::TimedOut(timeout))??;
        Ok(UpstreamStream::Tls(Box::new(stream)))
    })
}

/// Why no connection to an endpoint could be used (nothing of the request was sent).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect failed")]
    Io(#[source] io::Error),
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("the new connection failed before the request could be sent")]
    Closed(#[source] ExchangeError),
    #[error("the HTTP/2 handshake failed")]
    Handshake(#[source] hyper::Error),
    /// The failure of a connection that several requests waited for.
    #[error(transparent)]
    Shared(Arc<ConnectError>),
}

/// What went wrong in an exchange with an upstream.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("writing the request failed")]
    Write(#[source] io::Error),
    #[error("reading the response failed")]
    Response(#[from] MessageError),
    #[error("the client's request body failed")]
    RequestBody(#[source] ForwardBodyError),
    /// A pooled connection closed before it took the request, and the fresh connection the
    /// request was to be sent again on could not be made.
    #[error("the pooled connection closed and a new one could not be made")]
    Reconnect(#[source] Box<ConnectError>),
    /// `read_timeout`: the upstream sent nothing of the response body for this long.
    #[error("the upstream sent nothing of the response body for {0:?} (read_timeout)")]
    ReadTimeout(Duration),
    /// An HTTP/2 exchange failed (the stream or its connection).
    #[error("the HTTP/2 exchange failed")]
    H2(#[source] hyper::Error),
}

/// Why an exchange with an upstream failed.
#[derive(Debug)]
pub enum SendError {
    /// Nothing was sent: the request comes back untouched, for another endpoint or backend.
    NotSent {
        request: Box<Request<ForwardBody>>,
        error: ConnectError,
    },
    /// The request was (perhaps partly) sent and then the exchange failed.
    Failed(ExchangeError),
    /// `client_body_timeout`: the client sent nothing of its request body for this long while
    /// the upstream had all it was given.
    ClientStalled(Duration),
    /// `request_timeout`: the upstream took none of the request, or sent no response head
    /// after the request's end, for this long.
    TimedOut(Duration),
    /// A protocol switch (a WebSocket upgrade) to an upstream spoken to over HTTP/2: not sent.
    Upgrade,
}

/// The timeouts of an exchange by phase, as nginx has them: none of them bounds a whole
/// transfer, so an upload or a download may take as long as it keeps moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeTimeouts {
    /// Between two pieces of the client's request body (`client_body_timeout`, 408).
    pub client_body: Duration,
    /// From the end of the request to the response head, and between two writes of the
    /// request to the upstream (`request_timeout`, 504).
    pub request: Duration,
    /// Between two reads of the response body (`read_timeout`; the connection is closed).
    pub read: Duration,
}

impl Peer {
    /// A peer with no connections yet; `tls` for an `https://` endpoint.
    pub fn new(url: String, authority: Authority, tls: Option<PeerTls>) -> Self {
        Peer {
            url,
            authority,
            tls,
            pool: ConnectionPool::default(),
            h2: H2Pool::default(),
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

    /// Closes this worker's idle connections to `peer` that expired or that the upstream
    /// closed, so that they do not linger in CLOSE_WAIT until the peer's next request.
    pub fn sweep(&self, peer: &Peer) {
        peer.pool.sweep(self.settings.idle_timeout);
        peer.h2.sweep(self.settings.idle_timeout);
    }

    /// Whether requests go to this backend over HTTP/2.
    #[inline]
    pub fn is_h2(&self) -> bool {
        self.settings.protocol.is_h2()
    }

    /// Sends a request (origin-form target) to `peer` on a pooled or new connection;
    /// resolves when the response head has arrived. The response body goes on reading from
    /// the connection, and hands it back to the pool when the exchange is over. A backend
    /// spoken to over HTTP/2 gets the request there instead (`h2`: the same timeouts, the
    /// request given back the same way when no connection could be made).
    ///
    /// Until the head, the phase timeouts apply: `client_body` while the upstream has all it
    /// was given and the client's body is awaited, `request` while the upstream takes no
    /// bytes or, the request sent, has not answered (from `started` for a request without a
    /// body to send). A pooled connection that the upstream turns out to have closed
    /// (before any byte of a response) is replaced by a fresh one when the request can be sent
    /// again: nothing of it was written; or the upstream closed while it was being written;
    /// or it is idempotent and the connection closed or reset with no response.
    pub async fn send(
        &self,
        peer: &Arc<Peer>,
        request: Request<ForwardBody>,
        timeouts: ExchangeTimeouts,
        started: tokio::time::Instant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let (parts, body) = request.into_parts();
        if self.settings.protocol.is_h2() {
            // Boxed: the HTTP/1 exchange's future stays the size it was.
            let sent = h2::send(self.settings, peer, parts, body, timeouts, started);
            return Box::pin(sent).await;
        }
        let idempotent = is_idempotent(&parts.method);
        let timer = tokio::time::sleep_until(started + timeouts.request);
        tokio::pin!(timer);
        let mut clock = PhaseClock::default();
        let mut attempt = Attempt::Whole(body);
        loop {
            // A request that cannot be sent again once written asks the socket itself
            // whether the upstream closed a pooled connection; a replay takes a fresh one.
            let pooled = match attempt {
                Attempt::Whole(_) => peer.pool.checkout(self.settings.idle_timeout, !idempotent),
                Attempt::Replay(_) => None,
            };
            let (connection, reused) = match pooled {
                Some(connection) => (connection, true),
                None => match self.connect(peer).await {
                    Ok(connection) => (connection, false),
                    Err(error) => {
                        return Err(match attempt {
                            Attempt::Whole(body) => {
                                let request = Box::new(Request::from_parts(parts, body));
                                SendError::NotSent { request, error }
                            }
                            Attempt::Replay(_) => {
                                SendError::Failed(ExchangeError::Reconnect(Box::new(error)))
                            }
                        });
                    }
                },
            };
            let mut exchange = match attempt {
                Attempt::Whole(body) => Exchange::start(connection, &parts, body, reused),
                Attempt::Replay(replay) => Exchange::resume(connection, replay),
            };
            let head = poll_fn(|cx| {
                if let Poll::Ready(head) = exchange.poll_response_head(cx) {
                    return Poll::Ready(head.map_err(Failure::Exchange));
                }
                clock.poll_expired(&exchange, timer.as_mut(), timeouts, cx)
            })
            .await;
            let error = match head {
                Ok(head) => {
                    let settings = self.settings;
                    let response =
                        finish_head(exchange, head, &parts.method, peer, settings, timeouts);
                    recycle_map(parts.headers);
                    return response.map_err(SendError::Failed);
                }
                Err(Failure::Stalled(Phase::Client)) => {
                    return Err(SendError::ClientStalled(timeouts.client_body));
                }
                Err(Failure::Stalled(_)) => return Err(SendError::TimedOut(timeouts.request)),
                Err(Failure::Exchange(error)) => error,
            };
            if !reused {
                // A new connection that fails before anything of the request went out is
                // treated like a failed connect: the request goes elsewhere whole.
                return match exchange.into_untouched_body() {
                    Some(untouched) => {
                        let request = Box::new(Request::from_parts(parts, untouched));
                        let error = ConnectError::Closed(error);
                        Err(SendError::NotSent { request, error })
                    }
                    None => Err(SendError::Failed(error)),
                };
            }
            match exchange.into_retry(&error, idempotent) {
                Some(next) => {
                    tracing::debug!(endpoint = %peer.url, error = %error, "pooled connection was closed by the upstream; sending again");
                    attempt = next;
                }
                None => return Err(SendError::Failed(error)),
            }
        }
    }

    /// Opens a TCP connection (TCP_NODELAY) to the peer, and for an `https://` one makes
    /// the TLS handshake; `connect_timeout` bounds both.
    async fn connect(&self, peer: &Peer) -> Result<Connection, ConnectError> {
        let timeout = self.settings.connect_timeout;
        let Some(tls) = &peer.tls else {
            let stream = tokio::time::timeout(timeout, TcpStream::connect(peer.authority.as_str()))
                .await
                .map_err(|_| ConnectError::TimedOut(timeout))?
                .map_err(ConnectError::Io)?;
            let _ = stream.set_nodelay(true);
            return Ok(Connection::new(UpstreamStream::Plain(stream)));
        };
        let stream = tls_connect(&peer.authority, tls, timeout).await?;
        Ok(Connection::new(stream))
    }
}

/// A TCP connection (TCP_NODELAY) to `authority`, for an HTTP/2 or a TLS connection. (The
/// plain HTTP/1 exchange has its own: a nested future there would make every request's
/// future larger.)
async fn connect_tcp(authority: &Authority) -> Result<TcpStream, ConnectError> {
    let stream = TcpStream::connect(authority.as_str())
        .await
        .map_err(ConnectError::Io)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A TCP connection to `authority` and the TLS handshake over it, as `tls` says (trust, the
/// name verified, ALPN); for the HTTP/1 exchange and HTTP/2 alike.
async fn connect_tls(
    authority: &Authority,
    tls: &PeerTls,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let stream = connect_tcp(authority).await?;
    tls.connector
        .connect(tls.server_name.clone(), stream)
        .await
        .map_err(ConnectError::Tls)
}
