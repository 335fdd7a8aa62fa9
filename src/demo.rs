//! The built-in pieces of `canary-proxy demo`: two upstreams that answer every path with their
//! name (and `/health` with `ok`), so a newcomer sees the split without running anything
//! else; for `demo --rollout`, the fast rollout plan added to the bundled config (and for
//! `--bad-canary`, a fault drill that fails a share of v2's requests; for `--shadow`, a shadow
//! stage before step 1, with upstreams that answer JSON to compare), and a load generator at
//! a fixed rate.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// The bundled `canary.toml`, which `demo` runs with wherever the binary is started.
pub const DEMO_CONFIG: &str = include_str!("../canary.toml");

/// The rollout `demo --rollout` appends to the bundled config: a healthy v2 is promoted in
/// 20 to 30 s at [`DEMO_LOAD_PER_SECOND`], a v2 failing [`DEMO_BAD_CANARY_FAIL_PERCENT`]% of
/// its requests ([`DEMO_BAD_CANARY`]) is rolled back in 2 to 3 s (measured on two shared
/// cores, debug build).
///
/// What sets the pace is the latency verdict: an upper bound on a version's p99 that stays
/// valid however often it is read needs about 900 of that version's requests at the step
/// (fewer cannot rule out that the slowest 1% is slower than all of them), so the first step
/// is 20% of 500 requests/s, not 10% of 200. The tolerances are wider than the defaults
/// (1 point, 25%), which need a few thousand requests per step to pass.
pub const DEMO_ROLLOUT: &str = r#"
# Added by `canary-proxy demo --rollout`: a fast plan for the demo's load (500 requests/s).
[rollout]
baseline = "v1"
canary = "v2"
steps = [20, 50, 100]
step_time = "10s"
"#;

/// The `[rollout.analysis]` of `demo --rollout`, after [`DEMO_ROLLOUT`] (and its shadow
/// line, with `--shadow`).
pub const DEMO_ROLLOUT_ANALYSIS: &str = r#"
[rollout.analysis]
interval = "1s"
min_requests = 100
max_step_time = "1m"
error_tolerance = 0.05
latency_tolerance = 0.5
"#;

/// Requests a second the load generator of `demo --rollout` sends through the proxy.
pub const DEMO_LOAD_PER_SECOND: u32 = 500;

/// How long the upstreams of `demo --rollout` take to answer, as a service doing a little
/// work would: with answers in microseconds, the p99s would compare scheduler noise.
pub const DEMO_ROLLOUT_UPSTREAM_LATENCY: Duration = Duration::from_millis(2);

/// Share of v2's requests answered 500 by `demo --rollout --bad-canary`, in percent.
pub const DEMO_BAD_CANARY_FAIL_PERCENT: u32 = 15;

/// What `demo --rollout --bad-canary` appends after [`DEMO_ROLLOUT`]: a fault drill, the
/// proxy answering [`DEMO_BAD_CANARY_FAIL_PERCENT`]% of v2's requests with a 500 as a canary
/// with a bug would; v2 itself stays healthy.
pub const DEMO_BAD_CANARY: &str = r#"
# Added by `canary-proxy demo --rollout --bad-canary`: a fault drill that answers 15% of v2's
# requests with a 500 (the proxy injects them; v2 itself is healthy). At runtime:
# curl -X PUT localhost:9901/admin/faults -d '[{"backend":"v2","abort_percent":15}]'
[[fault]]
backend = "v2"
abort_percent = 15
abort_status = 500
"#;

/// How long the shadow stage of `demo --rollout --shadow` lasts at least.
pub const DEMO_SHADOW: &str = "10s";

/// What `demo --rollout --shadow` appends: the mirroring of its shadow stage, which leaves
/// out what names the instance (the `served_by` field, the `x-served-by` header).
pub const DEMO_SHADOW_MIRROR: &str = r#"
# Added by `canary-proxy demo --rollout --shadow`: in the shadow stage (rollout.shadow) v2
# gets a copy of every GET and HEAD and no user; its answers are compared with v1's.
[mirror]
backend = "v2"
ignore_headers = ["date", "server", "x-request-id", "set-cookie", "etag", "x-served-by"]
ignore_fields = ["served_by"]
"#;

/// Load requests in flight at most; past it the generator skips a beat rather than queue.
const LOAD_MAX_IN_FLIGHT: usize = 64;

/// A load request not answered within this is dropped.
const LOAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The demo's config: the bundled `canary.toml`, plus [`DEMO_ROLLOUT`] when `rollout`, plus
/// [`DEMO_BAD_CANARY`] when `bad_canary` too, plus a shadow stage of [`DEMO_SHADOW`] and
/// [`DEMO_SHADOW_MIRROR`] when `shadow` too.
pub fn demo_config(rollout: bool, bad_canary: bool, shadow: bool) -> String {
    let mut text = DEMO_CONFIG.to_string();
    if rollout {
        text.push_str(DEMO_ROLLOUT);
        if shadow {
            text.push_str(&format!(
                "shadow = \"{DEMO_SHADOW}\"   # added by --shadow\n"
            ));
        }
        text.push_str(DEMO_ROLLOUT_ANALYSIS);
        if shadow {
            text.push_str(DEMO_SHADOW_MIRROR);
        }
        if bad_canary {
            text.push_str(DEMO_BAD_CANARY);
        }
    }
    text
}

/// How a demo upstream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoAnswer {
    /// `hello from v1 (/path)`.
    Text,
    /// `{"greeting":"hello","path":"/path","served_by":"v1"}`: the same from both versions
    /// but for `served_by`, for the shadow stage to compare.
    Json,
}

/// Serves one demo upstream named `name` on `listener` until `shutdown` completes. It answers
/// every request but `/health` after `latency`, as a service doing a little work would.
pub async fn demo_upstream(
    listener: TcpListener,
    name: &'static str,
    latency: Duration,
    answer: DemoAnswer,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = &mut shutdown => return,
        };
        let service = service_fn(move |request: Request<Incoming>| {
            let (body, content_type) = match (request.uri().path(), answer) {
                ("/health", _) => ("ok\n".to_string(), "text/plain"),
                (path, DemoAnswer::Text) => (format!("hello from {name} ({path})\n"), "text/plain"),
                (path, DemoAnswer::Json) => {
                    let body = serde_json::json!({
                        "greeting": "hello",
                        "path": path,
                        "served_by": name,
                    });
                    (format!("{body}\n"), "application/json")
                }
            };
            let latency = if request.uri().path() == "/health" {
                Duration::ZERO
            } else {
                latency
            };
            async move {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let mut response = Response::new(Full::new(Bytes::from(body)));
                let headers = response.headers_mut();
                headers.insert("x-served-by", http::HeaderValue::from_static(name));
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(content_type),
                );
                Ok::<_, Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Sends `per_second` GET requests a second to `http://target/` until `stop`: an open loop (a
/// request leaves every 1/`per_second` s whether or not the earlier ones have been answered)
/// over pooled keep-alive connections, with at most 64 in flight and each given 5 s, so a
/// slow proxy sheds the demo's load rather than piling it up.
pub async fn demo_load(target: SocketAddr, per_second: u32, stop: CancellationToken) {
    let uri = match Uri::builder()
        .scheme("http")
        .authority(target.to_string())
        .path_and_query("/")
        .build()
    {
        Ok(uri) => uri,
        Err(error) => {
            tracing::error!(%target, %error, "demo load: bad target");
            return;
        }
    };
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        // Below the proxy's header_read_timeout (10 s in the bundled config).
        .pool_idle_timeout(Duration::from_secs(5))
        .build(connector);
    let in_flight = Arc::new(Semaphore::new(LOAD_MAX_IN_FLIGHT));
    let mut beats = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    beats.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = beats.tick() => {}
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let (client, uri, stop) = (client.clone(), uri.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let exchange = async {
                if let Ok(response) = client.get(uri).await {
                    let _ = response.into_body().collect().await;
                }
            };
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tokio::time::timeout(LOAD_REQUEST_TIMEOUT, exchange) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rollout_demo_config_is_the_bundled_one_plus_a_valid_plan() {
        assert_eq!(demo_config(false, false, false), DEMO_CONFIG);
        assert_eq!(demo_config(false, true, true), DEMO_CONFIG);
        let load = |text: &str| {
            let dir =
                std::env::temp_dir().join(format!("canary-demo-config-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("canary.toml");
            std::fs::write(&path, text).unwrap();
            let config = crate::config::load(&path);
            let _ = std::fs::remove_dir_all(&dir);
            config.unwrap()
        };
        let config = load(&demo_config(true, false, false));
        let rollout = config.rollout.unwrap();
        assert_eq!(rollout.steps, [20, 50, 100]);
        assert_eq!(rollout.step_time, Duration::from_secs(10));
        assert!(rollout.shadow.is_none() && config.mirror.is_none());
        assert!(config.faults.is_empty());
        let bad = load(&demo_config(true, true, false));
        assert_eq!(bad.faults.len(), 1);
        let fault = &bad.faults[0];
        assert_eq!(fault.backend, "v2");
        assert_eq!(fault.abort_percent, f64::from(DEMO_BAD_CANARY_FAIL_PERCENT));
        assert_eq!(fault.abort_status, http::StatusCode::INTERNAL_SERVER_ERROR);
        let shadow = load(&demo_config(true, true, true));
        let rollout = shadow.rollout.unwrap();
        assert_eq!(rollout.shadow, Some(Duration::from_secs(10)));
        assert_eq!(rollout.step_time, Duration::from_secs(10));
        let mirror = shadow.mirror.unwrap();
        assert_eq!(mirror.backend, "v2");
        assert_eq!(mirror.ignore_fields, ["served_by"]);
        assert_eq!(shadow.faults.len(), 1);
    }
}
