//! Copies: which requests get one, the copy sent beside the served request (from pools of
//! its own, no retry, within `timeout`), a second copy to the served version for noise, and
//! the served answer captured as it goes to the client, to compare.
//!
//! The client never waits for any of it: a copy is a task of its own on a low-priority
//! thread (see `runner`), bounded in number (`max_in_flight`), in age (one not started within
//! `timeout` is given up) and in memory (bodies kept up to [`CAPTURE_LIMIT`], hashed past it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::compare::{Captured, CapturedBody, CompareSettings, FNV64_OFFSET, compare, fnv1a_64};
use super::report::{Example, MirrorReport, Outcome};
use super::runner::CopyRunner;
use crate::config::MirrorConfig;
use crate::metrics::{BackendMetrics, FaultKind, MirrorMetrics, MirrorResult};
use crate::proxy::headers::X_CANARY_FAULT;
use crate::routing::fault::Injection;
use crate::upstream::{
    BodyTap, ExchangeTimeouts, ForwardBody, Peer, PeerTls, SendError, Upstream, UpstreamBody,
    UpstreamSettings,
};

/// Bytes of a body kept for the comparison; past it, its length and hash.
pub const CAPTURE_LIMIT: usize = 64 * 1024;

/// Marks a copy, so the canary (and its logs) can tell copies from served requests.
pub static X_CANARY_MIRROR: HeaderName = HeaderName::from_static("x-canary-mirror");

/// Mirroring in force: its config, where copies go, and their own pools.
#[derive(Debug)]
pub struct Mirror {
    pub config: MirrorConfig,
    /// Index of the backend that gets the copies.
    pub backend: usize,
    /// Index of the backend whose requests are copied; `None`: every other backend's.
    from: Option<usize>,
    /// The mirror's own connections, `[backend][endpoint]`: copies to the canary and second
    /// copies to a served version never use (or disturb) the pools that serve clients.
    peers: Vec<Vec<Arc<Peer>>>,
    /// How each backend is reached (HTTP/1 or HTTP/2, timeouts), by backend index.
    upstreams: Vec<Upstream>,
    settings: Arc<CompareSettings>,
    /// Copies running, carried over from the mirroring this one replaced.
    in_flight: Arc<AtomicUsize>,
    /// Round-robin cursor per backend, for the copies' endpoint picks: apart from the
    /// backends' own, so copies never move the served requests' turns.
    cursors: Vec<AtomicUsize>,
    pub report: Arc<MirrorReport>,
    metrics: MirrorMetrics,
    /// Where copies run, carried over too.
    runner: Arc<CopyRunner>,
}

/// What mirroring keeps when it is replaced (a reload, a `PUT`): its counts, the count of
/// copies still running, so `max_in_flight` holds across the change, and the threads they
/// run on.
#[derive(Debug, Clone, Default)]
pub struct Carried {
    pub report: Arc<MirrorReport>,
    pub in_flight: Arc<AtomicUsize>,
    pub runner: Arc<CopyRunner>,
}

impl Mirror {
    /// What the mirroring that replaces this one carries over.
    pub fn carried(&self) -> Carried {
        Carried {
            report: self.report.clone(),
            in_flight: self.in_flight.clone(),
            runner: self.runner.clone(),
        }
    }

    /// Closes the idle mirror connections of this worker's copy thread (see `runner`) that
    /// expired or that their upstream closed.
    pub fn sweep(&self) {
        for (upstream, peers) in self.upstreams.iter().zip(&self.peers) {
            for peer in peers {
                upstream.sweep(peer);
            }
        }
    }
}

/// A request admitted for a copy; holds its place among the `max_in_flight`.
#[derive(Debug)]
pub struct Admission {
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a request's copies go, as routing's health has it when the request is served: an
/// endpoint of the mirror backend, another endpoint of the served backend (the second copy,
/// for noise; `None` when it has no other), and a fault drill on the mirror backend, drawn for
/// this request, with where it is counted (a drill holds or answers copies as it does served
/// requests).
#[derive(Default)]
pub struct CopyTargets {
    pub canary: Option<usize>,
    pub second: Option<usize>,
    pub fault: Option<(Injection, BackendMetrics)>,
}

/// The copy to the mirror backend: the endpoint it goes to, and the fault drawn for it.
struct CanaryCopy {
    peer: Option<(Upstream, Arc<Peer>)>,
    fault: Option<(Injection, BackendMetrics)>,
}

/// The served request a copy is made of.
pub struct Served<'a> {
    /// Index of the backend that serves it.
    pub backend: usize,
    pub method: &'a Method,
    pub uri: &'a Uri,
    /// The headers it goes upstream with.
    pub headers: &'a HeaderMap,
    pub request_id: &'a HeaderValue,
    /// The path the client asked for, for the examples.
    pub path: &'a str,
}

impl Mirror {
    /// Mirroring to backend `backend` of the requests of backend `from` (every other
    /// backend's when `None`), with pools of its own for `endpoints`: the
    /// `(url, authority)` of each endpoint of each backend, in table order, reached as
    /// `upstreams` says (by backend, in the same order).
    pub fn new(
        config: MirrorConfig,
        (backend, from): (usize, Option<usize>),
        endpoints: Vec<Vec<(String, http::uri::Authority, Option<PeerTls>)>>,
        upstreams: Vec<UpstreamSettings>,
        carried: Carried,
        metrics: MirrorMetrics,
    ) -> Self {
        let cursors = (0..endpoints.len()).map(|_| AtomicUsize::new(0)).collect();
        let peers = endpoints
            .into_iter()
            .map(|list| {
                list.into_iter()
                    .map(|(url, authority, tls)| Arc::new(Peer::new(url, authority, tls)))
                    .collect()
            })
            .collect();
        let settings = Arc::new(CompareSettings {
            ignore_headers: config
                .ignore_headers
                .iter()
                .map(|h| h.as_str().to_owned())
                .collect(),
            ignore_fields: config.ignore_fields.clone(),
        });
        Mirror {
            config,
            backend,
            from,
            peers,
            upstreams: upstreams.into_iter().map(Upstream::new).collect(),
            cursors,
            settings,
            in_flight: carried.in_flight,
            report: carried.report,
            metrics,
            runner: carried.runner,
        }
    }

    /// Whether the request `served` describes gets a copy: not one the mirror backend serves
    /// itself, nor (with `from`) one another backend than `from` serves; its method listed
    /// (and no protocol switch); selected by its request id (the same id is always copied or
    /// never); a body no larger than `max_body` as far as its length is known (a body of
    /// unknown length is checked as it streams); fewer than `max_in_flight` copies running.
    /// Counts what it decides.
    pub fn admit(&self, served: &Served<'_>, body: BodySize) -> Option<Admission> {
        if served.backend == self.backend || self.from.is_some_and(|from| served.backend != from) {
            return None;
        }
        // A protocol switch is no request to copy: the canary would switch too.
        let skipped = if !self.config.methods.contains(served.method)
            || served.headers.contains_key(UPGRADE)
        {
            Some(Outcome::SkippedMethod)
        } else if !selected(served.request_id.as_bytes(), self.config.percent) {
            Some(Outcome::SkippedPercent)
        } else if matches!(body, BodySize::Known(n) if n > self.config.max_body) {
            Some(Outcome::SkippedBody)
        } else {
            None
        };
        if let Some(outcome) = skipped {
            self.report.counts.count(outcome);
            self.metrics.request(MirrorResult::Skipped);
            return None;
        }
        let running = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let admission = Admission {
            in_flight: self.in_flight.clone(),
        };
        if running >= self.config.max_in_flight {
            self.report.counts.count(Outcome::Dropped);
            self.metrics.request(MirrorResult::Dropped);
            return None;
        }
        Some(admission)
    }

    /// Sends the copy of `served` to `targets` (and, to compare, a second copy to another
    /// endpoint of the served backend when it has one), on a task of its own. Returns the
    /// sender the served answer is captured into when the copy is compared.
    pub fn spawn(
        self: &Arc<Self>,
        admission: Admission,
        served: &Served<'_>,
        body: Option<oneshot::Receiver<Bytes>>,
        targets: CopyTargets,
    ) -> Option<ServedCapture> {
        let mut headers = served.headers.clone();
        headers.insert(X_CANARY_MIRROR.clone(), HeaderValue::from_static("1"));
        let head = CopyHead {
            method: served.method.clone(),
            uri: served.uri.clone(),
            headers,
            body: None,
        };
        let canary = CanaryCopy {
            peer: self.peer(self.backend, targets.canary),
            fault: targets.fault,
        };
        let second = self.peer(served.backend, targets.second);
        let (capture, captured) = if self.config.compare {
            let (sender, receiver) = oneshot::channel();
            (Some(ServedCapture { sender }), Some(receiver))
        } else {
            (None, None)
        };
        let example = ExampleHead {
            method: served.method.to_string(),
            path: served.path.to_owned(),
            request_id: String::from_utf8_lossy(served.request_id.as_bytes()).into_owned(),
        };
        let mirror = self.clone();
        let admitted = Instant::now();
        // Allocated first and then written, and handed over boxed: the copy's future (two
        // exchanges) is built once in place rather than built on the stack and moved into
        // the task (measured with callgrind: about 4,800 fewer instructions per copy).
        let copy = Box::into_pin(Box::write(Box::new_uninit(), async move {
            let _admission = admission;
            // A copy thread starved of CPU by served requests gives its old copies up: they
            // are dropped as at `max_in_flight`, not timed out (no fault of the canary's).
            if admitted.elapsed() >= mirror.config.timeout {
                mirror.report.counts.count(Outcome::Dropped);
                mirror.metrics.request(MirrorResult::Dropped);
                return;
            }
            mirror
                .run(head, body, canary, second, captured, example)
                .await;
        }));
        self.runner.spawn(copy);
        capture
    }

    async fn run(
        &self,
        mut head: CopyHead,
        body: Option<oneshot::Receiver<Bytes>>,
        canary: CanaryCopy,
        second: Option<(Upstream, Arc<Peer>)>,
        served: Option<oneshot::Receiver<Option<ServedOutcome>>>,
        example: ExampleHead,
    ) {
        if let Some(body) = body {
            // The served request's body, once it has all gone up within `max_body`.
            match tokio::time::timeout(self.config.timeout, body).await {
                Ok(Ok(bytes)) => head.body = Some(bytes),
                _ => {
                    self.report.counts.count(Outcome::SkippedBody);
                    self.metrics.request(MirrorResult::Skipped);
                    return;
                }
            }
        }
        let started = Instant::now();
        let to_canary = async {
            if let Some((injected, metrics)) = &canary.fault {
                if let Some(delay) = injected.delay {
                    metrics.fault(FaultKind::Delay);
                    tokio::time::sleep(delay.min(self.config.timeout)).await;
                    if delay >= self.config.timeout {
                        return Err(Outcome::Timeout);
                    }
                }
                if let Some(status) = injected.abort {
                    metrics.fault(FaultKind::Abort);
                    return Ok(aborted(status));
                }
            }
            match &canary.peer {
                Some((upstream, peer)) => self.exchange(upstream, peer, head.clone()).await,
                None => Err(Outcome::Error),
            }
        };
        let to_second = async {
            match &second {
                Some((upstream, peer)) => self.exchange(upstream, peer, head.clone()).await.ok(),
                None => None,
            }
        };
        let (copy, second) = tokio::join!(to_canary, to_second);
        match &copy {
            Ok(_) => {
                self.report.counts.count(Outcome::Copied);
                self.metrics.request(MirrorResult::Copied);
                self.metrics.duration(started.elapsed());
            }
            Err(outcome) => {
                self.report.counts.count(*outcome);
                let result = match outcome {
                    Outcome::Timeout => MirrorResult::Timeout,
                    _ => MirrorResult::Error,
                };
                self.metrics.request(result);
            }
        }
        let Some(served) = served else { return };
        // The served outcome, once the client has had it (or the capture gave up).
        let Ok(Ok(Some(served))) = tokio::time::timeout(self.config.timeout, served).await else {
            return;
        };
        // The same request's two outcomes: a pair for the shadow stage's errors verdict.
        let copy_failed = copy.as_ref().map_or(true, |c| c.status >= 500);
        let (served, copy) = match (served, copy) {
            (ServedOutcome::Answered(served), Ok(copy)) => (served, copy),
            (served, _) => {
                let served_failed = match served {
                    ServedOutcome::Answered(served) => served.status >= 500,
                    ServedOutcome::Failed => true,
                };
                self.report.pair(served_failed, copy_failed, None);
                return;
            }
        };
        if let Some(second) = &second {
            self.report
                .record_noise(&compare(&served, second, &self.settings));
        }
        let differences = compare(&served, &copy, &self.settings);
        let different = self.report.record(&differences, || Example {
            method: example.method,
            path: example.path,
            request_id: example.request_id,
            served_status: served.status,
            copy_status: copy.status,
            differences: differences.clone(),
        });
        self.metrics.comparison(different);
        self.report
            .pair(served.status >= 500, copy_failed, Some(different));
    }

    /// One copy: sent on a connection of the mirror's own, read whole within `timeout`.
    async fn exchange(
        &self,
        upstream: &Upstream,
        peer: &Arc<Peer>,
        head: CopyHead,
    ) -> Result<Captured, Outcome> {
        let limit = self.config.timeout;
        let timeouts = ExchangeTimeouts {
            client_body: limit,
            request: limit,
            read: limit,
        };
        let body = match head.body {
            Some(bytes) => ForwardBody::Whole(Some(bytes)),
            None => ForwardBody::Empty,
        };
        let mut request = Request::new(body);
        *request.method_mut() = head.method;
        *request.uri_mut() = head.uri;
        *request.headers_mut() = head.headers;
        let exchange = async {
            let response = upstream
                .send(peer, request, timeouts, Instant::now())
                .await
                .map_err(|error| match error {
                    SendError::TimedOut(_) => Outcome::Timeout,
                    _ => Outcome::Error,
                })?;
            capture_whole(response).await.ok_or(Outcome::Error)
        };
        tokio::time::timeout(limit, exchange)
            .await
            .unwrap_or(Err(Outcome::Timeout))
    }

    /// Whether a request with `method` also gets a second copy, to the served version (for
    /// noise): only with a comparison, and only a safe request (a listed POST would repeat its
    /// side effect in production).
    pub fn wants_second(&self, method: &Method) -> bool {
        self.config.compare && matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
    }

    /// The cursor copies to `backend` take turns with.
    pub fn cursor(&self, backend: usize) -> Option<&AtomicUsize> {
        self.cursors.get(backend)
    }

    /// The mirror's own connections to endpoint `endpoint` of `backend`, and how to reach it.
    fn peer(&self, backend: usize, endpoint: Option<usize>) -> Option<(Upstream, Arc<Peer>)> {
        let peer = self.peers.get(backend)?.get(endpoint?).cloned()?;
        Some((*self.upstreams.get(backend)?, peer))
    }
}

/// Whether a request with this id is among the `percent` copied: its FNV-1a hash, in 10,000
/// buckets, against the share; the same id always gets the same answer.
pub fn selected(request_id: &[u8], percent: f64) -> bool {
    let bucket = fnv1a_64(FNV64_OFFSET, request_id) % 10_000;
    (bucket as f64) < percent * 100.0
}

#[derive(Debug, Clone)]
struct CopyHead {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Option<Bytes>,
}

/// What is known of a request's body before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySize {
    None,
    Known(u64),
    /// Chunked, or an HTTP/2 body without `content-length`.
    Unknown,
}

struct ExampleHead {
    method: String,
    path: String,
    request_id: String,
}

/// What became of the served request, for its copy; nothing is sent (or `None`) when it
/// cannot be paired: its answer was cut short, or it was retried elsewhere.
#[derive(Debug)]
enum ServedOutcome {
    /// The upstream's answer, captured whole.
    Answered(Captured),
    /// The served version failed it: the client got the proxy's 502 or 504.
    Failed,
}

/// Where the served answer goes once captured.
#[derive(Debug)]
pub struct ServedCapture {
    sender: oneshot::Sender<Option<ServedOutcome>>,
}

impl ServedCapture {
    /// The served version failed the request: no answer to compare, but an error to pair
    /// with the copy's outcome.
    pub fn failed(self) {
        let _ = self.sender.send(Some(ServedOutcome::Failed));
    }

    /// Captures `response` (the upstream's answer, before the proxy adds its headers) as its
    /// body goes to the client.
    pub fn watch(self, response: &mut Response<UpstreamBody>) {
        let head = Captured {
            status: response.status().as_u16(),
            headers: header_list(response.headers()),
            body: CapturedBody::Whole(Bytes::new()),
        };
        response.body_mut().tap(Box::new(Tap {
            head: Some(head),
            body: Capture::default(),
            sender: Some(self.sender),
        }));
    }
}

fn header_list(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

/// A body as it is captured: kept up to [`CAPTURE_LIMIT`], hashed throughout.
#[derive(Debug)]
struct Capture {
    kept: BytesMut,
    /// Past the limit: nothing more is kept.
    overflowed: bool,
    len: u64,
    hash: u64,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            kept: BytesMut::new(),
            overflowed: false,
            len: 0,
            hash: FNV64_OFFSET,
        }
    }
}

impl Capture {
    fn push(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        self.hash = fnv1a_64(self.hash, data);
        if self.overflowed {
            return;
        }
        if self.kept.len() + data.len() <= CAPTURE_LIMIT {
            self.kept.extend_from_slice(data);
        } else {
            self.overflowed = true;
            self.kept = BytesMut::new();
        }
    }

    fn finish(self) -> CapturedBody {
        if !self.overflowed {
            CapturedBody::Whole(self.kept.freeze())
        } else {
            CapturedBody::Digest {
                len: self.len,
                hash: self.hash,
            }
        }
    }
}

struct Tap {
    head: Option<Captured>,
    body: Capture,
    sender: Option<oneshot::Sender<Option<ServedOutcome>>>,
}

impl BodyTap for Tap {
    fn data(&mut self, data: &Bytes) {
        // Once the copy has given up waiting, the served body is not looked at any more.
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = None;
            self.body = Capture::default();
            return;
        }
        self.body.push(data);
    }

    fn end(mut self: Box<Self>, complete: bool) {
        let captured = self.head.take().filter(|_| complete).map(|mut head| {
            head.body = std::mem::take(&mut self.body).finish();
            ServedOutcome::Answered(head)
        });
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(captured);
        }
    }
}

/// The answer of a copy a fault drill aborted, as the proxy gives it to served requests.
fn aborted(status: http::StatusCode) -> Captured {
    Captured {
        status: status.as_u16(),
        headers: vec![(X_CANARY_FAULT.as_str().to_owned(), b"abort".to_vec())],
        body: CapturedBody::Whole(Bytes::new()),
    }
}

/// The most of a copy's answer read: a mirror streaming without end is given up on here
/// (an error), not only at its timeout.
pub const COPY_READ_LIMIT: u64 = 64 * 1024 * 1024;

/// A copy's answer read whole (kept up to [`CAPTURE_LIMIT`], hashed past it); `None` when
/// its body fails or passes [`COPY_READ_LIMIT`].
async fn capture_whole(response: Response<UpstreamBody>) -> Option<Captured> {
    let (parts, mut body) = response.into_parts();
    let mut capture = Capture::default();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.ok()?.data_ref() {
            capture.push(data);
            if capture.len > COPY_READ_LIMIT {
                return None;
            }
        }
    }
    Some(Captured {
        status: parts.status.as_u16(),
        headers: header_list(&parts.headers),
        body: capture.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_is_by_request_id_and_near_the_share() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("request-{i}")).collect();
        let chosen = ids
            .iter()
            .filter(|id| selected(id.as_bytes(), 25.0))
            .count();
        // sd of 25% of 20,000 is 61: 4,700..5,300 is about 5 sd either side.
        assert!((4_700..=5_300).contains(&chosen), "{chosen}");
        for id in &ids[..100] {
            assert_eq!(selected(id.as_bytes(), 25.0), selected(id.as_bytes(), 25.0));
            assert!(selected(id.as_bytes(), 100.0));
            assert!(!selected(id.as_bytes(), 0.0));
        }
    }

    #[test]
    fn a_capture_keeps_small_bodies_and_hashes_large_ones() {
        let mut small = Capture::default();
        small.push(b"hello ");
        small.push(b"world");
        match small.finish() {
            CapturedBody::Whole(body) => assert_eq!(&body[..], b"hello world"),
            other => panic!("{other:?}"),
        }
        let mut large = Capture::default();
        let piece = vec![7u8; 40 * 1024];
        large.push(&piece);
        large.push(&piece);
        match large.finish() {
            CapturedBody::Digest { len, hash } => {
                assert_eq!(len, 80 * 1024);
                let whole = [piece.clone(), piece].concat();
                assert_eq!(hash, fnv1a_64(FNV64_OFFSET, &whole));
            }
            other => panic!("{other:?}"),
        }
    }
}
