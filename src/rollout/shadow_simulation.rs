//! The seeded simulation of the shadow stage's verdicts: copies of requests to the canary,
//! each paired with the served answer to the same request, go through
//! [`Evidence::observe_shadow`] with the stage's rules (a `fail` of errors or differences
//! rolls back at once; step 1 starts once both `pass`, after `shadow` and `min_requests`
//! pairs; still inconclusive at `max_step_time`, it holds). Pure logic, no clock, no network.
//! The tables go to stdout (`cargo test --lib shadow_simulation -- --nocapture`) and to
//! `target/shadow-simulation.md`; the test fails if a bound does not hold.
//!
//! Model: one tick is the contract's default interval, 5 s. R requests a second are served
//! and all copied (`percent = 100`); a tick pairs Poisson(5 R) of them. The served request
//! fails with probability `p`, its copy with `p + e`, independently; a pair where both
//! answered is compared and differs (at a path the noise filter reports) with probability
//! `q`. Settings: the contract's defaults (error_tolerance 0.01, confidence 0.99,
//! max_diff_rate 0.01, min_requests 100), shadow 5 min, max_step_time 10 min.

use std::fmt::Write as _;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Binomial, Distribution, Poisson};

use super::analysis::{AnalysisSettings, Evidence, ShadowTick, Verdict};

const SETTINGS: AnalysisSettings = AnalysisSettings {
    error_tolerance: 0.01,
    latency_tolerance: 0.25,
    confidence: 0.99,
    max_diff_rate: Some(0.01),
};
const INTERVAL_S: f64 = 5.0;
const SHADOW_S: f64 = 300.0;
const MAX_STEP_TIME_S: f64 = 600.0;
const MIN_REQUESTS: u64 = 100;
/// Stages simulated per row.
const RUNS: u64 = 1_000;

/// How a shadow stage ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    /// Rolled back, after this many seconds, by this metric.
    RolledBack(f64, &'static str),
    /// Step 1 started after this many seconds.
    Passed(f64),
    /// Still in the stage at `max_step_time` (held).
    Held,
}

/// A count of `n` trials at probability `p`.
fn binomial(n: u64, p: f64, rng: &mut SmallRng) -> u64 {
    if n == 0 || p <= 0.0 {
        return 0;
    }
    Binomial::new(n, p.min(1.0)).map_or(0, |b| b.sample(rng))
}

/// One tick's pairs: served errors at `p`, copy errors at `p + e`, differences at `q`.
fn tick(rate: f64, p: f64, e: f64, q: f64, rng: &mut SmallRng) -> ShadowTick {
    let n = Poisson::new(rate * INTERVAL_S).map_or(0.0, |d| d.sample(rng)) as u64;
    let copy = (p + e).min(1.0);
    // The four outcomes of a pair, drawn one after the other (a multinomial).
    let only_copy = binomial(n, copy * (1.0 - p), rng);
    let rest = 1.0 - copy * (1.0 - p);
    let only_served = if rest > 0.0 {
        binomial(n - only_copy, p * (1.0 - copy) / rest, rng)
    } else {
        0
    };
    let rest_after = rest - p * (1.0 - copy);
    let both = if rest_after > 0.0 {
        binomial(n - only_copy - only_served, p * copy / rest_after, rng)
    } else {
        n - only_copy - only_served
    };
    let compared = n - only_copy - only_served - both;
    ShadowTick {
        pairs: n,
        copy_only_errors: only_copy,
        served_only_errors: only_served,
        compared,
        different: binomial(compared, q, rng),
    }
}

/// One shadow stage, by the machine's rules.
fn stage(rate: f64, p: f64, e: f64, q: f64, seed: u64) -> End {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut evidence = Evidence::new(&SETTINGS);
    let mut pairs = 0;
    let mut elapsed = 0.0;
    while elapsed < MAX_STEP_TIME_S {
        elapsed += INTERVAL_S;
        let seen = tick(rate, p, e, q, &mut rng);
        pairs += seen.pairs;
        evidence.observe_shadow(&seen, &mut rng);
        let errors = evidence.errors().verdict;
        let differences = evidence
            .differences()
            .map_or(Verdict::Inconclusive, |v| v.verdict);
        if errors == Verdict::Fail {
            return End::RolledBack(elapsed, "errors");
        }
        if differences == Verdict::Fail {
            return End::RolledBack(elapsed, "differences");
        }
        let passed = errors == Verdict::Pass && differences == Verdict::Pass;
        if passed && elapsed >= SHADOW_S && pairs >= MIN_REQUESTS {
            return End::Passed(elapsed);
        }
    }
    End::Held
}

fn seed(row: u64, run: u64) -> u64 {
    row.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ run
}

/// Median of the times, runs that never got there counted as infinite.
fn median(times: &mut [f64]) -> String {
    times.sort_by(f64::total_cmp);
    match times.get(times.len() / 2) {
        Some(t) if t.is_finite() => format!("{t:.0} s"),
        _ => "never".to_string(),
    }
}

#[test]
fn shadow_simulation_tables() {
    let started = std::time::Instant::now();
    let mut markdown = format!(
        "## Shadow stage, simulated\n\nSettings: error_tolerance {}, max_diff_rate {}, \
         confidence {} (alpha split in three: errors, latency, differences); interval \
         {INTERVAL_S} s, shadow {SHADOW_S} s, max_step_time {MAX_STEP_TIME_S} s, min_requests \
         {MIN_REQUESTS}. {RUNS} stages per row.\n",
        SETTINGS.error_tolerance,
        SETTINGS.max_diff_rate.unwrap_or_default(),
        SETTINGS.confidence,
    );
    let mut failures = Vec::new();
    let _ = writeln!(
        markdown,
        "\n### A canary as good as the served version: stages rolled back (the bound: at most 1%)\n\n\
         Copies fail as often as served requests; answers differ at exactly max_diff_rate (the \
         worst case a canary that is good enough can be) or never.\n\n\
         | R (req/s copied) | error rate | difference rate | rolled back | step 1 started | held at max_step_time |\n\
         |---:|---:|---:|---:|---:|---:|"
    );
    let mut row = 0;
    for rate in [2.0, 20.0, 200.0] {
        for p in [0.0, 0.01, 0.05] {
            for q in [0.0, 0.01] {
                row += 1;
                let ends: Vec<End> = (0..RUNS)
                    .map(|run| stage(rate, p, 0.0, q, seed(row, run)))
                    .collect();
                let rolled = ends
                    .iter()
                    .filter(|e| matches!(e, End::RolledBack(..)))
                    .count();
                let passed = ends.iter().filter(|e| matches!(e, End::Passed(_))).count();
                let held = ends.iter().filter(|e| **e == End::Held).count();
                let share = |n: usize| format!("{:.1}%", 100.0 * n as f64 / RUNS as f64);
                let _ = writeln!(
                    markdown,
                    "| {rate} | {:.0}% | {:.0}% | {} | {} | {} |",
                    p * 100.0,
                    q * 100.0,
                    share(rolled),
                    share(passed),
                    share(held)
                );
                if rolled as f64 > 0.01 * RUNS as f64 {
                    failures.push(format!("R {rate}, p {p}, q {q}: {rolled} rolled back"));
                }
            }
        }
    }
    let _ = writeln!(
        markdown,
        "\n### A worse canary: time to roll it back in the shadow stage (median)\n\n\
         Served requests fail at 1%; the canary's copies fail more, or its answers differ. \
         {} stages per cell; \"never\": the median stage was not rolled back within \
         max_step_time.\n\n\
         | R (req/s copied) | copies +2 points of errors | +5 points | +10 points | answers differ 2% | 5% | 20% |\n\
         |---:|---:|---:|---:|---:|---:|---:|",
        RUNS / 4
    );
    for rate in [2.0, 20.0, 200.0] {
        let mut cells = Vec::new();
        for (e, q) in [
            (0.02, 0.0),
            (0.05, 0.0),
            (0.10, 0.0),
            (0.0, 0.02),
            (0.0, 0.05),
            (0.0, 0.20),
        ] {
            row += 1;
            let mut times: Vec<f64> = (0..RUNS / 4)
                .map(|run| match stage(rate, 0.01, e, q, seed(row, run)) {
                    End::RolledBack(t, _) => t,
                    _ => f64::INFINITY,
                })
                .collect();
            let shown = median(&mut times);
            if rate >= 20.0 && (e >= 0.05 || q >= 0.05) && shown == "never" {
                failures.push(format!("R {rate}, e {e}, q {q}: not rolled back"));
            }
            cells.push(shown);
        }
        let _ = writeln!(markdown, "| {rate} | {} |", cells.join(" | "));
    }
    let _ = writeln!(
        markdown,
        "\n(simulated in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{markdown}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/shadow-simulation.md");
    if let Err(error) = std::fs::write(&path, &markdown) {
        println!("could not write {}: {error}", path.display());
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
