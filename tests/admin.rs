//! The admin API over real TCP: weights (JSON and query, partial, bad input), ETag/If-Match,
//! tokens, methods, persistence, reload, explain, routes, metrics, readiness, and weight flips
//! under load.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn json_of(response: reqwest::Response) -> Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn etag(response: &reqwest::Response) -> String {
    response.headers()["etag"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn weights_are_read_and_set_by_json_and_query_partially() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v2.url()], 10)],
        "",
    ))
    .await;
    let c = client();
    let response = c.get(proxy.admin("/admin/weight")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(etag(&response), "\"1\"");
    assert_eq!(json_of(response).await, json!({"v1": 90, "v2": 10}));

    // Query form, one name: the other keeps its weight.
    let response = c
        .post(proxy.admin("/admin/weight?v2=20"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(etag(&response), "\"2\"");
    let body = json_of(response).await;
    assert_eq!(body["weights"], json!({"v1": 90, "v2": 20}));
    assert_eq!(body["version"], 2);

    // JSON body, PUT.
    let response = c
        .put(proxy.admin("/admin/weight"))
        .body(r#"{"v1": 0, "v2": 100}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        json_of(response).await["weights"],
        json!({"v1": 0, "v2": 100})
    );
    // Traffic follows at once.
    for _ in 0..20 {
        let r = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(r.headers()["x-canary-backend"], "v2");
    }
    let response = c.get(proxy.admin("/admin/weight")).send().await.unwrap();
    assert_eq!(json_of(response).await, json!({"v1": 0, "v2": 100}));
}

#[tokio::test]
async fn bad_weight_changes_get_400_json_and_change_nothing() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v2.url()], 10)],
        "",
    ))
    .await;
    let c = client();
    let cases: Vec<(&str, Option<&str>, &str)> = vec![
        ("/admin/weight?v3=5", None, "unknown backend"),
        ("/admin/weight?v2=-5", None, "integer"),
        ("/admin/weight?v2=2.5", None, "integer"),
        ("/admin/weight?v2=ten", None, "integer"),
        // Plain decimal digits only.
        ("/admin/weight?v2=+5", None, "integer"),
        ("/admin/weight?v2=%205", None, "integer"),
        ("/admin/weight?v2=5%20", None, "integer"),
        ("/admin/weight?v2=", None, "integer"),
        ("/admin/weight?v2=0x10", None, "integer"),
        ("/admin/weight?v1=0&v2=0", None, "all weights"),
        (
            "/admin/weight",
            Some(r#"{"v1": 0, "v2": 0}"#),
            "all weights",
        ),
        ("/admin/weight", Some(r#"{"v2": -1}"#), "integer"),
        ("/admin/weight", Some(r#"{"v2": 1.5}"#), "integer"),
        ("/admin/weight", Some(r#"{"v2": "20"}"#), "integer"),
        ("/admin/weight", Some(r#"{"nope": 20}"#), "unknown backend"),
        ("/admin/weight", Some(r#"{"v2": 20"#), "malformed JSON"),
        ("/admin/weight", Some("[20]"), "malformed JSON"),
        ("/admin/weight", None, "no weights"),
        // One bad name spoils the whole change: v1 must not move either.
        ("/admin/weight?v1=50&v9=50", None, "unknown backend"),
    ];
    for (path, body, expected) in cases {
        let mut request = c.post(proxy.admin(path));
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400, "{path} {body:?}");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let error = json_of(response).await["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(error.contains(expected), "{path} {body:?}: {error}");
    }
    let response = c.get(proxy.admin("/admin/weight")).send().await.unwrap();
    assert_eq!(etag(&response), "\"1\"", "no version was consumed");
    assert_eq!(json_of(response).await, json!({"v1": 90, "v2": 10}));
}

#[tokio::test]
async fn stale_if_match_gets_412_and_current_if_match_applies() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 1), ("v2", vec![v1.url()], 1)],
        "",
    ))
    .await;
    let c = client();
    let seen = etag(&c.get(proxy.admin("/admin/weight")).send().await.unwrap());
    let first = c
        .post(proxy.admin("/admin/weight?v2=5"))
        .header("if-match", &seen)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let newer = etag(&first);
    assert_ne!(newer, seen);
    // A second writer that read the old version loses (412, RFC 9110 §13.1.1), and learns
    // the current one.
    let stale = c
        .post(proxy.admin("/admin/weight?v2=7"))
        .header("if-match", &seen)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 412);
    assert_eq!(etag(&stale), newer);
    let body = json_of(stale).await;
    assert!(body["error"].as_str().unwrap().contains("If-Match"));
    let now = c.get(proxy.admin("/admin/weight")).send().await.unwrap();
    assert_eq!(json_of(now).await["v2"], 5);
    let garbage = c
        .post(proxy.admin("/admin/weight?v2=7"))
        .header("if-match", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
}

#[tokio::test]
async fn if_match_compares_strongly_and_takes_lists_and_star() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 1), ("v2", vec![v1.url()], 1)],
        "",
    ))
    .await;
    let c = client();
    let set = |value: &'static str, weight: u32| {
        c.post(proxy.admin(&format!("/admin/weight?v2={weight}")))
            .header("if-match", value)
            .send()
    };
    // The current version (1) in a list, however spaced.
    assert_eq!(set(r#""7", "1""#, 2).await.unwrap().status(), 200);
    assert_eq!(set(r#""9","2" , "11""#, 3).await.unwrap().status(), 200);
    // A weak tag never matches in If-Match, not even the current version (now 3).
    assert_eq!(set(r#"W/"3""#, 4).await.unwrap().status(), 412);
    assert_eq!(set(r#"W/"3", "2""#, 4).await.unwrap().status(), 412);
    // A tag this API never issued matches nothing.
    assert_eq!(set(r#""abc""#, 4).await.unwrap().status(), 412);
    // `*` matches whatever the version.
    assert_eq!(set("*", 4).await.unwrap().status(), 200);
    // Malformed lists are refused as such.
    for bad in ["3", r#""3"; "4""#, r#"*, "4""#, r#""4"#] {
        assert_eq!(set(bad, 5).await.unwrap().status(), 400, "{bad}");
    }
    let now = c.get(proxy.admin("/admin/weight")).send().await.unwrap();
    assert_eq!(etag(&now), "\"4\"");
    assert_eq!(json_of(now).await["v2"], 4);
}

#[tokio::test]
async fn refused_preconditions_and_missing_files_are_not_counted_as_reloads() {
    let v1 = upstream("v1").await;
    let text = config(&[("v1", vec![v1.url()], 1)], "");
    let with_file = start_proxy_with_file(&text).await;
    let without_file = start_proxy(&text).await;
    let c = client();
    let stale = c
        .post(with_file.admin("/admin/reload"))
        .header("if-match", "\"7\"")
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 412);
    let no_file = c
        .post(without_file.admin("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_file.status(), 400);
    for proxy in [&with_file, &without_file] {
        let metrics = c
            .get(proxy.admin("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            metric(&metrics, "canary_config_reloads_total", &[]),
            0.0,
            "{metrics}"
        );
    }
    // A real attempt still counts.
    let good = c
        .post(with_file.admin("/admin/reload"))
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 200);
    let metrics = c
        .get(with_file.admin("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &metrics,
            "canary_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
}

#[tokio::test]
async fn token_guards_every_admin_call_but_not_probes_or_metrics() {
    let v1 = upstream("v1").await;
    let mut text = config(&[("v1", vec![v1.url()], 1)], "");
    text.push_str("\n[admin]\ntoken = \"s3cret-token\"\n");
    let proxy = start_proxy(&text).await;
    let c = client();
    for path in ["/admin/weight", "/admin/routes", "/admin/explain"] {
        let none = c.get(proxy.admin(path)).send().await.unwrap();
        assert_eq!(none.status(), 401, "{path}");
        assert!(json_of(none).await["error"].is_string());
        let wrong = c
            .get(proxy.admin(path))
            .bearer_auth("s3cret-tokeN")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let short = c
            .get(proxy.admin(path))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(short.status(), 401, "{path}");
        let right = c
            .get(proxy.admin(path))
            .bearer_auth("s3cret-token")
            .send()
            .await
            .unwrap();
        assert_eq!(right.status(), 200, "{path}");
    }
    // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
    for scheme in ["bearer", "BEARER", "Bearer  "] {
        let response = c
            .get(proxy.admin("/admin/weight"))
            .header("authorization", format!("{scheme} s3cret-token"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme:?}");
    }
    for wrong in [
        "Basic s3cret-token",
        "Bearers3cret-token",
        "Bearer",
        "s3cret-token",
    ] {
        let response = c
            .get(proxy.admin("/admin/weight"))
            .header("authorization", wrong)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{wrong:?}");
    }
    let unauthorized_write = c
        .post(proxy.admin("/admin/weight?v1=5"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized_write.status(), 401);
    assert_eq!(proxy.table.load().backends[0].weight, 1);
    let reload = c.post(proxy.admin("/admin/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 401);
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            c.get(proxy.admin(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn browsers_on_other_origins_cannot_change_anything() {
    let v1 = upstream("v1").await;
    let text = config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v1.url()], 10)],
        "",
    );
    let proxy = start_proxy_with_file(&text).await;
    let c = client();
    let own = format!("http://{}", proxy.admin_addr);
    let other_port = format!("http://127.0.0.1:{}", proxy.addr.port());
    // What a web page can send without a CORS preflight: a "simple" POST, text/plain.
    type Case<'a> = (
        reqwest::Method,
        &'static str,
        Option<&'static str>,
        Vec<(&'static str, &'a str)>,
    );
    let refused: Vec<Case<'_>> = vec![
        (
            reqwest::Method::POST,
            "/admin/weight",
            Some(r#"{"v2":100}"#),
            vec![("origin", "http://evil.example")],
        ),
        (
            reqwest::Method::POST,
            "/admin/weight?v1=0",
            None,
            vec![("origin", "null")],
        ),
        (
            reqwest::Method::POST,
            "/admin/reload",
            None,
            vec![("origin", "http://evil.example")],
        ),
        (
            reqwest::Method::PUT,
            "/admin/weight?v1=0",
            None,
            vec![("origin", other_port.as_str())],
        ),
        (
            reqwest::Method::POST,
            "/admin/weight?v1=0",
            None,
            vec![("sec-fetch-site", "cross-site")],
        ),
        // Another port of the same host is the same *site*, but not the same origin.
        (
            reqwest::Method::POST,
            "/admin/weight?v1=0",
            None,
            vec![("sec-fetch-site", "same-site")],
        ),
        (
            reqwest::Method::DELETE,
            "/admin/weight",
            None,
            vec![("origin", "http://evil.example")],
        ),
    ];
    for (method, path, body, headers) in refused {
        let mut request = c
            .request(method.clone(), proxy.admin(path))
            .header("content-type", "text/plain");
        for (k, v) in &headers {
            request = request.header(*k, *v);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 403, "{method} {path} {headers:?}");
        let error = json_of(response).await["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(error.contains("cross-site"), "{error}");
    }
    let weights = c.get(proxy.admin("/admin/weight")).send().await.unwrap();
    assert_eq!(etag(&weights), "\"1\"", "nothing changed");

    // The API's own origin, Sec-Fetch-Site same-origin / none, and curl (no Origin) may.
    // Bodies are JSON whatever their Content-Type says.
    let allowed: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (r#"{"v2":20}"#, vec![("origin", own.as_str())]),
        (r#"{"v2":21}"#, vec![("sec-fetch-site", "same-origin")]),
        (r#"{"v2":22}"#, vec![("sec-fetch-site", "none")]),
        (r#"{"v2":23}"#, vec![]),
    ];
    for (body, headers) in allowed {
        let mut request = c
            .post(proxy.admin("/admin/weight"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        for (k, v) in &headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{headers:?}");
    }
    // Reads are not mutations: a foreign page cannot read the answer anyway (no CORS).
    let read = c
        .get(proxy.admin("/admin/weight"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(json_of(read).await, json!({"v1": 90, "v2": 23}));
}

/// The status code of a raw HTTP/1.1 request to the admin listener.
async fn raw_status(proxy: &TestProxy, request: &str) -> u16 {
    let answer = raw_exchange(proxy.admin_addr, request.as_bytes(), Duration::from_secs(5)).await;
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line for {request:?}: {answer:?}"))
}

#[tokio::test]
async fn only_ip_literals_localhost_and_allowed_names_may_be_the_host() {
    let v1 = upstream("v1").await;
    let mut text = config(&[("v1", vec![v1.url()], 1)], "");
    text.push_str("\n[admin]\nallowed_hosts = [\"canary.internal\"]\n");
    let proxy = start_proxy(&text).await;
    let get = |path: &str, host: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let port = proxy.admin_addr.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LOCALHOST".to_string(),
        "[::1]:9901".to_string(),
        "10.1.2.3".to_string(),
        format!("canary.internal:{port}"),
        "Canary.Internal".to_string(),
    ] {
        assert_eq!(
            raw_status(&proxy, &get("/admin/routes", &host)).await,
            200,
            "{host}"
        );
    }
    // DNS rebinding: the attacker's name, now resolving to 127.0.0.1, is the Host.
    for host in [
        format!("evil.example:{port}"),
        "localhost.evil.example".to_string(),
        "canary.internal.evil.example".to_string(),
        "127.0.0.1.nip.io".to_string(),
    ] {
        for path in ["/admin/routes", "/admin/weight", "/metrics", "/healthz"] {
            assert_eq!(
                raw_status(&proxy, &get(path, &host)).await,
                403,
                "{host} {path}"
            );
        }
    }
    let answer = raw_exchange(
        proxy.admin_addr,
        get("/admin/routes", "evil.example").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        answer.contains("admin.allowed_hosts") && !answer.contains("backends"),
        "{answer}"
    );
    // An absolute-form target names the host too.
    assert_eq!(
        raw_status(
            &proxy,
            "GET http://evil.example/admin/routes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .await,
        403
    );
    // HTTP/1.1 without Host is malformed (RFC 9112 §3.2).
    assert_eq!(
        raw_status(&proxy, "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").await,
        400
    );
}

#[tokio::test]
async fn mutations_need_post_or_put() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let c = client();
    let get_reload = c.get(proxy.admin("/admin/reload")).send().await.unwrap();
    assert_eq!(get_reload.status(), 405);
    assert_eq!(get_reload.headers()["allow"], "POST, PUT");
    let get_with_query = c
        .get(proxy.admin("/admin/weight?v1=5"))
        .send()
        .await
        .unwrap();
    assert_eq!(get_with_query.status(), 405);
    let delete = c.delete(proxy.admin("/admin/weight")).send().await.unwrap();
    assert_eq!(delete.status(), 405);
    let post_routes = c.post(proxy.admin("/admin/routes")).send().await.unwrap();
    assert_eq!(post_routes.status(), 405);
    assert_eq!(
        c.get(proxy.admin("/admin/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(proxy.table.load().version, 1);
}

#[tokio::test]
async fn weight_changes_are_written_back_with_comments_kept() {
    let v1 = upstream("v1").await;
    let mut text = String::from("# my canary setup\n");
    text.push_str(&config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v1.url()], 10)],
        "",
    ));
    let text = text.replace("weight = 10\n", "weight = 10 # canary share\n");
    let proxy = start_proxy_with_file(&text).await;
    let path = proxy.config_path.clone().unwrap();
    let c = client();
    let response = c
        .post(proxy.admin("/admin/weight?v2=35&v1=65"))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(response).await["persisted"], true);
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        written,
        text.replace("weight = 90\n", "weight = 65\n")
            .replace("weight = 10 #", "weight = 35 #")
    );
    // The file still loads, with the new weights (this is what a restart reads).
    let reloaded = canary_proxy::config::load(&path).unwrap();
    assert_eq!(
        (reloaded.backends[0].weight, reloaded.backends[1].weight),
        (65, 35)
    );

    // If the write fails, the change still applies and the reply says so.
    std::fs::remove_file(&path).unwrap();
    let response = c
        .post(proxy.admin("/admin/weight?v2=50"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    assert_eq!(body["persisted"], false);
    let persist_error = body["persist_error"].as_str().unwrap();
    assert!(persist_error.contains("canary.toml"), "{body}");
    // The cause is named, once.
    assert_eq!(
        persist_error.matches("No such file or directory").count(),
        1,
        "{body}"
    );
    assert_eq!(body["weights"]["v2"], 50);
    assert_eq!(proxy.table.load().backends[1].weight, 50);
}

#[cfg(unix)]
#[tokio::test]
async fn weight_changes_are_written_through_a_symlinked_config() {
    let v1 = upstream("v1").await;
    let text = config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v1.url()], 10)],
        "",
    );
    let proxy = start_proxy_with_file(&text).await;
    // canary.toml -> real/canary.toml, as a config kept in a checked-out repository often is.
    let link = proxy.config_path.clone().unwrap();
    let dir = link.parent().unwrap().to_path_buf();
    std::fs::create_dir(dir.join("real")).unwrap();
    std::fs::rename(&link, dir.join("real/canary.toml")).unwrap();
    std::os::unix::fs::symlink("real/canary.toml", &link).unwrap();

    let response = client()
        .post(proxy.admin("/admin/weight?v2=30&v1=70"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(json_of(response).await["persisted"], true);
    // The link is still a link, and its target has the new weights.
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link was replaced by a plain file"
    );
    let target = std::fs::read_to_string(dir.join("real/canary.toml")).unwrap();
    assert_eq!(
        target,
        text.replace("weight = 90\n", "weight = 70\n")
            .replace("weight = 10\n", "weight = 30\n")
    );
    // The temporary file went to the target's directory and is gone.
    let names = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&dir.join("real")), ["canary.toml"]);
    let mut top = names(&dir);
    top.sort();
    assert_eq!(top, ["canary.toml", "real"]);
}

#[tokio::test]
async fn reload_applies_a_good_file_and_rejects_a_bad_one() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let text = config(
        &[("v1", vec![v1.url()], 100), ("v2", vec![v2.url()], 0)],
        "",
    );
    let proxy = start_proxy_with_file(&text).await;
    let path = proxy.config_path.clone().unwrap();
    let c = client();
    let pool_before = proxy.table.load().backends[0].endpoints[0].clone();

    // Good: v2 gets a rule.
    let mut good = text.clone();
    good.push_str("\n[[rule]]\nheader = \"x-beta\"\npresent = true\nbackend = \"v2\"\n");
    std::fs::write(&path, &good).unwrap();
    let response = c.post(proxy.admin("/admin/reload")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(etag(&response), "\"2\"");
    assert_eq!(json_of(response).await["version"], 2);
    let routed = c
        .get(proxy.url("/"))
        .header("x-beta", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(routed.headers()["x-canary-backend"], "v2");
    // The unchanged backend kept its endpoint state (and pool).
    assert!(Arc::ptr_eq(
        &pool_before,
        &proxy.table.load().backends[0].endpoints[0]
    ));

    // Bad: a syntax error and a semantic error; both rejected, old table kept.
    for bad in [
        good.replace("weight = 100", "weight = = 100"),
        good.replace("backend = \"v2\"", "backend = \"v9\""),
    ] {
        std::fs::write(&path, &bad).unwrap();
        let response = c.post(proxy.admin("/admin/reload")).send().await.unwrap();
        assert_eq!(response.status(), 400);
        let body = json_of(response).await;
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("canary.toml:"),
            "the error names file and line: {error}"
        );
        assert_eq!(body["version"], 2);
        let still = c
            .get(proxy.url("/"))
            .header("x-beta", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(still.headers()["x-canary-backend"], "v2");
    }
    // A file that is gone: 400 naming the file and the cause, once.
    std::fs::remove_file(&path).unwrap();
    let response = c.post(proxy.admin("/admin/reload")).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body = json_of(response).await;
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("canary.toml: cannot read config: "),
        "{error}"
    );
    assert_eq!(
        error.matches("No such file or directory").count(),
        1,
        "{error}"
    );
    let metrics = c
        .get(proxy.admin("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &metrics,
            "canary_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "canary_config_reloads_total",
            &[("result", "failure")]
        ),
        3.0
    );
}

/// Replaces the config file by a FIFO, so the next read of it blocks until `text` is written
/// into it, `after` from now, by a plain thread (a disk or network file system that stalls).
#[cfg(unix)]
fn stall_config_reads(
    path: &std::path::Path,
    text: String,
    after: Duration,
) -> std::thread::JoinHandle<()> {
    std::fs::remove_file(path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success());
    let path = path.to_owned();
    std::thread::spawn(move || {
        std::thread::sleep(after);
        std::fs::write(&path, text).unwrap();
    })
}

/// Asks `/healthz` every 100 ms for `span` and returns the slowest answer: while a change
/// waits for its file, the runtime that serves the admin API (and runs the health checks)
/// must go on.
#[cfg(unix)]
async fn slowest_healthz(proxy: &TestProxy, span: Duration) -> Duration {
    let c = client();
    let mut slowest = Duration::ZERO;
    let started = std::time::Instant::now();
    while started.elapsed() < span {
        let asked = std::time::Instant::now();
        let response = c.get(proxy.admin("/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    slowest
}

/// A current-thread runtime, as the binary's control plane has.
#[cfg(unix)]
#[tokio::test]
async fn a_reload_waiting_for_its_file_does_not_stall_the_admin_runtime() {
    let v1 = upstream("v1").await;
    let text = config(&[("v1", vec![v1.url()], 1)], "");
    let proxy = start_proxy_with_file(&text).await;
    let path = proxy.config_path.clone().unwrap();
    let writer = stall_config_reads(
        &path,
        text.replace("weight = 1", "weight = 2"),
        Duration::from_millis(1500),
    );
    let reload = tokio::spawn({
        let url = proxy.admin("/admin/reload");
        async move { client().post(url).send().await.unwrap().status() }
    });
    let slowest = slowest_healthz(&proxy, Duration::from_millis(1000)).await;
    assert!(
        slowest < Duration::from_millis(500),
        "/healthz took {slowest:?}"
    );
    assert_eq!(reload.await.unwrap(), 200);
    writer.join().unwrap();
    // Applied before the reply.
    let weights = client()
        .get(proxy.admin("/admin/weight"))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(weights).await, json!({"v1": 2}));
}

#[cfg(unix)]
#[tokio::test]
async fn a_weight_write_back_waiting_for_its_file_does_not_stall_the_admin_runtime() {
    let v1 = upstream("v1").await;
    let text = config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v1.url()], 10)],
        "",
    );
    let proxy = start_proxy_with_file(&text).await;
    let path = proxy.config_path.clone().unwrap();
    let writer = stall_config_reads(&path, text.clone(), Duration::from_millis(1500));
    let change = tokio::spawn({
        let url = proxy.admin("/admin/weight?v2=40&v1=60");
        async move { json_of(client().post(url).send().await.unwrap()).await }
    });
    let slowest = slowest_healthz(&proxy, Duration::from_millis(1000)).await;
    assert!(
        slowest < Duration::from_millis(500),
        "/healthz took {slowest:?}"
    );
    let body = change.await.unwrap();
    assert_eq!(body["persisted"], true, "{body}");
    writer.join().unwrap();
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(written.contains("weight = 60") && written.contains("weight = 40"));
}

#[tokio::test]
async fn a_reload_cannot_leave_a_public_admin_listener_without_a_token() {
    let v1 = upstream("v1").await;
    let backends = config(&[("v1", vec![v1.url()], 1)], "");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("canary.toml");
    let admin_section = |lines: &str| format!("{backends}\n[admin]\n{lines}\n");
    std::fs::write(
        &path,
        admin_section("listen = \"0.0.0.0:0\"\ntoken = \"s3cret\""),
    )
    .unwrap();
    let control = canary_proxy::ControlPlane::new(
        canary_proxy::config::load(&path).unwrap(),
        Some(path.clone()),
    )
    .unwrap();
    // The admin listener really is on every interface (port 0; the test only talks to it
    // over loopback).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let admin = format!(
        "http://127.0.0.1:{}",
        admin_listener.local_addr().unwrap().port()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(canary_proxy::run(
        control.clone(),
        listener,
        admin_listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let c = client();

    // The file now says loopback and no token: valid on its own, but admin.listen only
    // changes on restart, so applying it would leave 0.0.0.0 open to anyone.
    std::fs::write(&path, admin_section("listen = \"127.0.0.1:0\"")).unwrap();
    let response = c
        .post(format!("{admin}/admin/reload"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error = json_of(response).await["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("0.0.0.0") && error.contains("token"),
        "{error}"
    );
    let open = c.get(format!("{admin}/admin/weight")).send().await.unwrap();
    assert_eq!(open.status(), 401, "the token still guards the listener");
    // The SIGHUP path goes through the same check.
    let hup = control.run_blocking(|control| control.reload(None)).await;
    assert!(hup.is_err(), "{hup:?}");
    assert_eq!(control.table().load().version, 1);

    // A file that keeps a token (a new one) is applied.
    std::fs::write(
        &path,
        admin_section("listen = \"127.0.0.1:0\"\ntoken = \"n3w\""),
    )
    .unwrap();
    let response = c
        .post(format!("{admin}/admin/reload"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let renewed = c
        .get(format!("{admin}/admin/weight"))
        .bearer_auth("n3w")
        .send()
        .await
        .unwrap();
    assert_eq!(renewed.status(), 200);
    let _ = stop.send(());
    task.await.unwrap();
}

/// Waits (up to `limit`) for the peer to close `stream`, returning how long that took from
/// `since`, or `None` if it is still open (or answered something) at `limit`.
async fn closed_after(
    stream: &mut tokio::net::TcpStream,
    since: std::time::Instant,
    limit: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(limit, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(since.elapsed()),
        Ok(Ok(_)) | Err(_) => None,
    }
}

#[tokio::test]
async fn admin_connections_are_capped_and_idle_ones_closed() {
    use tokio::io::AsyncWriteExt;
    let v1 = upstream("v1").await;
    let mut text = config(&[("v1", vec![v1.url()], 1)], "");
    text.push_str("\n[admin]\nmax_connections = 4\nheader_read_timeout = \"600ms\"\n");
    let proxy = start_proxy(&text).await;
    let opened = std::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(
            tokio::net::TcpStream::connect(proxy.admin_addr)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A fifth connection is refused at once, with a reason.
    let asked = std::time::Instant::now();
    let refused = raw_exchange(
        proxy.admin_addr,
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    assert!(refused.contains("admin.max_connections"), "{refused}");
    assert!(asked.elapsed() < Duration::from_millis(500));
    // The data port is not affected.
    let served = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(served.status(), 200);
    // Connections that send no head are closed within the header timeout.
    for stream in &mut idle {
        let took = closed_after(stream, opened, Duration::from_secs(3))
            .await
            .expect("idle admin connection still open after 3 s");
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
            "closed after {took:?}"
        );
    }
    // Their slots are free again.
    let c = client();
    let health = c.get(proxy.admin("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // A keep-alive connection idle after a request is closed too.
    let mut stream = tokio::net::TcpStream::connect(proxy.admin_addr)
        .await
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    assert!(read_request_head(&mut stream).await, "no answer");
    let answered = std::time::Instant::now();
    let mut rest = Vec::new();
    let took = loop {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break answered.elapsed(),
            Ok(Ok(n)) => rest.extend_from_slice(&buf[..n]),
            Err(_) => panic!("idle keep-alive connection still open after 3 s"),
        }
    };
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
        "closed {took:?} after the answer"
    );
}

#[tokio::test]
async fn admin_request_bodies_are_bounded_in_time_and_size() {
    use tokio::io::AsyncWriteExt;
    let v1 = upstream("v1").await;
    let mut text = config(&[("v1", vec![v1.url()], 1), ("v2", vec![v1.url()], 1)], "");
    text.push_str("\n[admin]\nheader_read_timeout = \"500ms\"\n");
    let proxy = start_proxy(&text).await;
    // A body that stops coming.
    let mut stream = tokio::net::TcpStream::connect(proxy.admin_addr)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    stream
        .write_all(
            b"POST /admin/weight HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 20\r\n\r\n{\"v2\":",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer to a stalled body after 3 s"),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
        "answered after {took:?}"
    );
    // A body over 64 KiB.
    let big = format!("{{\"v2\": 5, \"pad\": \"{}\"}}", "x".repeat(70 * 1024));
    let response = client()
        .post(proxy.admin("/admin/weight"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(proxy.table.load().version, 1);
}

#[tokio::test]
async fn explain_says_which_backend_and_why() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let mut text = config(
        &[("v1", vec![v1.url()], 70), ("v2", vec![v2.url()], 30)],
        "sticky_salt = \"s:\"",
    );
    text.push_str("\n[[rule]]\nheader = \"x-canary\"\nequals = \"always\"\nbackend = \"v2\"\n");
    let proxy = start_proxy(&text).await;
    let c = client();
    let rule = json_of(
        c.get(proxy.admin("/admin/explain"))
            .header("x-canary", "always")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(rule["backend"], "v2");
    assert_eq!(rule["reason"], "rule");
    assert_eq!(rule["rule"], 0);
    let sticky = json_of(
        c.get(proxy.admin("/admin/explain"))
            .header("x-user-id", "alice")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let bucket = reference_bucket("s:", "alice");
    assert_eq!(sticky["reason"], "sticky");
    assert_eq!(sticky["bucket"], bucket);
    assert_eq!(sticky["backend"], if bucket < 7000 { "v1" } else { "v2" });
    // And the real request agrees with the explanation.
    let real = c
        .get(proxy.url("/"))
        .header("x-user-id", "alice")
        .send()
        .await
        .unwrap();
    assert_eq!(
        real.headers()["x-canary-backend"],
        sticky["backend"].as_str().unwrap()
    );
    let weighted = json_of(c.get(proxy.admin("/admin/explain")).send().await.unwrap()).await;
    assert_eq!(weighted["reason"], "weight");
    assert_eq!(weighted["probabilities"], json!({"v1": 0.7, "v2": 0.3}));
}

#[tokio::test]
async fn routes_show_the_whole_effective_table() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let mut text = config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v2.url()], 10)],
        "",
    );
    text.push_str("\n[[rule]]\ncookie = \"beta\"\nmatches = \"^y\"\nbackend = \"v2\"\n");
    let proxy = start_proxy(&text).await;
    let routes = json_of(
        client()
            .get(proxy.admin("/admin/routes"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(routes["version"], 1);
    assert_eq!(routes["failing_open"], false);
    assert_eq!(routes["backends"][0]["name"], "v1");
    assert_eq!(routes["backends"][0]["weight"], 90);
    assert_eq!(routes["backends"][0]["effective_weight"], 90);
    assert_eq!(
        routes["backends"][0]["sticky_buckets_configured"],
        json!([0, 9000])
    );
    assert_eq!(routes["backends"][1]["endpoints"][0]["url"], v2.url());
    assert_eq!(routes["backends"][1]["endpoints"][0]["healthy"], true);
    assert_eq!(
        routes["rules"][0],
        json!({"index": 0, "cookie": "beta", "matches": "^y", "backend": "v2"})
    );
    assert_eq!(routes["sticky"]["user_id_header"], "x-user-id");
}

#[tokio::test]
async fn metrics_count_exactly_what_was_served() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let dead = refused_addr().await;
    let mut text = config(
        &[
            ("v1", vec![v1.url()], 80),
            ("v2", vec![v2.url()], 20),
            ("v3", vec![format!("http://{dead}")], 0),
        ],
        "",
    );
    text.push_str("\n[[rule]]\nheader = \"x-v3\"\npresent = true\nbackend = \"v3\"\n");
    let proxy = start_proxy(&text).await;
    let c = client();
    for _ in 0..200 {
        assert_eq!(c.get(proxy.url("/")).send().await.unwrap().status(), 200);
    }
    // Fewer than the default 5 consecutive failures, so passive ejection does not move bob.
    for _ in 0..4 {
        assert_eq!(
            c.get(proxy.url("/status/503"))
                .header("x-user-id", "bob")
                .send()
                .await
                .unwrap()
                .status(),
            503
        );
    }
    // v3 refuses connections; v1 and v2 are healthy, so the retry goes there.
    for _ in 0..3 {
        assert_eq!(
            c.get(proxy.url("/"))
                .header("x-v3", "1")
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let text = c
        .get(proxy.admin("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let served_200 = metric(&text, "canary_requests_total", &[("status", "200")]);
    assert_eq!(served_200, 203.0, "{text}");
    assert_eq!(served_200, (v1.hits() + v2.hits() - 4) as f64);
    let v1_200 = metric(
        &text,
        "canary_requests_total",
        &[("backend", "v1"), ("status", "200")],
    );
    let v2_200 = metric(
        &text,
        "canary_requests_total",
        &[("backend", "v2"), ("status", "200")],
    );
    assert_eq!(v1_200 + v2_200, 203.0);
    let bob = if reference_bucket("", "bob") < 8000 {
        "v1"
    } else {
        "v2"
    };
    assert_eq!(
        metric(
            &text,
            "canary_requests_total",
            &[("backend", bob), ("status", "503")]
        ),
        4.0
    );
    // Each refused connect to v3 is counted, though the retry then succeeded elsewhere.
    assert_eq!(
        metric(
            &text,
            "canary_upstream_errors_total",
            &[("backend", "v3"), ("kind", "connect")]
        ),
        3.0
    );
    assert_eq!(
        metric(&text, "canary_requests_total", &[("status", "503")]),
        4.0
    );
    assert_eq!(
        metric(
            &text,
            "canary_route_decisions_total",
            &[("reason", "weight")]
        ),
        200.0
    );
    assert_eq!(
        metric(
            &text,
            "canary_route_decisions_total",
            &[("reason", "sticky")]
        ),
        4.0
    );
    // The rule picked v3, whose connects were refused: each decision is counted with the
    // backend that served after the retry, like the request itself.
    assert_eq!(
        metric(
            &text,
            "canary_route_decisions_total",
            &[("backend", "v3"), ("reason", "rule")]
        ),
        0.0
    );
    assert_eq!(
        metric(&text, "canary_route_decisions_total", &[("reason", "rule")]),
        3.0
    );
    assert_eq!(
        metric(&text, "canary_request_duration_seconds_count", &[]),
        207.0
    );
    assert_eq!(
        metric(&text, "canary_backend_weight", &[("backend", "v1")]),
        80.0
    );
    assert_eq!(
        metric(
            &text,
            "canary_backend_effective_weight",
            &[("backend", "v2")]
        ),
        20.0
    );
    assert_eq!(
        metric(&text, "canary_endpoint_up", &[("backend", "v1")]),
        1.0
    );
    assert_eq!(metric(&text, "canary_in_flight_requests", &[]), 0.0);
    for name in [
        "canary_requests_total",
        "canary_request_duration_seconds",
        "canary_backend_weight",
        "canary_backend_effective_weight",
        "canary_endpoint_up",
        "canary_upstream_errors_total",
        "canary_route_decisions_total",
        "canary_config_reloads_total",
        "canary_in_flight_requests",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
}

#[tokio::test]
async fn healthz_and_readyz() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let c = client();
    assert_eq!(
        c.get(proxy.admin("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(proxy.admin("/readyz")).send().await.unwrap().status(),
        200
    );
    proxy.table.load().backends[0].endpoints[0].set_healthy(false);
    assert_eq!(
        c.get(proxy.admin("/readyz")).send().await.unwrap().status(),
        503
    );
    assert_eq!(
        c.get(proxy.admin("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_flips_under_load_lose_no_request() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 100), ("v2", vec![v2.url()], 0)],
        "",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..16 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), proxy.url("/"));
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let c = client();
    let mut flips = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let query = if flips % 2 == 0 {
            "?v1=0&v2=100"
        } else {
            "?v1=100&v2=0"
        };
        let response = c
            .post(proxy.admin(&format!("/admin/weight{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        flips += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{flips} flips, {ok} requests ok, {failed} failed");
    assert!(flips >= 50, "only {flips} flips");
    assert!(ok > 1000, "only {ok} requests");
    assert!(v1.hits() > 0 && v2.hits() > 0);
    assert_eq!(failed, 0);
}
