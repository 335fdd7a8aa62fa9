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
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::config::MAX_WORKERS;
use crate::http1::body::{self, Framing, MessageError, READ_CHUNK, encode_frame};
use crate::http1::head::{
    self, ResponseHead, keeps_alive, parse_response_head, recycle_map, response_framing,
};
use crate::http1::server::RequestBody as ClientBody;
use crate::routing::Endpoint;
use crate::stall::StallTimer;
use crate::worker_index::current_worker;

/// Connection settings of a backend. A reload that changes them keeps the endpoints and their
/// pools: the new values apply from the next connect, checkout or checkin.
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

/// The body of a request sent upstream: the client's own, streamed as it arrives.
#[derive(Debug)]
pub enum ForwardBody {
    /// None at all.
    Empty,
    /// From a connection hyper serves (HTTP/2, and HTTP/1 connections handed to it).
    Hyper(Incoming),
    /// From an HTTP/1.1 connection the proxy serves itself.
    Client(ClientBody),
}

/// Why reading a client's request body failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardBodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Client(#[from] MessageError),
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = ForwardBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ForwardBodyError>>> {
        let polled = match self.get_mut() {
            ForwardBody::Empty => return Poll::Ready(None),
            ForwardBody::Hyper(body) => {
                ready!(Pin::new(body).poll_frame(cx)).map(|f| f.map_err(ForwardBodyError::from))
            }
            ForwardBody::Client(body) => {
                ready!(Pin::new(body).poll_frame(cx)).map(|f| f.map_err(ForwardBodyError::from))
            }
        };
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ForwardBody::Empty => true,
            ForwardBody::Hyper(body) => body.is_end_stream(),
            ForwardBody::Client(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ForwardBody::Empty => SizeHint::with_exact(0),
            ForwardBody::Hyper(body) => body.size_hint(),
            ForwardBody::Client(body) => body.size_hint(),
        }
    }
}

/// Request body bytes gathered (with the head) before they are written.
const WRITE_BATCH: usize = 64 * 1024;
/// Idle connections kept per endpoint and worker; beyond this a returning one is closed.
const MAX_IDLE: usize = 512;

/// Why no connection to an endpoint could be used (nothing of the request was sent).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect failed")]
    Io(#[source] io::Error),
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    #[error("the new connection failed before the request could be sent")]
    Closed(#[source] ExchangeError),
}

/// What went wrong in an exchange with an upstream.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("writing the request failed")]
    Write(#[source] io::Error),
    #[error("reading the response failed")]
    Response(#[from] MessageError),
    #[error("the client's request body failed")]
    RequestBody(#[source] ForwardBodyError),
    /// A pooled connection closed before it took the request, and the fresh connection the
    /// request was to be sent again on could not be made.
    #[error("the pooled connection closed and a new one could not be made")]
    Reconnect(#[source] Box<ConnectError>),
    /// `read_timeout`: the upstream sent nothing of the response body for this long.
    #[error("the upstream sent nothing of the response body for {0:?} (read_timeout)")]
    ReadTimeout(Duration),
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
    /// `client_body_timeout`: the client sent nothing of its request body for this long while
    /// the upstream had all it was given.
    ClientStalled(Duration),
    /// `request_timeout`: the upstream took none of the request, or sent no response head
    /// after the request's end, for this long.
    TimedOut(Duration),
}

/// The timeouts of an exchange by phase, as nginx has them: none of them bounds a whole
/// transfer, so an upload or a download may take as long as it keeps moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeTimeouts {
    /// Between two pieces of the client's request body (`client_body_timeout`, 408).
    pub client_body: Duration,
    /// From the end of the request to the response head, and between two writes of the
    /// request to the upstream (`request_timeout`, 504).
    pub request: Duration,
    /// Between two reads of the response body (`read_timeout`; the connection is closed).
    pub read: Duration,
}

/// Request bytes kept after they were written, so that a request that met a pooled connection
/// the upstream had closed can be sent again on a fresh one. Larger requests are not replayed.
const REPLAY_LIMIT: usize = 64 * 1024;

/// RFC 9110 §9.2.2: a request with one of these methods may be sent again after a failure
/// that leaves unknown whether the upstream acted on it.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// One keep-alive connection to an endpoint, with the buffers it keeps between requests.
#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    /// Bytes read from the upstream and not consumed yet.
    read_buf: BytesMut,
    /// The request bytes being written; kept for its capacity.
    write_buf: Vec<u8>,
    /// When the connection last went idle (into the pool).
    idle_since: Instant,
}

impl Connection {
    fn new(stream: TcpStream) -> Self {
        Connection {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: Vec::with_capacity(1024),
            idle_since: Instant::now(),
        }
    }

    /// Whether an idle connection can take a request: young enough, and nothing heard from
    /// the upstream since its last response (a FIN, or bytes nobody asked for). The readiness
    /// check costs no system call unless the socket became readable; it can lag behind the
    /// socket by a few events, which a request that can be sent again tolerates.
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

    /// Asks the socket itself (one system call) whether the upstream closed the connection or
    /// sent something unasked; for requests that cannot be sent again once written.
    fn is_quiet_now(&self) -> bool {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        matches!(socket2::SockRef::from(&self.stream).peek(&mut probe),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock)
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
    /// way are closed. With `verify`, the socket is asked too (see [`Connection::is_quiet_now`]).
    fn checkout(&self, idle_timeout: Duration, verify: bool) -> Option<Connection> {
        let mut idle = self.mine();
        while let Some(connection) = idle.pop_back() {
            if connection.is_reusable(idle_timeout) && (!verify || connection.is_quiet_now()) {
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

    /// Closes this worker's idle connections that expired or that the upstream closed, so
    /// that they do not linger in CLOSE_WAIT until the next request to the endpoint.
    pub fn sweep(&self, idle_timeout: Duration) {
        self.mine().retain(|c| c.is_reusable(idle_timeout));
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
    ///
    /// Until the head, the phase timeouts apply: `client_body` while the upstream has all it
    /// was given and the client's body is awaited, `request` while the upstream takes no
    /// bytes or, the request sent, has not answered (from `started` for a request without a
    /// body to send). A pooled connection that the upstream turns out to have closed
    /// (before any byte of a response) is replaced by a fresh one when the request can be sent
    /// again: nothing of it was written; or the upstream closed while it was being written;
    /// or it is idempotent and the connection closed or reset with no response.
    pub async fn send(
        &self,
        endpoint: &Arc<Endpoint>,
        request: Request<ForwardBody>,
        timeouts: ExchangeTimeouts,
        started: tokio::time::Instant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let (parts, body) = request.into_parts();
        let idempotent = is_idempotent(&parts.method);
        let timer = tokio::time::sleep_until(started + timeouts.request);
        tokio::pin!(timer);
        let mut clock = PhaseClock::default();
        let mut attempt = Attempt::Whole(body);
        loop {
            // A request that cannot be sent again once written asks the socket itself
            // whether the upstream closed a pooled connection; a replay takes a fresh one.
            let pooled = match attempt {
                Attempt::Whole(_) => endpoint
                    .pool
                    .checkout(self.settings.idle_timeout, !idempotent),
                Attempt::Replay(_) => None,
            };
            let (connection, reused) = match pooled {
                Some(connection) => (connection, true),
                None => match self.connect(endpoint).await {
                    Ok(connection) => (connection, false),
                    Err(error) => {
                        return Err(match attempt {
                            Attempt::Whole(body) => {
                                let request = Box::new(Request::from_parts(parts, body));
                                SendError::NotSent { request, error }
                            }
                            Attempt::Replay(_) => {
                                SendError::Failed(ExchangeError::Reconnect(Box::new(error)))
                            }
                        });
                    }
                },
            };
            let mut exchange = match attempt {
                Attempt::Whole(body) => Exchange::start(connection, &parts, body, reused),
                Attempt::Replay(replay) => Exchange::resume(connection, replay),
            };
            let head = poll_fn(|cx| {
                if let Poll::Ready(head) = exchange.poll_response_head(cx) {
                    return Poll::Ready(head.map_err(Failure::Exchange));
                }
                clock.poll_expired(&exchange, timer.as_mut(), timeouts, cx)
            })
            .await;
            let error = match head {
                Ok(head) => {
                    let settings = self.settings;
                    let response =
                        finish_head(exchange, head, &parts.method, endpoint, settings, timeouts);
                    recycle_map(parts.headers);
                    return response.map_err(SendError::Failed);
                }
                Err(Failure::Stalled(Phase::Client)) => {
                    return Err(SendError::ClientStalled(timeouts.client_body));
                }
                Err(Failure::Stalled(_)) => return Err(SendError::TimedOut(timeouts.request)),
                Err(Failure::Exchange(error)) => error,
            };
            if !reused {
                // A new connection that fails before anything of the request went out is
                // treated like a failed connect: the request goes elsewhere whole.
                return match exchange.into_untouched_body() {
                    Some(untouched) => {
                        let request = Box::new(Request::from_parts(parts, untouched));
                        let error = ConnectError::Closed(error);
                        Err(SendError::NotSent { request, error })
                    }
                    None => Err(SendError::Failed(error)),
                };
            }
            match exchange.into_retry(&error, idempotent) {
                Some(next) => {
                    tracing::debug!(endpoint = %endpoint.url, error = %error, "pooled connection was closed by the upstream; sending again");
                    attempt = next;
                }
                None => return Err(SendError::Failed(error)),
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
    Streaming { body: ForwardBody, chunked: bool },
}

/// What an exchange sends.
enum Attempt {
    /// The request as the client sent it, nothing of it taken yet.
    Whole(ForwardBody),
    /// A request that met a closed pooled connection, to be sent again on a fresh one.
    Replay(Replay),
}

/// Everything taken of a request so far, as written, and the rest of its body.
struct Replay {
    bytes: Vec<u8>,
    request_body: RequestBody,
}

/// Where an exchange stands before its response head, for the phase timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// All that was taken is written; more of the client's body is awaited.
    Client,
    /// Request bytes wait for the upstream to take them.
    Upstream,
    /// The request is sent; the response head is awaited.
    Head,
}

/// Why no response head came.
enum Failure {
    Exchange(ExchangeError),
    /// Nothing moved for the timeout of this phase.
    Stalled(Phase),
}

/// Restarts the timer of an exchange whenever its request moves or its phase changes: the
/// timeouts bound each pause, never a whole upload. A request with nothing to stream stays
/// in [`Phase::Head`] throughout, and its deadline never moves (no clock read).
struct PhaseClock {
    phase: Phase,
    progress: u64,
}

impl Default for PhaseClock {
    fn default() -> Self {
        PhaseClock {
            phase: Phase::Head,
            progress: 0,
        }
    }
}

impl PhaseClock {
    /// Called while the exchange is pending: `Ready` with the phase that stalled once its
    /// timeout has passed.
    fn poll_expired(
        &mut self,
        exchange: &Exchange,
        mut timer: Pin<&mut tokio::time::Sleep>,
        timeouts: ExchangeTimeouts,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ResponseHead, Failure>> {
        let phase = exchange.phase();
        let restart = match phase {
            Phase::Head => self.phase != Phase::Head,
            _ => self.phase != phase || self.progress != exchange.progress,
        };
        if restart {
            let limit = match phase {
                Phase::Client => timeouts.client_body,
                Phase::Upstream | Phase::Head => timeouts.request,
            };
            timer.as_mut().reset(tokio::time::Instant::now() + limit);
        }
        self.phase = phase;
        self.progress = exchange.progress;
        ready!(timer.poll(cx));
        Poll::Ready(Err(Failure::Stalled(phase)))
    }
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
    empty_body: Option<ForwardBody>,
    /// The request could not be written whole: the connection cannot be reused.
    broken: bool,
    /// Written bytes stay in `write_buf`, so that the request can be sent again on a fresh
    /// connection: on a pooled connection until a response byte arrives or the request
    /// passes [`REPLAY_LIMIT`].
    keep_for_replay: bool,
    /// Bumped whenever a piece of the body is taken or bytes are written.
    progress: u64,
}

impl Exchange {
    /// Encodes the request head into the connection's write buffer; nothing is written yet.
    /// On a `reused` connection the written bytes are kept for a replay.
    fn start(mut connection: Connection, parts: &Parts, body: ForwardBody, reused: bool) -> Self {
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
            head::put_field(buf, name, value);
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
            keep_for_replay: reused,
            progress: 0,
        }
    }

    /// Sends a request again on a fresh connection: what was taken of it first, then the
    /// rest of its body. It is not replayed a second time.
    fn resume(mut connection: Connection, replay: Replay) -> Self {
        connection.write_buf = replay.bytes;
        Exchange {
            connection,
            written: 0,
            touched: true,
            request_body: replay.request_body,
            empty_body: None,
            broken: false,
            keep_for_replay: false,
            progress: 0,
        }
    }

    /// The client's body, when nothing of the request was written or taken from it.
    fn into_untouched_body(self) -> Option<ForwardBody> {
        if self.touched {
            return None;
        }
        match self.request_body {
            RequestBody::Streaming { body, .. } => Some(body),
            RequestBody::Done => self.empty_body,
        }
    }

    /// What to send on another connection after `error` on this pooled one, if the request
    /// may be sent again: nothing of it went out; or the upstream closed the connection while
    /// it was being written; or, for an idempotent request, the connection closed or reset
    /// with no byte of a response.
    fn into_retry(self, error: &ExchangeError, idempotent: bool) -> Option<Attempt> {
        if !self.touched {
            return self.into_untouched_body().map(Attempt::Whole);
        }
        if !self.keep_for_replay {
            return None;
        }
        may_send_again(error, idempotent, self.request_done()).then(|| {
            Attempt::Replay(Replay {
                bytes: self.connection.write_buf,
                request_body: self.request_body,
            })
        })
    }

    /// Stops keeping written bytes for a replay, and drops those.
    fn stop_keeping(&mut self) {
        if self.keep_for_replay {
            self.keep_for_replay = false;
            self.connection.write_buf.drain(..self.written);
            self.written = 0;
        }
    }

    fn request_done(&self) -> bool {
        matches!(self.request_body, RequestBody::Done)
            && self.written == self.connection.write_buf.len()
    }

    /// Everything taken of the request is written, and the rest of the client's body has not
    /// arrived yet.
    fn waiting_for_client(&self) -> bool {
        matches!(self.request_body, RequestBody::Streaming { .. })
            && self.written == self.connection.write_buf.len()
    }

    fn phase(&self) -> Phase {
        if self.written < self.connection.write_buf.len() {
            Phase::Upstream
        } else if self.waiting_for_client() {
            Phase::Client
        } else {
            Phase::Head
        }
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
                        self.progress += 1;
                        let chunked = *chunked;
                        if encode_frame(frame, chunked, &mut self.connection.write_buf) {
                            self.request_body = RequestBody::Done;
                        }
                        if self.connection.write_buf.len() > REPLAY_LIMIT {
                            self.stop_keeping();
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
                        self.progress += 1;
                        self.written += n;
                        if self.written == self.connection.write_buf.len() && !self.keep_for_replay
                        {
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

    /// Goes on writing the request (unless writing already failed) without waiting for it.
    /// A write error ends the writing, not the exchange: the upstream may have answered
    /// already (say 413) and closed its reading side. A failure of the client's body ends
    /// the exchange: the upstream would wait for the rest of a body that never comes.
    fn poll_send_along(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        if self.broken || self.request_done() {
            return Ok(());
        }
        match self.poll_send(cx) {
            Poll::Ready(Err(error @ ExchangeError::RequestBody(_))) => Err(error),
            _ => Ok(()),
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
            self.poll_send_along(cx)?;
        }
        loop {
            if !self.connection.read_buf.is_empty()
                && let Some(head) = parse_response_head(&mut self.connection.read_buf)
                    .map_err(MessageError::from)?
            {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    continue;
                }
                return Poll::Ready(Ok(head));
            }
            let connection = &mut self.connection;
            ready!(body::poll_fill_more(
                &mut connection.stream,
                &mut connection.read_buf,
                cx
            ))?;
            // The upstream answers: whatever happens now, the request is not sent again.
            self.stop_keeping();
            self.poll_send_along(cx)?;
        }
    }
}

/// Whether a request that failed with `error` on a pooled connection, before any byte of a
/// response, may be sent again on a fresh one: when the upstream closed the connection while
/// the request was being written (it cannot have acted on a request it did not have whole),
/// or, for an idempotent request, when the connection closed or reset after it was written.
fn may_send_again(error: &ExchangeError, idempotent: bool, all_written: bool) -> bool {
    let closed = match error {
        ExchangeError::Write(_) => return true,
        ExchangeError::Response(MessageError::Closed) => true,
        ExchangeError::Response(MessageError::Read(e)) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ),
        _ => false,
    };
    closed && (idempotent || !all_written)
}

/// Builds the response once its head is in: works out the body's framing, and when the whole
/// body is already buffered (the common small response), returns the connection to the pool
/// at once.
fn finish_head(
    mut exchange: Exchange,
    mut head: ResponseHead,
    method: &Method,
    endpoint: &Arc<Endpoint>,
    settings: UpstreamSettings,
    timeouts: ExchangeTimeouts,
) -> Result<Response<UpstreamBody>, ExchangeError> {
    exchange.stop_keeping();
    let framing = response_framing(method, &mut head).map_err(MessageError::from)?;
    // A body delimited by the close, or a message with both Transfer-Encoding and
    // Content-Length (RFC 9112 §6.1: handle as an error), leaves nothing to reuse.
    let reusable = keeps_alive(head.version, &head.headers)
        && framing != Framing::UntilClose
        && !(head.headers.contains_key(TRANSFER_ENCODING)
            && head.headers.contains_key(CONTENT_LENGTH));
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
        stall: StallTimer::new(timeouts.read),
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
    /// `read_timeout`: the longest pause between two reads of the body.
    stall: StallTimer,
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
    /// The next piece of the body; `None` at its end. An error once the upstream has sent
    /// nothing for `read_timeout`.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let connection = &mut self.exchange.connection;
        let polled = body::poll_body(
            &mut self.framing,
            &mut connection.stream,
            &mut connection.read_buf,
            cx,
        );
        if polled.is_ready() {
            let _ = self.stall.poll_stalled(true, cx);
            return polled.map_err(ExchangeError::from);
        }
        ready!(self.stall.poll_stalled(false, cx));
        Poll::Ready(Some(Err(ExchangeError::ReadTimeout(self.stall.limit()))))
    }
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
        let polled = match reading.exchange.poll_send_along(cx) {
            Ok(()) => reading.poll_next(cx),
            Err(error) => Poll::Ready(Some(Err(error))),
        };
        match &polled {
            Poll::Ready(Some(Ok(_))) if !reading.framing.is_end() => {}
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
            BodyState::Reading(reading) => reading.framing.is_end(),
            BodyState::Switched(_) | BodyState::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Whole(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            BodyState::Reading(reading) => reading.framing.size_hint(),
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

    #[test]
    fn only_requests_the_upstream_cannot_have_acted_on_are_sent_again() {
        let reset =
            || ExchangeError::Response(MessageError::Read(io::ErrorKind::ConnectionReset.into()));
        let closed = || ExchangeError::Response(MessageError::Closed);
        let write = || ExchangeError::Write(io::ErrorKind::BrokenPipe.into());
        // Closed while writing: whatever the method.
        assert!(may_send_again(&write(), false, false));
        assert!(may_send_again(&closed(), false, false));
        assert!(may_send_again(&reset(), false, false));
        // Written whole, then closed or reset with no response: only idempotent requests.
        assert!(may_send_again(&closed(), true, true));
        assert!(may_send_again(&reset(), true, true));
        assert!(!may_send_again(&closed(), false, true));
        assert!(!may_send_again(&reset(), false, true));
        // Anything else is an answer of sorts, or another failure: never.
        let malformed = ExchangeError::Response(MessageError::Malformed("x"));
        assert!(!may_send_again(&malformed, true, true));
        let timed_out = ExchangeError::Response(MessageError::Read(io::ErrorKind::TimedOut.into()));
        assert!(!may_send_again(&timed_out, true, false));
        for method in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(is_idempotent(&method), "{method}");
        }
        for method in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&method), "{method}");
        }
    }

    #[tokio::test]
    async fn a_close_the_runtime_has_not_seen_yet_is_found_by_asking_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let connection = Connection::new(client);
        assert!(connection.is_quiet_now());
        drop(server);
        // No await from here on: the runtime's readiness for the socket cannot change, but
        // the kernel has the FIN.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!connection.is_quiet_now());
    }
}
