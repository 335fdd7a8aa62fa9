//! The rollout's meters summed over replicas (`[store]`): each replica publishes its own
//! cumulative readings every interval; this turns the readings of whoever is there into one
//! reading per version that only grows, as one replica's meter does, so the analysis takes
//! differences of it exactly as it takes them of a local meter. A replica that goes away
//! keeps what it contributed; one that appears (or restarts under a new id) adds from zero.

use std::collections::HashMap;

use super::meter::Counts;

/// The sums of the published meters of the replicas seen so far.
#[derive(Debug, Default)]
pub struct ClusterMeter {
    /// Per replica and version, its last reading.
    last: HashMap<String, HashMap<String, Counts>>,
    /// Per version, everything counted by any replica.
    total: HashMap<String, Counts>,
}

impl ClusterMeter {
    /// Takes in the readings published now: (replica, version, its cumulative counts).
    /// Readings that went down (a replica's meter recreated) count from zero again.
    pub fn observe<'a>(
        &mut self,
        readings: impl IntoIterator<Item = (&'a str, &'a str, &'a Counts)>,
    ) {
        for (replica, version, now) in readings {
            let last = self
                .last
                .entry(replica.to_owned())
                .or_default()
                .entry(version.to_owned())
                .or_default();
            let restarted = now.requests < last.requests;
            let added = if restarted {
                now.clone()
            } else {
                now.since(last)
            };
            self.total
                .entry(version.to_owned())
                .or_default()
                .add(&added);
            *last = now.clone();
        }
    }

    /// Everything counted for `version` by every replica seen.
    pub fn total(&self, version: &str) -> Counts {
        self.total.get(version).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64) -> Counts {
        let mut counts = Counts {
            requests,
            errors,
            ..Counts::default()
        };
        counts.latency[3] = requests;
        counts
    }

    #[test]
    fn sums_grow_as_replicas_come_and_go() {
        let mut meter = ClusterMeter::default();
        meter.observe([("a", "v1", &counts(10, 1)), ("b", "v1", &counts(5, 0))]);
        assert_eq!(meter.total("v1"), counts(15, 1));
        // b is gone (its lease expired): what it counted stays.
        meter.observe([("a", "v1", &counts(12, 1))]);
        assert_eq!(meter.total("v1"), counts(17, 1));
        // c appears with what it counted so far.
        meter.observe([("a", "v1", &counts(12, 1)), ("c", "v1", &counts(4, 2))]);
        assert_eq!(meter.total("v1"), counts(21, 3));
        // a's meter restarted from zero: its new counts add up from there.
        meter.observe([("a", "v1", &counts(3, 0))]);
        assert_eq!(meter.total("v1"), counts(24, 3));
        assert_eq!(meter.total("v2"), Counts::default());
    }

    #[test]
    fn the_same_reading_twice_adds_nothing() {
        let mut meter = ClusterMeter::default();
        for _ in 0..3 {
            meter.observe([("a", "v2", &counts(7, 7))]);
        }
        assert_eq!(meter.total("v2"), counts(7, 7));
    }
}
