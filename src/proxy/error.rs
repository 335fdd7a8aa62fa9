//! What can go wrong while forwarding one request, and the status code each failure becomes.

use std::time::Duration;

use http::StatusCode;

/// A request the proxy answers itself instead of with an upstream response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// CONNECT asks for a tunnel to an arbitrary host; a reverse proxy does not offer that.
    #[error("CONNECT is not supported by a reverse proxy")]
    ConnectMethod,
    /// No backend has weight above zero (cannot happen with a validated table).
    #[error("no backend can serve the request")]
    NoBackend,
    /// The upstream connection could not be made, and no retry was possible or it failed too.
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: crate::upstream::ConnectError,
    },
    /// The request was sent but the upstream failed (reset, closed, malformed response).
    #[error("upstream {endpoint} failed")]
    Upstream {
        endpoint: String,
        #[source]
        source: crate::upstream::ExchangeError,
    },
    /// The client's request body could not be read (malformed chunked framing, or the
    /// client went away mid-body); the upstream is not to blame.
    #[error("the request body from the client failed")]
    ClientBody {
        #[source]
        source: crate::upstream::ForwardBodyError,
    },
    /// A request the proxy will not forward as it is: a request target or `Host` that
    /// `headers::settle_host` refuses (several `Host` lines, none in HTTP/1.1, one that is not
    /// `host[:port]`, authority-form, `*` but for OPTIONS; RFC 9112 §3.2).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The client did not send its request body within `request_timeout`.
    #[error("the client sent its request body too slowly (request_timeout {timeout:?})")]
    ClientTimeout { timeout: Duration },
    /// The upstream switched protocols although the client asked for no WebSocket upgrade.
    #[error("upstream {endpoint} answered 101 to a request that asked for no WebSocket upgrade")]
    UnexpectedUpgrade { endpoint: String },
    /// A WebSocket upgrade routed to a backend spoken to over HTTP/2: the proxy tunnels
    /// WebSockets over HTTP/1.1 only.
    #[error(
        "a WebSocket upgrade cannot go to {endpoint}: its backend is spoken to over HTTP/2 (protocol), and WebSockets are tunnelled over HTTP/1.1 only"
    )]
    WebSocketToH2 { endpoint: String },
    /// No response head within `request_timeout`.
    #[error("upstream {endpoint} sent no response within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
}

impl From<&ProxyError> for StatusCode {
    fn from(error: &ProxyError) -> StatusCode {
        match error {
            ProxyError::ClientBody { .. } | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ConnectMethod => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UnexpectedUpgrade { .. }
            | ProxyError::WebSocketToH2 { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let timeout = ProxyError::Timeout {
            endpoint: "http://a".into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(StatusCode::from(&timeout), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            StatusCode::from(&ProxyError::NoBackend),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            StatusCode::from(&ProxyError::ConnectMethod),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let slow = ProxyError::ClientTimeout {
            timeout: Duration::from_secs(1),
        };
        assert_eq!(StatusCode::from(&slow), StatusCode::REQUEST_TIMEOUT);
    }
}
