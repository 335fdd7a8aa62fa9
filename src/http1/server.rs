//! The server side of an HTTP/1 connection, as a session: read a request head, read its body,
//! write a response head and body, and the connection's rules (keep-alive, `100 Continue`,
//! refusals that close, handing the socket over after a protocol switch). It knows nothing of
//! routing or of what is done with a request.
//!
//! The read side (socket, buffer, and where the current request body stands) is shared
//! between the session and the request body it hands out: the body reads from it while the
//! request is forwarded; between requests, and once the body is read, the session watches it
//! for the client going away. An idle connection holds no read buffer.
//!
//! A client must send each request head (and end an idle keep-alive pause) within
//! `header_read_timeout`. The check is coarse so that it costs nothing per request: one timer
//! per connection ticks every quarter of the timeout, and a head still missing after five
//! ticks closes the connection, i.e. between 1 and 1.25 times the timeout.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE};
use http::{HeaderName, HeaderValue, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::MAX_HEAD_LEN;
use super::body::{MessageError, poll_body, poll_fill};
use super::head::{
    Framing, HeadError, RequestHead, http_date, parse_request_head, put_field, recycle_map,
};
use crate::stall::SendTimeout;
use crate::stream::{ClientReader, ClientStream, ClientWriter};

/// Response body pieces up to this size are copied next to the head (larger ones are written
/// from where they are, by vectored writes).
const COPY_LIMIT: usize = 1024;
/// Response bytes gathered before they are written even though more are ready.
const FLUSH_AT: usize = 64 * 1024;
/// Above this, the buffer for response heads is not kept for the next response.
const KEEP_OUT_CAPACITY: usize = 16 * 1024;
/// Ticks of the head timer per `header_read_timeout`; a head is given one more.
const TICKS_PER_TIMEOUT: u32 = 4;
/// How long a connection closed after an error keeps reading (and dropping) what the client
/// still sends, so that the client reads the answer instead of a reset.
const LINGER: Duration = Duration::from_secs(1);

/// The read side of a client connection: the socket, the bytes read and not used yet, and
/// how much of the current request's body is still to come.
#[derive(Debug)]
struct ReadSide {
    io: ClientReader,
    buf: BytesMut,
    body: Framing,
    /// The client closed its sending side behind pipelined requests still buffered.
    eof: bool,
}

type Shared = Arc<Mutex<ReadSide>>;

fn lock(shared: &Shared) -> MutexGuard<'_, ReadSide> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request body read from the client connection as it is polled.
#[derive(Debug)]
pub struct RequestBody {
    shared: Shared,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = MessageError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MessageError>>> {
        let side = &mut *lock(&self.shared);
        poll_body(&mut side.body, &mut side.io, &mut side.buf, cx)
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.shared).body.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.shared).body.size_hint()
    }
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

/// How a response is written.
#[derive(Debug, Clone, Copy)]
pub struct ResponseMode {
    /// The request was HEAD: the head only, whatever it says of a body.
    pub head_request: bool,
    /// The request's version: an HTTP/1.0 client gets no chunked body (a body of unknown
    /// length is delimited by the close) and `Connection: keep-alive` when it stays open.
    pub version: Version,
    /// The connection closes after this response (`Connection: close`).
    pub close: bool,
    /// The client accepts trailers (`TE: trailers`): a chunked response's trailers go in its
    /// trailer section.
    pub trailers: bool,
}

/// One client connection served over HTTP/1.
pub struct ServerSession {
    shared: Shared,
    write: SendTimeout<ClientWriter>,
    /// The writer may hold back what it took until flushed (TLS): each write ends with a
    /// flush. A plain connection skips it.
    flush_writes: bool,
    clock: HeadClock,
}

/// What waiting for a request head gave.
pub enum NextRequest {
    Request(RequestHead),
    /// The client closed between requests, the drain began while the connection was idle,
    /// or the head did not come within the header read timeout: close without an answer.
    Done,
    /// The head is malformed or over a limit: answer with its status and close.
    Refused(HeadError),
}

impl ServerSession {
    pub fn new(
        stream: ClientStream,
        header_read_timeout: Duration,
        send_timeout: Duration,
    ) -> Self {
        let (io, write) = stream.into_split();
        let flush_writes = write.holds_back();
        ServerSession {
            shared: Arc::new(Mutex::new(ReadSide {
                io,
                buf: BytesMut::new(),
                body: Framing::Empty,
                eof: false,
            })),
            write: SendTimeout::new(write, send_timeout),
            flush_writes,
            clock: HeadClock::new(header_read_timeout),
        }
    }

    /// Waits for the next request head and parses it.
    pub async fn read_head(&mut self, drain: &mut watch::Receiver<()>) -> NextRequest {
        let started = self.clock.ticks;
        let shared = &self.shared;
        let clock = &mut self.clock;
        loop {
            let idle = {
                let side = &mut *lock(shared);
                if side.buf.is_empty() {
                    // Nothing pipelined: the buffer goes, the next read takes what it needs.
                    side.buf = BytesMut::new();
                } else {
                    match parse_request_head(&mut side.buf) {
                        Ok(Some(head)) => return NextRequest::Request(head),
                        Ok(None) => {}
                        Err(error) => return NextRequest::Refused(error),
                    }
                }
                side.buf.is_empty()
            };
            let fill = poll_fn(|cx| {
                let side = &mut *lock(shared);
                poll_fill(&mut side.io, &mut side.buf, cx)
            });
            tokio::select! {
                biased;
                filled = fill => match filled {
                    Ok(0) | Err(_) => return NextRequest::Done,
                    Ok(_) => {}
                },
                () = clock.sleep.as_mut() => {
                    clock.tick();
                    if clock.ticks.wrapping_sub(started) > TICKS_PER_TIMEOUT {
                        return NextRequest::Done;
                    }
                }
                _ = drain.changed(), if idle => return NextRequest::Done,
            }
        }
    }

    /// The body of the request just read, delimited by `framing`; `None` when it has none.
    pub fn request_body(&mut self, framing: Framing) -> Option<RequestBody> {
        lock(&self.shared).body = framing;
        (!framing.is_end()).then(|| RequestBody {
            shared: self.shared.clone(),
        })
    }

    /// Whether the current request's body has been read to its end (else the connection
    /// cannot carry another request).
    pub fn body_complete(&self) -> bool {
        lock(&self.shared).body.is_end()
    }

    /// Tells a client that sent `Expect: 100-continue` to send its body.
    pub async fn write_continue(&mut self) -> io::Result<()> {
        self.write
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await?;
        if self.flush_writes {
            self.write.flush().await?;
        }
        Ok(())
    }

    /// Ready when the client has gone away (closed or reset) while its request is being
    /// answered. Watched only once the request body is read (until then the body's reads see
    /// it); bytes of pipelined requests are kept, up to a head's size. A client that sent
    /// pipelined requests and then closed its sending side is not gone: they are answered
    /// (as nginx, which peeks and sees their bytes first).
    pub fn poll_client_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        let side = &mut *lock(&self.shared);
        loop {
            if !side.body.is_end() || side.eof || side.buf.len() >= MAX_HEAD_LEN {
                return Poll::Pending;
            }
            match poll_fill(&mut side.io, &mut side.buf, cx) {
                Poll::Ready(Ok(0)) if !side.buf.is_empty() => side.eof = true,
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes a response: the head (Content-Length or chunked framing as the body allows,
    /// `Date` when missing, `Connection: close` when the connection ends after it), then the
    /// body as it comes; small pieces go out in the same write as the head. Returns whether
    /// the connection must close after it (`mode.close`, or an HTTP/1.0 body of unknown
    /// length, delimited by the close). Trailers go in the trailer section of a chunked body
    /// when the client accepts them (`mode.trailers`; filtered as trailers are), else they
    /// are dropped, as a proxy may.
    pub async fn write_response<B>(
        &mut self,
        response: http::Response<B>,
        mode: ResponseMode,
    ) -> io::Result<bool>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let mut out = spare_out();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        for (name, value) in &parts.headers {
            if name == CONNECTION && !switching {
                continue;
            }
            put_field(&mut out, name, value);
        }
        let bodiless = mode.head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let mut close = mode.close;
        let mut chunked = false;
        if !bodiless && !parts.headers.contains_key(CONTENT_LENGTH) {
            match body.size_hint().exact() {
                Some(length) => {
                    let _ = write!(out, "content-length: {length}\r\n");
                }
                None if mode.version == Version::HTTP_10 => close = true,
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
        } else if mode.version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        recycle_map(parts.headers);
        let mut outgoing = Outgoing {
            head: out,
            head_written: 0,
            queue: VecDeque::new(),
            queued: 0,
            flush: self.flush_writes,
        };
        let written = if bodiless {
            outgoing.flush(&mut self.write).await
        } else {
            let trailers = chunked && mode.trailers;
            outgoing
                .write_body(&mut body, chunked, trailers, &mut self.write)
                .await
        };
        give_back_out(outgoing.head);
        written.map(|()| close)
    }

    /// Answers a request that cannot be taken with `status` (and the request id header, when
    /// there is one), and closes the connection.
    pub async fn refuse(
        &mut self,
        status: StatusCode,
        request_id: Option<(&HeaderName, &HeaderValue)>,
    ) {
        let mut answer = format!(
            "HTTP/1.1 {} {}\r\ncontent-length: 0\r\ndate: {}\r\nconnection: close\r\n",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            String::from_utf8_lossy(&http_date()),
        )
        .into_bytes();
        if let Some((name, id)) = request_id {
            put_field(&mut answer, name, id);
        }
        answer.extend_from_slice(b"\r\n");
        if self.write.write_all(&answer).await.is_ok() {
            self.close(true).await;
        }
    }

    /// Closes the connection; with `linger`, after reading (and dropping) what the client
    /// still sends for at most [`LINGER`], so that unread bytes do not turn the close into a
    /// reset that loses the answer.
    pub async fn close(&mut self, linger: bool) {
        let _ = self.write.shutdown().await;
        if !linger {
            return;
        }
        let shared = &self.shared;
        let drain = poll_fn(|cx| {
            let side = &mut *lock(shared);
            loop {
                side.buf.clear();
                match ready!(poll_fill(&mut side.io, &mut side.buf, cx)) {
                    Ok(0) | Err(_) => return Poll::Ready(()),
                    Ok(_) => {}
                }
            }
        });
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    /// The connection after a protocol switch, with the bytes the client sent past its
    /// request; `None` while a request body still holds the read side.
    pub fn into_upgraded(self) -> Option<(ClientStream, Bytes)> {
        let side = Arc::try_unwrap(self.shared).ok()?;
        let side = side.into_inner().unwrap_or_else(|e| e.into_inner());
        let stream = ClientStream::reunite(side.io, self.write.into_inner())?;
        Some((stream, side.buf.freeze()))
    }
}

thread_local! {
    /// Buffers for response heads, kept per thread rather than per connection.
    static SPARE_OUT: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn spare_out() -> Vec<u8> {
    SPARE_OUT
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(1024))
}

fn give_back_out(mut out: Vec<u8>) {
    if out.capacity() > KEEP_OUT_CAPACITY {
        return;
    }
    out.clear();
    SPARE_OUT.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < 64 {
            spare.push(out);
        }
    });
}

/// Bytes on their way to the client: the response head (with small pieces copied after it),
/// then body pieces by reference; written together by vectored writes.
struct Outgoing {
    head: Vec<u8>,
    head_written: usize,
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`.
    queued: usize,
    /// Flush the writer once everything is written (it may hold bytes back: TLS).
    flush: bool,
}

impl Outgoing {
    /// Streams `body` after the head: what the body has now goes out together; when it has
    /// nothing more yet, what is gathered is written before waiting for more. With
    /// `trailers` (a chunked body), its trailers end it.
    async fn write_body<B, W>(
        &mut self,
        body: &mut B,
        chunked: bool,
        trailers: bool,
        write: &mut W,
    ) -> io::Result<()>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        W: tokio::io::AsyncWrite + Unpin,
    {
        loop {
            let polled = Pin::new(&mut *body).poll_frame(&mut Context::from_waker(Waker::noop()));
            let frame = match polled {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    self.flush(write).await?;
                    body.frame().await
                }
            };
            let Some(frame) = frame else {
                if chunked {
                    self.push_copy(b"0\r\n\r\n");
                }
                break;
            };
            let frame = frame.map_err(io::Error::other)?;
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if trailers && let Ok(fields) = frame.into_trailers() {
                        self.push_trailers(fields);
                        break;
                    }
                    continue;
                }
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                let mut line = [0u8; 18];
                let mut cursor = io::Cursor::new(&mut line[..]);
                let _ = write!(cursor, "{:x}\r\n", data.len());
                let used = cursor.position() as usize;
                self.push_copy(&line[..used]);
                self.push(data);
                self.push_copy(b"\r\n");
            } else {
                self.push(data);
            }
            if self.pending() >= FLUSH_AT {
                self.flush(write).await?;
            }
        }
        self.flush(write).await
    }

    /// Ends a chunked body with its trailer section (filtered: fields that must not be
    /// trailers are dropped).
    #[cold]
    fn push_trailers(&mut self, mut fields: http::HeaderMap) {
        super::body::filter_trailers(&mut fields);
        let mut section = b"0\r\n".to_vec();
        for (name, value) in &fields {
            put_field(&mut section, name, value);
        }
        section.extend_from_slice(b"\r\n");
        self.push_copy(&section);
    }

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

    /// Writes everything queued, and flushes the writer when it may hold bytes back (TLS).
    async fn flush<W: tokio::io::AsyncWrite + Unpin>(&mut self, write: &mut W) -> io::Result<()> {
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
        if self.flush {
            write.flush().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::{Full, StreamBody};

    /// A writer that takes every byte at once and sends them on only when flushed, as a TLS
    /// stream may (rustls keeps the records a full socket did not take).
    #[derive(Default)]
    struct HeldUntilFlushed {
        held: Vec<u8>,
        sent: Vec<u8>,
    }

    impl tokio::io::AsyncWrite for HeldUntilFlushed {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let held = std::mem::take(&mut self.held);
            self.sent.extend_from_slice(&held);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn outgoing(head: &[u8]) -> Outgoing {
        Outgoing {
            head: head.to_vec(),
            head_written: 0,
            queue: VecDeque::new(),
            queued: 0,
            flush: true,
        }
    }

    #[tokio::test]
    async fn what_is_written_is_flushed_at_the_end_and_before_waiting_for_more() {
        let head = b"HTTP/1.1 200 OK\r\n\r\n";
        let mut writer = HeldUntilFlushed::default();
        let mut body = Full::new(Bytes::from(vec![b'x'; 100_000]));
        outgoing(head)
            .write_body(&mut body, false, false, &mut writer)
            .await
            .unwrap();
        assert!(writer.held.is_empty());
        assert_eq!(writer.sent.len(), head.len() + 100_000);

        // A body that has one piece and then waits: the piece goes out before the wait.
        let mut writer = HeldUntilFlushed::default();
        let piece = Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"first")));
        let stream = futures_util::stream::iter([piece]).chain(futures_util::stream::pending());
        let mut body = StreamBody::new(stream);
        let mut out = outgoing(head);
        let waiting = out.write_body(&mut body, false, false, &mut writer);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), waiting)
                .await
                .is_err()
        );
        assert!(writer.held.is_empty());
        assert!(writer.sent.ends_with(b"\r\n\r\nfirst"), "{:?}", writer.sent);
    }
}
