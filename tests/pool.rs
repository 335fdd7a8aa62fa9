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

/// An upstream that answers the first request on each connection (keep-alive), and then:
/// with `read_next`, like one whose keep-alive timer fired just as the next request arrived,
/// reads the next request's head and closes without answering; without it, closes right
/// after its answer (before the proxy sends anything more). Counts the request heads read.
async fn one_shot_upstream(read_next: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let count = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                if !read_request_head(&mut stream).await {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
                if read_next && read_request_head(&mut stream).await {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, heads)
}

/// Every second request meets a pooled connection that the upstream closes without an answer:
/// idempotent requests are sent again on a fresh connection and succeed, and nothing counts
/// against the endpoint; a POST is not sent again (the upstream may have acted on it): 502.
#[tokio::test]
async fn idempotent_requests_on_a_connection_the_upstream_dropped_are_sent_again() {
    let (addr, heads) = one_shot_upstream(true).await;
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"http://{addr}\"]\nweight = 1\n\
         [backend.outlier]\nconsecutive_failures = 1\n"
    );
    let proxy = start_proxy(&text).await;
    let c = client();
    for i in 0..20 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {i}");
        let response = c.put(proxy.url("/")).body("x").send().await.unwrap();
        assert_eq!(response.status(), 200, "PUT {i}");
    }
    let sent = heads.load(Ordering::SeqCst);
    // Each dropped request was seen once more by the upstream; none was lost.
    assert!(sent >= 40, "{sent}");
    let metrics = get_text(proxy.admin("/metrics")).await;
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("canary_upstream_errors_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");

    // A POST on a connection the upstream closed after reading it: not replayed.
    let before = heads.load(Ordering::SeqCst);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = c.post(proxy.url("/")).body("x").send().await.unwrap();
        statuses.push(response.status().as_u16());
    }
    assert!(statuses.contains(&502), "{statuses:?}");
    assert_eq!(
        heads.load(Ordering::SeqCst) - before,
        4,
        "each POST reached the upstream exactly once: {statuses:?}"
    );
}

/// The upstream closes each connection right after its answer, before the next request:
/// every request, POST included, goes out on a fresh connection and succeeds.
#[tokio::test]
async fn requests_on_a_connection_closed_before_they_were_read_are_sent_again() {
    let (addr, heads) = one_shot_upstream(false).await;
    let proxy = start_proxy(&config(&[("v1", vec![format!("http://{addr}")], 1)], "")).await;
    let c = client();
    for i in 0..10 {
        let response = c.post(proxy.url("/")).body("x").send().await.unwrap();
        assert_eq!(response.status(), 200, "POST {i}");
    }
    assert_eq!(heads.load(Ordering::SeqCst), 10);
}

/// The proxy's sockets to `port` in CLOSE_WAIT: closed by the upstream, not yet by the proxy.
fn close_wait_to(port: u16) -> usize {
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (fields[2].ends_with(&port), fields[3] == "08")
                })
                .collect::<Vec<_>>()
        })
        .filter(|&(remote, close_wait)| remote && close_wait)
        .count()
}

/// An upstream that keeps connections alive after its answer for 200 ms, then closes them
/// (a short keep-alive timeout): the proxy closes its pooled ends without waiting for traffic.
#[tokio::test]
async fn idle_connections_the_upstream_closed_do_not_linger_in_close_wait() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                while read_request_head(&mut stream).await {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    let mut byte = [0u8; 1];
                    let next =
                        tokio::time::timeout(Duration::from_millis(200), stream.peek(&mut byte));
                    if !matches!(next.await, Ok(Ok(1))) {
                        return;
                    }
                }
            });
        }
    });
    let proxy = start_proxy(&config(&[("v1", vec![format!("http://{addr}")], 1)], "")).await;
    let c = client();
    let burst: Vec<_> = (0..10)
        .map(|_| {
            let (c, url) = (c.clone(), proxy.url("/"));
            tokio::spawn(async move { c.get(url).send().await.unwrap().status() })
        })
        .collect();
    for request in burst {
        assert_eq!(request.await.unwrap(), 200);
    }
    // The upstream closes after 200 ms; the proxy looks at idle connections once a second.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(close_wait_to(addr.port()), 0);
}
