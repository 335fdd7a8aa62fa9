//! Mirroring over real TCP: copies of safe requests go to the mirror backend beside the
//! served ones, marked and selected by request id; a mirror that is down, resetting or silent
//! changes nothing for clients; differences are found and named, and a served version that
//! differs from itself is noise; mirroring is set and stopped at runtime; copies are paired
//! with the served outcomes, and a rollout's shadow stage gives the canary copies only, then
//! starts step 1 or rolls back before any user reached it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A keep-alive HTTP/1.1 upstream answering every request with the JSON `body(n)` (n counts
/// its requests from 1), keeping each request it got (head and `content-length` body).
struct JsonUpstream {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
}

impl JsonUpstream {
    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

async fn json_upstream(body: impl Fn(usize) -> String + Send + Sync + 'static) -> JsonUpstream {
    answering(move |n| (200, body(n))).await
}

/// [`json_upstream`] answering the status and JSON `answer(n)` gives.
async fn answering(
    answer: impl Fn(usize) -> (u16, String) + Send + Sync + 'static,
) -> JsonUpstream {
    let body = answer;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (kept, body) = (heads.clone(), Arc::new(body));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (kept, body) = (kept.clone(), body.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&seen[..end + 4]).into_owned();
                    seen.drain(..end + 4);
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                    while seen.len() < length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let request_body: Vec<u8> = seen.drain(..length).collect();
                    let n = {
                        let mut kept = kept.lock().unwrap();
                        kept.push(head + &String::from_utf8_lossy(&request_body));
                        kept.len()
                    };
                    let (status, text) = body(n);
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    JsonUpstream { url, heads }
}

/// An upstream that reads requests and never answers (holding each connection 30 s).
async fn silent_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut stream).await {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    url
}

fn mirror_config(served: &[&str], canary: &str, mirror: &str) -> String {
    let served: Vec<String> = served.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [{}]\nweight = 100\n\
         [[backend]]\nname = \"v2\"\nurls = [\"{canary}\"]\nweight = 0\n\
         [mirror]\nbackend = \"v2\"\n{mirror}\n",
        served.join(", ")
    )
}

async fn report(proxy: &TestProxy) -> Value {
    let text = get_text(proxy.admin("/admin/mirror")).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Polls the report until `done` holds, for at most 10 s.
async fn report_when(proxy: &TestProxy, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let shown = report(proxy).await;
        if done(&shown) {
            return shown;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{shown:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn safe_requests_are_copied_marked_and_compared() {
    let v1 = json_upstream(|_| r#"{"items":[{"id":1,"price":10}],"ts":1}"#.to_owned()).await;
    let v2 = json_upstream(|_| r#"{"items":[{"id":1,"price":12}],"ts":1}"#.to_owned()).await;
    let proxy = start_proxy(&mirror_config(&[&v1.url], &v2.url, "")).await;
    let c = client();
    for i in 0..20 {
        let response = c
            .get(proxy.url(&format!("/items?page={i}")))
            .header("x-request-id", format!("req-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-canary-backend"], "v1");
        assert!(response.text().await.unwrap().contains("\"price\":10"));
    }
    let posted = c.post(proxy.url("/items")).send().await.unwrap();
    assert_eq!(posted.status(), 200);
    // A mark a client sends is not passed on: only copies carry it.
    let marked = c
        .get(proxy.url("/marked"))
        .header("x-canary-mirror", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(marked.status(), 200);
    let shown = report_when(&proxy, |r| r["counts"]["compared"] == 21).await;
    let counts = &shown["counts"];
    assert_eq!(counts["copied"], 21, "{shown:#}");
    assert_eq!(counts["skipped_method"], 1);
    assert_eq!(counts["different"], 21);
    assert!(v1.heads().iter().all(|h| !h.contains("x-canary-mirror")));
    assert_eq!(shown["paths"][0]["path"], "body.items[].price");
    assert_eq!(shown["paths"][0]["reported"], true);
    let example = &shown["examples"][0];
    assert_eq!(example["method"], "GET");
    assert_eq!(example["differences"][0]["served"], "10");
    assert_eq!(example["differences"][0]["copy"], "12");
    // The copies: the same request, marked, with the served request's id; no POST.
    let heads = v2.heads();
    assert_eq!(heads.len(), 21);
    for i in 0..20 {
        let head = heads
            .iter()
            .find(|h| h.contains(&format!("x-request-id: req-{i}\r\n")))
            .unwrap_or_else(|| panic!("no copy of req-{i}: {heads:?}"));
        assert!(
            head.starts_with(&format!("GET /items?page={i} HTTP/1.1\r\n")),
            "{head}"
        );
        assert!(head.contains("x-canary-mirror: 1\r\n"), "{head}");
    }
    let metrics = get_text(proxy.admin("/metrics")).await;
    let copied = [("result", "copied")];
    assert_eq!(
        metric(&metrics, "canary_mirror_requests_total", &copied),
        21.0
    );
    let different = [("result", "different")];
    assert_eq!(
        metric(&metrics, "canary_mirror_comparisons_total", &different),
        21.0
    );
}

#[tokio::test]
async fn selection_is_by_request_id() {
    let v1 = json_upstream(|_| "{}".to_owned()).await;
    let v2 = json_upstream(|_| "{}".to_owned()).await;
    let proxy = start_proxy(&mirror_config(&[&v1.url], &v2.url, "percent = 50")).await;
    let c = client();
    for i in 0..200 {
        for _ in 0..2 {
            let id = format!("id-{i}");
            let response = c
                .get(proxy.url("/"))
                .header("x-request-id", id)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    }
    let count = |r: &Value, key: &str| r["counts"][key].as_u64().unwrap();
    // A selected request is copied, or dropped when its copy could not start in time (the
    // copies' threads run at the lowest priority: a loaded machine starves them).
    let shown = report_when(&proxy, |r| {
        count(r, "copied") + count(r, "dropped") + count(r, "skipped_percent") == 400
    })
    .await;
    let (copied, dropped) = (count(&shown, "copied"), count(&shown, "dropped"));
    // Each id is selected both times or neither: an even count, about half of 400.
    let selected = copied + dropped;
    assert_eq!(selected % 2, 0, "{shown:#}");
    assert!((140..=260).contains(&selected), "{selected}");
    let heads = v2.heads();
    let mut copied_once = 0;
    for i in 0..200 {
        let copies = heads
            .iter()
            .filter(|h| h.contains(&format!("x-request-id: id-{i}\r\n")))
            .count();
        assert!(copies <= 2, "id-{i} copied {copies} times");
        copied_once += usize::from(copies == 1);
    }
    // An id copied once had its other copy dropped.
    assert!(
        copied_once as u64 <= dropped,
        "{copied_once} ids copied once, {dropped} dropped"
    );
    assert_eq!(shown["counts"]["identical"], copied);
}

#[tokio::test]
async fn a_mirror_that_is_down_resetting_or_silent_changes_nothing_for_clients() {
    let v1 = json_upstream(|n| format!("{{\"n\":{n}}}")).await;
    let down = format!("http://{}", refused_addr().await);
    let (resetting, _) = broken_upstream().await;
    let resetting = format!("http://{resetting}");
    let silent = silent_upstream().await;
    for (mirror, outcome) in [
        (down, "errors"),
        (resetting, "errors"),
        (silent, "timeouts"),
    ] {
        let proxy = start_proxy(&mirror_config(
            &[&v1.url],
            &mirror,
            "timeout = \"300ms\"\nmax_in_flight = 4",
        ))
        .await;
        let c = client();
        let started = Instant::now();
        for _ in 0..10 {
            let response = c.get(proxy.url("/")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            assert!(response.text().await.unwrap().starts_with("{\"n\":"));
        }
        // Ten answers without waiting for any copy: well under one copy timeout each.
        assert!(started.elapsed() < Duration::from_millis(2_500), "{mirror}");
        let shown = report_when(&proxy, |r| {
            let c = &r["counts"];
            c[outcome].as_u64().unwrap() + c["dropped"].as_u64().unwrap() == 10
        })
        .await;
        assert_eq!(shown["counts"]["copied"], 0, "{mirror}: {shown:#}");
        assert_eq!(shown["counts"]["compared"], 0);
    }
}

#[tokio::test]
async fn noise_between_two_served_instances_is_not_a_canary_difference() {
    let stamped = |price: u32| move |n: usize| format!(r#"{{"price":{price},"ts":{n},"id":"x"}}"#);
    let a = json_upstream(stamped(10)).await;
    let b = json_upstream(|n| format!(r#"{{"price":10,"ts":{},"id":"x"}}"#, n + 1000)).await;
    let canary = json_upstream(stamped(12)).await;
    let proxy = start_proxy(&mirror_config(&[&a.url, &b.url], &canary.url, "")).await;
    let c = client();
    for _ in 0..60 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let shown = report_when(&proxy, |r| r["counts"]["compared"] == 60).await;
    let paths = shown["paths"].as_array().unwrap();
    let row = |path: &str| {
        paths
            .iter()
            .find(|p| p["path"] == path)
            .unwrap_or_else(|| panic!("no {path}: {shown:#}"))
            .clone()
    };
    let ts = row("body.ts");
    assert!(ts["noise"].as_u64().unwrap() > 0, "{ts}");
    assert_eq!(ts["reported"], false, "{ts}");
    let price = row("body.price");
    assert_eq!(
        (price["different"].as_u64(), price["noise"].as_u64()),
        (Some(60), Some(0))
    );
    assert_eq!(price["reported"], true);
    assert!(paths.iter().all(|p| p["path"] != "body.id"));
    // The second copies take turns of their own: the served requests still alternate
    // between the two instances (unmarked requests: served ones).
    let served = |u: &JsonUpstream| u.heads().iter().filter(|h| !is_copy(h)).count();
    assert_eq!((served(&a), served(&b)), (30, 30));
}

#[tokio::test]
async fn mirroring_is_set_and_stopped_at_runtime() {
    let v1 = json_upstream(|_| "{\"a\":1}".to_owned()).await;
    let v2 = json_upstream(|_| "{\"a\":1}".to_owned()).await;
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"{}\"]\nweight = 100\n\
         [[backend]]\nname = \"v2\"\nurls = [\"{}\"]\nweight = 0\n",
        v1.url, v2.url
    );
    let proxy = start_proxy(&text).await;
    let c = client();
    assert_eq!(report(&proxy).await, json!({"version": 1, "config": null}));
    for (body, says) in [
        (r#"{"backend": "v3"}"#, "unknown backend"),
        (r#"{"backend": "v2", "percent": 101}"#, "mirror.percent"),
        (r#"{"backend": "v2", "methods": ["get"]}"#, "case-sensitive"),
        (r#"{"backend": "v2", "copies": 1}"#, "unknown key"),
    ] {
        let refused = c
            .put(proxy.admin("/admin/mirror"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 400, "{body}");
        assert!(refused.text().await.unwrap().contains(says), "{body}");
    }
    let set = c
        .put(proxy.admin("/admin/mirror"))
        .header("if-match", "\"1\"")
        .body(r#"{"backend": "v2", "max_body": "1KiB"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    assert_eq!(set.headers()["etag"], "\"2\"");
    for _ in 0..5 {
        c.get(proxy.url("/")).send().await.unwrap();
    }
    let shown = report_when(&proxy, |r| r["counts"]["compared"] == 5).await;
    assert_eq!(shown["config"]["max_body"], "1KiB");
    assert_eq!(shown["counts"]["identical"], 5);
    let reset = c
        .post(proxy.admin("/admin/mirror/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200);
    assert_eq!(report(&proxy).await["counts"]["compared"], 0);
    let stopped = c.delete(proxy.admin("/admin/mirror")).send().await.unwrap();
    assert_eq!(stopped.status(), 200);
    for _ in 0..5 {
        c.get(proxy.url("/")).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(v2.heads().len(), 5, "no copy after DELETE");
    assert_eq!(report(&proxy).await["config"], Value::Null);
}

#[tokio::test]
async fn a_listed_method_with_a_body_is_copied_with_it_up_to_max_body() {
    let v1 = json_upstream(|_| "{}".to_owned()).await;
    let v1b = json_upstream(|_| "{}".to_owned()).await;
    let v2 = json_upstream(|_| "{}".to_owned()).await;
    let extra = "methods = [\"GET\", \"POST\"]\nmax_body = \"1KiB\"";
    let proxy = start_proxy(&mirror_config(&[&v1.url, &v1b.url], &v2.url, extra)).await;
    let c = client();
    let small = "x".repeat(700);
    let posted = c
        .post(proxy.url("/orders"))
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
    let large = "y".repeat(2000);
    let posted = c
        .post(proxy.url("/orders"))
        .body(large)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
    let shown = report_when(&proxy, |r| {
        r["counts"]["compared"] == 1 && r["counts"]["skipped_body"] == 1
    })
    .await;
    assert_eq!(shown["counts"]["copied"], 1, "{shown:#}");
    let heads = v2.heads();
    assert_eq!(heads.len(), 1);
    assert!(
        heads[0].starts_with("POST /orders HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    assert!(heads[0].contains("content-length: 700\r\n"));
    assert!(heads[0].ends_with(&format!("\r\n\r\n{small}")));
    // Both served in full, once each: no second copy repeats a POST on the served version.
    let served: Vec<String> = [v1.heads(), v1b.heads()].concat();
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(served.iter().any(|h| h.ends_with(&"y".repeat(2000))));
}

#[tokio::test]
async fn a_websocket_upgrade_is_not_copied() {
    let v1 = upstream("v1").await;
    let v2 = json_upstream(|_| "{}".to_owned()).await;
    let proxy = start_proxy(&mirror_config(&[&v1.url()], &v2.url, "")).await;
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    ws.close(None).await.unwrap();
    let shown = report_when(&proxy, |r| r["counts"]["skipped_method"] == 1).await;
    assert_eq!(shown["counts"]["copied"], 0);
    assert!(v2.heads().is_empty());
}

/// A rollout from v1 to v2 with a shadow stage of at least `shadow`, a fast plan, and
/// `extra` lines (more tables) after it.
fn shadow_config(v1: &str, v2: &str, shadow: &str, extra: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"{v1}\"]\nweight = 100\n\
         [[backend]]\nname = \"v2\"\nurls = [\"{v2}\"]\nweight = 0\n\
         [rollout]\nbaseline = \"v1\"\ncanary = \"v2\"\nshadow = \"{shadow}\"\n\
         steps = [20, 100]\nstep_time = \"1s\"\n\
         [rollout.analysis]\ninterval = \"200ms\"\nmin_requests = 20\nerror_tolerance = 0.05\n\
         latency_tolerance = 3.0\nmax_step_time = \"60s\"\nmax_diff_rate = 0.05\n{extra}\n"
    )
}

/// Clients in a loop, each pausing 5 ms between requests: copies run at the lowest CPU
/// priority, and a test that kept both cores busy would starve them.
fn users(proxy: &TestProxy) -> Load {
    Load::start(proxy, 4, Duration::from_millis(5))
}

async fn rollout(proxy: &TestProxy) -> Value {
    let text = get_text(proxy.admin("/admin/rollout")).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn is_copy(head: &str) -> bool {
    head.contains("\r\nx-canary-mirror: 1\r\n")
}

/// Polls the rollout until it leaves the shadow stage (at most 30 s), checking on the way
/// that every request v2 got while the rollout was in it was a copy; the status it left in.
async fn through_the_shadow_stage(proxy: &TestProxy, v2: &JsonUpstream) -> Value {
    let started = Instant::now();
    loop {
        // v2's requests first, then the state: if it is still the shadow stage, all of them
        // came during it.
        let heads = v2.heads();
        let status = rollout(proxy).await;
        if status["state"] != "shadow" {
            return status;
        }
        let users = heads.iter().filter(|h| !is_copy(h)).count();
        assert_eq!(users, 0, "a user reached the canary in the shadow stage");
        assert!(started.elapsed() < Duration::from_secs(30), "{status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_shadow_stage_gives_the_canary_copies_only_then_step_1_starts() {
    let v1 = json_upstream(|_| r#"{"items":[{"id":1,"price":10}]}"#.to_owned()).await;
    let v2 = json_upstream(|_| r#"{"items":[{"id":1,"price":10}]}"#.to_owned()).await;
    let proxy = start_proxy_with_file(&shadow_config(&v1.url, &v2.url, "1s", "")).await;
    assert_eq!(report(&proxy).await["config"], Value::Null);
    let users = users(&proxy);
    let started = client()
        .post(proxy.admin("/admin/rollout/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 200);
    let started: Value = serde_json::from_str(&started.text().await.unwrap()).unwrap();
    assert_eq!(started["state"], "shadow", "{started:#}");
    assert_eq!(started["canary_percent"], 0);
    // The rollout mirrors to the canary (mirroring's defaults) and owns mirroring meanwhile.
    let shown = report(&proxy).await;
    assert_eq!(shown["config"]["backend"], "v2", "{shown:#}");
    for (method, body) in [
        (reqwest::Method::PUT, r#"{"backend": "v1"}"#),
        (reqwest::Method::DELETE, ""),
    ] {
        let refused = client()
            .request(method, proxy.admin("/admin/mirror"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 409);
        let body: Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("shadow stage"),
            "{body}"
        );
    }
    let status = through_the_shadow_stage(&proxy, &v2).await;
    assert_eq!(status["state"], "running", "{status:#}");
    assert_eq!(status["canary_percent"], 20);
    let history = status["history"].as_array().unwrap();
    assert_eq!(
        history[1]["reason"], "the shadow stage passed",
        "{status:#}"
    );
    assert_eq!(history[1]["event"], "advanced");
    let shadow = &status["shadow"];
    assert_eq!(shadow["before_step_1"], false);
    assert!(shadow["pairs"].as_u64().unwrap() >= 20, "{shadow:#}");
    assert_eq!(shadow["different"], 0);
    assert_eq!(shadow["differences"]["verdict"], "pass", "{shadow:#}");
    // Mirroring is given back as the config file has it: off.
    assert_eq!(report(&proxy).await["config"], Value::Null);
    // And users now reach the canary.
    let before = users.served().len();
    report_when(&proxy, |_| {
        users.served()[before..].iter().any(|b| b == "v2") && v2.heads().iter().any(|h| !is_copy(h))
    })
    .await;
    let metrics = get_text(proxy.admin("/metrics")).await;
    let passed = [("metric", "differences"), ("verdict", "pass")];
    assert!(metric(&metrics, "canary_rollout_verdicts_total", &passed) > 0.0);
}

#[tokio::test]
async fn a_failing_shadow_stage_rolls_back_before_any_user_reached_the_canary() {
    // A canary failing one request in four; one whose prices differ one time in four; and a
    // healthy one under a fault drill (which holds or aborts copies as it does requests). A
    // failed answer differs from the served one too (its status): either verdict may fail
    // first then; answers that differ with no error can only fail the differences.
    let failing = |n: usize| {
        let status = if n.is_multiple_of(4) { 500 } else { 200 };
        (status, r#"{"price":10}"#.to_owned())
    };
    let differing = |n: usize| {
        let price = if n.is_multiple_of(4) { 12 } else { 10 };
        (200, format!(r#"{{"price":{price}}}"#))
    };
    let healthy = |_: usize| (200, r#"{"price":10}"#.to_owned());
    type Answer = Box<dyn Fn(usize) -> (u16, String) + Send + Sync>;
    let cases: [(&[&str], Answer, bool); 3] = [
        (&["errors", "differences"], Box::new(failing), false),
        (&["differences"], Box::new(differing), false),
        (&["errors", "differences"], Box::new(healthy), true),
    ];
    for (metrics, answer, drill) in cases {
        let v1 = json_upstream(|_| r#"{"price":10}"#.to_owned()).await;
        let v2 = answering(answer).await;
        // [mirror] names the canary: the shadow stage mirrors with its settings, and leaves
        // it in force afterwards.
        let mirror = "[mirror]\nbackend = \"v2\"\nignore_fields = [\"ts\"]";
        let proxy = start_proxy_with_file(&shadow_config(&v1.url, &v2.url, "5s", mirror)).await;
        if drill {
            let put = client()
                .put(proxy.admin("/admin/faults"))
                .body(r#"[{"backend": "v2", "abort_percent": 30, "abort_status": 503}]"#)
                .send()
                .await
                .unwrap();
            assert_eq!(put.status(), 200);
        }
        let users = users(&proxy);
        let started = client()
            .post(proxy.admin("/admin/rollout/start"))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), 200);
        let status = through_the_shadow_stage(&proxy, &v2).await;
        assert_eq!(status["state"], "rolled_back", "{status:#}");
        let reason = status["history"].as_array().unwrap().last().unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            metrics.iter().any(|metric| reason
                .contains(&format!("the {metric} verdict failed in the shadow stage"))),
            "{reason}"
        );
        assert_eq!(
            status["shadow"]["before_step_1"], true,
            "ended in the shadow stage"
        );
        assert!(v2.heads().iter().all(|h| is_copy(h)));
        assert!(users.served().iter().all(|b| b == "v1"));
        let weights = get_text(proxy.admin("/admin/weight")).await;
        assert_eq!(weights.trim(), r#"{"v1":100,"v2":0}"#);
        if metrics.contains(&"errors") {
            assert!(status["shadow"]["copy_only_errors"].as_u64().unwrap() > 0);
        }
        if drill {
            let metrics = get_text(proxy.admin("/metrics")).await;
            let aborts = [("backend", "v2"), ("kind", "abort")];
            assert!(metric(&metrics, "canary_faults_injected_total", &aborts) > 0.0);
        }
        // [mirror] of the file stays in force once the rollout gives it back.
        assert_eq!(report(&proxy).await["config"]["backend"], "v2");
    }
}

/// Each copy's outcome is paired with its request's served outcome, a 502 of the served
/// version included: the pairs a shadow stage judges errors on.
#[tokio::test]
async fn copies_are_paired_with_the_served_outcome_of_the_same_request() {
    let (broken, _) = broken_upstream().await;
    let v2 = answering(|n| (if n.is_multiple_of(2) { 500 } else { 200 }, "{}".to_owned())).await;
    let proxy = start_proxy(&mirror_config(&[&format!("http://{broken}")], &v2.url, "")).await;
    for _ in 0..4 {
        let answer = client().get(proxy.url("/")).send().await.unwrap();
        assert_eq!(answer.status(), 502);
    }
    let shown = report_when(&proxy, |r| r["counts"]["pairs"] == 4).await;
    // The served version failed all four; the copies two: two pairs where only the served
    // request failed, two where both did. Nothing was compared: no answer to compare with.
    assert_eq!(shown["counts"]["served_only_errors"], 2, "{shown:#}");
    assert_eq!(shown["counts"]["copy_only_errors"], 0);
    assert_eq!(shown["counts"]["compared"], 0);
    let v1 = json_upstream(|_| "{}".to_owned()).await;
    let proxy = start_proxy(&mirror_config(&[&v1.url], &v2.url, "")).await;
    for _ in 0..4 {
        let answer = client().get(proxy.url("/")).send().await.unwrap();
        assert_eq!(answer.status(), 200);
    }
    let shown = report_when(&proxy, |r| r["counts"]["pairs"] == 4).await;
    assert_eq!(shown["counts"]["copy_only_errors"], 2, "{shown:#}");
    assert_eq!(shown["counts"]["served_only_errors"], 0);
    assert_eq!(shown["counts"]["compared"], 4);
}

async fn post(proxy: &TestProxy, path: &str) -> (u16, Value) {
    let response = client().post(proxy.admin(path)).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The shadow stage holds its mirroring through a reload, a pause and a restart of the
/// process, refuses a reset of the counts it judges, and gives mirroring back when aborted.
#[tokio::test]
async fn the_shadow_stage_keeps_its_mirroring_through_reload_pause_and_restart() {
    let v1 = json_upstream(|_| "{}".to_owned()).await;
    let v2 = json_upstream(|_| "{}".to_owned()).await;
    let proxy = start_proxy_with_file(&shadow_config(&v1.url, &v2.url, "1h", "")).await;
    assert_eq!(post(&proxy, "/admin/rollout/start").await.0, 200);
    // Copies of the baseline's requests only.
    let mirrored =
        |shown: &Value| shown["config"]["backend"] == "v2" && shown["config"]["from"] == "v1";
    assert!(mirrored(&report(&proxy).await));
    let (status, refused) = post(&proxy, "/admin/mirror/reset").await;
    assert_eq!(status, 409, "{refused}");
    // The file has no [mirror]: a reload keeps the stage's, in the same table change (not
    // turned off and then set again by the rollout: the version moves by one).
    let before = report(&proxy).await["version"].as_u64().unwrap();
    assert_eq!(post(&proxy, "/admin/reload").await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = report(&proxy).await;
    assert!(mirrored(&after));
    assert_eq!(after["version"].as_u64(), Some(before + 1), "{after:#}");
    let (_, paused) = post(&proxy, "/admin/rollout/pause").await;
    assert_eq!(paused["state"], "paused");
    assert!(mirrored(&report(&proxy).await));
    let (_, resumed) = post(&proxy, "/admin/rollout/resume").await;
    assert_eq!(resumed["state"], "shadow");
    // A restart resumes the stage from the state file and mirrors again.
    let proxy = proxy.restart().await;
    let status = rollout(&proxy).await;
    assert_eq!(status["state"], "shadow", "{status:#}");
    assert!(mirrored(&report(&proxy).await));
    let before = v2.heads().len();
    for _ in 0..5 {
        client().get(proxy.url("/")).send().await.unwrap();
    }
    report_when(&proxy, |_| v2.heads().len() >= before + 5).await;
    assert!(v2.heads().iter().all(|h| is_copy(h)));
    // Aborted: mirroring is the file's again (none), and the admin API's to change.
    let (_, aborted) = post(&proxy, "/admin/rollout/abort").await;
    assert_eq!(aborted["state"], "rolled_back");
    assert_eq!(report(&proxy).await["config"], Value::Null);
    let put = client()
        .put(proxy.admin("/admin/mirror"))
        .body(r#"{"backend": "v2"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
}

/// Copies that never answer in time are canary errors with nothing to compare: the errors
/// verdict alone rolls the stage back.
#[tokio::test]
async fn copies_that_time_out_fail_the_errors_verdict_alone() {
    let v1 = json_upstream(|_| "{}".to_owned()).await;
    let v2 = json_upstream(|_| "{}".to_owned()).await;
    let mirror = "[mirror]\nbackend = \"v2\"\ntimeout = \"1s\"\n\
                  [[fault]]\nbackend = \"v2\"\ndelay_percent = 100\ndelay = \"2s\"";
    let proxy = start_proxy_with_file(&shadow_config(&v1.url, &v2.url, "5s", mirror)).await;
    let users = users(&proxy);
    assert_eq!(post(&proxy, "/admin/rollout/start").await.0, 200);
    let status = through_the_shadow_stage(&proxy, &v2).await;
    assert_eq!(status["state"], "rolled_back", "{status:#}");
    let reason = status["history"].as_array().unwrap().last().unwrap()["reason"].clone();
    assert!(
        reason
            .as_str()
            .unwrap()
            .contains("the errors verdict failed in the shadow stage"),
        "{reason}"
    );
    let shadow = &status["shadow"];
    assert_eq!(shadow["compared"], 0, "{shadow:#}");
    assert_eq!(shadow["copy_only_errors"], shadow["pairs"], "{shadow:#}");
    assert!(users.served().iter().all(|b| b == "v1"));
    let shown = report(&proxy).await;
    assert!(
        shown["counts"]["timeouts"].as_u64().unwrap() > 0,
        "{shown:#}"
    );
}

/// `from` copies one backend's requests only: the shadow stage's mirroring of the
/// baseline's, when a third version serves too.
#[tokio::test]
async fn mirroring_from_one_backend_copies_its_requests_only() {
    let v1 = json_upstream(|_| "{}".to_owned()).await;
    let v2 = json_upstream(|_| "{}".to_owned()).await;
    let v3 = json_upstream(|_| "{}".to_owned()).await;
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"{}\"]\nweight = 1\n\
         [[backend]]\nname = \"v2\"\nurls = [\"{}\"]\nweight = 0\n\
         [[backend]]\nname = \"v3\"\nurls = [\"{}\"]\nweight = 1\n",
        v1.url, v2.url, v3.url
    );
    let proxy = start_proxy(&config).await;
    let put = |body: &'static str| {
        let request = client().put(proxy.admin("/admin/mirror")).body(body);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(put(r#"{"backend": "v2", "from": "v9"}"#).await, 400);
    assert_eq!(put(r#"{"backend": "v2", "from": "v2"}"#).await, 400);
    assert_eq!(put(r#"{"backend": "v2", "from": "v1"}"#).await, 200);
    assert_eq!(report(&proxy).await["config"]["from"], "v1");
    for _ in 0..40 {
        let answer = client().get(proxy.url("/")).send().await.unwrap();
        assert_eq!(answer.status(), 200);
    }
    let served_by_v1 = v1.heads().len();
    assert!((5..=35).contains(&served_by_v1), "{served_by_v1}");
    report_when(&proxy, |r| r["counts"]["copied"] == served_by_v1).await;
    // The copies are of v1's requests, each once.
    let ids = |u: &JsonUpstream| {
        let mut ids: Vec<String> = u
            .heads()
            .iter()
            .filter_map(|h| h.lines().find_map(|l| l.strip_prefix("x-request-id: ")))
            .map(str::to_owned)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&v2), ids(&v1));
}
