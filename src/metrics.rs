//! The proxy's Prometheus metrics: one [`Metrics`] per proxy, holding its own registry, and a
//! [`BackendMetrics`] handle per backend that the forward path counts into.
//!
//! Labels are bounded by construction: the hot path takes only typed values
//! ([`DecisionReason`], [`UpstreamErrorKind`], [`FaultKind`], [`StatusCode`],
//! [`GrpcStatusLabel`]), and the one
//! free-form label, the backend name, is fixed when a routing table is built, never taken from
//! a request. Each handle resolves its label children once (lazily for status codes), so
//! counting a request is a few atomic operations with no hashing, locking or allocation.
//!
//! The gauges that describe the routing table (weights, effective weights, endpoint health) are
//! not updated by whoever changes the table: [`Metrics::render`] resets them and has its caller
//! set them ([`TableGauges`]) from the table being served at scrape time, so they cannot go
//! stale or outlive a backend removed by a reload. This module knows nothing of routing.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use http::StatusCode;
use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::config::UNROUTED_BACKEND;

/// The `Content-Type` of [`Metrics::render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the request duration histogram: fine-grained below 10ms, where a
/// proxy in front of a fast service lives, and up to 30s, the default `request_timeout`.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why routing chose a backend, as the `reason` label of `canary_route_decisions_total`: the
/// routing decision's reason without its rule number or bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionReason {
    Rule,
    Sticky,
    Weight,
    Fallback,
}

impl DecisionReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            DecisionReason::Rule => "rule",
            DecisionReason::Sticky => "sticky",
            DecisionReason::Weight => "weight",
            DecisionReason::Fallback => "fallback",
        }
    }
}

/// The upstream error kinds, as a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Upstream,
    Timeout,
}

impl UpstreamErrorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Upstream => "upstream",
            UpstreamErrorKind::Timeout => "timeout",
        }
    }
}

/// What a fault injected into a request, as a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Answered without forwarding.
    Abort,
    /// Held before forwarding.
    Delay,
}

impl FaultKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            FaultKind::Abort => "abort",
            FaultKind::Delay => "delay",
        }
    }

    fn slot(self) -> usize {
        match self {
            FaultKind::Abort => 0,
            FaultKind::Delay => 1,
        }
    }
}

const FAULT_KINDS: [FaultKind; 2] = [FaultKind::Abort, FaultKind::Delay];

/// A gRPC call's status as the `grpc_status` label: its code from 0 (OK) to 16
/// (UNAUTHENTICATED), the codes gRPC defines, or `other` for any other value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcStatusLabel(u8);

/// One label per gRPC code, then `other`.
const GRPC_LABELS: [&str; 18] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "other",
];

impl GrpcStatusLabel {
    /// A value that is no code gRPC defines.
    pub const OTHER: GrpcStatusLabel = GrpcStatusLabel(17);

    /// The label of code `code`: itself for 0..=16, else `other`.
    pub fn of(code: u32) -> Self {
        match u8::try_from(code) {
            Ok(code) if code <= 16 => GrpcStatusLabel(code),
            _ => GrpcStatusLabel::OTHER,
        }
    }

    pub fn as_str(self) -> &'static str {
        GRPC_LABELS[usize::from(self.0)]
    }
}

/// One slot per [`DecisionReason`], in [`reason_slot`] order.
const REASONS: [DecisionReason; 4] = [
    DecisionReason::Rule,
    DecisionReason::Sticky,
    DecisionReason::Weight,
    DecisionReason::Fallback,
];

/// One slot per [`UpstreamErrorKind`], in [`error_slot`] order.
const ERROR_KINDS: [UpstreamErrorKind; 3] = [
    UpstreamErrorKind::Connect,
    UpstreamErrorKind::Upstream,
    UpstreamErrorKind::Timeout,
];

/// Status codes whose counter a handle caches; the standard range. `StatusCode` also admits
/// 600..=999, which an odd upstream may send: those are still counted under their own code,
/// just without a cache slot.
const CACHED_STATUSES: std::ops::RangeInclusive<u16> = 100..=599;

fn reason_slot(reason: DecisionReason) -> usize {
    match reason {
        DecisionReason::Rule => 0,
        DecisionReason::Sticky => 1,
        DecisionReason::Weight => 2,
        DecisionReason::Fallback => 3,
    }
}

fn error_slot(kind: UpstreamErrorKind) -> usize {
    match kind {
        UpstreamErrorKind::Connect => 0,
        UpstreamErrorKind::Upstream => 1,
        UpstreamErrorKind::Timeout => 2,
    }
}

/// All metrics of one proxy. Owns its registry rather than using the process-global one, so
/// several proxies (as in the integration tests) never see each other's counts.
pub struct Metrics {
    registry: Registry,
    /// The label families, shared with every [`BackendMetrics`] so handles can resolve the
    /// children they did not resolve up front.
    families: Arc<Families>,
    table: TableGauges,
    reloads_success: IntCounter,
    reloads_failure: IntCounter,
    in_flight: IntGauge,
    unrouted: BackendMetrics,
    /// The progressive rollout's gauges and counters, set by its controller.
    pub rollout: RolloutMetrics,
    /// Mirroring's counters.
    pub mirror: MirrorMetrics,
    /// `[store]`'s gauges, registered when a store is configured (and so absent without).
    store: std::sync::OnceLock<StoreMetrics>,
    /// Serializes scrapes: `render` resets and refills the table gauges, and two concurrent
    /// scrapes must not see each other's half-filled state.
    render_lock: Mutex<()>,
}

/// The gauges that describe the routing table being served. [`Metrics::render`] resets them at
/// every scrape and has its caller set them from that table.
pub struct TableGauges {
    weight: IntGaugeVec,
    effective_weight: IntGaugeVec,
    endpoint_up: IntGaugeVec,
    version: IntGauge,
    failing_open: IntGauge,
}

/// The labelled families the per-backend handles count into.
struct Families {
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    decisions: IntCounterVec,
    faults: IntCounterVec,
    grpc: IntCounterVec,
}

/// The counters of one backend, resolved ahead of time. Cheap to clone (one `Arc`); the routing
/// table keeps one per backend so the forward path never looks a label up.
#[derive(Clone)]
pub struct BackendMetrics {
    series: Arc<BackendSeries>,
}

struct BackendSeries {
    name: String,
    families: Arc<Families>,
    /// Indexed by `status - 100`; filled on a status's first use, so a backend only exports the
    /// codes it has actually answered with.
    statuses: Box<[OnceLock<IntCounter>]>,
    duration: OnceLock<Histogram>,
    decisions: [OnceLock<IntCounter>; REASONS.len()],
    errors: [OnceLock<IntCounter>; ERROR_KINDS.len()],
    faults: [OnceLock<IntCounter>; FAULT_KINDS.len()],
    /// By [`GrpcStatusLabel`]; filled on first use, like the status codes.
    grpc: [OnceLock<IntCounter>; GRPC_LABELS.len()],
}

/// Counts one request in `canary_in_flight_requests` for as long as it lives. Dropping it is the
/// only way to stop counting, so a request future dropped by a client disconnect still
/// decrements.
#[must_use = "the request stops being counted as soon as the guard is dropped"]
pub struct InFlight {
    gauge: IntGauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Registers a collector under a fixed name; failing means two metrics share a name or a name
/// is malformed, a programming error caught by the first test that builds a `Metrics`.
fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names and labels are fixed and unique");
    collector
}

fn int_counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    register(registry, vec)
}

fn int_gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    register(registry, vec)
}

fn int_counter(registry: &Registry, name: &str, help: &str, result: &str) -> IntCounter {
    let opts = Opts::new(name, help).const_label("result", result);
    register(
        registry,
        IntCounter::with_opts(opts).expect("valid metric definition"),
    )
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::new(name, help).expect("valid metric definition"),
    )
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let families = Arc::new(Families {
            requests: int_counter_vec(
                r,
                "canary_requests_total",
                "Client requests answered, by the backend that served them (\"none\" when the \
                 proxy answered itself) and the response status code.",
                &["backend", "status"],
            ),
            duration: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "canary_request_duration_seconds",
                        "Time from a client request's arrival to its response head being sent \
                         (to its end for a gRPC call through an HTTP/2 upstream), by backend.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["backend"],
                )
                .expect("valid metric definition"),
            ),
            upstream_errors: int_counter_vec(
                r,
                "canary_upstream_errors_total",
                "Forwarded requests that failed upstream, by backend and kind (connect: no \
                 connection; upstream: failed after sending; timeout: no response head in time).",
                &["backend", "kind"],
            ),
            decisions: int_counter_vec(
                r,
                "canary_route_decisions_total",
                "Routing decisions, by chosen backend and reason (rule, sticky, weight; fallback \
                 when no eligible backend was healthy and routing failed open).",
                &["backend", "reason"],
            ),
            faults: int_counter_vec(
                r,
                "canary_faults_injected_total",
                "Faults injected into requests (fault drills), by the backend routed to and kind \
                 (abort: answered without forwarding; delay: held before forwarding).",
                &["backend", "kind"],
            ),
            grpc: int_counter_vec(
                r,
                "canary_grpc_responses_total",
                "gRPC calls answered through h2/h2c upstreams, by backend and gRPC status code \
                 (0 to 16, or other), from the trailers or a trailers-only response's head.",
                &["backend", "grpc_status"],
            ),
        });
        // Two series of one family, created up front so both results export 0 from the start.
        let reloads = "Configuration reloads, by result.";
        Metrics {
            table: TableGauges::new(r),
            reloads_success: int_counter(r, "canary_config_reloads_total", reloads, "success"),
            reloads_failure: int_counter(r, "canary_config_reloads_total", reloads, "failure"),
            in_flight: int_gauge(
                r,
                "canary_in_flight_requests",
                "Client requests received whose response head has not been sent yet.",
            ),
            unrouted: BackendMetrics::new(UNROUTED_BACKEND, families.clone(), false),
            rollout: RolloutMetrics::new(r),
            mirror: MirrorMetrics::new(r),
            store: std::sync::OnceLock::new(),
            families,
            registry,
            render_lock: Mutex::new(()),
        }
    }

    /// `[store]`'s gauges, registered on first use.
    pub fn store(&self) -> &StoreMetrics {
        self.store.get_or_init(|| StoreMetrics::new(&self.registry))
    }

    /// The handle of backend `name`, with its decision, error and duration series resolved (and
    /// so exported at 0 from the start, which keeps `rate()` right on the first increment).
    /// Called when a routing table is built, never per request. Handles made for the same name
    /// count into the same series.
    pub fn backend(&self, name: &str) -> BackendMetrics {
        BackendMetrics::new(name, self.families.clone(), true)
    }

    /// The `backend="none"` handle, for requests the proxy answers without routing them. Its
    /// series are created on first use, so they only appear once such a request happens.
    pub fn unrouted(&self) -> &BackendMetrics {
        &self.unrouted
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight {
            gauge: self.in_flight.clone(),
        }
    }

    /// Counts one configuration reload attempt.
    pub fn config_reload(&self, success: bool) {
        if success {
            self.reloads_success.inc();
        } else {
            self.reloads_failure.inc();
        }
    }

    /// The scrape: resets the table gauges and has `set_table_gauges` set them from the table
    /// being served, then encodes every metric in the Prometheus text format (see
    /// `metrics::CONTENT_TYPE`).
    pub fn render(&self, set_table_gauges: impl FnOnce(&TableGauges)) -> String {
        // Nothing in the critical section can leave state half-updated for the next scrape (it
        // starts with a reset), so a poisoned lock is safe to take over.
        let _scrape = self
            .render_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.table.reset();
        set_table_gauges(&self.table);

        let mut text = String::new();
        if let Err(error) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            // Only reachable through a malformed family, which fixed definitions rule out.
            tracing::error!(error = %error, "cannot encode metrics");
        }
        text
    }
}

/// One backend's traffic so far, for the dashboard: cumulative counts it differences itself.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct TrafficCounts {
    pub requests: u64,
    /// Answers with a status of 500 or more (the proxy's own 502 and 504 included).
    pub errors: u64,
    /// The latency histogram: (upper bound in seconds, cumulative count), as Prometheus has it.
    pub latency: Vec<(f64, u64)>,
}

impl Metrics {
    /// Per backend (the `backend` label, `none` included), its requests, 5xx answers and
    /// latency histogram so far: what `/metrics` says, for the dashboard.
    pub fn traffic(&self) -> std::collections::BTreeMap<String, TrafficCounts> {
        let mut traffic: std::collections::BTreeMap<String, TrafficCounts> = Default::default();
        let label = |metric: &prometheus::proto::Metric, name: &str| {
            metric
                .get_label()
                .iter()
                .find(|l| l.name() == name)
                .map(|l| l.value().to_owned())
        };
        for family in self.registry.gather() {
            match family.name() {
                "canary_requests_total" => {
                    for metric in family.get_metric() {
                        let (Some(backend), Some(status)) =
                            (label(metric, "backend"), label(metric, "status"))
                        else {
                            continue;
                        };
                        let count = metric.get_counter().get_value() as u64;
                        let entry = traffic.entry(backend).or_default();
                        entry.requests += count;
                        if status.parse::<u16>().is_ok_and(|s| s >= 500) {
                            entry.errors += count;
                        }
                    }
                }
                "canary_request_duration_seconds" => {
                    for metric in family.get_metric() {
                        let Some(backend) = label(metric, "backend") else {
                            continue;
                        };
                        let histogram = metric.get_histogram();
                        traffic.entry(backend).or_default().latency = histogram
                            .get_bucket()
                            .iter()
                            .map(|b| (b.upper_bound(), b.cumulative_count()))
                            .collect();
                    }
                }
                _ => {}
            }
        }
        traffic
    }
}

impl TableGauges {
    fn new(r: &Registry) -> Self {
        TableGauges {
            weight: int_gauge_vec(
                r,
                "canary_backend_weight",
                "Configured weight of each backend in the routing table being served.",
                &["backend"],
            ),
            effective_weight: int_gauge_vec(
                r,
                "canary_backend_effective_weight",
                "Weight each backend receives right now: its configured weight when it has a \
                 healthy endpoint, 0 when not, the configured weights when failing open.",
                &["backend"],
            ),
            endpoint_up: int_gauge_vec(
                r,
                "canary_endpoint_up",
                "1 when the endpoint is considered healthy, 0 when it is marked down.",
                &["backend", "endpoint"],
            ),
            version: int_gauge(
                r,
                "canary_table_version",
                "Version of the routing table being served; bumped by every reload or admin \
                 change.",
            ),
            failing_open: int_gauge(
                r,
                "canary_failing_open",
                "1 when no weighted backend is healthy, so requests are routed by configured \
                 weights regardless of health.",
            ),
        }
    }

    /// A backend's configured weight, and the weight it receives right now.
    pub fn backend(&self, name: &str, weight: u32, effective_weight: u32) {
        self.weight
            .with_label_values(&[name])
            .set(i64::from(weight));
        self.effective_weight
            .with_label_values(&[name])
            .set(i64::from(effective_weight));
    }

    /// Whether an endpoint of `backend` is considered healthy.
    pub fn endpoint(&self, backend: &str, url: &str, up: bool) {
        self.endpoint_up
            .with_label_values(&[backend, url])
            .set(i64::from(up));
    }

    /// The table's version, and whether routing fails open.
    pub fn table(&self, version: u64, failing_open: bool) {
        self.version.set(i64::try_from(version).unwrap_or(i64::MAX));
        self.failing_open.set(i64::from(failing_open));
    }

    /// Forgets every backend and endpoint, so that a scrape shows only those of the table
    /// being served.
    fn reset(&self) {
        self.weight.reset();
        self.effective_weight.reset();
        self.endpoint_up.reset();
    }
}

/// Mirroring's counters: what became of requests selected for a copy, what the comparisons
/// found, and how long copies took.
#[derive(Clone)]
pub struct MirrorMetrics {
    /// Indexed by [`MirrorResult::slot`]: resolved once, so a copy never looks a label up.
    requests: [IntCounter; 5],
    /// Identical, different.
    comparisons: [IntCounter; 2],
    duration: Histogram,
}

/// What became of a request mirroring looked at, as a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorResult {
    Copied,
    Skipped,
    Dropped,
    Error,
    Timeout,
}

impl MirrorResult {
    const ALL: [MirrorResult; 5] = [
        MirrorResult::Copied,
        MirrorResult::Skipped,
        MirrorResult::Dropped,
        MirrorResult::Error,
        MirrorResult::Timeout,
    ];

    fn slot(self) -> usize {
        match self {
            MirrorResult::Copied => 0,
            MirrorResult::Skipped => 1,
            MirrorResult::Dropped => 2,
            MirrorResult::Error => 3,
            MirrorResult::Timeout => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MirrorResult::Copied => "copied",
            MirrorResult::Skipped => "skipped",
            MirrorResult::Dropped => "dropped",
            MirrorResult::Error => "error",
            MirrorResult::Timeout => "timeout",
        }
    }
}

impl fmt::Debug for MirrorMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MirrorMetrics").finish_non_exhaustive()
    }
}

impl MirrorMetrics {
    fn new(r: &Registry) -> Self {
        let requests = int_counter_vec(
            r,
            "canary_mirror_requests_total",
            "Requests mirroring looked at, by result (copied; skipped: method, body or \
                 percent; dropped: max_in_flight copies running; error and timeout: copies \
                 that failed or were not answered whole in time).",
            &["result"],
        );
        let comparisons = int_counter_vec(
            r,
            "canary_mirror_comparisons_total",
            "Copies' answers compared with the served ones, by result (identical; \
                 different: a difference the noise filter reports).",
            &["result"],
        );
        MirrorMetrics {
            requests: MirrorResult::ALL.map(|r| requests.with_label_values(&[r.as_str()])),
            comparisons: ["identical", "different"].map(|r| comparisons.with_label_values(&[r])),
            duration: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "canary_mirror_duration_seconds",
                        "Time from a copy's start to its whole answer.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                )
                .expect("valid metric definition"),
            ),
        }
    }

    pub fn request(&self, result: MirrorResult) {
        self.requests[result.slot()].inc();
    }

    pub fn comparison(&self, different: bool) {
        self.comparisons[usize::from(different)].inc();
    }

    pub fn duration(&self, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// The rollout's metrics. Labels are the fixed names of states, events, metrics and verdicts.
pub struct RolloutMetrics {
    state: IntGaugeVec,
    step: IntGauge,
    canary_percent: IntGauge,
    verdicts: IntCounterVec,
    transitions: IntCounterVec,
    webhook_failures: IntCounter,
}

impl RolloutMetrics {
    fn new(r: &Registry) -> Self {
        let metrics = RolloutMetrics {
            state: int_gauge_vec(
                r,
                "canary_rollout_state",
                "1 for the state the progressive rollout is in, 0 for the others.",
                &["state"],
            ),
            step: int_gauge(
                r,
                "canary_rollout_step",
                "The rollout's current step, 0-based (an index into rollout.steps).",
            ),
            canary_percent: int_gauge(
                r,
                "canary_rollout_canary_percent",
                "The canary's percent of baseline + canary traffic the rollout has set.",
            ),
            verdicts: int_counter_vec(
                r,
                "canary_rollout_verdicts_total",
                "Rollout analysis verdicts, by metric (errors, latency) and verdict (pass, fail, \
                 inconclusive); one per metric every analysis interval.",
                &["metric", "verdict"],
            ),
            transitions: int_counter_vec(
                r,
                "canary_rollout_transitions_total",
                "Rollout transitions, by event (started, advanced, promoted, rolled_back, ...).",
                &["event"],
            ),
            webhook_failures: register(
                r,
                IntCounter::new(
                    "canary_rollout_webhook_failures_total",
                    "Rollout transitions the webhook did not accept (error or non-2xx answer).",
                )
                .expect("valid metric definition"),
            ),
        };
        for state in crate::rollout::State::ALL {
            metrics.state.with_label_values(&[state.as_str()]).set(0);
        }
        for event in crate::rollout::Event::ALL {
            metrics.transitions.with_label_values(&[event.as_str()]);
        }
        metrics
    }

    /// Shows where the rollout stands.
    pub fn show(&self, state: crate::rollout::State, step: usize, canary_percent: u32) {
        for other in crate::rollout::State::ALL {
            self.state
                .with_label_values(&[other.as_str()])
                .set(i64::from(other == state));
        }
        self.step.set(i64::try_from(step).unwrap_or(i64::MAX));
        self.canary_percent.set(i64::from(canary_percent));
    }

    pub fn verdict(&self, metric: &str, verdict: &str) {
        self.verdicts.with_label_values(&[metric, verdict]).inc();
    }

    pub fn transition(&self, event: crate::rollout::Event) {
        self.transitions.with_label_values(&[event.as_str()]).inc();
    }

    pub fn webhook_failed(&self) {
        self.webhook_failures.inc();
    }
}

impl BackendMetrics {
    fn new(name: &str, families: Arc<Families>, eager: bool) -> Self {
        let statuses = CACHED_STATUSES.map(|_| OnceLock::new()).collect();
        let series = BackendSeries {
            name: name.to_owned(),
            families,
            statuses,
            duration: OnceLock::new(),
            decisions: Default::default(),
            errors: Default::default(),
            faults: Default::default(),
            grpc: Default::default(),
        };
        if eager {
            series.duration();
            for reason in REASONS {
                series.decision(reason);
            }
            for kind in ERROR_KINDS {
                series.error(kind);
            }
            for kind in FAULT_KINDS {
                series.fault(kind);
            }
        }
        BackendMetrics {
            series: Arc::new(series),
        }
    }

    /// The backend label of this handle.
    pub fn name(&self) -> &str {
        &self.series.name
    }

    /// Counts one routing decision that chose this backend.
    pub fn decision(&self, reason: DecisionReason) {
        self.series.decision(reason).inc();
    }

    /// Counts one answered client request and observes its duration (arrival to response head).
    pub fn response(&self, status: StatusCode, elapsed: Duration) {
        self.series.status(status).inc();
        self.series.duration().observe(elapsed.as_secs_f64());
    }

    /// Counts one failed upstream attempt.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.series.error(kind).inc();
    }

    /// Counts one fault injected into a request routed to this backend.
    pub fn fault(&self, kind: FaultKind) {
        self.series.fault(kind).inc();
    }

    /// Counts one gRPC call's status.
    pub fn grpc_response(&self, status: GrpcStatusLabel) {
        let series = &self.series;
        series.grpc[usize::from(status.0)]
            .get_or_init(|| {
                series
                    .families
                    .grpc
                    .with_label_values(&[series.name.as_str(), status.as_str()])
            })
            .inc();
    }
}

impl BackendSeries {
    fn decision(&self, reason: DecisionReason) -> &IntCounter {
        self.decisions[reason_slot(reason)].get_or_init(|| {
            self.families
                .decisions
                .with_label_values(&[self.name.as_str(), reason.as_str()])
        })
    }

    fn error(&self, kind: UpstreamErrorKind) -> &IntCounter {
        self.errors[error_slot(kind)].get_or_init(|| {
            self.families
                .upstream_errors
                .with_label_values(&[self.name.as_str(), kind.as_str()])
        })
    }

    fn fault(&self, kind: FaultKind) -> &IntCounter {
        self.faults[kind.slot()].get_or_init(|| {
            self.families
                .faults
                .with_label_values(&[self.name.as_str(), kind.as_str()])
        })
    }

    fn duration(&self) -> &Histogram {
        self.duration.get_or_init(|| {
            self.families
                .duration
                .with_label_values(&[self.name.as_str()])
        })
    }

    fn status(&self, status: StatusCode) -> StatusCounter<'_> {
        let resolve = || {
            self.families
                .requests
                .with_label_values(&[self.name.as_str(), status.as_str()])
        };
        let slot = status
            .as_u16()
            .checked_sub(*CACHED_STATUSES.start())
            .and_then(|i| self.statuses.get(usize::from(i)));
        match slot {
            Some(slot) => StatusCounter::Cached(slot.get_or_init(resolve)),
            None => StatusCounter::Resolved(resolve()),
        }
    }
}

/// A status counter, borrowed from the cache or, for codes outside it, freshly resolved.
enum StatusCounter<'a> {
    Cached(&'a IntCounter),
    Resolved(IntCounter),
}

impl StatusCounter<'_> {
    fn inc(&self) {
        match self {
            StatusCounter::Cached(counter) => counter.inc(),
            StatusCounter::Resolved(counter) => counter.inc(),
        }
    }
}

impl fmt::Debug for BackendMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendMetrics")
            .field("backend", &self.series.name)
            .finish_non_exhaustive()
    }
}

/// The value of the sample `name{labels}` in `render` output, `labels` written exactly as the
/// encoder does (`backend="v1",status="200"`), or `None` when the series is absent.
#[cfg(test)]
pub(crate) fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let series = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map(|value| value.parse().expect("numeric sample"))
}

/// `[store]`'s gauges: is etcd reachable, which revision of the shared document is in force,
/// how late it arrived, and whether this replica leads the rollout.
pub struct StoreMetrics {
    up: IntGauge,
    revision: IntGauge,
    watch_lag: prometheus::Gauge,
    leader: IntGauge,
    refused: IntCounter,
}

impl StoreMetrics {
    fn new(r: &Registry) -> Self {
        StoreMetrics {
            up: int_gauge(
                r,
                "canary_store_up",
                "1 while this replica is connected to etcd and watching the shared document.",
            ),
            revision: int_gauge(
                r,
                "canary_store_revision",
                "The etcd revision of the shared document in force (the admin API's ETag).",
            ),
            watch_lag: register(
                r,
                prometheus::Gauge::new(
                    "canary_store_watch_lag_seconds",
                    "For the last document applied: when this replica applied it, less when \
                     its writer wrote it (by the two replicas' clocks).",
                )
                .expect("valid metric definition"),
            ),
            leader: int_gauge(
                r,
                "canary_rollout_leader",
                "1 while this replica leads the rollout (holds the leader key in etcd).",
            ),
            refused: register(
                r,
                IntCounter::new(
                    "canary_store_documents_refused_total",
                    "Shared documents this replica refused as invalid (the table in force stayed).",
                )
                .expect("valid metric definition"),
            ),
        }
    }

    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    pub fn set_revision(&self, revision: u64) {
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    pub fn set_watch_lag(&self, seconds: f64) {
        self.watch_lag.set(seconds);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn refused(&self) {
        self.refused.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn counter(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        metrics
            .registry
            .gather()
            .into_iter()
            .find(|family| family.name() == name)?
            .get_metric()
            .iter()
            .find(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|m| m.get_counter().get_value() as u64)
    }

    #[test]
    fn grpc_statuses_are_counted_under_a_bounded_label() {
        let metrics = Metrics::new();
        let v2 = metrics.backend("v2");
        assert_eq!(
            counter(&metrics, "canary_grpc_responses_total", &[]),
            None,
            "no series before a gRPC call"
        );
        v2.grpc_response(GrpcStatusLabel::of(14));
        v2.grpc_response(GrpcStatusLabel::of(14));
        v2.grpc_response(GrpcStatusLabel::of(0));
        v2.grpc_response(GrpcStatusLabel::of(17));
        v2.grpc_response(GrpcStatusLabel::of(u32::MAX));
        v2.grpc_response(GrpcStatusLabel::OTHER);
        let c = |code| {
            counter(
                &metrics,
                "canary_grpc_responses_total",
                &[("backend", "v2"), ("grpc_status", code)],
            )
        };
        assert_eq!(c("14"), Some(2));
        assert_eq!(c("0"), Some(1));
        assert_eq!(c("other"), Some(3));
        assert_eq!(GrpcStatusLabel::of(16).as_str(), "16");
    }

    #[test]
    fn counts_equal_the_calls_made() {
        let metrics = Metrics::new();
        let v1 = metrics.backend("v1");
        for _ in 0..3 {
            v1.decision(DecisionReason::Weight);
        }
        v1.decision(DecisionReason::Rule);
        v1.decision(DecisionReason::Sticky);
        v1.decision(DecisionReason::Fallback);
        v1.decision(DecisionReason::Fallback);
        v1.upstream_error(UpstreamErrorKind::Connect);
        v1.upstream_error(UpstreamErrorKind::Timeout);
        v1.upstream_error(UpstreamErrorKind::Timeout);
        for _ in 0..5 {
            v1.response(StatusCode::OK, Duration::from_millis(3));
        }
        v1.response(StatusCode::BAD_GATEWAY, Duration::from_secs(2));
        metrics
            .unrouted()
            .response(StatusCode::BAD_REQUEST, Duration::from_micros(100));
        metrics.config_reload(true);
        metrics.config_reload(false);
        metrics.config_reload(true);

        let c = |name, labels: &[(&str, &str)]| counter(&metrics, name, labels);
        let decisions = "canary_route_decisions_total";
        assert_eq!(
            c(decisions, &[("backend", "v1"), ("reason", "weight")]),
            Some(3)
        );
        assert_eq!(
            c(decisions, &[("backend", "v1"), ("reason", "rule")]),
            Some(1)
        );
        assert_eq!(
            c(decisions, &[("backend", "v1"), ("reason", "sticky")]),
            Some(1)
        );
        assert_eq!(
            c(decisions, &[("backend", "v1"), ("reason", "fallback")]),
            Some(2)
        );
        let errors = "canary_upstream_errors_total";
        assert_eq!(
            c(errors, &[("backend", "v1"), ("kind", "connect")]),
            Some(1)
        );
        assert_eq!(
            c(errors, &[("backend", "v1"), ("kind", "upstream")]),
            Some(0)
        );
        assert_eq!(
            c(errors, &[("backend", "v1"), ("kind", "timeout")]),
            Some(2)
        );
        let requests = "canary_requests_total";
        assert_eq!(
            c(requests, &[("backend", "v1"), ("status", "200")]),
            Some(5)
        );
        assert_eq!(
            c(requests, &[("backend", "v1"), ("status", "502")]),
            Some(1)
        );
        assert_eq!(
            c(requests, &[("backend", "none"), ("status", "400")]),
            Some(1)
        );
        assert_eq!(
            c("canary_config_reloads_total", &[("result", "success")]),
            Some(2)
        );
        assert_eq!(
            c("canary_config_reloads_total", &[("result", "failure")]),
            Some(1)
        );

        let text = metrics.render(|_| {});
        let duration = "canary_request_duration_seconds";
        assert_eq!(
            sample(&text, &format!("{duration}_count"), r#"backend="v1""#),
            Some(6.0)
        );
        assert_eq!(
            sample(&text, &format!("{duration}_sum"), r#"backend="v1""#),
            Some(2.015)
        );
        let bucket = format!("{duration}_bucket");
        assert_eq!(
            sample(&text, &bucket, r#"backend="v1",le="0.0025""#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, &bucket, r#"backend="v1",le="0.005""#),
            Some(5.0)
        );
        assert_eq!(sample(&text, &bucket, r#"backend="v1",le="1""#), Some(5.0));
        assert_eq!(
            sample(&text, &bucket, r#"backend="v1",le="2.5""#),
            Some(6.0)
        );
        assert_eq!(
            sample(&text, &bucket, r#"backend="v1",le="+Inf""#),
            Some(6.0)
        );
        assert_eq!(
            sample(&text, &format!("{duration}_count"), r#"backend="none""#),
            Some(1.0)
        );
    }

    #[test]
    fn handles_for_one_backend_share_series_and_unrouted_is_lazy() {
        let metrics = Metrics::new();
        let first = metrics.backend("v1");
        let again = metrics.backend("v1");
        first.response(StatusCode::OK, Duration::ZERO);
        again.response(StatusCode::OK, Duration::ZERO);
        first.clone().decision(DecisionReason::Weight);
        again.decision(DecisionReason::Weight);
        let text = metrics.render(|_| {});
        let requests = r#"backend="v1",status="200""#;
        assert_eq!(sample(&text, "canary_requests_total", requests), Some(2.0));
        let weight = r#"backend="v1",reason="weight""#;
        assert_eq!(
            sample(&text, "canary_route_decisions_total", weight),
            Some(2.0)
        );
        // A backend's decision and error series exist at 0 before any request...
        let fallback = r#"backend="v1",reason="fallback""#;
        assert_eq!(
            sample(&text, "canary_route_decisions_total", fallback),
            Some(0.0)
        );
        // ...but the unrouted handle exports nothing until the proxy answers a request itself.
        assert!(!text.contains(r#"backend="none""#), "{text}");
        assert_eq!(metrics.unrouted().name(), "none");
    }

    #[test]
    fn status_counters_are_cached_per_code_and_resolved_on_first_use() {
        let metrics = Metrics::new();
        let v1 = metrics.backend("v1");
        let cached = |code: u16| v1.series.statuses[usize::from(code - 100)].get().is_some();
        assert!(!cached(200) && !cached(599) && !cached(100));
        v1.response(StatusCode::OK, Duration::ZERO);
        v1.response(StatusCode::OK, Duration::ZERO);
        assert!(cached(200));
        assert!(!cached(404));
        let edge = |code| StatusCode::from_u16(code).expect("valid status");
        v1.response(edge(100), Duration::ZERO);
        v1.response(edge(599), Duration::ZERO);
        assert!(cached(100) && cached(599));
        assert_eq!(
            v1.series
                .statuses
                .iter()
                .filter(|s| s.get().is_some())
                .count(),
            3
        );
        // Beyond the standard range: still counted under its own code, just not cached.
        v1.response(edge(799), Duration::ZERO);
        v1.response(edge(799), Duration::ZERO);
        let c = |status| counter(&metrics, "canary_requests_total", &[("status", status)]);
        assert_eq!(c("200"), Some(2));
        assert_eq!(c("100"), Some(1));
        assert_eq!(c("599"), Some(1));
        assert_eq!(c("799"), Some(2));
        assert_eq!(c("404"), None);
    }

    #[test]
    fn in_flight_guard_counts_until_dropped() {
        let metrics = Metrics::new();
        let text = || metrics.render(|_| {});
        let in_flight = |text: &str| sample(text, "canary_in_flight_requests", "");
        assert_eq!(in_flight(&text()), Some(0.0));
        let a = metrics.in_flight();
        let b = metrics.in_flight();
        assert_eq!(in_flight(&text()), Some(2.0));
        drop(a);
        assert_eq!(in_flight(&text()), Some(1.0));
        // A request future dropped mid-flight (client disconnect) drops its guard with it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let guard = metrics.in_flight();
            let request = async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            };
            let cancelled = tokio::time::timeout(Duration::from_millis(1), request).await;
            assert!(cancelled.is_err());
        });
        assert_eq!(in_flight(&text()), Some(1.0));
        drop(b);
        assert_eq!(in_flight(&text()), Some(0.0));
    }

    #[test]
    fn render_has_help_and_type_for_every_metric() {
        let metrics = Metrics::new();
        let v1 = metrics.backend("v1");
        v1.response(StatusCode::OK, Duration::from_millis(1));
        let text = metrics.render(|gauges| {
            gauges.backend("v1", 90, 90);
            gauges.endpoint("v1", "http://127.0.0.1:8081", true);
            gauges.table(7, false);
        });
        for (name, kind) in [
            ("canary_requests_total", "counter"),
            ("canary_request_duration_seconds", "histogram"),
            ("canary_backend_weight", "gauge"),
            ("canary_backend_effective_weight", "gauge"),
            ("canary_endpoint_up", "gauge"),
            ("canary_upstream_errors_total", "counter"),
            ("canary_route_decisions_total", "counter"),
            ("canary_faults_injected_total", "counter"),
            ("canary_mirror_requests_total", "counter"),
            ("canary_mirror_comparisons_total", "counter"),
            ("canary_mirror_duration_seconds", "histogram"),
            ("canary_config_reloads_total", "counter"),
            ("canary_in_flight_requests", "gauge"),
            ("canary_table_version", "gauge"),
            ("canary_failing_open", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "no TYPE for {name}"
            );
        }
        assert_eq!(sample(&text, "canary_table_version", ""), Some(7.0));
        assert_eq!(
            sample(&text, "canary_config_reloads_total", r#"result="success""#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "canary_config_reloads_total", r#"result="failure""#),
            Some(0.0)
        );
    }

    #[test]
    fn metrics_of_two_proxies_are_independent() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.backend("v1").response(StatusCode::OK, Duration::ZERO);
        let c = |m: &Metrics| counter(m, "canary_requests_total", &[("backend", "v1")]);
        assert_eq!((c(&a), c(&b)), (Some(1), None));
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Metrics>();
        check::<BackendMetrics>();
        check::<InFlight>();
    }

    /// Hot-path cost of `response` + `decision`; prints the number, asserts nothing. Meaningful
    /// only in release: `cargo test --release --lib metrics::tests::hot_path_cost -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "timing, run in release"]
    fn hot_path_cost() {
        let metrics = Metrics::new();
        let v1 = metrics.backend("v1");
        let statuses = [
            StatusCode::OK,
            StatusCode::NOT_FOUND,
            StatusCode::OK,
            StatusCode::OK,
        ];
        let n = 10_000_000u32;
        let start = Instant::now();
        for i in 0..n {
            let i = std::hint::black_box(i);
            v1.decision(if i % 16 == 0 {
                DecisionReason::Sticky
            } else {
                DecisionReason::Weight
            });
            v1.response(
                statuses[i as usize % 4],
                Duration::from_micros(u64::from(i % 4096)),
            );
        }
        let per = start.elapsed().as_nanos() as f64 / f64::from(n);
        println!("response + decision: {per:.1} ns per request");
        let start = Instant::now();
        for i in 0..n {
            let _guard = std::hint::black_box(metrics.in_flight());
            std::hint::black_box(i);
        }
        let per = start.elapsed().as_nanos() as f64 / f64::from(n);
        println!("in_flight guard: {per:.1} ns per request");
    }
}
