//! The routing table, one immutable snapshot of backends, rules and sticky settings that each
//! request loads once, and the decision of which backend serves a request.
//!
//! The decision follows the product contract: rules in order (the first match pins the request
//! to its backend, whatever that backend's weight, unless it is unhealthy); then the user's
//! sticky bucket; then a weighted random pick. Only backends with weight > 0 and at least one
//! healthy endpoint are eligible; when none is, the proxy fails open over the configured weights.
//!
//! Endpoint health is the one piece of live state: an `EndpointHealth` (atomics) per endpoint,
//! shared by every snapshot that contains the endpoint, so the health checker never has to
//! rebuild the table, and neither an admin change nor a reload loses health it did not know
//! about (a reload keeps every endpoint whose URL is unchanged). A decision picks the backend
//! and its endpoint from one reading of health: the endpoint it returns is one it saw healthy,
//! unless it fails open.
//!
//! - `sticky`: the FNV-1a user buckets, and where the user id is read from.
//! - `health`: each endpoint's [`EndpointHealth`]: the active check's verdict and passive
//!   ejection. The probes that feed it run in `control::health`.

pub mod fault;
pub mod health;
pub mod sticky;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue};
use rand::{Rng, RngExt};

use crate::config::{
    AccessLog, BackendConfig, BackendTls, Config, EndpointUrl, HealthCheckConfig, MirrorConfig,
    OutlierConfig, RuleConfig, RuleMatcher, RuleSource,
};
use crate::duration::format_duration;
use crate::id;
use crate::metrics::{BackendMetrics, DecisionReason, Metrics, TableGauges};
use crate::mirror::copy::{Carried, Mirror};
use crate::rollout::VersionMeter;
use crate::upstream::{ExchangeTimeouts, Peer, PeerTls, Upstream, UpstreamSettings};
use fault::Fault;
use health::{EndpointHealth, EndpointStatus};
use sticky::{BUCKETS, StickyCookie, StickySettings};

/// The bit of backend `index` in a backend set; none for an index past `MAX_BACKENDS`, which
/// validation rejects.
fn bit(index: usize) -> u64 {
    1u64.checked_shl(index as u32).unwrap_or(0)
}

/// The shared routing table: each request loads it once; the control plane swaps it with one
/// store.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

/// One snapshot of everything routing needs. Never mutated: a change builds a new table and
/// swaps it in with one store.
#[derive(Debug)]
pub struct RoutingTable {
    /// Bumped by every change; the admin API returns it as the `ETag`.
    pub version: u64,
    /// In declaration order, which is also the order of sticky bucket ranges.
    pub backends: Vec<Backend>,
    /// Tried in order before sticky buckets and weights.
    pub rules: Vec<Rule>,
    pub sticky: StickySettings,
    /// The timeouts of an exchange with an upstream, by phase.
    pub timeouts: ExchangeTimeouts,
    /// Response header naming the backend that served, or `None` when disabled.
    pub backend_header: Option<HeaderName>,
    /// Copies of requests sent to a backend and compared, when mirroring is on.
    pub mirror: Option<Arc<Mirror>>,
    /// Each request is written to the access log (`[log] access = "json"`): read here, with
    /// the table a request loads anyway, so a reload turns it on or off.
    pub access_log: bool,
    /// Bit i is set when backend i has a weight above zero.
    weighted: u64,
    /// End of each backend's sticky bucket range while every weighted backend is eligible
    /// (the usual case), computed once so that a decision needs no division.
    all_eligible_ends: Box<[u64]>,
}

/// One version of the service (v1, v2, ...) and the endpoints that run it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    /// `name` as a header value, built once for `x-canary-backend`.
    pub name_value: HeaderValue,
    pub weight: u32,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// How requests reach this backend's endpoints (connect and idle timeouts); each endpoint
    /// holds its own idle connections.
    pub upstream: Upstream,
    /// This backend's metric handles, resolved once so requests never look labels up.
    pub metrics: BackendMetrics,
    pub health: Option<HealthCheckConfig>,
    /// Requests, errors and latencies for the rollout's analysis, when this backend is its
    /// baseline or canary; shared with the tables derived from this one.
    pub meter: Option<Arc<VersionMeter>>,
    /// The fault injected into this backend's requests (a drill), if any.
    pub fault: Option<Arc<Fault>>,
    /// `[backend.tls]`, which its `https://` endpoints' connections were made with.
    pub tls: Option<BackendTls>,
    /// Round-robin cursor over `endpoints`, shared with the tables derived from this one.
    cursor: Arc<AtomicUsize>,
}

/// One instance of a backend.
#[derive(Debug)]
pub struct Endpoint {
    /// Where requests go (URL, `host:port`) and the idle keep-alive connections there, which
    /// the upstream side owns; kept with the endpoint across table changes.
    pub peer: Arc<Peer>,
    /// Active check verdict and passive ejection, shared by every table holding this endpoint.
    pub health: EndpointHealth,
}

/// A configured rule, resolved to the backend it pins requests to.
#[derive(Debug, Clone)]
pub struct Rule {
    pub source: RuleSource,
    pub matcher: RuleMatcher,
    pub backend: usize,
}

/// Which backend serves a request, which of its endpoints, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub backend: usize,
    /// Index into the backend's `endpoints`: one the decision saw healthy, or while failing
    /// open the next in turn.
    pub endpoint: usize,
    pub reason: Reason,
    /// A new anonymous user id, drawn for this request (no user id, a sticky cookie set): its
    /// bucket picked the backend, and the response gives it to the client.
    pub new_user: Option<id::Id>,
}

/// Why a backend was chosen; bounded, so it can be a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Rule number n (0-based) matched.
    Rule(usize),
    /// The user's sticky bucket falls in the backend's range.
    Sticky(u32),
    /// Weighted random pick.
    Weight,
    /// Nothing eligible was healthy: routed by configured weights, ignoring health.
    Fallback,
}

impl Reason {
    /// The label used in metrics and logs.
    pub fn as_str(&self) -> &'static str {
        self.label().as_str()
    }

    /// The reason as a metric label: without the rule number or the bucket.
    #[inline]
    pub fn label(&self) -> DecisionReason {
        match self {
            Reason::Rule(_) => DecisionReason::Rule,
            Reason::Sticky(_) => DecisionReason::Sticky,
            Reason::Weight => DecisionReason::Weight,
            Reason::Fallback => DecisionReason::Fallback,
        }
    }
}

impl Endpoint {
    /// A new endpoint starts up and not ejected; `outlier` sets when failed requests eject it;
    /// `tls` for an `https://` one.
    pub fn new(
        url: String,
        authority: Authority,
        outlier: OutlierConfig,
        tls: Option<PeerTls>,
    ) -> Self {
        let health = EndpointHealth::new(&url, outlier);
        Endpoint {
            peer: Arc::new(Peer::new(url, authority, tls)),
            health,
        }
    }

    /// The URL as configured, for logs, metrics and the admin API.
    pub fn url(&self) -> &str {
        &self.peer.url
    }

    /// `host:port` that requests are sent to.
    pub fn authority(&self) -> &Authority {
        &self.peer.authority
    }

    /// True when routing may send requests here: up by the active check and not ejected.
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.health.is_healthy()
    }

    /// Forces the active check's verdict (tests, operator overrides); a running check
    /// replaces it at its next probe.
    pub fn set_healthy(&self, healthy: bool) {
        self.health.set_active(healthy);
    }

    /// Passive health: the outcome of one forwarded request (`false` for a connect failure,
    /// a sent-but-failed request, a timeout or a 5xx). Enough failures in a row eject the
    /// endpoint for a cool-down.
    #[inline]
    pub fn record_outcome(&self, success: bool) {
        self.health.record_outcome(success);
    }

    /// The endpoint's health as the admin API and metrics show it.
    pub fn status(&self) -> EndpointStatus {
        self.health.status()
    }
}

/// How an endpoint's connections are secured: `https://` ones with the backend's TLS config
/// (config validation made sure each has a name to verify).
fn peer_tls(endpoint: &EndpointUrl, tls: Option<&BackendTls>) -> Option<PeerTls> {
    let tls = tls.filter(|_| endpoint.tls)?;
    PeerTls::new(
        tls.client.clone(),
        tls.server_name.as_ref(),
        &endpoint.authority,
    )
    .inspect_err(|error| tracing::error!(endpoint = %endpoint.url, %error, "no TLS name"))
    .ok()
}

impl Backend {
    /// True when at least one endpoint is healthy.
    pub fn is_healthy(&self) -> bool {
        self.endpoints.iter().any(|e| e.is_healthy())
    }

    /// The next endpoint in turn, skipping unhealthy ones and `avoid`. When no endpoint is
    /// healthy (the fail-open case), endpoints are used in turn regardless of health.
    pub fn pick_endpoint(&self, avoid: Option<&Endpoint>) -> Option<&Arc<Endpoint>> {
        self.pick(avoid).map(|(index, _)| &self.endpoints[index])
    }

    /// [`pick_endpoint`](Self::pick_endpoint) by index, turning `cursor` instead of the
    /// backend's own (mirroring's copies must not move the served requests' round robin).
    pub fn pick_endpoint_with(
        &self,
        cursor: &AtomicUsize,
        avoid: Option<&Endpoint>,
    ) -> Option<usize> {
        self.pick_from(cursor, avoid).map(|(index, _)| index)
    }

    /// The next endpoint in turn (round robin) that is healthy and not `avoid`: `(index, true)`.
    /// When there is none, the next one in turn that is not `avoid`: `(index, false)`. Each
    /// endpoint's health is read once, so `true` means this call saw it healthy.
    fn pick(&self, avoid: Option<&Endpoint>) -> Option<(usize, bool)> {
        self.pick_from(&self.cursor, avoid)
    }

    fn pick_from(&self, cursor: &AtomicUsize, avoid: Option<&Endpoint>) -> Option<(usize, bool)> {
        let count = self.endpoints.len();
        if count == 0 {
            return None;
        }
        let start = cursor.fetch_add(1, Ordering::Relaxed) % count;
        let mut unhealthy = None;
        for k in 0..count {
            let index = (start + k) % count;
            let endpoint = &self.endpoints[index];
            if avoid.is_some_and(|a| std::ptr::eq(a, endpoint.as_ref())) {
                continue;
            }
            if endpoint.is_healthy() {
                return Some((index, true));
            }
            unhealthy.get_or_insert(index);
        }
        unhealthy.map(|index| (index, false))
    }
}

impl Rule {
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        match &self.source {
            RuleSource::Header(name) => headers
                .get_all(name)
                .iter()
                .any(|value| matcher_accepts(&self.matcher, value.as_bytes())),
            RuleSource::Cookie(name) => sticky::cookie(headers, name)
                .is_some_and(|value| matcher_accepts(&self.matcher, value)),
        }
    }
}

fn matcher_accepts(matcher: &RuleMatcher, value: &[u8]) -> bool {
    match matcher {
        RuleMatcher::Equals(expected) => value == expected.as_bytes(),
        RuleMatcher::Matches(regex) => std::str::from_utf8(value).is_ok_and(|v| regex.is_match(v)),
        RuleMatcher::Present => true,
    }
}

impl RoutingTable {
    /// Builds a table from a validated config. Endpoints whose backend name and URL are
    /// unchanged from `previous` are kept as they are (health, idle connections), whatever
    /// else the new config changes; the rest start up, not ejected, with no connections.
    pub fn from_config(
        config: &Config,
        version: u64,
        previous: Option<&RoutingTable>,
        metrics: &Metrics,
    ) -> Self {
        let settings = UpstreamSettings {
            connect_timeout: config.proxy.connect_timeout,
            idle_timeout: config.proxy.upstream_idle_timeout,
            protocol: Default::default(),
        };
        let backends = config
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let old = previous.and_then(|t| t.backend(&b.name));
                let mut backend = Backend::from_config(b, settings, old, metrics);
                // The rollout's two versions are measured for its analysis; a version keeps
                // its meter across reloads.
                let measured = config
                    .rollout
                    .as_ref()
                    .is_some_and(|r| r.baseline == i || r.canary == i);
                backend.meter = measured.then(|| {
                    old.and_then(|b| b.meter.clone())
                        .unwrap_or_else(|| Arc::new(VersionMeter::default()))
                });
                backend.fault = config
                    .faults
                    .iter()
                    .find(|f| f.backend == b.name)
                    .map(|f| Arc::new(Fault::new(f.clone())));
                backend
            })
            .collect();
        let rules = config.rules.iter().map(Rule::from_config).collect();
        let mut table = RoutingTable::assemble(
            version,
            backends,
            rules,
            StickySettings {
                header: config.proxy.user_id_header.clone(),
                cookie: config.proxy.user_id_cookie.clone(),
                salt: config.proxy.sticky_salt.clone(),
                anonymous: config
                    .proxy
                    .sticky_cookie
                    .clone()
                    .map(|name| StickyCookie::new(name, config.proxy.sticky_cookie_max_age)),
            },
            ExchangeTimeouts {
                client_body: config.proxy.client_body_timeout,
                request: config.proxy.request_timeout,
                read: config.proxy.read_timeout,
            },
            config.proxy.backend_header.clone(),
        );
        table.mirror = config.mirror.clone().and_then(|mirror| {
            let carried = previous
                .and_then(|t| t.mirror.as_ref())
                .map(|m| m.carried())
                .unwrap_or_default();
            table.build_mirror(mirror, carried, metrics).map(Arc::new)
        });
        table.access_log = config.log.access == AccessLog::Json;
        table
    }

    fn assemble(
        version: u64,
        backends: Vec<Backend>,
        rules: Vec<Rule>,
        sticky: StickySettings,
        timeouts: ExchangeTimeouts,
        backend_header: Option<HeaderName>,
    ) -> Self {
        let weighted = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.weight > 0)
            .fold(0u64, |mask, (i, _)| mask | bit(i));
        let mut table = RoutingTable {
            version,
            backends,
            rules,
            sticky,
            timeouts,
            backend_header,
            weighted,
            all_eligible_ends: Box::default(),
            mirror: None,
            access_log: false,
        };
        table.all_eligible_ends = table.bucket_ends(weighted);
        table
    }

    /// A copy of this table with `mirror` in force (or none), at `version`.
    pub fn with_mirror(&self, mirror: Option<Arc<Mirror>>, version: u64) -> Self {
        let mut table = self.with_backends(version, |_| {});
        table.mirror = mirror;
        table
    }

    /// Mirroring as `config` says, in this table: its backends resolved (`None` when one is
    /// not in the table), pools of its own for every endpoint, and what it `carried` from the
    /// mirroring it replaces.
    pub fn build_mirror(
        &self,
        config: MirrorConfig,
        carried: Carried,
        metrics: &Metrics,
    ) -> Option<Mirror> {
        let backend = self
            .backends
            .iter()
            .position(|b| b.name == config.backend)?;
        let from = match &config.from {
            Some(name) => Some(self.backends.iter().position(|b| &b.name == name)?),
            None => None,
        };
        let endpoints = self
            .backends
            .iter()
            .map(|b| {
                b.endpoints
                    .iter()
                    .map(|e| {
                        let tls = e.peer.tls.clone();
                        (e.url().to_owned(), e.authority().clone(), tls)
                    })
                    .collect()
            })
            .collect();
        let settings = self
            .backends
            .iter()
            .map(|b| b.upstream.settings())
            .collect();
        Some(Mirror::new(
            config,
            (backend, from),
            endpoints,
            settings,
            carried,
            metrics.mirror.clone(),
        ))
    }

    /// A copy of this table with some weights changed (same pools, same endpoints).
    pub fn with_weights(&self, weights: &[(usize, u32)], version: u64) -> Self {
        self.with_backends(version, |backends| {
            for &(index, weight) in weights {
                backends[index].weight = weight;
            }
        })
    }

    /// A copy of this table with `faults` in force, indexed like `backends` (same pools,
    /// same endpoints, same weights).
    pub fn with_faults(&self, faults: Vec<Option<Arc<Fault>>>, version: u64) -> Self {
        self.with_backends(version, |backends| {
            for (backend, fault) in backends.iter_mut().zip(faults) {
                backend.fault = fault;
            }
        })
    }

    /// A copy of this table with `rules` in place of its own (same backends).
    pub fn with_rules(&self, rules: &[RuleConfig], version: u64) -> Self {
        let mut table = self.with_backends(version, |_| {});
        table.rules = rules.iter().map(Rule::from_config).collect();
        table
    }

    /// A copy of this table at `version` (its mirroring too), its backends changed by
    /// `change`.
    fn with_backends(&self, version: u64, change: impl FnOnce(&mut [Backend])) -> Self {
        let mut backends = self.backends.clone();
        change(&mut backends);
        let mut table = RoutingTable::assemble(
            version,
            backends,
            self.rules.clone(),
            self.sticky.clone(),
            self.timeouts,
            self.backend_header.clone(),
        );
        table.mirror = self.mirror.clone();
        table.access_log = self.access_log;
        table
    }

    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// Bit i is set when backend i has at least one healthy endpoint.
    fn healthy_mask(&self) -> u64 {
        self.backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_healthy())
            .fold(0u64, |mask, (i, _)| mask | bit(i))
    }

    /// The backends weighted routing may use given the `healthy` set: the eligible ones
    /// (healthy, weight > 0), or, when none is, every weighted one (fail-open, `true`).
    fn routable(&self, healthy: u64) -> (u64, bool) {
        let eligible = healthy & self.weighted;
        if eligible != 0 {
            (eligible, false)
        } else {
            (self.weighted, true)
        }
    }

    /// The sticky bucket range `[start, end)` each backend owns by its configured weight, as
    /// when every backend is healthy (what `check` and the admin API show).
    pub fn configured_bucket_ranges(&self) -> Vec<(u64, u64)> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        let mut cumulative = 0u64;
        self.backends
            .iter()
            .map(|b| {
                let start = u64::from(BUCKETS) * cumulative / total.max(1);
                cumulative += u64::from(b.weight);
                (start, u64::from(BUCKETS) * cumulative / total.max(1))
            })
            .collect()
    }

    /// Decides which backend and endpoint serve a request with these headers. `None` only when
    /// the table has no weighted backend, which validation and the admin API rule out.
    ///
    /// Health is read once per endpoint for the decision, and the endpoint returned is one
    /// the decision saw healthy. Health may change while the decision is made: a backend found
    /// with no healthy endpoint left when its endpoint is picked is then treated as unhealthy
    /// and the decision is made again without it (a rule falls through, its share goes to the
    /// others); only when no weighted backend is healthy does the request fail open to an
    /// endpoint regardless of health (reason `Fallback`).
    pub fn route(&self, headers: &HeaderMap, rng: &mut impl Rng) -> Option<Decision> {
        self.route_from(self.healthy_mask(), headers, rng)
    }

    /// [`route`](Self::route), given the set of backends that had a healthy endpoint when the
    /// decision began.
    fn route_from(
        &self,
        mut healthy: u64,
        headers: &HeaderMap,
        rng: &mut impl Rng,
    ) -> Option<Decision> {
        // Each pass either returns or clears the bit of a backend in `healthy` (a decision
        // that is not a fallback only picks backends in it), so this ends within
        // `backends.len() + 1` passes; the last possible one fails open, which always returns.
        // A new anonymous id is drawn once, by the first pass that needs it.
        let mut new_user = None;
        loop {
            let (backend, reason) = self.decide(headers, healthy, &mut new_user, rng)?;
            let fallback = reason == Reason::Fallback;
            match self.backends[backend].pick(None) {
                Some((endpoint, seen_healthy)) if seen_healthy || fallback => {
                    return Some(Decision {
                        backend,
                        endpoint,
                        reason,
                        new_user,
                    });
                }
                None if fallback => return None,
                _ => healthy &= !bit(backend),
            }
        }
    }

    /// The backend for a request given the set of `healthy` backends: rules, sticky bucket,
    /// weighted pick, or the fail-open pick when nothing eligible is healthy. A request with
    /// no user id, when the table has a sticky cookie, gets a new id in `new_user` (unless a
    /// rule pins it) and is bucketed by it.
    fn decide(
        &self,
        headers: &HeaderMap,
        healthy: u64,
        new_user: &mut Option<id::Id>,
        rng: &mut impl Rng,
    ) -> Option<(usize, Reason)> {
        for (n, rule) in self.rules.iter().enumerate() {
            if healthy & bit(rule.backend) != 0 && rule.matches(headers) {
                return Some((rule.backend, Reason::Rule(n)));
            }
        }
        let (mask, fallback) = self.routable(healthy);
        let bucket = self.sticky.bucket_of(headers).or_else(|| {
            self.sticky.anonymous.as_ref()?;
            let id = *new_user.get_or_insert_with(|| id::random(rng));
            Some(self.sticky.bucket_of_new(id))
        });
        let (backend, reason) = match bucket {
            Some(bucket) => (self.bucket_owner(mask, bucket)?, Reason::Sticky(bucket)),
            None => (self.weighted_pick(mask, rng)?, Reason::Weight),
        };
        Some((backend, if fallback { Reason::Fallback } else { reason }))
    }

    /// Another place to send a request whose connection to `failed` could not be made: another
    /// healthy endpoint of the same backend, else an eligible backend by weight (while failing
    /// open, any other weighted backend). As in [`route`](Self::route), the endpoint returned
    /// is one seen healthy unless nothing weighted is.
    pub fn alternative(
        &self,
        backend: usize,
        failed: &Endpoint,
        rng: &mut impl Rng,
    ) -> Option<(usize, &Arc<Endpoint>)> {
        let same = &self.backends[backend];
        if let Some((endpoint, true)) = same.pick(Some(failed)) {
            return Some((backend, &same.endpoints[endpoint]));
        }
        let mut healthy = self.healthy_mask();
        // Ends as `route` does: each pass returns or clears a bit of `healthy`.
        loop {
            // The same set `route` uses: eligible backends, or while failing open all weighted
            // ones.
            let (pool, fallback) = self.routable(healthy);
            let other = self.weighted_pick(pool & !bit(backend), rng)?;
            let candidate = &self.backends[other];
            match candidate.pick(None) {
                Some((endpoint, seen_healthy)) if seen_healthy || fallback => {
                    return Some((other, &candidate.endpoints[endpoint]));
                }
                None if fallback => return None,
                _ => healthy &= !bit(other),
            }
        }
    }

    /// The weight each backend receives right now (same order as `backends`): its configured
    /// weight when eligible, 0 when not; when nothing is eligible (fail-open), the configured
    /// weights. Rules are not counted: they pin requests whatever the weights.
    pub fn effective_weights(&self) -> Vec<u32> {
        let (mask, _) = self.routable(self.healthy_mask());
        (0..self.backends.len())
            .map(|i| {
                let counted = mask & bit(i) != 0;
                if counted { self.backends[i].weight } else { 0 }
            })
            .collect()
    }

    /// True when no weighted backend is healthy, so routing fails open.
    pub fn is_failing_open(&self) -> bool {
        self.routable(self.healthy_mask()).1
    }

    /// Sets the gauges of a metrics scrape from this table: each backend's configured and
    /// effective weight, each endpoint's health, the version, and whether routing fails open.
    pub fn export_gauges(&self, gauges: &TableGauges) {
        let effective = self.effective_weights();
        for (backend, effective) in self.backends.iter().zip(effective) {
            gauges.backend(&backend.name, backend.weight, effective);
            for endpoint in &backend.endpoints {
                gauges.endpoint(&backend.name, endpoint.url(), endpoint.is_healthy());
            }
        }
        gauges.table(self.version, self.is_failing_open());
    }

    fn members(&self, mask: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.backends
            .iter()
            .enumerate()
            .filter(move |(i, _)| mask & bit(*i) != 0)
            .map(|(i, b)| (i, u64::from(b.weight)))
    }

    fn total_weight(&self, mask: u64) -> u64 {
        self.members(mask).map(|(_, w)| w).sum()
    }

    /// The backend whose range holds `bucket`: backend i of the set owns
    /// `[floor(10000*C(i-1)/T), floor(10000*C(i)/T))`.
    fn bucket_owner(&self, mask: u64, bucket: u32) -> Option<usize> {
        let bucket = u64::from(bucket);
        if mask == self.weighted {
            let ends = &self.all_eligible_ends;
            return self
                .members(mask)
                .find_map(|(i, _)| (bucket < ends[i]).then_some(i));
        }
        let total = self.total_weight(mask);
        if total == 0 {
            return None;
        }
        let mut cumulative = 0;
        self.members(mask).find_map(|(i, weight)| {
            cumulative += weight;
            (bucket < u64::from(BUCKETS) * cumulative / total).then_some(i)
        })
    }

    /// The end of each backend's bucket range when `mask` is the set of eligible backends
    /// (backends outside it own nothing: their end repeats the previous one).
    fn bucket_ends(&self, mask: u64) -> Box<[u64]> {
        let total = self.total_weight(mask).max(1);
        let mut cumulative = 0;
        self.backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if mask & bit(i) != 0 {
                    cumulative += u64::from(b.weight);
                }
                u64::from(BUCKETS) * cumulative / total
            })
            .collect()
    }

    fn weighted_pick(&self, mask: u64, rng: &mut impl Rng) -> Option<usize> {
        let total = self.total_weight(mask);
        if total == 0 {
            return None;
        }
        let point = rng.random_range(0..total);
        let mut cumulative = 0;
        self.members(mask).find_map(|(i, weight)| {
            cumulative += weight;
            (point < cumulative).then_some(i)
        })
    }
}

impl Backend {
    /// A backend built from its config. Endpoints of `old` (the backend of the same name in
    /// the table being replaced) whose URL is unchanged are kept, with their health (active
    /// verdict, probe streak, ejection), their idle connections and the round-robin cursor,
    /// whatever else changed: connection settings apply to the next connection taken from
    /// or put into a pool, so nothing is lost by keeping them.
    fn from_config(
        config: &BackendConfig,
        settings: UpstreamSettings,
        old: Option<&Backend>,
        metrics: &Metrics,
    ) -> Self {
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| {
                // An endpoint whose TLS settings changed starts afresh: its idle connections
                // were made with the old ones.
                let kept = old
                    .filter(|b| b.tls == config.tls)
                    .and_then(|b| b.endpoints.iter().find(|o| o.url() == e.url));
                if let Some(kept) = kept {
                    // Same endpoint, same health state; only the outlier settings may change.
                    kept.health.set_outlier(config.outlier);
                    return kept.clone();
                }
                Arc::new(Endpoint::new(
                    e.url.clone(),
                    e.authority.clone(),
                    config.outlier,
                    peer_tls(e, config.tls.as_ref()),
                ))
            })
            .collect();
        Backend {
            name: config.name.clone(),
            name_value: HeaderValue::from_str(&config.name)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
            weight: config.weight,
            endpoints,
            upstream: Upstream::new(UpstreamSettings {
                protocol: config.protocol,
                ..settings
            }),
            metrics: metrics.backend(&config.name),
            health: config.health.clone(),
            cursor: old.map_or_else(Arc::default, |b| b.cursor.clone()),
            meter: None,
            fault: None,
            tls: config.tls.clone(),
        }
    }
}

impl Rule {
    fn from_config(config: &RuleConfig) -> Self {
        Rule {
            source: config.source.clone(),
            matcher: config.matcher.clone(),
            backend: config.backend,
        }
    }
}

/// The effective table as `canary-proxy check` prints it.
impl fmt::Display for RoutingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        writeln!(f, "backends (sticky buckets 0..{BUCKETS}):")?;
        for (b, (start, end)) in self.backends.iter().zip(self.configured_bucket_ranges()) {
            let share = 100.0 * b.weight as f64 / total.max(1) as f64;
            write!(f, "  {:<12} weight {:>5} ({share:5.1}%)", b.name, b.weight)?;
            if b.weight > 0 {
                write!(f, "  buckets [{start}, {end})")?;
            }
            writeln!(f)?;
            for e in &b.endpoints {
                writeln!(f, "    -> {}", e.url())?;
            }
            if b.upstream.is_h2() {
                let protocol = b.upstream.settings().protocol;
                writeln!(f, "    protocol: {}", protocol.as_str())?;
            }
            if let Some(h) = &b.health {
                writeln!(
                    f,
                    "    health: GET {} every {}, timeout {}, down after {} failures, up after {} passes",
                    h.path,
                    format_duration(h.interval),
                    format_duration(h.timeout),
                    h.unhealthy_threshold,
                    h.healthy_threshold
                )?;
            }
            if let Some(fault) = &b.fault {
                writeln!(f, "    fault drill: {}", fault.config)?;
            }
        }
        writeln!(f, "rules (first match wins):")?;
        if self.rules.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for (n, r) in self.rules.iter().enumerate() {
            let source = match &r.source {
                RuleSource::Header(h) => format!("header {h}"),
                RuleSource::Cookie(c) => format!("cookie {c}"),
            };
            let matcher = match &r.matcher {
                RuleMatcher::Equals(v) => format!("equals {v:?}"),
                RuleMatcher::Matches(re) => format!("matches /{}/", re.as_str()),
                RuleMatcher::Present => "is present".to_string(),
            };
            writeln!(
                f,
                "  {n}: {source} {matcher} -> {}",
                self.backends[r.backend].name
            )?;
        }
        write!(f, "sticky: ")?;
        let anonymous = self.sticky.anonymous.as_ref();
        match (&self.sticky.header, &self.sticky.cookie, anonymous) {
            (None, None, None) => writeln!(
                f,
                "off (no user_id_header, user_id_cookie or sticky_cookie)"
            )?,
            (header, cookie, anonymous) => {
                let from = [
                    header.as_ref().map(|h| format!("header {h}")),
                    cookie.as_ref().map(|c| format!("cookie {c}")),
                    anonymous.map(|a| {
                        format!(
                            "sticky cookie {} (new visitors get one, max age {})",
                            a.name,
                            format_duration(a.max_age)
                        )
                    }),
                ];
                let from: Vec<_> = from.into_iter().flatten().collect();
                writeln!(
                    f,
                    "user id from {}, salt {:?}",
                    from.join(", then "),
                    self.sticky.salt
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::sticky::bucket;
    use super::*;
    use http::header::COOKIE;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::time::Duration;

    fn table(weights: &[u32], rules: Vec<Rule>, sticky: StickySettings) -> RoutingTable {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Backend {
                name: format!("v{}", i + 1),
                name_value: HeaderValue::from_static("v"),
                weight,
                endpoints: vec![
                    Arc::new(Endpoint::new(
                        format!("http://10.0.0.{i}:1"),
                        "a:1".parse().unwrap(),
                        OutlierConfig::default(),
                        None,
                    )),
                    Arc::new(Endpoint::new(
                        format!("http://10.0.0.{i}:2"),
                        "a:2".parse().unwrap(),
                        OutlierConfig::default(),
                        None,
                    )),
                ],
                upstream: Upstream::new(UpstreamSettings {
                    connect_timeout: Duration::from_secs(1),
                    idle_timeout: Duration::from_secs(1),
                    protocol: Default::default(),
                }),
                metrics: Metrics::new().backend("v"),
                health: None,
                cursor: Arc::default(),
                meter: None,
                fault: None,
                tls: None,
            })
            .collect();
        let second = Duration::from_secs(1);
        let timeouts = ExchangeTimeouts {
            client_body: second,
            request: second,
            read: second,
        };
        RoutingTable::assemble(1, backends, rules, sticky, timeouts, None)
    }

    fn user_sticky() -> StickySettings {
        StickySettings {
            header: Some(HeaderName::from_static("x-user-id")),
            cookie: Some("uid".into()),
            salt: String::new(),
            anonymous: None,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn set_backend_health(table: &RoutingTable, backend: usize, healthy: bool) {
        for e in &table.backends[backend].endpoints {
            e.set_healthy(healthy);
        }
    }

    /// The backend and reason of a decision (its endpoint rotates from one call to the next).
    fn served(d: Decision) -> (usize, Reason) {
        (d.backend, d.reason)
    }

    fn rule(source: RuleSource, matcher: RuleMatcher, backend: usize) -> Rule {
        Rule {
            source,
            matcher,
            backend,
        }
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let t = table(&[90, 10], vec![], StickySettings::default());
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0u32; 2];
        for _ in 0..100_000 {
            let d = t.route(&HeaderMap::new(), &mut rng).unwrap();
            assert_eq!(d.reason, Reason::Weight);
            counts[d.backend] += 1;
        }
        assert!((9_500..=10_500).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn zero_weight_backend_gets_no_weighted_traffic() {
        let t = table(&[0, 5, 0], vec![], StickySettings::default());
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            assert_eq!(t.route(&HeaderMap::new(), &mut rng).unwrap().backend, 1);
        }
    }

    #[test]
    fn bucket_ranges_follow_the_formula() {
        let t = table(&[1, 2], vec![], StickySettings::default());
        // T = 3: v1 owns [0, 3333), v2 owns [3333, 10000).
        assert_eq!(t.bucket_owner(0b11, 0), Some(0));
        assert_eq!(t.bucket_owner(0b11, 3332), Some(0));
        assert_eq!(t.bucket_owner(0b11, 3333), Some(1));
        assert_eq!(t.bucket_owner(0b11, 9999), Some(1));
        let t = table(&[90, 0, 10], vec![], StickySettings::default());
        assert_eq!(t.bucket_owner(0b101, 8999), Some(0));
        assert_eq!(t.bucket_owner(0b101, 9000), Some(2));
    }

    #[test]
    fn sticky_users_stay_and_only_move_to_the_canary_as_it_grows() {
        let mut previous: Vec<usize> = Vec::new();
        for canary in [0u32, 1, 5, 10, 25, 50, 75, 99, 100] {
            let t = table(&[100 - canary, canary], vec![], user_sticky());
            let mut rng = StdRng::seed_from_u64(3);
            let now: Vec<usize> = (0..2000)
                .map(|u| {
                    let h = headers(&[("x-user-id", &format!("user-{u}"))]);
                    let a = t.route(&h, &mut rng).unwrap();
                    let b = t.route(&h, &mut rng).unwrap();
                    assert_eq!(served(a), served(b), "same user, same table, same answer");
                    assert!(matches!(a.reason, Reason::Sticky(_)));
                    a.backend
                })
                .collect();
            for (was, is) in previous.iter().zip(&now) {
                assert!(
                    !(*was == 1 && *is == 0),
                    "a user moved back from the canary"
                );
            }
            let on_canary = now.iter().filter(|&&b| b == 1).count() as f64 / 2000.0;
            assert!(
                (on_canary - canary as f64 / 100.0).abs() < 0.04,
                "{canary}: {on_canary}"
            );
            previous = now;
        }
    }

    #[test]
    fn sticky_decision_reports_the_bucket() {
        let t = table(&[50, 50], vec![], user_sticky());
        let h = headers(&[("cookie", "a=b; uid=alice")]);
        let d = t.route(&h, &mut StdRng::seed_from_u64(0)).unwrap();
        let b = bucket(b"", b"alice");
        assert_eq!(d.reason, Reason::Sticky(b));
        assert_eq!(d.backend, usize::from(b >= 5000));
    }

    #[test]
    fn anonymous_requests_draw_one_id_that_picks_their_bucket() {
        let sticky = StickySettings {
            anonymous: Some(StickyCookie::new(
                "canary_uid".into(),
                Duration::from_secs(60),
            )),
            ..user_sticky()
        };
        let pin = rule(
            RuleSource::Header(HeaderName::from_static("x-canary")),
            RuleMatcher::Equals("always".into()),
            1,
        );
        let t = table(&[50, 50], vec![pin], sticky);
        let mut rng = StdRng::seed_from_u64(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let d = t.route(&HeaderMap::new(), &mut rng).unwrap();
            let id = d.new_user.expect("an anonymous request gets an id");
            let b = bucket(b"", &id::hex(id));
            assert_eq!(d.reason, Reason::Sticky(b));
            assert_eq!(d.backend, usize::from(b >= 5000));
            assert!(seen.insert(id), "ids repeat");
        }
        // A user id, or a rule, and no id is drawn.
        for h in [
            headers(&[("x-user-id", "alice")]),
            headers(&[("cookie", "uid=bob")]),
            headers(&[("cookie", "canary_uid=carol")]),
            headers(&[("x-canary", "always")]),
        ] {
            assert_eq!(t.route(&h, &mut rng).unwrap().new_user, None, "{h:?}");
        }
        // The id is drawn once even when the decision is made again (its backend went down
        // meanwhile): the request goes where its id's bucket falls among those left.
        set_backend_health(&t, 0, false);
        for seed in 0..20 {
            let first_draw = id::random(&mut StdRng::seed_from_u64(seed));
            let mut rng = StdRng::seed_from_u64(seed);
            let d = t.route_from(0b11, &HeaderMap::new(), &mut rng).unwrap();
            assert_eq!(d.new_user, Some(first_draw));
            let b = bucket(b"", &id::hex(first_draw));
            assert_eq!((d.backend, d.reason), (1, Reason::Sticky(b)));
        }
        // Without a sticky cookie, anonymous requests are split by weight, with no id.
        let t = table(&[50, 50], vec![], user_sticky());
        let d = t.route(&HeaderMap::new(), &mut rng).unwrap();
        assert_eq!((d.reason, d.new_user), (Reason::Weight, None));
    }

    #[test]
    fn rules_match_in_order_and_ignore_weight() {
        let rules = vec![
            rule(
                RuleSource::Header(HeaderName::from_static("x-canary")),
                RuleMatcher::Equals("always".into()),
                1,
            ),
            rule(
                RuleSource::Cookie("beta".into()),
                RuleMatcher::Matches(regex::Regex::new("^(yes|1)$").unwrap()),
                1,
            ),
            rule(
                RuleSource::Header(HeaderName::from_static("x-debug")),
                RuleMatcher::Present,
                0,
            ),
        ];
        let t = table(&[100, 0], rules, user_sticky());
        let mut rng = StdRng::seed_from_u64(0);
        let route = |pairs: &[(&'static str, &str)], rng: &mut StdRng| {
            t.route(&headers(pairs), rng).unwrap()
        };
        assert_eq!(
            served(route(&[("x-canary", "always")], &mut rng)),
            (1, Reason::Rule(0))
        );
        assert_eq!(
            route(&[("x-canary", "Always")], &mut rng).reason,
            Reason::Weight
        );
        assert_eq!(
            route(&[("cookie", "beta=1")], &mut rng).reason,
            Reason::Rule(1)
        );
        assert_eq!(
            route(&[("cookie", "beta=no")], &mut rng).reason,
            Reason::Weight
        );
        assert_eq!(
            served(route(&[("x-debug", "")], &mut rng)),
            (0, Reason::Rule(2))
        );
        // The first matching rule wins.
        assert_eq!(
            route(&[("x-debug", "1"), ("x-canary", "always")], &mut rng).reason,
            Reason::Rule(0)
        );
    }

    #[test]
    fn unhealthy_rule_target_falls_through() {
        let rules = vec![rule(
            RuleSource::Header(HeaderName::from_static("x-canary")),
            RuleMatcher::Present,
            1,
        )];
        let t = table(&[100, 0], rules, StickySettings::default());
        set_backend_health(&t, 1, false);
        let d = t
            .route(
                &headers(&[("x-canary", "1")]),
                &mut StdRng::seed_from_u64(0),
            )
            .unwrap();
        assert_eq!(served(d), (0, Reason::Weight));
    }

    #[test]
    fn unhealthy_backend_share_goes_to_the_others_sticky_included() {
        let t = table(&[50, 50], vec![], user_sticky());
        set_backend_health(&t, 1, false);
        let mut rng = StdRng::seed_from_u64(0);
        for u in 0..500 {
            let h = headers(&[("x-user-id", &format!("u{u}"))]);
            assert_eq!(t.route(&h, &mut rng).unwrap().backend, 0);
            assert_eq!(t.route(&HeaderMap::new(), &mut rng).unwrap().backend, 0);
        }
        // One healthy endpoint is enough to keep the backend eligible.
        t.backends[1].endpoints[0].set_healthy(true);
        let picks: Vec<_> = (0..200)
            .map(|_| t.route(&HeaderMap::new(), &mut rng).unwrap().backend)
            .collect();
        assert!(picks.contains(&1));
    }

    #[test]
    fn nothing_healthy_fails_open_by_configured_weights() {
        let t = table(&[0, 100], vec![], StickySettings::default());
        set_backend_health(&t, 0, false);
        set_backend_health(&t, 1, false);
        let d = t
            .route(&HeaderMap::new(), &mut StdRng::seed_from_u64(0))
            .unwrap();
        assert_eq!(served(d), (1, Reason::Fallback));
        // A healthy weight-0 backend is not eligible, so fail-open still applies.
        set_backend_health(&t, 0, true);
        let d = t
            .route(&HeaderMap::new(), &mut StdRng::seed_from_u64(0))
            .unwrap();
        assert_eq!(served(d), (1, Reason::Fallback));
    }

    #[test]
    fn endpoints_rotate_and_skip_unhealthy_ones() {
        let t = table(&[1], vec![], StickySettings::default());
        let b = &t.backends[0];
        let urls: Vec<_> = (0..4)
            .map(|_| b.pick_endpoint(None).unwrap().url().to_owned())
            .collect();
        assert_ne!(urls[0], urls[1]);
        assert_eq!(urls[0], urls[2]);
        b.endpoints[0].set_healthy(false);
        for _ in 0..4 {
            assert!(Arc::ptr_eq(b.pick_endpoint(None).unwrap(), &b.endpoints[1]));
        }
        // Avoiding the only healthy endpoint leaves the unhealthy one as the last resort.
        let last = b.pick_endpoint(Some(&b.endpoints[1])).unwrap();
        assert!(Arc::ptr_eq(last, &b.endpoints[0]));
    }

    /// An RNG that runs `on_draw` before each draw: health changing while a decision is made,
    /// after the decision read it and before the endpoint is picked.
    struct Meddling<'a> {
        inner: StdRng,
        on_draw: &'a dyn Fn(),
    }

    impl rand::TryRng for Meddling<'_> {
        type Error = std::convert::Infallible;

        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            (self.on_draw)();
            self.inner.try_next_u32()
        }

        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            (self.on_draw)();
            self.inner.try_next_u64()
        }

        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            (self.on_draw)();
            self.inner.try_fill_bytes(dst)
        }
    }

    /// The endpoint a decision names.
    fn endpoint_of(t: &RoutingTable, d: Decision) -> &Arc<Endpoint> {
        &t.backends[d.backend].endpoints[d.endpoint]
    }

    #[test]
    fn a_backend_going_down_during_the_decision_is_not_picked_while_another_is_healthy() {
        let t = table(&[50, 50], vec![], StickySettings::default());
        let mut rng = Meddling {
            inner: StdRng::seed_from_u64(5),
            on_draw: &|| set_backend_health(&t, 1, false),
        };
        for _ in 0..200 {
            set_backend_health(&t, 1, true);
            let d = t.route(&HeaderMap::new(), &mut rng).unwrap();
            assert!(endpoint_of(&t, d).is_healthy(), "{d:?}");
            assert_eq!(served(d), (0, Reason::Weight));
        }
    }

    #[test]
    fn everything_going_down_during_the_decision_fails_open_and_says_so() {
        let t = table(&[50, 50], vec![], StickySettings::default());
        let mut rng = Meddling {
            inner: StdRng::seed_from_u64(6),
            on_draw: &|| {
                set_backend_health(&t, 0, false);
                set_backend_health(&t, 1, false);
            },
        };
        let mut seen = [false; 2];
        for _ in 0..200 {
            set_backend_health(&t, 0, true);
            set_backend_health(&t, 1, true);
            let d = t.route(&HeaderMap::new(), &mut rng).unwrap();
            assert!(!endpoint_of(&t, d).is_healthy());
            assert_eq!(d.reason, Reason::Fallback, "{d:?}");
            seen[d.backend] = true;
        }
        assert_eq!(
            seen,
            [true, true],
            "fail-open goes by the configured weights"
        );
    }

    #[test]
    fn rules_and_sticky_users_move_off_a_backend_that_went_down_during_the_decision() {
        let rules = vec![rule(
            RuleSource::Header(HeaderName::from_static("x-canary")),
            RuleMatcher::Present,
            1,
        )];
        let t = table(&[50, 50], rules, user_sticky());
        // Read as all healthy when the decision began; backend 1 is down by the time its
        // endpoint is picked.
        set_backend_health(&t, 1, false);
        let mut rng = StdRng::seed_from_u64(0);
        let d = t
            .route_from(0b11, &headers(&[("x-canary", "1")]), &mut rng)
            .unwrap();
        assert_eq!(served(d), (0, Reason::Weight));
        assert!(endpoint_of(&t, d).is_healthy());
        let canary_user = (0..)
            .map(|u| format!("user-{u}"))
            .find(|u| bucket(b"", u.as_bytes()) >= 5000)
            .unwrap();
        let d = t
            .route_from(0b11, &headers(&[("x-user-id", &canary_user)]), &mut rng)
            .unwrap();
        assert_eq!(d.backend, 0);
        assert!(matches!(d.reason, Reason::Sticky(b) if b >= 5000));
        assert!(endpoint_of(&t, d).is_healthy());
    }

    #[test]
    fn endpoint_choice_follows_the_health_it_read() {
        let t = table(&[1], vec![], StickySettings::default());
        let b = &t.backends[0];
        // With one endpoint down, every decision names the other one, never the down one.
        b.endpoints[1].set_healthy(false);
        for _ in 0..10 {
            let d = t
                .route(&HeaderMap::new(), &mut StdRng::seed_from_u64(0))
                .unwrap();
            assert_eq!((d.endpoint, d.reason), (0, Reason::Weight));
        }
        // With both down it fails open, still in turn.
        b.endpoints[0].set_healthy(false);
        let picked: Vec<usize> = (0..4)
            .map(|_| {
                let d = t
                    .route(&HeaderMap::new(), &mut StdRng::seed_from_u64(0))
                    .unwrap();
                assert_eq!(d.reason, Reason::Fallback);
                d.endpoint
            })
            .collect();
        assert!(picked.contains(&0) && picked.contains(&1), "{picked:?}");
    }

    #[test]
    fn alternative_skips_a_backend_that_went_down_during_the_pick() {
        let t = table(&[50, 50, 50], vec![], StickySettings::default());
        let failed = t.backends[0].endpoints[0].clone();
        t.backends[0].endpoints[1].set_healthy(false);
        let mut rng = Meddling {
            inner: StdRng::seed_from_u64(7),
            on_draw: &|| set_backend_health(&t, 1, false),
        };
        for _ in 0..100 {
            set_backend_health(&t, 1, true);
            let (b, e) = t.alternative(0, &failed, &mut rng).unwrap();
            assert_eq!(b, 2);
            assert!(e.is_healthy());
        }
    }

    #[test]
    fn alternative_prefers_another_endpoint_then_another_backend() {
        let t = table(&[50, 50], vec![], StickySettings::default());
        let mut rng = StdRng::seed_from_u64(0);
        let failed = t.backends[0].endpoints[0].clone();
        let (b, e) = t.alternative(0, &failed, &mut rng).unwrap();
        assert_eq!(b, 0);
        assert!(Arc::ptr_eq(e, &t.backends[0].endpoints[1]));
        t.backends[0].endpoints[1].set_healthy(false);
        let (b, _) = t.alternative(0, &failed, &mut rng).unwrap();
        assert_eq!(b, 1);
        set_backend_health(&t, 1, false);
        assert!(t.alternative(0, &failed, &mut rng).is_none());
    }

    #[test]
    fn alternative_while_failing_open_uses_the_weighted_backends() {
        let t = table(&[50, 50, 0], vec![], StickySettings::default());
        for b in 0..3 {
            set_backend_health(&t, b, false);
        }
        let failed = t.backends[0].endpoints[0].clone();
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..20 {
            let (b, _) = t.alternative(0, &failed, &mut rng).unwrap();
            assert_eq!(b, 1, "another weighted backend, never the weight-0 one");
        }
    }

    #[test]
    fn reload_keeps_endpoint_health_and_applies_new_outlier_settings() {
        let text = |failures: u32| {
            format!(
                "[[backend]]\nname = \"v1\"\nurls = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\n\
                 weight = 1\n[backend.outlier]\nconsecutive_failures = {failures}\n"
            )
        };
        let parse = |failures| crate::config::parse(&text(failures), "t.toml").unwrap();
        let metrics = Metrics::new();
        let first = RoutingTable::from_config(&parse(1), 1, None, &metrics);
        let ejected = &first.backends[0].endpoints[0];
        ejected.record_outcome(false);
        assert!(!ejected.is_healthy());
        assert!(ejected.status().ejected);
        // Same endpoints after a reload; turning ejection off ends the running one.
        let second = RoutingTable::from_config(&parse(0), 2, Some(&first), &metrics);
        assert!(Arc::ptr_eq(&second.backends[0].endpoints[0], ejected));
        assert!(ejected.is_healthy());
        for _ in 0..10 {
            second.backends[0].endpoints[1].record_outcome(false);
        }
        assert!(second.backends[0].endpoints[1].is_healthy());
    }

    #[test]
    fn reload_keeps_endpoints_whose_url_is_unchanged_whatever_else_changes() {
        let text = |proxy: &str, urls: &str, check: &str| {
            // The backend's own keys come before its tables: `urls` may carry a protocol.
            format!(
                "[proxy]\n{proxy}\n[[backend]]\nname = \"v1\"\nurls = [{urls}\nweight = 1\n\
                 [backend.outlier]\nconsecutive_failures = 1\n{check}"
            )
        };
        let parse = |text: String| crate::config::parse(&text, "t.toml").unwrap();
        let metrics = Metrics::new();
        let first = RoutingTable::from_config(
            &parse(text(
                "",
                "\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]",
                "",
            )),
            1,
            None,
            &metrics,
        );
        let (ejected, down) = (
            &first.backends[0].endpoints[0],
            &first.backends[0].endpoints[1],
        );
        ejected.record_outcome(false);
        down.set_healthy(false);
        assert!(ejected.status().ejected && !down.status().active_up);
        // New connection settings (HTTP/2 now), a new health check, one URL replaced.
        let second = RoutingTable::from_config(
            &parse(text(
                "connect_timeout = \"750ms\"\nupstream_idle_timeout = \"7s\"",
                "\"http://127.0.0.1:1\", \"http://127.0.0.1:3\"]\nprotocol = \"h2c\"",
                "[backend.health]\npath = \"/up\"\ninterval = \"5s\"\n",
            )),
            2,
            Some(&first),
            &metrics,
        );
        let kept = &second.backends[0];
        assert_eq!(
            kept.upstream.settings(),
            UpstreamSettings {
                connect_timeout: Duration::from_millis(750),
                idle_timeout: Duration::from_secs(7),
                protocol: crate::config::UpstreamProtocol::H2c,
            }
        );
        assert!(Arc::ptr_eq(&kept.endpoints[0], ejected));
        assert!(kept.endpoints[0].status().ejected, "still ejected");
        let fresh = &kept.endpoints[1];
        assert_eq!(fresh.url(), "http://127.0.0.1:3");
        assert!(fresh.is_healthy());
        // The dropped URL coming back later is a new endpoint: nothing holds its old state.
        let third = RoutingTable::from_config(
            &parse(text("", "\"http://127.0.0.1:2\"]", "")),
            3,
            Some(&second),
            &metrics,
        );
        assert!(!Arc::ptr_eq(&third.backends[0].endpoints[0], down));
        assert!(third.backends[0].endpoints[0].is_healthy());
    }

    #[test]
    fn with_weights_keeps_pools_and_health() {
        let t = table(&[90, 10], vec![], StickySettings::default());
        t.backends[1].endpoints[0].set_healthy(false);
        let u = t.with_weights(&[(1, 20), (0, 80)], 2);
        assert_eq!(u.version, 2);
        assert_eq!((u.backends[0].weight, u.backends[1].weight), (80, 20));
        assert!(!u.backends[1].endpoints[0].is_healthy());
        assert!(Arc::ptr_eq(
            &u.backends[1].endpoints[0],
            &t.backends[1].endpoints[0]
        ));
        let u = t.with_weights(&[(0, 0)], 3);
        for _ in 0..100 {
            assert_eq!(
                u.route(&HeaderMap::new(), &mut StdRng::seed_from_u64(0))
                    .unwrap()
                    .backend,
                1
            );
        }
    }

    #[test]
    fn effective_weights_follow_health_and_fail_open() {
        let t = table(&[90, 10, 0], vec![], StickySettings::default());
        assert_eq!(t.effective_weights(), [90, 10, 0]);
        set_backend_health(&t, 1, false);
        assert_eq!(t.effective_weights(), [90, 0, 0]);
        assert!(!t.is_failing_open());
        set_backend_health(&t, 0, false);
        assert_eq!(t.effective_weights(), [90, 10, 0]);
        assert!(t.is_failing_open());
    }

    #[test]
    fn cookie_rule_reads_cookie_header() {
        let rules = vec![rule(
            RuleSource::Cookie("canary".into()),
            RuleMatcher::Present,
            1,
        )];
        let t = table(&[1, 0], rules, StickySettings::default());
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("canary=1"));
        assert_eq!(
            t.route(&h, &mut StdRng::seed_from_u64(0)).unwrap().reason,
            Reason::Rule(0)
        );
    }

    const GAUGES_CONFIG: &str = r#"
[[backend]]
name = "v1"
urls = ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]
weight = 90

[[backend]]
name = "v2"
urls = ["http://127.0.0.1:8083"]
weight = 10
"#;

    const GAUGES_V1_ONLY: &str = r#"
[[backend]]
name = "v1"
urls = ["http://127.0.0.1:8081"]
weight = 100
"#;

    use crate::metrics::sample;

    #[test]
    fn table_gauges_follow_health_and_reloads() {
        let metrics = Metrics::new();
        let from_config = |text: &str, version| {
            let config = crate::config::parse(text, "t.toml").expect("test config is valid");
            RoutingTable::from_config(&config, version, None, &metrics)
        };
        let render = |t: &RoutingTable| metrics.render(|gauges| t.export_gauges(gauges));
        let t = from_config(GAUGES_CONFIG, 1);
        let weight = |text: &str, b: &str| {
            (
                sample(text, "canary_backend_weight", &format!(r#"backend="{b}""#)),
                sample(
                    text,
                    "canary_backend_effective_weight",
                    &format!(r#"backend="{b}""#),
                ),
            )
        };
        let up = |text: &str, b: &str, port: u16| {
            let labels = format!(r#"backend="{b}",endpoint="http://127.0.0.1:{port}""#);
            sample(text, "canary_endpoint_up", &labels)
        };

        let text = render(&t);
        assert_eq!(weight(&text, "v1"), (Some(90.0), Some(90.0)));
        assert_eq!(weight(&text, "v2"), (Some(10.0), Some(10.0)));
        assert_eq!(up(&text, "v1", 8081), Some(1.0));
        assert_eq!(up(&text, "v2", 8083), Some(1.0));
        assert_eq!(sample(&text, "canary_failing_open", ""), Some(0.0));

        // v2 down: its share is 0 while its configured weight stays.
        for endpoint in &t.backends[1].endpoints {
            endpoint.set_healthy(false);
        }
        let text = render(&t);
        assert_eq!(weight(&text, "v1"), (Some(90.0), Some(90.0)));
        assert_eq!(weight(&text, "v2"), (Some(10.0), Some(0.0)));
        assert_eq!(up(&text, "v2", 8083), Some(0.0));

        // One v1 endpoint down keeps v1 eligible; both down fails open over configured weights.
        t.backends[0].endpoints[0].set_healthy(false);
        let text = render(&t);
        assert_eq!(up(&text, "v1", 8081), Some(0.0));
        assert_eq!(up(&text, "v1", 8082), Some(1.0));
        assert_eq!(weight(&text, "v1"), (Some(90.0), Some(90.0)));
        t.backends[0].endpoints[1].set_healthy(false);
        let text = render(&t);
        assert_eq!(weight(&text, "v1"), (Some(90.0), Some(90.0)));
        assert_eq!(weight(&text, "v2"), (Some(10.0), Some(10.0)));
        assert_eq!(sample(&text, "canary_failing_open", ""), Some(1.0));

        // A reload that drops v2 and an endpoint of v1: their gauges disappear.
        let text = render(&from_config(GAUGES_V1_ONLY, 2));
        assert_eq!(weight(&text, "v1"), (Some(100.0), Some(100.0)));
        assert_eq!(weight(&text, "v2"), (None, None));
        assert_eq!(up(&text, "v1", 8081), Some(1.0));
        assert_eq!(up(&text, "v1", 8082), None);
        assert_eq!(up(&text, "v2", 8083), None);
        assert_eq!(sample(&text, "canary_table_version", ""), Some(2.0));
    }
}
