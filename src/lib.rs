//! canary-proxy: an HTTP reverse proxy in front of two or more versions of a service that
//! decides, per request, which version serves it — by header/cookie rules, by sticky per-user
//! buckets, and by weight.
//!
//! # Layout
//! - [`config`]: the `canary.toml` file, parsed in two stages (raw serde, then validated types
//!   whose errors name the key and line).
//! - `duration`: the `"500ms"` / `"2s"` / `"1m"` durations of the config file.
//! - `routing`: the [`RoutingTable`] snapshot and the routing decision.
//! - `sticky`: the FNV-1a user buckets and where the user id is read from.
//! - `headers`: hop-by-hop stripping, `X-Forwarded-*`, `x-request-id`.
//! - `http1`: the HTTP/1.0 and HTTP/1.1 protocol, both sides, on httparse: heads and their
//!   limits, bodies (chunked decoding, trailers), the client connection as a session. Knows
//!   nothing of routing or proxying.
//! - `stall`: the timer behind `send_timeout` and `read_timeout`: an I/O operation that has
//!   waited too long since it last made progress fails.
//! - `upstream`: the HTTP/1.1 exchange with an endpoint on a keep-alive connection, pooled per
//!   endpoint and worker; a request whose connection could not be made comes back whole for the
//!   retry.
//! - `proxy`: the forward path of one request, and its error responses; `proxy::h1` serves
//!   HTTP/1 client connections through it, `proxy::h2` h2c ones (hyper).
//! - `error`: [`ProxyError`] and the status code of each failure.
//! - `server`: the client listener: picks HTTP/1 or h2c per connection, and drains on
//!   shutdown.
//! - `decode`: whole messages decoded from bytes by the HTTP/1 code, for fuzzing and the
//!   differential test against hyper.
//! - `demo`: the two built-in upstreams of `canary-proxy demo`, the rollout plan and the load
//!   generator of `demo --rollout`.
//! - `control`: [`ControlPlane`], through which every table change goes (weights, reloads),
//!   atomic, versioned and audited.
//! - `admin`: the admin HTTP API on its own listener.
//! - `admin_client`: a small HTTP/1.1 client for that API, for the operator's subcommands.
//! - `cli`: `canary-proxy rollout ...` through the admin client: commands, status, watch.
//! - `persist`: writes weight changes back into the config file, comments kept.
//! - `health`: active health checks and passive outlier ejection per endpoint.
//! - `rollout`: progressive rollout: the latency buckets the hot path fills and the pure
//!   statistics (anytime-valid tests) behind each step's pass / fail / inconclusive; the
//!   terminal view of a rollout (`rollout::view`, pure).
//! - `metrics`: the Prometheus metrics, with label handles resolved ahead of time.
//! - `workers`: thread-per-core serving, one current-thread runtime and SO_REUSEPORT listener
//!   per worker.
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
mod metrics;
mod proxy;
mod rollout;
mod routing;
mod server;
mod stall;
mod upstream;
mod worker_index;
mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use admin::cli::{Outcome, Terminal, rollout as rollout_command, watch_rollout};
pub use admin::client::{AdminClient, AdminClientError, DEFAULT_ADMIN_URL, TOKEN_ENV};
pub use admin::serve_admin;
pub use config::{Config, ConfigError};
pub use control::health::HealthSupervisor;
pub use control::rollout::{RolloutController, RolloutError};
pub use control::{ControlError, ControlPlane, StartError, WeightsApplied};
pub use demo::{
    DEMO_BAD_CANARY_FAIL_PERCENT, DEMO_CONFIG, DEMO_LOAD_PER_SECOND, DEMO_ROLLOUT,
    DEMO_ROLLOUT_UPSTREAM_LATENCY, demo_config, demo_load, demo_upstream,
};
pub use duration::{format_duration, parse_duration};
pub use metrics::{BackendMetrics, Metrics};
pub use proxy::Proxy;
pub use proxy::error::ProxyError;
pub use proxy::headers::{
    add_forwarded, client_ip_value, request_id, settle_host, strip_hop_by_hop,
};
pub use rollout::{Command as RolloutCommand, view as rollout_view};
pub use routing::health::{EndpointHealth, EndpointStatus, ProbeCounter, Transition};
pub use routing::sticky::{BUCKETS, StickySettings, bucket, fnv1a_32};
pub use routing::{Backend, Decision, Endpoint, Reason, RoutingTable, Rule, SharedTable};
pub use server::{ServerOptions, serve};
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
    let config = control.config();
    let options = ServerOptions::new(&config.proxy);
    let background = start_background(&control, admin_listener);
    let proxy = Proxy::new(
        control.table().clone(),
        control.metrics().clone(),
        control.shutdown_token().child_token(),
    );
    serve(listener, proxy, options, shutdown).await;
    stop_background(&control, background).await;
}

/// The control plane's tasks beside the proxy: the admin API and the rollout's driver.
struct Background {
    admin: tokio::task::JoinHandle<()>,
    rollout: tokio::task::JoinHandle<()>,
}

/// Starts the admin API and the rollout (resumed from its state file, if any).
fn start_background(control: &Arc<ControlPlane>, admin_listener: TcpListener) -> Background {
    let token = control.shutdown_token();
    let rollout = RolloutController::new(control.clone());
    Background {
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
    };
    if tokio::time::timeout(TASK_STOP_DEADLINE, stopped)
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within {TASK_STOP_DEADLINE:?}");
    }
}
