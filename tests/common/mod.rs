//! Test harness: real upstream servers on 127.0.0.1:0 and a proxy started through the public
//! API, talked to over real TCP.
#![allow(dead_code)]

pub mod certs;
pub mod etcd;
pub mod replica;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use canary_proxy::{ControlPlane, SharedTable};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A test upstream. Paths: `/` answers its name; `/headers` dumps the request headers as
/// `name: value` lines; `/slow?ms=N` waits N ms first; `/upload` streams the body and answers
/// `received N`; `/hop` answers with hop-by-hop headers; `/status/N` answers status N;
/// `/ws` echoes WebSocket messages; `/health` answers 200, or 503 while `healthy` is false.
/// Every response carries `x-served-by: NAME`.
pub struct Upstream {
    pub name: &'static str,
    /// Speaks HTTPS.
    pub tls: bool,
    pub addr: SocketAddr,
    /// Requests received (any path).
    pub hits: Arc<AtomicUsize>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// While false, `/health` answers 503 (the active check fails). Default true.
    pub healthy: Arc<AtomicBool>,
    /// While true, every path but `/health` answers 500 (passive health sees failures).
    /// Default false.
    pub failing: Arc<AtomicBool>,
    _stop: oneshot::Sender<()>,
}

impl Upstream {
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

pub async fn upstream(name: &'static str) -> Upstream {
    serve_upstream(name, None).await
}

/// A test upstream (as [`upstream`]) that speaks HTTPS with `tls`: its URL is `https://`.
pub async fn https_upstream(name: &'static str, tls: Arc<rustls::ServerConfig>) -> Upstream {
    serve_upstream(name, Some(tokio_rustls::TlsAcceptor::from(tls))).await
}

async fn serve_upstream(name: &'static str, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
    let speaks_tls = tls.is_some();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let healthy = Arc::new(AtomicBool::new(true));
    let failing = Arc::new(AtomicBool::new(false));
    let (stop, mut stopped) = oneshot::channel::<()>();
    let counter = hits.clone();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted_count = connections.clone();
    let toggles = (healthy.clone(), failing.clone());
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => accepted.unwrap().0,
                _ = &mut stopped => return,
            };
            accepted_count.fetch_add(1, Ordering::SeqCst);
            let counter = counter.clone();
            let (healthy, failing) = toggles.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                counter.fetch_add(1, Ordering::SeqCst);
                let forced = match request.uri().path() {
                    "/health" if !healthy.load(Ordering::SeqCst) => {
                        Some(StatusCode::SERVICE_UNAVAILABLE)
                    }
                    "/health" => None,
                    _ if failing.load(Ordering::SeqCst) => Some(StatusCode::INTERNAL_SERVER_ERROR),
                    _ => None,
                };
                async move {
                    match forced {
                        Some(status) => {
                            let mut response = Response::new(Full::new(Bytes::from(name)));
                            *response.status_mut() = status;
                            response
                                .headers_mut()
                                .insert("x-served-by", name.parse().unwrap());
                            Ok(response)
                        }
                        None => answer(name, request).await,
                    }
                }
            });
            let tls = tls.clone();
            tokio::spawn(async move {
                let server = auto::Builder::new(TokioExecutor::new());
                let _ = match tls {
                    None => {
                        server
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await
                    }
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => {
                            server
                                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                                .await
                        }
                        Err(_) => return,
                    },
                };
            });
        }
    });
    Upstream {
        tls: speaks_tls,
        name,
        addr,
        hits,
        connections,
        healthy,
        failing,
        _stop: stop,
    }
}

async fn answer(
    name: &'static str,
    mut request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let mut status = StatusCode::OK;
    let mut extra: Vec<(&'static str, &'static str)> = Vec::new();
    let body = match path.as_str() {
        "/headers" => {
            let mut text = String::new();
            for (k, v) in request.headers() {
                text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("<bin>")));
            }
            text
        }
        "/slow" => {
            let ms: u64 = query.trim_start_matches("ms=").parse().unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            name.to_string()
        }
        "/upload" => {
            let mut body = request.into_body();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    total += data.len();
                }
            }
            format!("received {total}")
        }
        "/hop" => {
            extra = vec![
                ("connection", "x-upstream-secret"),
                ("x-upstream-secret", "leak"),
                ("keep-alive", "timeout=5"),
                ("proxy-authenticate", "Basic"),
                ("trailer", "x-sum"),
                ("upgrade", "h2c"),
                ("x-upstream-kept", "yes"),
            ];
            name.to_string()
        }
        "/ws" => {
            let key = request.headers()["sec-websocket-key"].clone();
            let on_upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let upgraded = on_upgrade.await.unwrap();
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_close() {
                        break;
                    }
                    if ws.send(message).await.is_err() {
                        break;
                    }
                }
            });
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = response.headers_mut();
            h.insert("connection", "upgrade".parse().unwrap());
            h.insert("upgrade", "websocket".parse().unwrap());
            h.insert(
                "sec-websocket-accept",
                derive_accept_key(key.as_bytes()).parse().unwrap(),
            );
            return Ok(response);
        }
        p if p.starts_with("/status/") => {
            status = StatusCode::from_u16(p[8..].parse().unwrap()).unwrap();
            name.to_string()
        }
        _ => name.to_string(),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("x-served-by", name.parse().unwrap());
    for (k, v) in extra {
        response.headers_mut().append(k, v.parse().unwrap());
    }
    Ok(response)
}

/// Reads from `stream` until a whole request head has arrived; false if the peer went away.
pub async fn read_request_head(stream: &mut TcpStream) -> bool {
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// An upstream that reads a request head, then closes the connection without answering.
pub async fn broken_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                if read_request_head(&mut stream).await {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, hits)
}

/// An upstream that answers every request head with the same raw bytes, then holds the
/// connection for two seconds.
pub async fn raw_upstream(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut stream).await {
                    let _ = stream.write_all(answer).await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            });
        }
    });
    addr
}

/// An address nothing listens on (connections are refused).
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A proxy serving on 127.0.0.1:0 (and its admin API on another port), stopped when dropped.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub table: SharedTable,
    pub control: Arc<ControlPlane>,
    /// The config file, when the proxy was started from one.
    pub config_path: Option<std::path::PathBuf>,
    _dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// Stops this proxy and starts a new one from the same config file and directory (what
    /// it persisted there is read again), as a restart of the process would.
    pub async fn restart(mut self) -> TestProxy {
        let path = self.config_path.clone().expect("started from a file");
        let dir = self._dir.take();
        self.shutdown().await;
        let parsed = canary_proxy::config::load(&path).expect("config is still valid");
        launch(parsed, Some(path), dir).await
    }

    /// Stops accepting and waits for the drain to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a proxy for the config text, without a config file (its `listen` addresses are
/// ignored: port 0 is used).
pub async fn start_proxy(config: &str) -> TestProxy {
    let parsed = canary_proxy::config::parse(config, "test.toml").expect("test config is valid");
    launch(parsed, None, None).await
}

/// Starts a proxy from a config file written into a fresh temporary directory, so reloads
/// and weight persistence have a file to work on.
pub async fn start_proxy_with_file(config: &str) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("canary.toml");
    std::fs::write(&path, config).unwrap();
    let parsed = canary_proxy::config::load(&path).expect("test config is valid");
    launch(parsed, Some(path), Some(dir)).await
}

async fn launch(
    config: canary_proxy::Config,
    path: Option<std::path::PathBuf>,
    dir: Option<tempfile::TempDir>,
) -> TestProxy {
    let control = ControlPlane::new(config, path.clone()).expect("control plane starts");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, admin_addr) = (
        listener.local_addr().unwrap(),
        admin_listener.local_addr().unwrap(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(canary_proxy::run(
        control.clone(),
        listener,
        admin_listener,
        async move {
            let _ = stopped.await;
        },
    ));
    TestProxy {
        addr,
        admin_addr,
        table: control.table().clone(),
        control,
        config_path: path,
        _dir: dir,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Sends `messages` text messages and a 200 kB binary one through a WebSocket to an echo
/// upstream, and checks each comes back whole.
pub async fn websocket_echoes<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, messages: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::Message;
    for i in 0..messages {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    let blob = vec![7u8; 200_000];
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &blob[..]
    );
}

/// A config with one `[[backend]]` per `(name, urls, weight)` and extra TOML appended.
pub fn config(backends: &[(&str, Vec<String>, u32)], extra: &str) -> String {
    let mut text = String::from(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nuser_id_header = \"x-user-id\"\nuser_id_cookie = \"uid\"\n",
    );
    text.push_str(extra);
    text.push('\n');
    for (name, urls, weight) in backends {
        let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        text.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\nurls = [{}]\nweight = {weight}\n",
            urls.join(", ")
        ));
    }
    text
}

/// The body of a GET to `url`, as text (the admin API's JSON, `/metrics`).
pub async fn get_text(url: String) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A client speaking h2c with prior knowledge (as gRPC clients do), never through an
/// environment proxy.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A plain HTTP/1.1 client that never goes through an environment proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Sends raw bytes on a fresh connection and returns everything read until the peer closes
/// or `wait` passes without data.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The independent reference for the sticky formula: FNV-1a 32-bit, written out here again
/// on purpose so the test does not trust the proxy's own implementation.
pub fn reference_bucket(salt: &str, user: &str) -> u32 {
    let mut hash: u32 = 2_166_136_261;
    for byte in salt.bytes().chain(user.bytes()) {
        hash ^= byte as u32;
        hash = hash.wrapping_mul(16_777_619);
    }
    hash % 10_000
}

/// The value of one sample in Prometheus text, matching all the given labels.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let rest = &l[name.len()..];
            rest.starts_with('{') || rest.starts_with(' ')
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Clients sending GETs to the proxy in a loop until dropped, `pause` between a client's
/// requests, keeping who answered each (its `x-canary-backend`) and when.
pub struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>,
}

impl Load {
    pub fn start(proxy: &TestProxy, tasks: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(std::sync::Mutex::new(Vec::new()));
        for _ in 0..tasks {
            let (stop, served, url, c) = (stop.clone(), served.clone(), proxy.url("/"), client());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(response) = c.get(&url).send().await {
                        let backend = response
                            .headers()
                            .get("x-canary-backend")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let _ = response.bytes().await;
                        served
                            .lock()
                            .unwrap()
                            .push((std::time::Instant::now(), backend));
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            });
        }
        Load { stop, served }
    }

    /// Who served the requests answered after `since`.
    pub fn served_after(&self, since: std::time::Instant) -> Vec<String> {
        let served = self.served.lock().unwrap();
        served
            .iter()
            .filter(|(at, _)| *at > since)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// Who served every request answered so far.
    pub fn served(&self) -> Vec<String> {
        self.served
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
