//! Differential test of the proxy's own HTTP/1 request parser against hyper's.
//!
//! The same bytes go to `canary_proxy::decode::request` (head, `check_head`, body: exactly
//! what a client connection does before forwarding) and to a hyper HTTP/1 server connection
//! over an in-memory `tokio::io::duplex` pipe. Both must accept the first request with the
//! same method, target, version, header fields, body bytes and trailers, or both must refuse
//! it. The inputs are mutations (fixed seed) of valid, smuggling-style and malformed seeds.
//!
//! When both accept the first request alike, the message boundary is checked as well (hyper,
//! given the bytes up to where our message ends, must take the same request and find nothing
//! more), and what follows is judged as a request of its own: a boundary in another place is
//! request smuggling.
//!
//! Every disagreement gets a named category. The test fails on any category that is not an
//! agreement and not on one of three lists: [`OURS_STRICTER`] (our refusals that are on
//! purpose, each with its reason), [`HYPER_STRICTER_REVIEWED`] (hyper's refusals of what we
//! accept, each looked at and found harmless) and [`REPORTED_BUGS`] (bugs of ours this test
//! found, with a minimal input that must keep showing each until it is fixed). So it fails on
//! any case that both accept with a different method, target, version, headers, body or
//! trailers, on any other message boundary, and on any new case that hyper refuses and we
//! accept. `cargo test --test differential -- --nocapture` prints the table of categories
//! with an example of each (the shortest seen; shrunk for unexpected ones).
//!
//! `DIFFERENTIAL_CASES=N` sets the number of cases (default [`DEFAULT_CASES`]);
//! `DIFFERENTIAL_DUMP=category` prints every input that falls in that category.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use bytes::Bytes;
use canary_proxy::ProxyError;
use canary_proxy::decode::{self, Message, Outcome};
use futures_util::{FutureExt, StreamExt, stream};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Cases run by default (20-30 s in a debug build, 2 s in release); `DIFFERENTIAL_CASES`
/// overrides.
const DEFAULT_CASES: usize = 100_000;
/// The generator's fixed seed.
const SEED: u64 = 0x5eed_d1ff_2024_0001;
/// Cases in flight at once on the one current-thread runtime.
const CONCURRENCY: usize = 64;
/// Requests of hyper's watched per run: the first, and whether another one followed it.
const MAX_PIPELINED: usize = 2;
/// A case that takes longer than this is a hang (its own category).
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Our line limit (`src/http1/mod.rs`), to tell a chunk-size line refused for its length.
const MAX_LINE_LEN: usize = 8 * 1024;
/// hyper's limits on a chunked body (`proto/h1/decode.rs`): trailer section bytes, and chunk
/// extension bytes over the whole body.
const HYPER_TRAILER_LIMIT: usize = 16 * 1024;
const HYPER_CHUNK_EXTENSIONS_LIMIT: usize = 16 * 1024;

/// Refusals of ours that hyper does not make, on purpose: category and reason.
const OURS_STRICTER: &[(&str, &str)] = &[
    (
        "ours-stricter:connect",
        "CONNECT is refused 405: a reverse proxy opens no tunnels (hyper hands it to the service)",
    ),
    (
        "ours-stricter:host-missing",
        "RFC 9112 §3.2: an HTTP/1.1 request without Host MUST get 400 (hyper leaves it to the service)",
    ),
    (
        "ours-stricter:host-repeated",
        "RFC 9112 §3.2: a request with more than one Host line MUST get 400",
    ),
    (
        "ours-stricter:host-invalid",
        "RFC 9112 §3.2: a Host (or absolute-form authority) that is not host[:port] MUST get 400",
    ),
    (
        "ours-stricter:target-form",
        "authority-form is for CONNECT only, `*` for OPTIONS only, absolute-form for http(s) only",
    ),
    (
        "ours-stricter:cl-and-te",
        "RFC 9112 §6.1: Content-Length with Transfer-Encoding is refused (a server MAY; hyper drops CL)",
    ),
    (
        "ours-stricter:transfer-coding",
        "only exactly `chunked` is decoded: other codings (`gzip, chunked`, `chunked, chunked`) get 501",
    ),
    (
        "ours-stricter:expect",
        "RFC 9110 §10.1.1: an expectation other than 100-continue gets 417 (hyper ignores it)",
    ),
    (
        "ours-stricter:request-line-limit",
        "request line over 8 KiB gets 414 (hyper allows a 64 KiB target)",
    ),
    (
        "ours-stricter:head-limits",
        "header line over 8 KiB or head over 64 KiB gets 431 (hyper's limit is its ~400 KiB buffer)",
    ),
    (
        "ours-stricter:content-length-digits",
        "a Content-Length of more than 19 digits (leading zeros) is refused; hyper takes any that fits",
    ),
    (
        "ours-stricter:chunk-size-digits",
        "a chunk size of more than 16 hex digits (leading zeros) is refused (httparse); hyper takes any that fits",
    ),
    (
        "ours-stricter:chunk-line-limit",
        "a chunk-size line over 8 KiB is refused; hyper allows 16 KiB of extensions per body",
    ),
    (
        "ours-stricter:trailer-line-limit",
        "a trailer field line over 8 KiB is refused, as in a head; hyper allows 16 KiB of trailers",
    ),
    (
        "ours-stricter:trailer-bare-lf",
        "a bare LF in the trailer section is refused (every line of chunked framing ends in CRLF); \
         hyper takes it, ending the message where a CRLF comes. Once a bug of ours: we ended the \
         message at the LF, hyper read on (request smuggling)",
    ),
];

/// Requests hyper refuses and we accept, looked at one by one and found to be no bug: what we
/// accept is within the RFCs and read with the same message boundary as hyper would read it
/// (had hyper not refused), so no second parser can be made to see another message.
const HYPER_STRICTER_REVIEWED: &[(&str, &str)] = &[
    (
        "hyper-stricter:content-length-list",
        "RFC 9110 §8.6: `Content-Length: 5, 5` MAY be taken as 5; we forward one plain value \
         (hyper refuses a list on one line, yet takes the same value on two lines)",
    ),
    (
        "hyper-stricter:trailer-size",
        "a trailer section over 16 KiB: our limit is a head's (8 KiB a line, 64 KiB, 100 fields)",
    ),
    (
        "hyper-stricter:chunk-extensions-size",
        "chunk extensions over 16 KiB in one body: ours limits each chunk-size line to 8 KiB",
    ),
];

/// Bugs of ours that this test found, reported and not fixed yet (src/ is not this test's to
/// change): category, what is wrong, and a minimal input that shows it. The test passes
/// with them, but checks that each input still shows its bug: once one is fixed, that check
/// fails, and its entry goes.
const REPORTED_BUGS: &[(&str, &str, &[u8])] = &[];

/// Outcomes that are not disagreements.
const AGREEMENTS: &[&str] = &[
    "agree:both-accept",
    "agree:both-refuse",
    // The input ends inside the message: we wait for more, hyper sees EOF and refuses.
    "ours-incomplete:hyper-refuses",
];

/// How the test takes a category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Agreement,
    OursStricter,
    Reviewed,
    ReportedBug,
    /// Anything else: the test fails.
    Unexpected,
}

fn standing(category: &str) -> Standing {
    if AGREEMENTS.contains(&category) {
        Standing::Agreement
    } else if OURS_STRICTER.iter().any(|(c, _)| *c == category) {
        Standing::OursStricter
    } else if HYPER_STRICTER_REVIEWED.iter().any(|(c, _)| *c == category) {
        Standing::Reviewed
    } else if REPORTED_BUGS.iter().any(|(c, _, _)| *c == category) {
        Standing::ReportedBug
    } else {
        Standing::Unexpected
    }
}

fn is_allowed(category: &str) -> bool {
    standing(category) != Standing::Unexpected
}

// ---------------------------------------------------------------------------------------------
// hyper's side

/// A request hyper's service saw, with its body collected.
#[derive(Debug)]
struct HyperRequest {
    parts: http::request::Parts,
    /// Body bytes and trailers, or why collecting the body failed.
    body: Result<(Vec<u8>, Option<HeaderMap>), String>,
}

/// What hyper made of the bytes.
#[derive(Debug, Default)]
struct HyperRun {
    /// Requests in the order the service saw them (at most [`MAX_PIPELINED`]).
    requests: Vec<HyperRequest>,
    /// The statuses of the final responses hyper wrote. With `half_close(false)` the answer
    /// to the last request may be missing: hyper drops it when it reads the EOF first.
    statuses: Vec<u16>,
    panicked: bool,
    hung: bool,
}

impl HyperRun {
    /// The first request, when hyper accepted it: the service ran and its body collected.
    fn accepted(&self) -> Option<&HyperRequest> {
        self.requests.first().filter(|r| r.body.is_ok())
    }

    fn why_refused(&self) -> String {
        if self.hung {
            return "hyper hung".into();
        }
        if self.panicked {
            return "hyper panicked".into();
        }
        match (self.requests.first(), self.statuses.first().copied()) {
            (Some(HyperRequest { body: Err(e), .. }), _) => format!("hyper body error: {e}"),
            (_, Some(status)) => format!("hyper answered {status} itself"),
            _ => "hyper closed without an answer".into(),
        }
    }
}

/// Serves `bytes` with hyper's HTTP/1 server over an in-memory pipe: the bytes are written,
/// the write side shut down (EOF), and the response read to its end.
///
/// hyper's defaults are kept; those that matter here: at most 100 header fields
/// (`max_headers`), a read buffer of 8 KiB + 100 × 4 KiB ≈ 400 KiB (`max_buf_size`, the only
/// head size limit), request targets up to 64 KiB, trailers up to 16 KiB and 100 fields,
/// chunk extensions up to 16 KiB per body, `half_close(false)` (an EOF read after a request
/// and before its response ends the connection: so the service below only hands the request
/// out, and the body is collected outside it, where that EOF cannot drop it), keep-alive on
/// (pipelined requests are read), no header read timeout (no timer is set).
async fn hyper_run(bytes: Vec<u8>) -> HyperRun {
    let run = async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (requests_tx, mut requests_rx) =
            mpsc::unbounded_channel::<(Request<Incoming>, oneshot::Sender<()>)>();
        let service = service_fn(move |request: Request<Incoming>| {
            let (done_tx, done_rx) = oneshot::channel::<()>();
            let _ = requests_tx.send((request, done_tx));
            async move {
                // Answer once the body has been collected (or given up on).
                let _ = done_rx.await;
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        let connection = http1::Builder::new().serve_connection(TokioIo::new(server), service);
        let (mut read, mut write) = tokio::io::split(client);
        let client = async move {
            let _ = write.write_all(&bytes).await;
            let _ = write.shutdown().await;
            let mut response = Vec::new();
            let _ = read.read_to_end(&mut response).await;
            response
        };
        let collector = async move {
            let mut requests = Vec::new();
            while let Some((request, done)) = requests_rx.recv().await {
                let (parts, body) = request.into_parts();
                let body = match body.collect().await {
                    Ok(collected) => {
                        let trailers = collected.trailers().cloned();
                        Ok((collected.to_bytes().to_vec(), trailers))
                    }
                    Err(error) => Err(error.to_string()),
                };
                requests.push(HyperRequest { parts, body });
                let _ = done.send(());
                if requests.len() == MAX_PIPELINED {
                    break;
                }
            }
            requests
        };
        let (_, response, requests) = tokio::join!(connection, client, collector);
        HyperRun {
            requests,
            statuses: statuses(&response),
            ..HyperRun::default()
        }
    };
    match tokio::time::timeout(CASE_TIMEOUT, AssertUnwindSafe(run).catch_unwind()).await {
        Ok(Ok(run)) => run,
        Ok(Err(_)) => HyperRun {
            panicked: true,
            ..HyperRun::default()
        },
        Err(_) => HyperRun {
            hung: true,
            ..HyperRun::default()
        },
    }
}

/// The status codes of the final (not 1xx) responses in `bytes`. hyper's responses have no
/// body (ours is empty, and so are those it writes itself), so each starts a status line.
fn statuses(bytes: &[u8]) -> Vec<u16> {
    bytes
        .windows(b"HTTP/1.1 200".len())
        .filter(|w| w.starts_with(b"HTTP/1.1 ") || w.starts_with(b"HTTP/1.0 "))
        .filter_map(|w| std::str::from_utf8(&w[9..]).ok()?.parse().ok())
        .filter(|status| *status >= 200)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Comparison

type Fields = Vec<(String, Vec<u8>)>;

fn fields(map: &HeaderMap) -> Fields {
    map.iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

/// The header fields with our deliberate normalisations undone on both sides: `Expect`
/// dropped (we remove it), `Host` dropped for an absolute-form target (we make the target's
/// authority the Host), Content-Length reduced to the set of numbers it says (we fold equal
/// values into one, hyper keeps the first line). Names in order, each name's values in order.
fn normalised(fields: &[(String, Vec<u8>)], absolute_form: bool) -> (Fields, BTreeSet<String>) {
    let mut lengths = BTreeSet::new();
    let mut kept: Fields = Vec::new();
    for (name, value) in fields {
        match name.as_str() {
            "expect" => {}
            "host" if absolute_form => {}
            "content-length" => {
                for part in value.split(|&b| b == b',') {
                    let digits = String::from_utf8_lossy(part.trim_ascii());
                    let number = digits.trim_start_matches('0');
                    lengths.insert(if number.is_empty() {
                        "0".into()
                    } else {
                        number.into()
                    });
                }
            }
            _ => kept.push((name.clone(), value.clone())),
        }
    }
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    (kept, lengths)
}

/// Where an accepted request of ours and hyper's differ, if they do.
fn difference(ours: &Message, theirs: &HyperRequest) -> Option<&'static str> {
    let parts = &theirs.parts;
    if ours.start != parts.method.as_str() {
        return Some("both-accept:different-method");
    }
    if ours.target != parts.uri.to_string() {
        return Some("both-accept:different-target");
    }
    if ours.version != format!("{:?}", parts.version) {
        return Some("both-accept:different-version");
    }
    let absolute_form = parts.uri.scheme().is_some();
    if normalised(&ours.headers, absolute_form)
        != normalised(&fields(&parts.headers), absolute_form)
    {
        return Some("both-accept:different-headers");
    }
    let Ok((body, trailers)) = &theirs.body else {
        unreachable!("only accepted requests are compared");
    };
    if &ours.body != body {
        return Some("both-accept:different-body");
    }
    // hyper surfaces trailers (unfiltered); compare what is left after our filter.
    let theirs_trailers: Fields = trailers
        .as_ref()
        .map(fields)
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, _)| !decode::is_forbidden_trailer(name))
        .collect();
    let mut ours_trailers = ours.trailers.clone();
    ours_trailers.sort_by(|a, b| a.0.cmp(&b.0));
    let mut theirs_trailers = theirs_trailers;
    theirs_trailers.sort_by(|a, b| a.0.cmp(&b.0));
    if ours_trailers != theirs_trailers {
        return Some("both-accept:different-trailers");
    }
    None
}

/// The header fields of a head as written (before any folding; names lowercased), and the
/// head's length.
fn raw_head(bytes: &[u8]) -> Option<(usize, Fields)> {
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut request = httparse::Request::new(&mut slots);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => Some((
            len,
            request
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect(),
        )),
        _ => None,
    }
}

/// The chunk-size lines (start, end past the LF) of a chunked body, and where its trailer
/// section starts, as far as the body is well formed enough to walk.
fn chunk_lines(body: &[u8]) -> (Vec<(usize, usize)>, Option<usize>) {
    let mut lines = Vec::new();
    let mut at = 0;
    while let Some(lf) = memchr_lf(&body[at..]) {
        let end = at + lf + 1;
        lines.push((at, end));
        let line = &body[at..end];
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let Some(size) = std::str::from_utf8(&line[..digits])
            .ok()
            .and_then(|d| u64::from_str_radix(d, 16).ok())
            .and_then(|s| usize::try_from(s).ok())
        else {
            break;
        };
        if size == 0 {
            return (lines, Some(end));
        }
        at = end.saturating_add(size).saturating_add(2);
        if at >= body.len() {
            break;
        }
    }
    (lines, None)
}

/// Why our chunked decoder may refuse a body hyper takes: a chunk size of more than 16 hex
/// digits, a chunk-size line over our line limit, or a trailer field line over it.
fn chunked_quirk(body: &[u8]) -> Option<&'static str> {
    let (lines, trailers) = chunk_lines(body);
    for &(start, end) in &lines {
        let line = &body[start..end];
        if line.len() > MAX_LINE_LEN {
            return Some("ours-stricter:chunk-line-limit");
        }
        if line.iter().take_while(|b| b.is_ascii_hexdigit()).count() > 16 {
            return Some("ours-stricter:chunk-size-digits");
        }
    }
    if trailer_bare_lf(body) {
        return Some("ours-stricter:trailer-bare-lf");
    }
    let trailers = &body[trailers?..];
    trailers
        .split(|&b| b == b'\n')
        .any(|line| line.len() > MAX_LINE_LEN)
        .then_some("ours-stricter:trailer-line-limit")
}

/// Whether the trailer section of the chunked body in `body[..end]` (`end`: where our decoder
/// says the message ends) has a line ending in a bare LF.
fn trailer_bare_lf(body: &[u8]) -> bool {
    let Some(start) = chunk_lines(body).1 else {
        return false;
    };
    let trailers = &body[start..];
    trailers
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || trailers[i - 1] != b'\r'))
}

fn memchr_lf(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

/// Why we refused with `status` a request hyper accepted as `theirs`.
fn ours_stricter(status: u16, bytes: &[u8], theirs: &HyperRequest) -> String {
    let parts = &theirs.parts;
    let category = match status {
        405 if parts.method == http::Method::CONNECT => "ours-stricter:connect",
        414 => "ours-stricter:request-line-limit",
        431 => "ours-stricter:head-limits",
        417 => "ours-stricter:expect",
        501 => "ours-stricter:transfer-coding",
        400 => {
            let mut headers = parts.headers.clone();
            let raw = raw_head(bytes);
            let raw_fields = raw.as_ref().map(|(_, f)| f.as_slice()).unwrap_or_default();
            let has = |name: &str| raw_fields.iter().any(|(n, _)| n == name);
            if let Err(error) =
                canary_proxy::settle_host(&parts.method, &parts.uri, &mut headers, parts.version)
            {
                match error {
                    ProxyError::BadRequest("several Host lines") => "ours-stricter:host-repeated",
                    ProxyError::BadRequest("no Host in an HTTP/1.1 request") => {
                        "ours-stricter:host-missing"
                    }
                    ProxyError::BadRequest(
                        "a Host that is not host[:port]"
                        | "a target authority that is not host[:port]",
                    ) => "ours-stricter:host-invalid",
                    _ => "ours-stricter:target-form",
                }
            } else if has("content-length") && has("transfer-encoding") {
                "ours-stricter:cl-and-te"
            } else if raw_fields.iter().any(|(name, value)| {
                name == "content-length"
                    && value
                        .split(|&b| b == b',')
                        .any(|part| part.trim_ascii().len() > 19)
            }) {
                "ours-stricter:content-length-digits"
            } else {
                raw.as_ref()
                    .filter(|_| has("transfer-encoding"))
                    .and_then(|(len, _)| chunked_quirk(&bytes[*len..]))
                    .unwrap_or("unexplained:ours-400-hyper-accepts")
            }
        }
        _ => return format!("unexplained:ours-{status}-hyper-accepts"),
    };
    category.to_owned()
}

/// Why hyper refused a request we accept as `ours`: known differences by name, the rest
/// unexplained.
fn hyper_stricter(bytes: &[u8], ours: &Message) -> &'static str {
    let raw = raw_head(bytes);
    let raw_fields = raw.as_ref().map(|(_, f)| f.as_slice()).unwrap_or_default();
    if raw_fields
        .iter()
        .any(|(name, value)| name == "content-length" && value.contains(&b','))
    {
        return "hyper-stricter:content-length-list";
    }
    if let Some((len, _)) = raw
        && raw_fields
            .iter()
            .any(|(name, _)| name == "transfer-encoding")
    {
        let body = &bytes[len..ours.consumed];
        let (lines, trailers) = chunk_lines(body);
        if trailers.is_some_and(|start| body.len() - start >= HYPER_TRAILER_LIMIT - 2) {
            return "hyper-stricter:trailer-size";
        }
        let extensions: usize = lines
            .iter()
            .map(|&(start, end)| {
                let line = &body[start..end];
                line.iter()
                    .position(|&b| b == b';')
                    .map_or(0, |semicolon| line.len() - semicolon - 2)
            })
            .sum();
        if extensions >= HYPER_CHUNK_EXTENSIONS_LIMIT - 1 {
            return "hyper-stricter:chunk-extensions-size";
        }
    }
    "hyper-stricter:unexplained"
}

/// The verdict on the first request in `bytes`: its category, a detail for the table, and our
/// message when both accepted it alike.
async fn judge_first(bytes: &[u8]) -> (String, String, Option<(Message, HyperRun)>) {
    let ours = decode::request(bytes);
    let theirs = hyper_run(bytes.to_vec()).await;
    if theirs.hung {
        return ("hyper-hang".into(), String::new(), None);
    }
    if theirs.panicked {
        return ("hyper-panic".into(), String::new(), None);
    }
    let (category, detail) = match (&ours, theirs.accepted()) {
        (Outcome::Incomplete, None) => ("ours-incomplete:hyper-refuses".into(), String::new()),
        (Outcome::Incomplete, Some(_)) => (
            "ours-incomplete:hyper-accepts".into(),
            "we wait for more bytes, hyper took a whole message".into(),
        ),
        (Outcome::Refused(_), None) => ("agree:both-refuse".into(), String::new()),
        (Outcome::Refused(status), Some(request)) => (
            ours_stricter(*status, bytes, request),
            format!("ours {status}, hyper accepts"),
        ),
        (Outcome::Accepted(message), None) => (
            hyper_stricter(bytes, message).into(),
            format!("ours accepts, {}", theirs.why_refused()),
        ),
        (Outcome::Accepted(message), Some(request)) => match difference(message, request) {
            Some(category) => (
                category.into(),
                format!("ours {message:?} / hyper {request:?}"),
            ),
            None => {
                let Outcome::Accepted(message) = ours else {
                    unreachable!()
                };
                return (
                    "agree:both-accept".into(),
                    String::new(),
                    Some((message, theirs)),
                );
            }
        },
    };
    (category, detail, None)
}

/// The verdict on one input: its category and a detail for the table.
///
/// When both accept the first request alike, the message boundary is checked too: hyper
/// given the bytes up to where our message ends must accept the same request and find
/// nothing after it (it does not read on past our end, and does not end earlier). A boundary in
/// another place is request smuggling. Then what follows, if anything, is judged as a
/// request of its own.
async fn judge(bytes: &[u8]) -> (String, String) {
    let (category, detail, agreed) = judge_first(bytes).await;
    let Some((message, theirs)) = agreed else {
        return (category, detail);
    };
    let probe = if message.consumed == bytes.len() {
        theirs
    } else {
        hyper_run(bytes[..message.consumed].to_vec()).await
    };
    let boundary = match probe.accepted() {
        _ if probe.hung || probe.panicked => Some("boundary:hyper-hang-or-panic"),
        None => Some("boundary:hyper-reads-on"),
        Some(request) if difference(&message, request).is_some() => Some("boundary:hyper-reads-on"),
        // Bytes left over after hyper's message: it read them as a request, or refused them.
        Some(_) if probe.requests.len() > 1 || probe.statuses.iter().any(|s| *s >= 400) => {
            Some("boundary:hyper-ends-earlier")
        }
        Some(_) => None,
    };
    if let Some(mut boundary) = boundary {
        if boundary == "boundary:hyper-reads-on"
            && let Some((len, _)) = raw_head(bytes)
            && trailer_bare_lf(&bytes[len..message.consumed])
        {
            boundary = "boundary:trailer-bare-lf";
        }
        return (
            boundary.into(),
            format!(
                "our message ends after {} of {} bytes; hyper on those bytes alone: {} \
                 (answers {:?})",
                message.consumed,
                bytes.len(),
                probe
                    .accepted()
                    .map_or_else(|| probe.why_refused(), |r| format!("accepts {r:?}")),
                probe.statuses
            ),
        );
    }
    let rest = &bytes[message.consumed..];
    if rest.is_empty() {
        return ("agree:both-accept".into(), String::new());
    }
    let (next, detail, _) = judge_first(rest).await;
    if is_allowed(&next) {
        ("agree:both-accept".into(), String::new())
    } else {
        (format!("next-request:{next}"), detail)
    }
}

// ---------------------------------------------------------------------------------------------
// Generation

/// xorshift64*: small, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        for _ in 0..4 {
            rng.next();
        }
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn request(head: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = head.replace('\n', "\r\n").into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn raw(bytes: &[u8]) -> Vec<u8> {
    bytes.to_vec()
}

/// Valid requests: methods, versions, target forms, bodies, pipelining, Expect, Upgrade.
fn valid_seeds() -> Vec<Vec<u8>> {
    let many_fields: String = (0..20)
        .map(|i| format!("X-Field-{i}: value {i}\n"))
        .collect();
    vec![
        request("GET / HTTP/1.1\nHost: example.com\n\n", b""),
        request(
            "GET /path/to?q=1&r=two HTTP/1.1\nHost: example.com:8080\nUser-Agent: t/1.0\nAccept: */*\n\n",
            b"",
        ),
        request("HEAD /x HTTP/1.1\nHost: a\n\n", b""),
        request("DELETE /item/1 HTTP/1.1\nHost: a\n\n", b""),
        request(
            "POST /submit HTTP/1.1\nHost: a\nContent-Length: 5\n\n",
            b"hello",
        ),
        request(
            "POST /json HTTP/1.1\nHost: a\nContent-Type: application/json\nContent-Length: 13\n\n",
            b"{\"k\":\"value\"}",
        ),
        request("PUT /r HTTP/1.1\nHost: a\nContent-Length: 0\n\n", b""),
        request(
            "PATCH /r HTTP/1.1\nHost: a\nContent-Length: 10\n\n",
            b"\r\n\0binary\x7f\xff",
        ),
        request(
            "PUT /r HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n",
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        ),
        request(
            "POST /ext HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n",
            b"5;name=value\r\nhello\r\n3 ; q=\"a b\"\r\nabc\r\n0;last\r\n\r\n",
        ),
        request(
            "POST /trailers HTTP/1.1\nHost: a\nTE: trailers\nTrailer: X-Checksum\nTransfer-Encoding: chunked\n\n",
            b"A\r\n0123456789\r\n0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n",
        ),
        request(
            "POST /hex HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n",
            b"a\r\n0123456789\r\nB\r\n0123456789a\r\n00\r\n\r\n",
        ),
        request(
            "POST /small HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n",
            b"1\r\na\r\n1\r\nb\r\n1\r\nc\r\n2\r\nde\r\n0\r\n\r\n",
        ),
        request("OPTIONS * HTTP/1.1\nHost: a\n\n", b""),
        request("OPTIONS /x HTTP/1.1\nHost: a\n\n", b""),
        request("GET / HTTP/1.0\n\n", b""),
        request("GET /ka HTTP/1.0\nHost: a\nConnection: keep-alive\n\n", b""),
        request("POST /f HTTP/1.0\nContent-Length: 3\n\n", b"abc"),
        request(
            "GET http://example.com/abs?x=1 HTTP/1.1\nHost: example.com\n\n",
            b"",
        ),
        request(
            "GET http://other.example:81/ HTTP/1.1\nHost: wrong\n\n",
            b"",
        ),
        request(
            "GET https://example.com HTTP/1.1\nHost: example.com\n\n",
            b"",
        ),
        request("GET http://example.com/ HTTP/1.0\n\n", b""),
        request(
            "GET /1 HTTP/1.1\nHost: a\n\nGET /2 HTTP/1.1\nHost: a\n\n",
            b"",
        ),
        request(
            "POST /1 HTTP/1.1\nHost: a\nContent-Length: 3\n\nabcGET /2 HTTP/1.1\nHost: a\n\n",
            b"",
        ),
        request(
            "POST /1 HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n",
            b"3\r\nabc\r\n0\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
        ),
        request(
            "POST /up HTTP/1.1\nHost: a\nExpect: 100-continue\nContent-Length: 4\n\n",
            b"data",
        ),
        request(
            "POST /up HTTP/1.1\nHost: a\nExpect: 100-continue\nTransfer-Encoding: chunked\n\n",
            b"4\r\ndata\r\n0\r\n\r\n",
        ),
        request(
            "GET /ws HTTP/1.1\nHost: a\nConnection: Upgrade\nUpgrade: websocket\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13\n\n",
            b"",
        ),
        request(
            &format!("GET /many HTTP/1.1\nHost: a\n{many_fields}\n"),
            b"",
        ),
        request(
            "GET /auth HTTP/1.1\nHost: a\nCookie: a=1; b=2\nAuthorization: Bearer abc.def\nX-Two: 1\nX-Two: 2\n\n",
            b"",
        ),
        request(
            "GET / HTTP/1.1\nHost: a\nX-Text: caf\u{e9} \u{2713}\n\n",
            b"",
        ),
        request("GET / HTTP/1.1\nHost: a\nX-Tabs: a\tb \t c\n\n", b""),
        request("GET / HTTP/1.1\nHost: a\nX-Empty:\nX-Spaces:   \n\n", b""),
        request("GET / HTTP/1.1\nHost: [::1]:8080\n\n", b""),
        request("GET / HTTP/1.1\nHost: 127.0.0.1\n\n", b""),
        request("GET / HTTP/1.1\nHost:\n\n", b""),
        request("\nGET /after-empty-line HTTP/1.1\nHost: a\n\n", b""),
        request("GET / HTTP/1.1\nHost: a\nConnection: close\n\n", b""),
        request("GET /%7Euser/a%20b;p?q=%41#no HTTP/1.1\nHost: a\n\n", b""),
        request(
            &format!("GET /{} HTTP/1.1\nHost: a\n\n", "long/".repeat(400)),
            b"",
        ),
        request("POST /zero HTTP/1.1\nHost: a\nContent-Length: 000\n\n", b""),
    ]
}

/// Smuggling-style requests: framing that parsers are known to read differently.
fn smuggling_seeds() -> Vec<Vec<u8>> {
    let chunked_hello = b"5\r\nhello\r\n0\r\n\r\n";
    let te = |value: &str| {
        request(
            &format!("POST /te HTTP/1.1\nHost: a\nTransfer-Encoding: {value}\n\n"),
            chunked_hello,
        )
    };
    let chunked_body = |body: &[u8]| {
        request(
            "POST /c HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n",
            body,
        )
    };
    vec![
        request(
            "POST /clte HTTP/1.1\nHost: a\nContent-Length: 6\nTransfer-Encoding: chunked\n\n",
            b"0\r\n\r\nG",
        ),
        request(
            "POST /tecl HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\nContent-Length: 3\n\n",
            b"8\r\nSMUGGLED\r\n0\r\n\r\n",
        ),
        te("chunked "),
        te("Chunked"),
        te("xchunked"),
        te("chunked, chunked"),
        te("\tchunked"),
        te("gzip, chunked"),
        te("chunked, identity"),
        te("chunked;q=1"),
        request(
            "POST /te2 HTTP/1.1\nHost: a\nTransfer-Encoding: gzip\nTransfer-Encoding: chunked\n\n",
            chunked_hello,
        ),
        request(
            "POST /te2 HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\nTransfer-Encoding: identity\n\n",
            chunked_hello,
        ),
        request(
            "POST /cl2 HTTP/1.1\nHost: a\nContent-Length: 5\nContent-Length: 5\n\n",
            b"hello",
        ),
        request(
            "POST /cl2 HTTP/1.1\nHost: a\nContent-Length: 5, 5\n\n",
            b"hello",
        ),
        request(
            "POST /cl2 HTTP/1.1\nHost: a\nContent-Length: 5\nContent-Length: 6\n\n",
            b"hello!",
        ),
        request(
            "POST /cl HTTP/1.1\nHost: a\nContent-Length: +5\n\n",
            b"hello",
        ),
        request(
            "POST /cl HTTP/1.1\nHost: a\nContent-Length: -1\n\n",
            b"hello",
        ),
        request(
            "POST /cl HTTP/1.1\nHost: a\nContent-Length: 0x5\n\n",
            b"hello",
        ),
        request(
            "POST /cl HTTP/1.1\nHost: a\nContent-Length: 5 \n\n",
            b"hello",
        ),
        request(
            "POST /cl HTTP/1.1\nHost: a\nContent-Length: 0000000000000000000005\n\n",
            b"hello",
        ),
        chunked_body(b"0x5\r\nhello\r\n0\r\n\r\n"),
        chunked_body(b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
        chunked_body(b"5\nhello\n0\n\n"),
        chunked_body(b" 5\r\nhello\r\n0\r\n\r\n"),
        chunked_body(b"5 \r\nhello\r\n0\r\n\r\n"),
        chunked_body(b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        chunked_body(b"00000000000000005\r\nhello\r\n0\r\n\r\n"),
        chunked_body(b"5\r\nhello\r\n0\r\nContent-Length: 50\r\nX-T: 1\r\n\r\n"),
        chunked_body(b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        chunked_body(b"5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"),
        chunked_body(b"5\r\nhel\r\n0\r\n\r\n"),
        chunked_body(b"5\r\nhello\r\n0\r\nX-T: 1\n\n"),
        chunked_body(b"0\r\n\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"),
        chunked_body(b"0\r\nX-T: 1\n\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"),
        // hyper's limits on a chunked body: 16 KiB of trailers, 16 KiB of extensions, 100
        // trailer fields.
        chunked_body(
            format!(
                "0\r\n{}\r\n",
                (0..3)
                    .map(|i| format!("X-T{i}: {}\r\n", "t".repeat(7000)))
                    .collect::<String>()
            )
            .as_bytes(),
        ),
        chunked_body(format!("0\r\nX-Big: {}\r\n\r\n", "t".repeat(9000)).as_bytes()),
        chunked_body(
            format!(
                "{}0\r\n\r\n",
                (0..3)
                    .map(|_| format!("1;{}\r\nx\r\n", "e".repeat(6000)))
                    .collect::<String>()
            )
            .as_bytes(),
        ),
        chunked_body(
            format!(
                "0\r\n{}\r\n",
                (0..100)
                    .map(|i| format!("X-{i}: 1\r\n"))
                    .collect::<String>()
            )
            .as_bytes(),
        ),
        chunked_body(
            format!(
                "0\r\n{}\r\n",
                (0..101)
                    .map(|i| format!("X-{i}: 1\r\n"))
                    .collect::<String>()
            )
            .as_bytes(),
        ),
        raw(b"GET / HTTP/1.1\nHost: a\n\n"),
        raw(b"POST / HTTP/1.1\nHost: a\nContent-Length: 2\n\nhi"),
        request(
            "POST /sp HTTP/1.1\nHost: a\nTransfer-Encoding : chunked\n\n",
            chunked_hello,
        ),
        request("GET / HTTP/1.1\nHost: a\nX-Folded: one\n two\n\n", b""),
        request(
            "POST /fold HTTP/1.1\nHost: a\nTransfer-Encoding:\n chunked\n\n",
            chunked_hello,
        ),
        raw(b"GET / HTTP/1.1\r\nHost: a\r\nX-Nul: a\0b\r\n\r\n"),
        raw(b"GET / HTTP/1.1\r\nHost: a\r\nX-Cr: a\rb\r\n\r\n"),
        request(
            "POST /te10 HTTP/1.0\nTransfer-Encoding: chunked\n\n",
            chunked_hello,
        ),
        request("GET / HTTP/1.1\nHost: a\nHost: b\n\n", b""),
        request("GET http://a/ HTTP/1.1\nHost: b\nHost: c\n\n", b""),
        request("GET  / HTTP/1.1\nHost: a\n\n", b""),
        request("GET / HTTP/1.1 \nHost: a\n\n", b""),
        request("GET / HTTP/1.1\nHost: a b\n\n", b""),
        request("GET / HTTP/1.1\nHost: a,b\n\n", b""),
        request("GET / HTTP/1.1\nHost: user@a\n\n", b""),
    ]
}

/// Malformed requests (and inputs that are not HTTP/1 at all), plus the size limits.
fn malformed_seeds() -> Vec<Vec<u8>> {
    vec![
        request("GET / HTTP/1.1\nHost a\n\n", b""),
        request("GET /\n\n", b""),
        request("G(T / HTTP/1.1\nHost: a\n\n", b""),
        request("GET / HTTP/1.1\nHost: a\n: empty-name\n\n", b""),
        request("GET /a b HTTP/1.1\nHost: a\n\n", b""),
        request("GET / HTTP/1.1\nHost: a\n\x01bad: 1\n\n", b""),
        raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        raw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        request("POST / HTTP/1.1\nHost: a\nContent-Length: abc\n\n", b"abc"),
        raw(b"GET / HTTP/1.1\rHost: a\r\n\r\n"),
        raw(b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n"),
        request("GET / http/1.1\nHost: a\n\n", b""),
        request("GET / HTTP/1.2\nHost: a\n\n", b""),
        raw(b"\r\n\r\n"),
        raw(b"GET / HTTP/1.1\r\nHost: a\r\nX: \x7f\r\n\r\n"),
        request(
            "POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n",
            b"5\r\nhelloX0\r\n\r\n",
        ),
        request(
            "POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n",
            b"g\r\nhello\r\n0\r\n\r\n",
        ),
        request(
            "POST / HTTP/1.1\nHost: a\nContent-Length: 99999999999999999999999\n\n",
            b"",
        ),
        request("GET / HTTP/1.1\nHost: a\nX/Y: 1\n\n", b""),
        request("GET ? HTTP/1.1\nHost: a\n\n", b""),
        request("GET http:// HTTP/1.1\nHost: a\n\n", b""),
        request("GET ftp://a/ HTTP/1.1\nHost: a\n\n", b""),
        request("GET a:80 HTTP/1.1\nHost: a\n\n", b""),
        request("GET * HTTP/1.1\nHost: a\n\n", b""),
        request("GET / HTTP/1.1\n\n", b""),
        request(
            "CONNECT example.com:443 HTTP/1.1\nHost: example.com:443\n\n",
            b"",
        ),
        request("GET / HTTP/1.1\nHost: a\nExpect: something\n\n", b""),
        request(
            "POST / HTTP/1.1\nHost: a\nExpect: 100-continue, x\nContent-Length: 1\n\n",
            b"a",
        ),
        // Limits: a request line over 8 KiB, a header line over 8 KiB, a head over 64 KiB
        // (each under hyper's limits), 101 fields (over both).
        request(
            &format!("GET /{} HTTP/1.1\nHost: a\n\n", "a".repeat(9000)),
            b"",
        ),
        request(
            &format!("GET / HTTP/1.1\nHost: a\nX-Big: {}\n\n", "b".repeat(9000)),
            b"",
        ),
        request(
            &format!(
                "GET / HTTP/1.1\nHost: a\n{}\n",
                (0..20)
                    .map(|i| format!("X-{i}: {}\n", "c".repeat(4000)))
                    .collect::<String>()
            ),
            b"",
        ),
        request(
            &format!(
                "GET / HTTP/1.1\nHost: a\n{}\n",
                (0..101).map(|i| format!("X-{i}: 1\n")).collect::<String>()
            ),
            b"",
        ),
        request(
            "POST / HTTP/1.1\nHost: a\nTransfer-Encoding: chunked\n\n",
            format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(9000)).as_bytes(),
        ),
    ]
}

/// Bytes that mutations put in.
const INTERESTING_BYTES: &[u8] = b"\r\n\r\n \t:;,0159aAfFxX-+\0\x7f\xff\x0b\x0c\"=/?#%@[]*.";

/// Header lines that mutations insert.
const DICTIONARY: &[&[u8]] = &[
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding : chunked\r\n",
    b"Transfer-Encoding: chunked, chunked\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 5, 5\r\n",
    b"Content-Length: 12345678901234567890\r\n",
    b"Host: example.com\r\n",
    b"Host: evil\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"Upgrade: websocket\r\n",
    b"TE: trailers\r\n",
    b" chunked\r\n",
    b"\r\n",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n",
];

/// Numbers that replace the digits of a Content-Length or chunk size.
const NUMBERS: &[&[u8]] = &[
    b"0",
    b"1",
    b"5",
    b"00005",
    b"-1",
    b"+5",
    b"0x5",
    b"5 5",
    b"ffffffffffffffff",
    b"10000000000000000",
    b"18446744073709551615",
    b"99999999999999999999",
];

/// Offsets just past each `\n`, with 0: where lines start.
fn line_starts(bytes: &[u8]) -> Vec<usize> {
    std::iter::once(0)
        .chain(
            bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        )
        .filter(|&i| i <= bytes.len())
        .collect()
}

/// One random change to `bytes`.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], bytes: &mut Vec<u8>) {
    if bytes.is_empty() {
        bytes.push(*rng.pick(INTERESTING_BYTES));
        return;
    }
    let at = rng.below(bytes.len());
    match rng.below(13) {
        0 => bytes[at] = rng.next() as u8,
        1 => bytes[at] = *rng.pick(INTERESTING_BYTES),
        2 => bytes.insert(at, *rng.pick(INTERESTING_BYTES)),
        3 => {
            bytes.remove(at);
        }
        4 => bytes.insert(at, bytes[at]),
        5 | 6 => {
            // Duplicate or delete a line.
            let starts = line_starts(bytes);
            let i = rng.below(starts.len());
            let start = starts[i];
            let end = starts.get(i + 1).copied().unwrap_or(bytes.len());
            let line = bytes[start..end].to_vec();
            if rng.chance(50) {
                bytes.splice(start..start, line);
            } else {
                bytes.drain(start..end);
            }
        }
        7 => {
            // CRLF → LF: one of them, or all of them.
            let crlfs: Vec<usize> = bytes
                .windows(2)
                .enumerate()
                .filter(|(_, w)| w == b"\r\n")
                .map(|(i, _)| i)
                .collect();
            if crlfs.is_empty() {
                return;
            }
            if rng.chance(25) {
                for &i in crlfs.iter().rev() {
                    bytes.remove(i);
                }
            } else {
                bytes.remove(*rng.pick(&crlfs));
            }
        }
        8 => {
            // Change the case of a header name (or of the request line's method).
            let starts = line_starts(bytes);
            let start = *rng.pick(&starts);
            let end = bytes[start..]
                .iter()
                .position(|&b| b == b':' || b == b' ' || b == b'\n')
                .map_or(bytes.len(), |i| start + i);
            let upper = rng.chance(50);
            for b in &mut bytes[start..end] {
                if upper || rng.chance(50) {
                    b.make_ascii_uppercase();
                } else {
                    b.make_ascii_lowercase();
                }
            }
        }
        9 => {
            // Splice: a prefix of this input, then a suffix of another seed.
            let other = rng.pick(seeds);
            if other.is_empty() {
                return;
            }
            let from = rng.below(other.len());
            bytes.truncate(at);
            bytes.extend_from_slice(&other[from..]);
        }
        10 | 11 => {
            // A dictionary line at a line start (after the request line, mostly).
            let starts = line_starts(bytes);
            let start = if starts.len() > 1 && rng.chance(90) {
                *rng.pick(&starts[1..])
            } else {
                *rng.pick(&starts)
            };
            let line = rng.pick(DICTIONARY);
            bytes.splice(start..start, line.iter().copied());
        }
        _ => {
            // Replace a run of digits (a length, a chunk size) with another number.
            let Some(start) = bytes[at..]
                .iter()
                .position(u8::is_ascii_hexdigit)
                .map(|i| at + i)
            else {
                return;
            };
            let end = bytes[start..]
                .iter()
                .position(|b| !b.is_ascii_hexdigit())
                .map_or(bytes.len(), |i| start + i);
            let number = rng.pick(NUMBERS);
            bytes.splice(start..end, number.iter().copied());
        }
    }
}

/// The seeds, by kind, and all of them in one list.
struct Seeds {
    valid: Vec<Vec<u8>>,
    smuggling: Vec<Vec<u8>>,
    malformed: Vec<Vec<u8>>,
    all: Vec<Vec<u8>>,
}

impl Seeds {
    fn new() -> Seeds {
        let (valid, smuggling, malformed) = (valid_seeds(), smuggling_seeds(), malformed_seeds());
        let all = [valid.clone(), smuggling.clone(), malformed.clone()].concat();
        Seeds {
            valid,
            smuggling,
            malformed,
            all,
        }
    }
}

/// Input number `index`: each seed as it is first, then a seed (half of the time a valid one,
/// a third a smuggling-style one, the rest malformed) with one to four mutations (one half of
/// the time), sometimes cut short, now and then as it is.
fn input(seeds: &Seeds, index: usize) -> Vec<u8> {
    if let Some(seed) = seeds.all.get(index) {
        return seed.clone();
    }
    let mut rng = Rng::new(SEED ^ (index as u64));
    let pool = match rng.below(100) {
        0..50 => &seeds.valid,
        50..85 => &seeds.smuggling,
        _ => &seeds.malformed,
    };
    let mut bytes = rng.pick(pool).clone();
    if rng.chance(3) {
        return bytes;
    }
    let mutations = match rng.below(4) {
        0 | 1 => 1,
        2 => 2,
        _ => 3 + rng.below(2),
    };
    for _ in 0..mutations {
        mutate(&mut rng, &seeds.all, &mut bytes);
    }
    if rng.chance(8) {
        bytes.truncate(rng.below(bytes.len() + 1));
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// Shrinking and reporting

/// A smaller input with the same category: bytes removed greedily (halves, quarters, … single
/// bytes) as long as the category stays. For the table's examples of disagreements.
async fn shrink(bytes: Vec<u8>, category: &str) -> Vec<u8> {
    let mut best = bytes;
    let mut size = best.len() / 2;
    let mut tries = 0;
    while size > 0 && tries < 2000 {
        let mut at = 0;
        while at < best.len() && tries < 2000 {
            let end = (at + size).min(best.len());
            let mut candidate = best.clone();
            candidate.drain(at..end);
            tries += 1;
            if judge(&candidate).await.0 == category {
                best = candidate;
            } else {
                at += size;
            }
        }
        size /= 2;
    }
    best
}

/// Bytes as escaped ASCII, cut to `max` characters.
fn escaped(bytes: &[u8], max: usize) -> String {
    let text = bytes.escape_ascii().to_string();
    if text.len() > max {
        format!("{}… ({} bytes)", &text[..max], bytes.len())
    } else {
        text
    }
}

#[derive(Default)]
struct Tally {
    count: usize,
    /// The shortest input in the category, with its detail.
    example: Option<(Vec<u8>, String)>,
}

fn case_count() -> usize {
    std::env::var("DIFFERENTIAL_CASES")
        .ok()
        .map(|n| {
            n.replace('_', "")
                .parse()
                .expect("DIFFERENTIAL_CASES is a number")
        })
        .unwrap_or(DEFAULT_CASES)
}

#[test]
fn our_request_parser_agrees_with_hypers() {
    let cases = case_count();
    let seeds = Seeds::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // The harness itself: every valid seed is one both accept alike, and each reported bug
    // still shows with its minimal input.
    runtime.block_on(async {
        for seed in &seeds.valid {
            let (category, detail) = judge(seed).await;
            assert_eq!(
                category,
                "agree:both-accept",
                "valid seed {}: {detail}",
                escaped(seed, 400)
            );
        }
        for (category, _, input) in REPORTED_BUGS {
            assert_eq!(
                judge(input).await.0,
                *category,
                "{} no longer shows {category}: fixed? Then remove it from REPORTED_BUGS",
                escaped(input, 400)
            );
        }
    });

    let started = Instant::now();
    let tallies = runtime.block_on(async {
        let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
        let mut verdicts = stream::iter(0..cases)
            .map(|index| {
                let bytes = input(&seeds, index);
                async move {
                    let (category, detail) = judge(&bytes).await;
                    (category, detail, bytes)
                }
            })
            .buffer_unordered(CONCURRENCY);
        let dump = std::env::var("DIFFERENTIAL_DUMP").ok();
        while let Some((category, detail, bytes)) = verdicts.next().await {
            if dump.as_deref() == Some(category.as_str()) {
                println!("{category}: {}", escaped(&bytes, 2000));
            }
            let tally = tallies.entry(category).or_default();
            tally.count += 1;
            if tally
                .example
                .as_ref()
                .is_none_or(|(example, _)| bytes.len() < example.len())
            {
                tally.example = Some((bytes, detail));
            }
        }
        tallies
    });
    let elapsed = started.elapsed();
    // Shrink the examples of unexpected disagreements (the reported bugs have theirs).
    let tallies = runtime.block_on(async {
        let mut tallies = tallies;
        for (category, tally) in &mut tallies {
            if standing(category) == Standing::Unexpected
                && let Some((bytes, _)) = tally.example.take()
            {
                let shrunk = shrink(bytes, category).await;
                let detail = judge(&shrunk).await.1;
                tally.example = Some((shrunk, detail));
            }
        }
        tallies
    });

    println!(
        "\ndifferential test: {cases} cases from {} seeds in {:.1} s ({:.1} s with shrinking)\n",
        seeds.all.len(),
        elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<40} {:>7}  {:<13} example",
        "category", "count", "standing"
    );
    for (category, tally) in &tallies {
        let (example, detail) = tally.example.as_ref().unwrap();
        let standing = standing(category);
        println!(
            "{:<40} {:>7}  {:<13} {}",
            category,
            tally.count,
            match standing {
                Standing::Agreement => "agreement",
                Standing::OursStricter => "ours-stricter",
                Standing::Reviewed => "reviewed",
                Standing::ReportedBug => "REPORTED BUG",
                Standing::Unexpected => "FAIL",
            },
            escaped(example, 160)
        );
        if !detail.is_empty() && standing != Standing::OursStricter {
            println!("{:<63}{}", "", escaped(detail.as_bytes(), 600));
        }
    }
    println!("\nours stricter, on purpose:");
    for (category, reason) in OURS_STRICTER {
        println!("  {category}: {reason}");
    }
    println!("hyper stricter, reviewed (not bugs):");
    for (category, reason) in HYPER_STRICTER_REVIEWED {
        println!("  {category}: {reason}");
    }
    println!("reported bugs of ours, not fixed yet:");
    for (category, reason, input) in REPORTED_BUGS {
        println!("  {category}: {reason}\n    {}", escaped(input, 400));
    }

    let compared: usize = tallies
        .iter()
        .filter(|(c, _)| !c.starts_with("ours-incomplete"))
        .map(|(_, t)| t.count)
        .sum();
    assert!(
        compared * 2 > cases,
        "most cases must be compared, not incomplete: {compared} of {cases}"
    );
    let unexpected: Vec<&String> = tallies
        .keys()
        .filter(|c| standing(c) == Standing::Unexpected)
        .collect();
    assert!(
        unexpected.is_empty(),
        "disagreements that are neither deliberate nor reviewed: {unexpected:?} (run with \
         --nocapture for the table and a minimal example of each)"
    );
}

/// The comparison sees what it is there to see: a request both accept, changed on our side
/// in each compared part, is a disagreement of that part; our normalisations are not.
#[test]
fn the_comparison_tells_each_difference() {
    let bytes =
        b"POST http://a/p HTTP/1.1\r\nHost: b\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\
        Content-Length: 03\r\nX-A: 1\r\nX-A: 2\r\n\r\nabc";
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let theirs = runtime.block_on(hyper_run(bytes.to_vec()));
    let theirs = theirs.accepted().expect("hyper accepts");
    let Outcome::Accepted(ours) = decode::request(bytes) else {
        panic!("we accept");
    };
    // Host (from the absolute-form target), Expect and Content-Length differ as they are.
    assert_eq!(difference(&ours, theirs), None);
    let changed = |change: fn(&mut Message)| {
        let mut ours = ours.clone();
        change(&mut ours);
        difference(&ours, theirs)
    };
    assert_eq!(
        changed(|m| m.start = "PUT".into()),
        Some("both-accept:different-method")
    );
    assert_eq!(
        changed(|m| m.target = "http://a/q".into()),
        Some("both-accept:different-target")
    );
    assert_eq!(
        changed(|m| m.version = "HTTP/1.0".into()),
        Some("both-accept:different-version")
    );
    assert_eq!(
        changed(|m| m.headers.reverse()),
        Some("both-accept:different-headers"),
        "the values of one name keep their order"
    );
    assert_eq!(
        changed(|m| m.headers.push(("content-length".into(), b"4".to_vec()))),
        Some("both-accept:different-headers")
    );
    assert_eq!(
        changed(|m| m.body.push(b'!')),
        Some("both-accept:different-body")
    );
    assert_eq!(
        changed(|m| m.trailers.push(("x-t".into(), b"1".to_vec()))),
        Some("both-accept:different-trailers")
    );
}
