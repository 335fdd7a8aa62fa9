//! Mirroring: copies of requests sent to the canary, whose answers never reach a client, and
//! the comparison of those answers with the ones served.
//!
//! - `copy`: which requests get a copy, the copy task (its own pools, bounded, timed), the
//!   second copy to the served version for noise, and the served answer's capture.
//! - `compare`: the differences between two answers, by status, headers and body (JSON
//!   structurally, with bounded paths), pure.
//! - `report`: counts, differing paths with Diffy's noise filter, the last examples.
//! - `runner`: the low-priority threads copies run on, beside the workers.
//! - `view`: that report as text, for `canary-proxy mirror status` (pure).

pub mod compare;
pub mod copy;
pub mod report;
pub mod runner;
pub mod view;

#[cfg(test)]
mod simulation;
