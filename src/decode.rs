//! Whole messages decoded from bytes by the proxy's own HTTP/1 code, with no I/O: the entry
//! points of the fuzz targets (`fuzz/`) and of the differential test against hyper
//! (`tests/differential.rs`). A request goes through exactly what a client connection does
//! before forwarding (`http1::head`, `proxy::h1::check_head`, `http1::body`).

use bytes::BytesMut;
use http::{HeaderMap, Method};

use crate::http1::body::{Decoded, decode_chunked};
use crate::http1::head::{ChunkState, Framing};
use crate::http1::head::{parse_request_head, parse_response_head, response_framing};
use crate::proxy::h1::check_head;

/// A message the proxy accepts, as it would forward it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The method (requests) or status code (responses), as text.
    pub start: String,
    /// The request target (empty for responses).
    pub target: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// Header fields in the order the map keeps them (names lowercase).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
    /// Bytes of the input the message took; the rest would be the next message.
    pub consumed: usize,
}

/// What the proxy makes of some bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted(Message),
    /// Refused with this status (a request) or as malformed (a response: 502).
    Refused(u16),
    /// The bytes end before the message does (a body delimited by the close ends with them).
    Incomplete,
}

fn fields(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

/// Why a body could not be read whole.
enum Unread {
    Refused(u16),
    Incomplete,
}

impl From<Unread> for Outcome {
    fn from(unread: Unread) -> Outcome {
        match unread {
            Unread::Refused(status) => Outcome::Refused(status),
            Unread::Incomplete => Outcome::Incomplete,
        }
    }
}

/// Reads a body delimited by `framing` from `buf`: its bytes and trailers.
#[allow(clippy::type_complexity)]
fn read_body(
    framing: Framing,
    buf: &mut BytesMut,
    refused: u16,
) -> Result<(Vec<u8>, Vec<(String, Vec<u8>)>), Unread> {
    match framing {
        Framing::Empty => Ok((Vec::new(), Vec::new())),
        Framing::Length(length) => {
            if (buf.len() as u64) < length {
                return Err(Unread::Incomplete);
            }
            Ok((buf.split_to(length as usize).to_vec(), Vec::new()))
        }
        Framing::UntilClose => Ok((buf.split().to_vec(), Vec::new())),
        Framing::Chunked(_) => {
            let mut state = ChunkState::Size;
            let mut body = Vec::new();
            loop {
                match decode_chunked(&mut state, buf) {
                    Ok(Decoded::Data(data)) => body.extend_from_slice(&data),
                    Ok(Decoded::Trailers(trailers)) => return Ok((body, fields(&trailers))),
                    Ok(Decoded::End) => return Ok((body, Vec::new())),
                    Ok(Decoded::NeedMore) => return Err(Unread::Incomplete),
                    Err(_) => return Err(Unread::Refused(refused)),
                }
            }
        }
    }
}

/// The first request in `bytes`, as a client connection would take it.
pub fn request(bytes: &[u8]) -> Outcome {
    let mut buf = BytesMut::from(bytes);
    let mut head = match parse_request_head(&mut buf) {
        Ok(Some(head)) => head,
        Ok(None) => return Outcome::Incomplete,
        Err(error) => return Outcome::Refused(error.status().as_u16()),
    };
    let checked = match check_head(&mut head) {
        Ok(checked) => checked,
        Err(status) => return Outcome::Refused(status.as_u16()),
    };
    let (body, trailers) = match read_body(checked.framing, &mut buf, 400) {
        Ok(read) => read,
        Err(unread) => return unread.into(),
    };
    Outcome::Accepted(Message {
        start: head.method.to_string(),
        target: head.uri.to_string(),
        version: format!("{:?}", head.version),
        headers: fields(&head.headers),
        body,
        trailers,
        consumed: bytes.len() - buf.len(),
    })
}

/// The first response in `bytes` to a request with `method`, as an upstream exchange would
/// take it (1xx interim responses other than 101 skipped).
pub fn response(bytes: &[u8], method: &Method) -> Outcome {
    let mut buf = BytesMut::from(bytes);
    loop {
        let mut head = match parse_response_head(&mut buf) {
            Ok(Some(head)) => head,
            Ok(None) => return Outcome::Incomplete,
            Err(_) => return Outcome::Refused(502),
        };
        if head.status.is_informational() && head.status != http::StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        let framing = match response_framing(method, &mut head) {
            Ok(framing) => framing,
            Err(_) => return Outcome::Refused(502),
        };
        let (body, trailers) = match read_body(framing, &mut buf, 502) {
            Ok(read) => read,
            Err(unread) => return unread.into(),
        };
        return Outcome::Accepted(Message {
            start: head.status.as_str().to_owned(),
            target: String::new(),
            version: format!("{:?}", head.version),
            headers: fields(&head.headers),
            body,
            trailers,
            consumed: bytes.len() - buf.len(),
        });
    }
}

/// Whether the proxy drops a trailer field of this name (RFC 9110 §6.5.1); a name that is not a
/// valid field name is dropped too.
pub fn is_forbidden_trailer(name: &str) -> bool {
    http::HeaderName::from_bytes(name.as_bytes())
        .map_or(true, |name| crate::http1::body::is_forbidden_trailer(&name))
}

/// A chunked body at the start of `bytes`: its data and trailers, or why not.
pub fn chunked(bytes: &[u8]) -> Outcome {
    let mut buf = BytesMut::from(bytes);
    match read_body(Framing::Chunked(ChunkState::Size), &mut buf, 400) {
        Ok((body, trailers)) => Outcome::Accepted(Message {
            start: String::new(),
            target: String::new(),
            version: String::new(),
            headers: Vec::new(),
            body,
            trailers,
            consumed: bytes.len() - buf.len(),
        }),
        Err(unread) => unread.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_as_a_connection_takes_them() {
        let bytes = b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let Outcome::Accepted(message) = request(bytes) else {
            panic!("accepted");
        };
        assert_eq!(message.start, "POST");
        assert_eq!(message.target, "/p?q=1");
        assert_eq!(message.body, b"abc");
        assert_eq!(message.trailers, [("x-t".to_owned(), b"1".to_vec())]);
        assert_eq!(message.consumed, bytes.len() - "NEXT".len());
        assert_eq!(
            request(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Outcome::Refused(400)
        );
        assert_eq!(
            request(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Outcome::Incomplete
        );
        assert_eq!(
            request(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
            Outcome::Refused(405)
        );
        // Expectations: 100-continue (any case) and an empty list pass, others are 417.
        for (expect, outcome) in [
            ("100-Continue", true),
            ("", true),
            (" ", true),
            ("x", false),
        ] {
            let bytes = format!(
                "POST / HTTP/1.1\r\nHost: a\r\nExpect: {expect}\r\nContent-Length: 1\r\n\r\nx"
            );
            let decoded = request(bytes.as_bytes());
            assert_eq!(
                matches!(decoded, Outcome::Accepted(_)),
                outcome,
                "{expect:?}: {decoded:?}"
            );
            if !outcome {
                assert_eq!(decoded, Outcome::Refused(417));
            }
        }
    }

    #[test]
    fn responses_and_chunked_bodies_decode() {
        let Outcome::Accepted(message) = response(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            &Method::GET,
        ) else {
            panic!("accepted");
        };
        assert_eq!(
            (message.start.as_str(), &message.body[..]),
            ("200", &b"ok"[..])
        );
        assert_eq!(
            response(b"HTTP/1.1 2x0 OK\r\n\r\n", &Method::GET),
            Outcome::Refused(502)
        );
        assert_eq!(chunked(b"5\nhello\r\n0\r\n\r\n"), Outcome::Refused(400));
    }
}
