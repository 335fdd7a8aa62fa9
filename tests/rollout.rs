//! The progressive rollout over real TCP, with real upstreams and real load: a healthy canary
//! is promoted, a failing one rolled back (and every later request goes to the baseline), no
//! traffic holds the step, an approval gate waits, and abort, promote, 409s and a restart
//! behave as the contract says.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// A keep-alive HTTP/1.1 upstream named `name` that answers 500 to every `fail_every`-th
/// request (never when 0) and 200 otherwise, each response naming it in the body.
async fn version(name: &'static str, fail_every: usize) -> String {
    switchable(name, Arc::new(AtomicUsize::new(fail_every))).await
}

/// [`version`] whose `fail_every` can be changed while it runs.
async fn switchable(name: &'static str, fail_every: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (count, fail_every) = (count.clone(), fail_every.clone());
            tokio::spawn(async move {
                while read_request_head(&mut stream).await {
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let fail_every = fail_every.load(Ordering::SeqCst);
                    let failing = fail_every > 0 && n.is_multiple_of(fail_every);
                    let status = if failing { "500 Oops" } else { "200 OK" };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{name}",
                        name.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// The rollout config for two versions, with a fast plan and `extra` lines in [rollout].
fn rollout_config(v1: &str, v2: &str, extra: &str, analysis: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"{v1}\"]\nweight = 100\n\
         [[backend]]\nname = \"v2\"\nurls = [\"{v2}\"]\nweight = 0\n\
         [rollout]\nbaseline = \"v1\"\ncanary = \"v2\"\nsteps = [20, 50, 100]\nstep_time = \"1s\"\n{extra}\n\
         [rollout.analysis]\ninterval = \"200ms\"\nmin_requests = 20\nerror_tolerance = 0.05\n\
         latency_tolerance = 3.0\nmax_step_time = \"60s\"\n{analysis}\n"
    )
}

async fn get_json(url: String) -> Value {
    let text = get_text(url).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

async fn command(proxy: &TestProxy, name: &str) -> (u16, Value) {
    let response = client()
        .post(proxy.admin(&format!("/admin/rollout/{name}")))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Polls the rollout until `done` holds for its JSON, for at most `within`.
async fn wait_for(proxy: &TestProxy, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let status = get_json(proxy.admin("/admin/rollout")).await;
        if done(&status) {
            return status;
        }
        assert!(
            started.elapsed() < within,
            "not reached within {within:?}: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn weights(proxy: &TestProxy) -> Value {
    get_json(proxy.admin("/admin/weight")).await
}

#[tokio::test]
async fn a_healthy_canary_is_promoted_step_by_step() {
    let (v1, v2) = (version("v1", 0).await, version("v2", 0).await);
    let proxy = start_proxy_with_file(&rollout_config(&v1, &v2, "", "")).await;
    let _load = Load::start(&proxy, 8, Duration::ZERO);
    let (status, started) = command(&proxy, "start").await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["state"], "running");
    assert_eq!(started["canary_percent"], 20);
    assert_eq!(
        weights(&proxy).await,
        serde_json::json!({"v1": 80, "v2": 20})
    );
    let done = wait_for(&proxy, Duration::from_secs(40), |s| {
        s["state"] == "promoted"
    })
    .await;
    assert_eq!(done["canary_percent"], 100);
    // The counts shown stay those of the last step while traffic goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = get_json(proxy.admin("/admin/rollout")).await;
    assert_eq!(later["canary"]["requests"], done["canary"]["requests"]);
    assert!(done["canary"]["requests"].as_u64().unwrap() > 0, "{done:#}");
    assert_eq!(
        weights(&proxy).await,
        serde_json::json!({"v1": 0, "v2": 100})
    );
    let events: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["started", "advanced", "promoted"], "{done:#}");
    // The weights went through the table's versioned change and into the file.
    let text = std::fs::read_to_string(proxy.config_path.as_ref().unwrap()).unwrap();
    assert!(
        text.contains("weight = 100") && text.contains("weight = 0"),
        "{text}"
    );
    let metrics = get_text(proxy.admin("/metrics")).await;
    assert!(
        metrics.contains("canary_rollout_state{state=\"promoted\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("canary_rollout_canary_percent 100"));
    assert!(metrics.contains("canary_rollout_transitions_total{event=\"promoted\"} 1"));
}

#[tokio::test]
async fn a_canary_failing_a_fifth_of_requests_is_rolled_back_and_traffic_returns() {
    let (v1, v2) = (version("v1", 0).await, version("v2", 5).await);
    let proxy = start_proxy_with_file(&rollout_config(&v1, &v2, "", "")).await;
    let load = Load::start(&proxy, 8, Duration::ZERO);
    let (status, _) = command(&proxy, "start").await;
    assert_eq!(status, 200);
    let started = Instant::now();
    let done = wait_for(&proxy, Duration::from_secs(30), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    println!("rolled back after {:?}", started.elapsed());
    assert_eq!(done["canary_percent"], 0);
    assert_eq!(done["verdict"]["errors"], "fail", "{done:#}");
    assert_eq!(
        weights(&proxy).await,
        serde_json::json!({"v1": 100, "v2": 0})
    );
    let after = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served = load.served_after(after);
    assert!(served.len() > 20, "{}", served.len());
    assert!(served.iter().all(|b| b == "v1"), "{served:?}");
}

/// A fault drill proves the rollback works: a healthy canary with 20% of its requests
/// aborted by the proxy is rolled back, its endpoint never taken out.
#[tokio::test]
async fn an_injected_abort_of_a_fifth_of_the_canary_rolls_it_back() {
    let (v1, v2) = (version("v1", 0).await, version("v2", 0).await);
    let proxy = start_proxy_with_file(&rollout_config(&v1, &v2, "", "")).await;
    let drill = client()
        .put(proxy.admin("/admin/faults"))
        .body(r#"[{"backend": "v2", "abort_percent": 20}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(drill.status(), 200);
    let _load = Load::start(&proxy, 8, Duration::ZERO);
    let (status, _) = command(&proxy, "start").await;
    assert_eq!(status, 200);
    let done = wait_for(&proxy, Duration::from_secs(30), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    assert_eq!(done["verdict"]["errors"], "fail", "{done:#}");
    let routes = get_json(proxy.admin("/admin/routes")).await;
    assert_eq!(
        routes["backends"][1]["endpoints"][0]["healthy"], true,
        "{routes:#}"
    );
    let text = get_text(proxy.admin("/metrics")).await;
    let aborts = [("backend", "v2"), ("kind", "abort")];
    assert!(metric(&text, "canary_faults_injected_total", &aborts) > 0.0);
    let upstream_errors = [("backend", "v2")];
    assert_eq!(
        metric(&text, "canary_upstream_errors_total", &upstream_errors),
        0.0
    );
}

/// A fixed canary started again after a rollback is judged on fresh evidence: the old
/// rollout's `fail` evidence does not roll the new one back.
#[tokio::test]
async fn a_new_start_after_a_rollback_begins_with_fresh_evidence() {
    let failing = Arc::new(AtomicUsize::new(5));
    let (v1, v2) = (
        version("v1", 0).await,
        switchable("v2", failing.clone()).await,
    );
    let proxy = start_proxy_with_file(&rollout_config(&v1, &v2, "", "")).await;
    let _load = Load::start(&proxy, 8, Duration::ZERO);
    assert_eq!(command(&proxy, "start").await.0, 200);
    wait_for(&proxy, Duration::from_secs(30), |s| {
        s["state"] == "rolled_back"
    })
    .await;
    failing.store(0, Ordering::SeqCst);
    assert_eq!(command(&proxy, "start").await.0, 200);
    let done = wait_for(&proxy, Duration::from_secs(40), |s| {
        s["state"] == "promoted" || s["state"] == "rolled_back"
    })
    .await;
    assert_eq!(done["state"], "promoted", "{done:#}");
}

#[tokio::test]
async fn no_traffic_holds_the_step_and_never_fails() {
    let (v1, v2) = (version("v1", 0).await, version("v2", 0).await);
    let proxy = start_proxy_with_file(&rollout_config(&v1, &v2, "", "")).await;
    assert_eq!(command(&proxy, "start").await.0, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = get_json(proxy.admin("/admin/rollout")).await;
    assert_eq!(status["state"], "running", "{status:#}");
    assert_eq!(status["step"], 0);
    assert_eq!(status["verdict"]["errors"], "inconclusive");
}

#[tokio::test]
async fn an_approval_gate_waits_for_resume() {
    let (v1, v2) = (version("v1", 0).await, version("v2", 0).await);
    let config = rollout_config(&v1, &v2, "approve = [50]", "");
    let proxy = start_proxy_with_file(&config).await;
    let _load = Load::start(&proxy, 8, Duration::ZERO);
    assert_eq!(command(&proxy, "start").await.0, 200);
    let waiting = wait_for(&proxy, Duration::from_secs(30), |s| {
        s["state"] == "waiting_approval"
    })
    .await;
    assert_eq!(
        (waiting["step"].clone(), waiting["canary_percent"].clone()),
        (1.into(), 20.into())
    );
    // It stays there while the evidence is good.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = get_json(proxy.admin("/admin/rollout")).await;
    assert_eq!(still["state"], "waiting_approval");
    assert_eq!(
        weights(&proxy).await,
        serde_json::json!({"v1": 80, "v2": 20})
    );
    let (status, resumed) = command(&proxy, "resume").await;
    assert_eq!(status, 200);
    assert_eq!(
        (resumed["state"].clone(), resumed["canary_percent"].clone()),
        ("running".into(), 50.into())
    );
}

#[tokio::test]
async fn operator_commands_conflicts_and_a_restart_behave_as_the_contract_says() {
    let (v1, v2) = (version("v1", 0).await, version("v2", 0).await);
    let proxy = start_proxy_with_file(&rollout_config(&v1, &v2, "", "")).await;
    // Nothing under way: pause, resume, promote, abort make no sense.
    for name in ["pause", "resume", "promote", "abort"] {
        let (status, body) = command(&proxy, name).await;
        assert_eq!(status, 409, "{name}: {body}");
        assert_eq!(body["state"], "idle");
    }
    assert_eq!(command(&proxy, "nonsense").await.0, 404);
    assert_eq!(command(&proxy, "start").await.0, 200);
    assert_eq!(command(&proxy, "start").await.0, 409);
    // While under way, the rollout owns its two backends' weights.
    let refused = client()
        .post(proxy.admin("/admin/weight?v2=50"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    assert_eq!(command(&proxy, "pause").await.1["state"], "paused");
    // A restart keeps the state, the step and the history.
    let proxy = proxy.restart().await;
    let restarted = get_json(proxy.admin("/admin/rollout")).await;
    assert_eq!(restarted["state"], "paused", "{restarted:#}");
    assert_eq!(restarted["history"].as_array().unwrap().len(), 2);
    assert_eq!(
        weights(&proxy).await,
        serde_json::json!({"v1": 80, "v2": 20})
    );
    assert_eq!(command(&proxy, "resume").await.1["state"], "running");
    let (status, aborted) = command(&proxy, "abort").await;
    assert_eq!(
        (status, aborted["state"].clone()),
        (200, "rolled_back".into())
    );
    assert_eq!(
        weights(&proxy).await,
        serde_json::json!({"v1": 100, "v2": 0})
    );
    // The weights are the operator's again.
    let freed = client()
        .post(proxy.admin("/admin/weight?v2=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(freed.status(), 200);
    assert_eq!(command(&proxy, "start").await.0, 200);
    let (status, promoted) = command(&proxy, "promote").await;
    assert_eq!(
        (status, promoted["state"].clone()),
        (200, "promoted".into())
    );
    assert_eq!(
        weights(&proxy).await,
        serde_json::json!({"v1": 0, "v2": 100})
    );
    let (status, body) = command(&proxy, "start").await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("reload"), "{body}");
    // A reload naming another pair resets it to idle.
    let path = proxy.config_path.clone().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let swapped = text
        .replace("baseline = \"v1\"", "baseline = \"vX\"")
        .replace("canary = \"v2\"", "canary = \"v1\"")
        .replace("baseline = \"vX\"", "baseline = \"v2\"");
    std::fs::write(&path, swapped).unwrap();
    let reloaded = client()
        .post(proxy.admin("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200);
    let reset = wait_for(&proxy, Duration::from_secs(5), |s| s["state"] == "idle").await;
    assert_eq!(reset["baseline_name"], "v2");
    assert_eq!(command(&proxy, "start").await.0, 200);
}

#[tokio::test]
async fn without_a_rollout_the_endpoints_say_so() {
    let v1 = version("v1", 0).await;
    let proxy = start_proxy(&config(&[("v1", vec![v1], 1)], "")).await;
    let response = client()
        .get(proxy.admin("/admin/rollout"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.text().await.unwrap().contains("[rollout]"));
    assert_eq!(command(&proxy, "start").await.0, 404);
}

/// A webhook that records the JSON bodies posted to it, answering `status`.
async fn webhook(status: u16) -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let posted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = posted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then as much body as Content-Length says.
                loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + length {
                            let body = &buf[end + 4..end + 4 + length];
                            if let Ok(json) = serde_json::from_slice(body) {
                                seen.lock().unwrap().push(json);
                            }
                            break;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}/hook"), posted)
}

#[tokio::test]
async fn each_transition_is_posted_to_the_webhook_and_a_failing_one_is_counted() {
    let (v1, v2) = (version("v1", 0).await, version("v2", 0).await);
    let (url, posted) = webhook(200).await;
    let extra = format!("webhook = \"{url}\"");
    let proxy = start_proxy_with_file(&rollout_config(&v1, &v2, &extra, "")).await;
    assert_eq!(command(&proxy, "start").await.0, 200);
    assert_eq!(command(&proxy, "abort").await.0, 200);
    let started = Instant::now();
    while posted.lock().unwrap().len() < 2 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut events: Vec<Value> = posted.lock().unwrap().clone();
    events.sort_by_key(|e| e["at"].as_u64());
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["started", "aborted"], "{events:?}");
    assert_eq!(events[0]["canary"], "v2");
    assert_eq!(events[0]["canary_percent"], 20);
    assert_eq!(events[1]["state"], "rolled_back");

    // A webhook that refuses: the rollout goes on, the failures are counted.
    let (refusing, _) = webhook(500).await;
    let extra = format!("webhook = \"{refusing}\"");
    let proxy = start_proxy_with_file(&rollout_config(&v1, &v2, &extra, "")).await;
    assert_eq!(command(&proxy, "start").await.1["state"], "running");
    let started = Instant::now();
    loop {
        let metrics = get_text(proxy.admin("/metrics")).await;
        if metrics.contains("canary_rollout_webhook_failures_total 1") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get_json(proxy.admin("/admin/rollout")).await["state"],
        "running"
    );
}
