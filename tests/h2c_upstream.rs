//! Backends spoken to over h2c (`protocol = "h2c"`) that are not gRPC: HTTP/1.1 and h2c
//! clients reach them, the request going up as HTTP/2 with bodies streamed both ways and
//! trailers passed on; many concurrent requests share few connections, within the server's
//! SETTINGS_MAX_CONCURRENT_STREAMS; an upstream that closes its connections (killed, or with
//! a GOAWAY) or refuses a stream is reached again on a new connection; WebSocket upgrades to
//! it are refused with 502; mirroring's copies reach it.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// An upstream that speaks h2c only (hyper's HTTP/2 server, no HTTP/1). Paths: `/version`
/// answers the request's version and `:authority`; `/echo` streams the request body back as
/// it comes, trailers included; `/slow?ms=N` waits N ms; `/upload` reads the body and answers
/// `received N`; `/stall` sends a piece of its body, then nothing for 10 s; anything else
/// answers its name.
struct H2Upstream {
    addr: SocketAddr,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    /// Requests received.
    requests: Arc<AtomicUsize>,
    /// The open connections' tasks, for [`H2Upstream::kill`].
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    /// Bumped to have every open connection send a GOAWAY and close once its streams end.
    goaway: watch::Sender<u32>,
}

impl H2Upstream {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Drops every open connection at once, as a killed process's.
    fn kill(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Sends a GOAWAY on every open connection (hyper's graceful shutdown).
    fn goaway(&self) {
        self.goaway.send_modify(|n| *n += 1);
    }
}

async fn h2_upstream(name: &'static str, max_streams: Option<u32>) -> H2Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let tasks = Arc::new(Mutex::new(Vec::new()));
    let (goaway, _) = watch::channel(0u32);
    let (accepted, now_open, counted, kept, shutdown) = (
        connections.clone(),
        open.clone(),
        requests.clone(),
        tasks.clone(),
        goaway.clone(),
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let open = OpenConnection::new(&now_open);
            let counted = counted.clone();
            let mut shutdown = shutdown.subscribe();
            let service = service_fn(move |request: Request<Incoming>| {
                counted.fetch_add(1, Ordering::SeqCst);
                answer(name, request)
            });
            let task = tokio::spawn(async move {
                let _open = open;
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder.timer(TokioTimer::new());
                builder.max_concurrent_streams(max_streams);
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = shutdown.changed() => connection.as_mut().graceful_shutdown(),
                }
                let _ = connection.await;
            });
            kept.lock().unwrap().push(task.abort_handle());
        }
    });
    H2Upstream {
        addr,
        connections,
        open,
        requests,
        tasks,
        goaway,
    }
}

/// Counts a connection as open while it lives (its task ended or aborted, it is closed).
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        OpenConnection(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type AnswerBody = UnsyncBoxBody<Bytes, hyper::Error>;

async fn answer(
    name: &'static str,
    request: Request<Incoming>,
) -> Result<Response<AnswerBody>, Infallible> {
    let text = match request.uri().path() {
        "/version" => format!(
            "{:?} {}",
            request.version(),
            request.uri().authority().map_or("", |a| a.as_str())
        ),
        "/echo" => return Ok(Response::new(request.into_body().boxed_unsync())),
        "/stall" => {
            // A first piece, then nothing for 10 s.
            let (feed, body) = fed_body();
            let _ = feed
                .send(Ok(Frame::data(Bytes::from_static(b"first"))))
                .await;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                drop(feed);
            });
            let body = body.map_err(|never: Infallible| match never {});
            return Ok(Response::new(body.boxed_unsync()));
        }
        "/slow" => {
            let ms: u64 = request
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(500);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            name.to_owned()
        }
        "/upload" => {
            let body = request.into_body().collect().await.map(|b| b.to_bytes());
            format!("received {}", body.map_or(0, |b| b.len()))
        }
        _ => name.to_owned(),
    };
    let body = Full::new(Bytes::from(text)).map_err(|never| match never {});
    Ok(Response::new(body.boxed_unsync()))
}

fn h2c_backend(url: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"{url}\"]\nweight = 100\nprotocol = \"h2c\"\n"
    )
}

#[tokio::test]
async fn http1_and_h2c_clients_reach_an_h2c_upstream_over_http2() {
    let upstream = h2_upstream("v1", None).await;
    let proxy = start_proxy(&h2c_backend(&upstream.url())).await;
    let authority = proxy.addr.to_string();
    for (client, speaks) in [(client(), "HTTP/1.1"), (h2c_client(), "HTTP/2")] {
        let response = client.get(proxy.url("/version")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{speaks}");
        assert_eq!(response.headers()["x-canary-backend"], "v1");
        // `Host` became `:authority`.
        let text = response.text().await.unwrap();
        assert_eq!(text, format!("HTTP/2.0 {authority}"), "{speaks}");
        let posted = client
            .post(proxy.url("/upload"))
            .body(vec![7u8; 300_000])
            .send()
            .await
            .unwrap();
        assert_eq!(posted.text().await.unwrap(), "received 300000", "{speaks}");
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 4);
    assert_eq!(upstream.connections(), 1, "one connection carried them all");
}

/// A request body fed by hand, a piece at a time.
type Feed = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type FedBody = StreamBody<
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>,
>;

fn fed_body() -> (Feed, FedBody) {
    let (feed, pieces) = mpsc::channel(4);
    let stream = futures_util::stream::unfold(pieces, |mut pieces| async move {
        pieces.recv().await.map(|piece| (piece, pieces))
    });
    (feed, StreamBody::new(Box::pin(stream)))
}

/// The next data frame of `body` as text, or the trailers.
async fn next_frame(body: &mut Incoming) -> Frame<Bytes> {
    tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the echo came while the request was still open")
        .expect("a frame")
        .expect("a good frame")
}

#[tokio::test]
async fn bodies_stream_both_ways_with_trailers_for_h2c_and_http1_clients() {
    let upstream = h2_upstream("v1", None).await;
    let proxy = start_proxy(&h2c_backend(&upstream.url())).await;
    for http2 in [true, false] {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (feed, body) = fed_body();
        let mut request = Request::post(format!("http://{}/echo", proxy.addr))
            .header("host", proxy.addr.to_string())
            .body(body)
            .unwrap();
        let response = if http2 {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            tokio::spawn(async move { sender.send_request(request).await })
        } else {
            // hyper sends request trailers that `Trailer` announces; the client takes
            // response trailers (TE: trailers).
            request
                .headers_mut()
                .insert("trailer", "x-sum".parse().unwrap());
            request
                .headers_mut()
                .insert("te", "trailers".parse().unwrap());
            *request.uri_mut() = "/echo".parse().unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            tokio::spawn(async move { sender.send_request(request).await })
        };
        feed.send(Ok(Frame::data(Bytes::from_static(b"one"))))
            .await
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("the head came while the request was still open")
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut seen = Vec::new();
        for piece in ["one", "two", "three"] {
            if piece != "one" {
                feed.send(Ok(Frame::data(Bytes::from(piece))))
                    .await
                    .unwrap();
            }
            let frame = next_frame(&mut body).await;
            seen.push(frame.into_data().expect("data"));
        }
        assert_eq!(seen, ["one", "two", "three"], "http2 {http2}");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "11".parse().unwrap());
        feed.send(Ok(Frame::trailers(trailers))).await.unwrap();
        drop(feed);
        let last = next_frame(&mut body).await;
        let trailers = last.into_trailers().expect("trailers end the echo");
        assert_eq!(trailers["x-sum"], "11", "http2 {http2}");
    }
}

#[tokio::test]
async fn trailers_reach_http1_clients_that_accept_them_in_the_chunked_trailer_section() {
    let upstream = h2_upstream("v1", None).await;
    let proxy = start_proxy(&h2c_backend(&upstream.url())).await;
    let request = |te: &str| {
        format!(
            "POST /echo HTTP/1.1\r\nhost: x\r\n{te}transfer-encoding: chunked\r\nconnection: close\r\n\r\n\
             3\r\nabc\r\n0\r\nx-sum: 6\r\nset-cookie: no\r\n\r\n"
        )
    };
    let wait = Duration::from_secs(2);
    let accepted = raw_exchange(proxy.addr, request("te: trailers\r\n").as_bytes(), wait).await;
    assert!(accepted.starts_with("HTTP/1.1 200"), "{accepted}");
    assert!(
        accepted.contains("transfer-encoding: chunked"),
        "{accepted}"
    );
    assert!(
        accepted.ends_with("3\r\nabc\r\n0\r\nx-sum: 6\r\n\r\n"),
        "{accepted}"
    );
    let plain = raw_exchange(proxy.addr, request("").as_bytes(), wait).await;
    assert!(plain.ends_with("3\r\nabc\r\n0\r\n\r\n"), "{plain}");
    assert!(!plain.contains("x-sum"), "{plain}");
}

#[tokio::test]
async fn concurrent_requests_share_few_connections() {
    let upstream = h2_upstream("v1", None).await;
    let proxy = start_proxy(&h2c_backend(&upstream.url())).await;
    let c = h2c_client();
    let calls = (0..150).map(|_| {
        let (c, url) = (c.clone(), proxy.url("/slow?ms=300"));
        tokio::spawn(async move { c.get(url).send().await.unwrap().status() })
    });
    for call in calls.collect::<Vec<_>>() {
        assert_eq!(call.await.unwrap(), 200);
    }
    // 150 at once, at most 100 streams a connection.
    assert_eq!(upstream.connections(), 2);
    for _ in 0..20 {
        let response = c.get(proxy.url("/")).send().await.unwrap();
        assert_eq!(response.text().await.unwrap(), "v1");
    }
    assert_eq!(upstream.connections(), 2, "idle connections are reused");
}

#[tokio::test]
async fn the_servers_max_concurrent_streams_is_respected() {
    let upstream = h2_upstream("v1", Some(10)).await;
    let proxy = start_proxy(&h2c_backend(&upstream.url())).await;
    let c = h2c_client();
    // The first requests learn the server's SETTINGS.
    for _ in 0..3 {
        assert_eq!(c.get(proxy.url("/")).send().await.unwrap().status(), 200);
    }
    let calls = (0..40).map(|_| {
        let (c, url) = (c.clone(), proxy.url("/slow?ms=300"));
        tokio::spawn(async move { c.get(url).send().await.unwrap().status() })
    });
    for call in calls.collect::<Vec<_>>() {
        assert_eq!(call.await.unwrap(), 200);
    }
    // 40 at once, 10 streams a connection.
    assert_eq!(upstream.connections(), 4);
}

#[tokio::test]
async fn idle_connections_are_closed_past_upstream_idle_timeout() {
    let upstream = h2_upstream("v1", None).await;
    let config = h2c_backend(&upstream.url())
        .replace("[proxy]\n", "[proxy]\nupstream_idle_timeout = \"300ms\"\n");
    let proxy = start_proxy(&config).await;
    let c = h2c_client();
    assert_eq!(c.get(proxy.url("/")).send().await.unwrap().status(), 200);
    assert_eq!(upstream.open.load(Ordering::SeqCst), 1);
    // The sweep runs every second.
    let started = std::time::Instant::now();
    while upstream.open.load(Ordering::SeqCst) > 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.get(proxy.url("/")).send().await.unwrap().status(), 200);
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn an_upstream_that_closes_its_connections_is_reached_on_new_ones() {
    let upstream = h2_upstream("v1", None).await;
    let proxy = start_proxy(&h2c_backend(&upstream.url())).await;
    let c = client();
    let get = |path: &'static str| {
        let (c, url) = (c.clone(), proxy.url(path));
        async move {
            let response = c.get(url).send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    };
    assert_eq!(get("/").await, (StatusCode::OK, "v1".to_owned()));
    assert_eq!(upstream.connections(), 1);

    // Killed: the connection is gone; the next requests go on a new one.
    upstream.kill();
    for _ in 0..3 {
        assert_eq!(get("/").await, (StatusCode::OK, "v1".to_owned()));
    }
    assert_eq!(upstream.connections(), 2);

    // A GOAWAY while a request is in flight: that one finishes on its connection, the next
    // ones (a POST among them) go on a new one.
    let slow = tokio::spawn(get("/slow?ms=300"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    upstream.goaway();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let posted = c
        .post(proxy.url("/upload"))
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(posted.text().await.unwrap(), "received 3");
    assert_eq!(get("/").await, (StatusCode::OK, "v1".to_owned()));
    assert_eq!(slow.await.unwrap(), (StatusCode::OK, "v1".to_owned()));
    assert_eq!(upstream.connections(), 3);
}

/// An h2 server (the h2 crate, below hyper) whose first connection refuses every stream with
/// REFUSED_STREAM; later ones answer `ok <request body>`.
async fn refusing_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let refuse = accepted.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    if refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        let mut text = Vec::new();
                        while let Some(Ok(data)) = body.data().await {
                            let _ = body.flow_control().release_capacity(data.len());
                            text.extend_from_slice(&data);
                        }
                        let mut send = respond
                            .send_response(http::Response::new(()), false)
                            .unwrap();
                        let answer = format!("ok {}", String::from_utf8_lossy(&text));
                        let _ = send.send_data(Bytes::from(answer), true);
                    });
                }
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn a_refused_request_is_sent_again_on_another_connection() {
    let (addr, connections) = refusing_upstream().await;
    let proxy = start_proxy(&h2c_backend(&format!("http://{addr}"))).await;
    // Not idempotent, with a body: sent again whole all the same, as the server did not act
    // on it.
    let posted = client()
        .post(proxy.url("/orders"))
        .body("one order")
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
    assert_eq!(posted.text().await.unwrap(), "ok one order");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_websocket_upgrade_to_an_h2c_backend_is_answered_502() {
    let upstream = h2_upstream("v1", None).await;
    let proxy = start_proxy(&h2c_backend(&upstream.url())).await;
    let answer = raw_exchange(
        proxy.addr,
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        Duration::from_secs(1),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn copies_reach_an_h2c_mirror_backend() {
    let served = upstream("v1").await;
    let canary = h2_upstream("v2", None).await;
    let proxy = start_proxy(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"{}\"]\nweight = 100\n\
         [[backend]]\nname = \"v2\"\nurls = [\"{}\"]\nweight = 0\nprotocol = \"h2c\"\n\
         [mirror]\nbackend = \"v2\"\n",
        served.url(),
        canary.url()
    ))
    .await;
    for i in 0..10 {
        let response = client()
            .get(proxy.url(&format!("/items/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-canary-backend"], "v1");
    }
    let started = std::time::Instant::now();
    loop {
        let report: serde_json::Value =
            serde_json::from_str(&get_text(proxy.admin("/admin/mirror")).await).unwrap();
        if report["counts"]["copied"] == 10 {
            assert_eq!(report["counts"]["errors"], 0, "{report:#}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{report:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(canary.requests.load(Ordering::SeqCst), 10);
    assert_eq!(served.hits(), 10);
}

#[tokio::test]
async fn the_phase_timeouts_apply_to_h2c_upstreams() {
    let upstream = h2_upstream("v1", None).await;
    let config = h2c_backend(&upstream.url()).replace(
        "[proxy]\n",
        "[proxy]\nrequest_timeout = \"300ms\"\nread_timeout = \"300ms\"\n\
         client_body_timeout = \"300ms\"\n",
    );
    let proxy = start_proxy(&config).await;
    let c = client();
    // request_timeout: no response head in time.
    let started = std::time::Instant::now();
    let slow = c.get(proxy.url("/slow?ms=3000")).send().await.unwrap();
    assert_eq!(slow.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // read_timeout: the body stops coming; the client's answer is cut.
    let started = std::time::Instant::now();
    let stalled = c.get(proxy.url("/stall")).send().await.unwrap();
    assert_eq!(stalled.status(), 200);
    assert!(stalled.bytes().await.is_err(), "cut short");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // client_body_timeout: the client stops sending its body (408, not the upstream's fault).
    let answer = raw_exchange(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let text = get_text(proxy.admin("/metrics")).await;
    let timeouts = [("backend", "v1"), ("kind", "timeout")];
    assert_eq!(
        metric(&text, "canary_upstream_errors_total", &timeouts),
        1.0
    );
}

#[tokio::test]
async fn a_request_that_cannot_connect_goes_whole_to_another_endpoint() {
    let upstream = h2_upstream("v1", None).await;
    let refused = refused_addr().await;
    let proxy = start_proxy(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"http://{refused}\", \"{}\"]\nweight = 100\n\
         protocol = \"h2c\"\n",
        upstream.url()
    ))
    .await;
    let c = client();
    for i in 0..4 {
        let posted = c
            .post(proxy.url("/upload"))
            .body(format!("body {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status(), 200);
        assert_eq!(posted.text().await.unwrap(), "received 6");
    }
    let text = get_text(proxy.admin("/metrics")).await;
    let connect = [("backend", "v1"), ("kind", "connect")];
    assert!(
        metric(&text, "canary_upstream_errors_total", &connect) >= 1.0,
        "{text}"
    );
}

#[tokio::test]
async fn health_probes_speak_h2c_to_an_h2c_backend() {
    // An HTTP/2-only server: a probe in HTTP/1.1 would get no answer.
    let upstream = h2_upstream("v1", None).await;
    let config = format!(
        "{}[backend.health]\npath = \"/health\"\ninterval = \"50ms\"\ntimeout = \"1s\"\n\
         unhealthy_threshold = 1\nhealthy_threshold = 1\n",
        h2c_backend(&upstream.url())
    );
    let proxy = start_proxy(&config).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while upstream.requests.load(Ordering::SeqCst) < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        upstream.requests.load(Ordering::SeqCst) >= 3,
        "probes answered"
    );
    let endpoint = proxy.table.load().backends[0].endpoints[0].clone();
    assert!(endpoint.health.is_active_up());
}
