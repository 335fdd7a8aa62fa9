//! A real etcd (Debian's `/usr/bin/etcd`, v3 API) for the tests: one member on free loopback
//! ports with its data in a fresh temporary directory, killed when dropped. `kill` and
//! `restart` simulate an outage and the recovery (same ports, same data); `ctl` runs `etcdctl`
//! against it.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// How long a start (or restart) may take before it is a failure.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// Fresh ports tried when a start finds one taken (another process bound it in between).
const START_ATTEMPTS: usize = 5;
/// Environment variables that etcd and etcdctl read as flags (`ETCD_*`, `ETCDCTL_*`; a flag
/// and its variable both set is an error) or that could send a request elsewhere.
const SCRUBBED_ENV_PREFIXES: [&str; 2] = ["ETCD_", "ETCDCTL_"];
const PROXY_ENV: [&str; 6] = [
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
];

/// One etcd member serving on `127.0.0.1`, killed when dropped. Every method takes `&self`,
/// so an `Arc<Etcd>` can be shared with tasks while the test kills and restarts it.
pub struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Mutex<Option<Child>>,
}

impl Etcd {
    /// Starts etcd in a fresh temporary directory on two free loopback ports and waits until
    /// it answers `/health` (a panic with its log after 20 s). A port taken between being
    /// picked and being bound is retried with new ports.
    pub async fn start() -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("canary-etcd-")
            .tempdir()
            .unwrap();
        let (client_port, peer_port) = free_ports();
        let mut etcd = Etcd {
            dir,
            client_port,
            peer_port,
            child: Mutex::new(None),
        };
        for _ in 1..START_ATTEMPTS {
            match etcd.launch().await {
                Ok(()) => return etcd,
                Err(Failure::PortTaken(_)) => {
                    (etcd.client_port, etcd.peer_port) = free_ports();
                    // The member directory written for the old ports would keep them.
                    let _ = std::fs::remove_dir_all(etcd.dir.path().join("data"));
                }
                Err(Failure::Other(message)) => panic!("{message}"),
            }
        }
        match etcd.launch().await {
            Ok(()) => etcd,
            Err(Failure::PortTaken(tail)) => {
                panic!("etcd found its ports taken {START_ATTEMPTS} times; the last time:\n{tail}")
            }
            Err(Failure::Other(message)) => panic!("{message}"),
        }
    }

    /// `http://127.0.0.1:PORT`, its client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port (the same across `restart`s).
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// Its process id, unless it has been killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    /// Whether its process is running (started, not killed, not exited on its own).
    pub fn is_running(&self) -> bool {
        match self.child.lock().unwrap().as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Kills it with SIGKILL (a crash: nothing is flushed or closed gracefully) and waits
    /// for the process to be gone. The data directory and the ports are kept for `restart`.
    pub fn kill(&self) {
        let taken = self.child.lock().unwrap().take();
        if let Some(mut child) = taken {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports with the same data directory (killing it first if
    /// it still runs), and waits until it is ready. If another process took one of its ports
    /// meanwhile, it retries for a few seconds, then panics.
    pub async fn restart(&self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.launch().await {
                Ok(()) => return,
                Err(Failure::PortTaken(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(Failure::PortTaken(tail)) => panic!(
                    "etcd cannot restart: port {} or {} is taken by another process:\n{tail}",
                    self.client_port, self.peer_port
                ),
                Err(Failure::Other(message)) => panic!("{message}"),
            }
        }
    }

    /// Runs `etcdctl --endpoints=URL --dial-timeout=2s --command-timeout=5s ARGS` (API v3)
    /// and returns its stdout; a panic with its stderr if it fails. Against an etcd that is
    /// down, etcdctl 3.4 waits for the whole command timeout before it fails: pass
    /// `--command-timeout=1s` in `args` (the last one given wins) to fail sooner.
    pub async fn ctl(&self, args: &[&str]) -> String {
        self.ctl_with_input(args, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`Etcd::ctl`], but a failure (etcd down, a compacted revision...) is returned as
    /// `Err(message with stderr)`.
    pub async fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        self.ctl_with_input(args, None).await
    }

    /// Writes `value` at `key` (any bytes of text, any size: the value goes through stdin).
    pub async fn put(&self, key: &str, value: &str) {
        if value.is_empty() {
            self.ctl(&["put", "--", key, ""]).await;
        } else {
            self.ctl_with_input(&["put", "--", key], Some(value))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// The value at `key`, or None if there is none.
    pub async fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", "--print-value-only", "--", key]).await;
        // The value and a newline; nothing at all for a missing key.
        out.strip_suffix('\n').map(str::to_owned)
    }

    /// The key's `mod_revision` (the revision of its last write), or None if there is none.
    pub async fn mod_revision(&self, key: &str) -> Option<i64> {
        let out = self.ctl(&["get", "-w", "json", "--", key]).await;
        let parsed: Value = serde_json::from_str(&out).unwrap();
        parsed["kvs"][0]["mod_revision"].as_i64()
    }

    /// Deletes `key`; whether there was one.
    pub async fn delete(&self, key: &str) -> bool {
        self.ctl(&["del", "--", key]).await.trim() == "1"
    }

    /// The keys under `prefix`, in order.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        // Each key is followed by an empty line.
        self.ctl(&["get", "--prefix", "--keys-only", "--", prefix])
            .await
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Compacts the history up to `revision` and waits until that is applied to the backend
    /// (a watch or a read at an older revision then fails with "compacted").
    pub async fn compact(&self, revision: i64) {
        self.ctl(&["compaction", "--physical", &revision.to_string()])
            .await;
    }

    /// The store's current revision (that of the latest write, 1 when empty).
    pub async fn revision(&self) -> i64 {
        let out = self.ctl(&["endpoint", "status", "-w", "json"]).await;
        let parsed: Value = serde_json::from_str(&out).unwrap();
        parsed[0]["Status"]["header"]["revision"]
            .as_i64()
            .unwrap_or_else(|| panic!("no revision in {out}"))
    }

    /// Its log (etcd writes to stderr; restarts append), for messages on failure.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The directory holding its data (`data/`) and its log (`etcd.log`).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Spawns the process and waits until `/health` says it is ready.
    async fn launch(&self) -> Result<(), Failure> {
        let log_path = self.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        writeln!(
            log,
            "---- harness: starting etcd on client port {}, peer port {}",
            self.client_port, self.peer_port
        )
        .unwrap();
        let skip = log.metadata().unwrap().len();
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new("etcd");
        command
            .arg("--name=canary-test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=canary-test={peer}"))
            .arg("--initial-cluster-state=new")
            // One member never loses an election to a slow heartbeat: a shorter election
            // timeout only makes it ready sooner after a restart (about 0.5 s, not 1.4 s).
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        scrub_env(&mut command);
        die_with_parent(&mut command);
        let child = command.spawn().map_err(|e| {
            Failure::Other(format!(
                "cannot run etcd (apt-get install etcd-server): {e}"
            ))
        })?;
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if healthy(self.client_port) {
                return Ok(());
            }
            let exited = {
                let mut child = self.child.lock().unwrap();
                let status = child.as_mut().map(|c| c.try_wait().unwrap());
                if let Some(Some(_)) = status {
                    *child = None;
                }
                status
            };
            let Some(exited) = exited else {
                return Err(Failure::Other(
                    "etcd was killed while it started".to_owned(),
                ));
            };
            if let Some(status) = exited {
                let since = read_from(&log_path, skip);
                let tail = format!("etcd exited ({status}); its log:\n{}", tail_of(&since, 40));
                return Err(if since.contains("address already in use") {
                    Failure::PortTaken(tail)
                } else {
                    Failure::Other(tail)
                });
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(Failure::Other(format!(
                    "etcd was not ready within {READY_WITHIN:?}; its log:\n{}",
                    tail_of(&read_from(&log_path, skip), 40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn ctl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String, String> {
        let mut command = tokio::process::Command::new("etcdctl");
        command
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=5s")
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        scrub_env(command.as_std_mut());
        command.env("ETCDCTL_API", "3");
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot run etcdctl (apt-get install etcd-client): {e}"))?;
        if let Some(input) = input {
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input.as_bytes()).await.unwrap();
            drop(stdin);
        }
        let output = child.wait_with_output().await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "etcdctl {args:?} failed ({}): {}{stdout}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

enum Failure {
    /// etcd could not bind a port: another process has it.
    PortTaken(String),
    Other(String),
}

/// Two distinct free loopback ports: bound to port 0 together, then released for etcd.
/// Two free ports below the kernel's ephemeral range (`ip_local_port_range`, from 32768 by
/// default), so that while etcd is killed for an outage no outgoing connection (a replica
/// reconnecting, say) takes its port as its own source port and keeps it from restarting.
fn free_ports() -> (u16, u16) {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.saturating_sub(1).max(10_001));
    let mut ports = Vec::with_capacity(2);
    let mut candidate = from + (std::process::id() as u16 ^ rand_seed()) % (to - from);
    for _ in 0..(to - from) {
        candidate = if candidate >= to { from } else { candidate + 1 };
        if !ports.contains(&candidate) && TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
            ports.push(candidate);
            if ports.len() == 2 {
                return (ports[0], ports[1]);
            }
        }
    }
    panic!("no free port from {from} to {to}");
}

/// A little entropy for where the port search starts, so that tests running at once start
/// apart (the nanoseconds of the clock).
fn rand_seed() -> u16 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u16)
}

/// Whether `GET /health` on the client port answers `"health":"true"` (etcd has a leader and
/// serves reads).
fn healthy(port: u16) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") && answer.contains("\"health\":\"true\"")
}

fn scrub_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if SCRUBBED_ENV_PREFIXES.iter().any(|p| name.starts_with(p)) || PROXY_ENV.contains(&name) {
            command.env_remove(name);
        }
    }
}

/// Has the kernel kill the child (SIGKILL) if the test process dies without dropping it (a
/// test run killed on a timeout), so no etcd outlives its test run.
pub(crate) fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only makes one prctl system call,
    // which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}

/// The file's text from byte `offset` on.
fn read_from(path: &std::path::Path, offset: u64) -> String {
    use std::io::Seek;
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.seek(std::io::SeekFrom::Start(offset));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

fn tail_of(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
