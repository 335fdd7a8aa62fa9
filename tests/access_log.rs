//! The access log of the `canary-proxy` binary over real TCP: `[log] access = "json"` writes
//! one JSON object per request to stdout (the process log stays on stderr), for HTTP/1.1 and
//! h2c requests, refusals, upstream failures, fault drills and clients that went away; the
//! query string never reaches it; off by default, and a reload turns it on and off.

mod common;

use std::time::{Duration, Instant};

use common::replica::Replica;
use common::*;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The access log of a [`Replica`] (its stdout).
trait AccessLog {
    /// The access log's line of the request with this id, parsed, once it has been written
    /// (a panic after 10 s).
    async fn line(&self, request_id: &str) -> Value;
}

impl AccessLog for Replica {
    async fn line(&self, request_id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<Value> = self
                .stdout()
                .iter()
                .map(|line| parse(line))
                .filter(|entry| entry["request_id"] == request_id)
                .collect();
            match found.as_slice() {
                [entry] => return entry.clone(),
                [] if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => panic!(
                    "{} lines for {request_id}: {:?}",
                    found.len(),
                    self.stdout()
                ),
            }
        }
    }
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"))
}

/// A config file with one backend `v1` (weight 1, where `[[fault]]` aborts requests that
/// carry `x-fault`) and a backend `down` that a rule pins requests with `x-to: down` to, both
/// of whose endpoints refuse connections, and `extra` appended.
async fn write_config(v1: &Upstream, extra: &str) -> (tempfile::TempDir, Vec<String>) {
    let down = [refused_addr().await, refused_addr().await].map(|a| format!("http://{a}"));
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [[backend]]\nname = \"v1\"\nurls = [\"{}\"]\nweight = 1\n\
         [[backend]]\nname = \"down\"\nurls = [\"{}\", \"{}\"]\nweight = 0\n\
         [[rule]]\nheader = \"x-to\"\nequals = \"down\"\nbackend = \"down\"\n\
         [[fault]]\nbackend = \"v1\"\nabort_percent = 100\nabort_status = 503\nheader = \"x-fault\"\n\
         {extra}",
        v1.url(),
        down[0],
        down[1]
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("canary.toml"), text).unwrap();
    (dir, down.to_vec())
}

/// Sends a GET with this request id; the status and the body the client got.
async fn get(
    client: &reqwest::Client,
    url: String,
    id: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<u8>) {
    let mut request = client.get(url).header("x-request-id", id);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

/// What every line says of a request that came from this test (on loopback) and just ended.
fn assert_common(entry: &Value, method: &str, path: &str, protocol: &str) {
    assert_eq!(entry["client"], "127.0.0.1", "{entry}");
    assert_eq!(entry["method"], method, "{entry}");
    assert_eq!(entry["path"], path, "{entry}");
    assert_eq!(entry["protocol"], protocol, "{entry}");
    let duration = entry["duration_ms"].as_f64().unwrap();
    assert!(duration > 0.0 && duration < 30_000.0, "{entry}");
    // RFC 3339, UTC, to the millisecond, within the last minute.
    let time = entry["time"].as_str().unwrap();
    assert!(
        time.len() == 24 && &time[10..11] == "T" && &time[19..20] == "." && time.ends_with('Z'),
        "{entry}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hms = |t: &str| -> u64 {
        let parts: Vec<u64> = t.split(':').map(|p| p.parse().unwrap()).collect();
        parts[0] * 3600 + parts[1] * 60 + parts[2]
    };
    let of_day = hms(&time[11..19]);
    let diff = (now % 86_400 + 86_400 - of_day) % 86_400;
    assert!(diff < 60, "{entry}: {diff} s ago");
}

#[tokio::test]
async fn every_request_gets_one_json_line_on_stdout() {
    let v1 = upstream("v1").await;
    let (dir, down) = write_config(&v1, "[log]\naccess = \"json\"\n").await;
    let proxy = Replica::spawn(&dir.path().join("canary.toml")).await;
    let h1 = client();
    let h2 = h2c_client();

    // HTTP/1.1, routed by weight.
    let (status, body) = get(&h1, proxy.url("/hello"), "t-h1", &[]).await;
    assert_eq!((status, body.as_slice()), (200, &b"v1"[..]));
    let entry = proxy.line("t-h1").await;
    assert_common(&entry, "GET", "/hello", "HTTP/1.1");
    assert_eq!(entry["backend"], "v1", "{entry}");
    assert_eq!(entry["reason"], "weight", "{entry}");
    assert_eq!(entry["endpoint"], v1.url(), "{entry}");
    assert_eq!(entry["status"], 200, "{entry}");
    assert_eq!(entry["bytes"], body.len(), "{entry}");
    assert!(entry["fault"].is_null(), "{entry}");

    // h2c, with a body of a few hundred bytes (the request's headers, dumped).
    let (status, body) = get(&h2, proxy.url("/headers"), "t-h2", &[]).await;
    assert_eq!(status, 200);
    assert!(body.len() > 100, "{}", String::from_utf8_lossy(&body));
    let entry = proxy.line("t-h2").await;
    assert_common(&entry, "GET", "/headers", "HTTP/2");
    assert_eq!(entry["backend"], "v1", "{entry}");
    assert_eq!(entry["reason"], "weight", "{entry}");
    assert_eq!(entry["status"], 200, "{entry}");
    assert_eq!(entry["bytes"], body.len(), "{entry}");

    // A query string carries secrets: only the path is written.
    let secret = "s3cr3t-t0ken";
    let (status, _) = get(
        &h1,
        proxy.url(&format!("/search?token={secret}&q=1")),
        "t-query",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let entry = proxy.line("t-query").await;
    assert_common(&entry, "GET", "/search", "HTTP/1.1");

    // A backend whose upstream is down: tried on both its endpoints, then 502.
    let (status, body) = get(&h1, proxy.url("/"), "t-down", &[("x-to", "down")]).await;
    assert_eq!(status, 502);
    let entry = proxy.line("t-down").await;
    assert_common(&entry, "GET", "/", "HTTP/1.1");
    assert_eq!(entry["backend"], "down", "{entry}");
    assert_eq!(entry["reason"], "rule", "{entry}");
    let endpoint = entry["endpoint"].as_str().unwrap();
    assert!(down.iter().any(|url| url == endpoint), "{entry}");
    assert_eq!(entry["status"], 502, "{entry}");
    assert_eq!(entry["bytes"], body.len(), "{entry}");

    // The same over h2c.
    let (status, body) = get(&h2, proxy.url("/x"), "t-down-h2", &[("x-to", "down")]).await;
    assert_eq!(status, 502);
    let entry = proxy.line("t-down-h2").await;
    assert_common(&entry, "GET", "/x", "HTTP/2");
    assert_eq!(
        (entry["backend"].as_str(), entry["status"].as_u64()),
        (Some("down"), Some(502))
    );
    assert_eq!(entry["bytes"], body.len(), "{entry}");

    // A fault drill answers the request itself: no endpoint.
    let (status, body) = get(&h1, proxy.url("/drill"), "t-fault", &[("x-fault", "1")]).await;
    assert_eq!(status, 503);
    let entry = proxy.line("t-fault").await;
    assert_common(&entry, "GET", "/drill", "HTTP/1.1");
    assert_eq!(entry["backend"], "v1", "{entry}");
    assert_eq!(entry["fault"], "abort", "{entry}");
    assert!(entry["endpoint"].is_null(), "{entry}");
    assert_eq!(entry["status"], 503, "{entry}");
    assert_eq!(entry["bytes"], body.len(), "{entry}");

    // A refusal (two Host fields): backend none, not routed.
    let answer = raw_exchange(
        proxy.addr,
        b"GET /refused HTTP/1.1\r\nHost: a\r\nHost: b\r\nx-request-id: t-refused\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let entry = proxy.line("t-refused").await;
    assert_common(&entry, "GET", "/refused", "HTTP/1.1");
    assert_eq!(entry["backend"], "none", "{entry}");
    assert!(
        entry["reason"].is_null() && entry["endpoint"].is_null(),
        "{entry}"
    );
    assert_eq!(
        (entry["status"].as_u64(), entry["bytes"].as_u64()),
        (Some(400), Some(0))
    );

    // Clients that go away while the upstream takes its time: 499, nothing sent.
    let mut gone = TcpStream::connect(proxy.addr).await.unwrap();
    gone.write_all(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: a\r\nx-request-id: t-gone\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(gone);
    let entry = proxy.line("t-gone").await;
    assert_common(&entry, "GET", "/slow", "HTTP/1.1");
    assert_eq!(entry["backend"], "v1", "{entry}");
    assert_eq!(entry["endpoint"], v1.url(), "{entry}");
    assert_eq!(
        (entry["status"].as_u64(), entry["bytes"].as_u64()),
        (Some(499), Some(0))
    );
    let waited = entry["duration_ms"].as_f64().unwrap();
    assert!((250.0..4000.0).contains(&waited), "{entry}");
    let reset = h2
        .get(proxy.url("/slow?ms=5000"))
        .header("x-request-id", "t-gone-h2")
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(reset.is_err());
    let entry = proxy.line("t-gone-h2").await;
    assert_common(&entry, "GET", "/slow", "HTTP/2");
    assert_eq!(
        (entry["status"].as_u64(), entry["bytes"].as_u64()),
        (Some(499), Some(0))
    );
    assert_eq!(entry["reason"], "weight", "{entry}");

    // One line per request, each a JSON object; the secret nowhere; the process log (text,
    // on stderr) has none of them.
    let ids = [
        "t-h1",
        "t-h2",
        "t-query",
        "t-down",
        "t-down-h2",
        "t-fault",
        "t-refused",
        "t-gone",
        "t-gone-h2",
    ];
    let lines = proxy.stdout();
    let mut logged: Vec<String> = lines
        .iter()
        .map(|line| parse(line)["request_id"].as_str().unwrap().to_owned())
        .collect();
    logged.sort();
    let mut sent = ids.map(String::from).to_vec();
    sent.sort();
    assert_eq!(logged, sent, "{lines:?}");
    assert!(!lines.iter().any(|line| line.contains(secret)), "{lines:?}");
    let stderr = proxy.log();
    assert!(
        !stderr
            .iter()
            .any(|line| line.contains("t-h1") || line.contains(secret))
    );
}

#[tokio::test]
async fn with_the_access_log_off_nothing_is_written_to_stdout() {
    let v1 = upstream("v1").await;
    // Off by default, and written out.
    for extra in ["", "[log]\naccess = \"off\"\n"] {
        let (dir, _) = write_config(&v1, extra).await;
        let proxy = Replica::spawn(&dir.path().join("canary.toml")).await;
        assert_eq!(get(&client(), proxy.url("/"), "a", &[]).await.0, 200);
        assert_eq!(get(&h2c_client(), proxy.url("/"), "b", &[]).await.0, 200);
        let down = get(&client(), proxy.url("/"), "c", &[("x-to", "down")]).await;
        assert_eq!(down.0, 502);
        let answer = raw_exchange(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            Duration::from_secs(2),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        // Give a line that should not be there time to arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(proxy.stdout(), Vec::<String>::new());
        assert!(!proxy.log().is_empty());
    }
}

#[tokio::test]
async fn a_reload_turns_the_access_log_on_and_off() {
    let v1 = upstream("v1").await;
    let (dir, _) = write_config(&v1, "").await;
    let path = dir.path().join("canary.toml");
    let proxy = Replica::spawn(&path).await;
    let base = std::fs::read_to_string(&path).unwrap();
    let reload = |text: String| {
        let admin = proxy.admin_addr;
        let path = path.clone();
        async move {
            std::fs::write(&path, text).unwrap();
            let answer = client()
                .post(format!("http://{admin}/admin/reload"))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
        }
    };
    assert_eq!(get(&client(), proxy.url("/"), "before", &[]).await.0, 200);

    reload(format!("{base}[log]\naccess = \"json\"\n")).await;
    let (status, body) = get(&client(), proxy.url("/on"), "on", &[]).await;
    assert_eq!(status, 200);
    let entry = proxy.line("on").await;
    assert_eq!(
        (entry["path"].as_str(), entry["bytes"].as_u64()),
        (Some("/on"), Some(body.len() as u64))
    );

    // A bad value is refused, naming the key and line; the access log stays on.
    std::fs::write(&path, format!("{base}[log]\naccess = \"yes\"\n")).unwrap();
    let refused = client()
        .post(proxy.admin("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let message = refused.text().await.unwrap();
    let line = base.lines().count() + 2;
    assert!(
        message.contains("log.access") && message.contains(&format!(":{line}: `log.access`")),
        "{message}"
    );
    assert_eq!(get(&client(), proxy.url("/"), "still-on", &[]).await.0, 200);
    proxy.line("still-on").await;

    reload(format!("{base}[log]\naccess = \"off\"\n")).await;
    assert_eq!(get(&client(), proxy.url("/"), "off", &[]).await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logged: Vec<Value> = proxy.stdout().iter().map(|line| parse(line)).collect();
    let ids: Vec<&str> = logged
        .iter()
        .map(|entry| entry["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["on", "still-on"]);
}
