//! The access log (`[log] access = "json"`): one JSON object per request, on stdout (the
//! process log is on stderr), written whole once the response body has ended, as nginx does:
//! also for a request refused before routing, one whose client went away (499), and one whose
//! response body failed midway (what was sent).
//!
//! Nothing here runs while the access log is off: the forward path starts an [`AccessLine`]
//! only when the request's routing table says so, and the client connection counts the body
//! ([`Logged`]) only for a response that carries one.

use std::borrow::Cow;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Buf;
use http::{Extensions, HeaderValue, Method, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::UNROUTED_BACKEND;
use crate::routing::{Endpoint, RoutingTable};
use crate::utc::rfc3339_millis;

/// What the access log says of one request, gathered as it is served. Handed from the forward
/// path to the client connection in the response's extensions (hence `Clone`; it is never
/// cloned).
#[derive(Clone)]
pub struct AccessLine {
    /// When the request began, on the wall clock (`time`) and on the monotonic one (for
    /// `duration_ms`).
    time: SystemTime,
    started: Instant,
    client: HeaderValue,
    method: Method,
    /// Only its path is written: a query may carry tokens.
    uri: Uri,
    version: Version,
    /// The table the request was routed by, for its backend's name.
    table: Arc<RoutingTable>,
    request_id: Option<HeaderValue>,
    backend: Option<usize>,
    reason: Option<&'static str>,
    endpoint: Option<Arc<Endpoint>>,
    fault: Option<&'static str>,
    status: u16,
    /// Response body bytes handed to the client connection.
    bytes: u64,
}

/// What the forward path learned of a request, for its line.
pub struct Served {
    pub request_id: Option<HeaderValue>,
    /// Index in the table of the backend that served (or was to serve) it.
    pub backend: Option<usize>,
    /// The routing reason's label (as in `canary_route_decisions_total{reason}`).
    pub reason: Option<&'static str>,
    /// `"abort"` or `"delay"` when a fault drill touched the request.
    pub fault: Option<&'static str>,
    /// The status the client gets.
    pub status: u16,
}

/// The line as written: every field is always there, `null` when it has no value.
#[derive(Serialize)]
struct Entry<'a> {
    time: &'a str,
    request_id: Option<&'a str>,
    client: &'a str,
    method: &'a str,
    path: &'a str,
    protocol: &'static str,
    backend: &'a str,
    reason: Option<&'static str>,
    endpoint: Option<&'a str>,
    status: u16,
    duration_ms: f64,
    bytes: u64,
    fault: Option<&'static str>,
}

impl AccessLine {
    /// The line of a request beginning now (`started`), routed by `table`.
    pub fn begin(
        method: &Method,
        uri: &Uri,
        version: Version,
        client: &HeaderValue,
        table: Arc<RoutingTable>,
        started: Instant,
    ) -> Box<AccessLine> {
        Box::new(AccessLine {
            time: SystemTime::now(),
            started,
            client: client.clone(),
            method: method.clone(),
            uri: uri.clone(),
            version,
            table,
            request_id: None,
            backend: None,
            reason: None,
            endpoint: None,
            fault: None,
            status: 0,
            bytes: 0,
        })
    }

    /// Notes the endpoint the request is sent to (the last one is written).
    pub fn sending_to(&mut self, endpoint: &Arc<Endpoint>) {
        self.endpoint = Some(endpoint.clone());
    }

    /// Notes what the forward path learned, and the status the client gets.
    pub fn served(&mut self, served: Served) {
        self.request_id = served.request_id;
        self.backend = served.backend;
        self.reason = served.reason;
        self.fault = served.fault;
        self.status = served.status;
    }

    /// The line as one JSON object and its newline, its duration up to now.
    fn render(&self) -> Vec<u8> {
        let time = rfc3339_millis(self.time);
        let request_id = self.request_id.as_ref().map(|id| {
            // A client's id may have bytes that are not UTF-8 (the fast check first).
            std::str::from_utf8(id.as_bytes())
                .map_or_else(|_| String::from_utf8_lossy(id.as_bytes()), Cow::Borrowed)
        });
        let backend = self
            .backend
            .and_then(|index| self.table.backends.get(index))
            .map_or(UNROUTED_BACKEND, |backend| backend.name.as_str());
        let entry = Entry {
            time: std::str::from_utf8(&time).unwrap_or(""),
            request_id: request_id.as_deref(),
            client: self.client.to_str().unwrap_or(""),
            method: self.method.as_str(),
            path: self.uri.path(),
            protocol: protocol(self.version),
            backend,
            reason: self.reason,
            endpoint: self.endpoint.as_ref().map(|e| e.url()),
            status: self.status,
            duration_ms: self.started.elapsed().as_nanos() as f64 / 1e6,
            bytes: self.bytes,
            fault: self.fault,
        };
        let mut text = Vec::with_capacity(512);
        // Writing to a Vec fails only on a serializer error, which these types cannot have.
        let _ = serde_json::to_writer(&mut text, &entry);
        text.push(b'\n');
        text
    }

    /// Writes the line to stdout, whole: under stdout's lock, in one `write_all`, so the
    /// lines of requests on other workers never interleave with it. A stdout that cannot be
    /// written (closed) loses the line.
    pub fn write(&self) {
        let text = self.render();
        let _ = std::io::stdout().lock().write_all(&text);
    }
}

/// The access log line a response carries to the client connection, when the access log is
/// on. (An empty `Extensions` is told in an inlined check: `remove` is a call.)
#[inline]
pub fn take_line<B>(response: &mut Response<B>) -> Option<Box<AccessLine>> {
    if response.extensions().is_empty() {
        return None;
    }
    remove_line(response.extensions_mut())
}

#[cold]
#[inline(never)]
fn remove_line(extensions: &mut Extensions) -> Option<Box<AccessLine>> {
    extensions.remove::<Box<AccessLine>>()
}

/// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`, as a request came.
fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

/// A response body that counts the bytes of data it gives the client connection, and writes
/// the access line when it is dropped: once the connection has written the body to its end,
/// or given up on it (the client gone, the upstream's body failed).
pub struct Logged<B> {
    body: B,
    line: Box<AccessLine>,
}

impl<B> Logged<B> {
    pub fn new(body: B, line: Box<AccessLine>) -> Self {
        Logged { body, line }
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        self.line.write();
    }
}

impl<B: Body + Unpin> Body for Logged<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.line.bytes += data.remaining() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};
    use serde_json::Value;

    use super::*;
    use crate::config::parse;
    use crate::metrics::Metrics;

    fn table() -> Arc<RoutingTable> {
        let config = parse(
            "[[backend]]\nname = \"v1\"\nurls = [\"http://127.0.0.1:8081\"]\nweight = 1\n",
            "test.toml",
        )
        .unwrap();
        Arc::new(RoutingTable::from_config(&config, 1, None, &Metrics::new()))
    }

    fn line(uri: &str, version: Version) -> Box<AccessLine> {
        AccessLine::begin(
            &Method::POST,
            &uri.parse().unwrap(),
            version,
            &HeaderValue::from_static("127.0.0.1"),
            table(),
            Instant::now(),
        )
    }

    fn parsed(line: &AccessLine) -> Value {
        let text = line.render();
        assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(text.last(), Some(&b'\n'));
        serde_json::from_slice(&text).unwrap()
    }

    #[test]
    fn a_routed_request_has_every_field() {
        let table = table();
        let mut line = line("http://example.com/a/b?token=secret", Version::HTTP_11);
        line.sending_to(&table.backends[0].endpoints[0]);
        line.served(Served {
            request_id: Some(HeaderValue::from_static("id-1")),
            backend: Some(0),
            reason: Some("rule"),
            fault: Some("delay"),
            status: 200,
        });
        line.bytes = 42;
        let entry = parsed(&line);
        let mut expected = [
            "time",
            "request_id",
            "client",
            "method",
            "path",
            "protocol",
            "backend",
            "reason",
            "endpoint",
            "status",
            "duration_ms",
            "bytes",
            "fault",
        ];
        expected.sort_unstable();
        // (serde_json's map iterates its keys sorted.)
        let fields: Vec<&String> = entry.as_object().unwrap().keys().collect();
        assert_eq!(fields, expected);
        assert_eq!(entry["request_id"], "id-1");
        assert_eq!(entry["client"], "127.0.0.1");
        assert_eq!(entry["method"], "POST");
        assert_eq!(entry["path"], "/a/b");
        assert!(!String::from_utf8(line.render()).unwrap().contains("secret"));
        assert_eq!(entry["protocol"], "HTTP/1.1");
        assert_eq!(entry["backend"], "v1");
        assert_eq!(entry["reason"], "rule");
        assert_eq!(entry["endpoint"], "http://127.0.0.1:8081");
        assert_eq!(entry["status"], 200);
        assert!(entry["duration_ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(entry["bytes"], 42);
        assert_eq!(entry["fault"], "delay");
        let time = entry["time"].as_str().unwrap();
        assert_eq!((time.len(), &time[10..11], &time[23..]), (24, "T", "Z"));
    }

    #[test]
    fn an_unrouted_request_has_backend_none_and_nulls() {
        let mut line = line("/", Version::HTTP_2);
        line.served(Served {
            request_id: None,
            backend: None,
            reason: None,
            fault: None,
            status: 400,
        });
        let entry = parsed(&line);
        assert_eq!(entry["backend"], "none");
        assert_eq!(entry["protocol"], "HTTP/2");
        for null in ["request_id", "reason", "endpoint", "fault"] {
            assert!(entry[null].is_null(), "{null}: {entry}");
        }
    }

    #[test]
    fn strings_are_escaped() {
        let mut line = line("/", Version::HTTP_10);
        let id = "a\"b\\c\td é";
        line.served(Served {
            request_id: Some(HeaderValue::from_bytes(id.as_bytes()).unwrap()),
            backend: None,
            reason: None,
            fault: None,
            status: 499,
        });
        let entry = parsed(&line);
        assert_eq!(entry["request_id"], id);
        assert_eq!(entry["protocol"], "HTTP/1.0");
    }

    #[tokio::test]
    async fn the_body_counts_data_bytes_and_passes_trailers() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world"))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut body = Logged::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            line("/", Version::HTTP_2),
        );
        let collected = (&mut body).collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(body.line.bytes, 11);
        // A body known whole keeps its size (the connection frames it with Content-Length).
        let full = Logged::new(
            Full::new(Bytes::from_static(b"abc")),
            line("/", Version::HTTP_11),
        );
        assert_eq!(full.size_hint().exact(), Some(3));
        // Not dropped: their lines would go to the test harness's stdout.
        std::mem::forget((body, full));
    }
}
