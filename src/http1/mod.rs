//! HTTP/1.0 and HTTP/1.1, both sides of the proxy, on httparse: the one implementation of
//! the protocol (as Pingora's `protocols::http::v1`), which knows nothing of routing or of
//! what is done with a message.
//!
//! - `head`: request and response heads, the limits below, how a body is delimited (RFC 9112
//!   §6: `Framing`), keep-alive rules.
//! - `body`: reading a body by length, chunked or until close; the chunked decoder; trailer
//!   filtering; encoding request bodies.
//! - `server`: a client connection as a session (read request head and body, write response
//!   head and body, `100 Continue`, refusals that close, the socket after a protocol switch).
//!
//! The upstream side of an exchange (`crate::upstream`) uses `head` and `body`.
//!
//! # Limits, the same on every path and both directions
//! A request line over [`MAX_LINE_LEN`] is refused with 414; a header field line over
//! [`MAX_LINE_LEN`], a head over [`MAX_HEAD_LEN`] or more than [`MAX_HEADERS`] fields with 431
//! (a response from an upstream that breaks them is a 502). Chunk-size lines have the line
//! limit, trailer sections the head limits. Every refusal closes the connection.

pub mod body;
pub mod head;
pub mod server;

/// Longest request line, header field line or chunk-size line.
pub const MAX_LINE_LEN: usize = 8 * 1024;
/// Longest head (request line or status line and all header fields) or trailer section.
pub const MAX_HEAD_LEN: usize = 64 * 1024;
/// Most header fields in a head or trailer section (hyper's default limit too).
pub const MAX_HEADERS: usize = 100;
