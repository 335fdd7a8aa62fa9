//! Active health checks: [`HealthSupervisor`] keeps exactly one probe task per health-checked
//! endpoint of the current routing table, following it across reloads and weight changes.
//! Each task probes `GET <path>` every interval, bounded by the check's timeout, and feeds the
//! result to the endpoint's `EndpointHealth` (`routing::health`), where the verdict and its
//! streak live. Probes use a pooled client of their own, apart from the traffic pools.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::USER_AGENT;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::chain::Chain;
use crate::config::{HealthCheckConfig, UpstreamProtocol};
use crate::routing::health::Transition;
use crate::routing::{Endpoint, RoutingTable};
use crate::upstream::PeerTls;

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
// Probing.

/// A probe task's own pooled client, apart from the traffic pools so that probes neither
/// wait behind nor evict client connections.
type ProbeClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The client of one endpoint's probes, speaking the backend's protocol (HTTP/1.1, or HTTP/2
/// for `h2c` and `h2`): for an `https://` endpoint, with the TLS settings (trust, name
/// verified) its traffic uses.
fn probe_client(tls: Option<&PeerTls>, protocol: UpstreamProtocol) -> ProbeClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let connector = match tls {
        None => HttpsConnectorBuilder::new()
            .with_tls_config(no_tls())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http),
        Some(tls) => {
            // hyper-rustls sets ALPN itself, from the versions enabled.
            let mut config = (*tls.config).clone();
            config.alpn_protocols.clear();
            let builder = HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_only()
                .with_server_name_resolver(FixedServerNameResolver::new(tls.server_name.clone()));
            if protocol.is_h2() {
                builder.enable_http2().wrap_connector(http)
            } else {
                builder.enable_http1().wrap_connector(http)
            }
        }
    };
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(PROBE_IDLE_TIMEOUT)
        .pool_max_idle_per_host(1)
        .http2_only(protocol.is_h2())
        .build(connector)
}

/// The TLS config of a plain endpoint's probe client, which never makes a TLS connection:
/// trusting nothing, it could not.
fn no_tls() -> rustls::ClientConfig {
    rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
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
    /// [`ProbeCounter`](crate::routing::health::ProbeCounter) (which sets its verdict). Each
    /// probe is bounded by `timeout`, and every endpoint has its own task, so a black-holed
    /// endpoint delays nobody else.
    async fn run(self) {
        let ProbeTask {
            endpoint,
            backend,
            config,
            client,
            token,
        } = self;
        let scheme = if endpoint.peer.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let uri = match Uri::builder()
            .scheme(scheme)
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
    /// The backend's protocol, which probes speak.
    protocol: UpstreamProtocol,
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
        let wanted: HashMap<usize, (&Arc<Endpoint>, &str, &HealthCheckConfig, UpstreamProtocol)> =
            table
                .backends
                .iter()
                .filter_map(|b| Some((b, b.health.as_ref()?)))
                .flat_map(|(b, config)| {
                    let protocol = b.upstream.settings().protocol;
                    b.endpoints
                        .iter()
                        .map(move |e| (key(e), (e, b.name.as_str(), config, protocol)))
                })
                .collect();

        let mut probes = self.lock();
        let Probes { running, stopping } = &mut *probes;
        stopping.retain(|task| !task.is_finished());
        let stale: Vec<usize> = running
            .iter()
            .filter(|(key, probe)| {
                !matches!(wanted.get(key), Some((_, backend, config, protocol))
                    if probe.backend == *backend && probe.config == **config
                        && probe.protocol == *protocol)
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
        for (key, (endpoint, backend, config, protocol)) in wanted {
            if let Entry::Vacant(slot) = running.entry(key)
                && let Some(probe) = self.start(endpoint, backend, config, protocol)
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
        protocol: UpstreamProtocol,
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
            client: probe_client(endpoint.peer.tls.as_ref(), protocol),
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
            protocol,
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
