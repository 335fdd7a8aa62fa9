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
//! - `upstream`: the pooled client of each backend and the request body that can be retried.
//! - `proxy`: the forward path of one request, and its error responses.
//! - `error`: [`ProxyError`] and the status code of each failure.
//! - `framing`: detects requests with both Content-Length and Transfer-Encoding on the raw bytes.
//! - `server`: the client listener, connection handling and graceful shutdown.
//! - `demo`: the two built-in upstreams of `canary-proxy demo`.
#![forbid(unsafe_code)]

pub mod config;
mod demo;
mod duration;
mod error;
mod framing;
mod headers;
mod proxy;
mod routing;
mod server;
mod sticky;
mod upstream;

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

pub use config::{Config, ConfigError};
pub use demo::{DEMO_CONFIG, demo_upstream};
pub use duration::{format_duration, parse_duration};
pub use error::{ProxyError, UpstreamErrorKind};
pub use framing::{AmbiguousFraming, FramingGuard};
pub use headers::{add_forwarded, ensure_request_id, strip_hop_by_hop};
pub use proxy::{Proxy, SharedTable};
pub use routing::{Backend, Decision, Endpoint, MAX_BACKENDS, Reason, RoutingTable, Rule};
pub use server::{ServerOptions, serve};
pub use sticky::{BUCKETS, StickySettings, bucket, fnv1a_32};

/// Runs the proxy for `config` on an already bound listener until `shutdown` completes, then
/// drains in-flight requests (bounded by `shutdown_grace`).
pub async fn run(config: &Config, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(RoutingTable::from_config(
        config, 1, None,
    )));
    let options = ServerOptions {
        header_read_timeout: config.proxy.header_read_timeout,
        shutdown_grace: config.proxy.shutdown_grace,
    };
    serve(listener, Proxy::new(table), options, shutdown).await;
}
