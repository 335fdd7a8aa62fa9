//! Endpoint health: whether one endpoint may receive traffic right now. Two sources decide it:
//! the active check (probes of `GET <path>` every interval, with up/down thresholds) and
//! passive outlier ejection (consecutive failed requests take the endpoint out for a cool-down
//! that grows with each recent ejection, as in Envoy). The probes themselves run in
//! `control::health`, which feeds each result to the endpoint's [`EndpointHealth`].
//!
//! All of an endpoint's health state lives in its [`EndpointHealth`], not in a task: the active
//! verdict with its streak of probe results, and the ejection. A reload keeps the endpoints
//! whose URL is unchanged, so it keeps their health whatever else changed; a check whose
//! settings changed is restarted and goes on from the verdict and streak the endpoint has.
//!
//! Routing asks [`EndpointHealth::is_healthy`] for every request and the proxy reports every
//! upstream attempt to [`EndpointHealth::record_outcome`], so both are plain atomic loads in the
//! common case; the ejection bookkeeping behind a lock is only touched on the failure path.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::OutlierConfig;

// ---------------------------------------------------------------------------------------------
// The active check's state machine.

/// The active check's verdict over consecutive probe results: an endpoint that is up goes down
/// after `unhealthy_threshold` failures in a row, one that is down comes back after
/// `healthy_threshold` passes in a row. A result that agrees with the current state resets the
/// streak, so one lucky probe does not revive an endpoint and one lost probe does not kill it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeCounter {
    up: bool,
    /// Consecutive results that disagree with `up`: failures while up, passes while down.
    streak: u32,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
}

/// A change of the active verdict, with the streak that caused it (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Down { failures: u32 },
    Up { passes: u32 },
}

impl ProbeCounter {
    /// A counter starting in state `up` with no streak (endpoints start up). Thresholds below
    /// 1 act as 1.
    pub fn new(up: bool, unhealthy_threshold: u32, healthy_threshold: u32) -> Self {
        ProbeCounter {
            up,
            streak: 0,
            unhealthy_threshold: unhealthy_threshold.max(1),
            healthy_threshold: healthy_threshold.max(1),
        }
    }

    /// New thresholds (a check restarted with new settings), keeping the state and the streak:
    /// the next result is judged against them.
    pub fn set_thresholds(&mut self, unhealthy_threshold: u32, healthy_threshold: u32) {
        self.unhealthy_threshold = unhealthy_threshold.max(1);
        self.healthy_threshold = healthy_threshold.max(1);
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one probe result; returns the transition it completed, if any.
    pub fn record(&mut self, passed: bool) -> Option<Transition> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        let threshold = if self.up {
            self.unhealthy_threshold
        } else {
            self.healthy_threshold
        };
        if self.streak < threshold {
            return None;
        }
        let streak = std::mem::take(&mut self.streak);
        self.up = passed;
        Some(if passed {
            Transition::Up { passes: streak }
        } else {
            Transition::Down { failures: streak }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The live state of one endpoint.

/// What the admin API and metrics show of one endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointStatus {
    /// Receives traffic: `active_up && !ejected`.
    pub up: bool,
    /// The active check's verdict (always true without `[backend.health]`).
    pub active_up: bool,
    /// Currently ejected by passive health.
    pub ejected: bool,
    /// Recent ejections, the multiplier of the next cool-down (decayed as of now).
    pub ejections: u32,
    /// Every ejection since the endpoint was created, for a monotonic counter.
    pub ejections_total: u64,
}

/// The health of one endpoint, shared by every routing table that holds the endpoint, so a
/// table swap never loses it and the checker never rebuilds a table.
#[derive(Debug)]
pub struct EndpointHealth {
    /// The endpoint's URL, for the ejection log lines this state emits itself.
    url: Box<str>,
    /// The active check's verdict, or an operator override; true when no check is configured.
    /// Mirrors `probe`'s state, for lock-free reads on every request.
    active_up: AtomicBool,
    /// The active check's verdict and streak. Kept here rather than in the probe task, so that
    /// a check restarted with new settings (or a task replaced while its last probe was in
    /// flight) goes on from where the endpoint is; only touched once per probe.
    probe: Mutex<ProbeCounter>,
    /// End of the current ejection in nanoseconds after `epoch`, 0 when not ejected: one word,
    /// so the routing check costs one load while the endpoint is in.
    ejected_until: AtomicU64,
    /// Failed requests in a row since the last success or ejection.
    failures: AtomicU32,
    /// `consecutive_failures` of the outlier settings, read lock-free on the failure path;
    /// 0 disables ejection.
    threshold: AtomicU32,
    /// The origin of `ejected_until`.
    epoch: Instant,
    /// Ejection bookkeeping, only touched when an endpoint is ejected or inspected.
    ejections: Mutex<Ejections>,
}

#[derive(Debug)]
struct Ejections {
    base: Duration,
    max: Duration,
    /// Recent ejections (the `n` of `base * n`), before decay since `last_end`.
    count: u32,
    /// When the latest ejection ends or ended; decay counts whole `base` periods from it.
    last_end: Option<Instant>,
    total: u64,
}

impl Ejections {
    /// `count` after decaying one step for each whole `base` period since the last ejection
    /// ended.
    fn decayed(&self, now: Instant) -> u32 {
        let Some(end) = self.last_end else {
            return self.count;
        };
        let idle = now.saturating_duration_since(end).as_nanos();
        let periods = idle / self.base.as_nanos().max(1);
        let periods = u32::try_from(periods).unwrap_or(u32::MAX);
        self.count.saturating_sub(periods)
    }

    /// The largest useful multiplier: past it every cool-down is `max` anyway, so counting
    /// higher would only make recovery (decay) slower.
    fn cap(&self) -> u32 {
        let steps = self.max.as_nanos().div_ceil(self.base.as_nanos().max(1));
        u32::try_from(steps).unwrap_or(u32::MAX).max(1)
    }
}

impl EndpointHealth {
    /// An endpoint that starts up and not ejected.
    pub fn new(url: &str, outlier: OutlierConfig) -> Self {
        EndpointHealth {
            url: url.into(),
            active_up: AtomicBool::new(true),
            probe: Mutex::new(ProbeCounter::new(true, 1, 1)),
            ejected_until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            threshold: AtomicU32::new(outlier.consecutive_failures),
            epoch: Instant::now(),
            ejections: Mutex::new(Ejections {
                base: outlier.base_ejection,
                max: outlier.max_ejection,
                count: 0,
                last_end: None,
                total: 0,
            }),
        }
    }

    /// True when the endpoint may receive traffic: the active check says up and it is not
    /// ejected. An ejection that has run out is cleared here, so no timer task is needed.
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.active_up.load(Ordering::Relaxed) && !self.is_ejected()
    }

    /// The active check's verdict alone.
    pub fn is_active_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    /// Forces the active verdict and clears the streak: a test or an operator, or the end of a
    /// check removed from the config (the endpoint goes back up). A running check goes on
    /// counting from this state.
    pub fn set_active(&self, up: bool) {
        let mut probe = self.lock_probe();
        *probe = ProbeCounter::new(up, probe.unhealthy_threshold, probe.healthy_threshold);
        self.active_up.store(up, Ordering::Relaxed);
    }

    /// Records one probe result, judged with the check's thresholds; returns the transition of
    /// the active verdict it completed, if any.
    pub fn record_probe(
        &self,
        passed: bool,
        unhealthy_threshold: u32,
        healthy_threshold: u32,
    ) -> Option<Transition> {
        let mut probe = self.lock_probe();
        probe.set_thresholds(unhealthy_threshold, healthy_threshold);
        let transition = probe.record(passed);
        self.active_up.store(probe.is_up(), Ordering::Relaxed);
        transition
    }

    /// True while an ejection lasts.
    #[inline]
    pub fn is_ejected(&self) -> bool {
        match self.ejected_until.load(Ordering::Relaxed) {
            0 => false,
            until => self.still_ejected(until),
        }
    }

    #[cold]
    fn still_ejected(&self, until: u64) -> bool {
        let now = self.nanos_since_epoch(Instant::now());
        if now < until {
            return true;
        }
        match self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => {
                tracing::info!(endpoint = %self.url, "endpoint ejection ended");
                false
            }
            // Another caller cleared it, or a new ejection began meanwhile.
            Err(current) => current != 0 && now < current,
        }
    }

    /// Passive health: the outcome of one upstream attempt (`false` for a connect failure, a
    /// sent-but-failed request, a timeout or a 5xx). A success costs one load unless a failure
    /// streak has to be reset.
    #[inline]
    pub fn record_outcome(&self, success: bool) {
        if success {
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.failures.store(0, Ordering::Relaxed);
            }
        } else {
            self.record_failure();
        }
    }

    #[cold]
    fn record_failure(&self) {
        let threshold = self.threshold.load(Ordering::Relaxed);
        // Failures of requests already in flight when the endpoint was ejected (or that reach
        // it while everything fails open) do not count towards the next ejection.
        if threshold == 0 || self.is_ejected() {
            return;
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures >= threshold {
            self.eject(failures);
        }
    }

    fn eject(&self, failures: u32) {
        let mut ejections = self.lock();
        // Two failures may cross the threshold together; the first one ejects.
        if self.is_ejected() {
            return;
        }
        let now = Instant::now();
        let n = ejections
            .decayed(now)
            .saturating_add(1)
            .min(ejections.cap());
        let cooldown = ejections.base.saturating_mul(n).min(ejections.max);
        // A max_ejection of centuries is allowed; it only has to mean "a very long time".
        let end = now
            .checked_add(cooldown)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        ejections.count = n;
        ejections.last_end = Some(end);
        ejections.total += 1;
        self.failures.store(0, Ordering::Relaxed);
        // `max(1)`: 0 means "not ejected"; a cool-down is never zero anyway.
        self.ejected_until
            .store(self.nanos_since_epoch(end).max(1), Ordering::Relaxed);
        drop(ejections);
        tracing::warn!(
            endpoint = %self.url,
            failures,
            cooldown = ?cooldown,
            ejections = n,
            "endpoint ejected"
        );
    }

    /// Applies new outlier settings (a reload) without losing the current state. Turning
    /// ejection off (`consecutive_failures = 0`) also ends a running ejection.
    pub fn set_outlier(&self, outlier: OutlierConfig) {
        let mut ejections = self.lock();
        ejections.base = outlier.base_ejection;
        ejections.max = outlier.max_ejection;
        self.threshold
            .store(outlier.consecutive_failures, Ordering::Relaxed);
        if outlier.consecutive_failures == 0 {
            self.failures.store(0, Ordering::Relaxed);
            if self.ejected_until.swap(0, Ordering::Relaxed) != 0 {
                // The ejection ends now, so decay counts from now.
                let now = Instant::now();
                ejections.last_end = ejections.last_end.map(|end| end.min(now));
            }
        }
    }

    /// A consistent-enough snapshot for the admin API and metrics.
    pub fn status(&self) -> EndpointStatus {
        let active_up = self.is_active_up();
        let ejected = self.is_ejected();
        let ejections = self.lock();
        EndpointStatus {
            up: active_up && !ejected,
            active_up,
            ejected,
            ejections: ejections.decayed(Instant::now()),
            ejections_total: ejections.total,
        }
    }

    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Ejections> {
        self.ejections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_probe(&self) -> MutexGuard<'_, ProbeCounter> {
        self.probe.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const SECOND: Duration = Duration::from_secs(1);

    fn counter(up: bool, unhealthy: u32, healthy: u32) -> ProbeCounter {
        ProbeCounter::new(up, unhealthy, healthy)
    }

    #[test]
    fn probe_counter_goes_down_after_consecutive_failures_only() {
        let mut c = counter(true, 3, 2);
        assert!(c.is_up());
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        // A pass in between starts the count again.
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert!(c.is_up());
        assert_eq!(c.record(false), Some(Transition::Down { failures: 3 }));
        assert!(!c.is_up());
        // Further failures do not report again.
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert!(!c.is_up());
    }

    #[test]
    fn probe_counter_comes_back_after_consecutive_passes_only() {
        let mut c = counter(false, 3, 2);
        assert!(!c.is_up());
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(true), None);
        assert!(!c.is_up());
        assert_eq!(c.record(true), Some(Transition::Up { passes: 2 }));
        assert!(c.is_up());
        assert_eq!(c.record(true), None);
        // Coming back resets the streak: three new failures are needed to go down.
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), Some(Transition::Down { failures: 3 }));
    }

    #[test]
    fn probe_counter_with_thresholds_of_one_follows_every_result() {
        let mut c = counter(true, 1, 1);
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(false), Some(Transition::Down { failures: 1 }));
        assert_eq!(c.record(true), Some(Transition::Up { passes: 1 }));
        assert_eq!(c.record(false), Some(Transition::Down { failures: 1 }));
        // Zero thresholds cannot come from a validated config, but act as 1.
        let mut c = counter(true, 0, 0);
        assert_eq!(c.record(false), Some(Transition::Down { failures: 1 }));
        assert_eq!(c.record(true), Some(Transition::Up { passes: 1 }));
    }

    #[test]
    fn probe_counter_alternating_results_never_flip() {
        let mut c = counter(true, 2, 2);
        for _ in 0..100 {
            assert_eq!(c.record(false), None);
            assert_eq!(c.record(true), None);
        }
        assert!(c.is_up());
        let mut c = counter(false, 2, 2);
        for _ in 0..100 {
            assert_eq!(c.record(true), None);
            assert_eq!(c.record(false), None);
        }
        assert!(!c.is_up());
    }

    #[test]
    fn probe_verdict_and_streak_live_with_the_endpoint_across_check_restarts() {
        let h = EndpointHealth::new("http://127.0.0.1:1", OutlierConfig::default());
        // Two failures of a check that needs three...
        assert_eq!(h.record_probe(false, 3, 2), None);
        assert_eq!(h.record_probe(false, 3, 2), None);
        assert!(h.is_active_up());
        // ...and the check is restarted with new settings: the third failure still counts.
        assert_eq!(
            h.record_probe(false, 3, 5),
            Some(Transition::Down { failures: 3 })
        );
        assert!(!h.is_active_up() && !h.is_healthy());
        // Passes towards coming back are kept too, judged by the thresholds of the day.
        assert_eq!(h.record_probe(true, 3, 5), None);
        assert_eq!(
            h.record_probe(true, 3, 2),
            Some(Transition::Up { passes: 2 })
        );
        assert!(h.is_healthy());
        // Forcing a verdict clears the streak.
        assert_eq!(h.record_probe(false, 2, 2), None);
        h.set_active(true);
        assert_eq!(h.record_probe(false, 2, 2), None);
        assert!(h.is_active_up());
    }

    fn outlier(failures: u32, base: Duration, max: Duration) -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: failures,
            base_ejection: base,
            max_ejection: max,
        }
    }

    fn health(failures: u32, base: Duration, max: Duration) -> EndpointHealth {
        EndpointHealth::new("http://127.0.0.1:1", outlier(failures, base, max))
    }

    fn fail(h: &EndpointHealth, times: u32) {
        for _ in 0..times {
            h.record_outcome(false);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn starts_up_and_ejects_after_consecutive_failures() {
        let h = health(3, 10 * SECOND, 100 * SECOND);
        assert!(h.is_healthy());
        assert_eq!(
            h.status(),
            EndpointStatus {
                up: true,
                active_up: true,
                ejected: false,
                ejections: 0,
                ejections_total: 0
            }
        );
        fail(&h, 2);
        h.record_outcome(true);
        fail(&h, 2);
        assert!(h.is_healthy(), "a success resets the streak");
        fail(&h, 1);
        assert!(!h.is_healthy());
        assert_eq!(
            h.status(),
            EndpointStatus {
                up: false,
                active_up: true,
                ejected: true,
                ejections: 1,
                ejections_total: 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_ends_by_itself_after_the_cool_down() {
        let h = health(1, 10 * SECOND, 100 * SECOND);
        fail(&h, 1);
        advance(10 * SECOND - Duration::from_millis(1)).await;
        assert!(!h.is_healthy());
        advance(Duration::from_millis(1)).await;
        assert!(h.is_healthy());
        assert!(!h.status().ejected);
        assert_eq!(h.ejected_until.load(Ordering::Relaxed), 0, "cleared lazily");
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_ejections_grow_until_the_cap() {
        let h = health(1, 10 * SECOND, 35 * SECOND);
        // Re-ejected right after each cool-down: 10s, 20s, 30s, then capped at 35s.
        for (n, cooldown) in [(1, 10), (2, 20), (3, 30), (4, 35), (4, 35)] {
            fail(&h, 1);
            assert_eq!(h.status().ejections, n);
            advance(Duration::from_secs(cooldown) - Duration::from_millis(1)).await;
            assert!(!h.is_healthy(), "ejection {n} lasts {cooldown}s");
            advance(Duration::from_millis(1)).await;
            assert!(h.is_healthy(), "ejection {n} ends after {cooldown}s");
        }
        assert_eq!(h.status().ejections_total, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_count_decays_one_step_per_base_period_back_in() {
        let h = health(1, 10 * SECOND, 1000 * SECOND);
        for cooldown in [10, 20, 30] {
            fail(&h, 1);
            advance(Duration::from_secs(cooldown)).await;
        }
        assert!(h.is_healthy());
        assert_eq!(h.status().ejections, 3);
        advance(10 * SECOND - Duration::from_millis(1)).await;
        assert_eq!(h.status().ejections, 3);
        advance(Duration::from_millis(1)).await;
        assert_eq!(h.status().ejections, 2);
        advance(10 * SECOND).await;
        assert_eq!(h.status().ejections, 1);
        // The next ejection counts from the decayed value: n = 2, so 20s.
        fail(&h, 1);
        assert_eq!(h.status().ejections, 2);
        advance(20 * SECOND - Duration::from_millis(1)).await;
        assert!(!h.is_healthy());
        advance(Duration::from_millis(1)).await;
        assert!(h.is_healthy());
        // Long enough back in, everything is forgotten, never below zero.
        advance(1000 * SECOND).await;
        assert_eq!(h.status().ejections, 0);
        fail(&h, 1);
        assert_eq!(h.status().ejections, 1);
        advance(10 * SECOND).await;
        assert!(h.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn multiplier_stops_growing_at_the_cap_so_recovery_stays_bounded() {
        let h = health(1, 10 * SECOND, 30 * SECOND);
        // Re-ejected as soon as each cool-down ends: 10s, 20s, 30s, 30s...
        for n in 1..=20u32 {
            fail(&h, 1);
            advance((10 * SECOND * n).min(30 * SECOND)).await;
        }
        assert_eq!(h.status().ejections, 3);
        assert_eq!(h.status().ejections_total, 20);
        advance(30 * SECOND).await;
        assert_eq!(h.status().ejections, 0);
        // A max that is not a multiple of base: 4 steps reach it.
        let h = health(1, 10 * SECOND, 35 * SECOND);
        assert_eq!(h.lock().cap(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_while_ejected_do_not_count_towards_the_next_ejection() {
        let h = health(2, 10 * SECOND, 100 * SECOND);
        fail(&h, 2);
        assert!(!h.is_healthy());
        fail(&h, 50);
        assert_eq!(h.status().ejections_total, 1);
        advance(10 * SECOND).await;
        assert!(h.is_healthy());
        fail(&h, 1);
        assert!(
            h.is_healthy(),
            "one failure after the ejection is below the threshold"
        );
        fail(&h, 1);
        assert!(!h.is_healthy());
        assert_eq!(h.status().ejections, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_enormous_max_ejection_does_not_overflow() {
        let h = health(1, Duration::from_secs(u64::MAX / 2), Duration::MAX);
        fail(&h, 1);
        assert!(!h.is_healthy());
        advance(1000 * SECOND).await;
        assert!(!h.is_healthy());
        assert_eq!(h.status().ejections, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_consecutive_failures_disables_ejection() {
        let h = health(0, 10 * SECOND, 100 * SECOND);
        fail(&h, 1000);
        assert!(h.is_healthy());
        assert_eq!(h.status().ejections_total, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn new_outlier_settings_apply_in_place() {
        let h = health(2, 10 * SECOND, 100 * SECOND);
        fail(&h, 2);
        assert!(!h.is_healthy());
        // Turning ejection off ends the running ejection.
        h.set_outlier(outlier(0, 10 * SECOND, 100 * SECOND));
        assert!(h.is_healthy());
        fail(&h, 10);
        assert!(h.is_healthy());
        // A new threshold and base apply to the next ejection.
        h.set_outlier(outlier(3, SECOND, 100 * SECOND));
        fail(&h, 2);
        assert!(h.is_healthy());
        fail(&h, 1);
        assert!(!h.is_healthy());
        // The first ejection still counts (no time passed): n = 2, so 2 * 1s.
        assert_eq!(h.status().ejections, 2);
        advance(2 * SECOND - Duration::from_millis(1)).await;
        assert!(!h.is_healthy());
        advance(Duration::from_millis(1)).await;
        assert!(h.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn active_verdict_and_ejection_combine() {
        let h = health(1, 10 * SECOND, 100 * SECOND);
        h.set_active(false);
        assert!(!h.is_healthy());
        let status = h.status();
        assert!(!status.up && !status.active_up && !status.ejected);
        fail(&h, 1);
        h.set_active(true);
        assert!(!h.is_healthy(), "up by the active check but ejected");
        advance(10 * SECOND).await;
        assert!(h.is_healthy());
        assert!(h.status().up);
    }
}
