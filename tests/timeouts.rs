//! Timeouts by phase over real TCP, as nginx has them: each bounds a pause, never a whole
//! transfer. A slow upload that keeps moving passes, to a slow client and to a slowly reading
//! upstream alike; a client that stops sending its body gets 408; an upstream that stops in
//! the middle of a response body, or a client that stops reading one, loses its connections.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends a request head announcing `pieces` × `piece` bytes, then the pieces with `pause`
/// between them; returns the status line the proxy answered.
async fn paced_upload(
    addr: std::net::SocketAddr,
    pieces: usize,
    piece: usize,
    pause: Duration,
) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        pieces * piece
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..pieces {
        tokio::time::sleep(pause).await;
        if stream.write_all(&vec![b'x'; piece]).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_client_upload_longer_than_every_timeout_passes_while_it_moves() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "request_timeout = \"300ms\"\nclient_body_timeout = \"300ms\"",
    ))
    .await;
    // Ten pieces 150 ms apart: 1.5 s in all, five times each timeout.
    let answer = paced_upload(proxy.addr, 10, 100, Duration::from_millis(150)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("received 1000"), "{answer}");
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408_after_client_body_timeout() {
    let v1 = upstream("v1").await;
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "request_timeout = \"30s\"\nclient_body_timeout = \"300ms\"",
    ))
    .await;
    let started = Instant::now();
    // Three pieces, then nothing of the 10 announced.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        stream.write_all(&[b'x'; 100]).await.unwrap();
    }
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // 450 ms of pieces, then 300 ms of silence: the timeout counts from the last piece.
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

/// An upstream that reads a request body slowly (256 KiB every 10 ms, about 25 MiB/s) and
/// then answers `200 read N`.
async fn slow_reader() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut read = 0;
                let mut buf = vec![0u8; 256 * 1024];
                while read < length {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read += n,
                    }
                }
                let body = format!("read {read}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_that_reads_an_upload_slowly_is_not_timed_out_or_ejected() {
    let addr = slow_reader().await;
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"1s\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"http://{addr}\"]\nweight = 1\n\
         [backend.outlier]\nconsecutive_failures = 1\n"
    );
    let proxy = start_proxy(&text).await;
    // 64 MiB at about 25 MiB/s: some 2.5 s, far past request_timeout, with the proxy's writes
    // waiting on the upstream most of the time. (Socket buffers hold up to about 10 MiB, which
    // the upstream takes 0.4 s to read after the proxy wrote the last byte: request_timeout
    // counts from there.)
    let size = 64 * 1024 * 1024;
    let started = Instant::now();
    let response = client()
        .post(proxy.url("/upload"))
        .body(vec![b'y'; size])
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{body} after {:?}", started.elapsed());
    assert_eq!(body, format!("read {size}"));
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // One failure would have ejected the endpoint (consecutive_failures = 1).
    let text = get_text(proxy.admin("/admin/routes")).await;
    let routes: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        routes["backends"][0]["endpoints"][0]["ejected"], false,
        "{routes}"
    );
}

/// An upstream that answers every request with `Content-Length: 100` and 10 bytes of body,
/// then stalls with the connection open; `closed` turns true when the proxy closes it.
async fn stalling_upstream() -> (std::net::SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let seen = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                if !read_request_head(&mut stream).await {
                    return;
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await;
                let mut buf = [0u8; 64];
                // Bounded so the test cannot hang: 10 s of silence, then give up.
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await
                {
                    seen.store(true, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, closed)
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off_after_read_timeout() {
    let (addr, upstream_closed) = stalling_upstream().await;
    let proxy = start_proxy(&config(
        &[("v1", vec![format!("http://{addr}")], 1)],
        "read_timeout = \"300ms\"",
    ))
    .await;
    for request in [
        // HTTP/1.1 and HTTP/1.0 alike.
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET / HTTP/1.0\r\n\r\n",
    ] {
        upstream_closed.store(false, Ordering::SeqCst);
        let started = Instant::now();
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(read.is_ok(), "the client was held past 5 s: {text:?}");
        assert!(text.starts_with("HTTP/1."), "{text}");
        assert!(
            text.ends_with("0123456789"),
            "only the 10 bytes sent: {text:?}"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            upstream_closed.load(Ordering::SeqCst),
            "upstream connection still open"
        );
    }
}

/// An upstream that answers with an endless chunked body as fast as it can be taken; counts
/// the bytes written, and `closed` turns true once a write fails (the proxy hung up).
async fn endless_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    let (count, seen) = (sent.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (count, seen) = (count.clone(), seen.clone());
            tokio::spawn(async move {
                if !read_request_head(&mut stream).await {
                    return;
                }
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if stream.write_all(head).await.is_err() {
                    return;
                }
                let mut chunk = b"10000\r\n".to_vec();
                chunk.extend_from_slice(&vec![b'z'; 0x10000]);
                chunk.extend_from_slice(b"\r\n");
                // At most 1 GiB, so the test stops by itself whatever the proxy does.
                for _ in 0..16 * 1024 {
                    let write = stream.write_all(&chunk);
                    match tokio::time::timeout(Duration::from_secs(10), write).await {
                        Ok(Ok(())) => count.fetch_add(chunk.len(), Ordering::SeqCst),
                        Ok(Err(_)) => {
                            seen.store(true, Ordering::SeqCst);
                            return;
                        }
                        Err(_) => return,
                    };
                }
            });
        }
    });
    (addr, sent, closed)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_send_timeout() {
    let (addr, sent, upstream_closed) = endless_upstream().await;
    let proxy = start_proxy(&config(
        &[("v1", vec![format!("http://{addr}")], 1)],
        "send_timeout = \"300ms\"",
    ))
    .await;
    for request in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        // HTTP/1.0: the body delimited by the close.
        b"GET / HTTP/1.0\r\n\r\n",
    ] {
        upstream_closed.store(false, Ordering::SeqCst);
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        // Never read: every buffer on the way fills, then the proxy's writes wait.
        let started = Instant::now();
        while !upstream_closed.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(8)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            upstream_closed.load(Ordering::SeqCst),
            "upstream connection still held after {:?} ({} bytes taken)",
            started.elapsed(),
            sent.load(Ordering::SeqCst)
        );
        drop(stream);
    }
}
