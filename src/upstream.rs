//! Connections to upstream endpoints: a keep-alive pool per endpoint and worker thread, and the
//! HTTP/1.1 exchange on a pooled connection, driven by the request's own task.
//!
//! The exchange is ours rather than hyper's client: hyper runs each client connection as a task
//! of its own, reached through a channel and a oneshot, with the response body behind another
//! channel, so a proxied request crossed tasks four times. Here the task that serves the client
//! writes the request, reads the response head, and the response body reads straight from the
//! upstream socket while the client connection polls it (writing the rest of the request body
//! as it goes, so an upstream may answer while it still reads). See README, Benchmarks.
//!
//! The proxy gets a connection before it writes anything, so when no connection can be made the
//! request is still whole (head and body) and can be sent elsewhere. A connection that fails
//! before any byte of the request was written or any of its body taken gives the request back:
//! a pooled one is replaced by a new connection to the same endpoint, a new one counts as a
//! failed connect. A request of which anything was written is never replayed.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::config::MAX_WORKERS;
use crate::routing::Endpoint;
use crate::workers::current_worker;

/// Connection settings of a backend; a reload that changes them starts fresh pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Idle pooled connections older than this are not reused; keep it below the upstreams'
    /// own keep-alive timeout so the proxy never writes into a connection being closed.
    pub idle_timeout: Duration,
}

/// How a backend connects to its endpoints.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    settings: UpstreamSettings,
}

/// The body of a request sent upstream: the client's own, streamed.
pub type ForwardBody = Incoming;

/// Most header fields in a response head or trailer section (hyper's default limit too).
const MAX_HEADERS: usize = 100;
/// Longest response head, chunk-size line or trailer section an upstream may send.
const MAX_HEAD_LEN: usize = 64 * 1024;
/// Free space made in the read buffer before each read from an upstream.
const READ_CHUNK: usize = 8 * 1024;
/// Request body bytes gathered (with the head) before they are written.
const WRITE_BATCH: usize = 64 * 1024;
/// Idle connections kept per endpoint and worker; beyond this a returning one is closed.
const MAX_IDLE: usize = 512;

/// Why no connection to an endpoint could be used (nothing of the request was sent).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect failed: {0}")]
    Io(#[source] io::Error),
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    #[error("the new connection failed before the request could be sent: {0}")]
    Closed(#[source] ExchangeError),
}

/// What went wrong in an exchange with an upstream.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("writing the request failed: {0}")]
    Write(#[source] io::Error),
    #[error("reading the response failed: {0}")]
    Read(#[source] io::Error),
    #[error("the upstream closed the connection before the response was complete")]
    Closed,
    #[error("malformed response head: {0}")]
    Head(#[source] httparse::Error),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("the client's request body failed: {0}")]
    RequestBody(#[source] hyper::Error),
}

/// Why an exchange with an upstream failed.
#[derive(Debug)]
pub enum SendError {
    /// Nothing was sent: the request comes back untouched, for another endpoint or backend.
    NotSent {
        request: Box<Request<ForwardBody>>,
        error: ConnectError,
    },
    /// The request was (perhaps partly) sent and then the exchange failed.
    Failed(ExchangeError),
}

/// One keep-alive connection to an endpoint, with the buffers it keeps between requests.
#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    /// Bytes read from the upstream and not consumed yet.
    read_buf: BytesMut,
    /// The request bytes being written; kept for its capacity.
    write_buf: Vec<u8>,
    /// Scratch space for parsing response heads; kept for its capacity.
    fields: Vec<(HeaderName, usize, usize)>,
    /// When the connection last went idle (into the pool).
    idle_since: Instant,
}

impl Connection {
    fn new(stream: TcpStream) -> Self {
        Connection {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: Vec::with_capacity(1024),
            fields: Vec::new(),
            idle_since: Instant::now(),
        }
    }

    /// Whether an idle connection can take a request: young enough, and nothing heard from
    /// the upstream since its last response (a FIN, or bytes nobody asked for). The readiness
    /// check costs no system call unless the socket became readable.
    fn is_reusable(&self, idle_timeout: Duration) -> bool {
        if self.idle_since.elapsed() >= idle_timeout {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads what the upstream has sent into `read_buf`; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 4 {
            self.read_buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read_buf)
    }

    /// Like [`poll_fill`](Self::poll_fill), where the end of the stream is an error.
    fn poll_fill_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        match ready!(self.poll_fill(cx)) {
            Ok(0) => Poll::Ready(Err(ExchangeError::Closed)),
            Ok(_) => Poll::Ready(Ok(())),
            Err(error) => Poll::Ready(Err(ExchangeError::Read(error))),
        }
    }
}

/// Idle keep-alive connections of one endpoint, one list per worker thread: a connection's
/// socket is registered with the runtime that opened it, so each worker only reuses its own.
/// Each list is ordered oldest first; the newest connections are reused first, and expired
/// ones are dropped from the old end whenever a connection comes back.
#[derive(Debug)]
pub struct ConnectionPool {
    idle: Box<[Mutex<VecDeque<Connection>>]>,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            idle: (0..MAX_WORKERS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl ConnectionPool {
    fn mine(&self) -> std::sync::MutexGuard<'_, VecDeque<Connection>> {
        self.idle[current_worker() % self.idle.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used connection that can take a request; unusable ones met on the
    /// way are closed.
    fn checkout(&self, idle_timeout: Duration) -> Option<Connection> {
        let mut idle = self.mine();
        while let Some(connection) = idle.pop_back() {
            if connection.is_reusable(idle_timeout) {
                return Some(connection);
            }
        }
        None
    }

    fn checkin(&self, mut connection: Connection, idle_timeout: Duration) {
        let mut idle = self.mine();
        while idle
            .front()
            .is_some_and(|c| c.idle_since.elapsed() >= idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            connection.idle_since = Instant::now();
            idle.push_back(connection);
        }
    }
}

impl Upstream {
    pub fn new(settings: UpstreamSettings) -> Self {
        Upstream { settings }
    }

    pub fn settings(&self) -> UpstreamSettings {
        self.settings
    }

    /// Sends a request (origin-form target) to `endpoint` on a pooled or new connection;
    /// resolves when the response head has arrived. The response body goes on reading from
    /// the connection, and hands it back to the pool when the exchange is over.
    pub async fn send(
        &self,
        endpoint: &Arc<Endpoint>,
        request: Request<ForwardBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let (parts, mut body) = request.into_parts();
        loop {
            let (connection, reused) = match endpoint.pool.checkout(self.settings.idle_timeout) {
                Some(connection) => (connection, true),
                None => match self.connect(endpoint).await {
                    Ok(connection) => (connection, false),
                    Err(error) => {
                        let request = Box::new(Request::from_parts(parts, body));
                        return Err(SendError::NotSent { request, error });
                    }
                },
            };
            let mut exchange = Exchange::start(connection, &parts, body);
            let head = poll_fn(|cx| exchange.poll_response_head(cx)).await;
            match head {
                Ok(head) => {
                    let settings = self.settings;
                    return finish_head(exchange, head, &parts.method, endpoint, settings)
                        .map_err(SendError::Failed);
                }
                Err(error) => match exchange.into_untouched_body() {
                    // Nothing of the request went out: a stale pooled connection is replaced,
                    // a new one that fails is treated like a failed connect.
                    Some(untouched) if reused => body = untouched,
                    Some(untouched) => {
                        let request = Box::new(Request::from_parts(parts, untouched));
                        let error = ConnectError::Closed(error);
                        return Err(SendError::NotSent { request, error });
                    }
                    None => return Err(SendError::Failed(error)),
                },
            }
        }
    }

    /// Opens a TCP connection (TCP_NODELAY) to the endpoint.
    async fn connect(&self, endpoint: &Endpoint) -> Result<Connection, ConnectError> {
        let timeout = self.settings.connect_timeout;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(endpoint.authority.as_str()))
            .await
            .map_err(|_| ConnectError::TimedOut(timeout))?
            .map_err(ConnectError::Io)?;
        let _ = stream.set_nodelay(true);
        Ok(Connection::new(stream))
    }
}

/// The request body still to be written upstream.
enum RequestBody {
    /// All of it was written (or there was none).
    Done,
    /// Streamed as the client sends it; `chunked` adds HTTP/1.1 chunk framing.
    Streaming { body: Incoming, chunked: bool },
}

/// One request/response exchange on a connection.
struct Exchange {
    connection: Connection,
    /// How much of `connection.write_buf` is written.
    written: usize,
    /// Whether any byte of the request went out or any of its body was taken from the client.
    touched: bool,
    request_body: RequestBody,
    /// The client's body when it was empty from the start, kept to give the request back.
    empty_body: Option<Incoming>,
    /// The request could not be written whole: the connection cannot be reused.
    broken: bool,
}

/// A parsed response head and how its body is framed.
struct ResponseHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

impl Exchange {
    /// Encodes the request head into the connection's write buffer; nothing is written yet.
    fn start(mut connection: Connection, parts: &Parts, body: Incoming) -> Self {
        let mut empty_body = None;
        let request_body = if body.is_end_stream() {
            empty_body = Some(body);
            RequestBody::Done
        } else {
            // Without a Content-Length (an HTTP/1 chunked request, whose Transfer-Encoding
            // was stripped as hop-by-hop, or an HTTP/2 one) the body goes out chunked.
            let chunked = !parts.headers.contains_key(CONTENT_LENGTH);
            RequestBody::Streaming { body, chunked }
        };
        let buf = &mut connection.write_buf;
        buf.clear();
        buf.extend_from_slice(parts.method.as_str().as_bytes());
        buf.push(b' ');
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        buf.extend_from_slice(target.as_bytes());
        buf.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            buf.extend_from_slice(name.as_str().as_bytes());
            buf.extend_from_slice(b": ");
            buf.extend_from_slice(value.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        if let RequestBody::Streaming { chunked: true, .. } = request_body {
            buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        buf.extend_from_slice(b"\r\n");
        Exchange {
            connection,
            written: 0,
            touched: false,
            request_body,
            empty_body,
            broken: false,
        }
    }

    /// The client's body, when nothing of the request was written or taken from it.
    fn into_untouched_body(self) -> Option<Incoming> {
        if self.touched {
            return None;
        }
        match self.request_body {
            RequestBody::Streaming { body, .. } => Some(body),
            RequestBody::Done => self.empty_body,
        }
    }

    fn request_done(&self) -> bool {
        matches!(self.request_body, RequestBody::Done) && self.connection.write_buf.is_empty()
    }

    /// Writes the request head and body as far as they can go now.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        loop {
            let pending = self.connection.write_buf.len() - self.written;
            if let RequestBody::Streaming { body, chunked } = &mut self.request_body
                && pending < WRITE_BATCH
            {
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        self.touched = true;
                        let chunked = *chunked;
                        if encode_frame(frame, chunked, &mut self.connection.write_buf) {
                            self.request_body = RequestBody::Done;
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(error))) => {
                        self.touched = true;
                        self.broken = true;
                        return Poll::Ready(Err(ExchangeError::RequestBody(error)));
                    }
                    Poll::Ready(None) => {
                        if *chunked {
                            self.connection.write_buf.extend_from_slice(b"0\r\n\r\n");
                        }
                        self.request_body = RequestBody::Done;
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            if pending > 0 {
                let buf = &self.connection.write_buf[self.written..];
                let written =
                    match ready!(Pin::new(&mut self.connection.stream).poll_write(cx, buf)) {
                        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                        result => result,
                    };
                match written {
                    Ok(n) => {
                        self.touched = true;
                        self.written += n;
                        if self.written == self.connection.write_buf.len() {
                            self.connection.write_buf.clear();
                            self.written = 0;
                        }
                        continue;
                    }
                    Err(error) => {
                        self.broken = true;
                        return Poll::Ready(Err(ExchangeError::Write(error)));
                    }
                }
            }
            return match self.request_body {
                RequestBody::Done => Poll::Ready(Ok(())),
                RequestBody::Streaming { .. } => Poll::Pending,
            };
        }
    }

    /// Goes on writing the request (unless that already failed) without waiting for it.
    fn poll_send_along(&mut self, cx: &mut Context<'_>) {
        if !self.broken && !self.request_done() {
            // A write error ends the writing, not the exchange: the upstream may have
            // answered already (say 413) and closed its reading side.
            let _ = self.poll_send(cx);
        }
    }

    /// Writes the request and reads until a final response head (1xx informational
    /// responses other than 101 are skipped).
    fn poll_response_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ResponseHead, ExchangeError>> {
        if !self.touched {
            // The first write decides whether the connection works at all; report its error
            // (nothing was sent) rather than a read error that follows from it.
            if let Poll::Ready(Err(error)) = self.poll_send(cx) {
                return Poll::Ready(Err(error));
            }
        } else {
            self.poll_send_along(cx);
        }
        loop {
            if !self.connection.read_buf.is_empty()
                && let Some(head) =
                    parse_response_head(&mut self.connection.read_buf, &mut self.connection.fields)?
            {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    continue;
                }
                return Poll::Ready(Ok(head));
            }
            ready!(self.connection.poll_fill_more(cx))?;
            self.poll_send_along(cx);
        }
    }
}

/// Appends a request body frame to `buf`; true when it was the trailers (the body's end).
fn encode_frame(frame: Frame<Bytes>, chunked: bool, buf: &mut Vec<u8>) -> bool {
    match frame.into_data() {
        Ok(data) if chunked => {
            if !data.is_empty() {
                let _ = write!(buf, "{:x}\r\n", data.len());
                buf.extend_from_slice(&data);
                buf.extend_from_slice(b"\r\n");
            }
            false
        }
        Ok(data) => {
            buf.extend_from_slice(&data);
            false
        }
        Err(frame) => {
            if let (Ok(trailers), true) = (frame.into_trailers(), chunked) {
                buf.extend_from_slice(b"0\r\n");
                for (name, value) in &trailers {
                    buf.extend_from_slice(name.as_str().as_bytes());
                    buf.extend_from_slice(b": ");
                    buf.extend_from_slice(value.as_bytes());
                    buf.extend_from_slice(b"\r\n");
                }
                buf.extend_from_slice(b"\r\n");
                return true;
            }
            false
        }
    }
}

/// Parses a response head at the start of `buf`, consuming it; `None` when it is not complete.
/// Header values share the buffer's memory (no copy); `fields` is scratch space kept with the
/// connection, so parsing neither allocates nor zeroes a slot array.
fn parse_response_head(
    buf: &mut BytesMut,
    fields: &mut Vec<(HeaderName, usize, usize)>,
) -> Result<Option<ResponseHead>, ExchangeError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_LEN => {
            return Err(ExchangeError::Malformed("response head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(ExchangeError::Head(error)),
    };
    let status = parsed
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(ExchangeError::Malformed("invalid status code"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Names now; values once the head is frozen, by their place in it.
    let base = buf.as_ptr() as usize;
    fields.clear();
    for header in parsed.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| ExchangeError::Malformed("invalid header name"))?;
        let start = header.value.as_ptr() as usize - base;
        fields.push((name, start, start + header.value.len()));
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, start, end) in fields.drain(..) {
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| ExchangeError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
    }))
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body: a response to HEAD, 1xx, 204, 304.
    Empty,
    /// Content-Length: this many bytes still to come.
    Length(u64),
    /// Transfer-Encoding ending in chunked.
    Chunked(ChunkState),
    /// Neither: the body runs until the upstream closes the connection.
    UntilClose,
}

/// Where a chunked body decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: expecting trailer fields or the final CRLF.
    Trailers,
}

fn response_framing(method: &Method, head: &ResponseHead) -> Result<Framing, ExchangeError> {
    let status = head.status;
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if let Some(codings) = head.headers.get_all(TRANSFER_ENCODING).iter().next_back() {
        let last = codings
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .unwrap_or(b"");
        return Ok(if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(ChunkState::Size)
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for value in head.headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let parsed = parse_decimal(part.trim_ascii())
                .ok_or(ExchangeError::Malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(ExchangeError::Malformed(
                    "conflicting Content-Length values",
                ));
            }
            length = Some(parsed);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Whether the connection may carry another request after this response.
fn keeps_alive(head: &ResponseHead) -> bool {
    let has = |token: &[u8]| {
        head.headers.get_all(CONNECTION).iter().any(|value| {
            value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
        })
    };
    match head.version {
        Version::HTTP_11 => !has(b"close"),
        _ => has(b"keep-alive"),
    }
}

/// Builds the response once its head is in: works out the body's framing, and when the whole
/// body is already buffered (the common small response), returns the connection to the pool
/// at once.
fn finish_head(
    mut exchange: Exchange,
    head: ResponseHead,
    method: &Method,
    endpoint: &Arc<Endpoint>,
    settings: UpstreamSettings,
) -> Result<Response<UpstreamBody>, ExchangeError> {
    let framing = response_framing(method, &head)?;
    let reusable = keeps_alive(&head);
    let mut response = Response::new(UpstreamBody {
        state: BodyState::Done,
    });
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    let status = head.status;
    *response.headers_mut() = head.headers;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        response.body_mut().state = BodyState::Switched(Some(exchange.connection));
        return Ok(response);
    }
    let buffered = exchange.connection.read_buf.len() as u64;
    let whole = match framing {
        Framing::Empty => Some(None),
        Framing::Length(n) if n <= buffered => Some(Some(
            exchange.connection.read_buf.split_to(n as usize).freeze(),
        )),
        _ => None,
    };
    if let Some(data) = whole {
        if reusable
            && exchange.request_done()
            && !exchange.broken
            && exchange.connection.read_buf.is_empty()
        {
            endpoint
                .pool
                .checkin(exchange.connection, settings.idle_timeout);
        }
        response.body_mut().state = BodyState::Whole(data.filter(|d| !d.is_empty()));
        return Ok(response);
    }
    response.body_mut().state = BodyState::Reading(Box::new(Reading {
        exchange,
        framing,
        reusable,
        endpoint: endpoint.clone(),
        idle_timeout: settings.idle_timeout,
    }));
    Ok(response)
}

/// A response body from upstream. Read to the end, it hands its connection back to the
/// endpoint's pool (when the upstream keeps it alive and the request went out whole); dropped
/// earlier (a client gone mid-body), the connection closes.
pub struct UpstreamBody {
    state: BodyState,
}

enum BodyState {
    /// The whole body came with the head; the connection is already back in the pool.
    Whole(Option<Bytes>),
    /// The body is read from the connection as it is polled.
    Reading(Box<Reading>),
    /// A 101 response: the connection now belongs to the tunnel.
    Switched(Option<Connection>),
    /// Nothing more.
    Done,
}

struct Reading {
    exchange: Exchange,
    framing: Framing,
    /// The upstream keeps the connection alive after this response.
    reusable: bool,
    endpoint: Arc<Endpoint>,
    idle_timeout: Duration,
}

impl UpstreamBody {
    /// For a 101 response: the upstream connection and any bytes it already sent past the
    /// head, for the tunnel.
    pub fn take_upgraded(&mut self) -> Option<(TcpStream, Bytes)> {
        match &mut self.state {
            BodyState::Switched(connection) => {
                connection.take().map(|c| (c.stream, c.read_buf.freeze()))
            }
            _ => None,
        }
    }
}

impl Reading {
    /// The next piece of the body; `None` at its end.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let connection = &mut self.exchange.connection;
        loop {
            match &mut self.framing {
                Framing::Empty | Framing::Length(0) => return Poll::Ready(None),
                Framing::Length(remaining) => {
                    if connection.read_buf.is_empty() {
                        ready!(connection.poll_fill_more(cx))?;
                    }
                    let take = (*remaining).min(connection.read_buf.len() as u64);
                    *remaining -= take;
                    let data = connection.read_buf.split_to(take as usize).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::UntilClose => {
                    if connection.read_buf.is_empty() {
                        match ready!(connection.poll_fill(cx)) {
                            Ok(0) => {
                                self.framing = Framing::Empty;
                                self.reusable = false;
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(error) => {
                                return Poll::Ready(Some(Err(ExchangeError::Read(error))));
                            }
                        }
                    }
                    let data = connection.read_buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => match decode_chunked(state, &mut connection.read_buf)? {
                    Decoded::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Decoded::Trailers(trailers) => {
                        self.framing = Framing::Empty;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Decoded::End => {
                        self.framing = Framing::Empty;
                        return Poll::Ready(None);
                    }
                    Decoded::NeedMore => ready!(connection.poll_fill_more(cx))?,
                },
            }
        }
    }

    fn is_end(&self) -> bool {
        matches!(self.framing, Framing::Empty | Framing::Length(0))
    }
}

/// What a step of the chunked decoder produced.
enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    NeedMore,
}

/// Decodes as much of a chunked body as `buf` holds, up to the next piece of output.
fn decode_chunked(state: &mut ChunkState, buf: &mut BytesMut) -> Result<Decoded, ExchangeError> {
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
                    parse_hex(digits).ok_or(ExchangeError::Malformed("invalid chunk size"))?;
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
                    return Err(ExchangeError::Malformed("chunk data not followed by CRLF"));
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
                    Err(error) => Err(ExchangeError::Head(error)),
                };
            }
        }
    }
}

fn too_long(buffered: usize) -> Result<(), ExchangeError> {
    if buffered > MAX_HEAD_LEN {
        Err(ExchangeError::Malformed(
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

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let reading = match &mut self.state {
            BodyState::Whole(data) => {
                let data = data.take();
                self.state = BodyState::Done;
                return Poll::Ready(data.map(|d| Ok(Frame::data(d))));
            }
            BodyState::Reading(reading) => reading,
            BodyState::Switched(_) | BodyState::Done => return Poll::Ready(None),
        };
        reading.exchange.poll_send_along(cx);
        let polled = reading.poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) if !reading.is_end() => {}
            Poll::Pending => {}
            Poll::Ready(Some(Err(_))) => self.state = BodyState::Done,
            Poll::Ready(Some(Ok(_)) | None) => {
                // The body is complete: the connection goes back to the pool if it can.
                if let BodyState::Reading(reading) =
                    std::mem::replace(&mut self.state, BodyState::Done)
                {
                    let Reading {
                        exchange,
                        reusable,
                        endpoint,
                        idle_timeout,
                        ..
                    } = *reading;
                    if reusable
                        && exchange.request_done()
                        && !exchange.broken
                        && exchange.connection.read_buf.is_empty()
                    {
                        endpoint.pool.checkin(exchange.connection, idle_timeout);
                    }
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            BodyState::Whole(data) => data.is_none(),
            BodyState::Reading(reading) => reading.is_end(),
            BodyState::Switched(_) | BodyState::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Whole(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            BodyState::Reading(reading) => match reading.framing {
                Framing::Length(remaining) => SizeHint::with_exact(remaining),
                Framing::Empty => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
            BodyState::Switched(_) | BodyState::Done => SizeHint::with_exact(0),
        }
    }
}

/// A response from upstream, or one the proxy made itself (errors).
pub type ResponseBody = http_body_util::Either<UpstreamBody, http_body_util::Full<Bytes>>;

/// A response as the proxy hands it to hyper.
pub type ProxyResponse = Response<ResponseBody>;

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, usize), ExchangeError> {
        let mut buf = BytesMut::from(input);
        let mut state = ChunkState::Size;
        let mut out = Vec::new();
        loop {
            match decode_chunked(&mut state, &mut buf)? {
                Decoded::Data(data) => out.extend_from_slice(&data),
                Decoded::Trailers(trailers) => return Ok((out, Some(trailers), buf.len())),
                Decoded::End => return Ok((out, None, buf.len())),
                Decoded::NeedMore => return Err(ExchangeError::Closed),
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
    fn bad_chunks_are_errors() {
        assert!(decode_all(b"zz\r\nhello\r\n0\r\n\r\n").is_err());
        assert!(decode_all(b"5\r\nhelloXX0\r\n\r\n").is_err());
        assert!(decode_all(b"ffffffffffffffffff\r\n").is_err());
    }

    fn parse(raw: &[u8]) -> (Result<Option<ResponseHead>, ExchangeError>, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let parsed = parse_response_head(&mut buf, &mut Vec::new());
        (parsed, buf)
    }

    fn head(raw: &[u8]) -> ResponseHead {
        parse(raw).0.unwrap().unwrap()
    }

    #[test]
    fn response_heads_parse_and_frame() {
        let (parsed, buf) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello");
        let parsed = parsed.unwrap().unwrap();
        assert_eq!(parsed.status, 200);
        assert_eq!(parsed.headers["x-a"], "1");
        assert_eq!(&buf[..], b"hello");
        assert_eq!(
            response_framing(&Method::GET, &parsed).unwrap(),
            Framing::Length(5)
        );
        assert_eq!(
            response_framing(&Method::HEAD, &parsed).unwrap(),
            Framing::Empty
        );
        assert!(keeps_alive(&parsed));

        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le").0.unwrap().is_none());
        assert!(parse(b"HTTP/1.1 2x0 OK\r\n\r\n").0.is_err());

        let chunked = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n",
        );
        assert_eq!(
            response_framing(&Method::GET, &chunked).unwrap(),
            Framing::Chunked(ChunkState::Size)
        );
        let gzip_only = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &gzip_only).unwrap(),
            Framing::UntilClose
        );
        let none = head(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &none).unwrap(),
            Framing::UntilClose
        );
        let no_content = head(b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &no_content).unwrap(),
            Framing::Empty
        );
        let same = head(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n");
        assert_eq!(
            response_framing(&Method::GET, &same).unwrap(),
            Framing::Length(3)
        );
        let conflict = head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n");
        assert!(response_framing(&Method::GET, &conflict).is_err());
        let bad = head(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n");
        assert!(response_framing(&Method::GET, &bad).is_err());
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(!keeps_alive(&head(
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\n\r\n"
        )));
        assert!(!keeps_alive(&head(b"HTTP/1.0 200 OK\r\n\r\n")));
        assert!(keeps_alive(&head(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"
        )));
    }

    #[test]
    fn request_frames_encode() {
        let mut buf = Vec::new();
        assert!(!encode_frame(
            Frame::data(Bytes::from_static(b"hello")),
            true,
            &mut buf
        ));
        assert!(!encode_frame(Frame::data(Bytes::new()), true, &mut buf));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("1"));
        assert!(encode_frame(Frame::trailers(trailers), true, &mut buf));
        assert_eq!(buf, b"5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n");
        let mut raw = Vec::new();
        encode_frame(Frame::data(Bytes::from_static(b"abc")), false, &mut raw);
        assert_eq!(raw, b"abc");
    }
}
