//! canary-proxy: an HTTP reverse proxy in front of two or more versions of a service that
//! decides, per request, which version serves it — by header/cookie rules, by sticky per-user
//! buckets, and by weight.
//!
//! # Layout
//! From the top down; a module imports only modules listed below it (files within one folder
//! may use each other).
//! - `server`: the client listener: picks HTTP/1 or HTTP/2 per connection (by its first
//!   bytes, or over TLS by ALPN), and drains on shutdown. `workers`: thread-per-core
//!   serving, one current-thread runtime and SO_REUSEPORT listener per worker.
//! - `admin/`: the admin HTTP API on its own listener, and its dashboard page at `GET /`
//!   (`admin::dashboard`, assets embedded); `admin::client`, a small HTTP/1.1
//!   client for that API; `admin::cli`, `canary-proxy rollout ...` and `mirror status`
//!   through it.
//! - `demo`: the two built-in upstreams of `canary-proxy demo`, the rollout plan and the load
//!   generator of `demo --rollout`. `decode`: whole messages decoded from bytes by the HTTP/1
//!   code, for fuzzing and the differential test against hyper.
//! - `proxy/`: the forward path of one request (route, rewrite the request, send with one
//!   retry elsewhere, rewrite the response) and its error responses; `h1` serves HTTP/1
//!   client connections through it, `h2` h2c ones (hyper); `headers` (hop-by-hop,
//!   `X-Forwarded-*`, `x-request-id`, the Host check); `error` (`ProxyError`, status codes).
//! - `control/`: [`ControlPlane`], through which every table change goes (weights, reloads),
//!   atomic, versioned and audited; writing weights back into the config file (`persist`);
//!   the active health checks (`health`); the rollout's controller and webhook (`rollout`,
//!   `webhook`); faults and mirroring as JSON (`fault_json`, `mirror_json`); with `[store]`,
//!   the replica's link to etcd (`store`: seed, compare-and-swap writes, watch, snapshot,
//!   leader lease, published meters), the etcd requests it makes (`etcd`) and the shared
//!   document it reads and writes (`document`).
//! - `tls`: TLS on the client listener: the rustls server config and its certificates by
//!   server name, replaced on reload.
//! - `routing/`: the [`RoutingTable`] snapshot, its backends and endpoints, and the routing
//!   decision; the sticky user buckets (`sticky`); each endpoint's health, active verdict and
//!   passive ejection (`health`).
//! - `mirror/`: copies of requests sent to the canary (from pools of their own, below routing,
//!   which holds the mirroring in force), and the comparison of its answers with the served
//!   ones.
//! - `metrics`: the Prometheus metrics, with label handles resolved ahead of time; its labels
//!   are its own types, and it knows nothing of routing.
//! - `rollout/`: the progressive rollout's parts below routing: its state machine, the
//!   per-version meter and latency buckets the hot path fills, replicas' meters summed
//!   (`cluster`), the pure statistics (anytime-valid tests) behind each step's verdict, and
//!   the terminal view of a rollout.
//! - `upstream/`: the HTTP/1.1 exchange with an endpoint (its `Peer`) on a keep-alive
//!   connection, pooled per endpoint and worker; a request whose connection could not be made
//!   comes back whole for the retry.
//! - `http1/`: the HTTP/1.0 and HTTP/1.1 protocol, both sides, on httparse: heads and their
//!   limits, bodies (chunked decoding, trailers), the client connection as a session. Knows
//!   nothing of routing or proxying.
//! - [`config`]: the `canary.toml` file, parsed in two stages (raw serde, then validated types
//!   whose errors name the key and line).
//! - Leaves: `duration` (the `"500ms"` / `"2s"` / `"1m"` durations of the config file),
//!   `stall` (the timer behind `send_timeout` and `read_timeout`), `stream` (a client
//!   connection, plain or TLS, as the HTTP/1 server splits it), `chain` (an error and its
//!   causes on one line), `worker_index` (which worker thread the code runs on), `id` (random
//!   128-bit ids in hex: request ids, anonymous users' ids), `utc` (calendar dates and
//!   RFC 3339 times of Unix times).
#![forbid(unsafe_code)]

mod admin;
mod chain;
pub mod config;
mod control;
#[doc(hidden)]
pub mod decode;
mod demo;
mod duration;
mod http1;
mod id;
mod metrics;
mod mirror;
mod proxy;
mod rollout;
mod routing;
mod server;
mod stall;
mod stream;
mod tls;
mod upstream;
mod utc;
mod worker_index;
mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use admin::serve_admin;
use control::rollout::RolloutController;
use proxy::Proxy;
use server::{ServerOptions, serve};

// What the binary (src/main.rs), the integration tests and the benches use; nothing else.
pub use admin::cli::{
    Outcome, Terminal, emit, mirror_status, rollout as rollout_command, watch_rollout,
};
pub use admin::client::{AdminClient, AdminClientError, DEFAULT_ADMIN_URL, TOKEN_ENV};
pub use config::{Config, ConfigError};
pub use control::ControlPlane;
pub use control::health::HealthSupervisor;
pub use demo::{
    DEMO_BAD_CANARY_FAIL_PERCENT, DEMO_LOAD_PER_SECOND, DEMO_ROLLOUT_UPSTREAM_LATENCY, DEMO_SHADOW,
    DemoAnswer, demo_config, demo_load, demo_upstream,
};
pub use duration::format_duration;
pub use metrics::Metrics;
pub use proxy::error::ProxyError;
pub use proxy::headers::{
    add_forwarded, client_ip_value, request_id, settle_host, strip_hop_by_hop,
};
pub use rollout::Command as RolloutCommand;
pub use routing::{Endpoint, RoutingTable, SharedTable};
pub use workers::{bind_listeners, run_workers, worker_count};

/// How long background tasks (admin listener, health checks) get to stop after the drain.
const TASK_STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Runs the proxy (on the current runtime) and its admin API on already bound listeners until
/// `shutdown` completes: then stops accepting, drains in-flight requests (bounded by
/// `shutdown_grace`), and stops the background tasks through the control plane's cancellation
/// token. The binary uses [`run_workers`] instead, which serves on one thread per core.
pub async fn run(
    control: Arc<ControlPlane>,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let store = start_store(&control).await;
    let config = control.config();
    let options = ServerOptions::new(&config.proxy);
    let tls = control.listener_tls().map(tls::ListenerTls::acceptor);
    let background = start_background(&control, admin_listener, store);
    let proxy = Proxy::new(
        control.table().clone(),
        control.metrics().clone(),
        control.shutdown_token().child_token(),
    );
    serve(listener, proxy, options, tls, shutdown).await;
    stop_background(&control, background).await;
}

/// With `[store]`, starts the link to etcd and waits until the first shared table is in
/// force (or etcd has not answered within `store.timeout`), so that the first request is
/// routed by it. Answers what completes when the link has stopped.
async fn start_store(control: &Arc<ControlPlane>) -> Option<tokio::sync::oneshot::Receiver<()>> {
    let started = control::store::start(control)?;
    let _ = started.first.await;
    Some(started.stopped)
}

/// The control plane's tasks beside the proxy: the admin API, the rollout's driver and the
/// link to `[store]`.
struct Background {
    admin: tokio::task::JoinHandle<()>,
    rollout: tokio::task::JoinHandle<()>,
    store: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// Starts the admin API and the rollout (resumed from its state file, or the shared
/// document, if any).
fn start_background(
    control: &Arc<ControlPlane>,
    admin_listener: TcpListener,
    store: Option<tokio::sync::oneshot::Receiver<()>>,
) -> Background {
    let token = control.shutdown_token();
    let rollout = RolloutController::new(control.clone());
    Background {
        store,
        rollout: tokio::spawn(rollout.clone().drive(token.child_token())),
        admin: tokio::spawn(serve_admin(
            admin_listener,
            control.clone(),
            rollout,
            token.child_token(),
        )),
    }
}

/// Stops the admin listener, the rollout and the health checks through the control plane's
/// cancellation token, waiting for them up to [`TASK_STOP_DEADLINE`].
async fn stop_background(control: &ControlPlane, background: Background) {
    control.shutdown_token().cancel();
    let stopped = async {
        let _ = background.admin.await;
        let _ = background.rollout.await;
        control.health().stopped().await;
        if let Some(store) = background.store {
            let _ = store.await;
        }
    };
    if tokio::time::timeout(TASK_STOP_DEADLINE, stopped)
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within {TASK_STOP_DEADLINE:?}");
    }
}
