//! gRPC calls through HTTP/2 upstreams. A call's outcome is its `grpc-status` (in the
//! trailers, or in the head of a trailers-only response), not its HTTP status, which is 200
//! for a failed call too. The status is counted in `canary_grpc_responses_total` and judged as
//! the HTTP status grpc-gateway maps it to ([`http_status`]), so that a failing call is an
//! error for `canary_requests_total`, passive health and the rollout exactly as a 5xx is. A
//! call is recorded when its status is known; its latency is to its end.
//!
//! A call whose stream ended without a `grpc-status`, or that the upstream cut (a reset,
//! `read_timeout`), is recorded as 502 (and not in the gRPC counter: no status came). One the
//! client gave up on (its response dropped before the end) is counted as 499, against neither
//! the endpoint's health nor the rollout, as a client gone before the response head is.

use std::sync::Arc;

use http::header::HeaderName;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Either;
use tokio::time::Instant;

use super::CLIENT_CLOSED;
use crate::metrics::{BackendMetrics, GrpcStatusLabel};
use crate::rollout::VersionMeter;
use crate::routing::{Backend, Endpoint};
use crate::upstream::{BodyEnd, Ending, ProxyResponse, UpstreamBody, is_grpc};

static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether a response from an HTTP/2 upstream is a gRPC call's (200 with a gRPC content type),
/// judged by its `grpc-status` instead of its HTTP status: then the endpoint's health is told
/// here for a call whose status came in the head (a trailers-only answer, also counted in the
/// gRPC counter) or that ended without one, and a call whose status comes in the trailers
/// gets a watcher that records it when its body ends. Never inlined: the forward path pays
/// one check for an HTTP/1 backend.
#[inline(never)]
pub(super) fn judge(
    response: &mut Response<UpstreamBody>,
    backend: &Backend,
    endpoint: &Arc<Endpoint>,
) -> bool {
    if response.status() != StatusCode::OK || !is_grpc(response.headers()) {
        return false;
    }
    if let Some((label, status)) = call_status(response.headers()) {
        backend.metrics.grpc_response(label);
        endpoint.record_outcome(!status.is_server_error());
        return true;
    }
    let call = Box::new(GrpcCall {
        endpoint: endpoint.clone(),
        metrics: backend.metrics.clone(),
        meter: backend.meter.clone(),
        started: Instant::now(),
    });
    if response.body_mut().watch_end(call).is_err() {
        // Nothing more to read, and no status.
        endpoint.record_outcome(false);
    }
    true
}

/// The status a request answered by an HTTP/2 upstream is counted with now: its own, or for a
/// gRPC call the status its `grpc-status` maps to (502 without one); `None` for a call recorded
/// when its body ends, whose watcher is told when the request arrived (`started`).
#[inline(never)]
pub(super) fn settle(response: &mut ProxyResponse, started: Instant) -> Option<StatusCode> {
    if let Either::Left(body) = response.body_mut()
        && let Some(call) = body.end_watcher()
    {
        call.arrived(started);
        return None;
    }
    let status = response.status();
    if status != StatusCode::OK || !is_grpc(response.headers()) {
        return Some(status);
    }
    Some(call_status(response.headers()).map_or(StatusCode::BAD_GATEWAY, |(_, status)| status))
}

/// A gRPC call waiting for its status, with where its outcome is counted.
struct GrpcCall {
    endpoint: Arc<Endpoint>,
    metrics: BackendMetrics,
    meter: Option<Arc<VersionMeter>>,
    /// When the request arrived (until told, when the response head came).
    started: Instant,
}

impl BodyEnd for GrpcCall {
    fn arrived(&mut self, at: Instant) {
        self.started = at;
    }

    fn end(self: Box<Self>, ending: Ending<'_>) {
        let elapsed = self.started.elapsed();
        let status = match ending {
            Ending::Complete(trailers) => match trailers.and_then(call_status) {
                Some((label, status)) => {
                    self.metrics.grpc_response(label);
                    status
                }
                None => {
                    tracing::debug!(endpoint = %self.endpoint.url(), "a gRPC call ended without a grpc-status");
                    StatusCode::BAD_GATEWAY
                }
            },
            Ending::Failed => StatusCode::BAD_GATEWAY,
            Ending::Dropped => {
                let gone = StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST);
                self.metrics.response(gone, elapsed);
                return;
            }
        };
        self.endpoint.record_outcome(!status.is_server_error());
        if let Some(meter) = &self.meter {
            meter.record(status, elapsed);
        }
        self.metrics.response(status, elapsed);
    }
}

/// The call's status from `grpc-status` in `headers`, as its label and the HTTP status it maps
/// to; `None` when there is none. A value that is no number is `other`, judged as 500 (a
/// status gRPC does not define is UNKNOWN).
fn call_status(headers: &HeaderMap) -> Option<(GrpcStatusLabel, StatusCode)> {
    let value = headers.get(&GRPC_STATUS)?;
    let code = std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok());
    Some(match code {
        Some(code) => (GrpcStatusLabel::of(code), http_status(code)),
        None => (GrpcStatusLabel::OTHER, StatusCode::INTERNAL_SERVER_ERROR),
    })
}

/// The HTTP status of a gRPC status code (`google.rpc.Code`), as grpc-gateway maps it; codes
/// gRPC does not define are 500, as UNKNOWN.
pub fn http_status(code: u32) -> StatusCode {
    match code {
        0 => StatusCode::OK,
        // CANCELLED: the client gave up (nginx's 499).
        1 => StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
        3 | 9 | 11 => StatusCode::BAD_REQUEST, // INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
        4 => StatusCode::GATEWAY_TIMEOUT,      // DEADLINE_EXCEEDED
        5 => StatusCode::NOT_FOUND,
        6 | 10 => StatusCode::CONFLICT,     // ALREADY_EXISTS, ABORTED
        7 => StatusCode::FORBIDDEN,         // PERMISSION_DENIED
        8 => StatusCode::TOO_MANY_REQUESTS, // RESOURCE_EXHAUSTED
        12 => StatusCode::NOT_IMPLEMENTED,
        14 => StatusCode::SERVICE_UNAVAILABLE,
        16 => StatusCode::UNAUTHORIZED, // UNAUTHENTICATED
        // UNKNOWN, INTERNAL, DATA_LOSS, and any other
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn grpc_codes_map_to_http_as_grpc_gateway_does() {
        let expected: [(u32, u16); 17] = [
            (0, 200),
            (1, 499),
            (2, 500),
            (3, 400),
            (4, 504),
            (5, 404),
            (6, 409),
            (7, 403),
            (8, 429),
            (9, 400),
            (10, 409),
            (11, 400),
            (12, 501),
            (13, 500),
            (14, 503),
            (15, 500),
            (16, 401),
        ];
        for (code, http) in expected {
            assert_eq!(http_status(code).as_u16(), http, "code {code}");
        }
        assert_eq!(http_status(17), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(http_status(u32::MAX), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn the_status_is_read_from_grpc_status() {
        let status = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(&GRPC_STATUS, HeaderValue::from_static(value));
            call_status(&headers)
        };
        assert_eq!(
            status("14"),
            Some((GrpcStatusLabel::of(14), StatusCode::SERVICE_UNAVAILABLE))
        );
        assert_eq!(status("0"), Some((GrpcStatusLabel::of(0), StatusCode::OK)));
        assert_eq!(
            status("99"),
            Some((GrpcStatusLabel::OTHER, StatusCode::INTERNAL_SERVER_ERROR))
        );
        assert_eq!(
            status("unavailable"),
            Some((GrpcStatusLabel::OTHER, StatusCode::INTERNAL_SERVER_ERROR))
        );
        assert_eq!(call_status(&HeaderMap::new()), None);
    }
}
