//! Per-version measurements for the rollout analysis, taken on the hot path: requests, errors
//! and a latency histogram ([`super::histogram`]), in relaxed atomic counters sharded per
//! worker thread. No lock, no allocation, no cache line written by two workers; the analysis
//! sums the shards when it reads them, once per interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;

use super::histogram::{LATENCY_BUCKETS, latency_bucket};
use crate::config::MAX_WORKERS;
use crate::worker_index::current_worker;

/// One worker's counters. Aligned so that two workers' counters never share a cache line.
#[repr(align(128))]
struct Shard {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Shard {
    fn new() -> Self {
        Shard {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The measurements of one version (backend) under a rollout. Counters only grow; readers take
/// differences of [`Counts`].
pub struct VersionMeter {
    shards: Box<[Shard]>,
}

impl std::fmt::Debug for VersionMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts = self.counts();
        f.debug_struct("VersionMeter")
            .field("requests", &counts.requests)
            .field("errors", &counts.errors)
            .finish()
    }
}

impl Default for VersionMeter {
    fn default() -> Self {
        VersionMeter {
            shards: (0..MAX_WORKERS).map(|_| Shard::new()).collect(),
        }
    }
}

impl VersionMeter {
    /// Counts one answered request: an error when its status is 500 or above (the proxy's own
    /// 502 and 504 included), and its latency, request arrival to response head.
    #[inline]
    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        let shard = &self.shards[current_worker() % self.shards.len()];
        shard.requests.fetch_add(1, Ordering::Relaxed);
        if status.is_server_error() {
            shard.errors.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        shard.latency[latency_bucket(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// Everything counted so far, summed over the workers.
    pub fn counts(&self) -> Counts {
        let mut counts = Counts::default();
        for shard in self.shards.iter() {
            counts.requests += shard.requests.load(Ordering::Relaxed);
            counts.errors += shard.errors.load(Ordering::Relaxed);
            for (sum, bucket) in counts.latency.iter_mut().zip(&shard.latency) {
                *sum += bucket.load(Ordering::Relaxed);
            }
        }
        counts
    }
}

/// A reading of a [`VersionMeter`], or the difference of two. Replicas publish theirs as
/// JSON (`[store]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    /// Requests per latency bucket, [`LATENCY_BUCKETS`] of them.
    pub latency: Box<[u64]>,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            requests: 0,
            errors: 0,
            latency: vec![0; LATENCY_BUCKETS].into_boxed_slice(),
        }
    }
}

impl Counts {
    /// What was counted after `earlier` (a reading of the same meter).
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: self
                .latency
                .iter()
                .zip(earlier.latency.iter())
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (sum, more) in self.latency.iter_mut().zip(other.latency.iter()) {
            *sum += more;
        }
    }

    /// The error share, 0 without requests.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sum_over_workers_and_differences_restart_the_count() {
        let meter = VersionMeter::default();
        meter.record(StatusCode::OK, Duration::from_millis(3));
        meter.record(StatusCode::BAD_GATEWAY, Duration::from_millis(3));
        meter.record(StatusCode::NOT_FOUND, Duration::from_secs(1));
        let first = meter.counts();
        assert_eq!((first.requests, first.errors), (3, 1));
        assert_eq!(first.latency.iter().sum::<u64>(), 3);
        assert_eq!(first.latency[latency_bucket(3_000)], 2);
        meter.record(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(3));
        let later = meter.counts().since(&first);
        assert_eq!((later.requests, later.errors), (1, 1));
        assert_eq!(later.latency.iter().sum::<u64>(), 1);
        assert!((first.error_rate() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(Counts::default().error_rate(), 0.0);
    }
}
