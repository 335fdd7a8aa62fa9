//! Which worker thread the code runs on, so that per-worker state (upstream connection pools,
//! the rollout's meter shards) is touched by its own worker only.

use std::cell::Cell;

thread_local! {
    /// The index of the worker running on this thread (0 on any other thread).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the current worker.
pub(crate) fn current_worker() -> usize {
    WORKER.with(Cell::get)
}

/// Marks this thread as worker `index`; called once by the thread a worker runs on.
pub(crate) fn set_current_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}
