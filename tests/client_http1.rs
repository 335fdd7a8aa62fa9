//! The client side of HTTP/1 over raw TCP: pipelining, keep-alive and `Connection: close`,
//! HTTP/1.0, HEAD, `Expect`, CONNECT, the one set of limits and its counted refusals,
//! malformed bodies and trailers, chunked responses to the client, and clients that go away
//! while their request is answered.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn one_backend() -> (Upstream, TestProxy) {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    (v1, proxy)
}

/// Reads until `count` responses' worth of `expected` markers are in, or 3 s pass.
async fn read_until(stream: &mut TcpStream, marker: &str, count: usize) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(3);
    while String::from_utf8_lossy(&out).matches(marker).count() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (v1, proxy) = one_backend().await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
              GET /status/202 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
    let answers = read_until(&mut stream, "HTTP/1.1 ", 3).await;
    let statuses: Vec<&str> = answers
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &answers[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["201", "200", "202"], "{answers}");
    assert!(answers.contains("received 5"), "{answers}");
    assert_eq!(v1.hits(), 3);
}

#[tokio::test]
async fn connection_close_from_the_client_closes_after_the_response() {
    let (_v1, proxy) = one_backend().await;
    let answer = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.ends_with("v1"), "{answer}");
}

#[tokio::test]
async fn head_responses_carry_no_body() {
    let (_v1, proxy) = one_backend().await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answers = read_until(&mut stream, "HTTP/1.1 200", 2).await;
    // The HEAD answer keeps its Content-Length but sends no body: the next thing on the wire
    // is the GET's status line.
    let second = answers.rfind("HTTP/1.1 200").unwrap();
    assert!(answers[..second].ends_with("\r\n\r\n"), "{answers}");
    assert!(answers.ends_with("v1"), "{answers}");
}

#[tokio::test]
async fn malformed_and_oversized_heads_are_refused() {
    let (v1, proxy) = one_backend().await;
    let bad = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let refused = raw_exchange(proxy.addr, huge.as_bytes(), Duration::from_secs(2)).await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    assert_eq!(v1.hits(), 0);
}

/// A proxy in front of an upstream whose response body ends when it closes the connection.
async fn close_delimited_proxy() -> TestProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut stream).await {
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\nstreamed").await;
                }
            });
        }
    });
    start_proxy(&config(&[("v1", vec![format!("http://{addr}")], 1)], "")).await
}

#[tokio::test]
async fn responses_of_unknown_length_are_chunked_to_the_client() {
    // The upstream ends its body by closing; the client gets it chunked on a connection
    // that stays open for the next request.
    let proxy = close_delimited_proxy().await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until(&mut stream, "0\r\n\r\n", 1).await;
        let lower = answer.to_ascii_lowercase();
        assert!(lower.contains("transfer-encoding: chunked"), "{answer}");
        assert!(answer.ends_with("8\r\nstreamed\r\n0\r\n\r\n"), "{answer}");
    }
}

#[tokio::test]
async fn http10_requests_are_served_and_closed_unless_kept_alive() {
    let (v1, proxy) = one_backend().await;
    // Answered in HTTP/1.1 (RFC 9110 §2.5, as nginx), the connection closed after it.
    let answer = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.0\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.ends_with("v1"), "{answer}");
    // `Connection: keep-alive` keeps it open, and the answer says so.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until(&mut stream, "v1", 1).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("connection: keep-alive"),
            "{answer}"
        );
    }
    assert_eq!(v1.hits(), 3);
}

#[tokio::test]
async fn http10_clients_get_bodies_of_unknown_length_delimited_by_the_close() {
    let proxy = close_delimited_proxy().await;
    let answer = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    let lower = answer.to_ascii_lowercase();
    assert!(
        !lower.contains("chunked"),
        "no chunked coding for HTTP/1.0: {answer}"
    );
    assert!(lower.contains("connection: close"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nstreamed"), "{answer}");
}

#[tokio::test]
async fn expect_100_continue_gets_its_interim_answer() {
    let (_v1, proxy) = one_backend().await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let interim = read_until(&mut stream, "100 Continue", 1).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(b"hello").await.unwrap();
    let answer = read_until(&mut stream, "received 5", 1).await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_header_read_timeout() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "header_read_timeout = \"400ms\"",
    ))
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut stream, "v1", 1).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let started = Instant::now();
    let mut rest = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(390) && waited < Duration::from_millis(800),
        "closed after {waited:?}"
    );
}

/// An upstream that answers each request head at once with `answer` (before reading any
/// body), then reads until the client side closes; reports when its connection ended.
async fn early_answer_upstream(
    answer: &'static [u8],
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended, ends) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let ended = ended.clone();
            tokio::spawn(async move {
                if read_request_head(&mut stream).await {
                    let _ = stream.write_all(answer).await;
                    let mut sink = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                }
                let _ = ended.send(());
            });
        }
    });
    (addr, ends)
}

/// Sends `request` six times (enough to eject an endpoint if each counted as its failure),
/// expects `status` each time, then checks the upstream was not blamed: no upstream errors
/// counted, the endpoint still up.
async fn refused_without_blaming_the_upstream(extra: &str, request: &[u8], status: &str) {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], extra)).await;
    for _ in 0..6 {
        let answer = raw_exchange(proxy.addr, request, Duration::from_secs(2)).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
    }
    assert_upstream_blameless(&get_text(proxy.admin("/metrics")).await);
}

/// Asserts that `/metrics` counts no upstream error and has every endpoint up.
fn assert_upstream_blameless(metrics: &str) {
    for line in metrics.lines() {
        if line.starts_with("canary_upstream_errors_total{") {
            assert!(line.ends_with(" 0"), "counted as an upstream error: {line}");
        }
        if line.starts_with("canary_endpoint_up{") {
            assert!(
                line.ends_with(" 1"),
                "endpoint taken out of rotation: {line}"
            );
        }
    }
}

#[tokio::test]
async fn a_malformed_request_body_is_the_clients_fault_not_the_upstreams() {
    refused_without_blaming_the_upstream(
        "",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "400",
    )
    .await;
}

#[tokio::test]
async fn a_request_body_failing_after_the_response_head_ends_both_connections() {
    let (addr, mut ends) =
        early_answer_upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
            .await;
    let proxy = start_proxy(&config(&[("v1", vec![format!("http://{addr}")], 1)], "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
    let head = read_until(&mut stream, "ok\r\n", 1).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream.write_all(b"zz\r\n").await.unwrap();
    let upstream_closed = tokio::time::timeout(Duration::from_secs(2), ends.recv()).await;
    assert!(
        upstream_closed.is_ok(),
        "the upstream connection was left hanging"
    );
    let mut rest = Vec::new();
    let client_closed =
        tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest)).await;
    assert!(
        client_closed.is_ok(),
        "the client connection was left hanging"
    );
}

#[tokio::test]
async fn a_response_head_is_not_held_back_until_the_first_body_byte() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut stream).await {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let _ = stream.write_all(b"4\r\nlate\r\n0\r\n\r\n").await;
                }
            });
        }
    });
    let proxy = start_proxy(&config(&[("v1", vec![format!("http://{addr}")], 1)], "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut first = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut first))
        .await
        .expect("the head arrives before the body")
        .unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn an_early_answer_to_an_unfinished_upload_says_connection_close() {
    let (addr, _ends) =
        early_answer_upstream(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n").await;
    let proxy = start_proxy(&config(&[("v1", vec![format!("http://{addr}")], 1)], "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
        .await
        .unwrap();
    let answer = read_until(&mut stream, "\r\n\r\n", 1).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
}

#[tokio::test]
async fn unsupported_codings_duplicate_hosts_and_repeated_lengths() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;
    let gzip = raw_exchange(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(gzip.starts_with("HTTP/1.1 501"), "{gzip}");
    let hosts = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(hosts.starts_with("HTTP/1.1 400"), "{hosts}");
    assert_eq!(v1.hits(), 0);
    let folded = raw_exchange(
        proxy.addr,
        b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\nConnection: close\r\n\r\nhi",
        Duration::from_secs(2),
    )
    .await;
    assert!(folded.starts_with("HTTP/1.1 200"), "{folded}");
    assert!(folded.contains("content-length: 2\n"), "{folded}");
}

#[tokio::test]
async fn a_stalled_upload_is_the_clients_timeout_not_the_upstreams() {
    refused_without_blaming_the_upstream(
        "client_body_timeout = \"300ms\"",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab",
        "408",
    )
    .await;
}

#[tokio::test]
async fn requests_after_an_http10_keep_alive_one_get_the_same_checks() {
    let (v1, proxy) = one_backend().await;
    for (second, expected) in [
        (&b"POST /upload HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 0\r\n\r\n"[..], "400"),
        (
            b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "501",
        ),
        (
            b"POST /upload HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "400",
        ),
    ] {
        let answer = answer_after_http10(&proxy, second).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {expected}")), "{answer}");
    }
    assert_eq!(
        v1.hits(),
        3,
        "only the three HTTP/1.0 GETs reached the upstream"
    );
}

#[tokio::test]
async fn http11_requests_without_host_are_refused() {
    let (v1, proxy) = one_backend().await;
    let answer = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(v1.hits(), 0);
}

#[tokio::test]
async fn a_body_of_many_tiny_chunks_arrives_whole() {
    let mut body = String::from("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..20_000 {
        body.push_str("1\r\nx\r\n");
    }
    body.push_str("0\r\n\r\n");
    let answer: &'static [u8] = Box::leak(body.into_bytes().into_boxed_slice());
    let upstream = raw_upstream(answer).await;
    let proxy = start_proxy(&config(
        &[("v1", vec![format!("http://{upstream}")], 1)],
        "",
    ))
    .await;
    let text = client()
        .get(proxy.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text.len(), 20_000);
    assert!(text.bytes().all(|b| b == b'x'));
}

/// The answer to `second`, sent on a connection after an HTTP/1.0 keep-alive request.
async fn answer_after_http10(proxy: &TestProxy, second: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let first = read_until(&mut stream, "v1", 1).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    stream.write_all(second).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn bad_targets_and_hosts_are_refused_and_close_the_connection() {
    let (v1, proxy) = one_backend().await;
    for request in [
        &b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a:http\r\n\r\n",
        b"GET abs.example:80 HTTP/1.1\r\nHost: abs.example:80\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET ftp://abs.example/p HTTP/1.1\r\nHost: abs.example\r\n\r\n",
        b"GET http://user@abs.example/p HTTP/1.1\r\nHost: abs.example\r\n\r\n",
    ] {
        let text = String::from_utf8_lossy(request);
        let own = raw_exchange(proxy.addr, request, Duration::from_secs(2)).await;
        assert!(own.starts_with("HTTP/1.1 400"), "{text}: {own}");
        let later = answer_after_http10(&proxy, request).await;
        assert!(later.starts_with("HTTP/1.1 400"), "{text} (later): {later}");
        assert!(
            later.to_ascii_lowercase().contains("connection: close"),
            "{later}"
        );
    }
    assert_eq!(
        v1.hits(),
        8,
        "only the eight HTTP/1.0 GETs reached the upstream"
    );
}

#[tokio::test]
async fn one_set_of_limits_on_every_request_and_every_refusal_counted() {
    let (v1, proxy) = one_backend().await;
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9 * 1024));
    let long_field = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9 * 1024)
    );
    let fields: String = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: x\r\n{fields}\r\n");
    // The same with `Expect:` (which once went to hyper, with its 400 KiB limits).
    let expecting = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9 * 1024)
    );
    for (request, status) in [
        (long_line.as_str(), "414"),
        (long_field.as_str(), "431"),
        (many.as_str(), "431"),
        (expecting.as_str(), "431"),
    ] {
        for answer in [
            raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(2)).await,
            answer_after_http10(&proxy, request.as_bytes()).await,
        ] {
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{answer}"
            );
            assert!(
                answer.to_ascii_lowercase().contains("connection: close"),
                "{answer}"
            );
        }
    }
    assert_eq!(v1.hits(), 4, "only the HTTP/1.0 GETs reached the upstream");
    let metrics = get_text(proxy.admin("/metrics")).await;
    for (status, count) in [("414", 2), ("431", 6)] {
        let line = format!("canary_requests_total{{backend=\"none\",status=\"{status}\"}} {count}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn an_overlong_request_line_is_414_first_or_later() {
    let (v1, proxy) = one_backend().await;
    let request = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70 * 1024));
    let own = raw_exchange(proxy.addr, request.as_bytes(), Duration::from_secs(2)).await;
    assert!(own.starts_with("HTTP/1.1 414"), "{own}");
    let later = answer_after_http10(&proxy, request.as_bytes()).await;
    assert!(later.starts_with("HTTP/1.1 414"), "{later}");
    assert_eq!(v1.hits(), 1, "only the HTTP/1.0 GET reached the upstream");
}

#[tokio::test]
async fn an_expectation_other_than_100_continue_is_417() {
    let (v1, proxy) = one_backend().await;
    let answer = raw_exchange(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: teapot\r\n\r\nhello",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 417"), "{answer}");
    // No body, no interim answer; HTTP/1.0 ignores the field (RFC 9110 §10.1.1).
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut stream, "v1", 1).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let ignored = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.0\r\nExpect: teapot\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(ignored.starts_with("HTTP/1.1 200"), "{ignored}");
    assert_eq!(v1.hits(), 2);
}

#[tokio::test]
async fn connect_is_405_and_closes_the_connection() {
    let (v1, proxy) = one_backend().await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    // Tunnel bytes right behind the request must never be read as a request.
    stream
        .write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    assert_eq!(v1.hits(), 0);
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_exchange_and_counts_as_499() {
    for request in [
        &b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    ] {
        // An upstream that never answers (an empty early answer) and reports its close.
        let (addr, mut ends) = early_answer_upstream(b"").await;
        let proxy = start_proxy(&config(
            &[("v1", vec![format!("http://{addr}")], 1)],
            "request_timeout = \"30s\"",
        ))
        .await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        drop(stream);
        // The upstream connection is closed at once, not after request_timeout.
        tokio::time::timeout(Duration::from_secs(3), ends.recv())
            .await
            .expect("the upstream connection is closed when the client goes away")
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let metrics = get_text(proxy.admin("/metrics")).await;
        let gone = "canary_requests_total{backend=\"v1\",status=\"499\"} 1";
        assert!(metrics.contains(gone), "{gone} in\n{metrics}");
        assert_upstream_blameless(&metrics);
        let routes = get_text(proxy.admin("/admin/routes")).await;
        assert!(routes.contains("\"ejected\":false"), "{routes}");
    }
}

#[tokio::test]
async fn client_trailers_reach_the_upstream_without_framing_or_routing_fields() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        while !raw.ends_with(b"\r\n\r\n") || raw.windows(4).filter(|w| w == b"\r\n\r\n").count() < 2
        {
            let n = stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
        let _ = seen_tx.send(String::from_utf8_lossy(&raw).into_owned());
    });
    let proxy = start_proxy(&config(&[("v1", vec![format!("http://{addr}")], 1)], "")).await;
    let answer = raw_exchange(
        proxy.addr,
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\nx-checksum: 42\r\nContent-Length: 99\r\nHost: evil\r\n\
          Transfer-Encoding: gzip\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let upstream_saw = seen.recv().await.unwrap();
    let (_, body) = upstream_saw.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        body, "5\r\nhello\r\n0\r\nx-checksum: 42\r\n\r\n",
        "{upstream_saw}"
    );
}

#[tokio::test]
async fn lenient_chunk_size_lines_are_refused_as_the_clients_fault() {
    for body in [
        &b"5\nhello\r\n0\r\n\r\n"[..],
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
    ] {
        let (v1, proxy) = one_backend().await;
        let mut request =
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        request.extend_from_slice(body);
        let answer = raw_exchange(proxy.addr, &request, Duration::from_secs(2)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(!answer.contains("received"), "{answer}");
        assert_upstream_blameless(&get_text(proxy.admin("/metrics")).await);
        drop(v1);
    }
}

#[tokio::test]
async fn pipelined_requests_then_a_half_close_are_all_answered() {
    // Like nginx, which peeks: buffered requests mean the client is still there, even though
    // it has closed its sending side (`printf ... | nc -N`).
    let (v1, proxy) = one_backend().await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut answers = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answers))
        .await
        .expect("answered and closed")
        .unwrap();
    let answers = String::from_utf8_lossy(&answers);
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
    assert_eq!(v1.hits(), 2);
}
