//! The `canary-proxy` binary itself: `check` on good and bad configs, a 512 MiB upload streamed
//! through a running proxy with its memory watched, `demo` and `demo --rollout` (a promotion,
//! a rollback with `--bad-canary`, both through a shadow stage with `--shadow`), and
//! `rollout ...` driving a real proxy's rollout.
//!
//! The demos listen on fixed ports (8080-8082, 9901): their tests take [`DEMO_PORTS`] first,
//! so they never run at the same time.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_canary-proxy");

/// Held by every test that runs a demo (fixed ports).
static DEMO_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
fn check_shows_mirroring_and_stops_quietly_when_its_reader_goes_away() {
    let dir = write_config(
        "[[backend]]\nname = \"v1\"\nurls = [\"http://127.0.0.1:1\"]\nweight = 1\n\
         [[backend]]\nname = \"v2\"\nurls = [\"http://127.0.0.1:2\"]\nweight = 0\n\
         [mirror]\nbackend = \"v2\"\npercent = 50\n\
         [rollout]\nbaseline = \"v1\"\ncanary = \"v2\"\nshadow = \"2m\"\n",
    );
    let path = dir.path().join("canary.toml");
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let out = String::from_utf8(output.stdout).unwrap();
    assert!(
        out.contains("mirror: GET, HEAD of 50% of the other backends' requests -> v2"),
        "{out}"
    );
    assert!(
        out.contains("rollout shadow stage: at least 2m before step 1, the canary getting copies only (with [mirror]'s settings); max_diff_rate 0.01"),
        "{out}"
    );
    // As `canary-proxy check | head -1`: the reader closes after the first line.
    let mut child = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let finished = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&finished.stderr);
    assert!(finished.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
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
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/canary.toml"), "{stderr}");
    // The cause is said once, after the message that names the file.
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_first_run_without_canary_toml_says_what_to_do() {
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .current_dir(empty.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(
            "canary-proxy: canary.toml: cannot read config: No such file or directory"
        ),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("--config FILE"), "{stderr}");
    assert!(stderr.contains("canary-proxy demo"), "{stderr}");
}

/// A proxy process, killed on drop.
struct ProxyProcess {
    child: Child,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    /// Every log line so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ProxyProcess {
    fn signal(&self, name: &str) {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{name} {}", self.child.id()))
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (up to 10 s) for the process to exit and returns whether it exited with 0.
    fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the proxy did not exit");
    }

    fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on a config file and reads the addresses it bound from its log.
fn spawn_proxy_at(path: &Path, env: &[(&str, &str)]) -> ProxyProcess {
    let mut command = Command::new(BIN);
    command.arg("--config").arg(path);
    for (k, v) in env {
        command.env(k, v);
    }
    spawn_logged(command)
}

/// Starts the binary on a config file under sh's `ulimit ARGS` (`-n 256`: soft and hard
/// limit on open files; `-Sn 256`: the soft one only). `exec` keeps the process id.
fn spawn_proxy_with_ulimit(path: &Path, args: &str) -> ProxyProcess {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit {args} && exec \"$0\" --config \"$1\""))
        .arg(BIN)
        .arg(path);
    spawn_logged(command)
}

/// Runs `command` (the proxy), logging at info to a pipe, until it says it has started.
fn spawn_logged(mut command: Command) -> ProxyProcess {
    command.env("RUST_LOG", "info").stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let field = |line: &str, name: &str| -> std::net::SocketAddr {
        let rest = line.split(&format!("{name}=")).nth(1).unwrap();
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let (addr, admin) = loop {
        let line = lines
            .next()
            .expect("proxy exited before listening")
            .unwrap();
        log.lock().unwrap().push(line.clone());
        if line.contains("canary-proxy started") {
            break (field(&line, "listen"), field(&line, "admin"));
        }
    };
    // Keep draining the log so the proxy never blocks on a full pipe.
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    ProxyProcess {
        child,
        addr,
        admin,
        log,
    }
}

/// Starts the binary on a config text; its admin listener goes to port 0 as well.
fn spawn_proxy(config: &str) -> (ProxyProcess, tempfile::TempDir) {
    let dir = write_config(config);
    (spawn_proxy_at(&dir.path().join("canary.toml"), &[]), dir)
}

/// A temporary directory with `canary.toml`: the config text, its admin listener on port 0.
fn write_config(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("canary.toml"),
        format!("{config}\n[admin]\nlisten = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    dir
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
    // One worker, so the warm-up below warms the thread that will carry the upload.
    let (proxy, _dir) = spawn_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "request_timeout = \"120s\"\nworkers = 1",
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
    let _ports = DEMO_PORTS.lock().await;
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

#[tokio::test]
async fn weight_changes_survive_a_restart() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let (mut proxy, dir) = spawn_proxy(&config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v2.url()], 10)],
        "",
    ));
    let c = client();
    let set = c
        .post(format!("http://{}/admin/weight?v2=40&v1=60", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    proxy.signal("TERM");
    assert!(proxy.wait_exit());
    let restarted = spawn_proxy_at(&dir.path().join("canary.toml"), &[]);
    let weights = c
        .get(format!("http://{}/admin/weight", restarted.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(weights.text().await.unwrap().trim(), r#"{"v1":60,"v2":40}"#);
}

#[tokio::test]
async fn mirror_status_prints_the_report_as_a_table() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let mut text = config(&[("v1", vec![v1.url()], 1), ("v2", vec![v2.url()], 0)], "");
    text.push_str("\n[mirror]\nbackend = \"v2\"\n");
    let (proxy, _dir) = spawn_proxy(&text);
    let c = client();
    for _ in 0..3 {
        let served = c
            .get(format!("http://{}/", proxy.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(served.text().await.unwrap(), "v1");
    }
    let admin = format!("http://{}", proxy.admin);
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let output = Command::new(BIN)
            .args(["mirror", "status", "--admin", &admin])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let out = String::from_utf8(output.stdout).unwrap();
        if out.contains("compared 3") || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        out.starts_with("mirroring GET, HEAD → v2 (100% of the other backends' requests)"),
        "{out}"
    );
    assert!(
        out.contains("copied 3   compared 3   identical 0   different 3 (100.00%)"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("body ") && l.ends_with("yes")),
        "{out}"
    );
    assert!(out.contains("      served v1\n      copy   v2\n"), "{out}");
    assert_eq!(v2.hits(), 3);
}

#[tokio::test]
async fn a_fault_drill_is_audited_and_ends_with_the_process() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let text = config(
        &[("v1", vec![v1.url()], 90), ("v2", vec![v2.url()], 10)],
        "",
    );
    let (mut proxy, dir) = spawn_proxy(&text);
    let c = client();
    let set = c
        .put(format!("http://{}/admin/faults", proxy.admin))
        .body(r#"[{"backend": "v2", "abort_percent": 20, "header": "x-drill"}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !proxy.log_contains("faults changed") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("faults changed"))
        .cloned()
        .expect("the change is in the log");
    assert!(line.contains("audit"), "{line}");
    assert!(line.contains("old=none"), "{line}");
    assert!(
        line.contains("new=v2: abort 20% (503) if x-drill"),
        "{line}"
    );
    assert!(line.contains("version=2"), "{line}");
    let file = dir.path().join("canary.toml");
    assert!(!std::fs::read_to_string(&file).unwrap().contains("fault"));
    proxy.signal("TERM");
    assert!(proxy.wait_exit());
    let restarted = spawn_proxy_at(&file, &[]);
    let faults = c
        .get(format!("http://{}/admin/faults", restarted.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(
        faults.text().await.unwrap().trim(),
        r#"{"faults":[],"version":1}"#
    );
}

#[tokio::test]
async fn sighup_reloads_a_good_file_and_keeps_the_table_on_a_bad_one() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let text = config(
        &[("v1", vec![v1.url()], 100), ("v2", vec![v2.url()], 0)],
        "",
    );
    let (proxy, dir) = spawn_proxy(&text);
    let path = dir.path().join("canary.toml");
    let c = client();
    let weights = |c: reqwest::Client, admin| async move {
        let r = c
            .get(format!("http://{admin}/admin/weight"))
            .send()
            .await
            .unwrap();
        (
            r.headers()["etag"].to_str().unwrap().to_string(),
            r.text().await.unwrap(),
        )
    };
    std::fs::write(&path, text.replace("weight = 0", "weight = 100")).unwrap();
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while weights(c.clone(), proxy.admin).await.0 != "\"2\"" {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        weights(c.clone(), proxy.admin).await.1.trim(),
        r#"{"v1":100,"v2":100}"#
    );
    std::fs::write(&path, "this is not toml").unwrap();
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !proxy.log_contains("config reload rejected") {
        assert!(
            Instant::now() < deadline,
            "no error logged for the bad file"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        weights(c.clone(), proxy.admin).await,
        ("\"2\"".to_string(), "{\"v1\":100,\"v2\":100}\n".to_string())
    );
    assert_eq!(
        c.get(format!("http://{}/", proxy.addr))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn token_env_is_required_on_admin_calls() {
    let v1 = upstream("v1").await;
    let mut text = config(&[("v1", vec![v1.url()], 1)], "");
    text.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"CANARY_TEST_TOKEN\"\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("canary.toml");
    std::fs::write(&path, &text).unwrap();
    let proxy = spawn_proxy_at(&path, &[("CANARY_TEST_TOKEN", "from-env")]);
    let c = client();
    let url = format!("http://{}/admin/weight", proxy.admin);
    assert_eq!(c.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        c.get(&url)
            .bearer_auth("from-env")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Without the variable set, the proxy refuses to start and says why.
    let output = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .env_remove("CANARY_TEST_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("CANARY_TEST_TOKEN"));
}

/// `--log-format json`, or `[log] format = "json"`: one JSON object per line, the event's
/// fields at the top level, for a log pipeline.
#[test]
fn logs_are_one_json_object_per_line_on_request() {
    let config = "[[backend]]\nname = \"v1\"\nurls = [\"http://127.0.0.1:1\"]\nweight = 1\n";
    for (extra, args) in [
        ("", &["--log-format", "json"][..]),
        ("[log]\nformat = \"json\"\n", &[][..]),
    ] {
        let dir = write_config(&format!("{config}{extra}"));
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(dir.path().join("canary.toml"))
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let started = BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(&line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .find(|event| event["message"] == "canary-proxy started")
            .expect("a start event");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(started["level"], "INFO", "{started}");
        assert!(started["timestamp"].is_string(), "{started}");
        let listen: std::net::SocketAddr = started["listen"].as_str().unwrap().parse().unwrap();
        assert!(listen.ip().is_loopback(), "{started}");
    }
}

#[test]
fn refuses_a_public_admin_listener_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("canary.toml");
    let mut text = config(&[("v1", vec!["http://127.0.0.1:9".to_string()], 1)], "");
    text.push_str("\n[admin]\nlisten = \"0.0.0.0:0\"\n");
    std::fs::write(&path, &text).unwrap();
    let output = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("admin.listen") && stderr.contains("token"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let v1 = upstream("v1").await;
    let (mut proxy, _dir) = spawn_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "shutdown_grace = \"10s\"",
    ));
    let slow = tokio::spawn({
        let url = format!("http://{}/slow?ms=1500", proxy.addr);
        async move { client().get(url).send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are refused while the slow request drains.
    assert!(
        TcpStream::connect(proxy.addr).await.is_err(),
        "still accepting after SIGTERM"
    );
    let response = slow.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "v1");
    let exited_zero = tokio::task::spawn_blocking(move || {
        let ok = proxy.wait_exit();
        (ok, proxy)
    })
    .await
    .unwrap();
    assert!(exited_zero.0, "exit status not 0");
    assert!(signalled.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let v1 = upstream("v1").await;
    let (mut proxy, _dir) = spawn_proxy(&config(
        &[("v1", vec![v1.url()], 1)],
        "shutdown_grace = \"500ms\"",
    ));
    let stuck = tokio::spawn({
        let url = format!("http://{}/slow?ms=20000", proxy.addr);
        async move { client().get(url).send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    proxy.signal("TERM");
    let (exited_zero, _proxy) = tokio::task::spawn_blocking(move || (proxy.wait_exit(), proxy))
        .await
        .unwrap();
    assert!(exited_zero);
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(4), "drain took {took:?}");
    assert!(
        stuck.await.unwrap().is_err(),
        "the stuck request was cut off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_each_serve_on_their_own_thread() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let (proxy, _dir) = spawn_proxy(&config(
        &[("v1", vec![v1.url()], 50), ("v2", vec![v2.url()], 50)],
        "workers = 3",
    ));
    // The workers start right after the "started" log line.
    let threads = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/task", proxy.child.id()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|name| name.trim().to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(0..3).all(|i| threads().contains(&format!("canary-worker-{i}"))) {
        assert!(
            Instant::now() < deadline,
            "worker threads missing: {:?}",
            threads()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Many connections (each client its own), spread by the kernel over the three sockets.
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let url = format!("http://{}/", proxy.addr);
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..10 {
                assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(v1.hits() + v2.hits(), 300);
}

/// `Max open files` of a process: (soft, hard).
fn open_file_limits(pid: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut values = line["Max open files".len()..].split_whitespace();
    (
        values.next().unwrap().to_string(),
        values.next().unwrap().to_string(),
    )
}

#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let (_, hard) = open_file_limits("self");
    if hard.parse::<u64>().is_ok_and(|h| h <= 256) {
        eprintln!("hard limit {hard}: nothing to raise here");
        return;
    }
    let v1 = upstream("v1").await;
    let dir = write_config(&config(&[("v1", vec![v1.url()], 1)], ""));
    let proxy = spawn_proxy_with_ulimit(&dir.path().join("canary.toml"), "-Sn 256");
    let (soft, proxy_hard) = open_file_limits(&proxy.child.id().to_string());
    assert_eq!(proxy_hard, hard);
    assert_eq!(soft, hard, "the soft limit was not raised");
    assert!(proxy.log_contains("open file limit"), "not logged");
}

#[tokio::test]
async fn idle_admin_connections_cannot_starve_the_data_port() {
    let v1 = upstream("v1").await;
    let dir = write_config(&config(&[("v1", vec![v1.url()], 1)], ""));
    // 256 descriptors in all: the proxy must not hand them to idle admin connections.
    let proxy = spawn_proxy_with_ulimit(&dir.path().join("canary.toml"), "-n 256");
    let mut idle = Vec::new();
    for _ in 0..400 {
        // A proxy that stopped accepting fills its backlog; then connects hang.
        match tokio::time::timeout(Duration::from_secs(4), TcpStream::connect(proxy.admin)).await {
            Ok(Ok(stream)) => idle.push(stream),
            Ok(Err(error)) => panic!("connect {}: {error}", idle.len()),
            Err(_) => {
                eprintln!(
                    "the admin port stopped accepting after {} connections",
                    idle.len()
                );
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served = tokio::time::timeout(
        Duration::from_secs(3),
        client().get(format!("http://{}/", proxy.addr)).send(),
    )
    .await
    .expect("the data port did not answer within 3 s")
    .unwrap();
    assert_eq!(served.status(), 200);
    // The admin port answers too: a short 503 while its connections are all taken (once the
    // refusals of the flood above have lingered their second).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let busy = raw_exchange(
        proxy.admin,
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(busy.starts_with("HTTP/1.1 503 "), "{busy}");
    assert!(
        !proxy.log_contains("Too many open files"),
        "the proxy ran out of descriptors"
    );
    drop(idle);
}

/// A `canary-proxy demo ...` process: its stdout and stderr collected by threads; killed on
/// drop.
struct DemoProcess {
    child: Child,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl DemoProcess {
    fn spawn(args: &[&str]) -> DemoProcess {
        let mut child = Command::new(BIN)
            .args(args)
            .env("COLUMNS", "80")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
            let sink = text.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut text = sink.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                }
            });
            text
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        DemoProcess {
            child,
            stdout,
            stderr,
        }
    }

    /// Everything printed so far, once `needle` is among it (or a panic after `within`).
    async fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let out = self.stdout.lock().unwrap().clone();
            if out.contains(needle) {
                return out;
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "no `{needle}` within {within:?} (exit: {exited:?})\nstdout:\n{out}\nstderr:\n{}",
                self.stderr.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then the exit status (within 10 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the demo did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DemoProcess {
    /// SIGTERM first, so a failed test's demo still removes its temporary config; SIGKILL
    /// when it has not exited within 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Who serves `n` requests to the demo's proxy now.
async fn demo_served_by(n: usize) -> Vec<String> {
    let c = client();
    let mut served = Vec::new();
    for _ in 0..n {
        let response = c.get("http://127.0.0.1:8080/").send().await.unwrap();
        served.push(
            response.headers()["x-canary-backend"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    served
}

/// The demo's config file, as its first lines name it.
fn demo_config_path(out: &str) -> std::path::PathBuf {
    let line = out
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("config: "))
        .unwrap();
    std::path::PathBuf::from(line.trim())
}

/// Runs `canary-proxy ARGS` (a `demo --rollout`) until its rollout is over, within `within`:
/// the running demo and what it printed.
async fn run_demo_rollout(args: &[&str], within: Duration) -> (DemoProcess, String) {
    let started = Instant::now();
    let mut demo = DemoProcess::spawn(args);
    let out = demo.wait_for("The rollout is over", within).await;
    eprintln!(
        "{}: over after {:?}\n{out}",
        args.join(" "),
        started.elapsed()
    );
    (demo, out)
}

#[tokio::test]
async fn demo_rollout_promotes_a_healthy_canary_within_a_minute() {
    let _ports = DEMO_PORTS.lock().await;
    let (mut demo, out) = run_demo_rollout(&["demo", "--rollout"], Duration::from_secs(60)).await;
    assert!(out.contains("v2 was promoted"), "{out}");
    // The final frame: all steps done, the promotion marked in words and symbols.
    assert!(
        out.contains("[20%]━━━━━━━━━━[50%]━━━━━━━━━━[100%]"),
        "{out}"
    );
    assert!(
        out.contains("✓ promoted") && out.contains("▲ promoted"),
        "{out}"
    );
    let events: Vec<&str> = ["started", "advanced", "promoted"]
        .into_iter()
        .filter(|e| out.contains(&format!("  {e} ")))
        .collect();
    assert_eq!(events, ["started", "advanced", "promoted"], "{out}");
    assert!(demo_served_by(20).await.iter().all(|b| b == "v2"));
    let config = demo_config_path(&out);
    assert!(config.exists(), "{}", config.display());
    assert!(demo.terminate().success());
    assert!(!config.exists(), "the demo's config was left behind");
    assert!(!config.with_extension("rollout.json").exists());
}

#[tokio::test]
async fn demo_rollout_with_a_bad_canary_rolls_it_back_within_seconds() {
    let _ports = DEMO_PORTS.lock().await;
    let (mut demo, out) = run_demo_rollout(
        &["demo", "--rollout", "--bad-canary"],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        out.contains("v2 on 127.0.0.1:8082 (a fault drill fails 15% of its requests)"),
        "{out}"
    );
    assert!(out.contains("v2 was rolled back"), "{out}");
    assert!(out.contains("the errors verdict failed"), "{out}");
    assert!(
        out.contains("✗ rolled back") && out.contains("✗ fail"),
        "{out}"
    );
    assert!(demo_served_by(20).await.iter().all(|b| b == "v1"));
    assert!(demo.terminate().success());
}

#[tokio::test]
async fn demo_rollout_with_a_shadow_stage_compares_first_then_promotes() {
    let _ports = DEMO_PORTS.lock().await;
    let (mut demo, out) =
        run_demo_rollout(&["demo", "--rollout", "--shadow"], Duration::from_secs(60)).await;
    assert!(out.contains("a shadow stage first (10s)"), "{out}");
    assert!(out.contains("v2 was promoted"), "{out}");
    assert!(
        out.contains("[shadow]━━━━━━━━━━[20%]━━━━━━━━━━[50%]━━━━━━━━━━[100%]"),
        "{out}"
    );
    assert!(out.contains("the shadow stage passed"), "{out}");
    assert!(out.contains("canary-proxy mirror status"), "{out}");
    // Mirroring was the rollout's for the shadow stage only: the file's [mirror] is back
    // (and copies nothing now that v2 serves everything), the admin API's to change again.
    assert!(demo_served_by(20).await.iter().all(|b| b == "v2"));
    let reset = client()
        .post("http://127.0.0.1:9901/admin/mirror/reset")
        .send()
        .await
        .unwrap();
    assert_eq!(reset.status(), 200, "mirroring has no owner any more");
    let mirror = client()
        .get("http://127.0.0.1:9901/admin/mirror")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(mirror.contains("\"backend\":\"v2\""), "{mirror}");
    assert!(demo.terminate().success());
}

#[tokio::test]
async fn demo_rollout_with_a_shadow_stage_and_a_bad_canary_rolls_back_before_users() {
    let _ports = DEMO_PORTS.lock().await;
    let (mut demo, out) = run_demo_rollout(
        &["demo", "--rollout", "--shadow", "--bad-canary"],
        Duration::from_secs(30),
    )
    .await;
    assert!(out.contains("v2 was rolled back"), "{out}");
    assert!(out.contains("failed in the shadow stage"), "{out}");
    assert!(
        out.contains("rolled back in the shadow stage: no user reached canary v2"),
        "{out}"
    );
    assert!(demo_served_by(20).await.iter().all(|b| b == "v1"));
    assert!(demo.terminate().success());
}

#[test]
fn demo_bad_canary_needs_rollout() {
    let output = Command::new(BIN)
        .args(["demo", "--bad-canary"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--rollout"));
}

/// Runs `canary-proxy rollout ARGS` (no token in the environment unless `env` sets one);
/// (exit code, stdout, stderr), within 20 s.
async fn rollout_cli(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("rollout")
        .args(args)
        .env_remove("CANARY_ADMIN_TOKEN")
        .env("COLUMNS", "80")
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .expect("`canary-proxy rollout` did not finish within 20 s")
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A proxy process with a rollout of v1 -> v2 over [20, 50, 100] and no traffic (so it holds
/// its first step), plus `admin` lines in [admin].
async fn spawn_rollout_proxy(
    admin: &str,
    env: &[(&str, &str)],
) -> (ProxyProcess, tempfile::TempDir, String, Upstream, Upstream) {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let mut text = config(
        &[("v1", vec![v1.url()], 100), ("v2", vec![v2.url()], 0)],
        "",
    );
    text.push_str(
        "[rollout]\nbaseline = \"v1\"\ncanary = \"v2\"\nsteps = [20, 50, 100]\nstep_time = \"5s\"\n\
         [rollout.analysis]\ninterval = \"200ms\"\n",
    );
    text.push_str(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{admin}\n"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("canary.toml");
    std::fs::write(&path, text).unwrap();
    let proxy = spawn_proxy_at(&path, env);
    let url = format!("http://{}", proxy.admin);
    (proxy, dir, url, v1, v2)
}

#[tokio::test]
async fn rollout_commands_drive_a_real_proxy_and_exit_1_on_a_conflict() {
    let (proxy, _dir, url, _v1, _v2) = spawn_rollout_proxy("", &[]).await;
    let admin = ["--admin", url.as_str()];

    // `status` is the default; nothing is under way yet.
    let (code, out, err) = rollout_cli(&admin, &[]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("○ idle") && out.contains("not started"),
        "{out}"
    );
    assert!(
        out.contains("[20%]──────────[50%]──────────[100%]"),
        "{out}"
    );

    let (code, out, err) = rollout_cli(&["start", "--admin", &url], &[]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "running, step 1 of 3: canary v2 20%, baseline v1 80%\n"
    );

    let (code, out, err) = rollout_cli(&["status", "--admin", &url], &[]).await;
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        "rollout v1 → v2",
        "▶ running",
        "[20%]──────────[50%]──────────[100%]",
        "▲ now",
        "baseline v1",
        "canary v2",
        "traffic             80%                       20%",
        "p99 interval",
        "? inconclusive",
        "tolerance           +1.00 points              1.25x",
        "started by the operator",
    ] {
        assert!(out.contains(needle), "no `{needle}` in:\n{out}");
    }
    assert!(!out.contains('\x1b'), "colours on a pipe:\n{out}");
    assert!(out.lines().all(|l| l.chars().count() <= 80), "{out}");

    let (code, out, _) = rollout_cli(&["pause", "--admin", &url], &[]).await;
    assert_eq!(code, Some(0));
    assert!(out.starts_with("paused, step 1 of 3"), "{out}");

    // A command that makes no sense now: the error and the state, exit 1.
    let (code, out, err) = rollout_cli(&["--admin", &url, "pause"], &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        err.contains("cannot pause a rollout that is paused"),
        "{err}"
    );
    assert!(out.starts_with("paused, step 1 of 3"), "{out}");

    let (code, out, _) = rollout_cli(&["abort", "--admin", &url], &[]).await;
    assert_eq!(code, Some(0));
    assert_eq!(
        out,
        "rolled back, step 1 of 3: canary v2 0%, baseline v1 100%\n"
    );
    let (code, _, err) = rollout_cli(&["resume", "--admin", &url], &[]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("rolled_back") || err.contains("rolled back"),
        "{err}"
    );

    // The proxy agrees.
    let weights = client()
        .get(format!("http://{}/admin/weight", proxy.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(weights.trim(), r#"{"v1":100,"v2":0}"#);
}

#[tokio::test]
async fn rollout_status_watch_follows_the_rollout_to_its_end() {
    let (_proxy, _dir, url, _v1, _v2) = spawn_rollout_proxy("", &[]).await;
    assert_eq!(
        rollout_cli(&["start", "--admin", &url], &[]).await.0,
        Some(0)
    );
    let mut watch = tokio::process::Command::new(BIN)
        .args(["rollout", "status", "--watch", "--admin", &url])
        .env("COLUMNS", "80")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains("▶ running") {
        let n = tokio::time::timeout(Duration::from_secs(10), stdout.read(&mut chunk))
            .await
            .expect("no first frame within 10 s")
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&chunk[..n]);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), watch.wait())
            .await
            .is_err(),
        "the watch ended while the rollout runs"
    );
    assert_eq!(
        rollout_cli(&["promote", "--admin", &url], &[]).await.0,
        Some(0)
    );
    let status = tokio::time::timeout(Duration::from_secs(10), watch.wait())
        .await
        .expect("the watch did not end with the rollout")
        .unwrap();
    assert!(status.success());
    stdout.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out);
    // On a pipe, a frame per change: running, then the promotion.
    assert_eq!(out.matches("rollout v1 → v2").count(), 2, "{out}");
    assert!(
        out.contains("✓ promoted") && out.contains("promoted by the operator"),
        "{out}"
    );
}

#[tokio::test]
async fn rollout_commands_without_a_rollout_or_a_proxy_say_so() {
    let v1 = upstream("v1").await;
    let (proxy, _dir) = spawn_proxy(&config(&[("v1", vec![v1.url()], 1)], ""));
    let url = format!("http://{}", proxy.admin);
    for args in [vec!["--admin", &url], vec!["start", "--admin", &url]] {
        let (code, out, err) = rollout_cli(&args, &[]).await;
        assert_eq!(code, Some(1), "{args:?}: {out}");
        assert!(err.contains("no rollout is configured"), "{err}");
        assert!(err.contains(&url) && err.contains("404"), "{err}");
    }
    // Nothing listens there any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let closed = format!("http://{closed}");
    let (code, _, err) = rollout_cli(&["--admin", &closed], &[]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("cannot connect to the admin API at {closed}")),
        "{err}"
    );
    assert!(err.contains("is the proxy running?"), "{err}");
    let (code, _, err) = rollout_cli(&["--admin", "https://127.0.0.1:9901"], &[]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("https is not supported"), "{err}");
}

#[tokio::test]
async fn rollout_commands_send_the_token_from_the_flag_or_the_environment() {
    let (_proxy, _dir, url, _v1, _v2) = spawn_rollout_proxy(
        "token_env = \"CANARY_TEST_TOKEN\"",
        &[("CANARY_TEST_TOKEN", "s3cret")],
    )
    .await;
    let (code, _, err) = rollout_cli(&["--admin", &url], &[]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("401") && err.contains("--token"), "{err}");
    assert!(err.contains("CANARY_ADMIN_TOKEN"), "{err}");
    let (code, _, err) = rollout_cli(&["--admin", &url, "--token", "wrong"], &[]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("401") && err.contains("refused"), "{err}");
    let (code, out, err) = rollout_cli(&["--admin", &url, "--token", "s3cret"], &[]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("○ idle"), "{out}");
    let (code, out, err) = rollout_cli(
        &["start", "--admin", &url],
        &[("CANARY_ADMIN_TOKEN", "s3cret")],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("running"), "{out}");
}
