//! HTTP/1.1 client connections served by the proxy itself: each request head is parsed once
//! (httparse; header values share the read buffer), handed to the [`Proxy`], and the response
//! is written straight back, all on the connection's own task. The request body is read from
//! the connection only as the upstream exchange asks for it.
//!
//! hyper serves the rest: HTTP/2, and an HTTP/1 connection from the first request this path
//! does not take (HTTP/1.0, `Upgrade`, `Expect`, CONNECT), which is handed over whole with
//! the bytes read so far ([`Ended::HandOver`]). A request with both Content-Length and
//! Transfer-Encoding is answered 400 and its connection closed; nothing reaches an upstream.
//!
//! A client must send each request head (and end an idle keep-alive pause) within
//! `header_read_timeout`. The check is coarse so that it costs nothing per request: one timer
//! per connection ticks every quarter of the timeout, and a head still missing after five
//! ticks closes the connection, i.e. between 1 and 1.25 times the timeout.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::codec::{
    self, ChunkState, Framing, HeadFields, MAX_HEAD_LEN, MAX_HEADERS, MessageError,
};
use crate::headers;
use crate::proxy::Proxy;
use crate::stall::StallTimer;
use crate::upstream::{ForwardBody, ProxyResponse};

/// Read buffer of a client connection, made when a connection starts.
const READ_BUF: usize = 8 * 1024;
/// Response body pieces up to this size are copied next to the head (larger ones are written
/// from where they are, by vectored writes).
const COPY_LIMIT: usize = 1024;
/// Response bytes gathered before they are written even though more are ready.
const FLUSH_AT: usize = 64 * 1024;
/// Above this, the buffer for response heads is shrunk after use.
const KEEP_OUT_CAPACITY: usize = 16 * 1024;
/// Ticks of the head timer per `header_read_timeout`; a head is given one more.
const TICKS_PER_TIMEOUT: u32 = 4;
/// How long a connection closed after an error keeps reading (and dropping) what the client
/// still sends, so that the client reads the answer instead of a reset.
const LINGER: Duration = Duration::from_secs(1);

/// How serving a connection ended.
pub enum Ended {
    /// The connection is closed (or about to be, when the value is dropped).
    Closed,
    /// A request this path does not serve: hyper takes the connection from its start.
    HandOver(Rewound),
}

/// The read side of a client connection and the bytes read from it but not used yet.
#[derive(Debug)]
pub struct ClientReader {
    io: OwnedReadHalf,
    buf: BytesMut,
}

/// Where a [`ClientBody`] leaves the connection's read side when it is done with it, and
/// whether it read the body to its end (else the connection cannot carry another request).
type ReaderSlot = Arc<Mutex<Option<(ClientReader, bool)>>>;

/// A request body read from the client connection as the upstream exchange polls it. When it
/// is dropped, the connection's read side goes back to the connection's loop.
#[derive(Debug)]
pub struct ClientBody {
    reader: Option<ClientReader>,
    framing: Framing,
    slot: ReaderSlot,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = MessageError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MessageError>>> {
        let this = self.get_mut();
        match this.reader.as_mut() {
            Some(reader) => {
                codec::poll_body(&mut this.framing, &mut reader.io, &mut reader.buf, cx)
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.framing.size_hint()
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            let complete = self.framing.is_end();
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((reader, complete));
        }
    }
}

/// A client connection handed to hyper: the bytes already read come first.
#[derive(Debug)]
pub struct Rewound {
    prefix: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let prefix = self.prefix.split_to(n);
            buf.put_slice(&prefix);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The write side of a client connection this path serves.
type ClientWriter = SendTimeout<OwnedWriteHalf>;

/// A client connection's writer whose writes fail (`TimedOut`) once one has waited
/// `send_timeout` for the client to take bytes, as nginx's `send_timeout`: a client that stops
/// reading cannot hold its connection and the upstream one behind it. hyper's connections get
/// it too. A write that goes through at once costs one branch.
#[derive(Debug)]
pub struct SendTimeout<W> {
    inner: W,
    stall: StallTimer,
}

impl<W> SendTimeout<W> {
    pub fn new(inner: W, limit: Duration) -> Self {
        SendTimeout {
            inner,
            stall: StallTimer::new(limit),
        }
    }

    /// Passes a write's result on; a write that has been waiting for `limit` fails.
    fn watch<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        let stalled = self.stall.poll_stalled(polled.is_ready(), cx);
        if polled.is_pending() && stalled.is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing for send_timeout",
            )));
        }
        polled
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SendTimeout<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(polled, cx)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for SendTimeout<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// A parsed request head.
struct RequestHead {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// The head as received, for a hand-over to hyper.
    raw: Bytes,
}

/// Why no request head could be taken from a connection.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// Malformed: answered 400.
    Bad,
    /// Too large or too many fields: answered 431.
    TooLarge,
    /// Too large, and the request line alone is (its target is longer than a whole head may
    /// be): answered 414 URI Too Long (RFC 9110 §15.5.15).
    UriTooLong,
    /// Not complete within the header read timeout, or the client left mid-head: closed.
    Gone,
}

/// The coarse header read timer of one connection.
struct HeadClock {
    sleep: Pin<Box<Sleep>>,
    period: Duration,
    ticks: u32,
}

impl HeadClock {
    fn new(timeout: Duration) -> Self {
        let period = timeout / TICKS_PER_TIMEOUT;
        HeadClock {
            sleep: Box::pin(tokio::time::sleep(period)),
            period,
            ticks: 0,
        }
    }

    fn tick(&mut self) {
        self.ticks = self.ticks.wrapping_add(1);
        let next = Instant::now() + self.period;
        self.sleep.as_mut().reset(next);
    }
}

/// Serves HTTP/1.1 requests on `stream` until the client closes, an error closes it, the drain
/// ends it between requests, or a request needs hyper.
pub async fn serve(
    stream: TcpStream,
    client_ip: &HeaderValue,
    proxy: &Proxy,
    header_read_timeout: Duration,
    send_timeout: Duration,
    drain: &mut watch::Receiver<()>,
) -> Ended {
    let (io, write) = stream.into_split();
    let mut write = SendTimeout::new(write, send_timeout);
    let mut reader = Some(ClientReader {
        io,
        buf: BytesMut::with_capacity(READ_BUF),
    });
    let slot: ReaderSlot = Arc::default();
    let mut fields = HeadFields::default();
    let mut out = Vec::with_capacity(1024);
    let mut clock = HeadClock::new(header_read_timeout);
    loop {
        let Some(mut current) = reader.take() else {
            return Ended::Closed;
        };
        let mut head = match read_head(&mut current, &mut fields, &mut clock, drain).await {
            Ok(Some(head)) => head,
            Ok(None) | Err(HeadError::Gone) => return Ended::Closed,
            Err(error) => {
                let status = match error {
                    HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    HeadError::UriTooLong => StatusCode::URI_TOO_LONG,
                    _ => StatusCode::BAD_REQUEST,
                };
                refuse(&mut write, &mut current, status).await;
                return Ended::Closed;
            }
        };
        if head.version != Version::HTTP_11
            || head.method == Method::CONNECT
            || head.headers.contains_key(UPGRADE)
            || head.headers.contains_key(EXPECT)
        {
            return hand_over(head.raw, current, write);
        }
        let keep_alive = !codec::has_token(&head.headers, &CONNECTION, b"close");
        let (body_framing, ambiguous) = match request_framing(&mut head) {
            Ok(framing) => (framing, false),
            // Answered 400 by the proxy (so that it is counted), its body never read.
            Err(Refusal::Ambiguous) => (Framing::Empty, true),
            Err(Refusal::Status(status)) => {
                refuse(&mut write, &mut current, status).await;
                return Ended::Closed;
            }
        };
        let body = if body_framing.is_end() {
            reader = Some(current);
            ForwardBody::Empty
        } else {
            ForwardBody::Client(ClientBody {
                reader: Some(current),
                framing: body_framing,
                slot: slot.clone(),
            })
        };
        let head_request = head.method == Method::HEAD;
        let mut request = Request::new(body);
        *request.method_mut() = head.method;
        *request.uri_mut() = head.uri;
        *request.headers_mut() = head.headers;

        let response = proxy.handle(request, client_ip, ambiguous).await;

        let mut close = !keep_alive || ambiguous || drain.has_changed().unwrap_or(true);
        // The request body, if there was one, has usually given the read side back by now
        // (read to its end, or dropped with a failed request). If it was not read whole, or
        // is still being read (the upstream answered before it had it all), the connection
        // cannot carry another request: the response says so.
        let mut unread = ambiguous;
        if reader.is_none() {
            match take_back(&slot) {
                Some((back, complete)) => {
                    reader = Some(back);
                    unread |= !complete;
                }
                None => unread = true,
            }
            close |= unread;
        }
        let written = write_response(&mut write, &mut out, response, head_request, close).await;
        if reader.is_none() {
            // The response, and with it the rest of the exchange, is gone: so is the body.
            reader = take_back(&slot).map(|(back, _)| back);
        }
        if written.is_err() {
            return Ended::Closed;
        }
        if close {
            if let Some(mut current) = reader.take() {
                let _ = write.shutdown().await;
                if unread {
                    linger(&mut current).await;
                }
            }
            return Ended::Closed;
        }
    }
}

/// The read side a [`ClientBody`] left in `slot`, and whether it read the body to its end.
fn take_back(slot: &ReaderSlot) -> Option<(ClientReader, bool)> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Reads until a whole request head is buffered and parses it; `None` when the client closed
/// between requests, or when the drain began while the connection was idle.
async fn read_head(
    reader: &mut ClientReader,
    fields: &mut HeadFields,
    clock: &mut HeadClock,
    drain: &mut watch::Receiver<()>,
) -> Result<Option<RequestHead>, HeadError> {
    let started = clock.ticks;
    loop {
        if !reader.buf.is_empty()
            && let Some(head) = parse_request_head(&mut reader.buf, fields)?
        {
            return Ok(Some(head));
        }
        let idle = reader.buf.is_empty();
        tokio::select! {
            biased;
            filled = poll_fn(|cx| codec::poll_fill(&mut reader.io, &mut reader.buf, cx)) => {
                match filled {
                    Ok(0) if idle => return Ok(None),
                    Ok(0) | Err(_) => return Err(HeadError::Gone),
                    Ok(_) => {}
                }
            }
            () = clock.sleep.as_mut() => {
                clock.tick();
                if clock.ticks.wrapping_sub(started) > TICKS_PER_TIMEOUT {
                    return Err(HeadError::Gone);
                }
            }
            _ = drain.changed(), if idle => return Ok(None),
        }
    }
}

/// Parses a request head at the start of `buf`, consuming it; `None` when it is not complete.
fn parse_request_head(
    buf: &mut BytesMut,
    fields: &mut HeadFields,
) -> Result<Option<RequestHead>, HeadError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_request_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_LEN => len,
        Ok(httparse::Status::Complete(_)) => return Err(too_large(buf)),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_LEN => {
            return Err(too_large(buf));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad),
    };
    let method = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(HeadError::Bad)?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let base = buf.as_ptr() as usize;
    let target = parsed.path.ok_or(HeadError::Bad)?;
    let target_start = target.as_ptr() as usize - base;
    let target_end = target_start + target.len();
    fields
        .collect(buf, parsed.headers)
        .map_err(|_| HeadError::Bad)?;
    let raw = buf.split_to(len).freeze();
    let uri =
        Uri::from_maybe_shared(raw.slice(target_start..target_end)).map_err(|_| HeadError::Bad)?;
    let headers = fields.take_map(&raw).map_err(|_| HeadError::Bad)?;
    Ok(Some(RequestHead {
        method,
        uri,
        version,
        headers,
        raw,
    }))
}

/// How a head over [`MAX_HEAD_LEN`] is refused: 414 when its request line alone is over the
/// limit (no line end within it, after the empty lines a request may start with), else 431.
fn too_large(buf: &[u8]) -> HeadError {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let line = &buf[start..];
    if line.len() >= MAX_HEAD_LEN && memchr::memchr(b'\n', &line[..MAX_HEAD_LEN]).is_none() {
        HeadError::UriTooLong
    } else {
        HeadError::TooLarge
    }
}

/// Why a request cannot be forwarded as it is.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Both Content-Length and Transfer-Encoding (request smuggling): answered 400 by the
    /// proxy (and counted), nothing forwarded.
    Ambiguous,
    /// Answered with this status and the connection closed: a malformed Content-Length, a
    /// request target or Host [`headers::settle_host`] refuses (400), a transfer coding other
    /// than chunked (501).
    Status(StatusCode),
}

/// Checks a request head (its target and Host first, as the proxy checks every request, so
/// that a refused one closes the connection here) and works out how its body is delimited
/// (RFC 9112 §6.3): chunked, by length, or none. Repeated Content-Length values that agree are
/// folded into one.
fn request_framing(head: &mut RequestHead) -> Result<Framing, Refusal> {
    // This path serves HTTP/1.1 only.
    if let Err(error) =
        headers::settle_host(&head.method, &head.uri, &mut head.headers, Version::HTTP_11)
    {
        return Err(Refusal::Status(StatusCode::from(&error)));
    }
    let headers = &mut head.headers;
    let chunked = codec::transfer_encoding(headers);
    if chunked.is_some() && headers.contains_key(CONTENT_LENGTH) {
        return Err(Refusal::Ambiguous);
    }
    match chunked {
        Some(true) => Ok(Framing::Chunked(ChunkState::Size)),
        Some(false) => Err(Refusal::Status(StatusCode::NOT_IMPLEMENTED)),
        None => match codec::content_length(headers) {
            Ok(Some(length)) => Ok(Framing::Length(length)),
            Ok(None) => Ok(Framing::Empty),
            Err(_) => Err(Refusal::Status(StatusCode::BAD_REQUEST)),
        },
    }
}

/// Writes a response: the head (with Content-Length or chunked framing as the body allows,
/// `Date` when missing, `Connection: close` when the connection ends after it), then the
/// body as it comes. Small pieces go out in the same write as the head.
async fn write_response(
    write: &mut ClientWriter,
    out: &mut Vec<u8>,
    response: ProxyResponse,
    head_request: bool,
    close: bool,
) -> io::Result<()> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == CONNECTION {
            continue;
        }
        codec::put_field(out, name, value);
    }
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut chunked = false;
    if !bodiless && !parts.headers.contains_key(CONTENT_LENGTH) {
        match body.size_hint().exact() {
            Some(length) => {
                let _ = write!(out, "content-length: {length}\r\n");
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
        }
    }
    if !parts.headers.contains_key(DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&http_date());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    codec::recycle_map(parts.headers);
    let mut outgoing = Outgoing {
        head: out,
        head_written: 0,
        queue: VecDeque::new(),
        queued: 0,
    };
    if bodiless {
        return outgoing.flush(write).await;
    }
    loop {
        // What the body has now goes out together; when it has nothing more yet, what is
        // gathered is written before waiting for more.
        let polled = Pin::new(&mut body).poll_frame(&mut Context::from_waker(Waker::noop()));
        let frame = match polled {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                outgoing.flush(write).await?;
                body.frame().await
            }
        };
        let Some(frame) = frame else {
            if chunked {
                outgoing.push_copy(b"0\r\n\r\n");
            }
            break;
        };
        let frame = frame.map_err(io::Error::other)?;
        // Trailers are dropped: a proxy may, and few clients ask for them.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let mut line = [0u8; 18];
            let mut cursor = io::Cursor::new(&mut line[..]);
            let _ = write!(cursor, "{:x}\r\n", data.len());
            let used = cursor.position() as usize;
            outgoing.push_copy(&line[..used]);
            outgoing.push(data);
            outgoing.push_copy(b"\r\n");
        } else {
            outgoing.push(data);
        }
        if outgoing.pending() >= FLUSH_AT {
            outgoing.flush(write).await?;
        }
    }
    outgoing.flush(write).await
}

/// Bytes on their way to the client: the response head (with small pieces copied after it),
/// then body pieces by reference; written together by vectored writes.
struct Outgoing<'a> {
    head: &'a mut Vec<u8>,
    head_written: usize,
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`.
    queued: usize,
}

impl Outgoing<'_> {
    /// Bytes gathered and not written yet.
    fn pending(&self) -> usize {
        self.head.len() - self.head_written + self.queued
    }

    /// Queues a copy of a few bytes (framing).
    fn push_copy(&mut self, bytes: &[u8]) {
        if self.queue.is_empty() {
            self.head.extend_from_slice(bytes);
        } else {
            self.push(Bytes::copy_from_slice(bytes));
        }
    }

    /// Queues body bytes; small pieces right after the head are copied next to it.
    fn push(&mut self, data: Bytes) {
        if self.queue.is_empty() && data.len() <= COPY_LIMIT {
            self.head.extend_from_slice(&data);
        } else {
            self.queued += data.len();
            self.queue.push_back(data);
        }
    }

    /// Writes everything queued.
    async fn flush(&mut self, write: &mut ClientWriter) -> io::Result<()> {
        loop {
            let mut slices = [io::IoSlice::new(&[]); 16];
            let mut count = 0;
            if self.head_written < self.head.len() {
                slices[0] = io::IoSlice::new(&self.head[self.head_written..]);
                count = 1;
            }
            for piece in self.queue.iter().take(slices.len() - count) {
                slices[count] = io::IoSlice::new(piece);
                count += 1;
            }
            if count == 0 {
                break;
            }
            let mut written = write.write_vectored(&slices[..count]).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let from_head = written.min(self.head.len() - self.head_written);
            self.head_written += from_head;
            written -= from_head;
            while written > 0 {
                let Some(front) = self.queue.front_mut() else {
                    break;
                };
                if written >= front.len() {
                    written -= front.len();
                    self.queued -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(written);
                    self.queued -= written;
                    written = 0;
                }
            }
        }
        self.head.clear();
        self.head_written = 0;
        if self.head.capacity() > KEEP_OUT_CAPACITY {
            // Many small pieces gathered once: do not keep that for the whole connection.
            self.head.shrink_to(KEEP_OUT_CAPACITY);
        }
        Ok(())
    }
}

/// The current time as an HTTP date, formatted at most once a second per thread.
fn http_date() -> [u8; 29] {
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

/// Answers a request this path cannot take with `status` and closes the connection.
async fn refuse(write: &mut ClientWriter, reader: &mut ClientReader, status: StatusCode) {
    let answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: 0\r\ndate: {}\r\nconnection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        String::from_utf8_lossy(&http_date()),
    );
    if write.write_all(answer.as_bytes()).await.is_ok() {
        let _ = write.shutdown().await;
        linger(reader).await;
    }
}

/// Reads and drops what the client still sends, for at most [`LINGER`] (or until it closes),
/// so that unread bytes do not turn the close into a reset that loses the answer.
async fn linger(reader: &mut ClientReader) {
    let mut sink = [0u8; 4096];
    let drain = async {
        while let Ok(n) = reader.io.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Gives the connection to hyper, the head just read and anything after it first.
fn hand_over(raw: Bytes, reader: ClientReader, write: ClientWriter) -> Ended {
    let prefix = if reader.buf.is_empty() {
        raw
    } else {
        let mut joined = BytesMut::with_capacity(raw.len() + reader.buf.len());
        joined.extend_from_slice(&raw);
        joined.extend_from_slice(&reader.buf);
        joined.freeze()
    };
    match reader.io.reunite(write.inner) {
        Ok(stream) => Ended::HandOver(Rewound { prefix, stream }),
        Err(_) => Ended::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        parse_request_head(&mut BytesMut::from(raw), &mut HeadFields::default())
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
        assert_eq!(parse(b"G@T / HTTP/1.1\r\n\r\n").err(), Some(HeadError::Bad));
        let many: String = (0..200).map(|i| format!("x-{i}: 1\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse(head.as_bytes()).err(), Some(HeadError::TooLarge));
        let endless = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX_HEAD_LEN + 1));
        assert_eq!(parse(endless.as_bytes()).err(), Some(HeadError::TooLarge));
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    /// A `GET /` HTTP/1.1 head with these fields.
    fn get(pairs: &[(&'static str, &'static str)]) -> RequestHead {
        RequestHead {
            method: Method::GET,
            uri: Uri::from_static("/"),
            version: Version::HTTP_11,
            headers: headers(pairs),
            raw: Bytes::new(),
        }
    }

    #[test]
    fn request_bodies_are_framed_like_rfc_9112() {
        let framing = |pairs: &[(&'static str, &'static str)]| {
            let mut with_host = vec![("host", "x")];
            with_host.extend_from_slice(pairs);
            request_framing(&mut get(&with_host))
        };
        assert_eq!(framing(&[]), Ok(Framing::Empty));
        assert_eq!(
            request_framing(&mut get(&[])),
            Err(Refusal::Status(StatusCode::BAD_REQUEST)),
            "HTTP/1.1 without Host"
        );
        assert_eq!(framing(&[("content-length", "5")]), Ok(Framing::Length(5)));
        assert_eq!(
            framing(&[("transfer-encoding", "chunked")]),
            Ok(Framing::Chunked(ChunkState::Size))
        );
        assert_eq!(
            framing(&[("transfer-encoding", "chunked"), ("content-length", "5")]),
            Err(Refusal::Ambiguous)
        );
        assert_eq!(
            framing(&[("transfer-encoding", "gzip, chunked")]),
            Err(Refusal::Status(StatusCode::NOT_IMPLEMENTED))
        );
        assert_eq!(
            framing(&[("content-length", "5, 6")]),
            Err(Refusal::Status(StatusCode::BAD_REQUEST))
        );
        assert_eq!(
            framing(&[("host", "b")]),
            Err(Refusal::Status(StatusCode::BAD_REQUEST))
        );
        let mut repeated = get(&[
            ("host", "x"),
            ("content-length", "5"),
            ("content-length", "5"),
        ]);
        assert_eq!(request_framing(&mut repeated), Ok(Framing::Length(5)));
        assert_eq!(repeated.headers.get_all("content-length").iter().count(), 1);
    }

    #[test]
    fn targets_and_hosts_are_checked_before_framing() {
        let parsed = |raw: &[u8]| parse(raw).unwrap().unwrap();
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n",
            b"GET abs.example:80 HTTP/1.1\r\nHost: abs.example:80\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://user@abs.example/ HTTP/1.1\r\nHost: abs.example\r\n\r\n",
        ] {
            assert_eq!(
                request_framing(&mut parsed(bad)),
                Err(Refusal::Status(StatusCode::BAD_REQUEST)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut absolute =
            parsed(b"GET http://abs.example/p HTTP/1.1\r\nHost: hdr.example\r\n\r\n");
        assert_eq!(request_framing(&mut absolute), Ok(Framing::Empty));
        assert_eq!(absolute.headers["host"], "abs.example");
        let mut options = parsed(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(request_framing(&mut options), Ok(Framing::Empty));
    }

    #[test]
    fn an_overlong_request_line_is_414_an_overlong_head_431() {
        let line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70 * 1024));
        assert_eq!(parse(line.as_bytes()).err(), Some(HeadError::UriTooLong));
        // Still arriving: no line end within the limit is enough to tell.
        assert_eq!(
            parse(&line.as_bytes()[..MAX_HEAD_LEN + 1]).err(),
            Some(HeadError::UriTooLong)
        );
        // Empty lines before the request line do not count towards it.
        let padded = format!("\r\n\r\n{line}");
        assert_eq!(parse(padded.as_bytes()).err(), Some(HeadError::UriTooLong));
        let fields = format!(
            "GET /{} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(1000),
            "b".repeat(70 * 1024)
        );
        assert_eq!(parse(fields.as_bytes()).err(), Some(HeadError::TooLarge));
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
        let mut next = codec::xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let mut bytes = raw.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let cut = (next() % (bytes.len() as u64 + 1)) as usize;
            let mut buf = BytesMut::from(&bytes[..cut]);
            if let Ok(Some(mut head)) = parse_request_head(&mut buf, &mut HeadFields::default()) {
                let _ = request_framing(&mut head);
            }
        }
    }

    #[test]
    fn dates_are_http_dates() {
        let date = http_date();
        let text = std::str::from_utf8(&date).unwrap();
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }
}
