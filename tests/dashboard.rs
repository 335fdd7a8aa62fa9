//! The dashboard (`GET /` on the admin listener): its security headers over real TCP, and the
//! page itself driven in headless Chromium (tests/fixtures/dashboard.py, selenium) against a
//! real proxy with real upstreams under load: both versions with their weights and a rising
//! request count, weights moved from the keyboard and applied (checked on the upstreams), a
//! rollout started from the page and seen to its promotion, at 1280 px and at 390 px. The
//! screenshots are kept in target/dashboard/.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const TOKEN: &str = "dashboard-test-token";

fn dashboard_config(v1: &Upstream, v2: &Upstream) -> String {
    config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v2.url()], 10)],
        &format!(
            "[admin]\ntoken = \"{TOKEN}\"\n\
             [mirror]\nbackend = \"v2\"\nfrom = \"v1\"\npercent = 100\n\
             [rollout]\nbaseline = \"v1\"\ncanary = \"v2\"\nsteps = [50, 100]\n\
             step_time = \"2s\"\n[rollout.analysis]\ninterval = \"250ms\"\nmin_requests = 20\n\
             latency_tolerance = 4.0\nerror_tolerance = 0.05\n"
        ),
    )
}

/// An admin API answer, with the token.
async fn admin_json(proxy: &TestProxy, path: &str) -> serde_json::Value {
    let response = client()
        .get(proxy.admin(path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

#[tokio::test]
async fn the_page_is_served_whole_with_a_strict_policy() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&dashboard_config(&v1, &v2)).await;
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/dashboard/app.js", "text/javascript; charset=utf-8"),
        ("/dashboard/app.css", "text/css; charset=utf-8"),
    ] {
        // The page itself needs no token: it holds no data, and asks for the token.
        let response = client().get(proxy.admin(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        assert_eq!(headers["content-type"], content_type);
        let policy = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(directive), "{policy}");
        }
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["x-frame-options"], "DENY");
    }
    // The data behind it is the admin API's, with its token.
    let refused = client()
        .get(proxy.admin("/admin/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    for _ in 0..5 {
        get_text(proxy.url("/")).await;
    }
    let stats = admin_json(&proxy, "/admin/stats").await;
    let requests: u64 = ["v1", "v2"]
        .iter()
        .map(|b| stats["backends"][b]["requests"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(requests, 5, "{stats}");
    assert!(stats["backends"]["v1"]["latency"].as_array().unwrap().len() > 5);
    // A page elsewhere cannot drive it: a cross-site write is refused as always.
    let cross = client()
        .post(proxy.admin("/admin/weight?v2=50"))
        .bearer_auth(TOKEN)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_and_steers_the_canary_in_a_browser() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&dashboard_config(&v1, &v2)).await;
    let _load = Load::start(&proxy, 4, Duration::from_millis(5));
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dashboard.py");
    let mut browser = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(format!("http://{}", proxy.admin_addr))
        .arg(TOKEN)
        .arg(&shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with selenium");
    let mut stdin = browser.stdin.take().unwrap();
    let mut lines = BufReader::new(browser.stdout.take().unwrap()).lines();
    let mut next_line = move || -> String {
        let line = lines
            .next()
            .expect("the browser script ended early")
            .unwrap();
        eprintln!("browser: {line}");
        line
    };
    loop {
        let line = tokio::task::block_in_place(&mut next_line);
        if line == "APPLIED" {
            break;
        }
    }
    // Applied from the page: v1 gets nothing any more, v2 everything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (v1_before, v2_before) = (v1.hits(), v2.hits());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        v1.hits(),
        v1_before,
        "v1 still served after the page set it to 0"
    );
    assert!(v2.hits() > v2_before + 20, "v2 not serving");
    writeln!(stdin, "ok").unwrap();
    loop {
        let line = tokio::task::block_in_place(&mut next_line);
        if line == "DONE" {
            break;
        }
    }
    let status = tokio::task::block_in_place(|| browser.wait()).unwrap();
    assert!(status.success(), "{status}");
    for shot in [
        "overview-1280",
        "rollout-running-1280",
        "rollout-promoted-1280",
        "phone-390",
    ] {
        let path = shots.join(format!("{shot}.png"));
        assert!(std::fs::metadata(&path).unwrap().len() > 1000, "{path:?}");
    }
    // What the page did went through the API: the rollout is promoted, canary at 100.
    let status = admin_json(&proxy, "/admin/rollout").await;
    assert_eq!(status["state"], "promoted");
    assert_eq!(status["canary_percent"], 100);
}
