//! The bodies that pass through: the client's request body on its way up ([`ForwardBody`]),
//! and the response body read from the upstream connection ([`UpstreamBody`]), which hands
//! the connection back to its pool when it ends (HTTP/1), or its stream's place on a shared
//! connection (HTTP/2, whose trailers it passes on and can report: [`BodyEnd`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::exchange::Exchange;
use super::h2::StreamSlot;
use super::pool::Connection;
use super::stream::UpstreamStream;
use super::{ExchangeError, ExchangeTimeouts, Peer, UpstreamSettings};
use crate::http1::body::{self, MessageError};
use crate::http1::head::{Framing, Present, ResponseHead, keeps_alive, response_framing};
use crate::http1::server::RequestBody as ClientBody;
use crate::stall::StallTimer;

/// The body of a request sent upstream: the client's own, streamed as it arrives.
#[derive(Debug)]
pub enum ForwardBody {
    /// None at all.
    Empty,
    /// From a connection hyper serves (HTTP/2, and HTTP/1 connections handed to it).
    Hyper(Incoming),
    /// From an HTTP/1.1 connection the proxy serves itself.
    Client(ClientBody),
    /// Known whole (a mirror's copy of a request's body); taken once.
    Whole(Option<Bytes>),
    /// Another body, whose bytes are also kept on their way, for a copy of the request.
    Teed(Box<Teed>),
}

/// A body passed on as it comes, its bytes kept up to a limit; once it has ended whole
/// within the limit, they are sent to whoever asked ([`ForwardBody::tee`]). A body over the
/// limit, failing or dropped before its end sends nothing.
#[derive(Debug)]
pub struct Teed {
    inner: ForwardBody,
    kept: bytes::BytesMut,
    limit: usize,
    sender: Option<tokio::sync::oneshot::Sender<Bytes>>,
}

impl ForwardBody {
    /// This body, its bytes also kept (up to `limit`) and sent to the receiver once it has
    /// ended whole.
    pub fn tee(self, limit: usize) -> (ForwardBody, tokio::sync::oneshot::Receiver<Bytes>) {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let teed = Teed {
            inner: self,
            kept: bytes::BytesMut::new(),
            limit,
            sender: Some(sender),
        };
        (ForwardBody::Teed(Box::new(teed)), receiver)
    }
}

impl Teed {
    fn see(&mut self, polled: &Option<Result<Frame<Bytes>, ForwardBodyError>>) {
        match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && self.sender.is_some()
                {
                    if self.kept.len() + data.len() <= self.limit {
                        self.kept.extend_from_slice(data);
                    } else {
                        self.sender = None;
                        self.kept = bytes::BytesMut::new();
                    }
                }
            }
            Some(Err(_)) => self.sender = None,
            None => {
                if let Some(sender) = self.sender.take() {
                    let _ = sender.send(std::mem::take(&mut self.kept).freeze());
                }
            }
        }
    }
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
            ForwardBody::Whole(data) => data.take().map(|d| Ok(Frame::data(d))),
            ForwardBody::Teed(teed) => {
                let polled = ready!(Pin::new(&mut teed.inner).poll_frame(cx));
                teed.see(&polled);
                if teed.inner.is_end_stream() {
                    // Its reader may stop here, without polling for the end.
                    teed.see(&None);
                }
                polled
            }
        };
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ForwardBody::Empty => true,
            ForwardBody::Hyper(body) => body.is_end_stream(),
            ForwardBody::Client(body) => body.is_end_stream(),
            ForwardBody::Whole(data) => data.is_none(),
            ForwardBody::Teed(teed) => teed.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ForwardBody::Empty => SizeHint::with_exact(0),
            ForwardBody::Hyper(body) => body.size_hint(),
            ForwardBody::Client(body) => body.size_hint(),
            ForwardBody::Whole(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ForwardBody::Teed(teed) => teed.inner.size_hint(),
        }
    }
}

/// Builds the response once its head is in: works out the body's framing, and when the whole
/// body is already buffered (the common small response), returns the connection to the pool
/// at once.
pub(super) fn finish_head(
    mut exchange: Exchange,
    mut head: ResponseHead,
    method: &Method,
    peer: &Arc<Peer>,
    settings: UpstreamSettings,
    timeouts: ExchangeTimeouts,
) -> Result<Response<UpstreamBody>, ExchangeError> {
    exchange.stop_keeping();
    let framing = response_framing(method, &mut head).map_err(MessageError::from)?;
    // A body delimited by the close, or a message with both Transfer-Encoding and
    // Content-Length (RFC 9112 §6.1: handle as an error), leaves nothing to reuse.
    let reusable = keeps_alive(head.version, head.present, &head.headers)
        && framing != Framing::UntilClose
        && !(head.present.may_have(Present::TRANSFER_ENCODING)
            && head.present.may_have(Present::CONTENT_LENGTH)
            && head.headers.contains_key(TRANSFER_ENCODING)
            && head.headers.contains_key(CONTENT_LENGTH));
    // The body's state is made before the response, so that no placeholder state is dropped
    // (BodyState's drop is not inlined).
    let state = if head.status == StatusCode::SWITCHING_PROTOCOLS {
        BodyState::Switched(Some(exchange.connection))
    } else {
        let buffered = exchange.connection.read_buf.len() as u64;
        let whole = match framing {
            Framing::Empty => Some(None),
            Framing::Length(n) if n <= buffered => Some(Some(
                exchange.connection.read_buf.split_to(n as usize).freeze(),
            )),
            _ => None,
        };
        match whole {
            Some(data) => {
                if reusable
                    && exchange.request_done()
                    && !exchange.broken
                    && exchange.connection.read_buf.is_empty()
                {
                    peer.pool
                        .checkin(exchange.connection, settings.idle_timeout);
                }
                BodyState::Whole(data.filter(|d| !d.is_empty()))
            }
            None => BodyState::Reading(Box::new(Reading {
                exchange,
                tap: TapSlot(None),
                framing,
                reusable,
                peer: peer.clone(),
                idle_timeout: settings.idle_timeout,
                stall: StallTimer::new(timeouts.read),
            })),
        }
    };
    let mut response = Response::new(UpstreamBody { state });
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = head.headers;
    Ok(response)
}

/// A response body from upstream. Read to the end, it hands its connection back to the
/// peer's pool (when the upstream keeps it alive and the request went out whole); dropped
/// earlier (a client gone mid-body), the connection closes.
pub struct UpstreamBody {
    state: BodyState,
}

enum BodyState {
    /// The whole body came with the head; the connection is already back in the pool.
    Whole(Option<Bytes>),
    /// The body is read from the connection as it is polled.
    Reading(Box<Reading>),
    /// An HTTP/2 response's body, read from its stream.
    H2(Box<H2Reading>),
    /// A 101 response: the connection now belongs to the tunnel.
    Switched(Option<Connection>),
    /// Nothing more.
    Done,
}

struct Reading {
    exchange: Exchange,
    /// Sees the body go by (a mirrored request's served answer), when something asked.
    tap: TapSlot,
    framing: Framing,
    /// The upstream keeps the connection alive after this response.
    reusable: bool,
    peer: Arc<Peer>,
    idle_timeout: Duration,
    /// `read_timeout`: the longest pause between two reads of the body.
    stall: StallTimer,
}

/// What polling a response body gives.
type Polled = Option<Result<Frame<Bytes>, ExchangeError>>;

/// An HTTP/2 response body as hyper's client gives it, with what watches it.
struct H2Reading {
    body: Incoming,
    tap: TapSlot,
    end: EndSlot,
    /// `read_timeout`: the longest pause between two frames of the body.
    stall: StallTimer,
    /// The stream's place on its connection, given back when the body ends or is dropped.
    _slot: StreamSlot,
}

/// Told how an HTTP/2 response body ended, with its trailers: a gRPC call's status comes in
/// them.
pub trait BodyEnd: Send {
    /// When the request this body answers arrived, for a watcher that measures to the end.
    fn arrived(&mut self, at: tokio::time::Instant);

    fn end(self: Box<Self>, ending: Ending<'_>);
}

/// How a response body ended.
#[derive(Debug)]
pub enum Ending<'a> {
    /// Read to its end, with its trailers when it had some.
    Complete(Option<&'a HeaderMap>),
    /// The upstream failed it (a reset, or `read_timeout`).
    Failed,
    /// Dropped before its end: the client went away.
    Dropped,
}

/// A body's end watcher, told of an early end if it is dropped before the body ends.
struct EndSlot(Option<Box<dyn BodyEnd>>);

impl EndSlot {
    fn end(&mut self, ending: Ending<'_>) {
        if let Some(watcher) = self.0.take() {
            watcher.end(ending);
        }
    }
}

impl Drop for EndSlot {
    fn drop(&mut self) {
        self.end(Ending::Dropped);
    }
}

/// Sees a response body's data as it passes on its way to the client, then its end.
pub trait BodyTap: Send {
    fn data(&mut self, data: &Bytes);
    /// `complete`: the body ended whole (else it failed or was dropped before its end).
    fn end(self: Box<Self>, complete: bool);
}

/// A body's tap, told of an early end if it is dropped before the body ends.
struct TapSlot(Option<Box<dyn BodyTap>>);

impl TapSlot {
    fn data(&mut self, data: &Bytes) {
        if let Some(tap) = &mut self.0 {
            tap.data(data);
        }
    }

    fn end(&mut self, complete: bool) {
        if let Some(tap) = self.0.take() {
            tap.end(complete);
        }
    }
}

impl Drop for TapSlot {
    fn drop(&mut self) {
        self.end(false);
    }
}

impl UpstreamBody {
    /// The response to an HTTP/2 request, its body read from the stream that `slot` holds a
    /// place for (given back at once when the head ended the stream).
    pub(super) fn from_h2(
        response: Response<Incoming>,
        slot: StreamSlot,
        read_timeout: Duration,
    ) -> Response<UpstreamBody> {
        response.map(|body| {
            let state = if body.is_end_stream() {
                BodyState::Whole(None)
            } else {
                BodyState::H2(Box::new(H2Reading {
                    body,
                    tap: TapSlot(None),
                    end: EndSlot(None),
                    stall: StallTimer::new(read_timeout),
                    _slot: slot,
                }))
            };
            UpstreamBody { state }
        })
    }

    /// Has `watcher` told how this body ends (with its trailers), when it is an HTTP/2 body
    /// still to be read; else gives it back.
    pub fn watch_end(&mut self, watcher: Box<dyn BodyEnd>) -> Result<(), Box<dyn BodyEnd>> {
        match &mut self.state {
            BodyState::H2(reading) => {
                reading.end.0 = Some(watcher);
                Ok(())
            }
            _ => Err(watcher),
        }
    }

    /// The watcher of this body's end, when it has one.
    pub fn end_watcher(&mut self) -> Option<&mut (dyn BodyEnd + 'static)> {
        match &mut self.state {
            BodyState::H2(reading) => reading.end.0.as_deref_mut(),
            _ => None,
        }
    }

    /// Lets `tap` see this body as it is read: at once for a body that came whole with the
    /// head (or has none), else piece by piece.
    pub fn tap(&mut self, mut tap: Box<dyn BodyTap>) {
        match &mut self.state {
            BodyState::Whole(data) => {
                if let Some(data) = data {
                    tap.data(data);
                }
                tap.end(true);
            }
            BodyState::Reading(reading) => reading.tap.0 = Some(tap),
            BodyState::H2(reading) => reading.tap.0 = Some(tap),
            BodyState::Switched(_) => tap.end(false),
            BodyState::Done => tap.end(true),
        }
    }

    /// For a 101 response: the upstream connection and any bytes it already sent past the
    /// head, for the tunnel.
    pub fn take_upgraded(&mut self) -> Option<(UpstreamStream, Bytes)> {
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

impl H2Reading {
    /// The next frame of the body, seen by the tap and the end watcher; `true` with it when
    /// the body is over (its last frame, its end, or a failure).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<(Polled, bool)> {
        let polled = match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(polled) => {
                let _ = self.stall.poll_stalled(true, cx);
                polled.map(|frame| frame.map_err(ExchangeError::H2))
            }
            Poll::Pending => {
                ready!(self.stall.poll_stalled(false, cx));
                Some(Err(ExchangeError::ReadTimeout(self.stall.limit())))
            }
        };
        let over = match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.tap.data(data);
                }
                // Trailers are the last frame; a data frame may be too (its reader may stop
                // there, without polling for the end).
                let trailers = frame.trailers_ref();
                let over = trailers.is_some() || self.body.is_end_stream();
                if over {
                    self.tap.end(true);
                    self.end.end(Ending::Complete(trailers));
                }
                over
            }
            None => {
                self.tap.end(true);
                self.end.end(Ending::Complete(None));
                true
            }
            Some(Err(_)) => {
                self.tap.end(false);
                self.end.end(Ending::Failed);
                true
            }
        };
        Poll::Ready((polled, over))
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
            // Taken, it stays `Whole(None)`: the same as `Done`, and no state is dropped.
            BodyState::Whole(data) => return Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyState::H2(reading) => {
                let (polled, over) = ready!(reading.poll_next(cx));
                if over {
                    // The stream's place goes back to its connection now.
                    self.state = BodyState::Done;
                }
                return Poll::Ready(polled);
            }
            BodyState::Reading(reading) => reading,
            BodyState::Switched(_) | BodyState::Done => return Poll::Ready(None),
        };
        let polled = match reading.exchange.poll_send_along(cx) {
            Ok(()) => reading.poll_next(cx),
            Err(error) => Poll::Ready(Some(Err(error))),
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            reading.tap.data(data);
        }
        match &polled {
            Poll::Ready(Some(Ok(_))) if !reading.framing.is_end() => {}
            Poll::Pending => {}
            Poll::Ready(Some(Err(_))) => self.state = BodyState::Done,
            Poll::Ready(Some(Ok(_)) | None) => {
                reading.tap.end(true);
                // The body is complete: the connection goes back to the pool if it can.
                if let BodyState::Reading(reading) =
                    std::mem::replace(&mut self.state, BodyState::Done)
                {
                    let Reading {
                        exchange,
                        reusable,
                        peer,
                        idle_timeout,
                        ..
                    } = *reading;
                    if reusable
                        && exchange.request_done()
                        && !exchange.broken
                        && exchange.connection.read_buf.is_empty()
                    {
                        peer.pool.checkin(exchange.connection, idle_timeout);
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
            BodyState::H2(reading) => reading.body.is_end_stream(),
            BodyState::Switched(_) | BodyState::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Whole(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            BodyState::Reading(reading) => reading.framing.size_hint(),
            BodyState::H2(reading) => reading.body.size_hint(),
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
    use http_body_util::BodyExt;

    async fn read(body: ForwardBody) -> Bytes {
        body.collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_teed_body_passes_whole_and_is_kept_within_its_limit() {
        let data = Bytes::from_static(b"0123456789");
        let (teed, kept) = ForwardBody::Whole(Some(data.clone())).tee(10);
        assert_eq!(read(teed).await, data);
        assert_eq!(kept.await.unwrap(), data);

        let (teed, kept) = ForwardBody::Whole(Some(data.clone())).tee(9);
        assert_eq!(read(teed).await, data, "passed on whole over the limit too");
        assert!(kept.await.is_err(), "nothing kept over the limit");

        let (teed, kept) = ForwardBody::Whole(Some(data)).tee(100);
        drop(teed);
        assert!(
            kept.await.is_err(),
            "nothing kept from a body dropped before its end"
        );
    }
}
