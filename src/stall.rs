//! A timer for I/O that must keep moving: an operation that has waited `limit` since it last
//! made progress is stalled. It serves nginx-like timeouts that bound each pause, never a
//! whole transfer: `send_timeout` (writes to a client) and `read_timeout` (an upstream's
//! response body). The clock is read and the timer set only when an operation starts to
//! wait; its sleep is allocated at the first wait and reused.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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
