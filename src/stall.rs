//! A timer for I/O that must keep moving: an operation that has waited `limit` since it last
//! made progress is stalled. It serves nginx-like timeouts that bound each pause, never a
//! whole transfer: `send_timeout` (writes to a client) and `read_timeout` (an upstream's
//! response body). The clock is read and the timer set only when an operation starts to
//! wait; its sleep is allocated at the first wait and reused.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

#[derive(Debug)]
pub struct StallTimer {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The operation is waiting and `sleep` holds its deadline.
    waiting: bool,
}

impl StallTimer {
    pub fn new(limit: Duration) -> Self {
        StallTimer {
            limit,
            sleep: None,
            waiting: false,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Follows an operation polled once more: `ready` when it made progress (the timer is
    /// then off), else it waits. `Ready` once it has waited `limit` since its last progress.
    pub fn poll_stalled(&mut self, ready: bool, cx: &mut Context<'_>) -> Poll<()> {
        if ready {
            self.waiting = false;
            return Poll::Pending;
        }
        if !self.waiting {
            self.waiting = true;
            let deadline = Instant::now() + self.limit;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// A client connection's writer whose writes fail (`TimedOut`) once one has waited
/// `send_timeout` for the client to take bytes, as nginx's `send_timeout`: a client that stops
/// reading cannot hold its connection and the upstream one behind it. hyper's HTTP/2
/// connections get it too. A write that goes through at once costs one branch.
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

    pub fn into_inner(self) -> W {
        self.inner
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_a_wait_of_the_whole_limit_since_the_last_progress_is_a_stall() {
        let mut timer = StallTimer::new(Duration::from_secs(10));
        async fn poll(timer: &mut StallTimer, ready: bool) -> Poll<()> {
            std::future::poll_fn(|cx| Poll::Ready(timer.poll_stalled(ready, cx))).await
        }
        assert!(poll(&mut timer, false).await.is_pending());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(poll(&mut timer, false).await.is_pending());
        // Progress restarts the count.
        assert!(poll(&mut timer, true).await.is_pending());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(poll(&mut timer, false).await.is_pending());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(poll(&mut timer, false).await.is_pending());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(poll(&mut timer, false).await.is_ready());
    }
}
