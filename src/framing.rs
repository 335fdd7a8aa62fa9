//! Detection of HTTP/1.x requests with ambiguous message framing.
//!
//! A request that carries both `Content-Length` and `Transfer-Encoding` is
//! the classic request-smuggling vector: the proxy and the upstream may
//! disagree about where the body ends, so bytes the proxy treats as body can
//! become a second request at the upstream. RFC 9112 §6.1 and §6.3 say a
//! server ought to treat such a message as an error, and nginx answers it with
//! 400, which is what this proxy must do too, without sending anything
//! upstream. hyper 1.12's server parser does not reject it: it silently drops
//! `Content-Length`, decodes the body as chunked, calls the service and only
//! closes the connection afterwards (`hyper/src/proto/h1/role.rs`,
//! `Server::parse`). The request the handler gets looks like an ordinary
//! chunked request, so the handler cannot tell. We therefore watch the raw
//! bytes: [`FramingGuard`] wraps each accepted connection before it is handed
//! to hyper, follows HTTP/1 message framing exactly as hyper does (so it finds
//! every request head on a keep-alive connection and never mistakes body bytes
//! for a head), and raises the shared [`AmbiguousFraming`] flag when a head has
//! both headers. hyper can only parse bytes after they went through the
//! wrapper, so when the handler sees the offending request the flag is
//! already set.
//!
//! Typical use in the accept loop:
//!
//! ```ignore
//! let (io, framing) = FramingGuard::new(tcp_stream);
//! // service: if framing.detected() { return 400 without contacting the upstream }
//! builder.serve_connection(TokioIo::new(io), service).await;
//! ```
//!
//! The flag covers the whole connection. If a client pipelines requests and a
//! later one in the same read is ambiguous, earlier requests on that connection
//! that have not been answered yet also see the flag and get 400. Only a
//! hostile or broken client sends such a request, and hyper closes the
//! connection after it anyway, so we accept rejecting too much here.
//!
//! The tracker is only as exact as its model of hyper's parser. It assumes the
//! server's HTTP/1 settings stay within hyper's defaults for
//! `max_headers` ([`MAX_HEADERS`]) and `max_buf_size` ([`MAX_HEAD_LEN`]). With
//! larger limits hyper would accept heads that this module gives up on.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most header fields a request head may have before we stop tracking.
///
/// The same as hyper's `DEFAULT_MAX_HEADERS`: a head with more fields is
/// rejected by hyper with 400 before any handler runs, so nothing can slip
/// past us. The server must not raise hyper's `max_headers` above this.
pub const MAX_HEADERS: usize = 100;

/// Largest request head we buffer before we stop tracking.
///
/// This is hyper's default `max_buf_size` (`8192 + 4096 * 100`). hyper's
/// limit counts all buffered bytes, so it rejects any head that still has no
/// end after this many bytes. A smaller limit here (e.g. 64 KiB) would let a
/// client pad an ambiguous head past our limit while hyper still accepts it.
/// The server must not raise hyper's `max_buf_size` above this.
pub const MAX_HEAD_LEN: usize = 8192 + 4096 * 100;

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4).
///
/// hyper-util's auto server hands such a connection to the HTTP/2 server. HTTP/2
/// frames its messages itself, so there is nothing for us to track.
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// Above this size a head buffer is released rather than kept for reuse, so
/// that one large head does not pin memory for the rest of the connection.
const KEEP_HEAD_BUF_CAPACITY: usize = 8 * 1024;

/// Read-only handle to the "ambiguous framing seen" flag of one connection.
///
/// The request handler calls [`detected`](Self::detected) before it forwards a
/// request and answers 400 if it returns `true`.
#[derive(Clone, Debug)]
pub struct AmbiguousFraming(Arc<AtomicBool>);

impl AmbiguousFraming {
    /// Whether a request head on this connection had both `Content-Length`
    /// and `Transfer-Encoding`.
    ///
    /// The flag is set while the head's last byte is read from the socket.
    /// hyper parses the head only after that read returned, so once the handler
    /// runs for that request the flag is already visible.
    pub fn detected(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Transparent IO wrapper that watches the bytes a client sends for request
/// heads with ambiguous framing.
///
/// Reads and writes are passed on unchanged. The wrapper only looks at the
/// bytes the inner reader filled in, and costs one `httparse` parse per
/// request head plus a scan of chunked framing lines. A head is copied only
/// when it is split across reads.
///
/// It must see the plaintext bytes hyper parses: on a TLS listener it wraps
/// the TLS stream, not the TCP socket. The IO traits are implemented for
/// `S: Unpin` (as `TcpStream` and tokio-rustls streams are), which keeps the
/// wrapper free of pin projection and `unsafe`.
#[derive(Debug)]
pub struct FramingGuard<S> {
    inner: S,
    tracker: Tracker,
    flag: Arc<AtomicBool>,
}

impl<S> FramingGuard<S> {
    /// Wraps an accepted connection. Returns the wrapper and the handle the
    /// request handler uses to check the connection.
    pub fn new(inner: S) -> (Self, AmbiguousFraming) {
        let flag = Arc::new(AtomicBool::new(false));
        let guard = FramingGuard {
            inner,
            tracker: Tracker::new(),
            flag: Arc::clone(&flag),
        };
        (guard, AmbiguousFraming(flag))
    }

    /// The wrapped connection, e.g. for `peer_addr`.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the connection. Later reads are no longer watched.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The caller may pass a buffer that already holds data. Only the part
        // the inner reader fills in now comes from the client.
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            // An empty slice means EOF (or a misbehaving reader that shrank
            // `filled`); either way there is nothing new to look at.
            if let Some(new) = buf.filled().get(before..)
                && !new.is_empty()
                && this.tracker.observe(new)
            {
                this.flag.store(true, Ordering::Release);
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Where the tracker is in the client's byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between messages. Skips the empty lines that httparse (and so hyper)
    /// allows before a request line.
    HeadStart,
    /// Inside a request head. Bytes of a head split across reads are kept in
    /// `Tracker::head_buf`.
    Head,
    /// Inside a `Content-Length` body with this many bytes left.
    Length(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Tracking stopped: HTTP/2, input hyper rejects itself, or the flag was
    /// already raised. Bytes are only passed on.
    PassThrough,
}

/// Position inside a chunked body. This mirrors `ChunkedState` in hyper's
/// `proto/h1/decode.rs` byte for byte, because any input the two read
/// differently is a way to hide a head from us. Where hyper fails the body
/// (and closes the connection) we stop tracking. hyper's limits on extension
/// and trailer size are not copied: past them hyper closes the connection,
/// so what we do afterwards does not matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Expecting the first hex digit of a chunk size.
    Start,
    /// In the hex chunk size (value so far).
    Size(u64),
    /// In whitespace after the chunk size.
    SizeLws(u64),
    /// In a chunk extension, which runs to the next CR.
    Extension(u64),
    /// Expecting the LF that ends the chunk-size line.
    SizeLf(u64),
    /// In chunk data with this many bytes left.
    Data(u64),
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// In a trailer field line, which runs to the next CR.
    Trailer,
    /// Expecting the LF that ends a trailer field line.
    TrailerLf,
    /// After the last chunk or a trailer line: CR starts the final CRLF,
    /// anything else starts a trailer line.
    EndCr,
    /// Expecting the LF that ends the message.
    EndLf,
}

/// Body framing a request head announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body, the next head follows.
    None,
    Length(u64),
    Chunked,
    /// Both `Content-Length` and `Transfer-Encoding`.
    Ambiguous,
    /// hyper rejects the head, so there is nothing left to protect.
    Rejected,
}

/// Result of parsing a (possibly incomplete) head.
enum Parsed {
    /// Head length in bytes, including leading empty lines.
    Complete(usize, Framing),
    Partial,
    /// hyper rejects this too, or it is not HTTP/1 at all.
    Invalid,
}

/// Follows HTTP/1 framing over a connection's inbound bytes.
#[derive(Debug)]
struct Tracker {
    state: State,
    /// Start of a head that did not fit in one read. Empty otherwise, which
    /// lets the common one-read head be parsed straight from the read buffer.
    head_buf: Vec<u8>,
    /// True until the first head is complete. Only a connection's first bytes
    /// can be the HTTP/2 preface.
    first_head: bool,
}

impl Tracker {
    fn new() -> Self {
        Tracker {
            state: State::HeadStart,
            head_buf: Vec::new(),
            first_head: true,
        }
    }

    /// Feeds the next bytes read from the client. Returns `true` when they
    /// complete a head with ambiguous framing. Tracking stops after that.
    fn observe(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            data = match self.state {
                State::PassThrough => return false,
                State::HeadStart => {
                    match data.iter().position(|&b| b != b'\r' && b != b'\n') {
                        // httparse would reject a lone CR here; we skip it,
                        // which only differs on input hyper rejects anyway.
                        Some(start) => {
                            self.state = State::Head;
                            &data[start..]
                        }
                        None => return false,
                    }
                }
                State::Head => match self.head(data) {
                    None => return false,
                    Some((framing, rest)) => {
                        self.first_head = false;
                        self.state = match framing {
                            Framing::None | Framing::Length(0) => State::HeadStart,
                            Framing::Length(n) => State::Length(n),
                            Framing::Chunked => State::Chunked(Chunk::Start),
                            Framing::Ambiguous => {
                                self.stop();
                                return true;
                            }
                            Framing::Rejected => {
                                self.stop();
                                return false;
                            }
                        };
                        rest
                    }
                },
                State::Length(left) => {
                    let take = usize::try_from(left).map_or(data.len(), |l| l.min(data.len()));
                    // `take` <= `left`, so this cannot underflow.
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::HeadStart
                    } else {
                        State::Length(left)
                    };
                    &data[take..]
                }
                State::Chunked(chunk) => self.chunked(chunk, data),
            };
        }
        false
    }

    /// Stops tracking for the rest of the connection.
    fn stop(&mut self) {
        self.state = State::PassThrough;
        self.head_buf = Vec::new();
    }

    /// Consumes head bytes. Returns the head's framing and the bytes after
    /// the head once it is complete, `None` while it is incomplete.
    ///
    /// A head that is whole in `data` (the usual case) is parsed in place.
    /// Otherwise the bytes are collected in `head_buf`, and parsing is tried
    /// again only when new bytes contain a blank line. Parsing on every read
    /// would cost quadratic time for a head sent one byte at a time.
    fn head<'d>(&mut self, data: &'d [u8]) -> Option<(Framing, &'d [u8])> {
        let give_up = Some((Framing::Rejected, &data[data.len()..]));
        if self.head_buf.is_empty() {
            match parse_head(data, self.first_head) {
                Parsed::Complete(len, framing) => return Some((framing, &data[len..])),
                Parsed::Invalid => return give_up,
                Parsed::Partial if data.len() >= MAX_HEAD_LEN => return give_up,
                Parsed::Partial => {
                    self.head_buf.extend_from_slice(data);
                    return None;
                }
            }
        }

        // Bytes of the head that came from earlier reads.
        let base = self.head_buf.len();
        let mut rest = data;
        while let Some(end) = find_blank_line_end(&self.head_buf, rest) {
            self.head_buf.extend_from_slice(&rest[..end]);
            rest = &rest[end..];
            match parse_head(&self.head_buf, self.first_head) {
                Parsed::Complete(len, framing) => {
                    self.release_head_buf();
                    // The head holds all of the earlier bytes (they were
                    // incomplete), so it ends inside `data`.
                    return match len.checked_sub(base).and_then(|n| data.get(n..)) {
                        Some(after) => Some((framing, after)),
                        None => give_up,
                    };
                }
                Parsed::Invalid => return give_up,
                // Cannot happen after a blank line past the request line,
                // but staying in `Head` is the safe reading if it does.
                Parsed::Partial => {}
            }
            if self.head_buf.len() >= MAX_HEAD_LEN {
                return give_up;
            }
        }
        if self.head_buf.len() + rest.len() >= MAX_HEAD_LEN {
            return give_up;
        }
        self.head_buf.extend_from_slice(rest);
        None
    }

    /// Empties `head_buf` after a complete head.
    fn release_head_buf(&mut self) {
        if self.head_buf.capacity() > KEEP_HEAD_BUF_CAPACITY {
            self.head_buf = Vec::new();
        } else {
            self.head_buf.clear();
        }
    }

    /// Consumes chunked body bytes, updating `self.state`. Returns the bytes
    /// after the body once it ended, or an empty slice.
    fn chunked<'d>(&mut self, mut chunk: Chunk, data: &'d [u8]) -> &'d [u8] {
        let mut pos = 0;
        while let Some(&byte) = data.get(pos) {
            // Most states take one byte. Data, extensions and trailer lines
            // are skipped in bulk.
            let mut used = 1;
            chunk = match chunk {
                Chunk::Data(left) => {
                    let avail = data.len() - pos;
                    used = usize::try_from(left).map_or(avail, |l| l.min(avail));
                    let left = left - used as u64;
                    if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    }
                }
                Chunk::Extension(size) => match memchr::memchr2(b'\r', b'\n', &data[pos..]) {
                    None => {
                        used = data.len() - pos;
                        Chunk::Extension(size)
                    }
                    // hyper rejects a bare LF in an extension.
                    Some(i) if data[pos + i] == b'\n' => return self.chunk_error(),
                    Some(i) => {
                        used = i + 1;
                        Chunk::SizeLf(size)
                    }
                },
                Chunk::Trailer => match memchr::memchr(b'\r', &data[pos..]) {
                    None => {
                        used = data.len() - pos;
                        Chunk::Trailer
                    }
                    Some(i) => {
                        used = i + 1;
                        Chunk::TrailerLf
                    }
                },
                Chunk::Start => match hex_digit(byte) {
                    Some(digit) => Chunk::Size(digit),
                    None => return self.chunk_error(),
                },
                Chunk::Size(size) => match byte {
                    b'\t' | b' ' => Chunk::SizeLws(size),
                    b';' => Chunk::Extension(size),
                    b'\r' => Chunk::SizeLf(size),
                    _ => match hex_digit(byte)
                        .and_then(|d| size.checked_mul(16).and_then(|s| s.checked_add(d)))
                    {
                        Some(size) => Chunk::Size(size),
                        None => return self.chunk_error(),
                    },
                },
                Chunk::SizeLws(size) => match byte {
                    b'\t' | b' ' => Chunk::SizeLws(size),
                    b';' => Chunk::Extension(size),
                    b'\r' => Chunk::SizeLf(size),
                    _ => return self.chunk_error(),
                },
                Chunk::SizeLf(size) => match (byte, size) {
                    (b'\n', 0) => Chunk::EndCr,
                    (b'\n', _) => Chunk::Data(size),
                    _ => return self.chunk_error(),
                },
                Chunk::DataCr if byte == b'\r' => Chunk::DataLf,
                Chunk::DataLf if byte == b'\n' => Chunk::Start,
                Chunk::TrailerLf if byte == b'\n' => Chunk::EndCr,
                Chunk::EndCr if byte == b'\r' => Chunk::EndLf,
                // Like hyper: any other byte is the first of a trailer line.
                Chunk::EndCr => Chunk::Trailer,
                Chunk::EndLf if byte == b'\n' => {
                    self.state = State::HeadStart;
                    return &data[pos + 1..];
                }
                Chunk::DataCr | Chunk::DataLf | Chunk::TrailerLf | Chunk::EndLf => {
                    return self.chunk_error();
                }
            };
            pos += used;
        }
        self.state = State::Chunked(chunk);
        &data[data.len()..]
    }

    /// hyper fails the body on the same input and closes the connection, so
    /// no further request can follow: stop tracking.
    fn chunk_error(&mut self) -> &'static [u8] {
        self.stop();
        &[]
    }
}

/// Parses a request head the way hyper does and classifies its framing.
///
/// The parser settings are the lenient ends of the options hyper's server
/// exposes (`allow_multiple_spaces_in_request_line_delimiters`,
/// `ignore_invalid_headers`). Where hyper is stricter it rejects the request
/// itself, so we match hyper for every setting of those options.
fn parse_head(bytes: &[u8], first_head: bool) -> Parsed {
    if first_head && bytes.starts_with(H2_PREFACE_START) {
        return Parsed::Invalid;
    }
    let mut config = httparse::ParserConfig::default();
    config
        .allow_multiple_spaces_in_request_line_delimiters(true)
        .ignore_invalid_headers_in_requests(true);
    // Uninitialised slots save zeroing 3 KiB for every head. httparse
    // returns only the slots it wrote.
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    match config.parse_request_with_uninit_headers(&mut request, bytes, &mut slots) {
        Ok(httparse::Status::Complete(len)) => Parsed::Complete(len, classify(request.headers)),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        // Including TooManyHeaders and a non-HTTP/1 version (the HTTP/2
        // preface): hyper answers 400 or hands the connection to HTTP/2.
        Err(_) => Parsed::Invalid,
    }
}

/// Works out the body framing of a parsed head the way hyper's
/// `Server::parse` does.
///
/// Requests that are CONNECT or carry `Upgrade` are tracked like any other:
/// hyper keeps serving the connection when the handler does not switch
/// protocols, so ignoring them would let the next request through unchecked.
/// After a real switch hyper calls no handler on the connection again, so
/// what we make of the tunnel bytes (usually invalid HTTP, so we stop) does
/// not matter.
fn classify(headers: &[httparse::Header<'_>]) -> Framing {
    let mut has_te = false;
    let mut has_cl = false;
    let mut length: Option<u64> = None;
    let mut length_valid = true;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            has_te = true;
        } else if header.name.eq_ignore_ascii_case("content-length") {
            has_cl = true;
            match (parse_decimal(header.value), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(previous)) if n == previous => {}
                // hyper rejects an invalid value or differing values.
                _ => length_valid = false,
            }
        }
    }
    if has_te && has_cl {
        Framing::Ambiguous
    } else if has_te {
        // hyper rejects a request whose final coding is not chunked, so
        // treating every Transfer-Encoding as chunked is good enough.
        Framing::Chunked
    } else if !length_valid {
        Framing::Rejected
    } else {
        length.map_or(Framing::None, Framing::Length)
    }
}

/// `Content-Length` value as hyper parses it: only ASCII digits, no sign, no
/// list, no overflow.
fn parse_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| {
        let digit = (b as char).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fn hex_digit(byte: u8) -> Option<u64> {
    (byte as char).to_digit(16).map(u64::from)
}

/// Finds the first blank line that ends in `new`, given the bytes `before`
/// that precede it. Returns the index in `new` just past it.
///
/// httparse accepts bare LF line endings, so a head ends at `\n\n` or `\n\r\n`
/// as well as `\r\n\r\n`. Looking only for `\r\n\r\n` would let a head ended
/// with bare LFs slip past us, so we check every LF.
fn find_blank_line_end(before: &[u8], new: &[u8]) -> Option<usize> {
    // Byte `back` positions before `new[i]`, reaching into `before`.
    let byte_before = |i: usize, back: usize| -> Option<u8> {
        match i.checked_sub(back) {
            Some(j) => new.get(j).copied(),
            None => {
                let j = before.len().checked_sub(back - i)?;
                before.get(j).copied()
            }
        }
    };
    memchr::memchr_iter(b'\n', new)
        .find(|&i| match byte_before(i, 1) {
            Some(b'\n') => true,
            Some(b'\r') => byte_before(i, 2) == Some(b'\n'),
            _ => false,
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::task::Waker;

    /// What the scripted reader does on one `poll_read`.
    enum Step {
        Data(Vec<u8>),
        Pending,
        Error,
    }

    /// A reader that plays a script, then reports EOF. Writes go to `written`.
    #[derive(Default)]
    struct Script {
        steps: VecDeque<Step>,
        written: Vec<u8>,
    }

    impl Script {
        fn from_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Self {
            Script {
                steps: chunks.into_iter().map(|c| Step::Data(c.to_vec())).collect(),
                written: Vec::new(),
            }
        }
    }

    impl AsyncRead for Script {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            match this.steps.pop_front() {
                None => Poll::Ready(Ok(())),
                Some(Step::Data(mut data)) => {
                    let n = data.len().min(buf.remaining());
                    buf.put_slice(&data[..n]);
                    if n < data.len() {
                        this.steps.push_front(Step::Data(data.split_off(n)));
                    }
                    Poll::Ready(Ok(()))
                }
                Some(Step::Pending) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Some(Step::Error) => Poll::Ready(Err(io::Error::other("scripted error"))),
            }
        }
    }

    impl AsyncWrite for Script {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Outcome of reading a whole script through a guard.
    struct Run {
        output: Vec<u8>,
        detected: bool,
        state: State,
    }

    /// Reads the script to EOF through a guard. `after_read` sees the number
    /// of bytes delivered so far and the flag after every successful read.
    fn drive(script: Script, mut after_read: impl FnMut(usize, bool)) -> Run {
        let (mut guard, framing) = FramingGuard::new(script);
        let mut cx = Context::from_waker(Waker::noop());
        let mut output = Vec::new();
        let mut storage = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut storage);
            match Pin::new(&mut guard).poll_read(&mut cx, &mut buf) {
                // A zero-length read is EOF for the caller; the script may
                // still go on, to check that EOF does not confuse the tracker.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    if guard.get_ref().steps.is_empty() {
                        break;
                    }
                }
                Poll::Ready(Ok(())) => {
                    output.extend_from_slice(buf.filled());
                    after_read(output.len(), framing.detected());
                }
                Poll::Ready(Err(_)) | Poll::Pending => {}
            }
        }
        Run {
            output,
            detected: framing.detected(),
            state: guard.tracker.state,
        }
    }

    fn run_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Run {
        drive(Script::from_chunks(chunks), |_, _| {})
    }

    /// Feeds `stream` whole, one byte per read, and split at every point,
    /// checking that each way gives `expected` and passes the bytes through.
    fn check_all_splits(stream: &[u8], expected: bool, end_state: State) {
        let mut runs = vec![("whole", run_chunks([stream]))];
        runs.push(("bytewise", run_chunks(stream.chunks(1))));
        for split in 0..=stream.len() {
            let (a, b) = stream.split_at(split);
            runs.push(("split", run_chunks([a, b])));
        }
        for (how, run) in runs {
            assert_eq!(run.output, stream, "{how}: bytes must pass unchanged");
            assert_eq!(run.detected, expected, "{how}: detection");
            if !expected {
                assert_eq!(run.state, end_state, "{how}: tracker state");
            }
        }
    }

    const SMUGGLE_CL_TE: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG";
    const SMUGGLE_TE_CL_MIXED: &[u8] = b"POST /a HTTP/1.1\r\nhost: x\r\ntRANSFER-eNCODING: chunked\r\ncontent-LENGTH: 4\r\n\r\n5c\r\nGPOST";
    const GET: &[u8] = b"GET /plain HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n";
    const CL_BODY: &[u8] = b"POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world";
    const CHUNKED_BODY: &[u8] = b"POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value;flag\r\nhello\r\nA \t;x\r\n0123456789\r\n0;last\r\nX-Trailer: one\r\nX-Other: two\r\n\r\n";
    /// Body bytes that look like an ambiguous head must not count.
    const FAKE_HEAD: &[u8] =
        b"GET /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn cl_request(body: &[u8]) -> Vec<u8> {
        let head = format!(
            "POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        concat(&[head.as_bytes(), body])
    }

    fn chunked_request(body: &[u8]) -> Vec<u8> {
        let size = format!("{:x}\r\n", body.len());
        concat(&[
            b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            size.as_bytes(),
            body,
            b"\r\n0\r\n\r\n",
        ])
    }

    #[test]
    fn both_headers_detected_in_either_order_and_case() {
        check_all_splits(SMUGGLE_CL_TE, true, State::PassThrough);
        check_all_splits(SMUGGLE_TE_CL_MIXED, true, State::PassThrough);
        let repeated = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\nTRANSFER-ENCODING: chunked\r\n\r\n";
        check_all_splits(repeated, true, State::PassThrough);
    }

    #[test]
    fn ordinary_requests_not_detected() {
        check_all_splits(GET, false, State::HeadStart);
        check_all_splits(CL_BODY, false, State::HeadStart);
        check_all_splits(CHUNKED_BODY, false, State::HeadStart);
        check_all_splits(b"GET / HTTP/1.0\r\n\r\n", false, State::HeadStart);
        check_all_splits(
            b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            false,
            State::HeadStart,
        );
    }

    #[test]
    fn third_request_on_keep_alive_connection_detected() {
        let stream = concat(&[CL_BODY, CHUNKED_BODY, SMUGGLE_CL_TE]);
        check_all_splits(&stream, true, State::PassThrough);

        // The flag must rise exactly when the third head is complete.
        let head_end = CL_BODY.len()
            + CHUNKED_BODY.len()
            + memchr::memmem::find(SMUGGLE_CL_TE, b"\r\n\r\n").map_or(0, |i| i + 4);
        let run = drive(Script::from_chunks(stream.chunks(1)), |seen, detected| {
            assert_eq!(detected, seen >= head_end, "after {seen} bytes");
        });
        assert!(run.detected);
    }

    #[test]
    fn three_way_splits_of_keep_alive_connection() {
        let stream = concat(&[CL_BODY, CHUNKED_BODY, SMUGGLE_CL_TE]);
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let run = run_chunks([&stream[..i], &stream[i..j], &stream[j..]]);
                assert!(run.detected, "split at {i} and {j}");
            }
        }
    }

    #[test]
    fn header_lookalikes_in_bodies_not_detected() {
        let stream = concat(&[
            &cl_request(FAKE_HEAD),
            &chunked_request(FAKE_HEAD),
            &cl_request(b"\r\n\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            GET,
        ]);
        check_all_splits(&stream, false, State::HeadStart);
    }

    #[test]
    fn bare_lf_and_leading_empty_lines_are_heads_too() {
        // httparse (and so hyper) accepts both; a tracker that only looked
        // for "\r\n\r\n" would miss these heads.
        let bare_lf =
            b"POST / HTTP/1.1\nHost: x\nContent-Length: 3\nTransfer-Encoding: chunked\n\n0\r\n\r\n";
        check_all_splits(bare_lf, true, State::PassThrough);
        let mixed = b"GET / HTTP/1.1\nHost: x\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\nTransfer-Encoding: chunked\r\n\n";
        check_all_splits(mixed, true, State::PassThrough);
        let leading = concat(&[GET, b"\r\n\r\n\n", SMUGGLE_CL_TE]);
        check_all_splits(&leading, true, State::PassThrough);
    }

    #[test]
    fn http2_preface_passes_through() {
        let stream = concat(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", SMUGGLE_CL_TE]);
        check_all_splits(&stream, false, State::PassThrough);
    }

    #[test]
    fn websocket_tunnel_after_upgrade_passes_through() {
        let upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        // A masked text frame, then text that looks like an ambiguous head:
        // once the frame bytes are seen as not-HTTP, tracking stops.
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let stream = concat(&[upgrade, &frame, SMUGGLE_CL_TE]);
        check_all_splits(&stream, false, State::PassThrough);
        let connect = concat(&[
            b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            &[0x16, 0x03, 0x01, 0x02, 0x00],
            SMUGGLE_CL_TE,
        ]);
        check_all_splits(&connect, false, State::PassThrough);
    }

    #[test]
    fn refused_upgrade_does_not_stop_tracking() {
        // hyper keeps serving the connection when the handler answers an
        // Upgrade or CONNECT request without switching protocols.
        let upgrade = concat(&[
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            SMUGGLE_CL_TE,
        ]);
        check_all_splits(&upgrade, true, State::PassThrough);
        let connect = concat(&[
            b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            SMUGGLE_CL_TE,
        ]);
        check_all_splits(&connect, true, State::PassThrough);
    }

    #[test]
    fn input_hyper_rejects_stops_tracking() {
        let cases: [&[u8]; 6] = [
            b"GE\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext\nabc\r\n",
        ];
        for case in cases {
            let stream = concat(&[case, SMUGGLE_CL_TE]);
            check_all_splits(&stream, false, State::PassThrough);
        }
        let mut too_many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            too_many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        too_many.extend_from_slice(b"\r\n");
        let run = run_chunks([&too_many[..], SMUGGLE_CL_TE]);
        assert!(!run.detected);
        assert_eq!(run.state, State::PassThrough);
    }

    #[test]
    fn invalid_header_lines_are_skipped_like_hyper_can_be_told_to() {
        // With `ignore_invalid_headers` hyper serves this head, so the
        // request after it must still be checked. (With hyper's default it
        // answers 400 and closes, and detecting does no harm.)
        let stream = concat(&[
            b"GET / HTTP/1.1\r\nHost x\r\n\xff\r\nBad Name: v\r\n\r\n",
            SMUGGLE_CL_TE,
        ]);
        check_all_splits(&stream, true, State::PassThrough);
    }

    #[test]
    fn chunk_size_overflow_stops_tracking() {
        let stream = concat(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000a\r\n",
            SMUGGLE_CL_TE,
        ]);
        check_all_splits(&stream, false, State::PassThrough);
    }

    #[test]
    fn large_heads_are_tracked_up_to_hypers_limit() {
        // 100 KiB of header: above the 64 KiB a smaller limit would allow,
        // below hyper's default max_buf_size.
        let padding = "a".repeat(100 * 1024);
        let head = format!(
            "POST / HTTP/1.1\r\nX-Pad: {padding}\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let run = run_chunks(head.as_bytes().chunks(1000));
        assert!(run.detected);

        let padding = "a".repeat(MAX_HEAD_LEN);
        let head = format!("GET / HTTP/1.1\r\nX-Pad: {padding}\r\n\r\n");
        let run = run_chunks(head.as_bytes().chunks(4096));
        assert!(!run.detected);
        assert_eq!(run.state, State::PassThrough);
    }

    #[test]
    fn pending_errors_and_eof_observe_nothing() {
        let mut script = Script::default();
        for (i, byte) in SMUGGLE_CL_TE.iter().enumerate() {
            match i % 3 {
                0 => script.steps.push_back(Step::Pending),
                1 => script.steps.push_back(Step::Error),
                _ => script.steps.push_back(Step::Data(Vec::new())),
            }
            script.steps.push_back(Step::Data(vec![*byte]));
        }
        let run = drive(script, |_, _| {});
        assert_eq!(run.output, SMUGGLE_CL_TE);
        assert!(run.detected);
    }

    #[test]
    fn bytes_already_in_the_read_buffer_are_not_observed() {
        let (mut guard, framing) = FramingGuard::new(Script::from_chunks([GET]));
        let mut cx = Context::from_waker(Waker::noop());
        let mut storage = [0u8; 1024];
        let mut buf = ReadBuf::new(&mut storage);
        buf.put_slice(SMUGGLE_CL_TE);
        let poll = Pin::new(&mut guard).poll_read(&mut cx, &mut buf);
        assert!(matches!(poll, Poll::Ready(Ok(()))));
        assert_eq!(&buf.filled()[SMUGGLE_CL_TE.len()..], GET);
        assert!(!framing.detected());
        assert_eq!(guard.tracker.state, State::HeadStart);
    }

    #[tokio::test]
    async fn writes_pass_through_unchanged() {
        use tokio::io::AsyncWriteExt;
        let (mut guard, framing) = FramingGuard::new(Script::default());
        // Response bytes that look like an ambiguous head are not inspected.
        guard.write_all(SMUGGLE_CL_TE).await.unwrap();
        let slices = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
        let n = guard.write_vectored(&slices).await.unwrap();
        guard.flush().await.unwrap();
        guard.shutdown().await.unwrap();
        assert_eq!(n, 2);
        assert_eq!(guard.get_ref().written, concat(&[SMUGGLE_CL_TE, b"ab"]));
        assert!(!framing.detected());
        assert_eq!(guard.tracker.state, State::HeadStart);
    }

    /// xorshift64*: deterministic, good enough to pick split points.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            const ALPHABET: &[u8] = b"ab:; \r\n0\t\xff";
            let mut out = Vec::with_capacity(len);
            while out.len() < len {
                if self.chance(5) {
                    out.extend_from_slice(FAKE_HEAD);
                } else {
                    out.push(ALPHABET[self.below(ALPHABET.len())]);
                }
            }
            out
        }
    }

    /// A random well-formed request hyper would accept.
    fn random_request(rng: &mut Rng) -> Vec<u8> {
        let mut out = Vec::new();
        if rng.chance(10) {
            out.extend_from_slice(b"\r\n");
        }
        let eol: &[u8] = if rng.chance(10) { b"\n" } else { b"\r\n" };
        let line = |out: &mut Vec<u8>, text: &str| {
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(eol);
        };
        line(&mut out, "POST /r HTTP/1.1");
        line(&mut out, "Host: example");
        for i in 0..rng.below(4) {
            line(
                &mut out,
                &format!("X-Extra-{i}: {}", "v".repeat(rng.below(40))),
            );
        }
        if rng.chance(10) {
            line(&mut out, "Upgrade: websocket");
        }
        match rng.below(3) {
            0 => out.extend_from_slice(eol),
            1 => {
                let len = rng.below(300);
                let body = rng.bytes(len);
                let name = if rng.chance(50) {
                    "content-length"
                } else {
                    "Content-Length"
                };
                line(&mut out, &format!("{name}: {}", body.len()));
                out.extend_from_slice(eol);
                out.extend_from_slice(&body);
            }
            _ => {
                line(&mut out, "Transfer-Encoding: chunked");
                out.extend_from_slice(eol);
                for _ in 0..rng.below(4) {
                    let len = 1 + rng.below(100);
                    let data = rng.bytes(len);
                    let ext = if rng.chance(30) { " ;a=b;c" } else { "" };
                    out.extend_from_slice(format!("{:X}{ext}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n");
                for i in 0..rng.below(3) {
                    out.extend_from_slice(format!("X-Trailer-{i}: t\r\n").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    #[test]
    fn random_splits_of_pipelined_mix() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..2000 {
            let mut stream = Vec::new();
            for _ in 0..1 + rng.below(6) {
                stream.extend_from_slice(&random_request(&mut rng));
            }
            // In half the cases an ambiguous head follows; the flag must rise
            // exactly when its last byte arrives, and not before.
            let smuggle_end = if rng.chance(50) {
                let head: &[u8] = if rng.chance(50) {
                    SMUGGLE_CL_TE
                } else {
                    SMUGGLE_TE_CL_MIXED
                };
                let head_len = memchr::memmem::find(head, b"\r\n\r\n").map_or(0, |i| i + 4);
                let end = stream.len() + head_len;
                stream.extend_from_slice(head);
                stream.extend_from_slice(&random_request(&mut rng));
                Some(end)
            } else {
                None
            };

            let mut script = Script::default();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let max = if rng.chance(20) { 3 } else { 600 };
                let (chunk, tail) = rest.split_at((1 + rng.below(max)).min(rest.len()));
                if rng.chance(5) {
                    script.steps.push_back(Step::Pending);
                }
                script.steps.push_back(Step::Data(chunk.to_vec()));
                rest = tail;
            }
            let run = drive(script, |seen, detected| {
                let expected = smuggle_end.is_some_and(|end| seen >= end);
                assert_eq!(detected, expected, "case {case} after {seen} bytes");
            });
            assert_eq!(run.output, stream, "case {case}");
            let end_state = match smuggle_end {
                Some(_) => State::PassThrough,
                None => State::HeadStart,
            };
            assert_eq!(run.state, end_state, "case {case}");
        }
    }

    #[test]
    fn find_blank_line_end_looks_across_reads() {
        assert_eq!(find_blank_line_end(b"", b"a\r\n\r\nb"), Some(5));
        assert_eq!(find_blank_line_end(b"a\r\n", b"\r\nb"), Some(2));
        assert_eq!(find_blank_line_end(b"a\r\n\r", b"\nb"), Some(1));
        assert_eq!(find_blank_line_end(b"a\n", b"\n"), Some(1));
        assert_eq!(find_blank_line_end(b"a\n", b"\r\n"), Some(2));
        assert_eq!(find_blank_line_end(b"a\r", b"\n\r"), None);
        assert_eq!(find_blank_line_end(b"", b"\r\n"), None);
    }

    /// End to end through hyper: the handler sees the flag for the ambiguous
    /// request and answers 400 without forwarding it.
    mod with_hyper {
        use super::*;
        use std::convert::Infallible;
        use std::sync::atomic::AtomicUsize;
        use std::time::Duration;

        use bytes::Bytes;
        use http_body_util::{BodyExt, Full};
        use hyper::{Request, Response, StatusCode};
        use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

        /// One client connection to a hyper server whose handler does what
        /// the proxy handler must: 400 if the flag is set, else "forward".
        struct Connection {
            client: DuplexStream,
            received: Vec<u8>,
            forwarded: Arc<AtomicUsize>,
            server: tokio::task::JoinHandle<()>,
        }

        impl Connection {
            fn open() -> Self {
                let (client, server) = tokio::io::duplex(1 << 20);
                let (guard, framing) = FramingGuard::new(server);
                let forwarded = Arc::new(AtomicUsize::new(0));
                let counter = Arc::clone(&forwarded);
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let framing = framing.clone();
                        let counter = Arc::clone(&counter);
                        async move {
                            let mut response = Response::new(Full::new(Bytes::new()));
                            if framing.detected() {
                                *response.status_mut() = StatusCode::BAD_REQUEST;
                            } else {
                                counter.fetch_add(1, Ordering::SeqCst);
                                let _ = request.into_body().collect().await;
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                let server = tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(guard);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .with_upgrades()
                        .await;
                });
                Connection {
                    client,
                    received: Vec::new(),
                    forwarded,
                    server,
                }
            }

            async fn send(&mut self, bytes: &[u8]) {
                self.client.write_all(bytes).await.unwrap();
            }

            /// Reads until `count` responses (all have empty bodies, so each
            /// ends at the first blank line) arrived or the server closed.
            /// Returns all status codes so far and whether it closed.
            async fn responses(&mut self, count: usize) -> (Vec<u16>, bool) {
                let mut buf = [0u8; 4096];
                let mut closed = false;
                let read = async {
                    while memchr::memmem::find_iter(&self.received, b"\r\n\r\n").count() < count {
                        match self.client.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                closed = true;
                                break;
                            }
                            Ok(n) => self.received.extend_from_slice(&buf[..n]),
                        }
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), read)
                    .await
                    .unwrap();
                let statuses = self
                    .received
                    .split(|&b| b == b'\n')
                    .filter_map(|line| line.strip_prefix(b"HTTP/1.1 "))
                    .filter_map(|rest| std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok())
                    .collect();
                (statuses, closed)
            }

            /// Sends each request after the previous response arrived.
            async fn one_by_one(&mut self, requests: &[&[u8]]) -> Vec<u16> {
                for (i, request) in requests.iter().enumerate() {
                    self.send(request).await;
                    self.responses(i + 1).await;
                }
                self.responses(requests.len()).await.0
            }

            async fn finish(self) -> usize {
                drop(self.client);
                let _ = self.server.await;
                self.forwarded.load(Ordering::SeqCst)
            }
        }

        #[tokio::test]
        async fn keep_alive_connection_rejects_the_ambiguous_request() {
            let mut conn = Connection::open();
            let statuses = conn
                .one_by_one(&[CL_BODY, CHUNKED_BODY, SMUGGLE_CL_TE])
                .await;
            assert_eq!(statuses, [200, 200, 400]);
            // hyper closes the connection after the ambiguous request.
            let (_, closed) = conn.responses(4).await;
            assert!(closed);
            assert_eq!(conn.finish().await, 2);
        }

        #[tokio::test]
        async fn refused_upgrade_then_ambiguous_request() {
            let upgrade: &[u8] =
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n";
            let mut conn = Connection::open();
            let statuses = conn.one_by_one(&[upgrade, SMUGGLE_TE_CL_MIXED]).await;
            assert_eq!(statuses, [200, 400]);
            assert_eq!(conn.finish().await, 1);
        }

        #[tokio::test]
        async fn pipelined_requests_before_an_ambiguous_one_are_rejected_too() {
            // All arrive in one read, so the flag is up before hyper hands
            // the first request to the handler. Deliberately conservative.
            let mut conn = Connection::open();
            conn.send(&concat(&[GET, CL_BODY, SMUGGLE_CL_TE])).await;
            let (statuses, _) = conn.responses(3).await;
            assert_eq!(statuses, [400, 400, 400]);
            assert_eq!(conn.finish().await, 0);
        }

        #[tokio::test]
        async fn pipelined_ordinary_requests_are_served() {
            let mut conn = Connection::open();
            conn.send(&concat(&[
                GET,
                CL_BODY,
                CHUNKED_BODY,
                &cl_request(FAKE_HEAD),
            ]))
            .await;
            let (statuses, _) = conn.responses(4).await;
            assert_eq!(statuses, [200, 200, 200, 200]);
            assert_eq!(conn.finish().await, 4);
        }
    }
}
