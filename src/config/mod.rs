//! The config file (`canary.toml`): loading, validation, and the validated types the proxy runs on.
//!
//! Parsing happens in two stages. Stage 1 deserializes the TOML into private `Raw*` structs that
//! mirror the file: unknown keys are rejected and every value that needs checking keeps its byte
//! span. Stage 2 validates those into [`Config`]; every error names the file, the 1-based line and
//! the full key path as the operator would locate it (`backend[1].urls[0]`). Nothing downstream
//! validates again: holding a [`Config`] means the values are usable.
//!
//! `mod.rs` holds the validated public types, their defaults and limits, [`load`] and [`parse`].
//! `raw.rs` is stage 1: the `Raw*` serde structs mirroring the file, and `deserialize`.
//! `validate.rs` is stage 2: `Raw*` into the public types, with the checks of single values.
//! `diagnostics.rs` locates and words errors: `FieldError`, lines, key paths, typo hints.
//! `fault.rs` checks faults (`[[fault]]`) and `mirror.rs` mirroring (`[mirror]`), for the
//! file and for the admin API alike. `tls.rs` reads the client listener's certificates
//! (`[proxy.tls]`).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use http::HeaderName;
use http::uri::{Authority, PathAndQuery, Uri};
use regex::Regex;

use diagnostics::line_of;
use raw::deserialize;

mod diagnostics;
mod fault;
mod mirror;
mod raw;
pub mod rule;
mod store;
mod tls;
mod upstream_tls;
mod validate;

pub use fault::{FaultConfig, FaultFields, FieldProblem, MAX_FAULT_DELAY, first_repeated_backend};
pub use mirror::{MirrorConfig, MirrorFields, format_size};
pub use store::StoreSettings;
pub use tls::{SniCertificate, TlsCertificate, TlsSettings};
pub use upstream_tls::{ALPN_H2, ALPN_HTTP1, BackendTls, TLS_VERSIONS, crypto_provider};

/// The largest weight a backend may have, in the file and through the admin API. Weights are
/// relative, so this only guards against sums that overflow and typos with extra zeros.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// The response header naming the serving backend when `proxy.backend_header` is not set.
pub const DEFAULT_BACKEND_HEADER: &str = "x-canary-backend";

/// The most backends a config may declare; routing decisions track eligibility in a `u64` bit
/// set so that they never allocate.
pub const MAX_BACKENDS: usize = 64;

/// The `backend` label of requests answered without a backend (400, 405, 503), and so a name
/// no backend may take.
pub const UNROUTED_BACKEND: &str = "none";

/// A validated configuration: everything the proxy needs to start or to swap in on reload.
#[derive(Debug, Clone)]
pub struct Config {
    /// The client-facing listener and forwarding behaviour (`[proxy]`).
    pub proxy: ProxySettings,
    /// The admin API listener and its authentication (`[admin]`).
    pub admin: AdminSettings,
    /// The versions traffic is split between (`[[backend]]`), in declaration order, which is
    /// also the order sticky buckets are assigned in. Never empty; names are unique; at least
    /// one weight is above zero.
    pub backends: Vec<BackendConfig>,
    /// Header/cookie rules (`[[rule]]`), tried in declaration order; the first match wins.
    pub rules: Vec<RuleConfig>,
    /// The progressive rollout the proxy runs itself (`[rollout]`), if any.
    pub rollout: Option<RolloutConfig>,
    /// Faults injected into backends' requests (`[[fault]]`): at most one per backend, each
    /// naming a backend of `backends`.
    pub faults: Vec<FaultConfig>,
    /// Copies of requests sent to a backend and compared (`[mirror]`), naming a backend of
    /// `backends`.
    pub mirror: Option<MirrorConfig>,
    /// `[log]`: how the process logs.
    pub log: LogSettings,
    /// `[store]`: the etcd that replicas share their table through; `None`: the file is the
    /// single source.
    pub store: Option<StoreSettings>,
}

/// `[log]`: how the process logs (to stderr, through `tracing`), and the access log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogSettings {
    /// Read at start: a reload does not change it.
    pub format: LogFormat,
    /// Read on start and on every reload (it goes into the routing table).
    pub access: AccessLog,
}

/// One line per event: for a person (`text`, the default) or for a log pipeline (`json`, one
/// JSON object per line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn parse(name: &str) -> Option<LogFormat> {
        match name {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// The access log: none (`off`, the default), or one JSON object per request on stdout
/// (`json`), written when its response has ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AccessLog {
    #[default]
    Off,
    Json,
}

impl AccessLog {
    pub fn parse(name: &str) -> Option<AccessLog> {
        match name {
            "off" => Some(AccessLog::Off),
            "json" => Some(AccessLog::Json),
            _ => None,
        }
    }
}

/// `[rollout]`: the plan of a progressive rollout from `baseline` to `canary`.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutConfig {
    /// Index into `backends` of the version being replaced.
    pub baseline: usize,
    /// Index into `backends` of the version being rolled out; never the baseline.
    pub canary: usize,
    /// The shadow stage before step 1, and the least time it lasts: the canary gets copies
    /// of requests only (`[mirror]`'s settings when `[mirror]` names the canary, else its
    /// defaults), compared with the served answers. `None`: no shadow stage.
    pub shadow: Option<Duration>,
    /// The canary's percent of baseline + canary traffic at each step: strictly rising, each
    /// from 1 to 100, the last one 100 (the promotion itself).
    pub steps: Vec<u32>,
    /// The least time spent at a step before it may advance. Default 1m.
    pub step_time: Duration,
    /// Steps (percents, each one of `steps`) that wait for `POST /admin/rollout/resume` before
    /// they start.
    pub approve: Vec<u32>,
    /// Each transition is POSTed here as JSON (best effort). An `http://` URL.
    pub webhook: Option<Uri>,
    pub analysis: AnalysisConfig,
}

/// `[rollout.analysis]`: how the two versions are compared.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisConfig {
    /// How often the verdict is computed. Default 5s.
    pub interval: Duration,
    /// Requests each version needs at the current step before the step can pass. Default 100.
    pub min_requests: u64,
    /// A step still inconclusive after this long goes to `on_inconclusive`. Default 10m; at
    /// least `step_time`.
    pub max_step_time: Duration,
    pub on_inconclusive: OnInconclusive,
    /// The canary's error rate may exceed the baseline's by this much (absolute). Default 0.01.
    pub error_tolerance: f64,
    /// The canary's p99 may exceed the baseline's by this fraction. Default 0.25.
    pub latency_tolerance: f64,
    /// A canary as good as the baseline is rolled back at most `1 - confidence` of the time.
    /// Default 0.99.
    pub confidence: f64,
    /// In the shadow stage, the largest share of compared copies whose answers may differ
    /// from the served ones (noise left out). Default 0.01; at least 0.001.
    pub max_diff_rate: f64,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            interval: Duration::from_secs(5),
            min_requests: 100,
            max_step_time: Duration::from_secs(600),
            on_inconclusive: OnInconclusive::Hold,
            error_tolerance: 0.01,
            latency_tolerance: 0.25,
            confidence: 0.99,
            max_diff_rate: 0.01,
        }
    }
}

/// What a step still inconclusive at `max_step_time` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInconclusive {
    /// Stay at the step (and keep analysing) until the operator or the evidence decides.
    Hold,
    Rollback,
    Advance,
}

impl OnInconclusive {
    pub fn as_str(self) -> &'static str {
        match self {
            OnInconclusive::Hold => "hold",
            OnInconclusive::Rollback => "rollback",
            OnInconclusive::Advance => "advance",
        }
    }
}

/// The steps of a rollout when `steps` is not given.
pub const DEFAULT_ROLLOUT_STEPS: [u32; 5] = [1, 5, 20, 50, 100];

/// `[proxy]`: the client-facing side of the proxy.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Where clients connect. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Upper bound on establishing a TCP connection to an upstream endpoint. Default 2s.
    pub connect_timeout: Duration,
    /// From the end of the request to the upstream's response head, and the longest pause of
    /// an upstream that takes no request bytes; past it the client gets 504. Body streaming
    /// is not bounded by it. Default 30s.
    pub request_timeout: Duration,
    /// The longest pause between two pieces of a client's request body; past it the client
    /// gets 408 (never counted against the upstream). Default 60s.
    pub client_body_timeout: Duration,
    /// The longest pause between two reads of an upstream's response body; past it both
    /// connections are closed. Default 60s.
    pub read_timeout: Duration,
    /// The longest a write to a client may wait (a client that does not read); past it the
    /// client connection is closed. Default 60s. Takes effect on restart.
    pub send_timeout: Duration,
    /// A client must finish sending its request head within this, so idle or slow clients
    /// cannot hold connections open forever. Default 10s.
    pub header_read_timeout: Duration,
    /// Pooled keep-alive connections to upstreams are closed after being idle this long; keep
    /// it below the upstreams' own keep-alive timeout. Default 30s.
    pub upstream_idle_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before the process
    /// exits anyway. Default 30s; zero means exit at once.
    pub shutdown_grace: Duration,
    /// Header carrying the user id for sticky buckets (lowercased). `None`: not read.
    pub user_id_header: Option<HeaderName>,
    /// Cookie carrying the user id, used when the header is absent. `None`: not read.
    pub user_id_cookie: Option<String>,
    /// Prefixed to the user id before hashing, so bucket assignments can be reshuffled
    /// without renaming users. Default empty.
    pub sticky_salt: String,
    /// Cookie that gives anonymous visitors a user id: read after `user_id_header` and
    /// `user_id_cookie`; a request with none of them gets a new random id in it. `None`: no
    /// such cookie, and anonymous requests are split by weight.
    pub sticky_cookie: Option<String>,
    /// `Max-Age` of the sticky cookie. Default 720h (30 days); whole seconds, at least 1s.
    pub sticky_cookie_max_age: Duration,
    /// Response header naming the backend that served. Default `x-canary-backend`; an empty
    /// string in the file disables it (`None`).
    pub backend_header: Option<HeaderName>,
    /// Worker threads, each with its own runtime and listener. `None`: one per core available
    /// to the process (its CPU affinity included). At most [`MAX_WORKERS`].
    pub workers: Option<usize>,
    /// `[proxy.tls]`: TLS on `listen`, with the certificates read when the config was.
    /// `None`: plain HTTP. Turning it on or off takes a restart; its certificates are re-read
    /// on reload.
    pub tls: Option<TlsSettings>,
}

/// The most worker threads `proxy.workers` may ask for.
pub const MAX_WORKERS: usize = 64;

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            client_body_timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            upstream_idle_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            user_id_header: None,
            user_id_cookie: None,
            sticky_salt: String::new(),
            sticky_cookie: None,
            sticky_cookie_max_age: Duration::from_secs(720 * 3600),
            backend_header: Some(HeaderName::from_static(DEFAULT_BACKEND_HEADER)),
            workers: None,
            tls: None,
        }
    }
}

/// `[admin]`: the admin API listener, kept apart from client traffic.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Where the admin API listens. Default `127.0.0.1:9901`. A non-loopback address is only
    /// accepted together with `token` or `token_env`.
    pub listen: SocketAddr,
    /// Bearer token required on every `/admin/*` call, written in the file. Never empty.
    pub token: Option<String>,
    /// Name of the environment variable holding the bearer token, so the secret stays out of
    /// the file. Never empty; mutually exclusive with `token`.
    pub token_env: Option<String>,
    /// Host names the admin API answers to besides IP literals and `localhost` (lowercase,
    /// without port or trailing dot). Any other `Host` gets 403: a DNS rebinding attack needs
    /// a name of its own to point at this listener. Default empty.
    pub allowed_hosts: Vec<String>,
    /// Connections the admin API serves at once; past it a new connection gets a short 503 and
    /// is closed, so the admin port cannot use up the descriptors the data plane needs.
    /// Default 64; 1 to [`MAX_ADMIN_CONNECTIONS`]. Takes effect on restart.
    pub max_connections: usize,
    /// A request head must arrive within this, an idle keep-alive connection is closed after
    /// it, and a request body must arrive within it too. Default 10s. Takes effect on restart.
    pub header_read_timeout: Duration,
}

/// The most connections `admin.max_connections` may allow.
pub const MAX_ADMIN_CONNECTIONS: usize = 10_000;

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            token: None,
            token_env: None,
            allowed_hosts: Vec::new(),
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

impl AdminSettings {
    /// The bearer token in effect: `token`, or the value of the `token_env` variable read now.
    ///
    /// Returns `Ok(None)` when no token is configured, and an error when `token_env` names a
    /// variable that is unset, empty or not UTF-8 (the proxy must not start unauthenticated by
    /// accident).
    pub fn resolve_token(&self) -> Result<Option<String>, TokenError> {
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        let Some(var) = &self.token_env else {
            return Ok(None);
        };
        match std::env::var(var) {
            Ok(value) if !value.is_empty() => Ok(Some(value)),
            Ok(_) => Err(TokenError::Empty { var: var.clone() }),
            Err(std::env::VarError::NotPresent) => Err(TokenError::Unset { var: var.clone() }),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(TokenError::NotUnicode { var: var.clone() })
            }
        }
    }
}

/// Why the admin token named by `admin.token_env` cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("admin.token_env: environment variable {var} is not set")]
    Unset { var: String },
    #[error("admin.token_env: environment variable {var} is empty")]
    Empty { var: String },
    #[error("admin.token_env: environment variable {var} is not valid UTF-8")]
    NotUnicode { var: String },
}

/// One `[[backend]]`: a version of the service, with its endpoints and traffic share.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Unique name, only `[A-Za-z0-9_.-]`: it appears verbatim in a response header, in
    /// metric labels and in admin API JSON.
    pub name: String,
    /// The instances serving this version (key `urls`). Never empty, no duplicates.
    pub endpoints: Vec<EndpointUrl>,
    /// Relative share of weighted and sticky traffic, `0..=MAX_WEIGHT`. Zero takes the backend
    /// out of weighted routing while rules can still pick it.
    pub weight: u32,
    /// How requests go to the endpoints. Default HTTP/1.1.
    pub protocol: UpstreamProtocol,
    /// Active health check; `None` means only passive checks apply.
    pub health: Option<HealthCheckConfig>,
    /// Passive health (`[backend.outlier]`): when failed requests eject an endpoint. Always
    /// present; defaults filled in when the table is absent.
    pub outlier: OutlierConfig,
    /// `[backend.tls]`, for the `https://` endpoints: present whenever one of them is
    /// (with the defaults when the table is absent), and only then.
    pub tls: Option<BackendTls>,
    /// 1-based line of the `[[backend]]` header, for messages about this backend.
    pub line: usize,
}

/// `[[backend]] protocol`: what the proxy speaks to a backend's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// `http1` (the default): pooled keep-alive HTTP/1.1 connections.
    #[default]
    Http1,
    /// `h2c`: HTTP/2 without TLS, by prior knowledge (no upgrade), multiplexed.
    H2c,
    /// `h2`: HTTP/2 over TLS, chosen by ALPN; only with `https://` URLs.
    H2,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
        }
    }

    /// Whether requests go upstream over HTTP/2.
    #[inline]
    pub fn is_h2(self) -> bool {
        self != UpstreamProtocol::Http1
    }
}

/// One upstream endpoint, validated from an entry of `urls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    /// The URL as written in the file, without a trailing slash: what logs and the admin API
    /// show, so operators recognise it.
    pub url: String,
    /// `host:port` to connect to, the port always explicit (80 or 443 filled in when
    /// omitted).
    pub authority: http::uri::Authority,
    /// `https://`: the connection is TLS, verified as `[backend.tls]` says.
    pub tls: bool,
}

impl FromStr for EndpointUrl {
    type Err = String;

    /// Accepts `http://host[:port][/]` and `https://host[:port][/]`: no path, query, fragment
    /// or userinfo, since the request's own path is forwarded as is.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains('#') {
            return Err(format!("`{s}`: fragments are not allowed in upstream URLs"));
        }
        let uri: Uri = s
            .parse()
            .map_err(|e| format!("`{s}` is not a valid URL: {e}"))?;
        let tls = match uri.scheme_str() {
            None => return Err(format!("`{s}` has no scheme; write `http://{s}`")),
            Some(scheme) if scheme.eq_ignore_ascii_case("https") => true,
            Some(scheme) if scheme.eq_ignore_ascii_case("http") => false,
            Some(scheme) => {
                return Err(format!(
                    "`{s}`: unsupported scheme `{scheme}`; write http:// or https://"
                ));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{s}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{s}`: credentials in upstream URLs are not supported"
            ));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        let port = match authority.as_str().strip_prefix(host) {
            Some("") if tls => 443,
            Some("") => 80,
            Some(port) => match port.strip_prefix(':').map(str::parse::<u16>) {
                Some(Ok(port)) if port != 0 => port,
                _ => {
                    return Err(format!(
                        "`{s}` has an invalid port; expected a number from 1 to 65535"
                    ));
                }
            },
            None => return Err(format!("`{s}` has an invalid host")),
        };
        if uri.query().is_some() {
            return Err(format!(
                "`{s}`: a query string is not allowed in upstream URLs"
            ));
        }
        if !matches!(uri.path(), "" | "/") {
            return Err(format!(
                "`{s}`: a path is not allowed in upstream URLs (requests keep their own path)"
            ));
        }
        let authority = Authority::from_str(&format!("{host}:{port}"))
            .map_err(|e| format!("`{s}` has an invalid host: {e}"))?;
        Ok(Self {
            url: s.strip_suffix('/').unwrap_or(s).to_owned(),
            authority,
            tls,
        })
    }
}

/// `[backend.health]`: the active health check of every endpoint of one backend.
///
/// `PartialEq` lets the health supervisor tell whether a reload changed the check, in which
/// case the probe tasks restart with the new settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Path (and optional query) probed with GET; a 2xx answer is a pass. Default `/health`.
    pub path: http::uri::PathAndQuery,
    /// Time between probes of one endpoint. Default 2s.
    pub interval: Duration,
    /// A probe not answered within this counts as a failure. Default 1s.
    pub timeout: Duration,
    /// Consecutive failures that mark an endpoint down. Default 3.
    pub unhealthy_threshold: u32,
    /// Consecutive passes that mark a down endpoint up again. Default 2.
    pub healthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: PathAndQuery::from_static("/health"),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
        }
    }
}

/// `[backend.outlier]`: passive health, modelled on Envoy's outlier detection. Consecutive
/// failed requests to one endpoint (connect failures, timeouts, 5xx) eject it for a cool-down
/// that grows with each recent ejection, so a flapping endpoint stays out longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive failures that eject an endpoint. Default 5; 0 disables passive ejection.
    pub consecutive_failures: u32,
    /// The first ejection lasts this long, the n-th `n` times as long (n decays by one for
    /// each such period the endpoint then stays in). Default 30s; greater than 0.
    pub base_ejection: Duration,
    /// Upper bound of one ejection. Default 5m; at least `base_ejection`.
    pub max_ejection: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// One `[[rule]]`: requests whose header or cookie matches are pinned to a backend.
#[derive(Debug, Clone)]
pub struct RuleConfig {
    /// What part of the request the rule reads.
    pub source: RuleSource,
    /// How the value read is tested.
    pub matcher: RuleMatcher,
    /// Index into [`Config::backends`] of the backend a match routes to.
    pub backend: usize,
    /// 1-based line of the `[[rule]]` header, for messages and `/admin/explain`.
    pub line: usize,
}

/// Where a rule reads its value from.
#[derive(Debug, Clone)]
pub enum RuleSource {
    /// A request header (name lowercased). With several values, any may match.
    Header(HeaderName),
    /// A cookie from the `Cookie` header, by exact name.
    Cookie(String),
}

impl fmt::Display for RuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header(name) => write!(f, "header {name}"),
            Self::Cookie(name) => write!(f, "cookie {name}"),
        }
    }
}

/// How a rule tests the value it read.
#[derive(Debug, Clone)]
pub enum RuleMatcher {
    /// The value equals this string exactly (case-sensitive).
    Equals(String),
    /// The regex matches somewhere in the value (unanchored, like nginx `~`).
    Matches(Regex),
    /// The header or cookie is present, whatever its value.
    Present,
}

impl fmt::Display for RuleMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Equals(value) => write!(f, "equals {value:?}"),
            Self::Matches(regex) => write!(f, "matches {:?}", regex.as_str()),
            Self::Present => f.write_str("present"),
        }
    }
}

impl Config {
    /// Index of the backend called `name`, as used by [`RuleConfig::backend`].
    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.name == name)
    }
}

/// Why a config could not be loaded. `Display` is the one line an operator needs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{path}: cannot read config")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid config; `key` is the full key path
    /// (`backend[1].urls[0]`) and `line` the 1-based line of the offending key or value.
    #[error("{path}:{line}: `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

/// Reads and validates the config file at `path`; errors show `path` as given. Files it names
/// (`proxy.tls`) are relative to its directory.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: origin.clone(),
        source,
    })?;
    parse_relative_to(&text, &origin, path.parent().unwrap_or(Path::new("")))
}

/// Parses and validates config `text`; `origin` names the file in error messages. Files it
/// names are relative to the current directory.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_relative_to(text, origin, Path::new(""))
}

/// [`parse`], with the files the config names relative to `dir`.
pub fn parse_relative_to(text: &str, origin: &str, dir: &Path) -> Result<Config, ConfigError> {
    deserialize(text)
        .and_then(|raw| raw.validate(text, dir))
        .map_err(|e| ConfigError::Invalid {
            path: origin.to_owned(),
            line: line_of(text, e.span.start),
            key: e.key,
            message: e.message,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Joins `lines` with newlines, so line N of the config is `lines[N - 1]`.
    fn doc(lines: &[&str]) -> String {
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }

    fn valid(text: &str) -> Config {
        match parse(text, "test.toml") {
            Ok(config) => config,
            Err(e) => panic!("expected a valid config, got: {e}"),
        }
    }

    /// Parses `text`, expecting an error; returns (line, key, message).
    fn invalid(text: &str) -> (usize, String, String) {
        match parse(text, "test.toml") {
            Ok(config) => panic!("expected an error, got {config:#?}"),
            Err(ConfigError::Invalid {
                path,
                line,
                key,
                message,
            }) => {
                assert_eq!(path, "test.toml");
                (line, key, message)
            }
            Err(e) => panic!("expected ConfigError::Invalid, got {e:?}"),
        }
    }

    /// Asserts that `text` fails at `key` on `line`; returns the message for further checks.
    #[track_caller]
    fn assert_invalid(text: &str, key: &str, line: usize) -> String {
        let (got_line, got_key, message) = invalid(text);
        assert_eq!(
            (got_key.as_str(), got_line),
            (key, line),
            "message: {message}"
        );
        message
    }

    const V1: [&str; 4] = [
        "[[backend]]",
        "name = \"v1\"",
        "urls = [\"http://127.0.0.1:8081\"]",
        "weight = 1",
    ];

    const V2: [&str; 4] = [
        "[[backend]]",
        "name = \"v2\"",
        "urls = [\"http://127.0.0.1:8082\"]",
        "weight = 0",
    ];

    #[test]
    fn the_rollout_of_the_contract_parses_with_its_defaults() {
        let text = doc(&[
            &V1[..],
            &V2[..],
            &["[rollout]", "baseline = \"v1\"", "canary = \"v2\""][..],
        ]
        .concat());
        let rollout = valid(&text).rollout.unwrap();
        assert_eq!((rollout.baseline, rollout.canary), (0, 1));
        assert_eq!(rollout.steps, DEFAULT_ROLLOUT_STEPS);
        assert_eq!(rollout.step_time, Duration::from_secs(60));
        assert!(rollout.approve.is_empty() && rollout.webhook.is_none());
        assert_eq!(rollout.analysis, AnalysisConfig::default());
        let full = doc(&[
            &V1[..],
            &V2[..],
            &[
                "[rollout]",
                "baseline = \"v1\"",
                "canary = \"v2\"",
                "steps = [10, 100]",
                "step_time = \"30s\"",
                "approve = [100]",
                "webhook = \"http://127.0.0.1:9/hook\"",
                "[rollout.analysis]",
                "interval = \"1s\"",
                "min_requests = 0",
                "max_step_time = \"1m\"",
                "on_inconclusive = \"rollback\"",
                "error_tolerance = 0.02",
                "latency_tolerance = 1",
                "confidence = 0.999",
            ][..],
        ]
        .concat());
        let rollout = valid(&full).rollout.unwrap();
        assert_eq!(rollout.steps, [10, 100]);
        assert_eq!(rollout.approve, [100]);
        assert_eq!(rollout.analysis.on_inconclusive, OnInconclusive::Rollback);
        assert_eq!(rollout.analysis.latency_tolerance, 1.0);
        assert_eq!(rollout.analysis.min_requests, 0);
        assert!(rollout.shadow.is_none());
        assert_eq!(rollout.analysis.max_diff_rate, 0.01);
        assert!(valid(&doc(&[&V1[..], &V2[..]].concat())).rollout.is_none());
    }

    #[test]
    fn a_shadow_stage_parses_and_its_mirroring_must_be_to_the_canary_and_compare() {
        let with = |lines: &[&str]| {
            let head = [
                "[rollout]",
                "baseline = \"v1\"",
                "canary = \"v2\"",
                "shadow = \"5m\"",
            ];
            doc(&[&V1[..], &V2[..], &head[..], lines].concat())
        };
        let config = valid(&with(&["[rollout.analysis]", "max_diff_rate = 0.02"]));
        let rollout = config.rollout.unwrap();
        assert_eq!(rollout.shadow, Some(Duration::from_secs(300)));
        assert_eq!(rollout.analysis.max_diff_rate, 0.02);
        // [mirror] naming the canary and comparing is the stage's mirroring.
        assert!(
            valid(&with(&["[mirror]", "backend = \"v2\""]))
                .mirror
                .is_some()
        );
        // The [rollout] table starts on line 9; `shadow` is on line 12.
        for (lines, key, line, says) in [
            (
                &["[mirror]", "backend = \"v1\""][..],
                "rollout.shadow",
                12,
                "sends them to \"v1\"",
            ),
            (
                &["[mirror]", "backend = \"v2\"", "compare = false"][..],
                "rollout.shadow",
                12,
                "compare = true",
            ),
            (
                &[
                    "[[backend]]",
                    "name = \"v3\"",
                    "urls = [\"http://127.0.0.1:3\"]",
                    "weight = 1",
                    "[mirror]",
                    "backend = \"v2\"",
                    "from = \"v3\"",
                ][..],
                "rollout.shadow",
                12,
                "copies \"v3\"'s requests",
            ),
            (
                &["[rollout.analysis]", "max_diff_rate = 0.7"][..],
                "rollout.analysis.max_diff_rate",
                14,
                "below 0.5",
            ),
            (
                &["[rollout.analysis]", "max_diff_rate = 0"][..],
                "rollout.analysis.max_diff_rate",
                14,
                "at least 0.001",
            ),
        ] {
            let message = assert_invalid(&with(lines), key, line);
            assert!(message.contains(says), "{key}: {message}");
        }
        let zero = doc(&[
            &V1[..],
            &V2[..],
            &[
                "[rollout]",
                "baseline = \"v1\"",
                "canary = \"v2\"",
                "shadow = \"0s\"",
            ][..],
        ]
        .concat());
        let message = assert_invalid(&zero, "rollout.shadow", 12);
        assert!(message.contains("leave rollout.shadow out"), "{message}");
    }

    #[test]
    fn bad_rollouts_name_the_key_and_line() {
        let with = |lines: &[&str]| {
            let head = ["[rollout]", "baseline = \"v1\"", "canary = \"v2\""];
            doc(&[&V1[..], &V2[..], &head[..], lines].concat())
        };
        // The [rollout] table starts on line 9.
        for (lines, key, line, says) in [
            (
                &["steps = [5, 50]"][..],
                "rollout.steps",
                12,
                "last step must be 100",
            ),
            (
                &["steps = [50, 20, 100]"][..],
                "rollout.steps[1]",
                12,
                "must rise",
            ),
            (
                &["steps = [0, 100]"][..],
                "rollout.steps[0]",
                12,
                "from 1 to 100",
            ),
            (
                &["approve = [7]"][..],
                "rollout.approve[0]",
                12,
                "not one of the steps",
            ),
            (
                &["webhook = \"ftp://x/\""][..],
                "rollout.webhook",
                12,
                "http://",
            ),
            (
                &["step_time = \"0s\""][..],
                "rollout.step_time",
                12,
                "greater than 0",
            ),
            (
                &[
                    "step_time = \"5m\"",
                    "[rollout.analysis]",
                    "max_step_time = \"1m\"",
                ][..],
                "rollout.analysis.max_step_time",
                14,
                "at least rollout.step_time",
            ),
            (
                &["[rollout.analysis]", "confidence = 1.0"][..],
                "rollout.analysis.confidence",
                13,
                "below 1",
            ),
            (
                &["[rollout.analysis]", "error_tolerance = -0.1"][..],
                "rollout.analysis.error_tolerance",
                13,
                "at least 0",
            ),
            (
                &["[rollout.analysis]", "on_inconclusive = \"wait\""][..],
                "rollout.analysis.on_inconclusive",
                13,
                "hold",
            ),
            (
                &["[rollout.analysis]", "min_requests = -1"][..],
                "rollout.analysis.min_requests",
                13,
                "0 or more",
            ),
        ] {
            let message = assert_invalid(&with(lines), key, line);
            assert!(message.contains(says), "{key}: {message}");
        }
        let unknown = doc(&[
            &V1[..],
            &V2[..],
            &["[rollout]", "baseline = \"v1\"", "canary = \"v3\""][..],
        ]
        .concat());
        let message = assert_invalid(&unknown, "rollout.canary", 11);
        assert!(message.contains("backends: v1, v2"), "{message}");
        let same = doc(&[
            &V1[..],
            &V2[..],
            &["[rollout]", "baseline = \"v1\"", "canary = \"v1\""][..],
        ]
        .concat());
        assert_invalid(&same, "rollout.canary", 11);
        let missing = doc(&[&V1[..], &V2[..], &["[rollout]", "canary = \"v2\""][..]].concat());
        assert_invalid(&missing, "rollout.baseline", 9);
    }

    /// The example from PRODUCT.md, verbatim.
    const PRODUCT_EXAMPLE: &str = r#"[proxy]
listen = "127.0.0.1:8080"
connect_timeout = "2s"          # durations: "500ms", "2s", "1m"
request_timeout = "30s"         # until the upstream response head arrives -> 504
user_id_header = "x-user-id"    # optional: sticky user buckets read this header...
user_id_cookie = "uid"          # ...or, when the header is absent, this cookie
sticky_salt = ""                # optional, prefixed to the user id before hashing

[admin]
listen = "127.0.0.1:9901"
token_env = "CANARY_ADMIN_TOKEN" # or: token = "..." ; no default token exists

[[backend]]
name = "v1"
urls = ["http://127.0.0.1:8081"]  # one or more endpoints (instances) of this version
weight = 90                       # non-negative integer; any total > 0
[backend.health]                  # optional active check; without it only passive checks apply
path = "/health"
interval = "2s"
timeout = "1s"
unhealthy_threshold = 3           # consecutive failures to mark an endpoint down
healthy_threshold = 2             # consecutive passes to mark it up again

[[backend]]
name = "v2"
urls = ["http://127.0.0.1:8082"]
weight = 10

[[rule]]                          # tried in order; the first match pins the request
header = "x-canary"               # or: cookie = "NAME"
equals = "always"                 # or: matches = "REGEX", or: present = true
backend = "v2"
"#;

    #[test]
    fn product_example_parses_to_expected_values() {
        let config = valid(PRODUCT_EXAMPLE);
        assert_eq!(config.proxy.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.proxy.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.proxy.request_timeout, Duration::from_secs(30));
        assert_eq!(config.proxy.user_id_header.as_ref().unwrap(), "x-user-id");
        assert_eq!(config.proxy.user_id_cookie.as_deref(), Some("uid"));
        assert_eq!(config.proxy.sticky_salt, "");
        assert_eq!(config.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(config.admin.token, None);
        assert_eq!(
            config.admin.token_env.as_deref(),
            Some("CANARY_ADMIN_TOKEN")
        );

        assert_eq!(config.backends.len(), 2);
        let v1 = &config.backends[0];
        assert_eq!(v1.name, "v1");
        assert_eq!(v1.weight, 90);
        assert_eq!(v1.line, 13);
        assert_eq!(v1.endpoints.len(), 1);
        assert_eq!(v1.endpoints[0].url, "http://127.0.0.1:8081");
        assert_eq!(v1.endpoints[0].authority, "127.0.0.1:8081");
        let health = v1.health.as_ref().expect("v1 has a health check");
        assert_eq!(health.path, "/health");
        assert_eq!(health.interval, Duration::from_secs(2));
        assert_eq!(health.timeout, Duration::from_secs(1));
        assert_eq!(health.unhealthy_threshold, 3);
        assert_eq!(health.healthy_threshold, 2);
        let v2 = &config.backends[1];
        assert_eq!((v2.name.as_str(), v2.weight, v2.line), ("v2", 10, 24));
        assert!(v2.health.is_none());

        assert_eq!(config.rules.len(), 1);
        let rule = &config.rules[0];
        assert!(matches!(&rule.source, RuleSource::Header(h) if h == "x-canary"));
        assert!(matches!(&rule.matcher, RuleMatcher::Equals(v) if v == "always"));
        assert_eq!(rule.backend, 1);
        assert_eq!(rule.line, 29);
        assert_eq!(config.backend_index("v2"), Some(1));
    }

    #[test]
    fn bundled_demo_config_parses() {
        let config = valid(include_str!("../../canary.toml"));
        assert_eq!(config.proxy.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(config.admin.token, None);
        assert_eq!(config.admin.token_env, None);
        assert_eq!(config.proxy.user_id_header.as_ref().unwrap(), "x-user-id");
        assert_eq!(config.proxy.user_id_cookie.as_deref(), Some("uid"));
        let summary: Vec<_> = config
            .backends
            .iter()
            .map(|b| {
                (
                    b.name.as_str(),
                    b.endpoints[0].url.as_str(),
                    b.weight,
                    b.health.as_ref().map(|h| h.path.as_str()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("v1", "http://127.0.0.1:8081", 90, Some("/health")),
                ("v2", "http://127.0.0.1:8082", 10, Some("/health")),
            ]
        );
        assert_eq!(config.rules.len(), 1);
        assert_eq!(config.rules[0].backend, 1);
        assert_eq!(config.rules[0].source.to_string(), "header x-canary");
        assert_eq!(config.rules[0].matcher.to_string(), "equals \"always\"");
    }

    #[test]
    fn bundled_demo_config_spells_out_every_default() {
        let config = valid(include_str!("../../canary.toml"));
        let proxy = ProxySettings::default();
        assert_eq!(config.proxy.connect_timeout, proxy.connect_timeout);
        assert_eq!(config.proxy.request_timeout, proxy.request_timeout);
        assert_eq!(config.proxy.client_body_timeout, proxy.client_body_timeout);
        assert_eq!(config.proxy.read_timeout, proxy.read_timeout);
        assert_eq!(config.proxy.send_timeout, proxy.send_timeout);
        assert_eq!(config.proxy.header_read_timeout, proxy.header_read_timeout);
        assert_eq!(
            config.proxy.upstream_idle_timeout,
            proxy.upstream_idle_timeout
        );
        assert_eq!(config.proxy.shutdown_grace, proxy.shutdown_grace);
        assert_eq!(config.proxy.sticky_salt, proxy.sticky_salt);
        assert_eq!(
            config.proxy.sticky_cookie_max_age,
            proxy.sticky_cookie_max_age
        );
        assert_eq!(config.proxy.backend_header, proxy.backend_header);
        assert_eq!(config.backends[0].outlier, OutlierConfig::default());
        let text = include_str!("../../canary.toml");
        for key in [
            "listen",
            "connect_timeout",
            "request_timeout",
            "client_body_timeout",
            "read_timeout",
            "send_timeout",
            "header_read_timeout",
            "upstream_idle_timeout",
            "shutdown_grace",
            "user_id_header",
            "user_id_cookie",
            "sticky_salt",
            "sticky_cookie",
            "sticky_cookie_max_age",
            "backend_header",
            "# workers",
            "# token",
            "# token_env",
            "name",
            "urls",
            "weight",
            "path",
            "interval",
            "timeout",
            "unhealthy_threshold",
            "healthy_threshold",
            "consecutive_failures",
            "base_ejection",
            "max_ejection",
            "header",
            "# cookie",
            "equals",
            "# matches",
            "# present",
            "backend",
            "# backend",
            "# abort_percent",
            "# abort_status",
            "# delay_percent",
            "# delay",
            "# header",
            "# percent",
            "# methods",
            "# max_body",
            "# max_in_flight",
            "# timeout",
            "# compare",
            "# ignore_headers",
            "# ignore_fields",
            "# from",
            "# format",
            "# shadow",
            "# max_diff_rate",
            "# cert",
            "# key",
            "# server_name",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{key} = "))),
                "canary.toml does not show `{key}`"
            );
        }
    }

    #[test]
    fn good_fixture_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/good.toml");
        let config = load(&path).expect("good.toml is valid");
        assert_eq!(config.backends.len(), 2);
        assert!(config.backends[0].health.is_some());
        assert_eq!(config.rules.len(), 1);
    }

    #[test]
    fn every_bad_fixture_fails_at_its_expected_key_and_line() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("fixtures dir") {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("bad_") || !name.ends_with(".toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let expect = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("# expect: "))
                .unwrap_or_else(|| panic!("{name}: first line must be `# expect: KEY line N`"));
            let (key, line) = expect.rsplit_once(" line ").expect("`KEY line N`");
            let line: usize = line.trim().parse().expect("line number");
            match load(&path) {
                Err(ConfigError::Invalid {
                    path: origin,
                    line: got_line,
                    key: got_key,
                    message,
                }) => {
                    assert_eq!(
                        (got_key.as_str(), got_line),
                        (key, line),
                        "{name}: {message}"
                    );
                    assert_eq!(origin, path.display().to_string());
                }
                other => panic!("{name}: expected Invalid, got {other:?}"),
            }
            checked += 1;
        }
        assert!(checked >= 10, "only {checked} bad fixtures found");
    }

    #[test]
    fn defaults_fill_everything_optional() {
        let config = valid(&doc(&V1));
        let proxy = &config.proxy;
        assert_eq!(proxy.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(proxy.connect_timeout, Duration::from_secs(2));
        assert_eq!(proxy.request_timeout, Duration::from_secs(30));
        assert_eq!(proxy.header_read_timeout, Duration::from_secs(10));
        assert_eq!(proxy.upstream_idle_timeout, Duration::from_secs(30));
        assert_eq!(proxy.shutdown_grace, Duration::from_secs(30));
        assert_eq!(proxy.user_id_header, None);
        assert_eq!(proxy.user_id_cookie, None);
        assert_eq!(proxy.sticky_salt, "");
        assert_eq!(proxy.backend_header.as_ref().unwrap(), "x-canary-backend");
        assert_eq!(
            config.admin.listen,
            SocketAddr::from(([127, 0, 0, 1], 9901))
        );
        assert_eq!(config.admin.token, None);
        assert_eq!(config.admin.token_env, None);
        assert!(config.backends[0].health.is_none());
        assert_eq!(config.backends[0].line, 1);
        assert!(config.rules.is_empty());

        let with_health = valid(&doc(&[&V1[..], &["[backend.health]"]].concat()));
        let health = with_health.backends[0].health.as_ref().unwrap();
        assert_eq!(health.path, "/health");
        assert_eq!(health.interval, Duration::from_secs(2));
        assert_eq!(health.timeout, Duration::from_secs(1));
        assert_eq!(health.unhealthy_threshold, 3);
        assert_eq!(health.healthy_threshold, 2);
    }

    #[test]
    fn values_are_normalized() {
        let config = valid(&doc(&[
            "[proxy]",
            "user_id_header = \"X-User-Id\"",
            "backend_header = \"\"",
            "shutdown_grace = \"0s\"",
            "[[backend]]",
            "name = \"v1\"",
            "urls = [\"http://Example.com/\", \"http://[::1]:9000\", \"http://10.0.0.1:8080/\"]",
            "weight = 0",
            "[[backend]]",
            "name = \"v2\"",
            "urls = [\"http://127.0.0.1:8082\"]",
            "weight = 1000000",
            "[[rule]]",
            "cookie = \"beta\"",
            "matches = \"^yes\"",
            "backend = \"v1\"",
            "[[rule]]",
            "header = \"X-Debug\"",
            "present = true",
            "backend = \"v2\"",
        ]));
        assert_eq!(config.proxy.user_id_header.as_ref().unwrap(), "x-user-id");
        assert_eq!(config.proxy.backend_header, None);
        assert_eq!(config.proxy.shutdown_grace, Duration::ZERO);
        let endpoints = &config.backends[0].endpoints;
        assert_eq!(endpoints[0].url, "http://Example.com");
        assert_eq!(endpoints[0].authority, "example.com:80");
        assert_eq!(endpoints[1].authority, "[::1]:9000");
        assert_eq!(endpoints[2].url, "http://10.0.0.1:8080");
        assert_eq!(config.backends[1].weight, MAX_WEIGHT);
        assert!(matches!(&config.rules[0].source, RuleSource::Cookie(c) if c == "beta"));
        assert!(matches!(&config.rules[0].matcher, RuleMatcher::Matches(r) if r.is_match("yes!")));
        assert_eq!(config.rules[0].line, 13);
        assert!(matches!(&config.rules[1].source, RuleSource::Header(h) if h == "x-debug"));
        assert!(matches!(config.rules[1].matcher, RuleMatcher::Present));
        assert_eq!(config.rules[1].matcher.to_string(), "present");
    }

    #[test]
    fn unknown_key_at_top_level() {
        let message = assert_invalid(
            &doc(&[&V1[..], &["", "[backends]", "x = 1"]].concat()),
            "backends",
            6,
        );
        assert!(message.contains("did you mean `backend`?"), "{message}");
        assert!(message.contains("proxy, admin, backend, rule"), "{message}");
    }

    #[test]
    fn unknown_key_in_proxy() {
        let message = assert_invalid(
            &doc(&[
                &[
                    "[proxy]",
                    "listen = \"127.0.0.1:8080\"",
                    "conect_timeout = \"1s\"",
                ][..],
                &V1,
            ]
            .concat()),
            "proxy.conect_timeout",
            3,
        );
        assert!(
            message.contains("did you mean `connect_timeout`?"),
            "{message}"
        );
    }

    #[test]
    fn unknown_key_in_backend() {
        let message = assert_invalid(
            &doc(&[
                &V1[..],
                &[
                    "[[backend]]",
                    "name = \"v2\"",
                    "urls = [\"http://h\"]",
                    "weigth = 1",
                ],
            ]
            .concat()),
            "backend[1].weigth",
            8,
        );
        assert!(
            message.starts_with("unknown key (did you mean `weight`?)"),
            "{message}"
        );
        assert!(
            message.contains("name, urls, weight, protocol, health"),
            "{message}"
        );
    }

    #[test]
    fn unknown_key_in_backend_health() {
        assert_invalid(
            &doc(&[
                &V1[..],
                &[
                    "[backend.health]",
                    "path = \"/ready\"",
                    "intervall = \"1s\"",
                ],
            ]
            .concat()),
            "backend[0].health.intervall",
            7,
        );
    }

    #[test]
    fn unknown_key_in_rule() {
        let message = assert_invalid(
            &doc(&[
                &V1[..],
                &[
                    "[[rule]]",
                    "header = \"x\"",
                    "equal = \"y\"",
                    "backend = \"v1\"",
                ],
            ]
            .concat()),
            "rule[0].equal",
            7,
        );
        assert!(message.contains("did you mean `equals`?"), "{message}");
    }

    #[test]
    fn duplicate_backend_names() {
        let message = assert_invalid(&doc(&[&V1[..], &V1[..]].concat()), "backend[1].name", 6);
        assert!(
            message.contains("duplicate backend name `v1` (first declared at line 1)"),
            "{message}"
        );
    }

    #[test]
    fn invalid_backend_names() {
        let mut lines = V1;
        lines[1] = "name = \"v 1\"";
        assert_invalid(&doc(&lines), "backend[0].name", 2);
        lines[1] = "name = \"\"";
        assert_invalid(&doc(&lines), "backend[0].name", 2);
        assert_invalid(&doc(&[V1[0], V1[2], V1[3]]), "backend[0].name", 1);
    }

    #[test]
    fn rule_with_unknown_backend() {
        let message = assert_invalid(
            &doc(&[
                &V1[..],
                &[
                    "[[rule]]",
                    "cookie = \"c\"",
                    "present = true",
                    "backend = \"v9\"",
                ],
            ]
            .concat()),
            "rule[0].backend",
            8,
        );
        assert!(
            message.contains("unknown backend `v9`; declared backends: v1"),
            "{message}"
        );
    }

    #[test]
    fn a_backend_protocol_is_read_and_checked_against_its_urls() {
        assert_eq!(
            valid(&doc(&V1)).backends[0].protocol,
            UpstreamProtocol::Http1
        );
        for (value, protocol) in [
            ("http1", UpstreamProtocol::Http1),
            ("h2c", UpstreamProtocol::H2c),
        ] {
            let line = format!("protocol = \"{value}\"");
            let config = valid(&doc(&[&V1[..], &[line.as_str()][..]].concat()));
            assert_eq!(config.backends[0].protocol, protocol);
        }
        let with = |line: &str| doc(&[&V1[..], &[line][..]].concat());
        let message = assert_invalid(&with("protocol = \"http2\""), "backend[0].protocol", 5);
        assert!(message.contains("\"http1\", \"h2c\", \"h2\""), "{message}");
        // h2 is over TLS: not with http:// URLs.
        let message = assert_invalid(&with("protocol = \"h2\""), "backend[0].protocol", 5);
        assert!(
            message.contains("https://") && message.contains("h2c"),
            "{message}"
        );
        let message = assert_invalid(&with("protocol = 2"), "backend[0].protocol", 5);
        assert!(message.contains("string"), "{message}");
    }

    #[test]
    fn rule_with_invalid_regex() {
        let message = assert_invalid(
            &doc(&[
                &V1[..],
                &[
                    "[[rule]]",
                    "header = \"x\"",
                    "matches = \"(a|b\"",
                    "backend = \"v1\"",
                ],
            ]
            .concat()),
            "rule[0].matches",
            7,
        );
        assert!(message.contains("unclosed group"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    fn url_error(url: &str) -> String {
        let text = doc(&[
            "[[backend]]",
            "name = \"v1\"",
            "urls = [",
            "  \"http://127.0.0.1:8081\",",
            &format!("  {url:?},"),
            "]",
            "weight = 1",
        ]);
        assert_invalid(&text, "backend[0].urls[1]", 5)
    }

    #[test]
    fn https_urls_are_tls_endpoints_with_443_by_default() {
        let url: EndpointUrl = "https://api.example.com".parse().unwrap();
        assert!(url.tls);
        assert_eq!(url.authority.as_str(), "api.example.com:443");
        let url: EndpointUrl = "HTTPS://127.0.0.1:8443/".parse().unwrap();
        assert!(url.tls);
        assert_eq!(url.authority.as_str(), "127.0.0.1:8443");
        let plain: EndpointUrl = "http://api.example.com".parse().unwrap();
        assert!(!plain.tls);
        assert_eq!(plain.authority.as_str(), "api.example.com:80");
    }

    #[test]
    fn backend_tls_applies_to_https_urls_and_names_its_files_and_keys() {
        // Without the table an https backend verifies against the system's store.
        let config = valid(&doc(&[
            "[[backend]]",
            "name = \"v1\"",
            "urls = [\"https://127.0.0.1:8443\", \"http://127.0.0.1:8080\"]",
            "weight = 1",
        ]));
        let tls = config.backends[0].tls.as_ref().unwrap();
        assert!(!tls.insecure_skip_verify && tls.ca.is_none());

        let plain = doc(&[
            "[[backend]]",
            "name = \"v1\"",
            "urls = [\"http://127.0.0.1:8080\"]",
            "weight = 1",
            "[backend.tls]",
            "insecure_skip_verify = true",
        ]);
        let (line, key, message) = invalid(&plain);
        assert_eq!((line, key.as_str()), (5, "backend[0].tls"));
        assert!(message.contains("https://"), "{message}");

        // A relative `ca` is found beside the config file, and a missing one is named.
        let dir = tempfile::tempdir().unwrap();
        let text = doc(&[
            "[[backend]]",
            "name = \"v1\"",
            "urls = [\"https://127.0.0.1:8443\"]",
            "weight = 1",
            "[backend.tls]",
            "ca = \"certs/ca.pem\"",
        ]);
        let origin = "canary.toml";
        match parse_relative_to(&text, origin, dir.path()) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => {
                assert_eq!((line, key.as_str()), (6, "backend[0].tls.ca"));
                assert!(message.contains("certs/ca.pem"), "{message}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).unwrap();
        std::fs::write(dir.path().join("certs/ca.pem"), ca.cert.pem()).unwrap();
        let config = parse_relative_to(&text, origin, dir.path()).unwrap();
        let tls = config.backends[0].tls.as_ref().unwrap();
        assert_eq!(
            tls.ca.as_deref(),
            Some(dir.path().join("certs/ca.pem").as_path())
        );
    }

    #[test]
    fn malformed_urls() {
        assert!(url_error("127.0.0.1:8082").contains("no scheme; write `http://127.0.0.1:8082`"));
        assert!(url_error("ftp://h").contains("unsupported scheme"));
        assert!(url_error("http://127.0.0.1:8082/v2").contains("path is not allowed"));
        assert!(url_error("http://127.0.0.1:8082/?a=b").contains("query"));
        assert!(url_error("http://127.0.0.1:99999").contains("invalid port"));
        assert!(url_error("http://127.0.0.1:0").contains("invalid port"));
        assert!(url_error("http://127.0.0.1:").contains("invalid port"));
        assert!(url_error("http://127.0.0.1:8x").contains("invalid port"));
        assert!(url_error("http://user:pw@127.0.0.1:8082").contains("credentials"));
        assert!(url_error("http://:8082").contains("no host"));
        assert!(url_error("http://h/#top").contains("fragments"));
        assert!(url_error("http://exa mple").contains("not a valid URL"));
        assert!(url_error("").contains("not a valid URL"));
        assert!(url_error("http://127.0.0.1:8081/").contains("duplicate endpoint"));
    }

    #[test]
    fn empty_or_missing_urls() {
        assert_invalid(
            &doc(&["[[backend]]", "name = \"v1\"", "urls = []", "weight = 1"]),
            "backend[0].urls",
            3,
        );
        assert_invalid(
            &doc(&["[[backend]]", "name = \"v1\"", "weight = 1"]),
            "backend[0].urls",
            1,
        );
    }

    #[test]
    fn malformed_durations() {
        for (value, expected) in [
            ("\"1.5s\"", "fractions"),
            ("\"10\"", "missing unit"),
            ("\"\"", "empty"),
            ("\"2 s\"", "whitespace"),
            ("\"0s\"", "greater than 0"),
            ("2", "expected a duration string"),
        ] {
            let text =
                doc(&[&["[proxy]", &format!("connect_timeout = {value}")][..], &V1].concat());
            let message = assert_invalid(&text, "proxy.connect_timeout", 2);
            assert!(message.contains(expected), "{value}: {message}");
        }
        let health = doc(&[&V1[..], &["[backend.health]", "interval = \"0ms\""]].concat());
        assert_invalid(&health, "backend[0].health.interval", 6);
    }

    #[test]
    fn all_weights_zero() {
        let mut v1 = V1.to_vec();
        v1[3] = "weight = 0";
        let text = doc(&[
            &["# comment", ""][..],
            &v1,
            &[
                "[[backend]]",
                "name = \"v2\"",
                "urls = [\"http://h\"]",
                "weight = 0",
            ],
        ]
        .concat());
        let message = assert_invalid(&text, "backend", 3);
        assert_eq!(
            message,
            "all backend weights are 0; at least one must be > 0"
        );
    }

    #[test]
    fn negative_and_out_of_range_weights() {
        let mut lines = V1;
        lines[3] = "weight = -5";
        let message = assert_invalid(&doc(&lines), "backend[0].weight", 4);
        assert!(
            message.contains("non-negative integer, got -5"),
            "{message}"
        );
        lines[3] = "weight = 1000001";
        let message = assert_invalid(&doc(&lines), "backend[0].weight", 4);
        assert!(message.contains("at most 1000000"), "{message}");
        assert_invalid(&doc(&V1[..3]), "backend[0].weight", 1);
    }

    #[test]
    fn non_integer_weights() {
        for value in ["2.5", "\"ten\"", "true", "[1]"] {
            let line = format!("weight = {value}");
            let lines = [V1[0], V1[1], V1[2], &line];
            let message = assert_invalid(&doc(&lines), "backend[0].weight", 4);
            assert!(
                message.contains("expected an integer"),
                "{value}: {message}"
            );
        }
    }

    #[test]
    fn health_check_values() {
        let bad = |line: &str| doc(&[&V1[..], &["[backend.health]", line]].concat());
        assert_invalid(&bad("path = \"health\""), "backend[0].health.path", 6);
        assert_invalid(
            &bad("unhealthy_threshold = 0"),
            "backend[0].health.unhealthy_threshold",
            6,
        );
        assert_invalid(
            &bad("healthy_threshold = -1"),
            "backend[0].health.healthy_threshold",
            6,
        );
        assert_invalid(&bad("timeout = \"soon\""), "backend[0].health.timeout", 6);
    }

    #[test]
    fn outlier_defaults_and_values() {
        assert_eq!(
            valid(&doc(&V1)).backends[0].outlier,
            OutlierConfig::default()
        );
        let defaults = OutlierConfig::default();
        assert_eq!(defaults.consecutive_failures, 5);
        assert_eq!(defaults.base_ejection, Duration::from_secs(30));
        assert_eq!(defaults.max_ejection, Duration::from_secs(300));
        let text = doc(&[
            &V1[..],
            &[
                "[backend.outlier]",
                "consecutive_failures = 3",
                "base_ejection = \"300ms\"",
                "max_ejection = \"2s\"",
            ],
        ]
        .concat());
        assert_eq!(
            valid(&text).backends[0].outlier,
            OutlierConfig {
                consecutive_failures: 3,
                base_ejection: Duration::from_millis(300),
                max_ejection: Duration::from_secs(2),
            }
        );
        let off = doc(&[&V1[..], &["[backend.outlier]", "consecutive_failures = 0"]].concat());
        assert_eq!(valid(&off).backends[0].outlier.consecutive_failures, 0);
        let equal = doc(&[
            &V1[..],
            &[
                "[backend.outlier]",
                "base_ejection = \"1m\"",
                "max_ejection = \"60s\"",
            ],
        ]
        .concat());
        assert_eq!(
            valid(&equal).backends[0].outlier.max_ejection,
            Duration::from_secs(60)
        );
        // Health and outlier tables may come in either order.
        let both = doc(&[
            &V1[..],
            &["[backend.outlier]", "consecutive_failures = 2"],
            &["[backend.health]", "path = \"/ready\""],
        ]
        .concat());
        let backend = &valid(&both).backends[0];
        assert_eq!(backend.outlier.consecutive_failures, 2);
        assert_eq!(backend.health.as_ref().unwrap().path, "/ready");
    }

    #[test]
    fn outlier_errors_name_key_and_line() {
        let bad = |lines: &[&str]| doc(&[&V1[..], &["[backend.outlier]"], lines].concat());
        let message = assert_invalid(
            &bad(&["consecutive_failures = -1"]),
            "backend[0].outlier.consecutive_failures",
            6,
        );
        assert!(message.contains("0 (off)"), "{message}");
        assert_invalid(
            &bad(&["consecutive_failures = \"5\""]),
            "backend[0].outlier.consecutive_failures",
            6,
        );
        let message = assert_invalid(
            &bad(&["base_ejection = \"0s\""]),
            "backend[0].outlier.base_ejection",
            6,
        );
        assert!(message.contains("greater than 0"), "{message}");
        assert_invalid(
            &bad(&["max_ejection = \"5 m\""]),
            "backend[0].outlier.max_ejection",
            6,
        );
        let message = assert_invalid(
            &bad(&["base_ejection = \"10s\"", "max_ejection = \"9s\""]),
            "backend[0].outlier.max_ejection",
            7,
        );
        assert_eq!(message, "must be at least base_ejection (10s), got 9s");
        let message = assert_invalid(
            &bad(&["base_ejection = \"10m\""]),
            "backend[0].outlier.base_ejection",
            6,
        );
        assert!(message.contains("set max_ejection too"), "{message}");
        let message = assert_invalid(
            &bad(&["consecutive_failure = 3"]),
            "backend[0].outlier.consecutive_failure",
            6,
        );
        assert!(
            message.contains("did you mean `consecutive_failures`?"),
            "{message}"
        );
    }

    #[test]
    fn both_token_and_token_env() {
        let text = doc(&[
            &["[admin]", "token = \"secret\"", "token_env = \"TOKEN\""][..],
            &V1,
        ]
        .concat());
        let message = assert_invalid(&text, "admin.token_env", 3);
        assert!(message.contains("not both"), "{message}");
        let text = doc(&[
            &["[admin]", "token_env = \"TOKEN\"", "token = \"secret\""][..],
            &V1,
        ]
        .concat());
        assert_invalid(&text, "admin.token", 3);
    }

    #[test]
    fn empty_tokens() {
        assert_invalid(
            &doc(&[&["[admin]", "token = \"\""][..], &V1].concat()),
            "admin.token",
            2,
        );
        assert_invalid(
            &doc(&[&["[admin]", "token_env = \"\""][..], &V1].concat()),
            "admin.token_env",
            2,
        );
    }

    #[test]
    fn non_loopback_admin_needs_a_token() {
        let open = doc(&[&["[admin]", "listen = \"0.0.0.0:9901\""][..], &V1].concat());
        let message = assert_invalid(&open, "admin.listen", 2);
        assert!(
            message.contains("needs `token` or `token_env`"),
            "{message}"
        );
        let guarded = doc(&[
            &["[admin]", "listen = \"0.0.0.0:9901\"", "token_env = \"T\""][..],
            &V1,
        ]
        .concat());
        assert_eq!(valid(&guarded).admin.token_env.as_deref(), Some("T"));
    }

    #[test]
    fn admin_allowed_hosts() {
        let admin = |line: &str| doc(&[&["[admin]", line][..], &V1].concat());
        assert!(valid(&V1.join("\n")).admin.allowed_hosts.is_empty());
        assert_eq!(
            valid(&admin(
                "allowed_hosts = [\"Canary.Internal\", \"ops.example.com.\"]"
            ))
            .admin
            .allowed_hosts,
            ["canary.internal", "ops.example.com"]
        );
        for bad in [
            "\"canary.internal:9901\"",
            "\"http://canary.internal\"",
            "\"*.example.com\"",
            "\"\"",
            "\"a..b\"",
            "\"two words\"",
        ] {
            let message = assert_invalid(
                &admin(&format!("allowed_hosts = [\"ok.example\", {bad}]")),
                "admin.allowed_hosts[1]",
                2,
            );
            assert!(message.contains("is not a host name"), "{message}");
        }
        assert_invalid(&admin("allowed_hosts = [1]"), "admin.allowed_hosts[0]", 2);
    }

    #[test]
    fn admin_connection_limits() {
        let admin = |line: &str| doc(&[&["[admin]", line][..], &V1].concat());
        let defaults = valid(&V1.join("\n")).admin;
        assert_eq!(defaults.max_connections, 64);
        assert_eq!(defaults.header_read_timeout, Duration::from_secs(10));
        let set = valid(&admin(
            "max_connections = 8\nheader_read_timeout = \"250ms\"",
        ))
        .admin;
        assert_eq!(set.max_connections, 8);
        assert_eq!(set.header_read_timeout, Duration::from_millis(250));
        for bad in ["0", "-1", "10001", "\"64\""] {
            assert_invalid(
                &admin(&format!("max_connections = {bad}")),
                "admin.max_connections",
                2,
            );
        }
        for bad in ["\"0s\"", "\"10\"", "10"] {
            assert_invalid(
                &admin(&format!("header_read_timeout = {bad}")),
                "admin.header_read_timeout",
                2,
            );
        }
    }

    #[test]
    fn listen_addresses() {
        let text = doc(&[&["[proxy]", "listen = \"localhost:8080\""][..], &V1].concat());
        assert!(assert_invalid(&text, "proxy.listen", 2).contains("IP:PORT"));
        let clash = doc(&[&["[proxy]", "listen = \"127.0.0.1:9901\""][..], &V1].concat());
        assert_invalid(&clash, "proxy.listen", 2);
        let ephemeral = doc(&[
            &[
                "[proxy]",
                "listen = \"127.0.0.1:0\"",
                "[admin]",
                "listen = \"127.0.0.1:0\"",
            ][..],
            &V1,
        ]
        .concat());
        assert_eq!(valid(&ephemeral).proxy.listen.port(), 0);
    }

    #[test]
    fn faults() {
        let with = |lines: &[&str]| doc(&[&V1[..], &V2[..], &["[[fault]]"], lines].concat());
        let config = valid(&with(&[
            "backend = \"v2\"",
            "abort_percent = 5",
            "abort_status = 500",
            "delay_percent = 12.5",
            "delay = \"200ms\"",
            "header = \"x-fault\"",
        ]));
        let fault = &config.faults[0];
        assert_eq!(fault.backend, "v2");
        assert_eq!((fault.abort_percent, fault.delay_percent), (5.0, 12.5));
        assert_eq!(fault.abort_status, http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(fault.delay, Duration::from_millis(200));
        assert_eq!(fault.header.as_ref().unwrap(), "x-fault");
        assert!(valid(&doc(&V1)).faults.is_empty());
        // Lines: V1 and V2 take 1-8, [[fault]] is line 9.
        assert_invalid(
            &with(&["backend = \"v3\"", "abort_percent = 5"]),
            "fault[0].backend",
            10,
        );
        let over = assert_invalid(
            &with(&["backend = \"v2\"", "abort_percent = 101"]),
            "fault[0].abort_percent",
            11,
        );
        assert!(over.contains("0 to 100"), "{over}");
        assert_invalid(
            &with(&["backend = \"v2\"", "abort_percent = 5", "abort_status = 99"]),
            "fault[0].abort_status",
            12,
        );
        assert_invalid(
            &with(&["backend = \"v2\"", "delay_percent = 5"]),
            "fault[0].delay",
            9,
        );
        assert_invalid(&with(&["backend = \"v2\""]), "fault[0].abort_percent", 9);
        assert_invalid(&with(&["abort_percent = 5"]), "fault[0].backend", 9);
        assert_invalid(
            &with(&["backend = \"v2\"", "abort_percent = 5", "abort = 1"]),
            "fault[0].abort",
            12,
        );
        let twice = doc(&[
            &V1[..],
            &V2[..],
            &["[[fault]]", "backend = \"v2\"", "abort_percent = 5"],
            &[
                "[[fault]]",
                "backend = \"v2\"",
                "delay_percent = 5",
                "delay = \"1s\"",
            ],
        ]
        .concat());
        let message = assert_invalid(&twice, "fault[1].backend", 13);
        assert!(message.contains("one fault per backend"), "{message}");
    }

    #[test]
    fn mirroring() {
        let with = |lines: &[&str]| doc(&[&V1[..], &V2[..], &["[mirror]"], lines].concat());
        let config = valid(&with(&[
            "backend = \"v2\"",
            "percent = 50",
            "methods = [\"GET\"]",
            "max_body = \"1MiB\"",
            "max_in_flight = 10",
            "timeout = \"2s\"",
            "compare = false",
            "ignore_headers = [\"x-trace\"]",
            "ignore_fields = [\"ts\"]",
        ]));
        let mirror = config.mirror.unwrap();
        assert_eq!((mirror.backend.as_str(), mirror.percent), ("v2", 50.0));
        assert_eq!((mirror.max_body, mirror.max_in_flight), (1 << 20, 10));
        assert_eq!(mirror.timeout, Duration::from_secs(2));
        assert!(!mirror.compare);
        assert_eq!(mirror.ignore_headers[0], "x-trace");
        assert_eq!(mirror.ignore_fields, ["ts"]);
        assert!(valid(&doc(&V1)).mirror.is_none());
        // V1 and V2 take lines 1-8, [mirror] is line 9.
        assert_invalid(&with(&["backend = \"v3\""]), "mirror.backend", 10);
        assert_invalid(&with(&["percent = 5"]), "mirror.backend", 9);
        assert_invalid(
            &with(&["backend = \"v2\"", "max_body = \"64kb\""]),
            "mirror.max_body",
            11,
        );
        assert_invalid(
            &with(&["backend = \"v2\"", "methods = [\"get\"]"]),
            "mirror.methods",
            11,
        );
        assert_invalid(
            &with(&["backend = \"v2\"", "copies = 1"]),
            "mirror.copies",
            11,
        );
        // `from`: whose requests are copied; a backend of the table, not the mirror's own.
        let from = valid(&with(&["backend = \"v2\"", "from = \"v1\""]));
        assert_eq!(from.mirror.unwrap().from.as_deref(), Some("v1"));
        assert_invalid(
            &with(&["backend = \"v2\"", "from = \"v3\""]),
            "mirror.from",
            11,
        );
        let own = assert_invalid(
            &with(&["backend = \"v2\"", "from = \"v2\""]),
            "mirror.from",
            11,
        );
        assert!(own.contains("gets the copies"), "{own}");
    }

    #[test]
    fn the_log_format() {
        let with = |lines: &[&str]| doc(&[&V1[..], &["[log]"], lines].concat());
        assert_eq!(valid(&doc(&V1)).log.format, LogFormat::Text);
        assert_eq!(
            valid(&with(&["format = \"json\""])).log.format,
            LogFormat::Json
        );
        assert_eq!(
            valid(&with(&["format = \"text\""])).log.format,
            LogFormat::Text
        );
        // V1 takes lines 1-4, [log] is line 5.
        let message = assert_invalid(&with(&["format = \"xml\""]), "log.format", 6);
        assert!(message.contains("\"text\", \"json\""), "{message}");
        assert_invalid(&with(&["level = \"info\""]), "log.level", 6);
    }

    #[test]
    fn the_access_log() {
        let with = |lines: &[&str]| doc(&[&V1[..], &["[log]"], lines].concat());
        assert_eq!(valid(&doc(&V1)).log.access, AccessLog::Off);
        assert_eq!(valid(&with(&[])).log.access, AccessLog::Off);
        let json = valid(&with(&["access = \"json\""])).log;
        assert_eq!(
            (json.access, json.format),
            (AccessLog::Json, LogFormat::Text)
        );
        assert_eq!(
            valid(&with(&["access = \"off\""])).log.access,
            AccessLog::Off
        );
        // V1 takes lines 1-4, [log] is line 5; the bad value is on line 7.
        let message = assert_invalid(
            &with(&["format = \"json\"", "access = \"on\""]),
            "log.access",
            7,
        );
        assert!(message.contains("\"off\", \"json\""), "{message}");
        assert_invalid(&with(&["access = true"]), "log.access", 6);
    }

    #[test]
    fn the_sticky_cookie() {
        let proxy = |lines: &[&str]| doc(&[&["[proxy]"][..], lines, &V1].concat());
        let config = valid(&proxy(&["sticky_cookie = \"canary_uid\""]));
        assert_eq!(config.proxy.sticky_cookie.as_deref(), Some("canary_uid"));
        assert_eq!(
            config.proxy.sticky_cookie_max_age,
            Duration::from_secs(30 * 24 * 3600)
        );
        let config = valid(&proxy(&[
            "sticky_cookie = \"v\"",
            "sticky_cookie_max_age = \"1h\"",
        ]));
        assert_eq!(
            config.proxy.sticky_cookie_max_age,
            Duration::from_secs(3600)
        );
        assert_eq!(valid(&proxy(&[])).proxy.sticky_cookie, None);
        assert_invalid(
            &proxy(&["sticky_cookie = \"a b\""]),
            "proxy.sticky_cookie",
            2,
        );
        assert_invalid(&proxy(&["sticky_cookie = \"\""]), "proxy.sticky_cookie", 2);
        let same = assert_invalid(
            &proxy(&["user_id_cookie = \"uid\"", "sticky_cookie = \"uid\""]),
            "proxy.sticky_cookie",
            3,
        );
        assert!(same.contains("user_id_cookie"), "{same}");
        for prefixed in ["__Host-uid", "__secure-uid"] {
            let message = assert_invalid(
                &proxy(&[&format!("sticky_cookie = \"{prefixed}\"")]),
                "proxy.sticky_cookie",
                2,
            );
            assert!(message.contains("Secure"), "{message}");
        }
        let fraction = assert_invalid(
            &proxy(&["sticky_cookie_max_age = \"1500ms\""]),
            "proxy.sticky_cookie_max_age",
            2,
        );
        assert!(fraction.contains("whole seconds"), "{fraction}");
        assert_invalid(
            &proxy(&["sticky_cookie_max_age = \"0s\""]),
            "proxy.sticky_cookie_max_age",
            2,
        );
    }

    #[test]
    fn header_and_cookie_names() {
        let proxy = |line: &str| doc(&[&["[proxy]", line][..], &V1].concat());
        assert_invalid(
            &proxy("user_id_header = \"x user\""),
            "proxy.user_id_header",
            2,
        );
        assert_invalid(&proxy("user_id_header = \"\""), "proxy.user_id_header", 2);
        assert_invalid(
            &proxy("user_id_cookie = \"a=b\""),
            "proxy.user_id_cookie",
            2,
        );
        assert_invalid(&proxy("user_id_cookie = \"\""), "proxy.user_id_cookie", 2);
        assert_invalid(
            &proxy("backend_header = \"x:y\""),
            "proxy.backend_header",
            2,
        );
    }

    fn rule(lines: &[&str]) -> String {
        doc(&[&V1[..], &["[[rule]]"], lines].concat())
    }

    #[test]
    fn rule_with_both_header_and_cookie() {
        let message = assert_invalid(
            &rule(&[
                "header = \"x\"",
                "cookie = \"c\"",
                "present = true",
                "backend = \"v1\"",
            ]),
            "rule[0].cookie",
            7,
        );
        assert!(message.contains("not both"), "{message}");
    }

    #[test]
    fn rule_with_neither_header_nor_cookie() {
        assert_invalid(&rule(&["equals = \"x\"", "backend = \"v1\""]), "rule[0]", 5);
    }

    #[test]
    fn rule_with_two_matchers() {
        let message = assert_invalid(
            &rule(&[
                "header = \"x\"",
                "equals = \"a\"",
                "matches = \"b\"",
                "backend = \"v1\"",
            ]),
            "rule[0].matches",
            8,
        );
        assert!(message.contains("only one of"), "{message}");
    }

    #[test]
    fn rule_without_matcher_or_backend() {
        assert_invalid(&rule(&["header = \"x\"", "backend = \"v1\""]), "rule[0]", 5);
        assert_invalid(
            &rule(&["header = \"x\"", "present = true"]),
            "rule[0].backend",
            5,
        );
    }

    #[test]
    fn rule_with_present_false() {
        let message = assert_invalid(
            &rule(&["header = \"x\"", "present = false", "backend = \"v1\""]),
            "rule[0].present",
            7,
        );
        assert_eq!(message, "present must be true; omit the rule instead");
    }

    #[test]
    fn no_backends() {
        let message = assert_invalid(
            &doc(&["[proxy]", "listen = \"127.0.0.1:8080\""]),
            "backend",
            1,
        );
        assert!(message.contains("no backends"), "{message}");
        assert_invalid(&doc(&["", "backend = []"]), "backend", 2);
    }

    #[test]
    fn toml_syntax_errors() {
        let unquoted = doc(&[&["[proxy]", "listen = 127.0.0.1:8080"][..], &V1].concat());
        let message = assert_invalid(&unquoted, "proxy.listen", 2);
        assert!(message.starts_with("invalid TOML: "), "{message}");
        let duplicate = doc(&[&V1[..], &["weight = 2"]].concat());
        assert_invalid(&duplicate, "backend[0].weight", 5);
        let unclosed = doc(&["[[backend]", "name = \"v1\""]);
        assert_invalid(&unclosed, "backend", 1);
        let hint = doc(&[&["[proxy]", "connect_timeout = 2s"][..], &V1].concat());
        let message = assert_invalid(&hint, "proxy.connect_timeout", 2);
        assert!(
            message.ends_with("(strings must be quoted: connect_timeout = \"2s\")"),
            "{message}"
        );
        assert_invalid(&doc(&["[proxy]", "garbage"]), "proxy.garbage", 2);
        let unterminated = doc(&[&["[proxy]", "sticky_salt = \"abc"][..], &V1].concat());
        assert_invalid(&unterminated, "proxy.sticky_salt", 2);
    }

    #[test]
    fn wrong_table_shapes_are_errors() {
        assert_invalid(&doc(&[&["proxy = 5"][..], &V1].concat()), "proxy", 1);
        let message = assert_invalid(&doc(&["[backend]", "name = \"v1\""]), "backend", 1);
        assert!(
            message.ends_with("write `[[backend]]` (an array of tables)"),
            "{message}"
        );
        let text = doc(&[
            "[[backend]]",
            "name = \"v1\"",
            "urls = \"http://h\"",
            "weight = 1",
        ]);
        let message = assert_invalid(&text, "backend[0].urls", 3);
        assert!(message.contains("write a list"), "{message}");
    }

    #[test]
    fn unreadable_file_is_a_read_error() {
        let err = load(Path::new("/nonexistent/canary.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        // The message names the file; the cause is its source, not repeated in it.
        assert_eq!(
            err.to_string(),
            "/nonexistent/canary.toml: cannot read config"
        );
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        assert!(
            cause.as_deref().is_some_and(|c| c.contains("No such file")),
            "{cause:?}"
        );
    }

    #[test]
    fn error_display_names_file_line_and_key() {
        let err = parse(&doc(&[&V1[..], &["weigth = 2"]].concat()), "canary.toml").unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.starts_with("canary.toml:5: `backend[0].weigth`: unknown key"),
            "{shown}"
        );
    }

    #[test]
    fn never_panics_on_truncated_or_mangled_input() {
        let text = include_str!("../../canary.toml");
        for (end, _) in text.char_indices() {
            let _ = parse(&text[..end], "cut.toml");
        }
        for garbage in [
            "[[",
            "]]",
            "=",
            "\"",
            "[a.b]\n[a]\nb=1",
            "a={",
            "\u{feff}x=1",
            "[[rule]]\n[rule.x]",
        ] {
            let _ = parse(garbage, "garbage.toml");
        }
    }

    #[test]
    fn too_many_backends_and_the_reserved_name_are_errors() {
        let mut text = String::new();
        for n in 0..65 {
            text.push_str(&format!(
                "[[backend]]\nname = \"b{n}\"\nurls = [\"http://127.0.0.1:{}\"]\nweight = 1\n",
                1000 + n
            ));
        }
        let error = parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            error.contains("`backend[64]`") && error.contains("at most 64"),
            "{error}"
        );
        assert!(error.starts_with("t.toml:257:"), "{error}");
        let reserved =
            "[[backend]]\nname = \"none\"\nurls = [\"http://127.0.0.1:1\"]\nweight = 1\n";
        let error = parse(reserved, "t.toml").unwrap_err().to_string();
        assert!(
            error.contains("`backend[0].name`") && error.contains("reserved"),
            "{error}"
        );
    }

    #[test]
    fn workers_are_bounded() {
        let base = "[[backend]]\nname = \"v1\"\nurls = [\"http://127.0.0.1:1\"]\nweight = 1\n";
        let with = |w: &str| format!("[proxy]\nworkers = {w}\n{base}");
        assert_eq!(parse(&with("4"), "t.toml").unwrap().proxy.workers, Some(4));
        assert_eq!(parse(base, "t.toml").unwrap().proxy.workers, None);
        for bad in ["0", "65", "-1", "\"two\""] {
            let error = parse(&with(bad), "t.toml").unwrap_err().to_string();
            assert!(
                error.contains("t.toml:2:") && error.contains("proxy.workers"),
                "{bad}: {error}"
            );
        }
    }
}
