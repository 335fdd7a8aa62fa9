//! One request/response exchange on a connection: writing the request (head, then the body
//! as the client sends it), reading up to the response head, the timeouts by phase, and what
//! is kept to send a request again when a pooled connection turns out closed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Method;
use http::StatusCode;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http_body::Body;
use tokio::io::AsyncWrite;

use super::pool::Connection;
use super::{ExchangeError, ExchangeTimeouts, ForwardBody};
use crate::http1::body::{self, MessageError, encode_frame};
use crate::http1::head::{self, ResponseHead, parse_response_head};

/// Request body bytes gathered (with the head) before they are written.
const WRITE_BATCH: usize = 64 * 1024;

/// Request bytes kept after they were written, so that a request that met a pooled connection
/// the upstream had closed can be sent again on a fresh one. Larger requests are not replayed.
const REPLAY_LIMIT: usize = 64 * 1024;

/// RFC 9110 §9.2.2: a request with one of these methods may be sent again after a failure
/// that leaves unknown whether the upstream acted on it.
pub(super) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The request body still to be written upstream.
enum RequestBody {
    /// All of it was written (or there was none).
    Done,
    /// Streamed as the client sends it; `chunked` adds HTTP/1.1 chunk framing.
    Streaming { body: ForwardBody, chunked: bool },
}

/// What an exchange sends.
pub(super) enum Attempt {
    /// The request as the client sent it, nothing of it taken yet.
    Whole(ForwardBody),
    /// A request that met a closed pooled connection, to be sent again on a fresh one.
    Replay(Replay),
}

/// Everything taken of a request so far, as written, and the rest of its body.
pub(super) struct Replay {
    bytes: Vec<u8>,
    request_body: RequestBody,
}

/// Where an exchange stands before its response head, for the phase timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// All that was taken is written; more of the client's body is awaited.
    Client,
    /// Request bytes wait for the upstream to take them.
    Upstream,
    /// The request is sent; the response head is awaited.
    Head,
}

/// Why no response head came.
pub(super) enum Failure {
    Exchange(ExchangeError),
    /// Nothing moved for the timeout of this phase.
    Stalled(Phase),
}

/// Restarts the timer of an exchange whenever its request moves or its phase changes: the
/// timeouts bound each pause, never a whole upload. A request with nothing to stream stays
/// in [`Phase::Head`] throughout, and its deadline never moves (no clock read).
pub(super) struct PhaseClock {
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
    pub(super) fn poll_expired(
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
pub(super) struct Exchange {
    pub(super) connection: Connection,
    /// How much of `connection.write_buf` is written.
    written: usize,
    /// Whether any byte of the request went out or any of its body was taken from the client.
    touched: bool,
    request_body: RequestBody,
    /// The client's body when it was empty from the start, kept to give the request back.
    empty_body: Option<ForwardBody>,
    /// The request could not be written whole: the connection cannot be reused.
    pub(super) broken: bool,
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
    pub(super) fn start(
        mut connection: Connection,
        parts: &Parts,
        body: ForwardBody,
        reused: bool,
    ) -> Self {
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
    pub(super) fn resume(mut connection: Connection, replay: Replay) -> Self {
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
    pub(super) fn into_untouched_body(self) -> Option<ForwardBody> {
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
    pub(super) fn into_retry(self, error: &ExchangeError, idempotent: bool) -> Option<Attempt> {
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
    pub(super) fn stop_keeping(&mut self) {
        if self.keep_for_replay {
            self.keep_for_replay = false;
            self.connection.write_buf.drain(..self.written);
            self.written = 0;
        }
    }

    pub(super) fn request_done(&self) -> bool {
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
            // All given is written: what a TLS stream still holds goes out before the
            // exchange waits for the client's body or the response (a plain one holds
            // nothing).
            if let Err(error) = ready!(Pin::new(&mut self.connection.stream).poll_flush(cx)) {
                self.broken = true;
                return Poll::Ready(Err(ExchangeError::Write(error)));
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
    pub(super) fn poll_send_along(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
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
    pub(super) fn poll_response_head(
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
}
