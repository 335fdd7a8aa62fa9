//! HTTP/1.1 message framing shared by both sides of the proxy (client connections it serves
//! itself, upstream connections): heads parsed into `HeaderMap`s whose values share the read
//! buffer, how a body is delimited, and reading a body (by length, chunked, or until close)
//! from a buffered stream.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncRead;

/// Most header fields in a head or trailer section (hyper's default limit too).
pub const MAX_HEADERS: usize = 100;
/// Longest head, chunk-size line or trailer section accepted.
pub const MAX_HEAD_LEN: usize = 64 * 1024;
/// Free space made in a read buffer before each read.
pub const READ_CHUNK: usize = 8 * 1024;
/// Most free space made for a body of known length before a read.
const MAX_READ: usize = 64 * 1024;

/// What is wrong with a message as it arrives.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("the connection closed before the message was complete")]
    Closed,
    #[error("reading failed")]
    Read(#[source] io::Error),
    #[error("malformed head")]
    Head(#[source] httparse::Error),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// Reads what the peer has sent into `buf`; `Ok(0)` at end of stream.
pub fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Like [`poll_fill`], where the end of the stream is an error.
pub fn poll_fill_more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<Result<(), MessageError>> {
    match ready!(poll_fill(io, buf, cx)) {
        Ok(0) => Poll::Ready(Err(MessageError::Closed)),
        Ok(_) => Poll::Ready(Ok(())),
        Err(error) => Poll::Ready(Err(MessageError::Read(error))),
    }
}

/// Header names of a head being parsed, with where each value lies in the head; kept with a
/// connection for its capacity, so that parsing neither allocates nor zeroes a slot array.
#[derive(Debug, Default)]
pub struct HeadFields(Vec<(HeaderName, usize, usize)>);

impl HeadFields {
    /// Records the fields httparse found in `buf` (names checked now, values located).
    pub fn collect(
        &mut self,
        buf: &[u8],
        fields: &[httparse::Header<'_>],
    ) -> Result<(), MessageError> {
        let base = buf.as_ptr() as usize;
        self.0.clear();
        for field in fields {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| MessageError::Malformed("invalid header name"))?;
            let start = field.value.as_ptr() as usize - base;
            self.0.push((name, start, start + field.value.len()));
        }
        Ok(())
    }

    /// The header map, its values slices of `head` (the same bytes `collect` saw, frozen).
    pub fn take_map(&mut self, head: &Bytes) -> Result<HeaderMap, MessageError> {
        // Room for the headers the proxy adds (X-Forwarded-*, request id, backend name), so
        // that adding them does not grow (rehash) the map.
        let mut headers = spare_map();
        headers.reserve(self.0.len() + 8);
        for (name, start, end) in self.0.drain(..) {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                .map_err(|_| MessageError::Malformed("invalid header value"))?;
            headers.append(name, value);
        }
        Ok(headers)
    }
}

thread_local! {
    /// Emptied header maps of messages already sent, kept for their allocation (as hyper's
    /// server keeps one per connection): each request and response head needs a map.
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
pub fn content_length(headers: &mut HeaderMap) -> Result<Option<u64>, MessageError> {
    let mut length = None;
    let mut parts = 0;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let parsed = parse_decimal(part.trim_ascii())
                .ok_or(MessageError::Malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(MessageError::Malformed("conflicting Content-Length values"));
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

/// Appends one header field line, `name: value\r\n`, to a head being written.
pub fn put_field(buf: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    buf.extend_from_slice(name.as_str().as_bytes());
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// The next piece of a body read from `io` through `buf`; `None` at its end (after which
/// `framing` is at its end too). Bytes past the body stay in `buf`.
pub fn poll_body<R: AsyncRead + Unpin>(
    framing: &mut Framing,
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, MessageError>>> {
    loop {
        match framing {
            Framing::Empty | Framing::Length(0) => return Poll::Ready(None),
            Framing::Length(remaining) => {
                if buf.is_empty() {
                    // Room for the rest of the body (up to a bound): fewer, larger reads.
                    let want = (*remaining).min(MAX_READ as u64) as usize;
                    if buf.capacity() < want {
                        buf.reserve(want);
                    }
                    ready!(poll_fill_more(io, buf, cx))?;
                }
                let take = (*remaining).min(buf.len() as u64);
                *remaining -= take;
                let data = buf.split_to(take as usize).freeze();
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Framing::UntilClose => {
                if buf.is_empty() {
                    match ready!(poll_fill(io, buf, cx)) {
                        Ok(0) => {
                            *framing = Framing::Empty;
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(error) => return Poll::Ready(Some(Err(MessageError::Read(error)))),
                    }
                }
                return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
            }
            Framing::Chunked(state) => match decode_chunked(state, buf)? {
                Decoded::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Decoded::Trailers(trailers) => {
                    *framing = Framing::Empty;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Decoded::End => {
                    *framing = Framing::Empty;
                    return Poll::Ready(None);
                }
                Decoded::NeedMore => ready!(poll_fill_more(io, buf, cx))?,
            },
        }
    }
}

pub fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// What a step of the chunked decoder produced.
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    NeedMore,
}

/// Decodes as much of a chunked body as `buf` holds, up to the next piece of output.
pub fn decode_chunked(state: &mut ChunkState, buf: &mut BytesMut) -> Result<Decoded, MessageError> {
    loop {
        match *state {
            ChunkState::Size => {
                let Some(line_end) = memchr::memchr(b'\n', buf) else {
                    return too_long(buf.len()).map(|()| Decoded::NeedMore);
                };
                let line = buf[..line_end]
                    .strip_suffix(b"\r")
                    .unwrap_or(&buf[..line_end]);
                let digits = line
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or(b"")
                    .trim_ascii();
                let size =
                    parse_hex(digits).ok_or(MessageError::Malformed("invalid chunk size"))?;
                buf.advance(line_end + 1);
                *state = if size == 0 {
                    ChunkState::Trailers
                } else {
                    ChunkState::Data(size)
                };
            }
            ChunkState::Data(remaining) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let take = remaining.min(buf.len() as u64);
                *state = if take == remaining {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(remaining - take)
                };
                return Ok(Decoded::Data(buf.split_to(take as usize).freeze()));
            }
            ChunkState::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(MessageError::Malformed("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *state = ChunkState::Size;
            }
            ChunkState::Trailers => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    return Ok(Decoded::End);
                }
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                return match httparse::parse_headers(buf, &mut slots) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = HeaderMap::with_capacity(fields.len());
                        for field in fields {
                            let name = HeaderName::from_bytes(field.name.as_bytes());
                            let value = HeaderValue::from_bytes(field.value);
                            if let (Ok(name), Ok(value)) = (name, value) {
                                trailers.append(name, value);
                            }
                        }
                        buf.advance(len);
                        Ok(Decoded::Trailers(trailers))
                    }
                    Ok(httparse::Status::Partial) => {
                        too_long(buf.len()).map(|()| Decoded::NeedMore)
                    }
                    Err(error) => Err(MessageError::Head(error)),
                };
            }
        }
    }
}

fn too_long(buffered: usize) -> Result<(), MessageError> {
    if buffered > MAX_HEAD_LEN {
        Err(MessageError::Malformed(
            "chunk-size line or trailers too long",
        ))
    } else {
        Ok(())
    }
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let value = (d as char).to_digit(16)?;
        Some(n << 4 | u64::from(value))
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

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, usize), MessageError> {
        let mut buf = BytesMut::from(input);
        let mut state = ChunkState::Size;
        let mut out = Vec::new();
        loop {
            match decode_chunked(&mut state, &mut buf)? {
                Decoded::Data(data) => out.extend_from_slice(&data),
                Decoded::Trailers(trailers) => return Ok((out, Some(trailers), buf.len())),
                Decoded::End => return Ok((out, None, buf.len())),
                Decoded::NeedMore => return Err(MessageError::Closed),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode() {
        let (data, trailers, rest) =
            decode_all(b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\nNEXT").unwrap();
        assert_eq!(data, b"hello, world");
        assert!(trailers.is_none());
        assert_eq!(rest, 4, "bytes after the body stay in the buffer");
        let (data, trailers, _) = decode_all(b"A\r\n0123456789\r\n0\r\nx-sum: 45\r\n\r\n").unwrap();
        assert_eq!(data, b"0123456789");
        assert_eq!(trailers.unwrap()["x-sum"], "45");
    }

    #[test]
    fn chunked_decoding_waits_for_more_at_every_boundary() {
        let input = b"5\r\nhello\r\n0\r\n\r\n";
        for cut in 0..input.len() {
            let mut buf = BytesMut::from(&input[..cut]);
            let mut state = ChunkState::Size;
            let mut out = Vec::new();
            let mut ended = false;
            loop {
                match decode_chunked(&mut state, &mut buf).unwrap() {
                    Decoded::Data(data) => out.extend_from_slice(&data),
                    Decoded::End | Decoded::Trailers(_) => {
                        ended = true;
                        break;
                    }
                    Decoded::NeedMore => break,
                }
            }
            buf.extend_from_slice(&input[cut..]);
            while !ended {
                match decode_chunked(&mut state, &mut buf).unwrap() {
                    Decoded::Data(data) => out.extend_from_slice(&data),
                    Decoded::End | Decoded::Trailers(_) => ended = true,
                    Decoded::NeedMore => panic!("stuck after cut {cut}"),
                }
            }
            assert_eq!(out, b"hello", "cut at {cut}");
        }
    }

    #[test]
    fn mangled_chunked_bodies_never_panic() {
        let valid = b"5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nx-t: 1\r\n\r\n";
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut bytes = valid.to_vec();
            for _ in 0..1 + next() % 3 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let mut chunk = ChunkState::Size;
            for _ in 0..64 {
                match decode_chunked(&mut chunk, &mut buf) {
                    Ok(Decoded::Data(_)) => {}
                    Ok(_) | Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn bad_chunks_are_errors() {
        assert!(decode_all(b"zz\r\nhello\r\n0\r\n\r\n").is_err());
        assert!(decode_all(b"5\r\nhelloXX0\r\n\r\n").is_err());
        assert!(decode_all(b"ffffffffffffffffff\r\n").is_err());
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
}
