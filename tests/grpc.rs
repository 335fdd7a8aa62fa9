//! gRPC through the proxy, end to end, with real gRPC servers and clients (python3-grpcio,
//! `tests/fixtures/grpc_server.py` and `grpc_client.py`): the clients speak h2c to the proxy
//! as gRPC clients do, the proxy speaks h2c to the servers (`protocol = "h2c"`). Unary and
//! server-streaming calls come back intact with their trailers; weights and rules route
//! them; a canary answering UNAVAILABLE is counted by its gRPC status and rolled back.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const PYTHON: &str = "/usr/bin/python3";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A gRPC server (`grpc_server.py`) on 127.0.0.1, stopped when dropped.
struct GrpcServer {
    port: u16,
    _child: Child,
}

impl GrpcServer {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Starts `grpc_server.py NAME` (answering UNAVAILABLE with `fail`) and waits for its port.
async fn grpc_server(name: &str, fail: bool) -> GrpcServer {
    let mut command = Command::new(PYTHON);
    command.arg(fixture("grpc_server.py")).arg(name);
    if fail {
        command.arg("--fail");
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the gRPC server starts")
        .unwrap()
        .expect("it prints its port");
    let port = line
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line from the gRPC server: {line}"));
    GrpcServer {
        port,
        _child: child,
    }
}

/// Runs `grpc_client.py` against the proxy: `n` calls of `method` with `args`, one JSON line
/// per call.
async fn grpc_calls(proxy: SocketAddr, method: &str, n: usize, args: &[&str]) -> Vec<Value> {
    let output = Command::new(PYTHON)
        .arg(fixture("grpc_client.py"))
        .arg(proxy.to_string())
        .arg(method)
        .arg(n.to_string())
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "the gRPC client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let calls: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert_eq!(calls.len(), n, "{calls:?}");
    calls
}

/// Who served each call, by its `x-served-by` trailer.
fn served_by(calls: &[Value]) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            c["trailers"]["x-served-by"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// A config with two h2c backends (`weights`) and `extra` appended.
fn h2c_config(v1: &GrpcServer, v2: &GrpcServer, weights: (u32, u32), extra: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"{}\"]\nweight = {}\nprotocol = \"h2c\"\n\
         [[backend]]\nname = \"v2\"\nurls = [\"{}\"]\nweight = {}\nprotocol = \"h2c\"\n{extra}\n",
        v1.url(),
        weights.0,
        v2.url(),
        weights.1,
    )
}

#[tokio::test]
async fn unary_and_server_streaming_calls_pass_through_with_their_trailers() {
    let (v1, v2) = (
        grpc_server("v1", false).await,
        grpc_server("v2", false).await,
    );
    let proxy = start_proxy(&h2c_config(&v1, &v2, (100, 0), "")).await;

    let unary = grpc_calls(proxy.addr, "Say", 5, &["--payload", "hello"]).await;
    for call in &unary {
        assert_eq!(call["code"], "OK", "{call}");
        assert_eq!(call["replies"], serde_json::json!(["v1:hello"]), "{call}");
        // Custom trailing metadata reaches the client, beside grpc-status.
        assert_eq!(call["trailers"]["x-served-by"], "v1", "{call}");
        assert_eq!(call["trailers"]["x-echo-len"], "5", "{call}");
    }
    let streams = grpc_calls(proxy.addr, "Count", 3, &["--payload", "40"]).await;
    let expected: Vec<String> = (0..40).map(|i| format!("v1:{i}")).collect();
    for call in &streams {
        assert_eq!(call["code"], "OK", "{call}");
        assert_eq!(call["replies"], serde_json::json!(expected));
        assert_eq!(call["trailers"]["x-served-by"], "v1", "{call}");
    }
    // The server saw a gRPC request as a gRPC client sends it (te: trailers kept).
    let meta = grpc_calls(proxy.addr, "Meta", 1, &["--metadata", "x-call=1"]).await;
    let seen = meta[0]["replies"][0].as_str().unwrap();
    assert!(seen.contains("x-call=1"), "{seen}");
    assert!(seen.contains("x-forwarded-for=127.0.0.1"), "{seen}");

    let text = get_text(proxy.admin("/metrics")).await;
    let ok = [("backend", "v1"), ("grpc_status", "0")];
    assert_eq!(metric(&text, "canary_grpc_responses_total", &ok), 9.0);
    let answered = [("backend", "v1"), ("status", "200")];
    assert_eq!(metric(&text, "canary_requests_total", &answered), 9.0);
}

#[tokio::test]
async fn a_calls_latency_is_measured_to_its_end() {
    let (v1, v2) = (
        grpc_server("v1", false).await,
        grpc_server("v2", false).await,
    );
    let proxy = start_proxy(&h2c_config(&v1, &v2, (100, 0), "")).await;
    // Three messages 250 ms apart: the head comes with the first, the end half a second later.
    let calls = grpc_calls(proxy.addr, "Count", 1, &["--payload", "3/250"]).await;
    assert_eq!(calls[0]["code"], "OK", "{calls:?}");
    let text = get_text(proxy.admin("/metrics")).await;
    let v1 = [("backend", "v1")];
    assert_eq!(
        metric(&text, "canary_request_duration_seconds_count", &v1),
        1.0
    );
    let seconds = metric(&text, "canary_request_duration_seconds_sum", &v1);
    assert!((0.5..5.0).contains(&seconds), "{seconds}");
}

#[tokio::test]
async fn weights_and_rules_route_grpc_calls() {
    let (v1, v2) = (
        grpc_server("v1", false).await,
        grpc_server("v2", false).await,
    );
    let rule = "[[rule]]\nheader = \"x-canary\"\nequals = \"yes\"\nbackend = \"v2\"\n";
    let proxy = start_proxy(&h2c_config(&v1, &v2, (100, 0), rule)).await;

    let calls = grpc_calls(proxy.addr, "Say", 10, &[]).await;
    assert!(served_by(&calls).iter().all(|b| b == "v1"), "{calls:?}");

    // A rule on a metadata header (an HTTP/2 header like any other) sends the call to v2.
    let pinned = grpc_calls(proxy.addr, "Say", 5, &["--metadata", "x-canary=yes"]).await;
    assert!(served_by(&pinned).iter().all(|b| b == "v2"), "{pinned:?}");

    let set = client()
        .put(proxy.admin("/admin/weight"))
        .body(r#"{"v1": 0, "v2": 100}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let calls = grpc_calls(proxy.addr, "Count", 5, &["--payload", "2"]).await;
    assert!(served_by(&calls).iter().all(|b| b == "v2"), "{calls:?}");

    // Half and half: both serve (20 calls: both missing has odds 2^-19).
    let set = client()
        .put(proxy.admin("/admin/weight"))
        .body(r#"{"v1": 50, "v2": 50}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let calls = grpc_calls(proxy.addr, "Say", 20, &[]).await;
    let served = served_by(&calls);
    assert!(served.iter().any(|b| b == "v1") && served.iter().any(|b| b == "v2"));
}

/// The rollout's fast plan (as in tests/rollout.rs), over two h2c backends; passive health
/// is off for the canary, so that a canary failing every call keeps getting its share.
fn rollout_config(v1: &GrpcServer, v2: &GrpcServer) -> String {
    h2c_config(
        v1,
        v2,
        (100, 0),
        "[backend.outlier]\nconsecutive_failures = 0\n\
         [rollout]\nbaseline = \"v1\"\ncanary = \"v2\"\nsteps = [20, 50, 100]\nstep_time = \"1s\"\n\
         [rollout.analysis]\ninterval = \"200ms\"\nmin_requests = 20\nerror_tolerance = 0.05\n\
         latency_tolerance = 3.0\nmax_step_time = \"60s\"\n",
    )
}

#[tokio::test]
async fn a_canary_answering_unavailable_is_counted_as_503_and_rolled_back() {
    let (v1, v2) = (
        grpc_server("v1", false).await,
        grpc_server("v2", true).await,
    );
    let proxy = start_proxy_with_file(&rollout_config(&v1, &v2)).await;
    let started = client()
        .post(proxy.admin("/admin/rollout/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 200);
    // Unary calls (trailers-only answers from the failing canary) and streams (UNAVAILABLE
    // in the trailers after a message) until the rollout decides.
    let since = Instant::now();
    let mut unavailable = 0;
    let state = loop {
        let (unary, streams) = tokio::join!(
            grpc_calls(proxy.addr, "Say", 60, &[]),
            grpc_calls(proxy.addr, "Count", 20, &["--payload", "2"]),
        );
        for call in unary.iter().chain(&streams) {
            match call["code"].as_str() {
                Some("OK") => assert_eq!(call["trailers"]["x-served-by"], "v1", "{call}"),
                Some("UNAVAILABLE") => {
                    assert_eq!(call["trailers"]["x-served-by"], "v2", "{call}");
                    unavailable += 1;
                }
                _ => panic!("{call}"),
            }
        }
        let status: Value =
            serde_json::from_str(&get_text(proxy.admin("/admin/rollout")).await).unwrap();
        if status["state"] != "running" {
            break status;
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "not decided: {status:#}"
        );
    };
    assert_eq!(state["state"], "rolled_back", "{state:#}");
    assert_eq!(state["verdict"]["errors"], "fail", "{state:#}");
    assert!(unavailable > 0);

    let text = get_text(proxy.admin("/metrics")).await;
    let failed = [("backend", "v2"), ("grpc_status", "14")];
    let counted = metric(&text, "canary_grpc_responses_total", &failed);
    assert!(counted > 0.0, "{text}");
    let as_503 = [("backend", "v2"), ("status", "503")];
    assert_eq!(metric(&text, "canary_requests_total", &as_503), counted);
    let as_200 = [("backend", "v2"), ("status", "200")];
    assert_eq!(metric(&text, "canary_requests_total", &as_200), 0.0);
    // Every call after the rollback goes to v1.
    let after = grpc_calls(proxy.addr, "Say", 10, &[]).await;
    assert!(served_by(&after).iter().all(|b| b == "v1"), "{after:?}");
}

#[tokio::test]
async fn a_canary_answering_unavailable_is_taken_out_by_passive_health() {
    let (v1, v2) = (
        grpc_server("v1", false).await,
        grpc_server("v2", true).await,
    );
    let proxy = start_proxy(&h2c_config(&v1, &v2, (50, 50), "")).await;
    // Five failures in a row eject an endpoint (the default); v2 fails every call it gets.
    let calls = grpc_calls(proxy.addr, "Say", 40, &[]).await;
    assert!(
        calls.iter().any(|c| c["code"] == "UNAVAILABLE"),
        "{calls:?}"
    );
    let routes: Value =
        serde_json::from_str(&get_text(proxy.admin("/admin/routes")).await).unwrap();
    let v2_endpoint = &routes["backends"][1]["endpoints"][0];
    assert_eq!(v2_endpoint["healthy"], false, "{routes:#}");
    assert_eq!(routes["backends"][0]["endpoints"][0]["healthy"], true);
    let after = grpc_calls(proxy.addr, "Say", 10, &[]).await;
    assert!(after.iter().all(|c| c["code"] == "OK"), "{after:?}");
}
