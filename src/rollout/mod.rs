//! The progressive rollout the proxy runs itself, all but its driver: the plan and its state
//! machine ([`machine`]), the per-version measurements taken on the hot path ([`meter`]), the
//! latency buckets ([`histogram`]), the statistics that decide ([`analysis`], pure), and the
//! terminal view of a rollout's status ([`view`], pure). None of it imports anything above
//! routing, whose backends hold the meters: the controller that ties these to the control plane
//! and the admin API, and the webhook each transition is posted to, are
//! `control::rollout` and `control::webhook`.

pub mod analysis;
pub mod cluster;
pub mod histogram;
pub mod machine;
pub mod meter;
#[cfg(test)]
mod shadow_simulation;
#[cfg(test)]
mod simulation;
pub mod view;

pub use machine::{Command, Event, State};
pub use meter::VersionMeter;
