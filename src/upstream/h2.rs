//! HTTP/2 to upstreams (`protocol = "h2c"`; `"h2"` once TLS reaches upstreams): hyper's
//! HTTP/2 client, on connections kept per endpoint and worker thread, each carrying many
//! requests at once.
//!
//! A connection's tasks (hyper's dispatcher, which [`handshake`] spawns as a driver that
//! watches it, and the connection's own task) run on the runtime of the worker that opened it,
//! so each worker sends on its own connections. A connection carries at most [`MAX_STREAMS`]
//! requests at once, fewer when the server's `SETTINGS_MAX_CONCURRENT_STREAMS` says so; a
//! request that finds every connection full opens another. Requests that find a connection
//! being opened wait for it (up to its stream limit) rather than each opening its own. A
//! connection whose driver ended, that met a GOAWAY or a connection failure, or that stayed
//! idle past `upstream_idle_timeout` takes no more requests (the sweep closes idle ones).
//! hyper pings the server every [`PING_INTERVAL`] and closes a connection that does not
//! answer within [`PING_TIMEOUT`].
//!
//! The IO under a connection is generic ([`handshake`] takes any stream), so a TLS stream
//! with ALPN `h2` plugs in where [`connect`] opens the TCP connection for h2c.
//!
//! The request goes as HTTP/2 whatever the client spoke: `:authority` from `Host` (which is
//! then left out), `:scheme` from the protocol; a gRPC request always carries `te: trailers`
//! (as nginx's `grpc_pass` sends it: gRPC servers refuse calls without it). Its body streams
//! through [`OutBody`], which keeps what it passed on (up to [`REPLAY_LIMIT`]) until the
//! response head, so that a request the server did not act on (REFUSED_STREAM, or a stream
//! above a GOAWAY's last stream id) can be sent again on another connection, once. Connect
//! failures give the request back whole ([`SendError::NotSent`]), as the HTTP/1 path does.

use std::collections::VecDeque;
use std::error::Error as _;
use std::future::poll_fn;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, TE, UPGRADE};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::exchange::{Phase, is_idempotent};
use super::{
    ConnectError, ExchangeError, ExchangeTimeouts, ForwardBody, ForwardBodyError, Peer, SendError,
    UpstreamBody, UpstreamSettings, connect_tcp, connect_tls,
};
use crate::config::{ALPN_H2, MAX_WORKERS, UpstreamProtocol};
use crate::worker_index::current_worker;

/// Requests a connection carries at once at most, whatever the server allows: past it, another
/// connection is opened. 100 is what RFC 9113 §6.5.2 recommends a server allow at least, and
/// hyper's (and h2's) assumption until the server's SETTINGS arrive.
pub(super) const MAX_STREAMS: usize = 100;

/// Request body bytes kept until the response head, to send a refused request again.
const REPLAY_LIMIT: usize = 64 * 1024;

/// How often hyper pings an upstream connection, idle or not.
const PING_INTERVAL: Duration = Duration::from_secs(20);

/// How long a ping may go unanswered before the connection is closed.
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How many connections one request opens (or waits for) at most before it gives up: one, and
/// another when the first was taken by other requests or closed at once.
const OPEN_ATTEMPTS: usize = 3;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// The pool

/// The HTTP/2 connections to one endpoint, one lane per worker thread.
#[derive(Debug)]
pub(super) struct H2Pool {
    lanes: Box<[Mutex<Lane>]>,
}

impl Default for H2Pool {
    fn default() -> Self {
        H2Pool {
            lanes: (0..MAX_WORKERS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// One worker's connections to an endpoint.
#[derive(Debug, Default)]
struct Lane {
    connections: Vec<H2Connection>,
    /// A connection being opened, which requests wait for.
    opening: Option<Opening>,
    /// Tells one opening from the next.
    openings: u64,
    /// The stream limit the endpoint's connections last had (0: none known yet), which a new
    /// connection is expected to have until its server's SETTINGS say.
    limit_hint: usize,
}

impl Lane {
    /// Requests a new connection is expected to take at once.
    fn expected_limit(&self) -> usize {
        match self.limit_hint {
            0 => MAX_STREAMS,
            hint => hint,
        }
    }
}

#[derive(Debug)]
struct Opening {
    id: u64,
    /// `Some` once the connection is in the lane (`Ok`) or could not be made.
    done: watch::Receiver<Option<Opened>>,
    /// Requests waiting for it; past its expected stream limit, another one is opened.
    waiting: usize,
}

type Opened = Result<(), Arc<ConnectError>>;

/// One HTTP/2 connection: hyper's handle to send on it, and what the pool knows of it.
#[derive(Debug)]
struct H2Connection {
    sender: SendRequest<OutBody>,
    state: Arc<ConnState>,
}

/// What the pool, the requests on a connection and its driver share.
#[derive(Debug)]
struct ConnState {
    /// Requests sent on it whose response has not ended.
    streams: AtomicUsize,
    /// Requests it may carry at once: [`MAX_STREAMS`], or the server's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` when lower.
    limit: AtomicUsize,
    /// It takes no new request: its driver ended, or a request on it met a GOAWAY, a refusal
    /// or a connection failure.
    retired: AtomicBool,
    /// When its last request ended (or it opened).
    idle_since: Mutex<Instant>,
}

impl ConnState {
    fn new(limit: usize) -> Self {
        ConnState {
            streams: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            retired: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        }
    }
}

impl H2Connection {
    /// Whether it may still take requests (now or once some end).
    fn is_open(&self, idle_timeout: Duration) -> bool {
        let state = &self.state;
        !state.retired.load(Ordering::Acquire)
            && !self.sender.is_closed()
            && (state.streams.load(Ordering::Acquire) > 0
                || lock(&state.idle_since).elapsed() < idle_timeout)
    }

    fn has_room(&self) -> bool {
        self.state.streams.load(Ordering::Acquire) < self.state.limit.load(Ordering::Acquire)
    }
}

/// A request's place on a connection, from its sending to the end of its response: given
/// back when dropped.
#[derive(Debug)]
pub(super) struct StreamSlot {
    state: Arc<ConnState>,
}

impl StreamSlot {
    fn take(state: &Arc<ConnState>) -> Self {
        state.streams.fetch_add(1, Ordering::AcqRel);
        StreamSlot {
            state: state.clone(),
        }
    }

    /// No more requests go on this connection (those on it finish).
    fn retire(&self) {
        self.state.retired.store(true, Ordering::Release);
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.state.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.state.idle_since) = Instant::now();
        }
    }
}

/// What a request found in its lane.
enum Checkout {
    Stream(SendRequest<OutBody>, StreamSlot),
    /// A connection is being opened: wait for it.
    Wait(watch::Receiver<Option<Opened>>),
    /// Open one: the lane counts on this request to.
    Open(Open),
}

/// A connection a request is to open: which opening it is, where to say it is done (and to
/// wait for that), and the stream limit it starts with.
struct Open {
    id: u64,
    done: watch::Sender<Option<Opened>>,
    wait: watch::Receiver<Option<Opened>>,
    limit: usize,
}

impl H2Pool {
    fn lane(&self, index: usize) -> MutexGuard<'_, Lane> {
        lock(&self.lanes[index % self.lanes.len()])
    }

    /// A place on the oldest open connection with room, so that requests gather on few
    /// connections; else the connection being opened (as many requests wait for it as it is
    /// expected to take), or the word to open one.
    fn checkout(&self, lane: usize, idle_timeout: Duration) -> Checkout {
        let mut lane = self.lane(lane);
        lane.connections.retain(|c| c.is_open(idle_timeout));
        let limits = lane.connections.iter();
        if let Some(limit) = limits.map(|c| c.state.limit.load(Ordering::Acquire)).min() {
            lane.limit_hint = limit;
        }
        if let Some(connection) = lane.connections.iter().find(|c| c.has_room()) {
            let slot = StreamSlot::take(&connection.state);
            return Checkout::Stream(connection.sender.clone(), slot);
        }
        let limit = lane.expected_limit();
        if let Some(opening) = &mut lane.opening
            && opening.waiting < limit
        {
            opening.waiting += 1;
            return Checkout::Wait(opening.done.clone());
        }
        lane.openings += 1;
        let id = lane.openings;
        let (done, wait) = watch::channel(None);
        lane.opening = Some(Opening {
            id,
            done: wait.clone(),
            waiting: 1,
        });
        Checkout::Open(Open {
            id,
            done,
            wait,
            limit,
        })
    }

    /// Closes this worker's connections that are idle past `idle_timeout` or closed; those
    /// still carrying requests close once these end.
    pub(super) fn sweep(&self, idle_timeout: Duration) {
        self.lane(current_worker())
            .connections
            .retain(|c| c.is_open(idle_timeout));
    }
}

/// A place on a connection to `peer`: on one with room, or on a new one (opened by a task of
/// this worker, which other requests may wait for too).
async fn stream(
    peer: &Arc<Peer>,
    settings: UpstreamSettings,
) -> Result<(SendRequest<OutBody>, StreamSlot), ConnectError> {
    let lane = current_worker();
    for _ in 0..OPEN_ATTEMPTS {
        let mut wait = match peer.h2.checkout(lane, settings.idle_timeout) {
            Checkout::Stream(sender, slot) => return Ok((sender, slot)),
            Checkout::Wait(wait) => wait,
            Checkout::Open(open) => {
                let wait = open.wait.clone();
                // A task of its own: the connection is made even if this request goes away.
                tokio::spawn(open_connection(peer.clone(), settings, lane, open));
                wait
            }
        };
        match wait.wait_for(Option::is_some).await {
            Ok(opened) => {
                if let Some(Err(error)) = &*opened {
                    return Err(ConnectError::Shared(error.clone()));
                }
            }
            Err(_) => {
                return Err(ConnectError::Io(io::Error::other(
                    "the connection being opened was abandoned",
                )));
            }
        }
    }
    Err(ConnectError::Io(io::Error::other(
        "no HTTP/2 connection could take the request",
    )))
}

/// Opens a connection into lane `lane` of `peer` within `connect_timeout` (the TCP connect and
/// the handshake), and tells the requests waiting for it.
async fn open_connection(peer: Arc<Peer>, settings: UpstreamSettings, lane: usize, open: Open) {
    let timeout = settings.connect_timeout;
    let connecting = connect(&peer, settings.protocol, open.limit);
    let opened = match tokio::time::timeout(timeout, connecting).await {
        Ok(opened) => opened,
        Err(_) => Err(ConnectError::TimedOut(timeout)),
    };
    let mut lane = peer.h2.lane(lane);
    if lane.opening.as_ref().is_some_and(|o| o.id == open.id) {
        lane.opening = None;
    }
    let opened = match opened {
        Ok(connection) => {
            lane.connections.push(connection);
            Ok(())
        }
        Err(error) => Err(Arc::new(error)),
    };
    drop(lane);
    let _ = open.done.send(Some(opened));
}

/// A new connection to `peer`: TCP (TCP_NODELAY), then the HTTP/2 handshake over it; it is
/// expected to take `limit` requests at once until its server's SETTINGS say.
async fn connect(
    peer: &Peer,
    protocol: UpstreamProtocol,
    limit: usize,
) -> Result<H2Connection, ConnectError> {
    match protocol {
        UpstreamProtocol::H2c => {
            let stream = connect_tcp(&peer.authority).await?;
            handshake(TokioIo::new(stream), limit).await
        }
        // HTTP/2 over TLS: the TLS handshake (ALPN `h2`, verified as `[backend.tls]`
        // says), then HTTP/2's over it.
        UpstreamProtocol::H2 => {
            let Some(tls) = &peer.tls else {
                return Err(ConnectError::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "h2 needs an https:// endpoint",
                )));
            };
            let stream = connect_tls(&peer.authority, tls).await?;
            if stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                return Err(ConnectError::Tls(io::Error::other(
                    "the upstream did not agree to HTTP/2 (ALPN h2)",
                )));
            }
            handshake(TokioIo::new(stream), limit).await
        }
        UpstreamProtocol::Http1 => Err(ConnectError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an HTTP/1.1 backend has no HTTP/2 connections",
        ))),
    }
}

/// The HTTP/2 handshake over `io` (any stream: TCP for h2c, TLS for h2), and the connection's
/// driver spawned on this worker's runtime. The driver follows the server's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` for the pool (as hyper's dispatcher sees it whenever it
/// sends a request), and retires the connection when it ends.
async fn handshake<T>(io: T, limit: usize) -> Result<H2Connection, ConnectError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT)
        .keep_alive_while_idle(true)
        // What h2 assumes of the server until its SETTINGS say.
        .initial_max_send_streams(limit)
        .handshake::<T, OutBody>(io)
        .await
        .map_err(ConnectError::Handshake)?;
    let state = Arc::new(ConnState::new(limit));
    let watched = state.clone();
    tokio::spawn(async move {
        let mut connection = pin!(connection);
        let ended = poll_fn(|cx| {
            let polled = connection.as_mut().poll(cx);
            let limit = connection.current_max_send_streams().min(MAX_STREAMS);
            watched.limit.store(limit.max(1), Ordering::Release);
            polled
        })
        .await;
        watched.retired.store(true, Ordering::Release);
        if let Err(error) = ended {
            tracing::debug!(%error, "upstream HTTP/2 connection ended");
        }
    });
    Ok(H2Connection { sender, state })
}

// ---------------------------------------------------------------------------------------
// The request body

/// The request body as hyper's HTTP/2 client sends it: the client's body, what it passed on
/// kept (up to [`REPLAY_LIMIT`]) until the response head, and how far it is, for the phase
/// timeouts. Its state is shared with the request's send, which takes the client's body back
/// for another attempt when hyper drops this without sending it.
pub(super) struct OutBody {
    outgoing: Arc<Mutex<Outgoing>>,
}

/// The request body's state, shared between hyper's side ([`OutBody`]) and the send.
struct Outgoing {
    /// What an earlier attempt passed on, passed on first.
    replay: VecDeque<Kept>,
    body: ForwardBody,
    /// What was passed on, while it may still be sent again: until the response head, and
    /// within [`REPLAY_LIMIT`].
    kept: Option<Vec<Kept>>,
    kept_len: usize,
    /// Something of the client's body was taken.
    touched: bool,
    /// The client's body has ended (all of it passed on).
    ended: bool,
    /// The last poll found nothing of the client's body yet: the client is awaited.
    waiting: bool,
    /// When the body last moved or started to wait (or the request started).
    since: Instant,
    /// Why the client's body failed, when it did: the request fails with it, not with what
    /// hyper made of it.
    failure: Option<ForwardBodyError>,
}

/// A piece of a request body kept for another attempt.
enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Kept::Data(data) => Frame::data(data.clone()),
            Kept::Trailers(trailers) => Frame::trailers(trailers.clone()),
        }
    }
}

/// The error hyper sees when the client's body failed (the request's own error says why).
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed")]
pub(super) struct ClientBodyFailed;

impl Outgoing {
    fn new(body: ForwardBody, started: Instant) -> Arc<Mutex<Outgoing>> {
        Arc::new(Mutex::new(Outgoing {
            replay: VecDeque::new(),
            body,
            kept: Some(Vec::new()),
            kept_len: 0,
            touched: false,
            ended: false,
            waiting: false,
            since: started,
            failure: None,
        }))
    }

    /// Everything of the body is with hyper.
    fn finished(&self) -> bool {
        self.replay.is_empty() && (self.ended || self.body.is_end_stream())
    }

    /// Where the request stands before its response head, and since when.
    fn phase(&self) -> (Phase, Instant) {
        let phase = if self.finished() {
            Phase::Head
        } else if self.waiting {
            Phase::Client
        } else {
            Phase::Upstream
        };
        (phase, self.since)
    }

    fn keep(&mut self, frame: &Frame<Bytes>) {
        let Some(kept) = &mut self.kept else { return };
        let piece = if let Some(data) = frame.data_ref() {
            self.kept_len += data.len();
            Kept::Data(data.clone())
        } else if let Some(trailers) = frame.trailers_ref() {
            Kept::Trailers(trailers.clone())
        } else {
            return;
        };
        if self.kept_len > REPLAY_LIMIT {
            self.kept = None;
        } else {
            kept.push(piece);
        }
    }

    /// The client's body, when nothing of it was taken: the request is still whole.
    fn take_untouched(&mut self) -> Option<ForwardBody> {
        (!self.touched && self.replay.is_empty())
            .then(|| std::mem::replace(&mut self.body, ForwardBody::Empty))
    }

    /// Makes the body ready to be sent again from its start: true when it can be (nothing was
    /// taken, or all that was is kept).
    fn rewind(&mut self, now: Instant) -> bool {
        if !self.touched {
            return true;
        }
        let Some(kept) = self.kept.take() else {
            return false;
        };
        let mut replay: VecDeque<Kept> = kept.into();
        replay.extend(self.replay.drain(..));
        self.replay = replay;
        // Sent once more at most: nothing is kept this time.
        self.kept_len = 0;
        self.waiting = false;
        self.since = now;
        true
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = ClientBodyFailed;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyFailed>>> {
        let outgoing = &mut *lock(&self.outgoing);
        if let Some(piece) = outgoing.replay.pop_front() {
            outgoing.since = Instant::now();
            return Poll::Ready(Some(Ok(piece.frame())));
        }
        if outgoing.ended {
            return Poll::Ready(None);
        }
        let Poll::Ready(polled) = Pin::new(&mut outgoing.body).poll_frame(cx) else {
            if !outgoing.waiting {
                outgoing.waiting = true;
                outgoing.since = Instant::now();
            }
            return Poll::Pending;
        };
        outgoing.waiting = false;
        outgoing.since = Instant::now();
        match polled {
            Some(Ok(frame)) => {
                outgoing.touched = true;
                outgoing.keep(&frame);
                outgoing.ended = frame.is_trailers();
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => {
                outgoing.touched = true;
                outgoing.ended = true;
                outgoing.failure = Some(error);
                Poll::Ready(Some(Err(ClientBodyFailed)))
            }
            None => {
                outgoing.ended = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.outgoing).finished()
    }

    fn size_hint(&self) -> SizeHint {
        let outgoing = lock(&self.outgoing);
        if outgoing.touched || !outgoing.replay.is_empty() {
            SizeHint::default()
        } else {
            outgoing.body.size_hint()
        }
    }
}

// ---------------------------------------------------------------------------------------
// The exchange

/// Sends a request (origin-form target and `Host`, as the proxy made it for any upstream) to
/// `peer` over HTTP/2; resolves when the response head has arrived. The phase timeouts are
/// those of the HTTP/1 exchange: `client_body` while the client's body is awaited, `request`
/// while the upstream takes none of it, or, the request sent, has not answered (from
/// `started` for a request without a body).
pub(super) async fn send(
    settings: UpstreamSettings,
    peer: &Arc<Peer>,
    parts: Parts,
    body: ForwardBody,
    timeouts: ExchangeTimeouts,
    started: Instant,
) -> Result<Response<UpstreamBody>, SendError> {
    if parts.headers.contains_key(UPGRADE) {
        // The proxy keeps `Upgrade` for a WebSocket upgrade only, which HTTP/2 cannot carry.
        return Err(SendError::Upgrade);
    }
    let idempotent = is_idempotent(&parts.method);
    let outgoing = Outgoing::new(body, started);
    let mut timer = pin!(tokio::time::sleep_until(started + timeouts.request));
    let mut sent_again = false;
    loop {
        let (mut sender, slot) = match stream(peer, settings).await {
            Ok(stream) => stream,
            Err(error) => {
                let untouched = lock(&outgoing).take_untouched();
                return Err(match untouched {
                    Some(body) => SendError::NotSent {
                        request: Box::new(Request::from_parts(parts, body)),
                        error,
                    },
                    None => SendError::Failed(ExchangeError::Reconnect(Box::new(error))),
                });
            }
        };
        let h2_request = as_h2_request(&parts, &peer.authority, settings.protocol, &outgoing);
        let mut response = pin!(sender.try_send_request(h2_request));
        drop(sender);
        let answered = poll_fn(|cx| {
            if let Poll::Ready(answered) = response.as_mut().poll(cx) {
                return Poll::Ready(answered.map_err(|mut error| {
                    // Given back: the request never reached the connection (it closed first).
                    let returned = error.take_message().is_some();
                    Failure::Send(error.into_error(), returned)
                }));
            }
            poll_expired(&outgoing, timer.as_mut(), timeouts, cx).map(Err)
        })
        .await;
        let (error, returned) = match answered {
            Ok(response) => {
                // The server has the request: it is not sent again.
                lock(&outgoing).kept = None;
                return Ok(UpstreamBody::from_h2(response, slot, timeouts.read));
            }
            Err(Failure::Stalled(Phase::Client)) => {
                return Err(SendError::ClientStalled(timeouts.client_body));
            }
            Err(Failure::Stalled(_)) => return Err(SendError::TimedOut(timeouts.request)),
            Err(Failure::Send(error, returned)) => (error, returned),
        };
        if let Some(failure) = lock(&outgoing).failure.take() {
            return Err(SendError::Failed(ExchangeError::RequestBody(failure)));
        }
        let verdict = judge_failure(&error, idempotent);
        if returned || verdict != Verdict::Stream {
            slot.retire();
        }
        drop(slot);
        let again = returned || verdict == Verdict::SendAgain;
        if again && !sent_again && lock(&outgoing).rewind(Instant::now()) {
            tracing::debug!(endpoint = %peer.url, error = %error, "the upstream did not take the request; sending it again on another connection");
            sent_again = true;
            continue;
        }
        if returned && let Some(body) = lock(&outgoing).take_untouched() {
            // As a new HTTP/1 connection that fails before anything was sent: the request
            // goes elsewhere whole.
            let error = ConnectError::Closed(ExchangeError::H2(error));
            let request = Box::new(Request::from_parts(parts, body));
            return Err(SendError::NotSent { request, error });
        }
        return Err(SendError::Failed(ExchangeError::H2(error)));
    }
}

/// Why no response head came.
enum Failure {
    /// hyper's error, and whether it gave the request back (it never reached the
    /// connection).
    Send(hyper::Error, bool),
    /// Nothing moved for the timeout of this phase.
    Stalled(Phase),
}

/// `Ready` once the request has stood in one phase, with no progress, for that phase's
/// timeout. The timer is set from the body's state whenever polled; it is not woken by the
/// body's progress (hyper sends it from a task of its own), but checks again when it fires.
fn poll_expired(
    outgoing: &Mutex<Outgoing>,
    mut timer: Pin<&mut Sleep>,
    timeouts: ExchangeTimeouts,
    cx: &mut Context<'_>,
) -> Poll<Failure> {
    loop {
        let (phase, since) = lock(outgoing).phase();
        let limit = match phase {
            Phase::Client => timeouts.client_body,
            Phase::Upstream | Phase::Head => timeouts.request,
        };
        let deadline = since + limit;
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        ready!(timer.as_mut().poll(cx));
        if lock(outgoing).phase() == (phase, since) {
            return Poll::Ready(Failure::Stalled(phase));
        }
    }
}

/// What a failed exchange says of the request and of its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The server did not act on the request (REFUSED_STREAM, or a stream above a GOAWAY's
    /// last stream id), or the connection failed under an idempotent one: send it again on
    /// another connection.
    SendAgain,
    /// The stream failed alone; the connection goes on.
    Stream,
    /// The connection failed.
    Connection,
}

/// RFC 9113 §8.7: a request refused with REFUSED_STREAM, or on a stream above the last stream
/// id of a GOAWAY, was not processed and may be sent again; an idempotent one also when the
/// connection failed under it with no response (RFC 9110 §9.2.2).
fn judge_failure(error: &hyper::Error, idempotent: bool) -> Verdict {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<::h2::Error>() {
            return judge_h2_failure(h2, idempotent);
        }
        source = cause.source();
    }
    // hyper's own: the connection closed or its task went away.
    if idempotent {
        Verdict::SendAgain
    } else {
        Verdict::Connection
    }
}

fn judge_h2_failure(error: &::h2::Error, idempotent: bool) -> Verdict {
    if error.is_remote() && error.is_reset() && error.reason() == Some(::h2::Reason::REFUSED_STREAM)
    {
        return Verdict::SendAgain;
    }
    if error.is_remote() && error.is_go_away() {
        return Verdict::SendAgain;
    }
    if error.is_reset() {
        return Verdict::Stream;
    }
    if idempotent && error.is_io() {
        Verdict::SendAgain
    } else {
        Verdict::Connection
    }
}

/// The request as hyper's HTTP/2 client takes it: an absolute URI (`:scheme` from the
/// protocol, `:authority` from `Host` or else the endpoint's), without `Host`; `te: trailers`
/// on a gRPC request. The body is the request's shared state. (`OPTIONS *` keeps its target
/// and `Host`: h2 sends it with `:path *` and no `:authority`.)
fn as_h2_request(
    parts: &Parts,
    endpoint: &Authority,
    protocol: UpstreamProtocol,
    outgoing: &Arc<Mutex<Outgoing>>,
) -> Request<OutBody> {
    let mut headers = parts.headers.clone();
    let asterisk = parts
        .uri
        .path_and_query()
        .is_some_and(|t| t.as_str() == "*");
    let uri = if asterisk {
        parts.uri.clone()
    } else {
        let host = headers.remove(HOST);
        let authority = host
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| endpoint.clone());
        let scheme = match protocol {
            UpstreamProtocol::H2 => Scheme::HTTPS,
            UpstreamProtocol::H2c | UpstreamProtocol::Http1 => Scheme::HTTP,
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(scheme);
        uri.authority = Some(authority);
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Uri::from_parts(uri).unwrap_or_else(|_| parts.uri.clone())
    };
    if !headers.contains_key(TE) && is_grpc(&headers) {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    let mut request = Request::new(OutBody {
        outgoing: outgoing.clone(),
    });
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    // h2 takes a target without authority (`*`) only in a request it forwards from HTTP/1;
    // any other goes as HTTP/2.
    *request.version_mut() = if asterisk {
        Version::HTTP_11
    } else {
        Version::HTTP_2
    };
    *request.headers_mut() = headers;
    request
}

/// A gRPC message (`application/grpc`, `application/grpc+proto`, ...; not gRPC-Web, which
/// carries its status in the body).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|value| {
        let value = value.as_bytes();
        value.len() >= 16
            && value[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(value.get(16), None | Some(b'+' | b';'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_are_told_from_others() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            headers
        };
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc; charset=utf-8",
        ] {
            assert!(is_grpc(&with(grpc)), "{grpc}");
        }
        for other in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/json",
            "application/grp",
        ] {
            assert!(!is_grpc(&with(other)), "{other}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn requests_go_as_http2_with_authority_from_host_and_te_for_grpc() {
        let mut request = Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = Uri::from_static("/svc.Echo/Say?x=1");
        let headers = request.headers_mut();
        headers.insert(HOST, HeaderValue::from_static("api.example:8080"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let (parts, ()) = request.into_parts();
        let endpoint = Authority::from_static("127.0.0.1:50051");
        let outgoing = Outgoing::new(ForwardBody::Empty, Instant::now());
        let sent = as_h2_request(&parts, &endpoint, UpstreamProtocol::H2c, &outgoing);
        assert_eq!(sent.uri(), "http://api.example:8080/svc.Echo/Say?x=1");
        assert_eq!(sent.version(), Version::HTTP_2);
        assert!(!sent.headers().contains_key(HOST));
        assert_eq!(sent.headers()[TE], "trailers");
        // The request as the proxy made it is left as it was (it may go elsewhere).
        assert_eq!(parts.headers[HOST], "api.example:8080");

        // No Host (HTTP/1.0): the endpoint's authority; not gRPC: no TE added.
        let mut parts = parts;
        parts.headers.clear();
        let sent = as_h2_request(&parts, &endpoint, UpstreamProtocol::H2, &outgoing);
        assert_eq!(sent.uri(), "https://127.0.0.1:50051/svc.Echo/Say?x=1");
        assert!(!sent.headers().contains_key(TE));

        // OPTIONS *: as it came, with its Host.
        parts.method = http::Method::OPTIONS;
        parts.uri = Uri::from_static("*");
        parts
            .headers
            .insert(HOST, HeaderValue::from_static("api.example"));
        let sent = as_h2_request(&parts, &endpoint, UpstreamProtocol::H2c, &outgoing);
        assert_eq!(sent.uri(), "*");
        assert_eq!(sent.headers()[HOST], "api.example");
    }

    #[test]
    fn a_body_is_kept_within_the_limit_and_replayed_from_its_start() {
        let now = Instant::now();
        let outgoing = Outgoing::new(ForwardBody::Empty, now);
        let mut state = lock(&outgoing);
        assert!(state.rewind(now), "untouched: whole");
        state.touched = true;
        state.keep(&Frame::data(Bytes::from_static(b"abc")));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("1"));
        state.keep(&Frame::trailers(trailers));
        assert!(state.rewind(now));
        assert_eq!(state.replay.len(), 2);
        assert!(state.kept.is_none(), "sent again once at most");
        assert!(!state.rewind(now));
        drop(state);

        let outgoing = Outgoing::new(ForwardBody::Empty, now);
        let mut state = lock(&outgoing);
        state.touched = true;
        state.keep(&Frame::data(Bytes::from(vec![0; REPLAY_LIMIT])));
        assert!(state.kept.is_some());
        state.keep(&Frame::data(Bytes::from_static(b"x")));
        assert!(state.kept.is_none(), "over the limit: not kept");
        assert!(!state.rewind(now));
    }
}
