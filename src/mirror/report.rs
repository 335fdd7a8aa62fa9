//! What mirroring has seen: counts, the paths where copies' answers differed from the served
//! ones (and, from second copies to the served version itself, where the served version
//! differs from itself: noise), and the last examples. Bounded whatever the traffic: at most
//! [`MAX_PATHS`] distinct paths and [`MAX_EXAMPLES`] examples are kept.
//!
//! Noise is filtered as Diffy does it: a path is reported as a canary difference only when it
//! differs more often between canary and served version than between two instances of the
//! served version, by a relative margin ([`RELATIVE_THRESHOLD`] percent of both counts) and an
//! absolute one ([`ABSOLUTE_THRESHOLD`] percent of the comparisons).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use super::compare::Difference;

/// Distinct paths counted; a later new path is counted under [`OTHER_PATHS`].
pub const MAX_PATHS: usize = 1_000;
/// Where paths past [`MAX_PATHS`] are counted.
pub const OTHER_PATHS: &str = "(other paths)";
/// Examples kept, the newest.
pub const MAX_EXAMPLES: usize = 20;
/// Paths shown by [`MirrorReport::to_json`], the most frequent.
pub const SHOWN_PATHS: usize = 50;
/// Diffy's default relative threshold, in percent.
pub const RELATIVE_THRESHOLD: f64 = 20.0;
/// Diffy's default absolute threshold, in percent of the comparisons.
pub const ABSOLUTE_THRESHOLD: f64 = 0.03;

/// Why a request was not copied, or what became of its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Copied,
    SkippedMethod,
    SkippedBody,
    SkippedPercent,
    /// `max_in_flight` copies were running.
    Dropped,
    /// The copy failed (connect, reset, a malformed answer).
    Error,
    /// The copy was not answered whole within `timeout`.
    Timeout,
}

/// Counters; each is one atomic add.
#[derive(Debug, Default)]
pub struct Counts {
    pub copied: AtomicU64,
    pub skipped_method: AtomicU64,
    pub skipped_body: AtomicU64,
    pub skipped_percent: AtomicU64,
    pub dropped: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub compared: AtomicU64,
    pub identical: AtomicU64,
    /// Compared copies with a difference at a path the noise filter reported when they were
    /// counted.
    pub different: AtomicU64,
}

/// Each request's pair of outcomes, its copy's and its served request's, counted together
/// (one lock per copy) so that a reader never sees a pair without its outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairCounts {
    /// Requests whose copy's outcome and served outcome were both seen (answered, failed,
    /// timed out): the pairs a shadow stage judges errors on.
    pub pairs: u64,
    /// Of the pairs, those where only the copy failed (a 5xx, an error, a timeout)...
    pub copy_only_errors: u64,
    /// ...and those where only the served request failed (a 5xx, the proxy's 502 or 504;
    /// a failed connect before a retry elsewhere).
    pub served_only_errors: u64,
    /// Of the pairs, those where both answered and were compared...
    pub compared: u64,
    /// ...and of those, the ones that differed at a path the noise filter reported.
    pub different: u64,
}

impl Counts {
    pub fn count(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Copied => &self.copied,
            Outcome::SkippedMethod => &self.skipped_method,
            Outcome::SkippedBody => &self.skipped_body,
            Outcome::SkippedPercent => &self.skipped_percent,
            Outcome::Dropped => &self.dropped,
            Outcome::Error => &self.errors,
            Outcome::Timeout => &self.timeouts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Differences counted at one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounts {
    /// Copies to the canary whose answer differed from the served one here.
    pub different: u64,
    /// Second copies to the served version whose answer differed from the served one here.
    pub noise: u64,
}

impl PathCounts {
    /// Whether these counts make the path a canary difference rather than noise, out of
    /// `compared` comparisons (Diffy's filter).
    pub fn is_reported(&self, compared: u64) -> bool {
        let (raw, noise) = (self.different as f64, self.noise as f64);
        let gap = (raw - noise).abs();
        raw > noise
            && gap / (raw + noise) * 100.0 > RELATIVE_THRESHOLD
            && gap / (compared.max(1) as f64) * 100.0 > ABSOLUTE_THRESHOLD
    }
}

/// One compared request, as the report shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub method: String,
    pub path: String,
    pub request_id: String,
    pub served_status: u16,
    pub copy_status: u16,
    pub differences: Vec<Difference>,
}

#[derive(Debug, Default)]
struct Paths {
    counts: HashMap<String, PathCounts>,
    examples: VecDeque<Example>,
}

/// Everything mirroring has counted since it started or was reset.
#[derive(Debug, Default)]
pub struct MirrorReport {
    pub counts: Counts,
    pairs: Mutex<PairCounts>,
    paths: Mutex<Paths>,
}

impl MirrorReport {
    /// Counts the comparison of a copy to the canary: its differences from the served answer,
    /// `example` kept among the last ones when there are any. Returns whether it counted as
    /// different (a difference at a path reported as a canary difference).
    pub fn record(&self, differences: &[Difference], example: impl FnOnce() -> Example) -> bool {
        let compared = self.counts.compared.fetch_add(1, Ordering::Relaxed) + 1;
        if differences.is_empty() {
            self.counts.identical.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut paths = self.lock();
        for difference in differences {
            paths.entry(&difference.path).different += 1;
        }
        let reported = differences
            .iter()
            .any(|d| paths.get(&d.path).is_reported(compared));
        if reported {
            self.counts.different.fetch_add(1, Ordering::Relaxed);
        }
        if paths.examples.len() == MAX_EXAMPLES {
            paths.examples.pop_front();
        }
        paths.examples.push_back(example());
        reported
    }

    /// Counts one request's pair of outcomes: whether its served request failed, whether
    /// its copy did, and when both answers were compared, whether they differed (as
    /// [`record`](Self::record) counted it).
    pub fn pair(&self, served_failed: bool, copy_failed: bool, different: Option<bool>) {
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        pairs.pairs += 1;
        pairs.copy_only_errors += u64::from(copy_failed && !served_failed);
        pairs.served_only_errors += u64::from(served_failed && !copy_failed);
        if let Some(different) = different {
            pairs.compared += 1;
            pairs.different += u64::from(different);
        }
    }

    /// The pairs counted so far.
    pub fn pairs(&self) -> PairCounts {
        *self.pairs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the comparison of a second copy to the served version: where the served
    /// version differs from itself.
    pub fn record_noise(&self, differences: &[Difference]) {
        if differences.is_empty() {
            return;
        }
        let mut paths = self.lock();
        for difference in differences {
            paths.entry(&difference.path).noise += 1;
        }
    }

    /// The share of compared copies counted as different.
    pub fn difference_rate(&self) -> f64 {
        let compared = self.counts.compared.load(Ordering::Relaxed);
        self.counts.different.load(Ordering::Relaxed) as f64 / compared.max(1) as f64
    }

    /// Starts over.
    pub fn reset(&self) {
        let counts = &self.counts;
        for counter in [
            &counts.copied,
            &counts.skipped_method,
            &counts.skipped_body,
            &counts.skipped_percent,
            &counts.dropped,
            &counts.errors,
            &counts.timeouts,
            &counts.compared,
            &counts.identical,
            &counts.different,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        *self.pairs.lock().unwrap_or_else(|e| e.into_inner()) = PairCounts::default();
        *self.lock() = Paths::default();
    }

    /// The report as `GET /admin/mirror` shows it (without the config).
    pub fn to_json(&self) -> Value {
        let c = &self.counts;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let compared = load(&c.compared);
        let pairs = self.pairs();
        let paths = self.lock();
        let mut rows: Vec<(&String, &PathCounts)> = paths.counts.iter().collect();
        rows.sort_by(|a, b| {
            b.1.different
                .cmp(&a.1.different)
                .then(b.1.noise.cmp(&a.1.noise))
        });
        let rows: Vec<Value> = rows
            .into_iter()
            .take(SHOWN_PATHS)
            .map(|(path, counts)| {
                json!({
                    "path": path,
                    "different": counts.different,
                    "noise": counts.noise,
                    "reported": counts.is_reported(compared),
                })
            })
            .collect();
        let examples: Vec<Value> = paths
            .examples
            .iter()
            .rev()
            .map(|e| {
                let differences: Vec<Value> = e
                    .differences
                    .iter()
                    .map(|d| json!({"path": d.path, "served": d.served, "copy": d.copy}))
                    .collect();
                json!({
                    "method": e.method,
                    "path": e.path,
                    "request_id": e.request_id,
                    "served_status": e.served_status,
                    "copy_status": e.copy_status,
                    "differences": differences,
                })
            })
            .collect();
        json!({
            "counts": {
                "copied": load(&c.copied),
                "skipped_method": load(&c.skipped_method),
                "skipped_body": load(&c.skipped_body),
                "skipped_percent": load(&c.skipped_percent),
                "dropped": load(&c.dropped),
                "errors": load(&c.errors),
                "timeouts": load(&c.timeouts),
                "compared": compared,
                "identical": load(&c.identical),
                "different": load(&c.different),
                "pairs": pairs.pairs,
                "copy_only_errors": pairs.copy_only_errors,
                "served_only_errors": pairs.served_only_errors,
            },
            "difference_rate": self.difference_rate(),
            "paths": rows,
            "examples": examples,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Paths> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Paths {
    /// The counts of `path`, or of [`OTHER_PATHS`] once [`MAX_PATHS`] are counted.
    fn entry(&mut self, path: &str) -> &mut PathCounts {
        let path = cut_path(path);
        let key = if self.counts.contains_key(path) || self.counts.len() < MAX_PATHS {
            path
        } else {
            OTHER_PATHS
        };
        self.counts.entry(key.to_owned()).or_default()
    }

    fn get(&self, path: &str) -> PathCounts {
        self.counts
            .get(cut_path(path))
            .or_else(|| self.counts.get(OTHER_PATHS))
            .copied()
            .unwrap_or_default()
    }
}

/// The longest path kept (JSON keys are the client's and the upstream's to choose).
pub const MAX_PATH_LEN: usize = 200;

/// `path`, cut to [`MAX_PATH_LEN`] bytes on a character boundary.
fn cut_path(path: &str) -> &str {
    if path.len() <= MAX_PATH_LEN {
        return path;
    }
    let mut end = MAX_PATH_LEN;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn difference(path: &str) -> Difference {
        Difference {
            path: path.to_owned(),
            served: "1".to_owned(),
            copy: "2".to_owned(),
        }
    }

    fn example() -> Example {
        Example {
            method: "GET".into(),
            path: "/".into(),
            request_id: "r".into(),
            served_status: 200,
            copy_status: 200,
            differences: vec![],
        }
    }

    #[test]
    fn diffys_filter() {
        let counts = |different, noise| PathCounts { different, noise };
        // Differs only for the canary: reported.
        assert!(counts(10, 0).is_reported(1_000));
        // As often between two instances of the served version: noise.
        assert!(!counts(10, 10).is_reported(1_000));
        assert!(!counts(10, 9).is_reported(1_000));
        // 10 vs 6: |4| / 16 = 25% > 20%, and 4 of 1,000 = 0.4% > 0.03%.
        assert!(counts(10, 6).is_reported(1_000));
        // The same gap in 100,000 comparisons is 0.004%: under the absolute threshold.
        assert!(!counts(10, 6).is_reported(100_000));
        assert!(!counts(0, 0).is_reported(0));
    }

    #[test]
    fn noise_paths_do_not_make_a_copy_different() {
        let report = MirrorReport::default();
        for _ in 0..50 {
            report.record_noise(&[difference("body.ts")]);
        }
        for _ in 0..50 {
            assert!(!report.record(&[difference("body.ts")], example));
        }
        assert!(report.record(&[difference("body.ts"), difference("body.price")], example));
        assert!(!report.record(&[], example));
        let shown = report.to_json();
        assert_eq!(shown["counts"]["compared"], 52);
        assert_eq!(shown["counts"]["identical"], 1);
        assert_eq!(shown["counts"]["different"], 1);
        assert_eq!(shown["paths"][0]["path"], "body.ts");
        assert_eq!(shown["paths"][0]["different"], 51);
        assert_eq!(shown["paths"][0]["noise"], 50);
        assert_eq!(shown["paths"][0]["reported"], false);
        assert_eq!(shown["paths"][1]["reported"], true);
        assert_eq!(shown["examples"].as_array().unwrap().len(), 20);
        report.reset();
        assert_eq!(report.to_json()["counts"]["compared"], 0);
        assert_eq!(report.to_json()["paths"], json!([]));
    }

    #[test]
    fn paths_and_examples_are_bounded() {
        let report = MirrorReport::default();
        for i in 0..(MAX_PATHS + 500) {
            report.record(&[difference(&format!("body.k{i}"))], example);
        }
        let paths = report.lock();
        assert_eq!(paths.counts.len(), MAX_PATHS + 1);
        assert_eq!(paths.counts[OTHER_PATHS].different, 500);
        assert_eq!(paths.examples.len(), MAX_EXAMPLES);
        drop(paths);
        assert_eq!(
            report.to_json()["paths"].as_array().unwrap().len(),
            SHOWN_PATHS
        );
        let long = format!("body.{}", "é".repeat(300));
        assert_eq!(cut_path(&long).len(), 199);
        assert_eq!(cut_path("body.x"), "body.x");
    }
}
