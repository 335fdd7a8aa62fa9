//! The progressive rollout the proxy runs itself: the plan and its state machine
//! ([`machine`]), the per-version measurements taken on the hot path ([`meter`]), the latency
//! buckets ([`histogram`]), the statistics that decide ([`analysis`], pure), the controller
//! that ties them to the control plane and the admin API ([`controller`]), the webhook
//! each transition is posted to ([`webhook`]), and the terminal view of a rollout's status
//! ([`view`], pure).

pub mod analysis;
pub mod controller;
pub mod histogram;
pub mod machine;
pub mod meter;
#[cfg(test)]
mod simulation;
pub mod view;
pub mod webhook;

pub use controller::{RolloutController, RolloutError};
pub use machine::{Command, Event, State};
pub use meter::VersionMeter;
