//! Endpoint health over real TCP: active checks taking a version out and back, a black-holed
//! endpoint not delaying the others' checks, passive ejection and its cool-down, fail-open when
//! everything is down, and checks following the table across reloads and weight changes.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use canary_proxy::{Endpoint, HealthSupervisor};
use common::*;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::time::{Instant, sleep};

/// A `[[backend]]` with optional extra tables (`[backend.health]`, `[backend.outlier]`).
fn backend(name: &str, urls: &[String], weight: u32, tables: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[[backend]]\nname = \"{name}\"\nurls = [{}]\nweight = {weight}\n{tables}\n",
        urls.join(", ")
    )
}

fn health_table(interval: &str, timeout: &str, unhealthy: u32, healthy: u32) -> String {
    format!(
        "[backend.health]\npath = \"/health\"\ninterval = \"{interval}\"\ntimeout = \"{timeout}\"\n\
         unhealthy_threshold = {unhealthy}\nhealthy_threshold = {healthy}\n"
    )
}

fn proxy_config(backends: &[String]) -> String {
    proxy_config_with("", backends)
}

/// Like [`proxy_config`], with `settings` added to `[proxy]`.
fn proxy_config_with(settings: &str, backends: &[String]) -> String {
    let mut text = config(&[], settings);
    for b in backends {
        text.push_str(b);
    }
    text
}

/// The endpoint `index` of backend `name` in the proxy's current table.
fn endpoint(proxy: &TestProxy, name: &str, index: usize) -> Arc<Endpoint> {
    proxy.table.load().backend(name).unwrap().endpoints[index].clone()
}

/// Polls `condition` every 10 ms; panics with `what` if it does not hold within `limit`.
/// Returns how long it took.
async fn wait_for(what: &str, limit: Duration, condition: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// The backend (`x-canary-backend`) and the upstream (`x-served-by`) that served a GET `/`.
async fn get(client: &reqwest::Client, proxy: &TestProxy, user: Option<&str>) -> (u16, String) {
    let mut request = client.get(proxy.url("/"));
    if let Some(user) = user {
        request = request.header("x-user-id", user);
    }
    let response = request.send().await.unwrap();
    let served = response
        .headers()
        .get("x-served-by")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (response.status().as_u16(), served)
}

/// Backend `name` as `GET /admin/routes` shows it.
async fn routes_entry(client: &reqwest::Client, proxy: &TestProxy, name: &str) -> Value {
    let text = client
        .get(proxy.admin("/admin/routes"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let routes: Value = serde_json::from_str(&text).unwrap();
    routes["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name} in {text}"))
        .clone()
}

/// Rewrites the proxy's config file and reloads it through `POST /admin/reload`.
async fn reload(client: &reqwest::Client, proxy: &TestProxy, text: &str) {
    std::fs::write(proxy.config_path.as_ref().unwrap(), text).unwrap();
    let response = client
        .post(proxy.admin("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

/// The proxy's own supervisor: the control plane starts it and syncs it on every table change.
fn supervisor(proxy: &TestProxy) -> &HealthSupervisor {
    proxy.control.health()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_check_takes_a_version_out_and_back_sticky_users_included() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let check = health_table("100ms", "500ms", 2, 2);
    let proxy = start_proxy(&proxy_config(&[
        backend("v1", &[v1.url()], 50, &check),
        backend("v2", &[v2.url()], 50, &check),
    ]))
    .await;
    assert_eq!(supervisor(&proxy).checks(), 2);
    let client = client();
    // v1 owns buckets [0, 5000), v2 [5000, 10000).
    let canary_user = (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| reference_bucket("", u) >= 5000)
        .unwrap();
    assert_eq!(get(&client, &proxy, Some(&canary_user)).await.1, "v2");

    v2.healthy.store(false, Ordering::SeqCst);
    let v2_endpoint = endpoint(&proxy, "v2", 0);
    let took = wait_for("v2 marked down", Duration::from_secs(3), || {
        !v2_endpoint.is_healthy()
    })
    .await;
    // Two failed probes 100 ms apart, plus up to one interval until the first of them.
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    let status = v2_endpoint.status();
    assert!(
        !status.up && !status.active_up && !status.ejected,
        "{status:?}"
    );
    for _ in 0..10 {
        assert_eq!(
            get(&client, &proxy, Some(&canary_user)).await,
            (200, "v1".into())
        );
    }
    for _ in 0..40 {
        assert_eq!(get(&client, &proxy, None).await, (200, "v1".into()));
    }

    v2.healthy.store(true, Ordering::SeqCst);
    wait_for("v2 marked up", Duration::from_secs(3), || {
        v2_endpoint.is_healthy()
    })
    .await;
    assert_eq!(
        get(&client, &proxy, Some(&canary_user)).await,
        (200, "v2".into())
    );
    let mut on_v2 = 0;
    for _ in 0..40 {
        if get(&client, &proxy, None).await.1 == "v2" {
            on_v2 += 1;
        }
    }
    assert!(on_v2 > 0, "v2 got no weighted traffic back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_endpoint_does_not_delay_the_other_checks() {
    // Accepts connections and never answers.
    let hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hole.accept().await {
            held.push(stream);
        }
    });
    let good = upstream("good").await;
    let proxy = start_proxy(&proxy_config(&[backend(
        "v1",
        &[good.url(), format!("http://{hole_addr}")],
        1,
        &health_table("100ms", "1s", 2, 1),
    )]))
    .await;
    let (good_endpoint, hole_endpoint) = (endpoint(&proxy, "v1", 0), endpoint(&proxy, "v1", 1));

    // While the black hole's first probe hangs for its full second, the good endpoint is
    // probed at its own pace.
    sleep(Duration::from_millis(50)).await;
    let before = good.hits();
    sleep(Duration::from_millis(800)).await;
    let probes = good.hits() - before;
    assert!(
        probes >= 5,
        "only {probes} probes of the good endpoint in 800ms"
    );
    assert!(good_endpoint.is_healthy());

    // A failure of the good endpoint is noticed within its own intervals, not the hole's.
    good.healthy.store(false, Ordering::SeqCst);
    let took = wait_for("good endpoint marked down", Duration::from_secs(3), || {
        !good_endpoint.is_healthy()
    })
    .await;
    assert!(took < Duration::from_millis(700), "took {took:?}");

    // The black hole itself goes down after two timed-out probes.
    wait_for("black hole marked down", Duration::from_secs(4), || {
        !hole_endpoint.is_healthy()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_an_endpoint_until_the_cool_down_ends() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let outlier = "[backend.outlier]\nconsecutive_failures = 3\nbase_ejection = \"300ms\"\nmax_ejection = \"1s\"\n";
    let proxy = start_proxy(&proxy_config(&[backend(
        "v1",
        &[a.url(), b.url()],
        1,
        outlier,
    )]))
    .await;
    assert_eq!(supervisor(&proxy).checks(), 0, "no [backend.health]");
    let client = client();
    let a_endpoint = endpoint(&proxy, "v1", 0);

    a.failing.store(true, Ordering::SeqCst);
    let mut errors = 0;
    for _ in 0..20 {
        let (status, served) = get(&client, &proxy, None).await;
        if status == 500 {
            assert_eq!(served, "a");
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "ejected after exactly consecutive_failures 5xx");
    let status = a_endpoint.status();
    assert!(
        status.ejected && status.active_up && !status.up,
        "{status:?}"
    );
    assert_eq!(status.ejections, 1);
    for _ in 0..20 {
        assert_eq!(get(&client, &proxy, None).await, (200, "b".into()));
    }

    // Recovered and back in after the cool-down.
    a.failing.store(false, Ordering::SeqCst);
    sleep(Duration::from_millis(350)).await;
    let mut on_a = 0;
    for _ in 0..10 {
        let (status, served) = get(&client, &proxy, None).await;
        assert_eq!(status, 200);
        on_a += usize::from(served == "a");
    }
    assert!(on_a >= 4, "a served {on_a} of 10 after its cool-down");
    assert!(!a_endpoint.status().ejected);

    // Failing again soon after: the second ejection lasts twice as long (600ms).
    a.failing.store(true, Ordering::SeqCst);
    let mut errors = 0;
    for _ in 0..20 {
        errors += usize::from(get(&client, &proxy, None).await.0 == 500);
    }
    assert_eq!(errors, 3);
    assert_eq!(a_endpoint.status().ejections, 2);
    a.failing.store(false, Ordering::SeqCst);
    sleep(Duration::from_millis(350)).await;
    assert!(
        !a_endpoint.is_healthy(),
        "still ejected after one base period"
    );
    sleep(Duration::from_millis(300)).await;
    assert!(a_endpoint.is_healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_down_fails_open_and_still_serves() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    v1.healthy.store(false, Ordering::SeqCst);
    v2.healthy.store(false, Ordering::SeqCst);
    let check = health_table("100ms", "500ms", 1, 1);
    let proxy = start_proxy(&proxy_config(&[
        backend("v1", &[v1.url()], 80, &check),
        backend("v2", &[v2.url()], 20, &check),
    ]))
    .await;
    let (e1, e2) = (endpoint(&proxy, "v1", 0), endpoint(&proxy, "v2", 0));
    wait_for("both marked down", Duration::from_secs(3), || {
        !e1.is_healthy() && !e2.is_healthy()
    })
    .await;
    assert!(proxy.table.load().is_failing_open());
    let client = client();
    let mut served = std::collections::HashSet::new();
    for _ in 0..40 {
        let (status, by) = get(&client, &proxy, None).await;
        assert_eq!(status, 200);
        served.insert(by);
    }
    assert!(served.contains("v1"), "{served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_follow_weight_changes_and_reloads() {
    let v1 = upstream("v1").await;
    let with_check = proxy_config(&[backend(
        "v1",
        &[v1.url()],
        100,
        &health_table("100ms", "500ms", 1, 1),
    )]);
    let proxy = start_proxy_with_file(&with_check).await;
    let health = supervisor(&proxy);
    assert_eq!(health.checks(), 1);
    let v1_endpoint = endpoint(&proxy, "v1", 0);
    v1.healthy.store(false, Ordering::SeqCst);
    wait_for("v1 marked down", Duration::from_secs(3), || {
        !v1_endpoint.is_healthy()
    })
    .await;

    // A weight change keeps the endpoint, its check and its state.
    proxy
        .control
        .set_weights(&[("v1".to_string(), 50)], None)
        .unwrap();
    assert!(Arc::ptr_eq(&endpoint(&proxy, "v1", 0), &v1_endpoint));
    assert_eq!(health.checks(), 1);
    assert!(!v1_endpoint.is_healthy());

    // A reload without the check stops it, and the endpoint is up again.
    let path = proxy.config_path.clone().unwrap();
    let without_check = proxy_config(&[backend("v1", &[v1.url()], 100, "")]);
    std::fs::write(&path, without_check).unwrap();
    proxy.control.reload(None).unwrap();
    assert!(Arc::ptr_eq(&endpoint(&proxy, "v1", 0), &v1_endpoint));
    assert_eq!(health.checks(), 0);
    wait_for("v1 back up", Duration::from_secs(2), || {
        v1_endpoint.is_healthy()
    })
    .await;
    // And stays up: nothing probes it any more.
    sleep(Duration::from_millis(300)).await;
    assert!(v1_endpoint.is_healthy());

    // Restoring the check starts probing again.
    std::fs::write(&path, &with_check).unwrap();
    proxy.control.reload(None).unwrap();
    assert_eq!(health.checks(), 1);
    wait_for("v1 marked down again", Duration::from_secs(3), || {
        !v1_endpoint.is_healthy()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_new_connection_settings_keeps_an_ejected_endpoint_out() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let outlier = "[backend.outlier]\nconsecutive_failures = 2\nbase_ejection = \"1m\"\nmax_ejection = \"1m\"\n";
    let text = |settings: &str| {
        proxy_config_with(
            settings,
            &[
                backend("v1", &[v1.url()], 50, outlier),
                backend("v2", &[v2.url()], 50, ""),
            ],
        )
    };
    let proxy = start_proxy_with_file(&text("")).await;
    let client = client();
    v1.failing.store(true, Ordering::SeqCst);
    let mut errors = 0;
    for _ in 0..100 {
        errors += usize::from(get(&client, &proxy, None).await.0 == 500);
        if errors == 2 {
            break;
        }
    }
    let v1_endpoint = endpoint(&proxy, "v1", 0);
    assert!(v1_endpoint.status().ejected, "{:?}", v1_endpoint.status());
    // v1 would answer well now: only its ejection keeps it out.
    v1.failing.store(false, Ordering::SeqCst);

    reload(
        &client,
        &proxy,
        &text("connect_timeout = \"750ms\"\nupstream_idle_timeout = \"7s\"\n"),
    )
    .await;
    let table = proxy.table.load();
    let settings = table.backend("v1").unwrap().upstream.settings();
    assert_eq!(settings.connect_timeout, Duration::from_millis(750));
    assert_eq!(settings.idle_timeout, Duration::from_secs(7));
    let shown = routes_entry(&client, &proxy, "v1").await;
    assert_eq!(shown["effective_weight"], 0, "{shown}");
    assert_eq!(shown["endpoints"][0]["ejected"], true, "{shown}");
    assert_eq!(shown["endpoints"][0]["healthy"], false, "{shown}");
    let hits = v1.hits();
    for _ in 0..20 {
        assert_eq!(get(&client, &proxy, None).await, (200, "v2".into()));
    }
    assert_eq!(v1.hits(), hits, "the ejected endpoint got traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_new_check_and_connection_settings_keeps_a_down_endpoint_out() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let text = |settings: &str, interval: &str| {
        proxy_config_with(
            settings,
            &[
                backend(
                    "v1",
                    &[v1.url()],
                    50,
                    &health_table(interval, "500ms", 3, 2),
                ),
                backend("v2", &[v2.url()], 50, ""),
            ],
        )
    };
    let proxy = start_proxy_with_file(&text("", "100ms")).await;
    let client = client();
    v1.healthy.store(false, Ordering::SeqCst);
    let v1_endpoint = endpoint(&proxy, "v1", 0);
    wait_for("v1 marked down", Duration::from_secs(3), || {
        !v1_endpoint.is_healthy()
    })
    .await;

    reload(
        &client,
        &proxy,
        &text(
            "connect_timeout = \"750ms\"\nupstream_idle_timeout = \"7s\"\n",
            "1s",
        ),
    )
    .await;
    assert_eq!(supervisor(&proxy).checks(), 1);
    let shown = routes_entry(&client, &proxy, "v1").await;
    assert_eq!(shown["health_check"]["interval"], "1s", "{shown}");
    assert_eq!(shown["effective_weight"], 0, "{shown}");
    assert_eq!(shown["endpoints"][0]["active_check_up"], false, "{shown}");
    assert_eq!(shown["endpoints"][0]["healthy"], false, "{shown}");
    for _ in 0..20 {
        assert_eq!(get(&client, &proxy, None).await, (200, "v2".into()));
    }
    // The check runs with its new interval: in 600 ms the first probe (at once) and perhaps
    // one of the old check's, not six.
    let before = v1.hits();
    sleep(Duration::from_millis(600)).await;
    let probes = v1.hits() - before;
    assert!(probes <= 2, "{probes} probes in 600ms with a 1s interval");
    assert!(!v1_endpoint.is_healthy());
    // And it brings the endpoint back by the new check's counts.
    v1.healthy.store(true, Ordering::SeqCst);
    wait_for("v1 marked up", Duration::from_secs(5), || {
        v1_endpoint.is_healthy()
    })
    .await;
    assert!(Arc::ptr_eq(&endpoint(&proxy, "v1", 0), &v1_endpoint));
}

#[tokio::test]
async fn supervisor_stops_its_tasks_on_shutdown() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&proxy_config(&[backend(
        "v1",
        &[v1.url()],
        1,
        &health_table("50ms", "500ms", 1, 1),
    )]))
    .await;
    // A second, independent supervisor over the same table.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let own = HealthSupervisor::new(shutdown.clone());
    own.sync(&proxy.table.load());
    assert_eq!(own.checks(), 1);
    own.sync(&proxy.table.load());
    assert_eq!(own.checks(), 1, "sync is idempotent");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), own.stopped())
        .await
        .expect("probe tasks end promptly on shutdown");
}
