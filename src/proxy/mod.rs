//! The forward path of one request, top to bottom: load the routing table once, pick a backend,
//! rewrite the request, send it (retrying once elsewhere if the connection could not be made),
//! rewrite the response. Every failure becomes a synthetic response in one place,
//! [`error_response`]. A client that goes away meanwhile cancels the exchange.
//!
//! - `h1`: HTTP/1 client connections, plain or TLS (the protocol is `crate::http1`'s).
//! - `h2`: HTTP/2 client connections (h2c, or h2 over TLS), served by hyper.
//! - `headers`: the request target and `Host` check, hop-by-hop stripping, `X-Forwarded-*`,
//!   `x-request-id`.
//! - `error`: [`ProxyError`] and the status code of each failure.
//! - `grpc`: a gRPC call's status (from an HTTP/2 upstream), counted and recorded when known.

pub mod error;
mod grpc;
pub mod h1;
pub mod h2;
pub mod headers;

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, SET_COOKIE, TE, TRANSFER_ENCODING, UPGRADE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::chain::Chain;
use crate::id::Id;
use crate::metrics::{FaultKind, Metrics, UpstreamErrorKind};
use crate::mirror::copy::{BodySize, CopyTargets, Mirror, Served, ServedCapture, X_CANARY_MIRROR};
use crate::routing::fault::Injection;
use crate::routing::{Backend, Endpoint, Reason, RoutingTable, SharedTable};
use crate::upstream::{
    ConnectError, ExchangeError, ForwardBody, ProxyResponse, SendError, UpstreamBody,
};
use error::ProxyError;

/// What the proxy knows of a request's client from its connection; made once per connection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Its address, as `X-Forwarded-For` carries it ([`headers::client_ip_value`]).
    pub ip: HeaderValue,
    /// The connection is TLS: the request goes up with `X-Forwarded-Proto: https`, and the
    /// sticky cookie it may get is `Secure`.
    pub tls: bool,
}

/// Forwards requests according to the current routing table.
#[derive(Clone)]
pub struct Proxy {
    table: SharedTable,
    metrics: Arc<Metrics>,
    /// Ends WebSocket tunnels once the drain is over.
    shutdown: CancellationToken,
}

/// The status counted for a request whose client went away before its answer (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

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
    /// The new anonymous user id routing drew, which the response gives the client.
    new_user: Option<Id>,
    /// A fault drill held the request (its answer, whatever it is, says so).
    delayed: bool,
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
            for endpoint in &backend.endpoints {
                backend.upstream.sweep(&endpoint.peer);
            }
        }
        if let Some(mirror) = &table.mirror {
            mirror.sweep();
        }
    }

    /// Ends WebSocket tunnels when the proxy shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Counts a request refused before routing (malformed, over a limit, bad framing).
    pub fn count_refusal(&self, status: StatusCode) {
        self.metrics
            .unrouted()
            .response(status, std::time::Duration::ZERO);
    }

    /// Answers one client request; never fails (errors become 4xx/5xx responses). `None` when
    /// `client_gone` completed first: the exchange is dropped (its upstream connection
    /// closed), and the request is counted as 499 with the backend it was routed to, and
    /// against neither the upstream's health nor the rollout's counts.
    pub async fn handle(
        &self,
        request: Request<ForwardBody>,
        client: &ClientInfo,
        client_gone: impl Future<Output = ()>,
    ) -> Option<ProxyResponse> {
        // One clock read serves the metrics and the request deadline.
        let started = Instant::now();
        let _in_flight = self.metrics.in_flight();
        let table = self.table.load_full();
        let mut outcome = Outcome::default();
        let forwarded = {
            // Pinned where they are made (a select! would move the forward future, some
            // 2.5 KiB, once more); the exchange first, the client only while it waits.
            let mut forward = pin!(self.forward(request, client, &table, started, &mut outcome));
            let mut client_gone = pin!(client_gone);
            poll_fn(|cx| match forward.as_mut().poll(cx) {
                Poll::Ready(forwarded) => Poll::Ready(Some(forwarded)),
                Poll::Pending => client_gone.as_mut().poll(cx).map(|()| None),
            })
            .await
        };
        let elapsed = started.elapsed();
        let backend = outcome.backend.map(|index| &table.backends[index]);
        let metrics = backend.map_or(self.metrics.unrouted(), |b| &b.metrics);
        if let Some(reason) = outcome.reason {
            metrics.decision(reason.label());
        }
        let Some(forwarded) = forwarded else {
            tracing::debug!(
                request_id = outcome.request_id.as_ref().and_then(|v| v.to_str().ok()),
                "client closed the connection before the response"
            );
            let status = StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST);
            metrics.response(status, elapsed);
            return None;
        };
        let mut response = match forwarded {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(
                    error = %error,
                    cause = error_source(&error),
                    request_id = outcome.request_id.as_ref().and_then(|v| v.to_str().ok()),
                    "request failed"
                );
                let named = named_backend(&table, backend);
                error_response(&error, outcome.request_id.clone(), named)
            }
        };
        let secure = client.tls;
        if let Some(cookie) = outcome
            .new_user
            .and_then(|id| table.sticky.set_cookie(id, secure))
        {
            // Whatever the answer, the visitor keeps the id that picked its version.
            response.headers_mut().append(SET_COOKIE, cookie);
        }
        if outcome.delayed {
            response.headers_mut().insert(
                headers::X_CANARY_FAULT.clone(),
                HeaderValue::from_static("delay"),
            );
        }
        let status = match backend {
            // A gRPC call counts by its grpc-status, perhaps when its body ends.
            Some(backend) if backend.upstream.is_h2() => match grpc::settle(&mut response, started)
            {
                Some(status) => status,
                None => return Some(response),
            },
            _ => response.status(),
        };
        if let Some(meter) = backend.and_then(|b| b.meter.as_ref()) {
            meter.record(status, elapsed);
        }
        metrics.response(status, elapsed);
        Some(response)
    }

    /// The forward path: check the request, route it, rewrite it for the upstream, send it
    /// (retrying elsewhere when no connection could be made), rewrite the response.
    async fn forward(
        &self,
        request: Request<ForwardBody>,
        client: &ClientInfo,
        table: &RoutingTable,
        started: Instant,
        outcome: &mut Outcome,
    ) -> Result<ProxyResponse, ProxyError> {
        // Known before anything can fail, so every answer carries it.
        let request_id = headers::request_id(request.headers());
        outcome.request_id = Some(request_id.clone());
        if request.method() == Method::CONNECT {
            return Err(ProxyError::ConnectMethod);
        }
        let websocket = request.version() == Version::HTTP_11
            && headers::is_websocket_upgrade(request.headers());
        let (mut parts, body) = request.into_parts();
        // The request target and Host: `Host` becomes the one the request goes upstream with,
        // before routing, so that rules see that one too. `h1` settles its requests before
        // they get here (a refusal closes the connection); HTTP/2 ones are settled here.
        let host = if parts.version >= Version::HTTP_2 {
            headers::settle_host(&parts.method, &parts.uri, &mut parts.headers, parts.version)?
        } else {
            parts.headers.get(HOST).cloned()
        };

        let target = route(table, &parts.headers, outcome)?;
        // A fault drill on this backend: held, or answered here (neither touches the
        // endpoint's health; the answer counts as the backend's everywhere else).
        let injected = match &target.backend.fault {
            None => Injection::default(),
            Some(fault) => fault.draw(&parts.headers, &mut rand::rng()),
        };
        let started = match injected.delay {
            None => started,
            Some(delay) => {
                target.backend.metrics.fault(FaultKind::Delay);
                outcome.delayed = true;
                // Boxed: a timer in the future of every request would make it larger.
                Box::pin(tokio::time::sleep(delay)).await;
                // The request's own timeouts start once the delay is over, as they would
                // behind a slow network.
                Instant::now()
            }
        };
        if let Some(status) = injected.abort {
            target.backend.metrics.fault(FaultKind::Abort);
            let mut response = synthetic_response(
                status,
                outcome.request_id.clone(),
                named_backend(table, Some(target.backend)),
            );
            response.headers_mut().insert(
                headers::X_CANARY_FAULT.clone(),
                HeaderValue::from_static("abort"),
            );
            return Ok(response);
        }
        let outgoing = rewrite_request(
            parts,
            body,
            host,
            client,
            request_id,
            websocket,
            target.endpoint,
            target.backend.upstream.is_h2(),
        );
        // (A function taking and giving back the request, not a `&mut` borrow of it: one
        // would keep its 264 bytes in this future beside the exchange's.)
        let (outgoing, planned) = match &table.mirror {
            None => (outgoing, None),
            Some(mirror) => {
                let (outgoing, capture) = mirror_copy(table, mirror, &target, outgoing);
                let planned = capture.map(|c| (c, target.index, target.endpoint.clone()));
                (outgoing, planned)
            }
        };
        let (mut response, target) =
            match send_with_retry(table, target, outgoing, started, outcome).await {
                Ok(sent) => sent,
                Err(error) => {
                    if let Some((capture, _, _)) = planned {
                        served_failed(capture, &error);
                    }
                    return Err(error);
                }
            };
        if let Some(planned) = planned {
            served_answered(planned, &target, &mut response);
        }
        let request_id = outcome.request_id.clone();
        rewrite_response(response, &target, websocket, table, request_id)
    }
}

/// Sends a copy of `outgoing` (as it goes to `target`) beside it when mirroring admits it;
/// a request with a body has it teed, so the copy gets it once it has gone up. Gives the
/// request back, with where the served answer is captured for the comparison. Never
/// inlined: in the forward path's own code it kept the compiler from inlining the exchange
/// there (measured with callgrind, with mirroring off).
#[inline(never)]
fn mirror_copy(
    table: &RoutingTable,
    mirror: &Arc<Mirror>,
    target: &Target<'_>,
    mut outgoing: Request<ForwardBody>,
) -> (Request<ForwardBody>, Option<ServedCapture>) {
    let capture = copy_beside(table, mirror, target, &mut outgoing);
    (outgoing, capture)
}

/// Hands the served answer to the copy's comparison, when it came from where the copy was
/// planned beside. Retried elsewhere, the answer is not the one the copies are to be compared
/// with (it may even be the canary's); but the served version failed the request's first
/// attempt (a failed connect), as a copy that cannot connect fails: the pair counts that
/// failure, or the copies' failures would weigh against the canary alone. Never inlined: the
/// forward path pays one check when mirroring is off (measured with callgrind).
#[inline(never)]
fn served_answered(
    (capture, index, endpoint): (ServedCapture, usize, Arc<Endpoint>),
    target: &Target<'_>,
    response: &mut Response<UpstreamBody>,
) {
    if index == target.index && Arc::ptr_eq(&endpoint, target.endpoint) {
        capture.watch(response);
    } else {
        capture.failed();
    }
}

/// Tells a copy that the served version failed its request (502, 504), so the shadow stage
/// pairs the copy's outcome with an error. A failure of the client's own is no outcome of
/// the served version; one after a retry on another backend is (its first attempt failed).
#[cold]
#[inline(never)]
fn served_failed(capture: ServedCapture, error: &ProxyError) {
    let upstream = matches!(
        error,
        ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Timeout { .. }
            | ProxyError::UnexpectedUpgrade { .. }
    );
    if upstream {
        capture.failed();
    }
}

/// [`mirror_copy`] on the request in place.
fn copy_beside(
    table: &RoutingTable,
    mirror: &Arc<Mirror>,
    target: &Target<'_>,
    outgoing: &mut Request<ForwardBody>,
) -> Option<ServedCapture> {
    // Only the proxy's copies carry the mark: one a client sent is not passed on.
    outgoing.headers_mut().remove(&X_CANARY_MIRROR);
    let size = if http_body::Body::is_end_stream(outgoing.body()) {
        BodySize::None
    } else {
        let length = outgoing.headers().get(CONTENT_LENGTH);
        match length.and_then(|v| v.to_str().ok()?.parse().ok()) {
            Some(length) => BodySize::Known(length),
            None => BodySize::Unknown,
        }
    };
    let admission = mirror.admit(&served(target, outgoing)?, size)?;
    let kept = (size != BodySize::None).then(|| {
        let limit = usize::try_from(mirror.config.max_body).unwrap_or(usize::MAX);
        let body = std::mem::replace(outgoing.body_mut(), ForwardBody::Empty);
        let (teed, kept) = body.tee(limit);
        *outgoing.body_mut() = teed;
        kept
    });
    let canary = table.backends.get(mirror.backend)?;
    let second = mirror
        .wants_second(outgoing.method())
        .then(|| mirror.cursor(target.index))
        .flatten()
        .and_then(|cursor| {
            target
                .backend
                .pick_endpoint_with(cursor, Some(target.endpoint))
        });
    let targets = CopyTargets {
        canary: mirror
            .cursor(mirror.backend)
            .and_then(|cursor| canary.pick_endpoint_with(cursor, None)),
        second,
        // A fault drill on the mirror backend holds or answers its copies too.
        fault: canary.fault.as_ref().map(|fault| {
            (
                fault.draw(outgoing.headers(), &mut rand::rng()),
                canary.metrics.clone(),
            )
        }),
    };
    mirror.spawn(admission, &served(target, outgoing)?, kept, targets)
}

/// `outgoing`, as it goes to `target`, as mirroring sees it.
fn served<'a>(target: &Target<'_>, outgoing: &'a Request<ForwardBody>) -> Option<Served<'a>> {
    Some(Served {
        backend: target.index,
        method: outgoing.method(),
        uri: outgoing.uri(),
        headers: outgoing.headers(),
        request_id: outgoing.headers().get(&headers::X_REQUEST_ID)?,
        path: outgoing.uri().path(),
    })
}

/// Picks the backend and endpoint that serve a request with these headers, and notes the
/// decision in `outcome`.
fn route<'t>(
    table: &'t RoutingTable,
    headers: &HeaderMap,
    outcome: &mut Outcome,
) -> Result<Target<'t>, ProxyError> {
    let decision = table
        .route(headers, &mut rand::rng())
        .ok_or(ProxyError::NoBackend)?;
    let backend = &table.backends[decision.backend];
    outcome.backend = Some(decision.backend);
    outcome.reason = Some(decision.reason);
    outcome.new_user = decision.new_user;
    let endpoint = backend
        .endpoints
        .get(decision.endpoint)
        .ok_or(ProxyError::NoBackend)?;
    Ok(Target {
        backend,
        index: decision.backend,
        endpoint,
    })
}

/// The request as it goes upstream: hop-by-hop headers stripped (but `te: trailers` to an
/// HTTP/2 upstream), `X-Forwarded-*` and `x-request-id` added, `Host` as `settle_host` made
/// it (or the endpoint's for a request that has none), a WebSocket upgrade kept, and an
/// origin-form target.
#[allow(clippy::too_many_arguments)]
fn rewrite_request(
    parts: Parts,
    body: ForwardBody,
    host: Option<HeaderValue>,
    client: &ClientInfo,
    request_id: HeaderValue,
    websocket: bool,
    endpoint: &Endpoint,
    upstream_h2: bool,
) -> Request<ForwardBody> {
    let mut upstream_headers = parts.headers;
    let upgrade_value = upstream_headers.get(UPGRADE).cloned();
    let te_trailers = headers::strip_hop_by_hop(&mut upstream_headers);
    if te_trailers && upstream_h2 {
        upstream_headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    headers::add_forwarded(&mut upstream_headers, &client.ip, host.as_ref(), client.tls);
    upstream_headers.insert(headers::X_REQUEST_ID.clone(), request_id);
    if parts.version == Version::HTTP_2 {
        headers::join_cookies(&mut upstream_headers);
    }
    // Host as `settle_host` made it (put back if `Connection` named it); a request that
    // has none (HTTP/1.0) gets the endpoint's.
    if !upstream_headers.contains_key(HOST) {
        let host = host.or_else(|| HeaderValue::from_str(endpoint.authority().as_str()).ok());
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
    outgoing
}

/// Sends the request to `target`, and when no connection could be made there (the request is
/// then still whole: nothing of it was written), once more to another endpoint or backend.
/// Returns the response head and where it came from.
async fn send_with_retry<'t>(
    table: &'t RoutingTable,
    mut target: Target<'t>,
    mut outgoing: Request<ForwardBody>,
    started: Instant,
    outcome: &mut Outcome,
) -> Result<(Response<UpstreamBody>, Target<'t>), ProxyError> {
    let mut retried = false;
    loop {
        let sent =
            target
                .backend
                .upstream
                .send(&target.endpoint.peer, outgoing, table.timeouts, started);
        let (request, failure) = match sent.await {
            Ok(response) => return Ok((response, target)),
            Err(error) => not_sent(&target, error)?,
        };
        let retry = (!retried)
            .then(|| table.alternative(target.index, target.endpoint, &mut rand::rng()))
            .flatten();
        let Some((index, endpoint)) = retry else {
            return Err(ProxyError::Connect {
                endpoint: target.endpoint.url().to_owned(),
                source: failure,
            });
        };
        tracing::debug!(failed = %target.endpoint.url(), retry = %endpoint.url(), "connect failed, retrying");
        target = Target {
            backend: &table.backends[index],
            index,
            endpoint,
        };
        outcome.backend = Some(index);
        let mut request = request;
        if !target.backend.upstream.is_h2() {
            // `te: trailers` was kept for an HTTP/2 upstream; an HTTP/1 one gets no TE. (On
            // the box: a borrow of `outgoing` would keep it in this future beside the send's.)
            request.headers_mut().remove(TE);
        }
        outgoing = *request;
        retried = true;
    }
}

/// What a failed send leaves: the request, whole, when no connection could be made (it may
/// go elsewhere), else the error the client is answered with. A failure of the upstream counts
/// against the endpoint's health and in the backend's metrics; the client's own body failing
/// (malformed, the client gone, or stalled) says nothing about the upstream.
fn not_sent(
    target: &Target<'_>,
    error: SendError,
) -> Result<(Box<Request<ForwardBody>>, ConnectError), ProxyError> {
    let upstream_failed = |kind| {
        target.endpoint.record_outcome(false);
        target.backend.metrics.upstream_error(kind);
    };
    match error {
        SendError::Failed(ExchangeError::RequestBody(source)) => {
            Err(ProxyError::ClientBody { source })
        }
        SendError::ClientStalled(timeout) => Err(ProxyError::ClientTimeout { timeout }),
        // The upstream is not to blame either.
        SendError::Upgrade => Err(ProxyError::WebSocketToH2 {
            endpoint: target.endpoint.url().to_owned(),
        }),
        SendError::TimedOut(timeout) => {
            upstream_failed(UpstreamErrorKind::Timeout);
            Err(ProxyError::Timeout {
                endpoint: target.endpoint.url().to_owned(),
                timeout,
            })
        }
        SendError::Failed(source) => {
            upstream_failed(UpstreamErrorKind::Upstream);
            Err(ProxyError::Upstream {
                endpoint: target.endpoint.url().to_owned(),
                source,
            })
        }
        SendError::NotSent { request, error } => {
            upstream_failed(UpstreamErrorKind::Connect);
            Ok((request, error))
        }
    }
}

/// The response as the client gets it, once judged: a 5xx, or a protocol switch the client
/// did not ask for, counts against the endpoint's health (the switch is refused: it would
/// desynchronise the client connection); a gRPC call from an HTTP/2 upstream is judged by its
/// `grpc-status` instead ([`grpc::judge`]). Hop-by-hop headers are stripped, the backend
/// header and `x-request-id` added, and a WebSocket switch kept.
fn rewrite_response(
    mut response: Response<UpstreamBody>,
    target: &Target<'_>,
    websocket: bool,
    table: &RoutingTable,
    request_id: Option<HeaderValue>,
) -> Result<ProxyResponse, ProxyError> {
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let response_upgrade = response.headers().get(UPGRADE).cloned();
    let unexpected_switch =
        switching && (!websocket || !headers::is_websocket_upgrade_response(response.headers()));
    let grpc = target.backend.upstream.is_h2()
        && grpc::judge(&mut response, target.backend, target.endpoint);
    if !grpc {
        target
            .endpoint
            .record_outcome(!unexpected_switch && !response.status().is_server_error());
    }
    if unexpected_switch {
        // Dropping the response closes the upstream connection.
        target
            .backend
            .metrics
            .upstream_error(UpstreamErrorKind::Upstream);
        return Err(ProxyError::UnexpectedUpgrade {
            endpoint: target.endpoint.url().to_owned(),
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
    if let Some(id) = request_id {
        response
            .headers_mut()
            .insert(headers::X_REQUEST_ID.clone(), id);
    }
    // The switch itself (writing the 101, then the tunnel) is the client connection's.
    if let (true, Some(upgrade)) = (switching, response_upgrade) {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        response.headers_mut().insert(UPGRADE, upgrade);
    }
    Ok(response.map(Either::Left))
}

fn error_source(error: &ProxyError) -> Option<String> {
    std::error::Error::source(error).map(|source| Chain(source).to_string())
}

/// An empty 499, for a path whose client cannot go away before its answer (the h2 service,
/// whose `client_gone` never completes).
fn client_closed_response() -> ProxyResponse {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST);
    response
}

/// The backend header and this backend's name for it, when both exist.
fn named_backend<'t>(
    table: &'t RoutingTable,
    backend: Option<&Backend>,
) -> Option<(&'t http::HeaderName, HeaderValue)> {
    table
        .backend_header
        .as_ref()
        .zip(backend.map(|b| b.name_value.clone()))
}

/// The response the client gets when the proxy cannot give it an upstream one.
pub fn error_response(
    error: &ProxyError,
    request_id: Option<HeaderValue>,
    backend: Option<(&http::HeaderName, HeaderValue)>,
) -> ProxyResponse {
    synthetic_response(StatusCode::from(error), request_id, backend)
}

/// An answer of the proxy's own: the status and its reason as text, the request id, and the
/// backend the request was routed to (when there is one).
fn synthetic_response(
    status: StatusCode,
    request_id: Option<HeaderValue>,
    backend: Option<(&http::HeaderName, HeaderValue)>,
) -> ProxyResponse {
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
    response
}

#[cfg(test)]
mod tests {
    use super::*;

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
            source: ExchangeError::Response(crate::http1::body::MessageError::Closed),
        };
        assert_eq!(
            error_source(&closed).unwrap(),
            "reading the response failed: the connection closed before the message was complete"
        );
    }
}
