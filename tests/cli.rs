//! The `canary-proxy` binary itself: `check` on good and bad configs, a 512 MiB upload streamed
//! through a running proxy with its memory watched, and `demo`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_canary-proxy");

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn check_accepts_a_good_config_and_prints_the_table() {
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(fixtures().join("good.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("v1") && stdout.contains("v2"), "{stdout}");
    assert!(stdout.contains("buckets [0,"), "{stdout}");
    assert!(stdout.contains("rules"), "{stdout}");
}

#[test]
fn check_accepts_the_bundled_demo_config() {
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("canary.toml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_names_file_key_and_line_for_every_bad_config() {
    let mut checked = 0;
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("bad_") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{name} has no `# expect:` line"));
        let (key, line) = expect.rsplit_once(" line ").unwrap();
        let output = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains(&name),
            "{name}: the file is not named: {stderr}"
        );
        assert!(
            stderr.contains(&format!(":{line}:")),
            "{name}: line {line} not named: {stderr}"
        );
        assert!(
            stderr.contains(key.trim()),
            "{name}: key {key} not named: {stderr}"
        );
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} bad fixtures");
}

#[test]
fn check_fails_on_a_missing_file() {
    let output = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/canary.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/canary.toml"));
}

/// A proxy process, killed on drop.
struct ProxyProcess {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on a config and reads the address it bound from its log.
fn spawn_proxy(config: &str) -> (ProxyProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("canary.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("proxy exited before listening")
            .unwrap();
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // Keep draining the log so the proxy never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (ProxyProcess { child, addr }, dir)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_512_mib_upload_streams_through_with_flat_memory() {
    const SIZE: u64 = 512 * 1024 * 1024;
    let v1 = upstream("v1").await;
    let (proxy, _dir) = spawn_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "request_timeout = \"120s\"",
    ));
    // Warm up (pools, buffers, runtime threads), then take the baseline.
    let warm = client()
        .post(format!("http://{}/upload", proxy.addr))
        .body(vec![1u8; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(warm.text().await.unwrap(), format!("received {}", 1 << 20));
    let pid = proxy.child.id();
    let baseline = rss_kib(pid, "VmRSS:");

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: {SIZE}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut peak = baseline;
    let mut sent = 0u64;
    while sent < SIZE {
        stream.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
        if sent.is_multiple_of(16 * 1024 * 1024) {
            peak = peak.max(rss_kib(pid, "VmRSS:"));
        }
    }
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains(&format!("received {SIZE}")) {
        let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed early: {}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"));
    let peak = peak.max(rss_kib(pid, "VmHWM:"));
    let growth_mib = (peak.saturating_sub(baseline)) as f64 / 1024.0;
    eprintln!(
        "512 MiB upload in {:?}: baseline RSS {} KiB, peak {} KiB, growth {growth_mib:.1} MiB",
        started.elapsed(),
        baseline,
        peak
    );
    assert!(growth_mib < 8.0, "RSS grew by {growth_mib:.1} MiB");
}

#[tokio::test]
async fn demo_answers_on_8080_with_both_versions() {
    let mut child = Command::new(BIN)
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        match c.get("http://127.0.0.1:8080/").send().await {
            Ok(response) => break response,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("demo did not answer on :8080: {e}"),
        }
    };
    assert_eq!(first.status(), 200);
    let pinned = c
        .get("http://127.0.0.1:8080/")
        .header("x-canary", "always")
        .send()
        .await
        .unwrap();
    assert_eq!(pinned.headers()["x-canary-backend"], "v2");
    assert!(pinned.text().await.unwrap().contains("v2"));
    let mut seen_v1 = false;
    for _ in 0..50 {
        let r = c.get("http://127.0.0.1:8080/").send().await.unwrap();
        seen_v1 |= r.headers()["x-canary-backend"] == "v1";
    }
    assert!(seen_v1);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exited with {status}");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.contains("curl"), "demo prints what to curl: {out}");
}
