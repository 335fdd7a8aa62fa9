//! Forwarding over real TCP: header rewriting, h2c, WebSocket tunnelling, retries, the
//! 502/503/504 failures, request smuggling and slow clients.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream that answers each request with its raw head as the body (and closes), so a
/// test sees the request line and fields exactly as the proxy wrote them.
async fn echo_head_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    head.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.write_all(&head).await;
            });
        }
    });
    addr
}

/// The request head the echo upstream received for `request` (a head without its final empty
/// line), sent raw to the proxy with `Connection: close`.
async fn head_upstream_saw(proxy: &TestProxy, request: &str) -> String {
    let request = format!("{request}Connection: close\r\n\r\n");
    let response = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(2)).await;
    let (status, head) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(status.contains(" 200 "), "{request:?}: {response}");
    head.to_string()
}

fn header_lines(body: &str) -> Vec<(String, String)> {
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn values(lines: &[(String, String)], name: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .collect()
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_before_forwarded_headers_are_added() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    // Raw request, so that reqwest does not manage these headers itself.
    let request = "GET /headers HTTP/1.1\r\nHost: shop.example\r\n\
         Connection: keep-alive, X-Client-Secret, x-forwarded-proto\r\n\
         X-Client-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: x-sum\r\n\
         Proxy-Authorization: Basic abc\r\nProxy-Connection: keep-alive\r\n\
         X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nX-Kept: yes\r\n\
         Content-Length: 0\r\n\r\n";
    let response = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_millis(500)).await;
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = header_lines(body);
    for gone in [
        "x-client-secret",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            values(&seen, gone).is_empty(),
            "{gone} reached the upstream: {body}"
        );
    }
    assert_eq!(values(&seen, "x-kept"), ["yes"]);
    assert_eq!(values(&seen, "host"), ["shop.example"]);
    assert_eq!(values(&seen, "x-forwarded-for"), ["203.0.113.7, 127.0.0.1"]);
    // Connection named X-Forwarded-Proto: the client's is stripped, the proxy's own is set.
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"]);
    assert_eq!(values(&seen, "x-forwarded-host"), ["shop.example"]);
    let request_id = values(&seen, "x-request-id");
    assert_eq!(request_id.len(), 1);
    assert_eq!(request_id[0].len(), 32);
    // The client gets the same request id back, and the backend's name.
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains(&format!("x-request-id: {}", request_id[0])),
        "{head}"
    );
    assert!(head.contains("x-canary-backend: v1"), "{head}");
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_from_responses_and_request_ids_are_kept() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let response = client()
        .get(proxy.url("/hop"))
        .header("x-request-id", "trace-123")
        .send()
        .await
        .unwrap();
    let h = response.headers();
    for gone in [
        "x-upstream-secret",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "upgrade",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached the client");
    }
    assert_eq!(h["x-upstream-kept"], "yes");
    assert_eq!(h["x-request-id"], "trace-123");
}

#[tokio::test]
async fn backend_header_can_be_renamed_or_disabled() {
    let v1 = upstream("v1").await;
    let off = start_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "backend_header = \"\"",
    ))
    .await;
    let response = client().get(off.url("/")).send().await.unwrap();
    assert!(response.headers().get("x-canary-backend").is_none());
    let renamed = start_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "backend_header = \"x-version\"",
    ))
    .await;
    let response = client().get(renamed.url("/")).send().await.unwrap();
    assert_eq!(response.headers()["x-version"], "v1");
}

#[tokio::test]
async fn h2c_clients_are_served_and_host_passes_through() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let h2 = h2c_client();
    let response = h2.get(proxy.url("/headers")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-canary-backend"], "v1");
    let seen = header_lines(&response.text().await.unwrap());
    let authority = proxy.addr.to_string();
    assert_eq!(values(&seen, "host"), std::slice::from_ref(&authority));
    assert_eq!(values(&seen, "x-forwarded-host"), [authority]);
    // Many concurrent streams on one connection.
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (h2, url) = (h2.clone(), proxy.url("/"));
        tasks.push(tokio::spawn(async move {
            h2.get(url).send().await.unwrap().text().await.unwrap()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), "v1");
    }
}

#[tokio::test]
async fn h2c_upgrade_requests_are_served_as_plain_http1() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let request = "GET /headers HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                   Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    let response = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_millis(500)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let seen = header_lines(body);
    assert!(values(&seen, "upgrade").is_empty(), "{body}");
    assert!(values(&seen, "http2-settings").is_empty(), "{body}");
}

#[tokio::test]
async fn websocket_is_tunnelled_both_ways() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["x-canary-backend"], "v1");
    websocket_echoes(&mut ws, 20).await;
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn refused_connect_is_retried_on_another_endpoint() {
    let v1 = upstream("v1").await;
    let dead = refused_addr().await;
    let proxy = start_proxy(&config(
        &[("v1", vec![format!("http://{dead}"), v1.url()], 1)],
        "",
    ))
    .await;
    let c = client();
    for _ in 0..10 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "v1");
    }
    // A body that was never sent is sent on the retry.
    for _ in 0..4 {
        let response = c
            .post(proxy.url("/upload"))
            .body("hello")
            .send()
            .await
            .unwrap();
        assert_eq!(response.text().await.unwrap(), "received 5");
    }
    assert_eq!(v1.hits(), 14);
}

#[tokio::test]
async fn refused_connect_is_retried_on_another_backend() {
    let v2 = upstream("v2").await;
    let dead = refused_addr().await;
    let proxy = start_proxy(&config(
        &[
            ("v1", vec![format!("http://{dead}")], 50),
            ("v2", vec![v2.url()], 50),
        ],
        "",
    ))
    .await;
    let c = client();
    for _ in 0..20 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-canary-backend"], "v2");
    }
    assert_eq!(v2.hits(), 20);
}

#[tokio::test]
async fn refused_connect_with_nowhere_else_to_go_is_a_502() {
    let dead = refused_addr().await;
    let proxy = start_proxy(&config(&[("v1", vec![format!("http://{dead}")], 1)], "")).await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-canary-backend"], "v1");
    assert!(response.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn a_request_that_was_sent_is_never_replayed() {
    let v2 = upstream("v2").await;
    let (broken, hits) = broken_upstream().await;
    let proxy = start_proxy(&config(
        &[
            ("v1", vec![format!("http://{broken}")], 1),
            ("v2", vec![v2.url()], 0),
        ],
        "",
    ))
    .await;
    let c = client();
    for i in 1..=3 {
        let response = c
            .post(proxy.url("/upload"))
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 502);
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), i);
    }
    assert_eq!(v2.hits(), 0);
}

#[tokio::test]
async fn nothing_to_route_to_is_a_503() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    // Validation and the admin API never allow all weights at zero; the library can, which is
    // the only way to reach this path.
    let table = proxy.table.load_full();
    proxy
        .table
        .store(Arc::new(table.with_weights(&[(0, 0)], 2)));
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(v1.hits(), 0);
}

#[tokio::test]
async fn slow_upstream_is_a_prompt_504() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "request_timeout = \"300ms\"",
    ))
    .await;
    let started = Instant::now();
    let response = client()
        .get(proxy.url("/slow?ms=5000"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    // A fast request on the same proxy is unaffected.
    let response = client().get(proxy.url("/slow?ms=10")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_rejected_before_the_upstream() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let smuggling = [
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /upload HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n",
    ];
    for request in smuggling {
        let response =
            raw_exchange(proxy.addr, request.as_bytes(), Duration::from_millis(500)).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    }
    // Third on a keep-alive connection, after a chunked request and a GET.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let sequence = [
        (
            "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "HTTP/1.1 200",
        ),
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200"),
        (
            "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ];
    for (request, expected) in sequence {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let response = String::from_utf8_lossy(&buf[..n]);
        assert!(response.starts_with(expected), "{request}: {response}");
    }
    assert_eq!(
        v1.hits(),
        2,
        "only the two clean requests reached the upstream"
    );
}

#[tokio::test]
async fn clients_that_never_finish_their_headers_cannot_pin_the_proxy() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "header_read_timeout = \"1s\"",
    ))
    .await;
    let mut stalled = Vec::new();
    for i in 0..200 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        // Half of them send part of a head, the other half nothing at all.
        if i % 2 == 0 {
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
        }
        stalled.push(stream);
    }
    let started = Instant::now();
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    // After the header read timeout the proxy closes every stalled connection.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for mut stream in stalled {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue, // a 408 may come first
                }
            }
        })
        .await
        .unwrap_or(false);
        assert!(closed, "a stalled connection is still open");
    }
    assert_eq!(v1.hits(), 1);
}

#[tokio::test]
async fn a_101_to_a_request_that_asked_for_no_upgrade_is_a_502() {
    let upstream = raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    )
    .await;
    let proxy = start_proxy(&config(
        &[("v1", vec![format!("http://{upstream}")], 1)],
        "",
    ))
    .await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    // A pipelined request after it is still answered on the same connection.
    let both = "GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let raw = raw_exchange(proxy.addr, both.as_bytes(), Duration::from_millis(500)).await;
    assert_eq!(raw.matches("HTTP/1.1 502").count(), 2, "{raw}");
}

#[tokio::test]
async fn upstream_content_length_with_transfer_encoding_is_not_passed_on() {
    let upstream = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n",
    )
    .await;
    let proxy = start_proxy(&config(
        &[("v1", vec![format!("http://{upstream}")], 1)],
        "",
    ))
    .await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("content-length")
            .is_none_or(|v| v == "6")
    );
    assert_eq!(response.text().await.unwrap(), "abcdef");
}

#[tokio::test]
async fn http2_cookies_reach_http1_upstreams_as_one_line() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let h2 = h2c_client();
    let response = h2
        .get(proxy.url("/headers"))
        .header("cookie", "a=1")
        .header("cookie", "uid=alice")
        .send()
        .await
        .unwrap();
    let seen = header_lines(&response.text().await.unwrap());
    assert_eq!(values(&seen, "cookie"), ["a=1; uid=alice"]);
}

#[tokio::test]
async fn early_refusals_carry_a_request_id() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let smuggling = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let raw = raw_exchange(proxy.addr, smuggling.as_bytes(), Duration::from_millis(500)).await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("x-request-id: "), "{raw}");
    let connect =
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nx-request-id: mine\r\n\r\n";
    let raw = raw_exchange(proxy.addr, connect.as_bytes(), Duration::from_millis(500)).await;
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("x-request-id: mine"),
        "{raw}"
    );
    assert_eq!(v1.hits(), 0);
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let c = client();
    for _ in 0..50 {
        assert_eq!(
            c.get(proxy.url("/"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "v1"
        );
    }
    // Streamed bodies too: the connection returns to the pool once the body has ended.
    for _ in 0..20 {
        let response = c
            .post(proxy.url("/upload"))
            .body(vec![1u8; 100_000])
            .send()
            .await
            .unwrap();
        assert_eq!(response.text().await.unwrap(), "received 100000");
    }
    assert_eq!(v1.hits(), 70);
    assert_eq!(
        v1.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream connection for sequential requests"
    );
    // Eight at a time: at most eight connections, then they are reused.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = proxy.url("/");
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..20 {
                assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(v1.connections.load(std::sync::atomic::Ordering::SeqCst) <= 9);
}

#[tokio::test]
async fn a_pooled_connection_closed_by_the_upstream_is_replaced_without_an_error() {
    // The upstream closes each connection after one response (Connection: close).
    let upstream =
        raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
    let proxy = start_proxy(&config(
        &[("v1", vec![format!("http://{upstream}")], 1)],
        "",
    ))
    .await;
    let c = client();
    for _ in 0..20 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
}

#[tokio::test]
async fn absolute_form_targets_go_upstream_in_origin_form_with_their_authority_as_host() {
    let upstream = echo_head_upstream().await;
    let proxy = start_proxy(&config(
        &[("v1", vec![format!("http://{upstream}")], 1)],
        "",
    ))
    .await;
    // HTTP/1.1 and HTTP/1.0 alike.
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let request = format!("GET http://abs.example/p?q=1 {version}\r\nHost: hdr.example\r\n");
        let head = head_upstream_saw(&proxy, &request).await;
        assert!(
            head.starts_with("GET /p?q=1 HTTP/1.1\r\n"),
            "{version}: {head}"
        );
        assert!(
            head.contains("\r\nhost: abs.example\r\n"),
            "{version}: {head}"
        );
        assert!(
            head.contains("\r\nx-forwarded-host: abs.example\r\n"),
            "{version}: {head}"
        );
        assert!(!head.contains("hdr.example"), "{version}: {head}");
    }
    // No path: `/` in front of the query.
    let head = head_upstream_saw(
        &proxy,
        "GET http://abs.example:8080?q=1 HTTP/1.1\r\nHost: abs.example:8080\r\n",
    )
    .await;
    assert!(head.starts_with("GET /?q=1 HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nhost: abs.example:8080\r\n"), "{head}");
    // OPTIONS * stays asterisk-form.
    let head = head_upstream_saw(&proxy, "OPTIONS * HTTP/1.1\r\nHost: svc\r\n").await;
    assert!(head.starts_with("OPTIONS * HTTP/1.1\r\n"), "{head}");
    // An empty Host (allowed: the target URI has no authority) passes on empty, and names
    // no forwarded host.
    let head = head_upstream_saw(&proxy, "GET / HTTP/1.1\r\nHost: \r\n").await;
    assert!(head.contains("\r\nhost: \r\n"), "{head}");
    assert!(!head.contains("x-forwarded-host"), "{head}");
}

#[tokio::test]
async fn h2c_host_differing_from_authority_is_replaced_by_the_authority() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .uri("http://auth.example/headers")
        .header("host", "other.example")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let seen = header_lines(&String::from_utf8_lossy(&body));
    assert_eq!(values(&seen, "host"), ["auth.example"]);
    assert_eq!(values(&seen, "x-forwarded-host"), ["auth.example"]);
}
