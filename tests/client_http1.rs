//! The client side of HTTP/1.1 over raw TCP: pipelining, keep-alive and `Connection: close`,
//! HEAD, malformed and oversized heads, chunked responses to the client, and the requests
//! handed to hyper (HTTP/1.0, `Expect: 100-continue`).

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
    let smuggled = raw_exchange(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(smuggled.starts_with("HTTP/1.1 400"), "{smuggled}");
    assert_eq!(v1.hits(), 0);
}

#[tokio::test]
async fn responses_of_unknown_length_are_chunked_to_the_client() {
    // The upstream ends its body by closing; the client gets it chunked on a connection
    // that stays open for the next request.
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
    let proxy = start_proxy(&config(&[("v1", vec![format!("http://{addr}")], 1)], "")).await;
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
async fn http10_requests_are_served() {
    let (_v1, proxy) = one_backend().await;
    let answer = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.0\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(answer.ends_with("v1"), "{answer}");
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
