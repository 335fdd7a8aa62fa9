//! The seeded simulation that shows the analysis keeps the contract's promises: simulated
//! rollouts of identical and of worse canaries through `Evidence`, with the contract's rules
//! (a `fail` rolls back at once; a step advances after `step_time` with `min_requests` per
//! version at this step and both metrics `pass`; 100 is the promotion). Pure logic, no clock,
//! no network. The tables go to stdout (`cargo test --lib rollout -- --nocapture`) and to
//! `target/rollout-simulation.md`; the test fails if a bound does not hold.
//!
//! Conventions: one tick is the contract's default interval, 5 s. "R req/s per version" means
//! a service of 2R req/s in total split by the step: at step s% the canary gets 2R * s/100 and
//! the baseline the rest (each gets R at the 50% step); tables "at the same rate" hold the
//! split at 50%. Requests per interval are Poisson, errors Binomial, latencies log-normal
//! (median 20 ms, sigma 0.5: p99 = 64 ms), a slower canary has every latency multiplied.
//! Settings are the contract's defaults (tolerances 0.01 and 0.25, confidence 0.99, plan
//! [1, 5, 20, 50, 100], step_time 1m, min_requests 100).
//!
//! `cargo test` builds this unoptimized, so the hot loops are plain loops and latencies come
//! from a 2^20-entry table (three per random `u64`); the whole run takes about a minute on one
//! core.

use std::fmt::Write as _;
use std::sync::LazyLock;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Binomial, Distribution, Poisson};

use super::analysis::{AnalysisSettings, Evidence, Verdict, VersionTick};
use super::histogram::{LATENCY_BUCKETS, bucket_bounds_micros};

const SETTINGS: AnalysisSettings = AnalysisSettings {
    error_tolerance: 0.01,
    latency_tolerance: 0.25,
    confidence: 0.99,
    max_diff_rate: None,
};
const PLAN: [u32; 5] = [1, 5, 20, 50, 100];
const INTERVAL_S: f64 = 5.0;
const STEP_TIME_S: f64 = 60.0;
const MIN_REQUESTS: u64 = 100;
const MEDIAN_MS: f64 = 20.0;
const SIGMA: f64 = 0.5;

/// Latencies drawn from a table of 2^20 equally likely buckets, filled from the log-normal's
/// exact bucket probabilities (each bucket's share is off by less than 2^-20): one random
/// `u64` gives three latencies.
struct LatencyModel {
    table: Vec<u16>,
}

const TABLE_BITS: u32 = 20;

impl LatencyModel {
    fn log_normal(median_ms: f64, sigma: f64) -> Self {
        let mu = (median_ms * 1_000.0).ln();
        let cdf = |micros: u64| {
            if micros == u64::MAX {
                1.0
            } else if micros == 0 {
                0.0
            } else {
                normal_cdf(((micros as f64).ln() - mu) / sigma)
            }
        };
        let size = 1usize << TABLE_BITS;
        let mut table = Vec::with_capacity(size);
        for bucket in 0..LATENCY_BUCKETS {
            // Entries up to the bucket's upper bound, in CDF order.
            let through = (cdf(bucket_bounds_micros(bucket).1) * size as f64).round() as usize;
            while table.len() < through.min(size) {
                table.push(bucket as u16);
            }
        }
        table.resize(size, (LATENCY_BUCKETS - 1) as u16);
        Self { table }
    }

    /// Adds `n` latencies to `histogram` (plain loops: this is the simulation's hot spot, and
    /// `cargo test` builds it without optimizations).
    fn fill(&self, n: u64, histogram: &mut [u64], rng: &mut SmallRng) {
        const MASK: u64 = (1 << TABLE_BITS) - 1;
        let table = &self.table[..];
        let mut left = n;
        while left > 0 {
            let mut bits = rng.next_u64();
            let take = if left >= 3 { 3 } else { left };
            let mut taken = 0;
            while taken < take {
                histogram[table[(bits & MASK) as usize] as usize] += 1;
                bits >>= TABLE_BITS;
                taken += 1;
            }
            left -= take;
        }
    }
}

/// Standard normal CDF (erfc of Numerical Recipes, relative error below 1.2e-7).
fn normal_cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - 0.5 * erfc
    } else {
        0.5 * erfc
    }
}

/// The latency models used: the baseline's, and 1.25x, 1.5x and 2x slower (built once).
static LATENCY_MODELS: LazyLock<[(f64, LatencyModel); 4]> = LazyLock::new(|| {
    [1.0, 1.25, 1.5, 2.0]
        .map(|factor| (factor, LatencyModel::log_normal(MEDIAN_MS * factor, SIGMA)))
});

/// One version's behaviour.
struct Version {
    error_rate: f64,
    latency: &'static LatencyModel,
}

impl Version {
    /// A version with this error rate, its latencies `latency_factor` times the baseline's
    /// (1, 1.25, 1.5 or 2).
    fn new(error_rate: f64, latency_factor: f64) -> Self {
        let models = &*LATENCY_MODELS;
        let latency = models
            .iter()
            .find(|(factor, _)| *factor == latency_factor)
            .map_or(&models[0].1, |(_, model)| model);
        Self {
            error_rate,
            latency,
        }
    }

    /// One interval of traffic (`None`: no traffic): (requests, errors), latencies into
    /// `histogram`.
    fn tick(
        &self,
        arrivals: Option<&Poisson<f64>>,
        histogram: &mut [u64],
        rng: &mut SmallRng,
    ) -> (u64, u64) {
        histogram.copy_from_slice(&[0; LATENCY_BUCKETS]);
        let requests = arrivals.map_or(0, |poisson| poisson.sample(rng) as u64);
        let errors = match Binomial::new(requests, self.error_rate) {
            Ok(binomial) => binomial.sample(rng),
            Err(_) => 0,
        };
        self.latency.fill(requests, histogram, rng);
        (requests, errors)
    }
}

/// Requests per interval at one canary percent: (percent, canary, baseline); `None` is no
/// traffic.
type Arrivals = (u32, Option<Poisson<f64>>, Option<Poisson<f64>>);

/// A scenario: the two versions and the traffic.
struct Scenario {
    baseline: Version,
    canary: Version,
    /// Requests per interval at each canary percent used.
    arrivals: Vec<Arrivals>,
}

impl Scenario {
    fn new(baseline: Version, canary: Version, rate: f64) -> Self {
        let per_interval =
            |percent: u32| Poisson::new(2.0 * rate * f64::from(percent) / 100.0 * INTERVAL_S).ok();
        let arrivals = PLAN
            .into_iter()
            .chain([50])
            .map(|percent| (percent, per_interval(percent), per_interval(100 - percent)))
            .collect();
        Self {
            baseline,
            canary,
            arrivals,
        }
    }

    fn arrivals(&self, canary_percent: u32) -> (Option<&Poisson<f64>>, Option<&Poisson<f64>>) {
        self.arrivals
            .iter()
            .find(|(percent, ..)| *percent == canary_percent)
            .map_or((None, None), |(_, canary, baseline)| {
                (canary.as_ref(), baseline.as_ref())
            })
    }
}

/// How a simulated rollout ended, with its time in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    /// Time, and time spent at each step before 100.
    Promoted(f64, [f64; 4]),
    /// Time, and index of the step at which it happened.
    RolledBack(f64, usize),
    /// Neither before the horizon.
    Running,
}

/// Reused buffers and the rng of one simulated rollout.
struct Run {
    rng: SmallRng,
    canary_histogram: Vec<u64>,
    baseline_histogram: Vec<u64>,
}

impl Run {
    fn new(seed: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
            canary_histogram: vec![0; LATENCY_BUCKETS],
            baseline_histogram: vec![0; LATENCY_BUCKETS],
        }
    }

    /// One interval at `canary_percent`: feeds the evidence and returns (canary, baseline)
    /// requests.
    fn tick(
        &mut self,
        scenario: &Scenario,
        canary_percent: u32,
        evidence: &mut Evidence,
    ) -> (u64, u64) {
        let (canary_arrivals, baseline_arrivals) = scenario.arrivals(canary_percent);
        let (canary_requests, canary_errors) =
            scenario
                .canary
                .tick(canary_arrivals, &mut self.canary_histogram, &mut self.rng);
        let (baseline_requests, baseline_errors) = scenario.baseline.tick(
            baseline_arrivals,
            &mut self.baseline_histogram,
            &mut self.rng,
        );
        let canary = VersionTick {
            requests: canary_requests,
            errors: canary_errors,
            latency: &self.canary_histogram,
        };
        let baseline = VersionTick {
            requests: baseline_requests,
            errors: baseline_errors,
            latency: &self.baseline_histogram,
        };
        evidence.observe(&canary, &baseline, &mut self.rng);
        (canary_requests, baseline_requests)
    }

    /// A whole rollout through [`PLAN`], with the contract's rules.
    fn rollout(&mut self, scenario: &Scenario, horizon_s: f64) -> Outcome {
        let mut evidence = Evidence::new(&SETTINGS);
        let mut step = 0;
        let mut step_start = 0.0;
        let mut step_requests = (0, 0);
        let mut step_times = [0.0; 4];
        let mut now = 0.0;
        while now < horizon_s {
            let (canary, baseline) = self.tick(scenario, PLAN[step], &mut evidence);
            now += INTERVAL_S;
            step_requests.0 += canary;
            step_requests.1 += baseline;
            let (errors, latency) = (evidence.errors().verdict, evidence.latency().verdict);
            if errors == Verdict::Fail || latency == Verdict::Fail {
                return Outcome::RolledBack(now, step);
            }
            if now - step_start >= STEP_TIME_S
                && step_requests.0 >= MIN_REQUESTS
                && step_requests.1 >= MIN_REQUESTS
                && errors == Verdict::Pass
                && latency == Verdict::Pass
            {
                step_times[step] = now - step_start;
                step += 1;
                if PLAN[step] == 100 {
                    return Outcome::Promoted(now, step_times);
                }
                step_start = now;
                step_requests = (0, 0);
                evidence.start_step();
            }
        }
        Outcome::Running
    }

    /// At a fixed split (both versions at `scenario.rate`) until the first `fail` or the
    /// horizon, or until both metrics pass when `stop_at_pass`.
    fn fixed_split(
        &mut self,
        scenario: &Scenario,
        horizon_s: f64,
        stop_at_pass: bool,
    ) -> SplitTimes {
        let mut evidence = Evidence::new(&SETTINGS);
        let mut times = SplitTimes::default();
        let mut now = 0.0;
        while now < horizon_s {
            self.tick(scenario, 50, &mut evidence);
            now += INTERVAL_S;
            let (errors, latency) = (evidence.errors().verdict, evidence.latency().verdict);
            if errors == Verdict::Fail || latency == Verdict::Fail {
                times.failed = Some(now);
                break;
            }
            if errors == Verdict::Pass {
                times.errors_passed.get_or_insert(now);
            }
            if latency == Verdict::Pass {
                times.latency_passed.get_or_insert(now);
            }
            if errors == Verdict::Pass && latency == Verdict::Pass {
                times.passed.get_or_insert(now);
                if stop_at_pass {
                    break;
                }
            }
        }
        times
    }
}

/// First times (s) at a fixed split; `None`: not before the horizon.
#[derive(Clone, Copy, Debug, Default)]
struct SplitTimes {
    errors_passed: Option<f64>,
    latency_passed: Option<f64>,
    /// Both metrics `pass` at the same tick.
    passed: Option<f64>,
    failed: Option<f64>,
}

fn seed(row: u64, run: u64) -> u64 {
    row.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ run
}

/// `q`-quantile (nearest rank) of the times, with runs that never got there counted as
/// infinite; `None` when it is infinite.
fn quantile(times: &[Option<f64>], q: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = times.iter().map(|t| t.unwrap_or(f64::INFINITY)).collect();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().filter(|t| t.is_finite())
}

fn show(time: Option<f64>) -> String {
    match time {
        Some(seconds) => format!("{seconds:.0} s"),
        None => "never".to_string(),
    }
}

fn percent(count: usize, runs: usize) -> String {
    format!(
        "{:.1}% ({count}/{runs})",
        100.0 * count as f64 / runs as f64
    )
}

/// Everything measured, and the checks that must hold.
struct Report {
    markdown: String,
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, ok: bool, what: String) {
        if !ok {
            self.failures.push(what);
        }
    }
}

const RUNS: u64 = 1_000;

/// Runs `runs` seeded simulations of one row.
fn runs<T>(row: u64, runs: u64, simulate: impl Fn(&mut Run) -> T) -> Vec<T> {
    (0..runs)
        .map(|run| simulate(&mut Run::new(seed(row, run))))
        .collect()
}

/// The contract's bound: identical versions, the whole plan, 1,000 rollouts per row.
fn false_rollbacks(report: &mut Report) {
    const HORIZON_S: f64 = 1_800.0;
    let _ = writeln!(
        report.markdown,
        "\n### Identical versions: rollouts rolled back (the bound: at most 1%)\n\n\
         {RUNS} rollouts per row through {PLAN:?}, 30 min each at most; traffic as R req/s per \
         version at 50% (2R in total).\n\n\
         | R (req/s per version at 50%) | error rate | rolled back | promoted in 30 min | median time to promote |\n\
         |---|---|---|---|---|"
    );
    for (r, rate) in [2.0, 20.0, 200.0].into_iter().enumerate() {
        for (e, error_rate) in [0.0, 0.01, 0.05].into_iter().enumerate() {
            let scenario = Scenario::new(
                Version::new(error_rate, 1.0),
                Version::new(error_rate, 1.0),
                rate,
            );
            let outcomes = runs(100 + 10 * r as u64 + e as u64, RUNS, |run| {
                run.rollout(&scenario, HORIZON_S)
            });
            let rolled_back = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::RolledBack(..)))
                .count();
            let promoted: Vec<Option<f64>> = outcomes
                .iter()
                .map(|o| match o {
                    Outcome::Promoted(t, _) => Some(*t),
                    _ => None,
                })
                .collect();
            let n = outcomes.len();
            let _ = writeln!(
                report.markdown,
                "| {rate} | {:.0}% | {} | {} | {} |",
                error_rate * 100.0,
                percent(rolled_back, n),
                percent(promoted.iter().flatten().count(), n),
                show(quantile(&promoted, 0.5)),
            );
            report.check(
                rolled_back * 100 <= n,
                format!("identical at {rate} req/s, {error_rate} errors: {rolled_back} of {n} rolled back, want <= 1%"),
            );
        }
    }
    // The bound is for any canary within the tolerance; identical versions are far inside it.
    // At the tolerance itself it is nearly tight: these rows would show an invalid test.
    const BOUNDARY_RUNS: u64 = 500;
    let _ = writeln!(
        report.markdown,
        "\nA canary exactly at the tolerance is still \"as good\" by the contract, and the \
         hardest case for the bound ({BOUNDARY_RUNS} rollouts per row, baseline 1% errors):\n\n\
         | canary | R | rolled back | promoted in 30 min |\n\
         |---|---|---|---|"
    );
    for (c, (name, error_rate, factor)) in [
        ("+1 point errors (2%)", 0.02, 1.0),
        ("1.25x latency", 0.01, 1.25),
    ]
    .into_iter()
    .enumerate()
    {
        let rate = 200.0;
        let scenario = Scenario::new(
            Version::new(0.01, 1.0),
            Version::new(error_rate, factor),
            rate,
        );
        let outcomes = runs(150 + c as u64, BOUNDARY_RUNS, |run| {
            run.rollout(&scenario, HORIZON_S)
        });
        let rolled_back = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::RolledBack(..)))
            .count();
        let promoted = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Promoted(..)))
            .count();
        let n = outcomes.len();
        let _ = writeln!(
            report.markdown,
            "| {name} | {rate} | {} | {} |",
            percent(rolled_back, n),
            percent(promoted, n)
        );
        report.check(
            rolled_back * 100 <= n,
            format!(
                "canary at the tolerance ({name}): {rolled_back} of {n} rolled back, want <= 1%"
            ),
        );
    }
}

/// A worse canary at a fixed split, both versions at the same rate from t = 0.
fn rollback_times(report: &mut Report) {
    const HORIZON_S: f64 = 1_800.0;
    let _ = writeln!(
        report.markdown,
        "\n### Worse canary, both versions at the same rate: time to roll back\n\n\
         {RUNS} runs per row; the baseline has 1% errors; time from the first request, 30 min \
         at most.\n\n\
         | canary | req/s per version | rolled back | median | p95 |\n\
         |---|---|---|---|---|"
    );
    let cases = [
        ("+2 points errors (3%)", 0.03, 1.0, 20.0),
        ("+5 points errors (6%)", 0.06, 1.0, 20.0),
        ("+10 points errors (11%)", 0.11, 1.0, 20.0),
        ("+2 points errors (3%)", 0.03, 1.0, 200.0),
        ("+5 points errors (6%)", 0.06, 1.0, 200.0),
        ("1.5x latency", 0.01, 1.5, 20.0),
        ("2x latency", 0.01, 2.0, 20.0),
        ("1.5x latency", 0.01, 1.5, 200.0),
        ("2x latency", 0.01, 2.0, 200.0),
    ];
    for (c, (name, error_rate, factor, rate)) in cases.into_iter().enumerate() {
        let scenario = Scenario::new(
            Version::new(0.01, 1.0),
            Version::new(error_rate, factor),
            rate,
        );
        let times = runs(200 + c as u64, RUNS, |run| {
            run.fixed_split(&scenario, HORIZON_S, false).failed
        });
        let median = quantile(&times, 0.5);
        let _ = writeln!(
            report.markdown,
            "| {name} | {rate} | {} | {} | {} |",
            percent(times.iter().flatten().count(), times.len()),
            show(median),
            show(quantile(&times, 0.95)),
        );
        if error_rate == 0.06 && rate == 20.0 {
            report.check(
                median.is_some_and(|t| t <= 30.0),
                format!("+5 points at 20 req/s per version: median time to roll back {median:?}, want <= 30 s"),
            );
        }
    }
}

/// A worse canary from the start of the plan: when, and at which step, it is rolled back.
fn plan_rollbacks(report: &mut Report) {
    const HORIZON_S: f64 = 1_800.0;
    let _ = writeln!(
        report.markdown,
        "\n### Worse canary through the plan: time to roll back\n\n\
         {RUNS} rollouts per row through {PLAN:?} from the first step, baseline at 1% errors; \
         R req/s per version at 50% (so at the 1% step the canary gets 2R/100 req/s).\n\n\
         | canary | R | rolled back in 30 min | median | p95 | rolled back at step 1% / 5% / 20% / 50% |\n\
         |---|---|---|---|---|---|"
    );
    let cases = [
        ("+5 points errors (6%)", 0.06, 1.0, 20.0),
        ("+5 points errors (6%)", 0.06, 1.0, 200.0),
        ("+10 points errors (11%)", 0.11, 1.0, 200.0),
        ("2x latency", 0.01, 2.0, 200.0),
    ];
    for (c, (name, error_rate, factor, rate)) in cases.into_iter().enumerate() {
        let scenario = Scenario::new(
            Version::new(0.01, 1.0),
            Version::new(error_rate, factor),
            rate,
        );
        let outcomes = runs(400 + c as u64, RUNS, |run| {
            run.rollout(&scenario, HORIZON_S)
        });
        let mut at_step = [0; 4];
        let times: Vec<Option<f64>> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::RolledBack(t, step) => {
                    at_step[(*step).min(3)] += 1;
                    Some(*t)
                }
                _ => None,
            })
            .collect();
        let _ = writeln!(
            report.markdown,
            "| {name} | {rate} | {} | {} | {} | {} / {} / {} / {} |",
            percent(times.iter().flatten().count(), times.len()),
            show(quantile(&times, 0.5)),
            show(quantile(&times, 0.95)),
            at_step[0],
            at_step[1],
            at_step[2],
            at_step[3],
        );
    }
}

/// Identical versions at a fixed split: how soon a step's analysis passes.
fn pass_times(report: &mut Report) {
    const HORIZON_S: f64 = 1_800.0;
    let _ = writeln!(
        report.markdown,
        "\n### Identical versions, both at the same rate: time until a step's analysis passes\n\n\
         {RUNS} runs per row; median (p95) of the first interval at which errors, latency, and \
         both pass; 30 min at most.\n\n\
         | req/s per version | error rate | errors pass | latency pass | both pass |\n\
         |---|---|---|---|---|"
    );
    let cases = [
        (20.0, 0.0),
        (20.0, 0.01),
        (20.0, 0.05),
        (200.0, 0.0),
        (200.0, 0.01),
        (200.0, 0.05),
    ];
    for (c, (rate, error_rate)) in cases.into_iter().enumerate() {
        let scenario = Scenario::new(
            Version::new(error_rate, 1.0),
            Version::new(error_rate, 1.0),
            rate,
        );
        let times = runs(300 + c as u64, RUNS, |run| {
            run.fixed_split(&scenario, HORIZON_S, true)
        });
        let column = |pick: fn(&SplitTimes) -> Option<f64>| {
            let picked: Vec<Option<f64>> = times.iter().map(pick).collect();
            format!(
                "{} ({})",
                show(quantile(&picked, 0.5)),
                show(quantile(&picked, 0.95))
            )
        };
        let both: Vec<Option<f64>> = times.iter().map(|t| t.passed).collect();
        let median = quantile(&both, 0.5);
        let _ = writeln!(
            report.markdown,
            "| {rate} | {:.0}% | {} | {} | {} |",
            error_rate * 100.0,
            column(|t| t.errors_passed),
            column(|t| t.latency_passed),
            column(|t| t.passed),
        );
        if rate >= 200.0 && error_rate <= 0.01 {
            report.check(
                median.is_some_and(|t| t <= 30.0),
                format!("identical at {rate} req/s, {error_rate} errors: median time to pass {median:?}, want <= 30 s"),
            );
        }
    }
}

/// Identical versions through the whole plan: time to promote, and per step.
fn promotion_times(report: &mut Report) {
    const HORIZON_S: f64 = 4.0 * 3_600.0;
    const PROMOTION_RUNS: u64 = 100;
    let _ = writeln!(
        report.markdown,
        "\n### Identical versions through the plan: time to promote\n\n\
         {PROMOTION_RUNS} rollouts per row through {PLAN:?}, 4 h at most, step_time \
         {STEP_TIME_S} s; R req/s per version at 50%. Median time spent at each step.\n\n\
         | R | error rate | promoted in 4 h | median | p95 | at 1% / 5% / 20% / 50% |\n\
         |---|---|---|---|---|---|"
    );
    let cases = [
        (20.0, 0.0),
        (20.0, 0.01),
        (200.0, 0.0),
        (200.0, 0.01),
        (200.0, 0.05),
    ];
    for (c, (rate, error_rate)) in cases.into_iter().enumerate() {
        let scenario = Scenario::new(
            Version::new(error_rate, 1.0),
            Version::new(error_rate, 1.0),
            rate,
        );
        let outcomes = runs(500 + c as u64, PROMOTION_RUNS, |run| {
            run.rollout(&scenario, HORIZON_S)
        });
        let times: Vec<Option<f64>> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Promoted(t, _) => Some(*t),
                _ => None,
            })
            .collect();
        let steps: Vec<String> = (0..4)
            .map(|step| {
                let at: Vec<Option<f64>> = outcomes
                    .iter()
                    .filter_map(|o| match o {
                        Outcome::Promoted(_, steps) => Some(Some(steps[step])),
                        _ => None,
                    })
                    .collect();
                show(quantile(&at, 0.5))
            })
            .collect();
        let _ = writeln!(
            report.markdown,
            "| {rate} | {:.0}% | {} | {} | {} | {} |",
            error_rate * 100.0,
            percent(times.iter().flatten().count(), times.len()),
            show(quantile(&times, 0.5)),
            show(quantile(&times, 0.95)),
            steps.join(" / "),
        );
    }
}

#[test]
fn simulation_tables() {
    let started = std::time::Instant::now();
    let mut report = Report {
        markdown: format!(
            "## Rollout analysis, simulated\n\nSettings: error_tolerance {}, latency_tolerance {}, \
             confidence {}; interval {INTERVAL_S} s, step_time {STEP_TIME_S} s, min_requests \
             {MIN_REQUESTS}. Latency log-normal, median {MEDIAN_MS} ms, sigma {SIGMA}.\n",
            SETTINGS.error_tolerance, SETTINGS.latency_tolerance, SETTINGS.confidence
        ),
        failures: Vec::new(),
    };
    for (name, table) in [
        ("false rollbacks", false_rollbacks as fn(&mut Report)),
        ("rollback times", rollback_times),
        ("rollbacks through the plan", plan_rollbacks),
        ("pass times", pass_times),
        ("promotion times", promotion_times),
    ] {
        let table_started = std::time::Instant::now();
        table(&mut report);
        println!("{name}: {:.1} s", table_started.elapsed().as_secs_f64());
    }
    let _ = writeln!(
        report.markdown,
        "\n(simulated in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!("{}", report.markdown);
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/rollout-simulation.md");
    if let Err(error) = std::fs::write(&path, &report.markdown) {
        println!("could not write {}: {error}", path.display());
    }
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
}
