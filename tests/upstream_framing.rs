//! The upstream side of the exchange over real TCP: how response bodies are delimited
//! (Content-Length, chunked with trailers, until close), informational responses, malformed or
//! truncated responses, chunked request bodies, and idle pooled connections the upstream closed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a scripted upstream does after each request head: write these pieces, pausing 20 ms
/// between them, then close the connection or keep reading requests.
#[derive(Clone, Copy)]
struct Script {
    pieces: &'static [&'static [u8]],
    close_after: bool,
}

/// An upstream that plays `script` for every request; returns its address, the connections
/// it accepted, and every byte it received.
async fn scripted_upstream(
    script: Script,
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (count, log) = (connections.clone(), received.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    // A request head (and whatever body came with it).
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    if seen
                        .windows(9)
                        .any(|w| w.eq_ignore_ascii_case(b"chunked\r\n"))
                    {
                        while !seen.ends_with(b"0\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                        }
                    }
                    log.lock().unwrap().extend_from_slice(&seen);
                    for (i, piece) in script.pieces.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if stream.write_all(piece).await.is_err() {
                            return;
                        }
                    }
                    if script.close_after {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections, received)
}

async fn proxy_for(addr: std::net::SocketAddr) -> TestProxy {
    start_proxy(&config(
        &[("v1", vec![format!("http://{addr}")], 1)],
        "request_timeout = \"2s\"",
    ))
    .await
}

#[tokio::test]
async fn chunked_responses_are_decoded_and_their_connection_reused() {
    let (addr, connections, _) = scripted_upstream(Script {
        pieces: &[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n7;ext=1\r\n, world\r\n",
            b"0\r\nx-trailer: 1\r\n\r\n",
        ],
        close_after: false,
    })
    .await;
    let proxy = proxy_for(addr).await;
    let c = client();
    for _ in 0..3 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "hello, world");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "kept alive and reused"
    );
}

#[tokio::test]
async fn a_body_delimited_by_close_arrives_whole() {
    let (addr, connections, _) = scripted_upstream(Script {
        pieces: &[b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the end"],
        close_after: true,
    })
    .await;
    let proxy = proxy_for(addr).await;
    let c = client();
    for _ in 0..2 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "until the end");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 2, "never reused");
}

#[tokio::test]
async fn informational_responses_are_skipped() {
    let (addr, _, _) = scripted_upstream(Script {
        pieces: &[
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone",
        ],
        close_after: false,
    })
    .await;
    let proxy = proxy_for(addr).await;
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.text().await.unwrap(), "done");
}

#[tokio::test]
async fn malformed_responses_are_502() {
    const ANSWERS: [&[&[u8]]; 3] = [
        &[b"HTTP/1.1 2x0 OK\r\n\r\n"],
        &[b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"],
        &[b"not http at all\r\n\r\n"],
    ];
    for pieces in ANSWERS {
        let (addr, _, _) = scripted_upstream(Script {
            pieces,
            close_after: false,
        })
        .await;
        let proxy = proxy_for(addr).await;
        let response = client().get(proxy.url("/")).send().await.unwrap();
        assert_eq!(
            response.status(),
            502,
            "{:?}",
            String::from_utf8_lossy(pieces[0])
        );
    }
}

#[tokio::test]
async fn a_body_cut_short_fails_the_client_response_instead_of_hanging() {
    let (addr, _, _) = scripted_upstream(Script {
        pieces: &[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"],
        close_after: true,
    })
    .await;
    let proxy = proxy_for(addr).await;
    // The head may or may not have been flushed before the body failed: either way the
    // client sees an error, promptly, and never a short body that looks complete.
    let exchange = async {
        let response = client().get(proxy.url("/")).send().await?;
        response.bytes().await
    };
    let body = tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .expect("the client is not left hanging");
    assert!(
        body.is_err(),
        "a truncated body must not look complete: {body:?}"
    );
}

#[tokio::test]
async fn chunked_request_bodies_go_upstream_chunked() {
    let (addr, _, received) = scripted_upstream(Script {
        pieces: &[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
        close_after: false,
    })
    .await;
    let proxy = proxy_for(addr).await;
    let answer = raw_exchange(
        proxy.addr,
        b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        Duration::from_secs(1),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let upstream_saw = String::from_utf8_lossy(&received.lock().unwrap()).to_ascii_lowercase();
    assert!(
        upstream_saw.contains("transfer-encoding: chunked\r\n"),
        "{upstream_saw}"
    );
    assert!(
        upstream_saw.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "{upstream_saw}"
    );
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_reused() {
    // Keep-alive responses, but the upstream drops every connection 50 ms after answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if read_request_head(&mut stream).await {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
    });
    let proxy = proxy_for(addr).await;
    let c = client();
    for _ in 0..5 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(connections.load(Ordering::SeqCst), 5);
}

/// An upstream that switches protocols on a request that asked for no upgrade is failing:
/// the 502s count against its endpoint, which passive health then ejects.
#[tokio::test]
async fn an_unasked_101_counts_against_the_endpoint() {
    let upstream = raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    )
    .await;
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"http://{upstream}\"]\nweight = 1\n\
         [backend.outlier]\nconsecutive_failures = 2\n"
    );
    let proxy = start_proxy(&text).await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(c.get(proxy.url("/")).send().await.unwrap().status(), 502);
    }
    let routes = get_text(proxy.admin("/admin/routes")).await;
    let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(
        routes["backends"][0]["endpoints"][0]["ejected"], true,
        "{routes}"
    );
}
