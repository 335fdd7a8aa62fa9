//! Message heads, both directions: request and response heads parsed with httparse into
//! `HeaderMap`s whose values share the read buffer, the one set of size limits, how a body is
//! delimited (RFC 9112 §6), whether a connection stays open, and writing header lines.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};

use http_body::SizeHint;

use super::{MAX_HEAD_LEN, MAX_HEADERS, MAX_LINE_LEN};

/// Why a head (or a trailer section) cannot be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Malformed: a request is answered 400, a response is a bad gateway.
    #[error("malformed head: {0}")]
    Malformed(&'static str),
    /// A header line over [`MAX_LINE_LEN`], a head over [`MAX_HEAD_LEN`], or more than
    /// [`MAX_HEADERS`] fields: a request is answered 431.
    #[error("head too large")]
    TooLarge,
    /// The request line alone is over [`MAX_LINE_LEN`]: answered 414 URI Too Long.
    #[error("request line too long")]
    UriTooLong,
}

impl HeadError {
    /// The status a client whose request head this is gets.
    pub fn status(self) -> StatusCode {
        match self {
            HeadError::Malformed(_) => StatusCode::BAD_REQUEST,
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::UriTooLong => StatusCode::URI_TOO_LONG,
        }
    }
}

/// Which of the fields that decide framing and the connection's fate a head may have, noted
/// while it is parsed: a field known absent costs no lookup (each is a hash and a probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present(u8);

impl Present {
    pub const NONE: Present = Present(0);
    /// For a map that was not parsed here: every field is looked up.
    #[cfg(test)]
    pub const ANY: Present = Present(u8::MAX);
    pub const CONTENT_LENGTH: u8 = 1;
    pub const TRANSFER_ENCODING: u8 = 1 << 1;
    pub const CONNECTION: u8 = 1 << 2;
    pub const UPGRADE: u8 = 1 << 3;
    pub const EXPECT: u8 = 1 << 4;
    pub const TE: u8 = 1 << 5;

    /// Whether the head may have the field `bit` stands for.
    pub fn may_have(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    fn note(&mut self, name: &HeaderName) {
        let bit = match *name {
            CONTENT_LENGTH => Present::CONTENT_LENGTH,
            TRANSFER_ENCODING => Present::TRANSFER_ENCODING,
            CONNECTION => Present::CONNECTION,
            UPGRADE => Present::UPGRADE,
            EXPECT => Present::EXPECT,
            TE => Present::TE,
            _ => return,
        };
        self.0 |= bit;
    }
}

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub present: Present,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub present: Present,
}

/// Where each header field of a head being parsed lies in the buffer.
type FieldSpans = Vec<(HeaderName, usize, usize)>;

thread_local! {
    /// Scratch space for the field spans of the head being parsed, kept per thread (parsing
    /// is synchronous): no connection holds it while idle.
    static SPANS: std::cell::Cell<FieldSpans> = const { std::cell::Cell::new(Vec::new()) };
    /// Emptied header maps of messages already sent, kept for their allocation: each request
    /// and response head needs a map.
    static SPARE_MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// Spare maps kept per thread, and the largest map kept.
const SPARE_MAPS_KEPT: usize = 64;
const SPARE_MAP_CAPACITY: usize = 128;

/// An empty header map, reused when one is spare.
fn spare_map() -> HeaderMap {
    SPARE_MAPS
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_default()
}

/// Keeps the allocation of a map whose message has been sent, for the next head.
pub fn recycle_map(mut map: HeaderMap) {
    // `capacity` counts distinct names; `len` also counts repeated values.
    if map.capacity() > SPARE_MAP_CAPACITY || map.len() > SPARE_MAP_CAPACITY {
        return;
    }
    map.clear();
    SPARE_MAPS.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARE_MAPS_KEPT {
            spare.push(map);
        }
    });
}

/// The length of the line that starts at `start` and whose content runs at least to
/// `content_end`, as it came (whitespace included), without its line end (LF or CRLF).
pub(super) fn raw_line_len(buf: &[u8], start: usize, content_end: usize) -> usize {
    // Usually the line ends right there (a call to memchr would cost more than the line).
    if buf.get(content_end..content_end + 2) == Some(b"\r\n") {
        return content_end - start;
    }
    let end = memchr::memchr(b'\n', &buf[content_end..]).map_or(buf.len(), |at| content_end + at);
    let end = if end > start && buf[end - 1] == b'\r' {
        end - 1
    } else {
        end
    };
    end - start
}

/// Checks the fields httparse found in `buf` (names valid, each line as it came within
/// [`MAX_LINE_LEN`]) and records where their values lie.
fn collect(
    spans: &mut FieldSpans,
    buf: &[u8],
    fields: &[httparse::Header<'_>],
) -> Result<Present, HeadError> {
    let base = buf.as_ptr() as usize;
    let mut present = Present::NONE;
    spans.clear();
    for field in fields {
        let line_start = field.name.as_ptr() as usize - base;
        let start = field.value.as_ptr() as usize - base;
        let end = start + field.value.len();
        if raw_line_len(buf, line_start, end) > MAX_LINE_LEN {
            return Err(HeadError::TooLarge);
        }
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        present.note(&name);
        spans.push((name, start, end));
    }
    Ok(present)
}

/// The header map of a head, its values slices of `head` (the bytes `collect` saw, frozen).
fn take_map(spans: &mut FieldSpans, head: &Bytes) -> Result<HeaderMap, HeadError> {
    // Room for the headers the proxy adds (X-Forwarded-*, request id, backend name), so that
    // adding them does not grow (rehash) the map.
    let mut headers = spare_map();
    headers.reserve(spans.len() + 8);
    for (name, start, end) in spans.drain(..) {
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| HeadError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// What httparse made of the start of a buffer.
fn complete_len(
    parsed: Result<httparse::Status<usize>, httparse::Error>,
    buf: &[u8],
) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_LEN => Ok(Some(len)),
        Ok(httparse::Status::Complete(_)) => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => partial_limits(buf).map(|()| None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::Malformed("invalid head")),
    }
}

/// Refuses an incomplete head as soon as it cannot fit the limits: a first line (after the
/// empty lines a message may start with) or a last, unfinished line already over
/// [`MAX_LINE_LEN`], or a head over [`MAX_HEAD_LEN`]. Lines are measured as in a complete
/// head ([`raw_line_len`]: as they came, without the line end; a CR at the end of what has
/// come may be the start of one), so a head is refused or not whatever pieces it came in.
fn partial_limits(buf: &[u8]) -> Result<(), HeadError> {
    let start = base_line_start(buf);
    let unfinished = |line: &[u8]| line.len() - usize::from(line.ends_with(b"\r"));
    let first = &buf[start..];
    match memchr::memrchr(b'\n', first) {
        None if unfinished(first) > MAX_LINE_LEN => Err(HeadError::UriTooLong),
        None => Ok(()),
        Some(_) if buf.len() > MAX_HEAD_LEN => Err(HeadError::TooLarge),
        Some(last_lf) if unfinished(&first[last_lf + 1..]) > MAX_LINE_LEN => {
            Err(HeadError::TooLarge)
        }
        Some(_) => Ok(()),
    }
}

/// Parses a request head at the start of `buf`, consuming it; `None` when it is not complete
/// yet. HTTP/1.0 and HTTP/1.1 only (httparse refuses other versions).
pub fn parse_request_head(buf: &mut BytesMut) -> Result<Option<RequestHead>, HeadError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let status = config.parse_request_with_uninit_headers(&mut parsed, buf, &mut slots);
    let Some(len) = complete_len(status, buf)? else {
        return Ok(None);
    };
    let base = buf.as_ptr() as usize;
    let target = parsed.path.ok_or(HeadError::Malformed("no target"))?;
    let target_start = target.as_ptr() as usize - base;
    let target_end = target_start + target.len();
    if raw_line_len(buf, base_line_start(buf), target_end) > MAX_LINE_LEN {
        return Err(HeadError::UriTooLong);
    }
    let method = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(HeadError::Malformed("invalid method"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut spans = SPANS.take();
    let collected = collect(&mut spans, buf, parsed.headers);
    let head = collected.and_then(|present| {
        let raw = buf.split_to(len).freeze();
        let uri = Uri::from_maybe_shared(raw.slice(target_start..target_end))
            .map_err(|_| HeadError::Malformed("invalid request target"))?;
        let headers = take_map(&mut spans, &raw)?;
        Ok(RequestHead {
            method,
            uri,
            version,
            headers,
            present,
        })
    });
    spans.clear();
    SPANS.set(spans);
    head.map(Some)
}

/// Where the first line of a message starts (after the empty lines it may start with).
fn base_line_start(buf: &[u8]) -> usize {
    buf.iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len())
}

/// Parses a response head at the start of `buf`, consuming it; `None` when it is not complete.
pub fn parse_response_head(buf: &mut BytesMut) -> Result<Option<ResponseHead>, HeadError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let status = config.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots);
    let Some(len) = complete_len(status, buf).map_err(|error| match error {
        // A response has no request line: its first line is a header line like any other.
        HeadError::UriTooLong => HeadError::TooLarge,
        other => other,
    })?
    else {
        return Ok(None);
    };
    // The status line has the limit of any line (found by fuzzing: it was only checked while
    // arriving, so a long one passed when it came in one read and failed in two).
    let start = base_line_start(buf);
    if raw_line_len(buf, start, start) > MAX_LINE_LEN {
        return Err(HeadError::TooLarge);
    }
    let status = parsed
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(HeadError::Malformed("invalid status code"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut spans = SPANS.take();
    let collected = collect(&mut spans, buf, parsed.headers);
    let head = collected.and_then(|present| {
        let raw = buf.split_to(len).freeze();
        let headers = take_map(&mut spans, &raw)?;
        Ok(ResponseHead {
            status,
            version,
            headers,
            present,
        })
    });
    spans.clear();
    SPANS.set(spans);
    head.map(Some)
}

/// True when one of the comma-separated values of header `name` is `token` (any case).
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &[u8]) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// Whether the message has `Transfer-Encoding`, and whether it is exactly `chunked` (the
/// one coding the proxy decodes; any other would have to be passed on, and is refused).
pub fn transfer_encoding(headers: &HeaderMap) -> Option<bool> {
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter().peekable();
    codings.peek()?;
    let mut count = 0;
    let mut chunked = true;
    for value in codings {
        for coding in value.as_bytes().split(|&b| b == b',') {
            count += 1;
            chunked &= coding.trim_ascii().eq_ignore_ascii_case(b"chunked");
        }
    }
    Some(chunked && count == 1)
}

/// The Content-Length, if any: every value (and every comma-separated part) must be the same
/// decimal number. Repeated values that agree are folded into one, so that the next hop sees
/// a single plain value whatever its parser makes of lists.
pub fn content_length(headers: &mut HeaderMap) -> Result<Option<u64>, HeadError> {
    let mut length = None;
    let mut parts = 0;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let parsed = parse_decimal(part.trim_ascii())
                .ok_or(HeadError::Malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(HeadError::Malformed("conflicting Content-Length values"));
            }
            length = Some(parsed);
            parts += 1;
        }
    }
    if let (Some(length), true) = (length, parts > 1) {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    Ok(length)
}

pub fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a request without one; a response to HEAD, 1xx, 204, 304), or the end reached.
    Empty,
    /// Content-Length: this many bytes still to come.
    Length(u64),
    /// Transfer-Encoding ending in chunked.
    Chunked(ChunkState),
    /// Neither (responses only): the body runs until the connection closes.
    UntilClose,
}

/// Where a chunked body decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: expecting trailer fields or the final CRLF.
    Trailers,
}

impl Framing {
    /// Whether the body has been read to its end.
    pub fn is_end(&self) -> bool {
        matches!(self, Framing::Empty | Framing::Length(0))
    }

    /// What is known of the length of the body still to come.
    pub fn size_hint(&self) -> SizeHint {
        match self {
            Framing::Length(remaining) => SizeHint::with_exact(*remaining),
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Chunked(_) | Framing::UntilClose => SizeHint::default(),
        }
    }
}

/// Why a request's body cannot be delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// Both Content-Length and Transfer-Encoding (request smuggling): 400.
    Ambiguous,
    /// Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1: faulty framing), or a
    /// malformed Content-Length: 400.
    Invalid(&'static str),
    /// A transfer coding other than chunked: 501.
    UnsupportedCoding,
}

impl FramingError {
    pub fn status(self) -> StatusCode {
        match self {
            FramingError::Ambiguous | FramingError::Invalid(_) => StatusCode::BAD_REQUEST,
            FramingError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

/// How a request body is delimited (RFC 9112 §6.3): chunked, by length, or none. Repeated
/// Content-Length values that agree are folded into one.
pub fn request_framing(
    version: Version,
    present: Present,
    headers: &mut HeaderMap,
) -> Result<Framing, FramingError> {
    if !present.may_have(Present::TRANSFER_ENCODING | Present::CONTENT_LENGTH) {
        return Ok(Framing::Empty);
    }
    let chunked = transfer_encoding(headers);
    if chunked.is_some() && headers.contains_key(CONTENT_LENGTH) {
        return Err(FramingError::Ambiguous);
    }
    match chunked {
        Some(_) if version == Version::HTTP_10 => Err(FramingError::Invalid(
            "Transfer-Encoding in an HTTP/1.0 request",
        )),
        Some(true) => Ok(Framing::Chunked(ChunkState::Size)),
        Some(false) => Err(FramingError::UnsupportedCoding),
        None => match content_length(headers) {
            Ok(Some(length)) => Ok(Framing::Length(length)),
            Ok(None) => Ok(Framing::Empty),
            Err(_) => Err(FramingError::Invalid("invalid Content-Length")),
        },
    }
}

/// How a response body is delimited (RFC 9112 §6.3), given the request's method.
pub fn response_framing(method: &Method, head: &mut ResponseHead) -> Result<Framing, HeadError> {
    let status = head.status;
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if !head
        .present
        .may_have(Present::TRANSFER_ENCODING | Present::CONTENT_LENGTH)
    {
        return Ok(Framing::UntilClose);
    }
    // Codings other than chunked would reach the client unlabelled once the (hop-by-hop)
    // Transfer-Encoding is stripped, so they are refused.
    if let Some(only_chunked) = transfer_encoding(&head.headers) {
        return if only_chunked {
            Ok(Framing::Chunked(ChunkState::Size))
        } else {
            Err(HeadError::Malformed("transfer coding other than chunked"))
        };
    }
    Ok(content_length(&mut head.headers)?.map_or(Framing::UntilClose, Framing::Length))
}

/// Whether the connection may carry another message after this one (RFC 9112 §9.3):
/// HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`.
pub fn keeps_alive(version: Version, present: Present, headers: &HeaderMap) -> bool {
    if !present.may_have(Present::CONNECTION) {
        return version == Version::HTTP_11;
    }
    let has = |token: &[u8]| has_token(headers, &CONNECTION, token);
    match version {
        Version::HTTP_11 => !has(b"close"),
        _ => has(b"keep-alive") && !has(b"close"),
    }
}

/// Appends one header field line, `name: value\r\n`, to a head being written.
pub fn put_field(buf: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    buf.extend_from_slice(name.as_str().as_bytes());
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// The current time as an HTTP date, formatted at most once a second per thread.
pub fn http_date() -> [u8; 29] {
    thread_local! {
        static CACHED: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let (at, text) = cached.get();
        if at == second {
            return text;
        }
        let mut text = [0u8; 29];
        let formatted = httpdate::fmt_http_date(now);
        let n = formatted.len().min(29);
        text[..n].copy_from_slice(&formatted.as_bytes()[..n]);
        cached.set((second, text));
        text
    })
}

/// A small deterministic generator (xorshift64) for the tests that mangle input.
#[cfg(test)]
pub fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        parse_request_head(&mut BytesMut::from(raw))
    }

    fn response(raw: &[u8]) -> (Result<Option<ResponseHead>, HeadError>, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let parsed = parse_response_head(&mut buf);
        (parsed, buf)
    }

    fn head(raw: &[u8]) -> ResponseHead {
        response(raw).0.unwrap().unwrap()
    }

    #[test]
    fn request_heads_parse() {
        let head = parse(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nX-Two: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri, "/a?b=1");
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["host"], "x");
        assert_eq!(head.headers.get_all("x-two").iter().count(), 2);
        assert!(parse(b"GET / HTTP/1.1\r\nHost:").unwrap().is_none());
        assert_eq!(
            parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().version,
            Version::HTTP_10
        );
        assert!(matches!(
            parse(b"G@T / HTTP/1.1\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/2.0\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let many: String = (0..200).map(|i| format!("x-{i}: 1\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse(head.as_bytes()).err(), Some(HeadError::TooLarge));
    }

    #[test]
    fn one_set_of_limits_lines_8k_heads_64k() {
        // A request line over 8 KiB is 414, complete or still arriving.
        let line = format!(
            "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
            "a".repeat(MAX_LINE_LEN)
        );
        assert_eq!(parse(line.as_bytes()).err(), Some(HeadError::UriTooLong));
        assert_eq!(
            parse(&line.as_bytes()[..MAX_LINE_LEN + 2]).err(),
            Some(HeadError::UriTooLong)
        );
        // Empty lines before the request line do not count towards it.
        let padded = format!("\r\n\r\n{line}");
        assert_eq!(parse(padded.as_bytes()).err(), Some(HeadError::UriTooLong));
        let fits = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(8000));
        assert!(parse(fits.as_bytes()).unwrap().is_some());
        // A header line over 8 KiB is 431, complete or still arriving.
        let field = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "b".repeat(MAX_LINE_LEN)
        );
        assert_eq!(parse(field.as_bytes()).err(), Some(HeadError::TooLarge));
        assert_eq!(
            parse(&field.as_bytes()[..field.len() - 4]).err(),
            Some(HeadError::TooLarge)
        );
        // Lines within the limit, but over 64 KiB together: 431.
        let lines: String = (0..20)
            .map(|i| format!("X-{i}: {}\r\n", "c".repeat(4000)))
            .collect();
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\n{lines}\r\n");
        assert_eq!(parse(big.as_bytes()).err(), Some(HeadError::TooLarge));
        assert_eq!(
            parse(&big.as_bytes()[..MAX_HEAD_LEN + 1]).err(),
            Some(HeadError::TooLarge)
        );
        // The same limits for responses.
        let field = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n",
            "b".repeat(MAX_LINE_LEN)
        );
        assert_eq!(
            response(field.as_bytes()).0.err(),
            Some(HeadError::TooLarge)
        );
        // A status line over the limit is refused whole too, not only while it arrives.
        let status = format!("HTTP/1.1 204 {}\r\n\r\n", "a".repeat(MAX_LINE_LEN - 12));
        assert_eq!(
            response(status.as_bytes()).0.err(),
            Some(HeadError::TooLarge)
        );
        let status_8k = format!("HTTP/1.1 204 {}\r\n\r\n", "a".repeat(MAX_LINE_LEN - 13));
        assert!(response(status_8k.as_bytes()).0.unwrap().is_some());
        let endless = format!("HTTP/1.1 200 {}", "a".repeat(MAX_LINE_LEN));
        assert_eq!(
            response(endless.as_bytes()).0.err(),
            Some(HeadError::TooLarge)
        );
    }

    #[test]
    fn a_head_at_the_limits_is_taken_or_refused_whatever_pieces_it_comes_in() {
        // Found by the fuzz targets' prefix checks: lines were measured one way whole (the
        // request line to the version, a field without the whitespace around its value) and
        // another while arriving (every byte so far).
        let exactly = |fill: usize| "a".repeat(fill);
        let line_8k = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
            exactly(MAX_LINE_LEN - 14)
        );
        // Field lines of exactly 8 KiB and one byte more, as they came (4 + 8184 + 4 bytes).
        let padded = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX:  {}    \r\n\r\n",
            exactly(MAX_LINE_LEN - 8)
        );
        let over = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX:  {}     \r\n\r\n",
            exactly(MAX_LINE_LEN - 8)
        );
        let line_over = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
            exactly(MAX_LINE_LEN - 13)
        );
        for (raw, whole_ok) in [
            (&line_8k, true),
            (&padded, true),
            (&over, false),
            (&line_over, false),
        ] {
            let whole = parse(raw.as_bytes()).map(|head| head.is_some());
            assert_eq!(whole.is_ok(), whole_ok, "{whole:?}");
            for cut in 1..raw.len() {
                match parse(&raw.as_bytes()[..cut]) {
                    Ok(None) => {}
                    Ok(Some(_)) => assert_eq!(cut, raw.len()),
                    Err(error) => assert!(!whole_ok, "cut at {cut} of {}: {error:?}", raw.len()),
                }
            }
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nX:  {}    \r\nContent-Length: 0\r\n\r\n",
            exactly(MAX_LINE_LEN - 8)
        );
        for cut in 1..response.len() {
            assert!(
                self::response(&response.as_bytes()[..cut]).0.is_ok(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn heads_split_anywhere_parse_once_whole_and_garbage_never_panics() {
        let raw = b"POST /u?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nCookie: a=1\r\n\r\nhi";
        let head_len = raw.len() - 2;
        for cut in 0..raw.len() {
            let parsed = parse(&raw[..cut]).unwrap();
            assert_eq!(parsed.is_some(), cut >= head_len, "cut at {cut}");
        }
        // Mutations of a valid head (xorshift, fixed seed): errors are fine, panics are not.
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let mut bytes = raw.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let cut = (next() % (bytes.len() as u64 + 1)) as usize;
            let mut buf = BytesMut::from(&bytes[..cut]);
            if let Ok(Some(mut head)) = parse_request_head(&mut buf) {
                let _ = request_framing(head.version, head.present, &mut head.headers);
            }
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn request_bodies_are_framed_like_rfc_9112() {
        let framing = |pairs: &[(&'static str, &'static str)]| {
            request_framing(Version::HTTP_11, Present::ANY, &mut headers(pairs))
        };
        assert_eq!(framing(&[]), Ok(Framing::Empty));
        assert_eq!(framing(&[("content-length", "5")]), Ok(Framing::Length(5)));
        assert_eq!(
            framing(&[("transfer-encoding", "chunked")]),
            Ok(Framing::Chunked(ChunkState::Size))
        );
        assert_eq!(
            framing(&[("transfer-encoding", "chunked"), ("content-length", "5")]),
            Err(FramingError::Ambiguous)
        );
        assert_eq!(
            framing(&[("transfer-encoding", "gzip, chunked")]),
            Err(FramingError::UnsupportedCoding)
        );
        assert!(matches!(
            framing(&[("content-length", "5, 6")]),
            Err(FramingError::Invalid(_))
        ));
        assert!(matches!(
            request_framing(
                Version::HTTP_10,
                Present::ANY,
                &mut headers(&[("transfer-encoding", "chunked")])
            ),
            Err(FramingError::Invalid(_))
        ));
        let mut repeated = headers(&[("content-length", "5"), ("content-length", "5")]);
        assert_eq!(
            request_framing(Version::HTTP_11, Present::ANY, &mut repeated),
            Ok(Framing::Length(5))
        );
        assert_eq!(repeated.get_all("content-length").iter().count(), 1);
    }

    #[test]
    fn response_heads_parse_and_frame() {
        let (parsed, buf) =
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello");
        let mut parsed = parsed.unwrap().unwrap();
        assert_eq!(parsed.status, 200);
        assert_eq!(parsed.headers["x-a"], "1");
        assert_eq!(&buf[..], b"hello");
        assert_eq!(
            response_framing(&Method::GET, &mut parsed).unwrap(),
            Framing::Length(5)
        );
        assert_eq!(
            response_framing(&Method::HEAD, &mut parsed).unwrap(),
            Framing::Empty
        );
        assert!(keeps_alive(parsed.version, parsed.present, &parsed.headers));

        assert!(
            response(b"HTTP/1.1 200 OK\r\nContent-Le")
                .0
                .unwrap()
                .is_none()
        );
        assert!(response(b"HTTP/1.1 2x0 OK\r\n\r\n").0.is_err());

        let mut chunked =
            head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &mut chunked).unwrap(),
            Framing::Chunked(ChunkState::Size)
        );
        for coded in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        ] {
            assert!(response_framing(&Method::GET, &mut head(coded)).is_err());
        }
        let mut none = head(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &mut none).unwrap(),
            Framing::UntilClose
        );
        let mut no_content = head(b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &mut no_content).unwrap(),
            Framing::Empty
        );
        let mut same = head(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &mut same).unwrap(),
            Framing::Length(3)
        );
        let mut conflict =
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n");
        assert!(response_framing(&Method::GET, &mut conflict).is_err());
        let mut bad = head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n");
        assert!(response_framing(&Method::GET, &mut bad).is_err());
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let alive = |raw: &[u8]| {
            let head = head(raw);
            keeps_alive(head.version, head.present, &head.headers)
        };
        assert!(!alive(
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\n\r\n"
        ));
        assert!(!alive(b"HTTP/1.0 200 OK\r\n\r\n"));
        assert!(alive(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"));
        assert!(alive(b"HTTP/1.1 200 OK\r\n\r\n"));
    }

    #[test]
    fn recycled_maps_come_back_empty_with_their_room() {
        let mut map = HeaderMap::with_capacity(32);
        map.insert(CONTENT_LENGTH, HeaderValue::from_static("1"));
        let capacity = map.capacity();
        recycle_map(map);
        let reused = spare_map();
        assert!(reused.is_empty());
        assert_eq!(reused.capacity(), capacity);
        recycle_map(HeaderMap::with_capacity(4 * SPARE_MAP_CAPACITY));
        assert_eq!(spare_map().capacity(), 0, "oversized maps are not kept");
    }

    #[test]
    fn lengths_and_codings() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&mut h).unwrap(), None);
        h.append(CONTENT_LENGTH, HeaderValue::from_static("3, 3"));
        h.append(CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert_eq!(content_length(&mut h).unwrap(), Some(3));
        let folded: Vec<_> = h.get_all(CONTENT_LENGTH).iter().collect();
        assert_eq!(folded, ["3"], "agreeing values are folded into one");
        h.append(CONTENT_LENGTH, HeaderValue::from_static("4"));
        assert!(content_length(&mut h).is_err());
        let mut bad = HeaderMap::new();
        bad.append(CONTENT_LENGTH, HeaderValue::from_static("-1"));
        assert!(content_length(&mut bad).is_err());
        let mut te = HeaderMap::new();
        assert_eq!(transfer_encoding(&te), None);
        te.append(TRANSFER_ENCODING, HeaderValue::from_static(" Chunked"));
        assert_eq!(transfer_encoding(&te), Some(true));
        let mut gzip = HeaderMap::new();
        gzip.append(TRANSFER_ENCODING, HeaderValue::from_static("gzip, chunked"));
        assert_eq!(transfer_encoding(&gzip), Some(false));
        te.append(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(transfer_encoding(&te), Some(false), "chunked twice");
    }

    #[test]
    fn dates_are_http_dates() {
        let date = http_date();
        let text = std::str::from_utf8(&date).unwrap();
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }
}
