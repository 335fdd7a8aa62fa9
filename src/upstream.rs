//! The connection pool of one backend (a hyper-util client over HTTP/1.1 keep-alive), and the
//! body type that carries a client's request body upstream.
//!
//! A request whose upstream connection could not be made may be retried elsewhere, which needs
//! its body back. hyper-util drops the request when connecting fails, so the body travels in a
//! [`ForwardBody`] that returns the untouched client body to a shared slot when it is dropped
//! without ever having been polled. Once polled, bytes may have left, and the slot stays empty:
//! a request that was sent is never replayed.

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::ResponseFuture;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::MAX_WORKERS;
use crate::workers::current_worker;

/// Connection settings of a pool; a reload that changes them builds new pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this; keep it below the upstreams' own
    /// keep-alive timeout so the proxy never writes into a connection the upstream is closing.
    pub idle_timeout: Duration,
}

type PooledClient = Client<HttpConnector, ForwardBody>;

/// The pooled clients of one backend, one per worker thread, built when that worker first
/// uses them: a pooled connection is driven by the runtime that opened it, so sharing one
/// pool between workers would hand requests across threads. Cloning shares the pools.
#[derive(Clone)]
pub struct Upstream {
    clients: Arc<[OnceLock<PooledClient>]>,
    settings: UpstreamSettings,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Upstream {
    pub fn new(settings: UpstreamSettings) -> Self {
        Upstream {
            clients: (0..MAX_WORKERS).map(|_| OnceLock::new()).collect(),
            settings,
        }
    }

    fn client(&self) -> &PooledClient {
        let slot = &self.clients[current_worker() % self.clients.len()];
        slot.get_or_init(|| {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(self.settings.connect_timeout));
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(self.settings.idle_timeout)
                .build(connector)
        })
    }

    pub fn settings(&self) -> UpstreamSettings {
        self.settings
    }

    /// Sends a request; the future resolves when the response head has arrived.
    pub fn send(&self, request: Request<ForwardBody>) -> ResponseFuture {
        self.client().request(request)
    }
}

/// Where an unsent client body waits for a retry.
pub type BodySlot = Arc<Mutex<Option<Incoming>>>;

/// The body of a request sent upstream.
#[derive(Debug, Default)]
pub enum ForwardBody {
    /// The client sent no body (the common GET): nothing to give back on retry.
    #[default]
    Empty,
    /// A client body that goes back to `slot` if dropped before it was polled.
    Streaming {
        body: Option<Incoming>,
        slot: BodySlot,
        polled: bool,
    },
}

impl ForwardBody {
    /// Wraps the client body, returning the slot it comes back to if it is never sent.
    pub fn new(body: Incoming) -> (Self, Option<BodySlot>) {
        if body.is_end_stream() {
            return (ForwardBody::Empty, None);
        }
        let slot = BodySlot::default();
        let forward = ForwardBody::Streaming {
            body: Some(body),
            slot: slot.clone(),
            polled: false,
        };
        (forward, Some(slot))
    }

    /// Takes back a body that was never sent, for a retry. `None` when it was (partly) sent.
    pub fn reclaim(slot: &Option<BodySlot>) -> Option<ForwardBody> {
        let Some(slot) = slot else {
            return Some(ForwardBody::Empty);
        };
        let body = slot.lock().ok()?.take()?;
        Some(ForwardBody::Streaming {
            body: Some(body),
            slot: slot.clone(),
            polled: false,
        })
    }
}

impl Drop for ForwardBody {
    fn drop(&mut self) {
        if let ForwardBody::Streaming {
            body,
            slot,
            polled: false,
        } = self
            && let Some(body) = body.take()
            && let Ok(mut slot) = slot.lock()
        {
            *slot = Some(body);
        }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ForwardBody::Empty => Poll::Ready(None),
            ForwardBody::Streaming { body, polled, .. } => {
                *polled = true;
                match body {
                    Some(body) => Pin::new(body).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ForwardBody::Empty => true,
            ForwardBody::Streaming { body, .. } => body.as_ref().is_none_or(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ForwardBody::Empty => SizeHint::with_exact(0),
            ForwardBody::Streaming { body, .. } => body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint()),
        }
    }
}

/// A response from upstream, or one the proxy made itself (errors).
pub type ResponseBody = http_body_util::Either<Incoming, http_body_util::Full<Bytes>>;

/// A response as the proxy hands it to hyper.
pub type ProxyResponse = Response<ResponseBody>;
