//! TLS termination on `proxy.listen` over real TCP, with certificates made here (rcgen) and
//! a client (tokio-rustls, hyper's client connections) that trusts only the test CA: HTTP/1.1
//! and HTTP/2 by ALPN to a plain upstream, SNI, the protocol versions, reloads that swap
//! certificates (SIGHUP and the admin API), `check` on a key that is not the certificate's,
//! the `Secure` sticky cookie, WebSocket and large bodies over TLS, and silent clients.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_canary-proxy");

/// A certificate authority of the test's own, and the directory its certificates go to.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "canary-proxy test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki {
            ca,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes `NAME.pem` and `NAME.key`: a certificate for `names` signed by the CA, and its
    /// key. Returns the certificate (DER), to tell which one a client got.
    fn issue(&self, name: &str, names: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.ca)
            .unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// `[proxy.tls]` with `NAME.pem` / `NAME.key` by absolute path, and `sni` entries
    /// `(server name, NAME)`.
    fn tls_table(&self, name: &str, sni: &[(&str, &str)]) -> String {
        let mut table = format!(
            "[proxy.tls]\ncert = {:?}\nkey = {:?}\n",
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key"))
        );
        for (server_name, name) in sni {
            table.push_str(&format!(
                "[[proxy.tls.sni]]\nserver_name = {server_name:?}\ncert = {:?}\nkey = {:?}\n",
                self.path(&format!("{name}.pem")),
                self.path(&format!("{name}.key"))
            ));
        }
        table
    }

    /// A client config trusting only this CA, offering `alpn`, speaking `versions`; it never
    /// resumes a session, so every connection sees the certificate served now.
    fn client(
        &self,
        alpn: &[&str],
        versions: &[&'static SupportedProtocolVersion],
    ) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config.resumption = rustls::client::Resumption::disabled();
        TlsConnector::from(Arc::new(config))
    }
}

const BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// A TLS connection to `addr` asking for `server_name`.
async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    server_name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    connector.connect(name, tcp).await
}

/// The certificate the server presented on `stream`.
fn served_certificate(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// An HTTP/1.1 client connection over `stream`.
async fn http1(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection.with_upgrades());
    sender
}

/// An HTTP/2 client connection over `stream`.
async fn http2(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// GET `path` on an HTTP/1.1 connection: status, version, headers and body.
async fn get1(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (Response<()>, String) {
    let request = Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    read(sender.send_request(request).await.unwrap()).await
}

/// GET `path` on an HTTP/2 connection.
async fn get2(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (Response<()>, String) {
    let request = Request::get(format!("https://localhost{path}"))
        .body(Empty::new())
        .unwrap();
    read(sender.send_request(request).await.unwrap()).await
}

async fn read(response: Response<hyper::body::Incoming>) -> (Response<()>, String) {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        Response::from_parts(parts, ()),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The value of `name` in the `/headers` dump of the upstream.
fn seen(dump: &str, name: &str) -> Vec<String> {
    dump.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .collect()
}

#[tokio::test]
async fn http1_and_http2_over_tls_reach_a_plain_upstream_as_https() {
    let v1 = upstream("v1").await;
    let pki = Pki::new();
    pki.issue("site", &["localhost"]);
    let tls_proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        &pki.tls_table("site", &[]),
    ))
    .await;
    let plain_proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], "")).await;

    // ALPN http/1.1: the proxy's own HTTP/1 server.
    let stream = connect(
        &pki.client(&["h2", "http/1.1"][1..], BOTH),
        tls_proxy.addr,
        "localhost",
    )
    .await
    .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut h1 = http1(stream).await;
    let (response, dump) = get1(&mut h1, "/headers").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(response.headers()["x-canary-backend"], "v1");
    assert_eq!(seen(&dump, "x-forwarded-proto"), ["https"], "{dump}");
    assert_eq!(seen(&dump, "x-forwarded-for"), ["127.0.0.1"], "{dump}");
    // The connection is kept alive over TLS.
    let (again, dump) = get1(&mut h1, "/headers").await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(seen(&dump, "x-forwarded-proto"), ["https"]);

    // ALPN h2: hyper's HTTP/2 server.
    let stream = connect(
        &pki.client(&["h2", "http/1.1"], BOTH),
        tls_proxy.addr,
        "localhost",
    )
    .await
    .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut h2 = http2(stream).await;
    let (response, dump) = get2(&mut h2, "/headers").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(seen(&dump, "x-forwarded-proto"), ["https"], "{dump}");
    assert_eq!(seen(&dump, "host"), ["localhost"], "{dump}");
    // Several streams at once on the one connection.
    let many: Vec<_> = (0..8)
        .map(|_| {
            let mut h2 = h2.clone();
            tokio::spawn(async move { get2(&mut h2, "/").await.1 })
        })
        .collect();
    for answer in many {
        assert_eq!(answer.await.unwrap(), "v1");
    }

    // No ALPN at all: HTTP/1.
    let stream = connect(&pki.client(&[], BOTH), tls_proxy.addr, "localhost")
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let (response, dump) = get1(&mut http1(stream).await, "/headers").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(seen(&dump, "x-forwarded-proto"), ["https"], "{dump}");

    // A client's own claim is replaced; the plain listener says http.
    let dump = client()
        .get(plain_proxy.url("/headers"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(seen(&dump, "x-forwarded-proto"), ["http"], "{dump}");
    // Plain HTTP to the TLS listener gets no answer (it is not a handshake).
    let answer = raw_exchange(
        tls_proxy.addr,
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(!answer.contains("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn sni_picks_the_certificate_by_server_name() {
    let v1 = upstream("v1").await;
    let pki = Pki::new();
    let site = pki.issue("site", &["localhost", "www.example.com"]);
    let api = pki.issue("api", &["api.example.com"]);
    let tls = pki.tls_table("site", &[("api.example.com", "api")]);
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], &tls)).await;
    let client = pki.client(&["http/1.1"], BOTH);
    for (name, expected) in [
        ("api.example.com", &api),
        ("API.Example.com", &api),
        ("localhost", &site),
        // A name no [[proxy.tls.sni]] gives: the default certificate.
        ("www.example.com", &site),
    ] {
        let stream = connect(&client, proxy.addr, name).await.unwrap();
        assert_eq!(&served_certificate(&stream), expected, "{name}");
        let (response, body) = get1(&mut http1(stream).await, "/").await;
        assert_eq!((response.status(), body.as_str()), (StatusCode::OK, "v1"));
    }
    // The default certificate does not name api's neighbours: a client asking for one
    // refuses it, as it should.
    let refused = connect(&client, proxy.addr, "db.example.com").await;
    assert!(refused.is_err());
}

/// A ClientHello of TLS `version` without the supported_versions extension, as a client of
/// TLS 1.2 or older sends it: suites of TLS 1.2 (ECDHE with AES-GCM) and older (CBC), with
/// the extensions rustls needs to go on with TLS 1.2 (signature algorithms, groups).
fn legacy_client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version);
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 6, 0xc0, 0x2b, 0xc0, 0x13, 0x00, 0x2f]);
    body.extend_from_slice(&[1, 0]); // null compression
    let extensions = [
        // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
        &[0x00, 0x0d, 0, 8, 0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01][..],
        // supported_groups: x25519, secp256r1
        &[0x00, 0x0a, 0, 6, 0, 4, 0x00, 0x1d, 0x00, 0x17][..],
        // ec_point_formats: uncompressed
        &[0x00, 0x0b, 0, 2, 1, 0][..],
    ]
    .concat();
    body.extend_from_slice(&[0, extensions.len() as u8]);
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1, 0, 0, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1, 0, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn only_tls_1_2_and_1_3_are_spoken() {
    let v1 = upstream("v1").await;
    let pki = Pki::new();
    pki.issue("site", &["localhost"]);
    let proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        &pki.tls_table("site", &[]),
    ))
    .await;
    for (version, expected) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let stream = connect(
            &pki.client(&["http/1.1"], &[version]),
            proxy.addr,
            "localhost",
        )
        .await
        .unwrap();
        assert_eq!(stream.get_ref().1.protocol_version(), Some(expected));
        let (response, _) = get1(&mut http1(stream).await, "/").await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let answer = |version| async move {
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(&legacy_client_hello(version)).await.unwrap();
        let mut answer = vec![0u8; 7];
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut answer))
            .await
            .unwrap()
            .unwrap();
        answer
    };
    // The same hello saying TLS 1.2 gets a ServerHello (a handshake record, 22): only the
    // version differs in those refused below.
    let tls12 = answer([3, 3]).await;
    assert_eq!((tls12[0], tls12[5]), (22, 2), "{tls12:?}");
    for (version, name) in [([3, 1], "TLS 1.0"), ([3, 2], "TLS 1.1")] {
        // A fatal alert (21; level 2): protocol_version (70); no ServerHello.
        let refused = answer(version).await;
        assert_eq!(refused[0], 21, "{name}: not an alert: {refused:?}");
        assert_eq!(&refused[5..7], &[2, 70], "{name}: {refused:?}");
    }
}

#[tokio::test]
async fn a_reload_swaps_certificates_for_new_connections_and_a_bad_key_keeps_the_old() {
    let v1 = upstream("v1").await;
    let pki = Pki::new();
    let first = pki.issue("site", &["localhost"]);
    let text = config(&[("v1", vec![v1.url()], 1)], &pki.tls_table("site", &[]));
    let proxy = start_proxy_with_file(&text).await;
    let client = pki.client(&["http/1.1"], BOTH);
    let h2_client = pki.client(&["h2"], BOTH);

    let before = connect(&client, proxy.addr, "localhost").await.unwrap();
    assert_eq!(served_certificate(&before), first);
    let mut before = http1(before).await;
    assert_eq!(get1(&mut before, "/").await.1, "v1");
    let mut before_h2 = http2(connect(&h2_client, proxy.addr, "localhost").await.unwrap()).await;
    assert_eq!(get2(&mut before_h2, "/").await.1, "v1");

    // New files at the same paths, then a reload.
    let second = pki.issue("site", &["localhost"]);
    assert_ne!(first, second);
    let c = common::client();
    let reload = c.post(proxy.admin("/admin/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 200, "{}", reload.text().await.unwrap());
    let after = connect(&client, proxy.addr, "localhost").await.unwrap();
    assert_eq!(served_certificate(&after), second);
    assert_eq!(get1(&mut http1(after).await, "/").await.1, "v1");
    // The connections opened before go on, on their own session.
    assert_eq!(get1(&mut before, "/").await.1, "v1");
    assert_eq!(get2(&mut before_h2, "/").await.1, "v1");

    // A key that is not the certificate's: the reload fails, naming it; all stays.
    let version = proxy.table.load().version;
    let other = KeyPair::generate().unwrap();
    std::fs::write(pki.path("site.key"), other.serialize_pem()).unwrap();
    let refused = c.post(proxy.admin("/admin/reload")).send().await.unwrap();
    let status = refused.status();
    let message = refused.text().await.unwrap();
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{status}"
    );
    assert!(message.contains("proxy.tls.key"), "{message}");
    assert!(message.contains(&pki.path("site.key")), "{message}");
    assert_eq!(proxy.table.load().version, version);
    let still = connect(&client, proxy.addr, "localhost").await.unwrap();
    assert_eq!(served_certificate(&still), second);
    assert_eq!(get1(&mut http1(still).await, "/").await.1, "v1");
    assert_eq!(get1(&mut before, "/").await.1, "v1");
}

#[test]
fn check_names_the_file_and_the_key_of_a_key_that_is_not_the_certificates() {
    let pki = Pki::new();
    pki.issue("site", &["localhost"]);
    pki.issue("other", &["localhost"]);
    let path = pki.dir.path().join("canary.toml");
    let write = |key: &str| {
        std::fs::write(
            &path,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:0\"\n\n[proxy.tls]\ncert = \"site.pem\"\nkey = \"{key}\"\n\n\
                 [[backend]]\nname = \"v1\"\nurls = [\"http://127.0.0.1:1\"]\nweight = 1\n"
            ),
        )
        .unwrap();
    };
    write("other.key");
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let config = path.display().to_string();
    assert!(
        stderr.contains(&format!("{config}:6: `proxy.tls.key`")),
        "{stderr}"
    );
    // Relative to the config file's directory (not the current one), and named.
    assert!(stderr.contains(&pki.path("other.key")), "{stderr}");
    assert!(stderr.contains(&pki.path("site.pem")), "{stderr}");
    // The right key passes, and check says what is served.
    write("site.key");
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("proxy TLS: TLS 1.2 and 1.3"), "{stdout}");
    assert!(stdout.contains(&pki.path("site.pem")), "{stdout}");
}

#[tokio::test]
async fn the_sticky_cookie_is_secure_over_tls_only() {
    let v1 = upstream("v1").await;
    let pki = Pki::new();
    pki.issue("site", &["localhost"]);
    let extra = |tls: &str| format!("sticky_cookie = \"canary_uid\"\n{tls}");
    let tls_proxy = start_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        &extra(&pki.tls_table("site", &[])),
    ))
    .await;
    let plain_proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], &extra(""))).await;

    let stream = connect(
        &pki.client(&["http/1.1"], BOTH),
        tls_proxy.addr,
        "localhost",
    )
    .await
    .unwrap();
    let (response, _) = get1(&mut http1(stream).await, "/").await;
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.starts_with("canary_uid=") && cookie.ends_with("; Secure"),
        "{cookie}"
    );
    let stream = connect(&pki.client(&["h2"], BOTH), tls_proxy.addr, "localhost")
        .await
        .unwrap();
    let (response, _) = get2(&mut http2(stream).await, "/").await;
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.ends_with("; Secure"), "{cookie}");

    let response = client().get(plain_proxy.url("/")).send().await.unwrap();
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.starts_with("canary_uid=") && !cookie.contains("Secure"),
        "{cookie}"
    );
}

/// Reads until the peer closes (or fails); how long that took, capped at `cap`.
async fn closed_after(stream: &mut (impl tokio::io::AsyncRead + Unpin), cap: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(cap, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "still open after {cap:?}");
    started.elapsed()
}

#[tokio::test]
async fn silent_clients_are_closed_after_header_read_timeout() {
    let v1 = upstream("v1").await;
    let pki = Pki::new();
    pki.issue("site", &["localhost"]);
    let extra = format!(
        "header_read_timeout = \"500ms\"\n{}",
        pki.tls_table("site", &[])
    );
    let proxy = start_proxy(&config(&[("v1", vec![v1.url()], 1)], &extra)).await;
    let timeout = Duration::from_millis(500);
    let cap = Duration::from_secs(5);

    // Connects over TCP and sends nothing: no handshake, closed.
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let took = closed_after(&mut tcp, cap).await;
    assert!(took >= timeout - Duration::from_millis(50), "{took:?}");
    // Half a ClientHello, then nothing.
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(&legacy_client_hello([3, 3])[..20])
        .await
        .unwrap();
    closed_after(&mut tcp, cap).await;
    // The handshake, then no HTTP/2 preface.
    let mut h2 = connect(&pki.client(&["h2"], BOTH), proxy.addr, "localhost")
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let took = closed_after(&mut h2, cap).await;
    assert!(took >= timeout - Duration::from_millis(50), "{took:?}");
    // The handshake, then no HTTP/1 request head.
    let mut h1 = connect(&pki.client(&["http/1.1"], BOTH), proxy.addr, "localhost")
        .await
        .unwrap();
    closed_after(&mut h1, cap).await;
    // A client that speaks in time is served.
    let stream = connect(&pki.client(&["h2"], BOTH), proxy.addr, "localhost")
        .await
        .unwrap();
    assert_eq!(get2(&mut http2(stream).await, "/").await.1, "v1");
}

#[tokio::test]
async fn websockets_and_large_bodies_go_through_tls() {
    let v1 = upstream("v1").await;
    let big = big_upstream().await;
    let pki = Pki::new();
    pki.issue("site", &["localhost"]);
    let mut text = config(
        &[
            ("v1", vec![v1.url()], 1),
            ("big", vec![format!("http://{big}")], 0),
        ],
        &pki.tls_table("site", &[]),
    );
    text.push_str("[[rule]]\nheader = \"x-big\"\npresent = true\nbackend = \"big\"\n");
    let proxy = start_proxy(&text).await;
    let client = pki.client(&["http/1.1"], BOTH);

    // WebSocket: the upgrade over TLS, then the tunnel.
    let stream = connect(&client, proxy.addr, "localhost").await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("wss://localhost/ws", stream)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    ws.close(None).await.unwrap();

    // 8 MiB down (HTTP/1.1 and HTTP/2), 8 MiB up.
    const SIZE: usize = 8 << 20;
    let stream = connect(&client, proxy.addr, "localhost").await.unwrap();
    let mut h1 = http1(stream).await;
    let request = Request::get("/")
        .header("host", "localhost")
        .header("x-big", "1");
    let (response, body) = read(
        h1.send_request(request.body(Empty::new()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body.len(), SIZE);
    assert!(body.bytes().all(|b| b == b'x'));
    let stream = connect(&pki.client(&["h2"], BOTH), proxy.addr, "localhost")
        .await
        .unwrap();
    let mut h2 = http2(stream).await;
    let request = Request::get("https://localhost/").header("x-big", "1");
    let (_, body) = read(
        h2.send_request(request.body(Empty::new()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body.len(), SIZE);

    let stream = connect(&client, proxy.addr, "localhost").await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let chunks =
        futures_util::stream::iter((0..SIZE / 65536).map(|_| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'u'; 65536])))
        }));
    let request = Request::post("/upload")
        .header("host", "localhost")
        .body(StreamBody::new(chunks))
        .unwrap();
    let (response, body) = read(sender.send_request(request).await.unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body, format!("received {SIZE}"));
}

#[tokio::test]
async fn a_client_that_reads_slowly_gets_all_of_a_large_answer_over_tls() {
    let big = big_upstream().await;
    let pki = Pki::new();
    pki.issue("site", &["localhost"]);
    let proxy = start_proxy(&config(
        &[("big", vec![format!("http://{big}")], 1)],
        &pki.tls_table("site", &[]),
    ))
    .await;
    // A small receive window, and a pause before reading: the proxy's writes fill the
    // socket and wait for it (the unit test in http1::server checks that what a TLS stream
    // holds back is flushed).
    for _ in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let tcp = socket.connect(proxy.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let stream = pki
            .client(&["http/1.1"], BOTH)
            .connect(name, tcp)
            .await
            .unwrap();
        let mut h1 = http1(stream).await;
        let request = Request::get("/").header("host", "localhost");
        let response = h1
            .send_request(request.body(Empty::new()).unwrap())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let body = tokio::time::timeout(Duration::from_secs(20), response.into_body().collect())
            .await
            .expect("the whole body within 20 s")
            .unwrap()
            .to_bytes();
        assert_eq!(body.len(), 8 << 20);
    }
}

/// An upstream answering every request with 8 MiB of `x`, in 64 KiB pieces.
async fn big_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_request| async {
                let chunks = futures_util::stream::iter((0..128).map(|_| {
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b'x'; 65536])))
                }));
                Ok::<_, std::convert::Infallible>(Response::new(StreamBody::new(chunks)))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// The binary, on a config file, killed on drop; its log lines collected.
struct Process {
    child: Child,
    addr: SocketAddr,
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Process {
    fn start(config: &Path) -> Process {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let addr = loop {
            let line = lines.next().expect("the proxy exited").unwrap();
            log.lock().unwrap().push(line.clone());
            if line.contains("canary-proxy started") {
                let rest = line.split("listen=").nth(1).unwrap();
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Process { child, addr, log }
    }

    fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to 5 s for a log line holding every one of `needles`.
    async fn wait_log(&self, needles: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|line| needles.iter().all(|n| line.contains(n)));
            if found {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}: {:#?}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sighup_rereads_certificates_named_relative_to_the_config_on_every_worker() {
    let v1 = upstream("v1").await;
    let pki = Pki::new();
    let first = pki.issue("site", &["localhost"]);
    let path = pki.dir.path().join("canary.toml");
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\n[proxy.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[backend]]\nname = \"v1\"\nurls = [\"{}\"]\nweight = 1\n",
        v1.url()
    );
    std::fs::write(&path, &text).unwrap();
    // Started from elsewhere: the paths are the config's, not the current directory's.
    let proxy = Process::start(&path);
    let client = pki.client(&["h2", "http/1.1"], BOTH);
    // Enough connections that both workers serve some.
    let mut open = Vec::new();
    for _ in 0..8 {
        let stream = connect(&client, proxy.addr, "localhost").await.unwrap();
        assert_eq!(served_certificate(&stream), first);
        let mut h2 = http2(stream).await;
        assert_eq!(get2(&mut h2, "/").await.1, "v1");
        open.push(h2);
    }
    let second = pki.issue("site", &["localhost"]);
    proxy.hangup();
    proxy.wait_log(&["listener certificates re-read"]).await;
    for _ in 0..8 {
        let stream = connect(&client, proxy.addr, "localhost").await.unwrap();
        assert_eq!(served_certificate(&stream), second);
    }
    for h2 in &mut open {
        assert_eq!(get2(h2, "/").await.1, "v1");
    }
    // Turning TLS off takes a restart: the reload says so, and TLS stays on.
    std::fs::write(
        &path,
        text.replace("[proxy.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\n", ""),
    )
    .unwrap();
    proxy.hangup();
    proxy
        .wait_log(&["proxy.tls", "takes effect on restart"])
        .await;
    let stream = connect(&client, proxy.addr, "localhost").await.unwrap();
    assert_eq!(served_certificate(&stream), second);
}
