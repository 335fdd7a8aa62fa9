//! The statistics that decide a rollout. Every interval ("tick") the state machine hands over
//! each version's counts of that tick (requests, errors, latency histogram); per metric the
//! [`Evidence`] answers `pass`, `fail` or `inconclusive`, with the interval behind the answer.
//! Pure: no I/O, no clock; the only randomness is the pairing of outcomes, drawn from the rng
//! the caller passes, so tests are seeded.
//!
//! # The guarantee
//! With `alpha = 1 - confidence`, a canary that is as good as the baseline (error rate at most
//! `error_tolerance` above the baseline's, p99 at most `1 + latency_tolerance` times the
//! baseline's) gets a `fail` with probability at most `alpha` over the whole rollout, however
//! often the verdict is read. `pass` carries the same kind of statement for the step it is
//! given in: a canary worse than the tolerance passes a step's analysis with probability at
//! most `alpha / 2` (per metric). Both follow from Ville's inequality for test supermartingales:
//! every verdict is a "test by betting" (Waudby-Smith & Ramdas 2023; Howard & Ramdas 2022 for
//! quantiles), valid at every tick at once. Too little traffic moves no capital, so it stays
//! `inconclusive`; no data never fails.
//!
//! Alpha is split Bonferroni-style: `alpha / 2` for errors, `alpha / 2` for latency, the latter
//! halved again over the two versions (`alpha / 4` for the canary's p99 bound, `alpha / 4` for
//! the baseline's). A one-sided test needs only one side of an interval, so `fail` and `pass`
//! each spend the full share on their own side.
//!
//! # Errors: paired outcomes, one betting test per point of a grid
//! Canary and baseline requests of a tick are paired at random (hypergeometric draws from the
//! counts: how many errors fall among `n = min(n_canary, n_baseline)` outcomes of each version,
//! then how many of those meet). A pair gives `Z = X_canary - X_baseline` in `{-1, 0, 1}`, whose
//! mean is `d = p_canary - p_baseline`, and `Y = (Z + 1) / 2` in `{0, 1/2, 1}`. Outcomes of the
//! busier version beyond `n` are not used. Pairs are contemporaneous, so error rates that move
//! over the rollout (load, time of day) move both versions alike and do not bias `d`.
//!
//! For each point `d_i` of a grid (74 points: every 0.25 point of `d` from -5 to +10 points,
//! then -75, -50, -30, -20, -15, -10, -7.5 and +12.5, +15, +20, +30, +50, +75 points, plus
//! `error_tolerance` itself), with `m_i = (1 + d_i) / 2`:
//! - `fail` capital, kept over the whole rollout: `K+ = prod (1 + lambda (Y - m_i))`, a test of
//!   "d <= d_i";
//! - `pass` capital, restarted at each step: `K- = prod (1 - lambda (Y - m_i))`, a test of
//!   "d >= d_i".
//!
//! A point is rejected once its log-capital reaches `ln(2 / alpha)` (one-sided, so the whole
//! share), and stays rejected (running intersection: its capital is frozen). The bet is aGRAPA
//! (Waudby-Smith & Ramdas 2023, section 5): `lambda = (mu - m) / (var + (mu - m)^2)` for `K+`
//! (mirrored for `K-`), clipped to `[0, c / m]` (`[0, c / (1 - m)]` for `K-`) with
//! `c` = [`BET_CAP`] = 1/2, from an estimate `mu`, `var` of `Y` made before the pairs it bets on
//! (predictable). The `fail` estimate forgets with a half-life of [`FAIL_MEMORY_PAIRS`] pairs,
//! the `pass` estimate is the step's own pairs; both start from a prior of [`PRIOR_PAIRS`]
//! pairs with mean 1/2 and variance 1/4. A bet is zero whenever the data point the other way,
//! so a canary as good as the baseline spends almost no `fail` capital however long the
//! rollout runs, and one that turns bad at a late step is caught about as fast as one bad from
//! the start. Early in a step the estimate is young, so a tick's pairs are taken in a random
//! order in chunks of [`FIRST_CHUNK_PAIRS`], then doubling (each chunk at most the pairs seen
//! before it at this step), each chunk's bets sized from the chunks before; a random order of
//! independent pairs is still independent, so this stays valid. Only the points between the
//! rejected ones and the estimate get a bet, so a tick costs a handful of logarithms.
//!
//! `low` = the grid point just below the lowest point the `fail` tests have not rejected (or
//! -1): `d > low` with probability `1 - alpha/2` at every tick. `high` = the grid point just
//! above the highest point the `pass` tests have not rejected (or 1). Verdict: `fail` when
//! `low >= error_tolerance` (every point up to the tolerance rejected), `pass` when
//! `high <= error_tolerance`; `fail` wins if both.
//!
//! # Latency: a confidence sequence for each version's p99
//! For a quantile `q` (0.99) and a latency `e`, the share of requests at or below `e` is at
//! least `q` exactly when the p99 is at most `e`, so no variance needs estimating. With `S(e)`
//! the requests at or below `e` among `t`, the mixture martingale
//! `M(t, S) = mean_j (p_j / q)^S ((1 - p_j) / (1 - q))^(t - S)` (a mixture of constant bets;
//! the alternatives `p_j` have `(1 - p_j) / (1 - q)` = [`MORE_TAIL`] (1.4, 2, 4, 12 times the
//! 1% of slow requests) for the lower bound and [`LESS_TAIL`] (0.7, 0.45, 0.2 times) for the
//! upper bound, chosen by the simulation) is a martingale at the true p99 and gives rank
//! boundaries `l_t`, `u_t` that depend on `t` only; `S(e)` grows with `e`, so one test at the
//! true p99 covers every `e` at once (Howard & Ramdas 2022, the fixed-quantile confidence
//! sequence): the p99 lies in `[low of the bucket holding rank l_t + 1, high of the bucket
//! holding rank u_t]`, rounded outward to the histogram buckets.
//!
//! The verdict compares the ratio canary p99 / baseline p99 with `1 + latency_tolerance`:
//! `fail` when `canary_low / baseline_high > 1 + tol`, `pass` when
//! `canary_high / baseline_low <= 1 + tol`. `low` and `high` of the [`MetricVerdict`] are those
//! two ratios. Unlike errors, latencies are not paired, and each version's latency moves with
//! its own share of traffic: pooling a version's latencies over steps would compare the
//! canary's slowest step with the baseline's fastest. So both latency tests use the current
//! step's histograms only, and the `fail` side pays for the restarts: window `w` (the `w`-th
//! step with traffic, from 0) gets `1 / ((w + 1)(w + 2))` of the `fail` share (1/2, 1/6, 1/12,
//! ...; the shares add up to 1, so the bound holds over the whole rollout).
//!
//! # Cost and size
//! `observe`: three hypergeometric draws (rand_distr's, or exact step-by-step draws when a
//! count is below 65), a few logarithms per grid point between the rejected ones and the
//! estimate, and one pass over each histogram (empty runs of 32 buckets skipped with one
//! comparison). `latency()`: per version two rank boundaries, each bracketed in closed form
//! (a mixture lies between its largest term / J and its largest term) and settled with one to
//! three evaluations of the mixture, then a walk down from the highest non-empty bucket. Both
//! take microseconds in release. A serialized [`Evidence`] is 1.4 KB of JSON when new; the
//! error capitals add about 1.5 KB once the data move them, and the current step's latency
//! histograms about 10 bytes per non-empty bucket (9.8 KB in all with 440 non-empty buckets
//! per version, the widest we measured).

use std::sync::LazyLock;

use rand::{Rng, RngExt};
use rand_distr::{Distribution, Hypergeometric};
use serde::{Deserialize, Serialize};

use super::histogram::{LATENCY_BUCKETS, bucket_bounds_micros};

/// The bet cap `c`: a bet never risks more than this share of the capital on one pair.
pub const BET_CAP: f64 = 0.5;
/// Half-life, in pairs, of the estimate the `fail` bets are sized from.
pub const FAIL_MEMORY_PAIRS: f64 = 1_000.0;
/// Size of the first chunks a step's pairs are bet on in (see `ErrorEvidence::observe`).
pub const FIRST_CHUNK_PAIRS: u64 = 32;
/// Weight, in pairs, of the prior (mean 1/2, variance 1/4) of both estimates.
pub const PRIOR_PAIRS: f64 = 2.0;
/// The latency quantile compared.
pub const QUANTILE: f64 = 0.99;
/// Tail ratios `(1 - p_j) / (1 - q)` of the alternatives mixed in the test for "the p99 is
/// above e" (more slow requests than 1%).
pub const MORE_TAIL: [f64; 4] = [1.4, 2.0, 4.0, 12.0];
/// Tail ratios of the alternatives mixed in the test for "the p99 is below e".
pub const LESS_TAIL: [f64; 3] = [0.7, 0.45, 0.2];

/// What the analysis is asked to decide; the `[rollout.analysis]` settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnalysisSettings {
    /// How much the canary's error rate may exceed the baseline's (absolute, e.g. 0.01).
    pub error_tolerance: f64,
    /// How much the canary's p99 may exceed the baseline's (a fraction, e.g. 0.25).
    pub latency_tolerance: f64,
    /// 1 - the largest share of rollouts of a canary as good as the baseline that may fail.
    pub confidence: f64,
    /// With a shadow stage: the largest share of compared copies whose answers may differ
    /// from the served ones (noise left out). `None` without a shadow stage.
    pub max_diff_rate: Option<f64>,
}

impl AnalysisSettings {
    /// `1 - confidence`, kept in `[1e-12, 0.5]`; a confidence that is not a number reads as
    /// 0.99. (Config validation rejects such values; this only keeps the arithmetic sound.)
    fn alpha(&self) -> f64 {
        let alpha = 1.0 - self.confidence;
        if alpha.is_nan() {
            0.01
        } else {
            alpha.clamp(1e-12, 0.5)
        }
    }

    /// The error tolerance inside the grid's range; not-a-number reads as 0.
    fn error_tolerance(&self) -> f64 {
        let tolerance = self.error_tolerance;
        if tolerance.is_nan() {
            0.0
        } else {
            tolerance.clamp(-0.5, 0.5)
        }
    }

    /// The share of alpha each metric gets: a half each for errors and latency, a third each
    /// when the differences of a shadow stage are a third metric.
    fn alpha_per_metric(&self) -> f64 {
        match self.max_diff_rate {
            Some(_) => self.alpha() / 3.0,
            None => self.alpha() / 2.0,
        }
    }

    /// The latency tolerance, at least 0; not-a-number reads as 0.
    fn latency_tolerance(&self) -> f64 {
        let tolerance = self.latency_tolerance;
        if tolerance.is_nan() {
            0.0
        } else {
            tolerance.clamp(0.0, 1e6)
        }
    }
}

/// One version's measurements during one tick (not cumulative).
#[derive(Clone, Copy, Debug)]
pub struct VersionTick<'a> {
    /// Requests answered in the tick.
    pub requests: u64,
    /// Of those, errors (status >= 500, or the proxy's own 502/504). Read as at most `requests`.
    pub errors: u64,
    /// Latency histogram of the tick, [`LATENCY_BUCKETS`] counts (see `histogram`); counts past
    /// the last bucket are read as overflow.
    pub latency: &'a [u64],
}

/// A metric's verdict at one tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Shown not worse than the tolerance (this step's evidence).
    Pass,
    /// Shown worse than the tolerance (the rollout's evidence): roll back.
    Fail,
    /// Neither yet.
    Inconclusive,
}

impl Verdict {
    /// The verdict as the admin API and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// A verdict and the interval behind it, for display.
///
/// - errors: bounds on `p_canary - p_baseline` (fractions, in `[-1, 1]`); `low` is the bound
///   `fail` compares with the tolerance (whole rollout), `high` the one `pass` compares
///   (this step). `fail` iff `low >= error_tolerance`; `pass` iff `high <= error_tolerance`.
/// - latency: bounds on canary p99 / baseline p99 (this step); `fail` iff
///   `low > 1 + latency_tolerance`; `pass` iff `high <= 1 + latency_tolerance`. `low` may be 0
///   and `high` may be `f64::INFINITY` (no bound yet).
///
/// The two bounds come from different evidence, so with a canary that changed between steps
/// `low` can exceed `high`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricVerdict {
    pub verdict: Verdict,
    pub low: f64,
    pub high: f64,
}

/// Each version's p99 interval of the current step, in microseconds, for display. The lower
/// bound is 0 and the upper bound `f64::INFINITY` until there is data to bound them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencyIntervals {
    pub canary_p99: (f64, f64),
    pub baseline_p99: (f64, f64),
}

/// Everything the verdicts rest on. Serialize it with the rollout state: the `fail` evidence
/// must survive a restart, or a restart would hand the canary a fresh chance to fail.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Evidence {
    errors: ErrorEvidence,
    latency: LatencyEvidence,
    /// The shadow stage's differences; `None` without a shadow stage (and in state files
    /// written before there were shadow stages).
    #[serde(default)]
    differences: Option<ErrorEvidence>,
}

/// One tick of a shadow stage: the canary's answers to copies of requests, each paired with
/// the served answer to the same request (not a pairing drawn from counts: the same request).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowTick {
    /// Requests whose copy's outcome and served outcome were both seen.
    pub pairs: u64,
    /// Of those, the ones where the copy failed and the served request did not.
    pub copy_only_errors: u64,
    /// Of those, the ones where the served request failed and the copy did not.
    pub served_only_errors: u64,
    /// Copies whose answers were compared with the served ones.
    pub compared: u64,
    /// Of those, the ones that differed at a path the noise filter reports.
    pub different: u64,
}

impl ShadowTick {
    /// The counts between an earlier reading `before` and this one; a reading lower than
    /// the one before (the counts were reset) counts from zero.
    pub fn since(&self, before: &ShadowTick) -> ShadowTick {
        if self
            .fields()
            .iter()
            .zip(before.fields())
            .any(|(now, then)| *now < then)
        {
            return *self;
        }
        self.zip(before, |now, then| now - then)
    }

    /// Both counts together.
    pub fn plus(&self, other: &ShadowTick) -> ShadowTick {
        self.zip(other, u64::saturating_add)
    }

    fn fields(&self) -> [u64; 5] {
        [
            self.pairs,
            self.copy_only_errors,
            self.served_only_errors,
            self.compared,
            self.different,
        ]
    }

    fn zip(&self, other: &ShadowTick, f: impl Fn(u64, u64) -> u64) -> ShadowTick {
        ShadowTick {
            pairs: f(self.pairs, other.pairs),
            copy_only_errors: f(self.copy_only_errors, other.copy_only_errors),
            served_only_errors: f(self.served_only_errors, other.served_only_errors),
            compared: f(self.compared, other.compared),
            different: f(self.different, other.different),
        }
    }
}

impl Evidence {
    /// Evidence for a new rollout, at its first step (or its shadow stage).
    pub fn new(settings: &AnalysisSettings) -> Self {
        let alpha = settings.alpha_per_metric();
        Self {
            errors: ErrorEvidence::new(settings.error_tolerance(), alpha),
            latency: LatencyEvidence::new(settings.latency_tolerance(), alpha / 2.0),
            differences: settings
                .max_diff_rate
                .map(|rate| ErrorEvidence::new(clamp_rate(rate), alpha)),
        }
    }

    /// A new step begins: the `pass` evidence restarts (and the latency windows, see the
    /// module doc). The errors' `fail` evidence runs on. Calling it again at the same step (as
    /// after a restart) is safe: it only makes the latency `fail` test a little stricter.
    pub fn start_step(&mut self) {
        self.errors.start_step();
        self.latency.start_step();
        if let Some(differences) = &mut self.differences {
            differences.start_step();
        }
    }

    /// Takes one tick of both versions' measurements. An empty tick changes nothing.
    pub fn observe(&mut self, canary: &VersionTick, baseline: &VersionTick, rng: &mut impl Rng) {
        let pairs = Pairs::draw(canary, baseline, rng);
        self.errors.observe(pairs, rng);
        self.latency.observe(canary.latency, baseline.latency);
    }

    /// Takes one tick of a shadow stage. Its pairs go into the same errors evidence as the
    /// steps' (the `fail` side runs on over the whole rollout); a comparison's difference is
    /// an outcome `Y = 1` (else `1/2`), tested against `max_diff_rate` by the same betting
    /// tests as errors. Latency is not judged on copies.
    pub fn observe_shadow(&mut self, tick: &ShadowTick, rng: &mut impl Rng) {
        let canary_only = tick.copy_only_errors.min(tick.pairs);
        let baseline_only = tick.served_only_errors.min(tick.pairs - canary_only);
        self.errors.observe(
            Pairs {
                baseline_only,
                same: tick.pairs - canary_only - baseline_only,
                canary_only,
            },
            rng,
        );
        if let Some(differences) = &mut self.differences {
            let different = tick.different.min(tick.compared);
            differences.observe(
                Pairs {
                    baseline_only: 0,
                    same: tick.compared - different,
                    canary_only: different,
                },
                rng,
            );
        }
    }

    /// The shadow stage's verdict on differences: bounds on the share of compared copies
    /// that differ; `None` without a shadow stage.
    pub fn differences(&self) -> Option<MetricVerdict> {
        self.differences.as_ref().map(ErrorEvidence::verdict)
    }

    /// The errors verdict: bounds on `p_canary - p_baseline`.
    pub fn errors(&self) -> MetricVerdict {
        self.errors.verdict()
    }

    /// The latency verdict: bounds on canary p99 / baseline p99.
    pub fn latency(&self) -> MetricVerdict {
        self.latency.verdict()
    }

    /// Each version's p99 interval at this step, in microseconds.
    pub fn latency_intervals(&self) -> LatencyIntervals {
        self.latency.intervals()
    }

    /// Pairs of outcomes the errors evidence has taken: over the rollout, and at this step.
    pub fn pairs(&self) -> (u64, u64) {
        (self.errors.rollout_pairs, self.errors.step_pairs)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// A tick's paired outcomes, by value of `Y = (X_canary - X_baseline + 1) / 2`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pairs {
    /// `Y = 0`: the baseline failed, the canary did not.
    baseline_only: u64,
    /// `Y = 1/2`: both failed or neither did.
    same: u64,
    /// `Y = 1`: the canary failed, the baseline did not.
    canary_only: u64,
}

impl Pairs {
    /// Pairs `min(requests)` outcomes of each version at random, from the counts alone.
    fn draw(canary: &VersionTick, baseline: &VersionTick, rng: &mut impl Rng) -> Self {
        let n = canary.requests.min(baseline.requests);
        if n == 0 {
            return Self::default();
        }
        let canary_errors = hypergeometric(canary.requests, canary.errors, n, rng);
        let baseline_errors = hypergeometric(baseline.requests, baseline.errors, n, rng);
        // Match the two samples at random: how many canary errors meet a baseline error.
        let both = hypergeometric(n, canary_errors, baseline_errors, rng);
        let canary_only = canary_errors - both;
        let baseline_only = baseline_errors - both;
        Self {
            baseline_only,
            same: n - canary_only - baseline_only,
            canary_only,
        }
    }

    fn total(&self) -> u64 {
        self.baseline_only + self.same + self.canary_only
    }

    /// Takes `size` of the pairs at random (a uniformly random order, cut after `size`).
    fn take(&mut self, size: u64, rng: &mut impl Rng) -> Self {
        let total = self.total();
        let size = size.min(total);
        let canary_only = hypergeometric(total, self.canary_only, size, rng);
        let baseline_only = hypergeometric(
            total - self.canary_only,
            self.baseline_only,
            size - canary_only,
            rng,
        );
        let chunk = Self {
            baseline_only,
            same: size - canary_only - baseline_only,
            canary_only,
        };
        self.baseline_only -= chunk.baseline_only;
        self.same -= chunk.same;
        self.canary_only -= chunk.canary_only;
        chunk
    }
}

/// How many of `draws` items taken without replacement from `total`, of which `successes` are
/// marked, are marked. Arguments out of range are clamped (`successes`, `draws` <= `total`).
fn hypergeometric(total: u64, successes: u64, draws: u64, rng: &mut impl Rng) -> u64 {
    let successes = successes.min(total);
    let draws = draws.min(total);
    // Symmetries that leave the smallest parameter to iterate over.
    if successes > total / 2 {
        return draws - hypergeometric(total, total - successes, draws, rng);
    }
    if draws > total / 2 {
        return successes - hypergeometric(total, successes, total - draws, rng);
    }
    if successes == 0 || draws == 0 {
        return 0;
    }
    if successes.min(draws) <= 64 {
        return hypergeometric_by_steps(total, successes, draws, rng);
    }
    match Hypergeometric::new(total, successes, draws) {
        Ok(distribution) => distribution.sample(rng).min(successes).min(draws),
        Err(_) => hypergeometric_by_steps(total, successes, draws, rng),
    }
}

/// Exact sampling in `min(successes, draws)` steps: take the marked items (or the draws) one by
/// one and decide each with its conditional probability.
fn hypergeometric_by_steps(total: u64, successes: u64, draws: u64, rng: &mut impl Rng) -> u64 {
    let (items, slots) = if successes <= draws {
        (successes, draws)
    } else {
        (draws, successes)
    };
    let mut hits = 0;
    for seen in 0..items {
        let p = (slots - hits) as f64 / (total - seen) as f64;
        if rng.random::<f64>() < p {
            hits += 1;
        }
    }
    hits
}

/// An estimate of the mean and variance of `Y`, from exponentially weighted sums plus a prior.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Estimate {
    weight: f64,
    sum: f64,
    sum_squares: f64,
}

impl Estimate {
    fn observe(&mut self, pairs: &Pairs, half_life: Option<f64>) {
        let n = pairs.total() as f64;
        let keep = half_life.map_or(1.0, |h| 0.5f64.powf(n / h));
        let canary_only = pairs.canary_only as f64;
        let same = pairs.same as f64;
        self.weight = self.weight * keep + n;
        self.sum = self.sum * keep + canary_only + 0.5 * same;
        self.sum_squares = self.sum_squares * keep + canary_only + 0.25 * same;
    }

    /// `(mean, variance)`, with the prior's weight added.
    fn mean_variance(&self) -> (f64, f64) {
        let weight = self.weight + PRIOR_PAIRS;
        let mean = (self.sum + 0.5 * PRIOR_PAIRS) / weight;
        // Prior second moment: variance 1/4 + mean^2 1/4.
        let second = (self.sum_squares + 0.5 * PRIOR_PAIRS) / weight;
        (mean, (second - mean * mean).max(1e-9))
    }
}

/// aGRAPA bet on "the mean is above m" (`edge = mu - m`), clipped to `[0, cap]`.
fn bet(edge: f64, variance: f64, cap: f64) -> f64 {
    let lambda = edge / (variance + edge * edge);
    if lambda.is_finite() {
        lambda.clamp(0.0, cap)
    } else {
        0.0
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ErrorEvidence {
    /// The tolerance on `d`; one of the grid points.
    tolerance: f64,
    /// `ln(1 / alpha_errors)`: a point whose log-capital reaches it is rejected.
    threshold: f64,
    /// Candidate values of `d`, ascending, inside `(-1, 1)`.
    grid: Vec<f64>,
    /// Per grid point, log-capital of the test of "d <= point" over the whole rollout.
    fail: Vec<f64>,
    /// Per grid point, log-capital of the test of "d >= point" over this step.
    pass: Vec<f64>,
    /// The first grid point the `fail` tests have not rejected (`grid.len()` if none): points
    /// stay rejected, so it only moves up.
    fail_first_open: usize,
    /// One past the last grid point the `pass` tests have not rejected (0 if none): it only
    /// moves down during a step.
    pass_end_open: usize,
    /// What the `fail` bets are sized from (recent pairs of the rollout).
    fail_estimate: Estimate,
    /// What the `pass` bets are sized from (this step's pairs).
    pass_estimate: Estimate,
    rollout_pairs: u64,
    step_pairs: u64,
}

/// A share in `[0, 0.5]`, inside the grid's range; not-a-number reads as 0.
fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 0.5)
    }
}

/// The grid of `d` values: every 0.25 point from -5 to +10 points, coarser outside.
fn error_grid(tolerance: f64) -> Vec<f64> {
    let mut grid: Vec<f64> = [-0.75, -0.5, -0.3, -0.2, -0.15, -0.1, -0.075]
        .into_iter()
        .chain((-20..=40).map(|i| f64::from(i) * 0.0025))
        .chain([0.125, 0.15, 0.2, 0.3, 0.5, 0.75])
        .collect();
    if !grid.iter().any(|&d| (d - tolerance).abs() < 1e-12) {
        grid.push(tolerance);
    }
    grid.sort_by(f64::total_cmp);
    // Exactly the tolerance, not a neighbour within rounding.
    for d in &mut grid {
        if (*d - tolerance).abs() < 1e-12 {
            *d = tolerance;
        }
    }
    grid
}

impl ErrorEvidence {
    fn new(tolerance: f64, alpha: f64) -> Self {
        let grid = error_grid(tolerance);
        Self {
            tolerance,
            threshold: (1.0 / alpha).ln(),
            fail: vec![0.0; grid.len()],
            pass: vec![0.0; grid.len()],
            fail_first_open: 0,
            pass_end_open: grid.len(),
            grid,
            fail_estimate: Estimate::default(),
            pass_estimate: Estimate::default(),
            rollout_pairs: 0,
            step_pairs: 0,
        }
    }

    fn start_step(&mut self) {
        self.pass.iter_mut().for_each(|capital| *capital = 0.0);
        self.pass_end_open = self.pass.len();
        self.pass_estimate = Estimate::default();
        self.step_pairs = 0;
    }

    /// Bets on a tick's pairs. Early in a step the estimates are young, so the tick is cut
    /// into chunks taken in random order (32, 32, 64, 128... pairs, each at most the pairs
    /// seen before it at this step), the bets of each chunk sized from the ones before.
    fn observe(&mut self, mut pairs: Pairs, rng: &mut impl Rng) {
        while pairs.total() > 0 {
            let size = self.step_pairs.max(FIRST_CHUNK_PAIRS);
            let chunk = if size >= pairs.total() {
                std::mem::take(&mut pairs)
            } else {
                pairs.take(size, rng)
            };
            self.bet(&chunk);
        }
    }

    fn bet(&mut self, pairs: &Pairs) {
        let one = pairs.canary_only as f64;
        let half = pairs.same as f64;
        let zero = pairs.baseline_only as f64;
        let points = self.grid.len().min(self.fail.len()).min(self.pass.len());

        // Fail: only points below the estimate get a bet; above the first open point, up to
        // the estimate.
        let (mu, variance) = self.fail_estimate.mean_variance();
        for i in self.fail_first_open.min(points)..points {
            let m = (1.0 + self.grid[i]) / 2.0;
            if m >= mu {
                break;
            }
            let capital = &mut self.fail[i];
            if *capital >= self.threshold {
                continue; // rejected for good
            }
            let lambda = bet(mu - m, variance, BET_CAP / m);
            *capital += one * (lambda * (1.0 - m)).ln_1p()
                + half * (lambda * (0.5 - m)).ln_1p()
                + zero * (-lambda * m).ln_1p();
        }
        while self.fail_first_open < points && self.fail[self.fail_first_open] >= self.threshold {
            self.fail_first_open += 1;
        }

        // Pass: mirrored, from the last open point down to the estimate.
        let (mu, variance) = self.pass_estimate.mean_variance();
        for i in (0..self.pass_end_open.min(points)).rev() {
            let m = (1.0 + self.grid[i]) / 2.0;
            if m <= mu {
                break;
            }
            let capital = &mut self.pass[i];
            if *capital >= self.threshold {
                continue;
            }
            let lambda = bet(m - mu, variance, BET_CAP / (1.0 - m));
            *capital += one * (-lambda * (1.0 - m)).ln_1p()
                + half * (-lambda * (0.5 - m)).ln_1p()
                + zero * (lambda * m).ln_1p();
        }
        while self.pass_end_open > 0 && self.pass[self.pass_end_open - 1] >= self.threshold {
            self.pass_end_open -= 1;
        }

        self.fail_estimate.observe(pairs, Some(FAIL_MEMORY_PAIRS));
        self.pass_estimate.observe(pairs, None);
        self.rollout_pairs += pairs.total();
        self.step_pairs += pairs.total();
    }

    fn verdict(&self) -> MetricVerdict {
        // low: the point below the first one the fail tests have not rejected (-1 if that is
        // the first point; the last point if all are rejected).
        let low = match self.fail_first_open {
            0 => -1.0,
            first => self.grid.get(first - 1).copied().unwrap_or(-1.0),
        };
        // high: the point above the last one the pass tests have not rejected.
        let high = match self.pass_end_open {
            0 => self.grid.first().copied().unwrap_or(1.0),
            end => self.grid.get(end).copied().unwrap_or(1.0),
        };
        let verdict = if low >= self.tolerance {
            Verdict::Fail
        } else if high <= self.tolerance {
            Verdict::Pass
        } else {
            Verdict::Inconclusive
        };
        MetricVerdict { verdict, low, high }
    }
}

// ---------------------------------------------------------------------------------------------
// Latency

#[derive(Clone, Debug, Serialize, Deserialize)]
struct LatencyEvidence {
    tolerance: f64,
    /// Alpha of one version's one-sided p99 bound.
    alpha: f64,
    /// Steps with traffic before this one: the index of the `fail` spending window.
    window: u32,
    canary: Counts,
    baseline: Counts,
}

impl LatencyEvidence {
    fn new(tolerance: f64, alpha: f64) -> Self {
        Self {
            tolerance,
            alpha,
            window: 0,
            canary: Counts::default(),
            baseline: Counts::default(),
        }
    }

    fn start_step(&mut self) {
        if self.canary.total + self.baseline.total > 0 {
            self.window = self.window.saturating_add(1);
        }
        self.canary = Counts::default();
        self.baseline = Counts::default();
    }

    fn observe(&mut self, canary: &[u64], baseline: &[u64]) {
        self.canary.add(canary);
        self.baseline.add(baseline);
    }

    /// `ln(1 / alpha)` of the `fail` side in this window, and of the `pass` side.
    fn thresholds(&self) -> (f64, f64) {
        let w = f64::from(self.window);
        let share = 1.0 / ((w + 1.0) * (w + 2.0));
        ((1.0 / (self.alpha * share)).ln(), (1.0 / self.alpha).ln())
    }

    fn intervals(&self) -> LatencyIntervals {
        let (fail, pass) = self.thresholds();
        LatencyIntervals {
            canary_p99: (self.canary.lower(fail), self.canary.upper(pass)),
            baseline_p99: (self.baseline.lower(pass), self.baseline.upper(fail)),
        }
    }

    fn verdict(&self) -> MetricVerdict {
        let LatencyIntervals {
            canary_p99: (canary_low, canary_high),
            baseline_p99: (baseline_low, baseline_high),
        } = self.intervals();
        let low = if baseline_high.is_finite() {
            canary_low / baseline_high
        } else {
            0.0
        };
        let high = if baseline_low > 0.0 {
            canary_high / baseline_low
        } else {
            f64::INFINITY
        };
        let limit = 1.0 + self.tolerance;
        let verdict = if low > limit {
            Verdict::Fail
        } else if high <= limit {
            Verdict::Pass
        } else {
            Verdict::Inconclusive
        };
        MetricVerdict { verdict, low, high }
    }
}

/// A version's latency histogram over the current step.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(from = "SparseCounts", into = "SparseCounts")]
struct Counts {
    /// [`LATENCY_BUCKETS`] counts, or empty while nothing was seen.
    buckets: Vec<u64>,
    total: u64,
    /// The highest non-empty bucket: the p99 is found by walking down from it.
    highest: usize,
}

/// How [`Counts`] is stored: `[bucket, count]` for the non-empty buckets.
#[derive(Serialize, Deserialize)]
struct SparseCounts(Vec<(usize, u64)>);

impl From<SparseCounts> for Counts {
    fn from(sparse: SparseCounts) -> Self {
        let mut counts = Counts::default();
        for (bucket, count) in sparse.0 {
            counts.add_to(bucket, count);
        }
        counts
    }
}

impl From<Counts> for SparseCounts {
    fn from(counts: Counts) -> Self {
        SparseCounts(
            counts
                .buckets
                .iter()
                .enumerate()
                .filter(|(_, count)| **count > 0)
                .map(|(bucket, count)| (bucket, *count))
                .collect(),
        )
    }
}

impl Counts {
    fn add(&mut self, tick: &[u64]) {
        // Most buckets of a tick are empty: skip them 32 at a time (one slice comparison).
        const CHUNK: usize = 32;
        const EMPTY: [u64; CHUNK] = [0; CHUNK];
        let mut start = 0;
        while start < tick.len() {
            let end = tick.len().min(start + CHUNK);
            if tick[start..end] != EMPTY[..end - start] {
                let mut bucket = start;
                while bucket < end {
                    if tick[bucket] > 0 {
                        self.add_to(bucket, tick[bucket]);
                    }
                    bucket += 1;
                }
            }
            start = end;
        }
    }

    fn add_to(&mut self, bucket: usize, count: u64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; LATENCY_BUCKETS];
        }
        let bucket = bucket.min(LATENCY_BUCKETS - 1);
        if let Some(slot) = self.buckets.get_mut(bucket) {
            *slot = slot.saturating_add(count);
            self.total = self.total.saturating_add(count);
            self.highest = self.highest.max(bucket);
        }
    }

    /// The lowest bucket `i` with fewer than `above` requests in the buckets over it, walking
    /// down from the highest non-empty bucket (the ranks asked for are near the top).
    fn bucket_with_fewer_above(&self, above: u64) -> usize {
        let mut bucket = self.highest.min(self.buckets.len().saturating_sub(1));
        let mut over = 0u64; // requests in the buckets above `bucket`
        while bucket > 0 {
            let with_this = over.saturating_add(self.buckets[bucket]);
            if with_this >= above {
                break;
            }
            over = with_this;
            bucket -= 1;
        }
        bucket
    }

    /// Lower confidence bound of the p99, in µs (0 when there is no bound yet): the low edge of
    /// the first bucket whose cumulative count exceeds the rank `l` (fewer than `t - l`
    /// requests above it).
    fn lower(&self, threshold: f64) -> f64 {
        match lower_rank(self.total, threshold) {
            Some(rank) => {
                let bucket = self.bucket_with_fewer_above(self.total - rank);
                bucket_bounds_micros(bucket).0 as f64
            }
            None => 0.0,
        }
    }

    /// Upper confidence bound of the p99, in µs (infinite when there is no bound yet): the high
    /// edge of the first bucket whose cumulative count reaches the rank `u` (at most `t - u`
    /// requests above it).
    fn upper(&self, threshold: f64) -> f64 {
        let Some(rank) = upper_rank(self.total, threshold) else {
            return f64::INFINITY;
        };
        let bucket = self.bucket_with_fewer_above(self.total - rank + 1);
        if bucket + 1 < LATENCY_BUCKETS {
            bucket_bounds_micros(bucket).1 as f64
        } else {
            f64::INFINITY
        }
    }
}

/// A mixture of likelihood ratios `(p_j / q)^S ((1 - p_j) / (1 - q))^(t - S)` with equal
/// weights, for one side of the p99 test.
struct Mixture {
    /// `ln(p_j / q)` per alternative.
    per_hit: Vec<f64>,
    /// `ln((1 - p_j) / (1 - q))` per alternative.
    per_miss: Vec<f64>,
    /// `ln(number of alternatives)`.
    log_count: f64,
}

impl Mixture {
    fn new(q: f64, tail_ratios: &[f64]) -> Self {
        let ratios: Vec<f64> = tail_ratios
            .iter()
            .copied()
            .filter(|&ratio| ratio > 0.0 && ratio * (1.0 - q) < 1.0)
            .collect();
        Self {
            per_hit: ratios
                .iter()
                .map(|r| ((1.0 - r * (1.0 - q)) / q).ln())
                .collect(),
            per_miss: ratios.iter().map(|r| r.ln()).collect(),
            log_count: (ratios.len() as f64).ln(),
        }
    }

    /// The largest `s hit_j + (t - s) miss_j`.
    fn largest_exponent(&self, t: f64, s: f64) -> f64 {
        let mut max = f64::NEG_INFINITY;
        for (hit, miss) in self.per_hit.iter().zip(&self.per_miss) {
            max = max.max(s * hit + (t - s) * miss);
        }
        max
    }

    /// Where the terms cross `threshold + ln(count)` and `threshold`, each combined over the
    /// terms with `pick` (`f64::max` when `ln M` decreases in `s`, `f64::min` when it grows).
    fn crossings(
        &self,
        t: f64,
        threshold: f64,
        pick: fn(f64, f64) -> f64,
        start: f64,
    ) -> (f64, f64) {
        let (mut sure, mut possible) = (start, start);
        for (&hit, &miss) in self.per_hit.iter().zip(&self.per_miss) {
            // s hit + (t - s) miss = level
            sure = pick(sure, (threshold + self.log_count - t * miss) / (hit - miss));
            possible = pick(possible, (threshold - t * miss) / (hit - miss));
        }
        (sure, possible)
    }

    /// `ln M(t, s)` (plain loops: the simulation runs this unoptimized).
    fn log_value(&self, t: f64, s: f64) -> f64 {
        let count = self.per_hit.len().min(self.per_miss.len());
        let mut max = f64::NEG_INFINITY;
        let mut j = 0;
        while j < count {
            let exponent = s * self.per_hit[j] + (t - s) * self.per_miss[j];
            if exponent > max {
                max = exponent;
            }
            j += 1;
        }
        let mut sum = 0.0;
        j = 0;
        while j < count {
            sum += (s * self.per_hit[j] + (t - s) * self.per_miss[j] - max).exp();
            j += 1;
        }
        max + sum.ln() - self.log_count
    }
}

/// For "the p99 is at most e": alternatives with more slow requests.
static MORE_TAIL_MIXTURE: LazyLock<Mixture> = LazyLock::new(|| Mixture::new(QUANTILE, &MORE_TAIL));
/// For "the p99 is above e": alternatives with fewer slow requests.
static LESS_TAIL_MIXTURE: LazyLock<Mixture> = LazyLock::new(|| Mixture::new(QUANTILE, &LESS_TAIL));

/// The largest `s` such that `S(e) <= s` among `t` requests rejects "the p99 is at most e"
/// (`ln M >= threshold`), or `None` when even `S(e) = 0` would not.
fn lower_rank(t: u64, threshold: f64) -> Option<u64> {
    let mixture = &*MORE_TAIL_MIXTURE;
    if t == 0 || mixture.per_hit.is_empty() {
        return None;
    }
    let tf = t as f64;
    // ln M decreases in s. Its largest term lies between ln M and ln M + ln(count), so where
    // that term crosses `threshold + ln(count)` ln M surely rejects, and past where it crosses
    // `threshold` it surely does not: the answer lies in between, a few ranks apart.
    let (sure, none_above) = mixture.crossings(tf, threshold, f64::max, f64::NEG_INFINITY);
    if none_above < 0.0 {
        return None; // even S(e) = 0 is not rare enough yet
    }
    // No s >= q t rejects (every term is below 1 there).
    let top = (QUANTILE * tf).ceil() as i64;
    let mut lo = (sure.floor() as i64).clamp(-1, top - 1);
    while lo >= 0 && mixture.largest_exponent(tf, lo as f64) < threshold + mixture.log_count {
        lo -= 1; // floating-point rounding at the floor
    }
    let mut hi = (none_above.floor() as i64 + 1).clamp(lo + 1, top);
    while hi < top && mixture.largest_exponent(tf, hi as f64) >= threshold {
        hi += 1;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if mixture.log_value(tf, mid as f64) >= threshold {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    u64::try_from(lo).ok()
}

/// The smallest `s` such that `S(e) >= s` among `t` requests rejects "the p99 is above e", or
/// `None` when even `S(e) = t` would not.
fn upper_rank(t: u64, threshold: f64) -> Option<u64> {
    let mixture = &*LESS_TAIL_MIXTURE;
    if t == 0 || mixture.per_hit.is_empty() {
        return None;
    }
    let tf = t as f64;
    let last = t as i64;
    // ln M increases in s; bracket as in `lower_rank`.
    let (sure, none_below) = mixture.crossings(tf, threshold, f64::min, f64::INFINITY);
    if none_below > tf {
        return None; // even S(e) = t is not rare enough yet
    }
    // No s <= q t rejects.
    let bottom = (QUANTILE * tf).floor() as i64;
    let mut hi = (sure.ceil() as i64).clamp(bottom + 1, last + 1);
    while hi <= last && mixture.largest_exponent(tf, hi as f64) < threshold + mixture.log_count {
        hi += 1;
    }
    let mut lo = (none_below.ceil() as i64 - 1).clamp(bottom, hi - 1);
    while lo > bottom && mixture.largest_exponent(tf, lo as f64) >= threshold {
        lo -= 1;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if mixture.log_value(tf, mid as f64) >= threshold {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    u64::try_from(hi).ok().filter(|&s| s <= t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::histogram::latency_bucket;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    const SETTINGS: AnalysisSettings = AnalysisSettings {
        error_tolerance: 0.01,
        latency_tolerance: 0.25,
        confidence: 0.99,
        max_diff_rate: None,
    };

    /// A tick of `n` requests with `errors` errors and latencies exponential with mean
    /// `mean_ms` (true p99 = mean * ln 100).
    struct Tick {
        requests: u64,
        errors: u64,
        latency: Vec<u64>,
    }

    impl Tick {
        fn new(n: u64, error_rate: f64, mean_ms: f64, rng: &mut SmallRng) -> Self {
            let mut latency = vec![0; LATENCY_BUCKETS];
            let mut errors = 0;
            for _ in 0..n {
                if rng.random::<f64>() < error_rate {
                    errors += 1;
                }
                let micros = -mean_ms * 1_000.0 * (1.0 - rng.random::<f64>()).ln();
                latency[latency_bucket(micros as u64)] += 1;
            }
            Self {
                requests: n,
                errors,
                latency,
            }
        }

        fn view(&self) -> VersionTick<'_> {
            VersionTick {
                requests: self.requests,
                errors: self.errors,
                latency: &self.latency,
            }
        }
    }

    fn empty() -> VersionTick<'static> {
        VersionTick {
            requests: 0,
            errors: 0,
            latency: &[],
        }
    }

    #[test]
    fn no_traffic_is_inconclusive() {
        let mut evidence = Evidence::new(&SETTINGS);
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..1_000 {
            evidence.observe(&empty(), &empty(), &mut rng);
        }
        let errors = evidence.errors();
        assert_eq!(errors.verdict, Verdict::Inconclusive);
        assert_eq!((errors.low, errors.high), (-1.0, 1.0));
        let latency = evidence.latency();
        assert_eq!(latency.verdict, Verdict::Inconclusive);
        assert_eq!((latency.low, latency.high), (0.0, f64::INFINITY));
    }

    #[test]
    fn an_empty_tick_changes_nothing() {
        let mut rng = SmallRng::seed_from_u64(2);
        let mut evidence = Evidence::new(&SETTINGS);
        for _ in 0..5 {
            let canary = Tick::new(100, 0.02, 10.0, &mut rng);
            let baseline = Tick::new(100, 0.01, 10.0, &mut rng);
            evidence.observe(&canary.view(), &baseline.view(), &mut rng);
        }
        let before = serde_json::to_string(&evidence).unwrap_or_default();
        evidence.observe(&empty(), &empty(), &mut rng);
        let silent = Tick::new(0, 0.0, 10.0, &mut rng);
        evidence.observe(&silent.view(), &silent.view(), &mut rng);
        assert_eq!(serde_json::to_string(&evidence).unwrap_or_default(), before);
    }

    #[test]
    fn one_silent_version_never_fails() {
        // A canary failing every request, but no baseline traffic to compare with: no pairs,
        // and no baseline p99.
        let mut rng = SmallRng::seed_from_u64(3);
        let mut evidence = Evidence::new(&SETTINGS);
        for _ in 0..200 {
            let canary = Tick::new(500, 1.0, 100.0, &mut rng);
            evidence.observe(&canary.view(), &empty(), &mut rng);
        }
        assert_eq!(evidence.errors().verdict, Verdict::Inconclusive);
        assert_eq!(evidence.latency().verdict, Verdict::Inconclusive);
        assert_eq!(evidence.pairs(), (0, 0));
        // The canary's own p99 is bounded, the baseline's is not.
        let intervals = evidence.latency_intervals();
        assert!(intervals.canary_p99.1.is_finite());
        assert_eq!(intervals.baseline_p99, (0.0, f64::INFINITY));
    }

    #[test]
    fn a_canary_failing_everything_fails_and_zero_errors_pass() {
        let mut rng = SmallRng::seed_from_u64(4);
        let mut evidence = Evidence::new(&SETTINGS);
        let baseline = Tick::new(50, 0.0, 10.0, &mut rng);
        let all_errors = Tick::new(50, 1.0, 10.0, &mut rng);
        evidence.observe(&all_errors.view(), &baseline.view(), &mut rng);
        assert_eq!(
            evidence.errors().verdict,
            Verdict::Fail,
            "{:?}",
            evidence.errors()
        );

        // Zero errors on both sides: pass once there are enough pairs to bound the canary's
        // rate below 1 point (about 1,000 with c = 1/2), never fail.
        let mut evidence = Evidence::new(&SETTINGS);
        let clean = Tick::new(100, 0.0, 10.0, &mut rng);
        let mut passed_after = None;
        for tick in 1..=30 {
            evidence.observe(&clean.view(), &clean.view(), &mut rng);
            let errors = evidence.errors();
            assert_ne!(errors.verdict, Verdict::Fail);
            if errors.verdict == Verdict::Pass && passed_after.is_none() {
                passed_after = Some(tick * 100);
            }
        }
        let pairs = passed_after.unwrap_or(u64::MAX);
        assert!((500..=1_500).contains(&pairs), "passed after {pairs} pairs");
        assert!(evidence.errors().high <= 0.01);
    }

    #[test]
    fn errors_beyond_requests_are_clamped() {
        let mut rng = SmallRng::seed_from_u64(5);
        let mut evidence = Evidence::new(&SETTINGS);
        let odd = VersionTick {
            requests: 10,
            errors: 1_000,
            latency: &[3; 2 * LATENCY_BUCKETS], // longer than the histogram: overflow
        };
        evidence.observe(&odd, &odd, &mut rng);
        assert_eq!(evidence.pairs(), (10, 10));
        assert_eq!(evidence.errors().verdict, Verdict::Inconclusive);
    }

    #[test]
    fn hypergeometric_draws_are_in_range_and_centred() {
        let mut rng = SmallRng::seed_from_u64(6);
        for (total, marked, draws) in [
            (100, 5, 50),
            (1_000, 900, 10),
            (10_000, 5_000, 4_000),
            (50, 50, 7),
        ] {
            let n = 2_000;
            let mut sum = 0;
            for _ in 0..n {
                let x = hypergeometric(total, marked, draws, &mut rng);
                assert!(x <= marked.min(draws));
                assert!(x + (total - marked) >= draws, "at least draws - unmarked");
                sum += x;
            }
            let mean = sum as f64 / n as f64;
            let expected = marked as f64 * draws as f64 / total as f64;
            let sd = (expected * (1.0 - marked as f64 / total as f64))
                .sqrt()
                .max(0.1);
            assert!(
                (mean - expected).abs() < 5.0 * sd / (n as f64).sqrt() + 1e-9,
                "{mean} vs {expected}"
            );
        }
        assert_eq!(hypergeometric(0, 5, 5, &mut rng), 0);
        assert_eq!(hypergeometric(10, 20, 30, &mut rng), 10);
    }

    #[test]
    fn the_bet_is_clipped() {
        assert_eq!(bet(-0.1, 0.01, 1.0), 0.0, "no bet against the data");
        assert_eq!(bet(0.0, 0.01, 1.0), 0.0);
        assert_eq!(bet(0.4, 1e-9, 0.7), 0.7, "clipped to the cap");
        assert_eq!(bet(f64::NAN, 0.01, 1.0), 0.0);
        assert_eq!(bet(0.1, 0.0, 1.0), 1.0);
        let lambda = bet(0.02, 0.0166, 2.0);
        assert!((lambda - 0.02 / (0.0166 + 0.0004)).abs() < 1e-12);
        // The capital can never reach zero: a bet at the cap risks at most BET_CAP.
        let m: f64 = 0.505;
        assert!((-(BET_CAP / m) * m).ln_1p().is_finite());
    }

    #[test]
    fn ranks_bracket_the_quantile_and_grow_with_data() {
        let threshold = (1.0f64 / 0.0025).ln();
        // Ten requests can show the p99 is above e (if several are slower than e), never that
        // it is below.
        assert!(lower_rank(10, threshold).is_some_and(|rank| rank < 9));
        assert_eq!(
            upper_rank(10, threshold),
            None,
            "ten requests cannot bound a p99 from above"
        );
        assert_eq!(lower_rank(0, threshold), None);
        let mut previous = (0, 0);
        for t in [1_000u64, 2_000, 5_000, 20_000, 100_000] {
            let (Some(lower), Some(upper)) = (lower_rank(t, threshold), upper_rank(t, threshold))
            else {
                panic!("no bounds from {t} requests");
            };
            let at = QUANTILE * t as f64;
            assert!(
                (lower as f64) < at && at < upper as f64,
                "{t}: {lower}..{upper}"
            );
            // Exactly the boundary of the mixture.
            let lower_mixture = &*MORE_TAIL_MIXTURE;
            assert!(lower_mixture.log_value(t as f64, lower as f64) >= threshold);
            assert!(lower_mixture.log_value(t as f64, lower as f64 + 1.0) < threshold);
            let upper_mixture = &*LESS_TAIL_MIXTURE;
            assert!(upper_mixture.log_value(t as f64, upper as f64) >= threshold);
            assert!(upper_mixture.log_value(t as f64, upper as f64 - 1.0) < threshold);
            // Relative width (in tail counts) shrinks.
            let width = (upper - lower) as f64 / t as f64;
            let previous_width = (previous.1 - previous.0) as f64 / (previous.1.max(1)) as f64;
            assert!(previous.1 == 0 || width < previous_width);
            previous = (lower, upper);
        }
    }

    #[test]
    fn intervals_contain_the_truth_and_shrink() {
        // Canary 3% errors, baseline 1% (d = 0.02); both p99 = 10 ms * ln 100 = 46 ms.
        let true_p99 = 10_000.0 * 100f64.ln();
        let runs = 40;
        let mut misses = 0;
        let mut widths = Vec::new();
        for run in 0..runs {
            let mut rng = SmallRng::seed_from_u64(100 + run);
            let mut evidence = Evidence::new(&SETTINGS);
            let mut missed = false;
            for tick in 1..=60 {
                let canary = Tick::new(200, 0.03, 10.0, &mut rng);
                let baseline = Tick::new(200, 0.01, 10.0, &mut rng);
                evidence.observe(&canary.view(), &baseline.view(), &mut rng);
                let errors = evidence.errors();
                let intervals = evidence.latency_intervals();
                let covers = |(low, high): (f64, f64)| low <= true_p99 && true_p99 <= high;
                let inside = errors.low < 0.02
                    && 0.02 < errors.high
                    && covers(intervals.canary_p99)
                    && covers(intervals.baseline_p99);
                if !inside {
                    missed = true;
                }
                if run == 0 && (tick == 6 || tick == 60) {
                    widths.push((
                        errors.high - errors.low,
                        intervals.canary_p99.1 - intervals.canary_p99.0,
                    ));
                }
            }
            misses += usize::from(missed);
        }
        // Each bound misses at every tick at once with probability at most alpha / 2 or / 4.
        assert!(misses <= 2, "{misses} of {runs} runs left an interval");
        let (early, late) = (widths[0], widths[1]);
        assert!(
            late.0 < early.0 && late.1 < early.1,
            "{early:?} -> {late:?}"
        );
    }

    #[test]
    fn fail_evidence_outlives_a_step_and_pass_evidence_does_not() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut evidence = Evidence::new(&SETTINGS);
        for _ in 0..20 {
            let canary = Tick::new(200, 0.0, 10.0, &mut rng);
            let baseline = Tick::new(200, 0.0, 10.0, &mut rng);
            evidence.observe(&canary.view(), &baseline.view(), &mut rng);
        }
        let before = evidence.errors();
        assert_eq!(before.verdict, Verdict::Pass);
        evidence.start_step();
        let after = evidence.errors();
        assert_eq!(after.verdict, Verdict::Inconclusive, "pass restarts");
        assert_eq!(after.low, before.low, "the fail side runs on");
        assert_eq!(evidence.pairs(), (4_000, 0));
        // Latency restarts too, with a stricter fail threshold in the next window.
        assert_eq!(evidence.latency().high, f64::INFINITY);
        assert_eq!(evidence.latency.window, 1);
        evidence.start_step(); // an empty window costs nothing
        assert_eq!(evidence.latency.window, 1);
    }

    #[test]
    fn evidence_round_trips_through_json_and_stays_small() {
        let mut rng = SmallRng::seed_from_u64(8);
        let mut evidence = Evidence::new(&SETTINGS);
        for _ in 0..30 {
            let canary = Tick::new(1_000, 0.012, 20.0, &mut rng);
            let baseline = Tick::new(1_000, 0.01, 20.0, &mut rng);
            evidence.observe(&canary.view(), &baseline.view(), &mut rng);
        }
        let json = serde_json::to_string(&evidence).unwrap_or_default();
        let fresh = serde_json::to_string(&Evidence::new(&SETTINGS)).unwrap_or_default();
        println!(
            "evidence JSON: {} bytes new, {} bytes after 60,000 requests",
            fresh.len(),
            json.len()
        );
        assert!(json.len() < 16_000, "{} bytes", json.len());
        let restored: Evidence = match serde_json::from_str(&json) {
            Ok(restored) => restored,
            Err(error) => panic!("{error}: {json}"),
        };
        assert_eq!(serde_json::to_string(&restored).unwrap_or_default(), json);
        assert_eq!(restored.errors(), evidence.errors());
        assert_eq!(restored.latency(), evidence.latency());
        // Both go on identically from the same rng state.
        let (mut a, mut b) = (evidence, restored);
        let mut rng_a = SmallRng::seed_from_u64(9);
        let mut rng_b = SmallRng::seed_from_u64(9);
        let canary = Tick::new(1_000, 0.05, 20.0, &mut rng);
        let baseline = Tick::new(1_000, 0.01, 20.0, &mut rng);
        a.observe(&canary.view(), &baseline.view(), &mut rng_a);
        b.observe(&canary.view(), &baseline.view(), &mut rng_b);
        assert_eq!(
            serde_json::to_string(&a).ok(),
            serde_json::to_string(&b).ok()
        );
    }

    #[test]
    fn settings_out_of_range_do_not_break_the_arithmetic() {
        let settings = AnalysisSettings {
            error_tolerance: f64::NAN,
            latency_tolerance: -3.0,
            confidence: f64::NAN,
            max_diff_rate: None,
        };
        let mut evidence = Evidence::new(&settings);
        let mut rng = SmallRng::seed_from_u64(10);
        let tick = Tick::new(100, 0.5, 10.0, &mut rng);
        evidence.observe(&tick.view(), &tick.view(), &mut rng);
        assert!(evidence.errors().low.is_finite() && evidence.errors().high.is_finite());
        assert!(serde_json::to_string(&evidence).is_ok());
        assert_eq!(evidence.errors.tolerance, 0.0);
        assert!((evidence.errors.threshold - 200f64.ln()).abs() < 1e-9);
    }

    const SHADOW: AnalysisSettings = AnalysisSettings {
        max_diff_rate: Some(0.01),
        ..SETTINGS
    };

    /// A shadow tick of `pairs` requests: copies failing at `copy_errors`, served requests
    /// at `served_errors` (independently), answers differing at `differ`.
    fn shadow_tick(
        pairs: u64,
        copy_errors: f64,
        served_errors: f64,
        differ: f64,
        rng: &mut SmallRng,
    ) -> ShadowTick {
        let mut tick = ShadowTick {
            pairs,
            ..ShadowTick::default()
        };
        for _ in 0..pairs {
            let copy = rng.random::<f64>() < copy_errors;
            let served = rng.random::<f64>() < served_errors;
            tick.copy_only_errors += u64::from(copy && !served);
            tick.served_only_errors += u64::from(served && !copy);
            if !copy && !served {
                tick.compared += 1;
                tick.different += u64::from(rng.random::<f64>() < differ);
            }
        }
        tick
    }

    /// Ticks until a verdict other than inconclusive, and that verdict (of errors, or of
    /// differences).
    fn shadow_until_decided(
        copy_errors: f64,
        differ: f64,
        differences: bool,
        seed: u64,
    ) -> (u32, Verdict) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut evidence = Evidence::new(&SHADOW);
        for tick in 1..=600 {
            let shadow = shadow_tick(100, copy_errors, 0.01, differ, &mut rng);
            evidence.observe_shadow(&shadow, &mut rng);
            let verdict = if differences {
                evidence.differences().map(|v| v.verdict)
            } else {
                Some(evidence.errors().verdict)
            };
            match verdict {
                Some(Verdict::Inconclusive) => {}
                Some(verdict) => return (tick, verdict),
                None => panic!("a shadow stage has a differences verdict"),
            }
        }
        (600, Verdict::Inconclusive)
    }

    #[test]
    fn a_shadow_stage_judges_paired_errors_and_differences() {
        // As good as the served version: both pass, on the same evidence as steps.
        assert_eq!(shadow_until_decided(0.01, 0.0, false, 1).1, Verdict::Pass);
        assert_eq!(shadow_until_decided(0.01, 0.0, true, 2).1, Verdict::Pass);
        // Copies failing 10 points more: the errors verdict fails, within a few ticks.
        let (ticks, verdict) = shadow_until_decided(0.11, 0.0, false, 3);
        assert_eq!(verdict, Verdict::Fail);
        assert!(ticks <= 10, "{ticks} ticks");
        // One answer in ten differing, against a tolerance of 1%: the differences fail.
        let (ticks, verdict) = shadow_until_decided(0.0, 0.1, true, 4);
        assert_eq!(verdict, Verdict::Fail);
        assert!(ticks <= 10, "{ticks} ticks");
        // Without a shadow stage there is no differences verdict, and alpha is split in two;
        // with one, in three.
        assert!(Evidence::new(&SETTINGS).differences().is_none());
        let two = Evidence::new(&SETTINGS).errors.threshold;
        let three = Evidence::new(&SHADOW).errors.threshold;
        assert!((two - 200f64.ln()).abs() < 1e-9 && (three - 300f64.ln()).abs() < 1e-9);
    }

    #[test]
    fn shadow_pairs_count_in_the_rollouts_fail_evidence() {
        let mut rng = SmallRng::seed_from_u64(5);
        let mut evidence = Evidence::new(&SHADOW);
        let shadow = shadow_tick(1_000, 0.02, 0.0, 0.0, &mut rng);
        evidence.observe_shadow(&shadow, &mut rng);
        evidence.start_step();
        // Step 1's pass evidence starts afresh; the pairs of the shadow stage still count
        // towards a fail.
        assert_eq!(evidence.pairs(), (1_000, 0));
        assert!(evidence.errors().low > -0.01, "{:?}", evidence.errors());
        // Counts that do not add up are read within their totals.
        let odd = ShadowTick {
            pairs: 10,
            copy_only_errors: 20,
            served_only_errors: 20,
            compared: 5,
            different: 9,
        };
        evidence.observe_shadow(&odd, &mut rng);
        assert_eq!(evidence.pairs(), (1_010, 10));
        // A state file written before shadow stages reads as evidence without one.
        let mut json: serde_json::Value =
            serde_json::to_value(Evidence::new(&SETTINGS)).unwrap_or_default();
        if let Some(map) = json.as_object_mut() {
            map.remove("differences");
        }
        let old: Evidence = match serde_json::from_value(json) {
            Ok(old) => old,
            Err(error) => panic!("{error}"),
        };
        assert!(old.differences().is_none());
    }

    #[test]
    fn verdict_serializes_in_snake_case() {
        assert_eq!(
            serde_json::to_string(&Verdict::Inconclusive)
                .ok()
                .as_deref(),
            Some("\"inconclusive\"")
        );
    }
}
