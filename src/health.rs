//! Endpoint health: whether one endpoint may receive traffic right now. Two sources decide it:
//! the active check (a task per endpoint probing `GET <path>` every interval, with up/down
//! thresholds) and passive outlier ejection (consecutive failed requests take the endpoint out
//! for a cool-down that grows with each recent ejection, as in Envoy). [`HealthSupervisor`]
//! keeps exactly one probe task per health-checked endpoint of the current routing table.
//!
//! All of an endpoint's health state lives in its [`EndpointHealth`], not in a task: the active
//! verdict with its streak of probe results, and the ejection. A reload keeps the endpoints
//! whose URL is unchanged, so it keeps their health whatever else changed; a check whose
//! settings changed is restarted and goes on from the verdict and streak the endpoint has.
//!
//! Routing asks [`EndpointHealth::is_healthy`] for every request and the proxy reports every
//! upstream attempt to [`EndpointHealth::record_outcome`], so both are plain atomic loads in the
//! common case; the ejection bookkeeping behind a lock is only touched on the failure path.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::USER_AGENT;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::chain::Chain;
use crate::config::{HealthCheckConfig, OutlierConfig};
use crate::routing::{Endpoint, RoutingTable};

/// The `User-Agent` of probes, so upstream logs can tell them from client traffic.
const PROBE_USER_AGENT: &str = "canary-proxy-health";

/// At most this much of a probe's response body is read: enough to let the connection be
/// reused for the next probe, without letting a misbehaving endpoint stream into the proxy.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// Idle probe connections are closed after this. It stays below the 5 s keep-alive timeout
/// common in upstream servers (Node.js, Apache), so a probe never writes into a connection the
/// upstream is closing and fails for that alone; with a longer interval each probe connects
/// afresh.
const PROBE_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

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

// ---------------------------------------------------------------------------------------------
// Probing.

/// The probes' own pooled client, apart from the traffic pools so that probes neither wait
/// behind nor evict client connections.
type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

fn probe_client() -> ProbeClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(PROBE_IDLE_TIMEOUT)
        .pool_max_idle_per_host(1)
        .build(connector)
}

/// Why one probe failed; shown in logs only.
#[derive(Debug)]
enum ProbeFailure {
    Timeout(Duration),
    Request(hyper_util::client::legacy::Error),
    Body(hyper::Error),
    Status(StatusCode),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Timeout(timeout) => write!(f, "no answer within {timeout:?}"),
            ProbeFailure::Request(error) => write!(f, "{}", Chain(error)),
            ProbeFailure::Body(error) => {
                f.write_str("reading the body: ")?;
                write!(f, "{}", Chain(error))
            }
            ProbeFailure::Status(status) => write!(f, "answered {status}"),
        }
    }
}

/// One probe: connect (or reuse), send `GET`, read the head and at most [`MAX_PROBE_BODY`]
/// of the body. Passes on 2xx. The caller bounds it with the check's timeout.
async fn probe(client: &ProbeClient, uri: &Uri) -> Result<(), ProbeFailure> {
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = uri.clone();
    request
        .headers_mut()
        .insert(USER_AGENT, HeaderValue::from_static(PROBE_USER_AGENT));
    let response = client
        .request(request)
        .await
        .map_err(ProbeFailure::Request)?;
    let status = response.status();
    let mut body = response.into_body();
    let mut read = 0;
    while read <= MAX_PROBE_BODY {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
            Some(Err(error)) => return Err(ProbeFailure::Body(error)),
        }
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(ProbeFailure::Status(status))
    }
}

/// What one probe task needs.
struct ProbeTask {
    endpoint: Arc<Endpoint>,
    backend: String,
    config: HealthCheckConfig,
    client: ProbeClient,
    token: CancellationToken,
}

impl ProbeTask {
    /// Probes every `interval` until cancelled, feeding the results to the endpoint's
    /// [`ProbeCounter`] (which sets its verdict). Each probe is bounded by `timeout`, and every
    /// endpoint has its own task, so a black-holed endpoint delays nobody else.
    async fn run(self) {
        let ProbeTask {
            endpoint,
            backend,
            config,
            client,
            token,
        } = self;
        let uri = match Uri::builder()
            .scheme("http")
            .authority(endpoint.authority().clone())
            .path_and_query(config.path.clone())
            .build()
        {
            Ok(uri) => uri,
            Err(error) => {
                tracing::error!(backend = %backend, endpoint = %endpoint.url(), %error, "cannot build the health check URL; endpoint not checked");
                return;
            }
        };
        let mut ticker = tokio::time::interval(config.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let result = tokio::select! {
                () = token.cancelled() => return,
                result = tokio::time::timeout(config.timeout, probe(&client, &uri)) => {
                    result.unwrap_or(Err(ProbeFailure::Timeout(config.timeout)))
                }
            };
            if let Err(error) = &result {
                tracing::debug!(backend = %backend, endpoint = %endpoint.url(), %error, "health check failed");
            }
            let transition = endpoint.health.record_probe(
                result.is_ok(),
                config.unhealthy_threshold,
                config.healthy_threshold,
            );
            match (transition, &result) {
                (Some(Transition::Down { failures }), Err(error)) => tracing::warn!(
                    backend = %backend,
                    endpoint = %endpoint.url(),
                    failures,
                    %error,
                    "endpoint marked down"
                ),
                (Some(Transition::Up { passes }), _) => tracing::info!(
                    backend = %backend,
                    endpoint = %endpoint.url(),
                    passes,
                    "endpoint marked up"
                ),
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The supervisor.

/// Keeps one probe task per endpoint of every backend that has `[backend.health]`, following
/// the routing table across reloads and weight changes.
pub struct HealthSupervisor {
    /// Parent of every probe task's token: cancelled on shutdown or when this is dropped.
    token: CancellationToken,
    client: ProbeClient,
    probes: Mutex<Probes>,
}

#[derive(Default)]
struct Probes {
    /// Running checks, by the address of the `Arc<Endpoint>` they probe.
    running: HashMap<usize, RunningProbe>,
    /// Cancelled tasks that may still be finishing, so that [`HealthSupervisor::stopped`]
    /// waits for them too.
    stopping: Vec<JoinHandle<()>>,
}

struct RunningProbe {
    /// Held so the address keying this entry cannot be reused by another endpoint.
    endpoint: Arc<Endpoint>,
    backend: String,
    config: HealthCheckConfig,
    token: CancellationToken,
    /// Set before cancelling when the backend no longer has a check: the task then marks the
    /// endpoint up as its very last act, after any probe result it was still storing.
    restore_up: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl HealthSupervisor {
    /// A supervisor whose tasks all stop when `shutdown` is cancelled. Starts nothing until
    /// [`sync`](Self::sync).
    pub fn new(shutdown: CancellationToken) -> Self {
        HealthSupervisor {
            token: shutdown.child_token(),
            client: probe_client(),
            probes: Mutex::default(),
        }
    }

    /// Makes the running checks match `table`: starts a check for each endpoint of a backend
    /// with `[backend.health]` that has none, restarts those whose backend's check settings
    /// changed, and stops the others. Endpoints kept across a table swap (same `Arc`: a weight
    /// change, or a reload that kept their URL) keep their task, or with new check settings
    /// get a new one that goes on from their verdict and streak; an endpoint whose backend
    /// lost its check goes back to up. Call it at start and after every swap. Must be called
    /// within a tokio runtime.
    pub fn sync(&self, table: &RoutingTable) {
        let present: HashSet<usize> = table
            .backends
            .iter()
            .flat_map(|b| b.endpoints.iter().map(key))
            .collect();
        let wanted: HashMap<usize, (&Arc<Endpoint>, &str, &HealthCheckConfig)> = table
            .backends
            .iter()
            .filter_map(|b| Some((b, b.health.as_ref()?)))
            .flat_map(|(b, config)| {
                b.endpoints
                    .iter()
                    .map(move |e| (key(e), (e, b.name.as_str(), config)))
            })
            .collect();

        let mut probes = self.lock();
        let Probes { running, stopping } = &mut *probes;
        stopping.retain(|task| !task.is_finished());
        let stale: Vec<usize> = running
            .iter()
            .filter(|(key, probe)| {
                !matches!(wanted.get(key), Some((_, backend, config))
                    if probe.backend == *backend && probe.config == **config)
            })
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            let Some(probe) = running.remove(&key) else {
                continue;
            };
            // Still routed to but no longer checked: nothing would ever mark it up again.
            // Restarted with new settings, or gone from the table: its state stays as is.
            let lost_check = present.contains(&key) && !wanted.contains_key(&key);
            probe.restore_up.store(lost_check, Ordering::Release);
            probe.token.cancel();
            tracing::debug!(backend = %probe.backend, endpoint = %probe.endpoint.url(), "health check stopped");
            stopping.push(probe.task);
        }
        for (key, (endpoint, backend, config)) in wanted {
            if let Entry::Vacant(slot) = running.entry(key)
                && let Some(probe) = self.start(endpoint, backend, config)
            {
                slot.insert(probe);
            }
        }
    }

    /// Spawns the check of one endpoint.
    fn start(
        &self,
        endpoint: &Arc<Endpoint>,
        backend: &str,
        config: &HealthCheckConfig,
    ) -> Option<RunningProbe> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(backend = %backend, endpoint = %endpoint.url(), "health checks need a tokio runtime; endpoint not checked");
            return None;
        };
        let token = self.token.child_token();
        let restore_up = Arc::new(AtomicBool::new(false));
        let probe = ProbeTask {
            endpoint: endpoint.clone(),
            backend: backend.to_owned(),
            config: config.clone(),
            client: self.client.clone(),
            token: token.clone(),
        };
        let (restore, target) = (restore_up.clone(), endpoint.clone());
        let task = runtime.spawn(async move {
            probe.run().await;
            if restore.load(Ordering::Acquire) {
                target.health.set_active(true);
            }
        });
        tracing::debug!(backend = %backend, endpoint = %endpoint.url(), path = %config.path, interval = ?config.interval, "health check started");
        Some(RunningProbe {
            endpoint: endpoint.clone(),
            backend: backend.to_owned(),
            config: config.clone(),
            token,
            restore_up,
            task,
        })
    }

    /// How many endpoints are being checked right now.
    pub fn checks(&self) -> usize {
        self.lock().running.len()
    }

    /// Completes once shutdown was signalled and every probe task has ended. The caller bounds
    /// it with its own deadline; tasks end at their next await point, so this is quick.
    pub async fn stopped(&self) {
        self.token.cancelled().await;
        let tasks: Vec<JoinHandle<()>> = {
            let mut probes = self.lock();
            let Probes { running, stopping } = &mut *probes;
            running
                .drain()
                .map(|(_, probe)| probe.task)
                .chain(stopping.drain(..))
                .collect()
        };
        for task in tasks {
            if let Err(error) = task.await
                && error.is_panic()
            {
                tracing::error!(%error, "a health check task panicked");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Probes> {
        self.probes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for HealthSupervisor {
    /// Stops the checks of a supervisor that goes away before shutdown (tests, mostly).
    fn drop(&mut self) {
        self.token.cancel();
    }
}

impl fmt::Debug for HealthSupervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthSupervisor")
            .field("checks", &self.checks())
            .field("stopped", &self.token.is_cancelled())
            .finish()
    }
}

/// Identifies an endpoint by the address of its shared allocation: tables derived from one
/// another hold the same `Arc`, a rebuilt endpoint gets a new one.
fn key(endpoint: &Arc<Endpoint>) -> usize {
    Arc::as_ptr(endpoint).addr()
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
