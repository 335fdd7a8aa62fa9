//! The invariants checked on every input, in one place: by the fuzz targets
//! (`fuzz/fuzz_targets/*.rs` include this file by path) and by the corpus replay on stable
//! (`tests/fuzz_corpus.rs`). Each `check_*` decodes an input with `canary_proxy::decode` and
//! panics when what the proxy made of it breaks a rule:
//!
//! - never a panic inside the proxy's code;
//! - a refusal carries one of the statuses that path can give;
//! - an accepted message took no more than the input, respects the limits (at most 100 fields,
//!   field lines and target within 8 KiB), has no Content-Length next to Transfer-Encoding,
//!   no `Expect`, a Host equal to an absolute-form target's authority, no forbidden trailer;
//! - its body is what an independent, naive reading of the same bytes gives (head end found by
//!   the first empty line, then Content-Length, a plain chunked decoder, or until the end);
//! - decoding just the bytes it took gives the same message, and any shorter prefix of them
//!   is `Incomplete` (the bytes arriving in pieces could not be read differently). The fuzz
//!   targets try two cuts per input ([`Cuts::Sampled`]); the replay of `fuzz/regressions/`
//!   tries them all ([`Cuts::All`]).
#![allow(dead_code)]

use canary_proxy::decode::{self, Message, Outcome};
use http::{Method, Uri};

/// The proxy's limits (`src/http1/mod.rs`).
pub const MAX_LINE_LEN: usize = 8 * 1024;
pub const MAX_HEADERS: usize = 100;

/// Trailer fields the proxy must drop (a sample of `is_forbidden_trailer`).
const FORBIDDEN_TRAILERS: [&str; 12] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "te",
    "trailer",
    "upgrade",
    "authorization",
    "cookie",
    "set-cookie",
    "content-type",
    "keep-alive",
];

/// The method a `response_head_body` input's first byte picks.
pub fn response_method(byte: u8) -> Method {
    match byte % 3 {
        0 => Method::GET,
        1 => Method::HEAD,
        _ => Method::POST,
    }
}

/// Which prefixes of an accepted message are decoded, each expected to be `Incomplete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cuts {
    /// One byte short, and one cut picked from the input's bytes.
    Sampled,
    /// Every one (quadratic: for the few regression inputs).
    All,
}

/// Target `request_head_body`: the input as the bytes a client sent.
pub fn check_request(data: &[u8]) {
    check_request_cuts(data, Cuts::Sampled);
}

pub fn check_request_cuts(data: &[u8], cuts: Cuts) {
    let outcome = decode::request(data);
    match &outcome {
        Outcome::Refused(status) => assert!(
            [400, 405, 414, 417, 431, 501].contains(status),
            "request refused with unexpected status {status}"
        ),
        Outcome::Incomplete => {}
        Outcome::Accepted(message) => {
            request_accepted(data, message);
            prefixes_agree(
                data,
                message.consumed,
                &outcome,
                Some(cuts),
                decode::request,
            );
        }
    }
}

/// Target `response_head_body`: the first byte picks the request method (GET, HEAD, POST),
/// the rest is what the upstream sent.
pub fn check_response(data: &[u8]) {
    check_response_cuts(data, Cuts::Sampled);
}

pub fn check_response_cuts(data: &[u8], cuts: Cuts) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let method = response_method(first);
    let outcome = decode::response(rest, &method);
    match &outcome {
        Outcome::Refused(status) => assert_eq!(*status, 502, "response refused with {status}"),
        Outcome::Incomplete => {}
        Outcome::Accepted(message) => {
            let until_close = response_accepted(rest, &method, message);
            prefixes_agree(
                rest,
                message.consumed,
                &outcome,
                (!until_close).then_some(cuts),
                |bytes: &[u8]| decode::response(bytes, &method),
            );
        }
    }
}

/// Target `chunked`: the input as a chunked body.
pub fn check_chunked(data: &[u8]) {
    check_chunked_cuts(data, Cuts::Sampled);
}

pub fn check_chunked_cuts(data: &[u8], cuts: Cuts) {
    let outcome = decode::chunked(data);
    let naive = naive_chunked(data);
    match &outcome {
        Outcome::Refused(status) => assert_eq!(*status, 400, "chunked refused with {status}"),
        Outcome::Incomplete => assert!(
            naive.is_none(),
            "the proxy waits for more, but the chunked body is complete: {naive:?}"
        ),
        Outcome::Accepted(message) => {
            assert!(message.consumed <= data.len(), "consumed past the input");
            assert_eq!(
                naive,
                Some((message.body.clone(), message.consumed)),
                "the proxy's chunked body differs from the naive decoder's (body, consumed)"
            );
            check_trailers(message);
            prefixes_agree(
                data,
                message.consumed,
                &outcome,
                Some(cuts),
                decode::chunked,
            );
        }
    }
}

/// `decode(&data[..consumed])` is the same outcome; with `cuts`, shorter prefixes are
/// `Incomplete` (not for a body that runs until the close: a prefix of it is a shorter one).
fn prefixes_agree(
    data: &[u8],
    consumed: usize,
    outcome: &Outcome,
    cuts: Option<Cuts>,
    decode: impl Fn(&[u8]) -> Outcome,
) {
    assert!(consumed <= data.len(), "consumed past the input");
    assert_eq!(
        &decode(&data[..consumed]),
        outcome,
        "the bytes the message took, alone, decode differently"
    );
    let cuts: Vec<usize> = match cuts {
        _ if consumed == 0 => Vec::new(),
        None => Vec::new(),
        Some(Cuts::Sampled) => vec![consumed - 1, cut_point(data, consumed)],
        Some(Cuts::All) => (0..consumed).collect(),
    };
    for cut in cuts {
        assert_eq!(
            decode(&data[..cut]),
            Outcome::Incomplete,
            "a prefix of {cut} of the {consumed} bytes of an accepted message is not incomplete"
        );
    }
}

/// A cut in `0..end` that depends on every byte of the input.
fn cut_point(data: &[u8], end: usize) -> usize {
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % end as u64) as usize
}

fn values<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> Vec<&'a [u8]> {
    fields
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
        .collect()
}

/// Field lines within the line limit, names lowercase.
fn check_fields(fields: &[(String, Vec<u8>)]) {
    for (name, value) in fields {
        assert!(
            name.len() + 2 + value.len() <= MAX_LINE_LEN,
            "a field line of {} bytes",
            name.len() + 2 + value.len()
        );
        assert_eq!(
            name,
            &name.to_ascii_lowercase(),
            "a field name not lowercase"
        );
    }
}

fn check_trailers(message: &Message) {
    check_fields(&message.trailers);
    assert!(message.trailers.len() <= MAX_HEADERS, "too many trailers");
    for (name, _) in &message.trailers {
        assert!(
            !FORBIDDEN_TRAILERS.contains(&name.as_str()) && !name.starts_with("if-"),
            "forbidden trailer {name} passed on"
        );
    }
}

/// The one Content-Length of an accepted message framed by length: plain digits.
fn content_length(message: &Message) -> u64 {
    let lengths = values(&message.headers, "content-length");
    assert_eq!(lengths.len(), 1, "Content-Length not folded into one value");
    let digits = lengths[0];
    assert!(
        !digits.is_empty() && digits.len() <= 19 && digits.iter().all(u8::is_ascii_digit),
        "Content-Length {:?} taken",
        String::from_utf8_lossy(digits)
    );
    std::str::from_utf8(digits).unwrap().parse().unwrap()
}

/// `Transfer-Encoding` is exactly `chunked` (one value, one coding).
fn assert_only_chunked(message: &Message) {
    let codings = values(&message.headers, "transfer-encoding");
    assert!(
        codings.len() == 1 && codings[0].trim_ascii().eq_ignore_ascii_case(b"chunked"),
        "a Transfer-Encoding other than chunked taken: {codings:?}"
    );
}

/// Checks the body of a message whose head ends at `head_end`, framed as its headers say
/// (`empty`: no body whatever they say; `until_close`: with neither Transfer-Encoding nor
/// Content-Length, the body runs to the end of the input, else there is none). True when
/// the body ran to the end of the input that way.
fn check_body(
    data: &[u8],
    head_end: usize,
    message: &Message,
    empty: bool,
    until_close: bool,
) -> bool {
    let has_te = !values(&message.headers, "transfer-encoding").is_empty();
    let has_cl = !values(&message.headers, "content-length").is_empty();
    if empty {
        assert!(message.body.is_empty() && message.trailers.is_empty());
        assert_eq!(message.consumed, head_end, "bytes taken past an empty body");
        return false;
    }
    if has_te {
        assert_only_chunked(message);
        let naive = naive_chunked(&data[head_end..]);
        assert_eq!(
            naive,
            Some((message.body.clone(), message.consumed - head_end)),
            "the proxy's chunked body differs from the naive decoder's (body, consumed)"
        );
        check_trailers(message);
        return false;
    }
    assert!(message.trailers.is_empty(), "trailers without chunked");
    if has_cl {
        let length = content_length(message);
        let end = usize::try_from(length)
            .ok()
            .and_then(|l| head_end.checked_add(l))
            .filter(|&end| end <= data.len())
            .expect("a Content-Length body longer than the input accepted");
        assert_eq!(message.body, &data[head_end..end], "Content-Length body");
        assert_eq!(
            message.consumed, end,
            "consumed after a Content-Length body"
        );
        return false;
    }
    if until_close {
        assert_eq!(message.body, &data[head_end..], "a body until the close");
        assert_eq!(
            message.consumed,
            data.len(),
            "a body until the close ends early"
        );
    } else {
        assert!(message.body.is_empty(), "a body without framing");
        assert_eq!(message.consumed, head_end, "bytes taken past the head");
    }
    until_close
}

fn request_accepted(data: &[u8], message: &Message) {
    assert!(message.consumed <= data.len(), "consumed past the input");
    assert!(
        message.version == "HTTP/1.0" || message.version == "HTTP/1.1",
        "version {}",
        message.version
    );
    assert_ne!(message.start, "CONNECT", "CONNECT accepted");
    assert!(
        message.target.len() <= MAX_LINE_LEN,
        "a target of {} bytes",
        message.target.len()
    );
    if message.target == "*" {
        assert_eq!(message.start, "OPTIONS", "`*` target for {}", message.start);
    }
    check_fields(&message.headers);
    let hosts = values(&message.headers, "host");
    let others = message.headers.len() - hosts.len();
    assert!(others <= MAX_HEADERS, "{others} header fields besides Host");
    assert!(hosts.len() <= 1, "{} Host fields", hosts.len());
    if message.version == "HTTP/1.1" {
        assert_eq!(hosts.len(), 1, "an HTTP/1.1 request without Host");
    }
    if let Ok(uri) = message.target.parse::<Uri>()
        && let Some(authority) = uri.authority()
    {
        assert_eq!(
            hosts,
            [authority.as_str().as_bytes()],
            "Host is not the absolute-form target's authority"
        );
    }
    assert!(
        values(&message.headers, "expect").is_empty(),
        "Expect passed on"
    );
    let has_te = !values(&message.headers, "transfer-encoding").is_empty();
    let has_cl = !values(&message.headers, "content-length").is_empty();
    assert!(
        !(has_te && has_cl),
        "Transfer-Encoding and Content-Length both"
    );
    if has_te {
        assert_eq!(message.version, "HTTP/1.1", "Transfer-Encoding in HTTP/1.0");
    }
    let head_end = naive_head_end(data, 0).expect("accepted, but no empty line ends the head");
    assert!(
        head_end <= message.consumed,
        "the head ends past the message"
    );
    check_body(data, head_end, message, false, false);
}

/// Checks an accepted response; true when its body runs until the close.
fn response_accepted(data: &[u8], method: &Method, message: &Message) -> bool {
    assert!(message.consumed <= data.len(), "consumed past the input");
    assert!(
        message.version == "HTTP/1.0" || message.version == "HTTP/1.1",
        "version {}",
        message.version
    );
    check_fields(&message.headers);
    assert!(
        message.headers.len() <= MAX_HEADERS,
        "{} header fields",
        message.headers.len()
    );
    let status: u16 = message.start.parse().expect("a numeric status");
    assert!(
        (100..1000).contains(&status) && (status >= 200 || status == 101),
        "status {status} taken as the response"
    );
    // Skip the interim responses the proxy skips, each ending at its first empty line.
    let mut start = 0;
    let head_end = loop {
        let end = naive_head_end(data, start).expect("accepted, but no empty line ends a head");
        let code = naive_status(data, start).expect("accepted, but no status code");
        if (100..200).contains(&code) && code != 101 {
            start = end;
            continue;
        }
        assert_eq!(code, status, "the status of another head");
        break end;
    };
    assert!(
        head_end <= message.consumed,
        "the head ends past the message"
    );
    let empty = method == Method::HEAD || status < 200 || status == 204 || status == 304;
    check_body(data, head_end, message, empty, true)
}

/// Where a head starting at `from` ends: after the empty lines a message may start with,
/// the first line ending (`\n`) followed by an empty line (`\n` or `\r\n`).
pub fn naive_head_end(data: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < data.len() && (data[i] == b'\r' || data[i] == b'\n') {
        i += 1;
    }
    (i..data.len()).find_map(|j| {
        if data[j] != b'\n' {
            None
        } else if data.get(j + 1) == Some(&b'\n') {
            Some(j + 2)
        } else if data.get(j + 1..j + 3) == Some(b"\r\n") {
            Some(j + 3)
        } else {
            None
        }
    })
}

/// The status code of the status line starting at `from` (after empty lines):
/// `HTTP/1.x NNN`.
fn naive_status(data: &[u8], from: usize) -> Option<u16> {
    let start = from
        + data[from..]
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')?;
    let line = data.get(start..start + 12)?;
    if !line.starts_with(b"HTTP/1.") || line[8] != b' ' {
        return None;
    }
    std::str::from_utf8(&line[9..12]).ok()?.parse().ok()
}

/// A plain chunked decoder (RFC 9112 §7.1), strict where framing is concerned: each
/// chunk-size line is 1 to 16 hex digits, optional spaces or tabs, an optional `;` extension
/// (any bytes but CR and LF), then CRLF; chunk data is followed by CRLF; after the last chunk,
/// trailer lines up to the first empty one (`\r\n` or `\n`; their content is not checked).
/// Returns the data and the bytes the body took, or `None` if the body is malformed or not
/// all there.
pub fn naive_chunked(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let line_len = data[pos..].windows(2).position(|w| w == b"\r\n")?;
        let line = &data[pos..pos + line_len];
        if line.contains(&b'\r') || line.contains(&b'\n') {
            return None;
        }
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 16 {
            return None;
        }
        let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()?;
        let rest = &line[digits..];
        let rest = &rest[rest
            .iter()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count()..];
        if !rest.is_empty() && rest[0] != b';' {
            return None;
        }
        pos += line_len + 2;
        if size == 0 {
            break;
        }
        let end = usize::try_from(size).ok()?.checked_add(pos)?;
        body.extend_from_slice(data.get(pos..end)?);
        pos = end;
        if data.get(pos..pos + 2)? != b"\r\n" {
            return None;
        }
        pos += 2;
    }
    loop {
        let line_len = data[pos..].iter().position(|&b| b == b'\n')?;
        let line = &data[pos..pos + line_len];
        pos += line_len + 1;
        if line.is_empty() || line == b"\r" {
            return Some((body, pos));
        }
    }
}
