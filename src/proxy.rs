//! The forward path of one request, top to bottom: load the routing table once, pick a backend,
//! rewrite the request, send it (retrying once elsewhere if the connection could not be made),
//! rewrite the response. Every failure becomes a synthetic response in one place,
//! [`error_response`].

use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Chain, ProxyError, UpstreamErrorKind};
use crate::headers;
use crate::metrics::Metrics;
use crate::routing::{Backend, Endpoint, Reason, RoutingTable};
use crate::upstream::{ExchangeError, ForwardBody, ProxyResponse, SendError};

/// The shared routing table: each request loads it once; the admin API swaps it with one store.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

/// Forwards requests according to the current routing table.
#[derive(Clone)]
pub struct Proxy {
    table: SharedTable,
    metrics: Arc<Metrics>,
    /// Ends WebSocket tunnels once the drain is over.
    shutdown: CancellationToken,
}

/// What the forward path learned about a request, kept for the answer and the metrics even
/// when it fails.
#[derive(Default)]
struct Outcome {
    /// Index of the backend that served (or was to serve) the request.
    backend: Option<usize>,
    /// Why the request was routed where it was; counted with the backend that served, so a
    /// retry on another backend counts the decision and the request in one place.
    reason: Option<Reason>,
    request_id: Option<HeaderValue>,
}

/// Where a request is being sent.
struct Target<'t> {
    backend: &'t Backend,
    index: usize,
    endpoint: &'t Arc<Endpoint>,
}

impl Proxy {
    pub fn new(table: SharedTable, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Self {
        Proxy {
            table,
            metrics,
            shutdown,
        }
    }

    /// Closes this worker's idle upstream connections that expired or that their upstream
    /// closed (else they would sit in CLOSE_WAIT until the endpoint's next request).
    pub fn sweep_idle_connections(&self) {
        let table = self.table.load();
        for backend in &table.backends {
            let idle_timeout = backend.upstream.settings().idle_timeout;
            for endpoint in &backend.endpoints {
                endpoint.pool.sweep(idle_timeout);
            }
        }
    }

    /// Answers one client request; never fails (errors become 4xx/5xx responses).
    pub async fn handle(
        &self,
        request: Request<ForwardBody>,
        client_ip: &HeaderValue,
        ambiguous_framing: bool,
    ) -> ProxyResponse {
        // One clock read serves the metrics and the request deadline.
        let started = Instant::now();
        let _in_flight = self.metrics.in_flight();
        let table = self.table.load_full();
        let mut outcome = Outcome::default();
        let response = match self
            .forward(
                request,
                client_ip,
                ambiguous_framing,
                &table,
                started,
                &mut outcome,
            )
            .await
        {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(
                    error = %error,
                    cause = error_source(&error),
                    request_id = outcome.request_id.as_ref().and_then(|v| v.to_str().ok()),
                    "request failed"
                );
                let backend = outcome.backend.map(|i| &table.backends[i]);
                let named = table
                    .backend_header
                    .as_ref()
                    .zip(backend.map(|b| b.name_value.clone()));
                error_response(&error, outcome.request_id.clone(), named)
            }
        };
        let elapsed = started.elapsed();
        let metrics = match outcome.backend {
            Some(index) => {
                let backend = &table.backends[index];
                if let Some(meter) = &backend.meter {
                    meter.record(response.status(), elapsed);
                }
                &backend.metrics
            }
            None => self.metrics.unrouted(),
        };
        if let Some(reason) = outcome.reason {
            metrics.decision(reason);
        }
        metrics.response(response.status(), elapsed);
        response
    }

    async fn forward(
        &self,
        mut request: Request<ForwardBody>,
        client_ip: &HeaderValue,
        ambiguous_framing: bool,
        table: &RoutingTable,
        started: Instant,
        outcome: &mut Outcome,
    ) -> Result<ProxyResponse, ProxyError> {
        // Known before anything can fail, so every answer carries it.
        let request_id = headers::request_id(request.headers());
        outcome.request_id = Some(request_id.clone());
        if ambiguous_framing {
            return Err(ProxyError::AmbiguousFraming);
        }
        if request.method() == Method::CONNECT {
            return Err(ProxyError::ConnectMethod);
        }
        let websocket = request.version() == Version::HTTP_11
            && headers::is_websocket_upgrade(request.headers());
        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        // The request target and Host, on every path: `Host` becomes the one the request goes
        // upstream with, before routing, so that rules see that one too. `http1` settled its
        // own requests while framing their heads; hyper's get the same checks here.
        let host = if matches!(body, ForwardBody::Hyper(_)) {
            headers::settle_host(&parts.method, &parts.uri, &mut parts.headers, parts.version)?
        } else {
            parts.headers.get(HOST).cloned()
        };
        if matches!(body, ForwardBody::Hyper(_)) && parts.version < Version::HTTP_2 {
            // An HTTP/1 request hyper parsed: the framing check `http1` makes on its own.
            headers::check_transfer_coding(&parts.headers)?;
        }

        // Pick the backend and endpoint.
        let decision = table
            .route(&parts.headers, &mut rand::rng())
            .ok_or(ProxyError::NoBackend)?;
        let backend = &table.backends[decision.backend];
        outcome.backend = Some(decision.backend);
        outcome.reason = Some(decision.reason);
        let endpoint = backend
            .endpoints
            .get(decision.endpoint)
            .ok_or(ProxyError::NoBackend)?;
        let mut target = Target {
            backend,
            index: decision.backend,
            endpoint,
        };

        // Rewrite the request head.
        let mut upstream_headers = parts.headers;
        let upgrade_value = upstream_headers.get(UPGRADE).cloned();
        headers::strip_hop_by_hop(&mut upstream_headers);
        headers::add_forwarded(&mut upstream_headers, client_ip, host.as_ref());
        upstream_headers.insert(headers::X_REQUEST_ID.clone(), request_id);
        if parts.version == Version::HTTP_2 {
            headers::join_cookies(&mut upstream_headers);
        }
        // Host as `settle_host` made it (put back if `Connection` named it); a request that
        // has none (HTTP/1.0) gets the endpoint's.
        if !upstream_headers.contains_key(HOST) {
            let host =
                host.or_else(|| HeaderValue::from_str(target.endpoint.authority.as_str()).ok());
            if let Some(host) = host {
                upstream_headers.insert(HOST, host);
            }
        }
        if let (true, Some(upgrade)) = (websocket, upgrade_value) {
            upstream_headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            upstream_headers.insert(UPGRADE, upgrade);
        }
        // Origin-form target: the connection already says which endpoint it goes to.
        let path = headers::origin_form(&parts.uri);
        let mut outgoing = Request::new(body);
        *outgoing.method_mut() = parts.method;
        *outgoing.uri_mut() = Uri::from(path);
        *outgoing.headers_mut() = upstream_headers;

        // Send, retrying once elsewhere when no connection could be made (the request is
        // then still whole: nothing of it was written).
        let mut retried = false;
        let mut response = loop {
            let sent =
                target
                    .backend
                    .upstream
                    .send(target.endpoint, outgoing, table.timeouts, started);
            let upstream_failed = |kind| {
                target.endpoint.record_outcome(false);
                target.backend.metrics.upstream_error(kind);
            };
            let (request, failure) = match sent.await {
                Ok(response) => break response,
                // The client's own body failing (malformed, the client gone, or stalled) says
                // nothing about the upstream: no passive health failure, no upstream error.
                Err(SendError::Failed(ExchangeError::RequestBody(source))) => {
                    return Err(ProxyError::ClientBody { source });
                }
                Err(SendError::ClientStalled(timeout)) => {
                    return Err(ProxyError::ClientTimeout { timeout });
                }
                Err(SendError::TimedOut(timeout)) => {
                    upstream_failed(UpstreamErrorKind::Timeout);
                    return Err(ProxyError::Timeout {
                        endpoint: target.endpoint.url.clone(),
                        timeout,
                    });
                }
                Err(SendError::Failed(source)) => {
                    upstream_failed(UpstreamErrorKind::Upstream);
                    return Err(ProxyError::Upstream {
                        endpoint: target.endpoint.url.clone(),
                        source,
                    });
                }
                Err(SendError::NotSent { request, error }) => {
                    upstream_failed(UpstreamErrorKind::Connect);
                    (request, error)
                }
            };
            let retry = (!retried)
                .then(|| table.alternative(target.index, target.endpoint, &mut rand::rng()))
                .flatten();
            let Some((index, endpoint)) = retry else {
                return Err(ProxyError::Connect {
                    endpoint: target.endpoint.url.clone(),
                    source: failure,
                });
            };
            tracing::debug!(failed = %target.endpoint.url, retry = %endpoint.url, "connect failed, retrying");
            target = Target {
                backend: &table.backends[index],
                index,
                endpoint,
            };
            outcome.backend = Some(index);
            outgoing = *request;
            retried = true;
        };

        // Rewrite the response head.
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let response_upgrade = response.headers().get(UPGRADE).cloned();
        // A switch the client did not ask for would desynchronise the client connection: it
        // is refused, and counts against the endpoint like any malformed response.
        let unexpected_switch = switching
            && (client_upgrade.is_none()
                || !headers::is_websocket_upgrade_response(response.headers()));
        target
            .endpoint
            .record_outcome(!unexpected_switch && !response.status().is_server_error());
        if unexpected_switch {
            // Dropping the response closes the upstream connection.
            target
                .backend
                .metrics
                .upstream_error(UpstreamErrorKind::Upstream);
            return Err(ProxyError::UnexpectedUpgrade {
                endpoint: target.endpoint.url.clone(),
            });
        }
        if response.headers().contains_key(TRANSFER_ENCODING) {
            // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, which must not be
            // passed on (hyper decoded the chunked body; it re-frames it for the client).
            response.headers_mut().remove(CONTENT_LENGTH);
        }
        headers::strip_hop_by_hop(response.headers_mut());
        if let Some(name) = &table.backend_header {
            response
                .headers_mut()
                .insert(name.clone(), target.backend.name_value.clone());
        }
        if let Some(id) = outcome.request_id.clone() {
            response
                .headers_mut()
                .insert(headers::X_REQUEST_ID.clone(), id);
        }
        if let (true, Some(client_upgrade), Some(upgrade)) =
            (switching, client_upgrade, response_upgrade)
        {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            response.headers_mut().insert(UPGRADE, upgrade);
            if let Some((upstream, early)) = response.body_mut().take_upgraded() {
                let shutdown = self.shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = tunnel(client_upgrade, upstream, early) => {}
                        () = shutdown.cancelled() => {}
                    }
                });
            }
        }
        Ok(response.map(Either::Left))
    }
}

/// Copies bytes both ways between an upgraded client connection and the upstream connection
/// that switched protocols (first the bytes it sent right after its 101) until either side
/// closes.
async fn tunnel(client: OnUpgrade, mut upstream: TcpStream, early: Bytes) {
    let client = match client.await {
        Ok(client) => client,
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    if !early.is_empty()
        && let Err(error) = client.write_all(&early).await
    {
        tracing::debug!(%error, "tunnel closed with an error");
        return;
    }
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%error, "tunnel closed with an error");
    }
}

fn error_source(error: &ProxyError) -> Option<String> {
    std::error::Error::source(error).map(|source| Chain(source).to_string())
}

/// The response the client gets when the proxy cannot give it an upstream one.
pub fn error_response(
    error: &ProxyError,
    request_id: Option<HeaderValue>,
    backend: Option<(&http::HeaderName, HeaderValue)>,
) -> ProxyResponse {
    let status = StatusCode::from(error);
    let text = format!(
        "{} {}\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("Error")
    );
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(text))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(id) = request_id {
        headers.insert(headers::X_REQUEST_ID.clone(), id);
    }
    if let Some((name, value)) = backend {
        headers.insert(name.clone(), value);
    }
    if matches!(error, ProxyError::AmbiguousFraming) {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::upstream::ConnectError;

    #[test]
    fn a_logged_failure_names_each_cause_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let refused_text = refused.to_string();
        let error = ProxyError::Connect {
            endpoint: "http://127.0.0.1:1".into(),
            source: ConnectError::Io(refused),
        };
        let cause = error_source(&error).unwrap();
        assert_eq!(cause, format!("connect failed: {refused_text}"));
        let closed = ProxyError::Upstream {
            endpoint: "http://127.0.0.1:1".into(),
            source: ExchangeError::Response(crate::codec::MessageError::Closed),
        };
        assert_eq!(
            error_source(&closed).unwrap(),
            "reading the response failed: the connection closed before the message was complete"
        );
    }
}
