//! The upstream keep-alive pool over real TCP: a busy connection is never handed out, stale
//! idle connections are closed, and responses without a body return their connection.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A keep-alive HTTP/1.1 upstream that answers each request as soon as its head arrives
/// (before reading the body, which it then reads and discards), never closes idle
/// connections, and counts open connections.
async fn early_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let (o, t) = (open.clone(), total.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            o.fetch_add(1, Ordering::SeqCst);
            t.fetch_add(1, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                'conn: loop {
                    let end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => break 'conn,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let cl: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    let slow = head.starts_with("get /slow");
                    buf.drain(..end);
                    if slow {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        break;
                    }
                    while buf.len() < cl {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => break 'conn,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..cl);
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open, total)
}

/// Client A's upload stalls after its response has been answered, so its upstream connection
/// is still busy writing A's body; client B must get another connection, not wait behind it.
#[tokio::test]
async fn a_connection_still_sending_a_body_is_not_handed_out() {
    let (addr, _open, total) = early_upstream().await;
    let proxy = start_proxy(&config(
        &[("v1", vec![format!("http://{addr}")], 1)],
        "request_timeout = \"3s\"",
    ))
    .await;
    // Client A: announces 100 bytes, sends 10, stalls (keeps its socket open).
    let mut a = TcpStream::connect(proxy.addr).await.unwrap();
    a.write_all(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut got = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(2), a.read(&mut got))
        .await
        .expect("A gets its early response")
        .unwrap();
    assert!(String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Client B: a plain GET.
    let started = Instant::now();
    let resp = client().get(proxy.url("/")).send().await.unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    println!(
        "B: {status} {body:?} after {:?}; upstream connections opened: {}",
        started.elapsed(),
        total.load(Ordering::SeqCst)
    );
    drop(a);
    assert!(
        status == 200 && started.elapsed() < Duration::from_secs(1),
        "B was stuck behind A's stalled upload: {status} after {:?}",
        started.elapsed()
    );
}

/// A burst leaves ten idle connections; under light traffic after it, the ones not reused are
/// closed once older than upstream_idle_timeout.
#[tokio::test]
async fn idle_connections_past_the_idle_timeout_are_closed() {
    let (addr, open, _total) = early_upstream().await;
    let proxy = start_proxy(&config(
        &[("v1", vec![format!("http://{addr}")], 1)],
        "upstream_idle_timeout = \"200ms\"",
    ))
    .await;
    let c = client();
    let burst: Vec<_> = (0..10)
        .map(|_| {
            let c = c.clone();
            let url = proxy.url("/slow");
            tokio::spawn(async move { c.get(url).send().await.unwrap().text().await.unwrap() })
        })
        .collect();
    for b in burst {
        b.await.unwrap();
    }
    println!(
        "after burst: open upstream connections = {}",
        open.load(Ordering::SeqCst)
    );
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.get(proxy.url("/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    }
    let still = open.load(Ordering::SeqCst);
    println!("after 2s (idle_timeout 200ms): open upstream connections = {still}");
    assert!(still <= 2, "{still} idle upstream connections never closed");
}

#[tokio::test]
async fn responses_without_a_body_return_their_connection() {
    let up = upstream("v1").await;
    let proxy = start_proxy(&config(&[("v1", vec![up.url()], 1)], "")).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(c.head(proxy.url("/")).send().await.unwrap().status(), 200);
        assert_eq!(
            c.get(proxy.url("/status/204"))
                .send()
                .await
                .unwrap()
                .status(),
            204
        );
        assert_eq!(
            c.get(proxy.url("/status/304"))
                .send()
                .await
                .unwrap()
                .status(),
            304
        );
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
    println!(
        "upstream connections: {}",
        up.connections.load(Ordering::SeqCst)
    );
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}
