//! Fault drills over real TCP: `[[fault]]` and `/admin/faults` abort or delay a backend's
//! requests; injected answers are marked, counted as the backend's, and never touch the
//! endpoint's health; the admin API validates, versions and removes faults as it does weights.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

async fn json_of(response: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = response.status().as_u16();
    let etag = response
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string());
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, etag, body)
}

async fn put_faults(proxy: &TestProxy, body: &str) -> (u16, Option<String>, Value) {
    let response = client()
        .put(proxy.admin("/admin/faults"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    json_of(response).await
}

/// v1 and v2 at 50/50, and a `[[fault]]` with these lines.
fn half_and_half(v1: &Upstream, v2: &Upstream, fault: &str) -> String {
    let mut text = config(
        &[("v1", vec![v1.url()], 50), ("v2", vec![v2.url()], 50)],
        "",
    );
    text.push_str(&format!("\n[[fault]]\n{fault}\n"));
    text
}

async fn metrics(proxy: &TestProxy) -> String {
    get_text(proxy.admin("/metrics")).await
}

#[tokio::test]
async fn an_abort_answers_for_the_backend_and_leaves_its_health_alone() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 0), ("v2", vec![v2.url()], 1)],
        "",
    ))
    .await;
    let (status, _, _) = put_faults(
        &proxy,
        r#"[{"backend": "v2", "abort_percent": 100, "abort_status": 502}]"#,
    )
    .await;
    assert_eq!(status, 200);
    let c = client();
    // Far past the passive health's consecutive failures (5 by default).
    for _ in 0..40 {
        let response = c
            .get(proxy.url("/"))
            .header("x-request-id", "drill-1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 502);
        let headers = response.headers();
        assert_eq!(headers["x-canary-fault"], "abort");
        assert_eq!(headers["x-canary-backend"], "v2");
        assert_eq!(headers["x-request-id"], "drill-1");
        assert!(
            response
                .text()
                .await
                .unwrap()
                .starts_with("502 Bad Gateway")
        );
    }
    assert_eq!(v2.hits(), 0, "an aborted request is not forwarded");
    let routes: Value =
        serde_json::from_str(&get_text(proxy.admin("/admin/routes")).await).unwrap();
    let v2_shown = &routes["backends"][1];
    assert_eq!(v2_shown["endpoints"][0]["healthy"], true, "{v2_shown}");
    let text = metrics(&proxy).await;
    let v2_label = [("backend", "v2")];
    assert_eq!(
        metric(
            &text,
            "canary_faults_injected_total",
            &[v2_label[0], ("kind", "abort")]
        ),
        40.0
    );
    assert_eq!(
        metric(
            &text,
            "canary_faults_injected_total",
            &[v2_label[0], ("kind", "delay")]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            "canary_requests_total",
            &[v2_label[0], ("status", "502")]
        ),
        40.0
    );
    assert_eq!(
        metric(&text, "canary_upstream_errors_total", &v2_label),
        0.0
    );
    assert_eq!(metric(&text, "canary_endpoint_up", &v2_label), 1.0);

    // Shown in the effective table.
    let fault = &v2_shown["fault"];
    assert_eq!(
        (
            fault["abort_percent"].as_f64(),
            fault["abort_status"].as_u64()
        ),
        (Some(100.0), Some(502))
    );
    assert_eq!(routes["backends"][0]["fault"], Value::Null);

    // Removed, the backend serves again at once.
    let response = c.delete(proxy.admin("/admin/faults")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let response = c.get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-canary-fault").is_none());
    assert_eq!(v2.hits(), 1);
}

#[tokio::test]
async fn a_share_of_aborts_is_the_share_asked_for() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let fault = "backend = \"v2\"\nabort_percent = 20";
    let proxy = start_proxy(&half_and_half(&v1, &v2, fault)).await;
    let c = client();
    let (mut on_v2, mut aborted) = (0u32, 0u32);
    for _ in 0..2000 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        let fault = response.headers().get("x-canary-fault").cloned();
        match response.headers()["x-canary-backend"].to_str().unwrap() {
            "v2" => on_v2 += 1,
            _ => assert_eq!(fault, None, "v1 has no fault"),
        }
        if fault.is_some() {
            assert_eq!(response.status(), 503);
            aborted += 1;
        }
    }
    // About 1000 on v2, 20% of them aborted: sd of the share about 1.3 points.
    let share = f64::from(aborted) / f64::from(on_v2);
    assert!((0.14..=0.26).contains(&share), "{aborted} of {on_v2}");
    assert_eq!(v2.hits() as u32, on_v2 - aborted);
    let shown = metrics(&proxy).await;
    assert_eq!(
        metric(
            &shown,
            "canary_requests_total",
            &[("backend", "v2"), ("status", "503")]
        ),
        f64::from(aborted)
    );
}

#[tokio::test]
async fn a_delay_holds_only_the_requests_that_carry_the_header() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 0), ("v2", vec![v2.url()], 1)],
        "",
    ))
    .await;
    let body =
        r#"[{"backend": "v2", "delay_percent": 100, "delay": "300ms", "header": "x-drill"}]"#;
    assert_eq!(put_faults(&proxy, body).await.0, 200);
    let c = client();
    for _ in 0..3 {
        let started = Instant::now();
        let response = c
            .get(proxy.url("/"))
            .header("x-drill", "1")
            .send()
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-canary-fault"], "delay");
        assert_eq!(response.text().await.unwrap(), "v2");
    }
    let response = c.get(proxy.url("/")).send().await.unwrap();
    assert!(response.headers().get("x-canary-fault").is_none());
    assert_eq!(v2.hits(), 4);
    let text = metrics(&proxy).await;
    let delays = [("backend", "v2"), ("kind", "delay")];
    assert_eq!(metric(&text, "canary_faults_injected_total", &delays), 3.0);
}

#[tokio::test]
async fn the_admin_api_checks_versions_and_removes_faults() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let fault = "backend = \"v2\"\ndelay_percent = 10\ndelay = \"1s\"";
    let proxy = start_proxy_with_file(&half_and_half(&v1, &v2, fault)).await;
    let c = client();

    // The file's fault is in force from the start.
    let (status, etag, shown) =
        json_of(c.get(proxy.admin("/admin/faults")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(etag.as_deref(), Some("\"1\""));
    assert_eq!(
        shown,
        json!({"version": 1, "faults": [{"backend": "v2", "abort_percent": 0.0,
            "abort_status": 503, "delay_percent": 10.0, "delay": "1s", "header": null}]})
    );

    // Bad input: 400 with a JSON error, nothing changed.
    for (body, says) in [
        ("{", "malformed JSON"),
        (
            r#"[{"backend": "v3", "abort_percent": 5}]"#,
            "unknown backend \"v3\"",
        ),
        (
            r#"[{"backend": "v2", "abort_percent": 101}]"#,
            "faults[0].abort_percent",
        ),
        (
            r#"[{"backend": "v2", "abort_percent": 5, "abort_status": 42}]"#,
            "faults[0].abort_status",
        ),
        (
            r#"[{"backend": "v2", "abort_percent": 5}, {"backend": "v2", "delay_percent": 1, "delay": "1s"}]"#,
            "one fault per backend",
        ),
        (
            r#"[{"backend": "v2", "abort_percent": 5, "drop": 1}]"#,
            "unknown key \"drop\"",
        ),
    ] {
        let (status, _, error) = put_faults(&proxy, body).await;
        assert_eq!(status, 400, "{body}");
        let message = error["error"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    assert_eq!(proxy.table.load().version, 1);

    // A stale If-Match is refused; the current one goes through and bumps the version.
    let both = r#"[{"backend": "v1", "abort_percent": 1}, {"backend": "v2", "abort_percent": 2}]"#;
    let stale = c
        .put(proxy.admin("/admin/faults"))
        .header("if-match", "\"7\"")
        .body(both)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 412);
    let fresh = c
        .put(proxy.admin("/admin/faults"))
        .header("if-match", "\"1\"")
        .body(both)
        .send()
        .await
        .unwrap();
    let (status, etag, shown) = json_of(fresh).await;
    assert_eq!((status, etag.as_deref()), (200, Some("\"2\"")));
    assert_eq!(shown["faults"].as_array().unwrap().len(), 2);

    // One backend's, then all.
    let (status, _, shown) = json_of(
        c.delete(proxy.admin("/admin/faults?backend=v1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(shown["version"], 3);
    assert_eq!(shown["faults"][0]["backend"], "v2");
    assert_eq!(shown["faults"].as_array().unwrap().len(), 1);
    let (status, _, error) = json_of(
        c.delete(proxy.admin("/admin/faults?backend=v9"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    let (status, _, shown) =
        json_of(c.delete(proxy.admin("/admin/faults")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(shown, json!({"version": 4, "faults": []}));

    // DELETE takes no body, honours If-Match, and removing nothing is no change.
    assert_eq!(
        put_faults(&proxy, r#"[{"backend": "v2", "abort_percent": 1}]"#)
            .await
            .0,
        200
    );
    let with_body = c
        .delete(proxy.admin("/admin/faults"))
        .body(r#"[{"backend": "v2"}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(with_body.status(), 400);
    let stale = c
        .delete(proxy.admin("/admin/faults"))
        .header("if-match", "\"4\"")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 412);
    let (status, etag, shown) = json_of(
        c.delete(proxy.admin("/admin/faults?backend=v1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, etag.as_deref()), (200, Some("\"5\"")));
    assert_eq!(shown["faults"].as_array().unwrap().len(), 1);
    // What GET answered, sent back edited: its version is checked as If-Match is.
    let (_, _, mut read) = json_of(c.get(proxy.admin("/admin/faults")).send().await.unwrap()).await;
    read["faults"][0]["abort_percent"] = json!(2);
    let (status, _, _) = put_faults(&proxy, &read.to_string()).await;
    assert_eq!(status, 200);
    let (status, _, error) = put_faults(&proxy, &read.to_string()).await;
    assert_eq!(status, 412, "{error}");
    assert_eq!(error["version"], 6);
    let (status, _, shown) =
        json_of(c.delete(proxy.admin("/admin/faults")).send().await.unwrap()).await;
    assert_eq!((status, shown["version"].as_u64()), (200, Some(7)));

    // Only GET, PUT and DELETE.
    let post = c
        .post(proxy.admin("/admin/faults"))
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET, PUT, DELETE");

    // Weight changes keep the faults; a reload applies the file's.
    assert_eq!(
        put_faults(&proxy, r#"[{"backend": "v1", "abort_percent": 3}]"#)
            .await
            .0,
        200
    );
    let shifted = c
        .post(proxy.admin("/admin/weight?v2=60"))
        .send()
        .await
        .unwrap();
    assert_eq!(shifted.status(), 200);
    let (_, _, shown) = json_of(c.get(proxy.admin("/admin/faults")).send().await.unwrap()).await;
    assert_eq!(shown["faults"][0]["backend"], "v1");
    let reloaded = c.post(proxy.admin("/admin/reload")).send().await.unwrap();
    assert_eq!(reloaded.status(), 200);
    let (_, _, shown) = json_of(c.get(proxy.admin("/admin/faults")).send().await.unwrap()).await;
    assert_eq!(shown["faults"][0]["backend"], "v2");
    assert_eq!(shown["faults"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_new_visitor_keeps_its_cookie_through_an_abort_and_over_h2c() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let mut text = config(
        &[("v1", vec![v1.url()], 50), ("v2", vec![v2.url()], 50)],
        "sticky_cookie = \"canary_uid\"",
    );
    text.push_str("\n[[fault]]\nbackend = \"v2\"\nabort_percent = 100\n");
    let proxy = start_proxy(&text).await;
    let h2 = h2c_client();
    let (mut aborted, mut served) = (0, 0);
    for _ in 0..40 {
        let response = h2.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        let set_cookie = response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_string();
        let id = set_cookie
            .strip_prefix("canary_uid=")
            .and_then(|rest| rest.split(';').next())
            .unwrap()
            .to_string();
        let expected = if reference_bucket("", &id) < 5000 {
            "v1"
        } else {
            "v2"
        };
        assert_eq!(response.headers()["x-canary-backend"], expected);
        if expected == "v2" {
            assert_eq!(response.status(), 503);
            assert_eq!(response.headers()["x-canary-fault"], "abort");
            aborted += 1;
        } else {
            assert_eq!(response.status(), 200);
            served += 1;
        }
        // Back over h2c, the id in a cookie field of its own: the same version, no new cookie.
        let again = h2
            .get(proxy.url("/"))
            .header("cookie", "a=1")
            .header("cookie", format!("canary_uid={id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(again.headers()["x-canary-backend"], expected);
        assert!(again.headers().get("set-cookie").is_none());
    }
    assert!(
        aborted > 0 && served > 0,
        "{aborted} aborted, {served} served"
    );
}

#[tokio::test]
async fn a_delayed_request_that_then_fails_is_still_marked() {
    let down = refused_addr().await;
    let mut text = config(&[("v1", vec![format!("http://{down}")], 1)], "");
    text.push_str("\n[[fault]]\nbackend = \"v1\"\ndelay_percent = 100\ndelay = \"10ms\"\n");
    let proxy = start_proxy(&text).await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-canary-fault"], "delay");
    assert_eq!(response.headers()["x-canary-backend"], "v1");
}
