//! Progressive rollout: the latency buckets the hot path fills (`histogram`) and the pure
//! statistics that turn each interval's counts into pass / fail / inconclusive (`analysis`).
// The state machine that calls these lands separately (issue 9); until then nothing in the
// crate uses them outside tests.
#![allow(dead_code)]

pub mod analysis;
pub mod histogram;
#[cfg(test)]
mod simulation;
