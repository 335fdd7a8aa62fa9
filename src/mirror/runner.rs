//! Where copies run: threads of their own, one per worker that sends copies, each with a
//! runtime of its own, at the lowest CPU priority (nice 19). Copies then use the CPU that
//! served requests leave: a worker is never queued behind a copy, and a saturated proxy sheds
//! copies (held at `max_in_flight`, then dropped, and given up once older than `timeout`)
//! instead of slowing its clients. A copy's comparison (JSON parsed on both sides) runs there
//! too.
//!
//! A worker hands a copy over through a channel: one push, and a wake-up of the copy thread
//! only when it is waiting for work. Thread `i` marks itself as worker `i`, so that the
//! mirror's connection pools are kept per copy thread as they are per worker.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use tokio::sync::mpsc;

use crate::config::MAX_WORKERS;
use crate::worker_index::{current_worker, set_current_worker};

/// A copy, ready to run.
pub type CopyJob = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The nice value of the copy threads: the lowest priority a thread can take without
/// privileges.
pub const COPY_NICE: i32 = 19;

/// The copy threads, started on first use. Dropping it (with the last mirroring that used
/// it) ends them, and the copies still running on them.
#[derive(Debug)]
pub struct CopyRunner {
    /// Per worker index: the channel to its copy thread (`None`: it could not be started,
    /// and its copies run on the worker).
    lanes: Box<[OnceLock<Option<mpsc::UnboundedSender<CopyJob>>>]>,
}

impl Default for CopyRunner {
    fn default() -> Self {
        CopyRunner {
            lanes: (0..MAX_WORKERS).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl CopyRunner {
    /// Runs `job` on the copy thread of the current worker (started on first use); on the
    /// current runtime if that thread cannot be started.
    pub fn spawn(&self, job: CopyJob) {
        let index = current_worker() % self.lanes.len();
        let lane = self.lanes[index].get_or_init(|| start(index));
        let job = match lane {
            Some(sender) => match sender.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        tokio::spawn(job);
    }
}

/// Starts the copy thread of worker `index`: its runtime takes jobs until the channel's
/// sender goes.
fn start(index: usize) -> Option<mpsc::UnboundedSender<CopyJob>> {
    let (sender, mut jobs) = mpsc::unbounded_channel::<CopyJob>();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start a runtime for mirroring's copies; they run on the workers");
            return None;
        }
    };
    let spawned = std::thread::Builder::new()
        .name(format!("canary-mirror-{index}"))
        .spawn(move || {
            set_current_worker(index);
            lower_priority();
            runtime.block_on(async move {
                while let Some(job) = jobs.recv().await {
                    tokio::spawn(job);
                }
            });
        });
    match spawned {
        Ok(_) => Some(sender),
        Err(error) => {
            tracing::error!(%error, "cannot start a thread for mirroring's copies; they run on the workers");
            None
        }
    }
}

/// Gives the calling thread the lowest CPU priority: on Linux, `setpriority` on a thread id
/// applies to that thread alone. Best effort: a refusal leaves copies at normal priority, and
/// says so.
#[cfg(target_os = "linux")]
fn lower_priority() {
    let thread = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(thread), COPY_NICE) {
        tracing::warn!(%error, "cannot lower the priority of a mirroring thread; copies compete with served requests for CPU");
    }
}

/// Elsewhere a nice value is the whole process's: copies keep the workers' priority.
#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn copies_run_on_a_thread_of_their_own_at_the_lowest_priority() {
        let priority = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok();
        let here = priority();
        let runner = CopyRunner::default();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        runner.spawn(Box::pin(async move {
            let name = std::thread::current().name().map(str::to_owned);
            // The thread's own priority: `getpriority(PRIO_PROCESS, tid)`.
            let own = rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok();
            let _ = sender.send((name, own));
        }));
        let (name, own) = tokio::time::timeout(Duration::from_secs(5), receiver)
            .await
            .expect("the copy ran")
            .expect("it answered");
        assert_eq!(name.as_deref(), Some("canary-mirror-0"));
        assert_eq!(own, Some(COPY_NICE));
        // Only that thread's: this one keeps its own (unless the test itself runs at 19).
        assert_eq!(priority(), here);
    }
}
