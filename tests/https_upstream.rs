//! `https://` upstreams over real TCP, with certificates made in the test: verification against
//! `[backend.tls] ca` (and refusal without it), `server_name`, `insecure_skip_verify`, pooled
//! TLS connections, a large upload through TLS, health probes over TLS, a WebSocket tunnel to
//! a TLS upstream, and a reload that changes the trust anchor.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::certs::TestCa;
use common::*;
use tokio::time::{Instant, sleep};

/// A config with one backend `v1` at `url`, and `tls` as its `[backend.tls]` table's lines.
fn tls_config(url: &str, tls: &str, extra: &str) -> String {
    let mut text = config(&[("v1", vec![url.to_owned()], 1)], "");
    text.push_str(extra);
    if !tls.is_empty() {
        text.push_str("[backend.tls]\n");
        text.push_str(tls);
        text.push('\n');
    }
    text
}

fn ca_line(path: &Path) -> String {
    format!("ca = {:?}", path.display().to_string())
}

async fn get(proxy: &TestProxy, path: &str) -> (u16, String) {
    let response = client().get(proxy.url(path)).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn an_https_upstream_is_verified_against_the_backend_ca_and_its_connections_are_pooled() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_path = ca.write(dir.path(), "ca.pem");
    let v1 = https_upstream("v1", ca.server_config(&["127.0.0.1"], &[b"http/1.1"])).await;
    assert!(v1.url().starts_with("https://"));
    let proxy = start_proxy(&tls_config(&v1.url(), &ca_line(&ca_path), "")).await;

    for _ in 0..20 {
        assert_eq!(get(&proxy, "/").await, (200, "v1".to_owned()));
    }
    assert_eq!(
        v1.connections.load(Ordering::SeqCst),
        1,
        "one TLS connection, kept alive and reused"
    );

    // A body larger than the TLS and socket buffers goes through whole.
    let body = vec![b'x'; 8 * 1024 * 1024];
    let response = client()
        .post(proxy.url("/upload"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "received 8388608");

    // The upstream hears the request as it would over plain HTTP.
    let (status, headers) = get(&proxy, "/headers").await;
    assert_eq!(status, 200);
    assert!(headers.contains("x-request-id: "), "{headers}");
}

#[tokio::test]
async fn a_certificate_nobody_trusts_is_refused_with_a_502() {
    let ca = TestCa::new();
    let v1 = https_upstream("v1", ca.server_config(&["127.0.0.1"], &[b"http/1.1"])).await;
    // No `ca`: the system's trust store does not know the test's CA.
    let proxy = start_proxy(&tls_config(&v1.url(), "", "")).await;
    let (status, _) = get(&proxy, "/").await;
    assert_eq!(status, 502);
    assert_eq!(v1.hits(), 0, "no request reached an unverified upstream");
    let metrics = get_text(proxy.admin("/metrics")).await;
    assert_eq!(
        metric(
            &metrics,
            "canary_upstream_errors_total",
            &[("backend", "v1"), ("kind", "connect")]
        ),
        1.0
    );
}

#[tokio::test]
async fn server_name_is_the_name_verified_and_sent() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_path = ca.write(dir.path(), "ca.pem");
    // The certificate names a service, not the address the URL gives.
    let v1 = https_upstream("v1", ca.server_config(&["v1.internal"], &[b"http/1.1"])).await;

    let named = format!("{}\nserver_name = \"v1.internal\"", ca_line(&ca_path));
    let proxy = start_proxy(&tls_config(&v1.url(), &named, "")).await;
    assert_eq!(get(&proxy, "/").await, (200, "v1".to_owned()));

    let unnamed = start_proxy(&tls_config(&v1.url(), &ca_line(&ca_path), "")).await;
    assert_eq!(
        get(&unnamed, "/").await.0,
        502,
        "127.0.0.1 is not v1.internal"
    );
}

#[tokio::test]
async fn insecure_skip_verify_takes_any_certificate() {
    let other = TestCa::new();
    let v1 = https_upstream("v1", other.server_config(&["elsewhere"], &[b"http/1.1"])).await;
    let proxy = start_proxy(&tls_config(&v1.url(), "insecure_skip_verify = true", "")).await;
    assert_eq!(get(&proxy, "/").await, (200, "v1".to_owned()));
}

#[tokio::test]
async fn health_probes_speak_tls_and_verify_like_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_path = ca.write(dir.path(), "ca.pem");
    let v1 = https_upstream("v1", ca.server_config(&["127.0.0.1"], &[b"http/1.1"])).await;
    let health = "[backend.health]\npath = \"/health\"\ninterval = \"50ms\"\ntimeout = \"1s\"\n\
                  unhealthy_threshold = 1\nhealthy_threshold = 1\n";
    let trusted = start_proxy(&tls_config(&v1.url(), &ca_line(&ca_path), health)).await;
    let untrusted = start_proxy(&tls_config(&v1.url(), "", health)).await;
    let up = |proxy: &TestProxy| {
        proxy.table.load().backends[0].endpoints[0]
            .health
            .is_active_up()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while up(&untrusted) && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !up(&untrusted),
        "a probe that cannot verify the upstream fails"
    );
    assert!(up(&trusted));
    let probes = v1.hits();
    assert!(probes > 0, "the trusted probes reached the upstream");

    v1.healthy.store(false, Ordering::SeqCst);
    while up(&trusted) && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    assert!(!up(&trusted), "the probe over TLS saw /health answer 503");
}

#[tokio::test]
async fn a_websocket_is_tunnelled_to_a_tls_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_path = ca.write(dir.path(), "ca.pem");
    let v1 = https_upstream("v1", ca.server_config(&["127.0.0.1"], &[b"http/1.1"])).await;
    let proxy = start_proxy(&tls_config(&v1.url(), &ca_line(&ca_path), "")).await;
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    websocket_echoes(&mut ws, 5).await;
}

#[tokio::test]
async fn a_reload_that_changes_the_ca_is_used_by_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (wrong, right) = (TestCa::new(), TestCa::new());
    let ca_path = wrong.write(dir.path(), "ca.pem");
    let v1 = https_upstream("v1", right.server_config(&["127.0.0.1"], &[b"http/1.1"])).await;
    let proxy = start_proxy_with_file(&tls_config(&v1.url(), &ca_line(&ca_path), "")).await;
    assert_eq!(get(&proxy, "/").await.0, 502, "signed by another CA");

    // The same file name, now holding the CA that signed the upstream's certificate.
    right.write(dir.path(), "ca.pem");
    let reload = client()
        .post(proxy.admin("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200, "{}", reload.text().await.unwrap());
    assert_eq!(get(&proxy, "/").await, (200, "v1".to_owned()));

    // A CA file that is no longer PEM: the reload fails and the running table keeps working.
    std::fs::write(dir.path().join("ca.pem"), "garbage").unwrap();
    let reload = client()
        .post(proxy.admin("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 400);
    let error = reload.text().await.unwrap();
    assert!(error.contains("backend[0].tls.ca"), "{error}");
    assert!(error.contains("ca.pem"), "{error}");
    assert_eq!(get(&proxy, "/").await, (200, "v1".to_owned()));
}

/// A backend `v1` at `url` speaking `protocol`, with `tables` ([backend.tls], [backend.health]).
fn protocol_config(url: &str, protocol: &str, tables: &str) -> String {
    let mut text = config(&[], "");
    text.push_str(&format!(
        "[[backend]]\nname = \"v1\"\nurls = [{url:?}]\nweight = 1\nprotocol = \"{protocol}\"\n{tables}\n"
    ));
    text
}

#[tokio::test]
async fn h2_is_http2_over_tls_multiplexed_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_path = ca.write(dir.path(), "ca.pem");
    let v1 = https_upstream("v1", ca.server_config(&["127.0.0.1"], &[b"h2"])).await;
    let tls = format!("[backend.tls]\n{}\n", ca_line(&ca_path));
    let proxy = start_proxy(&protocol_config(&v1.url(), "h2", &tls)).await;
    let c = client();
    let calls = (0..40).map(|_| {
        let request = c.get(proxy.url("/slow?ms=50")).send();
        async move {
            let response = request.await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    });
    for answer in futures_util::future::join_all(calls).await {
        assert_eq!(answer, (200, "v1".to_owned()));
    }
    assert_eq!(
        v1.connections.load(Ordering::SeqCst),
        1,
        "40 requests at once share one HTTP/2 connection over TLS"
    );

    // An upstream that does not agree to h2 by ALPN is a failed connect.
    let http1_only = https_upstream("v2", ca.server_config(&["127.0.0.1"], &[b"http/1.1"])).await;
    let refused = start_proxy(&protocol_config(&http1_only.url(), "h2", &tls)).await;
    assert_eq!(get(&refused, "/").await.0, 502);
    assert_eq!(http1_only.hits(), 0);
}

#[tokio::test]
async fn health_probes_speak_http2_over_tls_to_an_h2_backend() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_path = ca.write(dir.path(), "ca.pem");
    let health = "[backend.health]\npath = \"/health\"\ninterval = \"50ms\"\ntimeout = \"1s\"\n\
                  unhealthy_threshold = 1\nhealthy_threshold = 1\n";
    // The upstream offers ALPN h2 only: a probe over HTTP/1.1 would fail its handshake.
    let tls_v1 = https_upstream("v1", ca.server_config(&["127.0.0.1"], &[b"h2"])).await;
    let h2 = start_proxy(&protocol_config(
        &tls_v1.url(),
        "h2",
        &format!("[backend.tls]\n{}\n{health}", ca_line(&ca_path)),
    ))
    .await;
    let up = |proxy: &TestProxy| {
        proxy.table.load().backends[0].endpoints[0]
            .health
            .is_active_up()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while tls_v1.hits() < 3 && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    assert!(tls_v1.hits() >= 3, "probed over HTTP/2");
    assert!(up(&h2));
    tls_v1.healthy.store(false, Ordering::SeqCst);
    while up(&h2) && Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    assert!(!up(&h2), "the h2 probe saw /health answer 503");
}
