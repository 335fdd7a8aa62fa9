//! The `canary-proxy` binary run as a process (a replica), its stdout and stderr read into
//! lines as they come; killed when dropped. And the config file of a replica sharing an etcd.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_canary-proxy");

/// How long a replica may take to say it has started, or to exit after SIGTERM.
const WITHIN: Duration = Duration::from_secs(20);

/// The binary serving a config file, started with `RUST_LOG=info`; killed when dropped.
pub struct Replica {
    child: Mutex<Child>,
    /// Where it serves (the `listen=` of its "canary-proxy started" line).
    pub addr: SocketAddr,
    /// Where its admin API serves (the `admin=` of that line).
    pub admin_addr: SocketAddr,
    /// Its stdout (the access log), line by line.
    pub stdout: Arc<Mutex<Vec<String>>>,
    /// Its stderr (the process log), line by line.
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// Set once its stderr reached the end (the process has exited, every line is read).
    stderr_closed: Arc<AtomicBool>,
    /// Its exit status, once it has been reaped.
    exit: Mutex<Option<ExitStatus>>,
    pid: u32,
}

impl Replica {
    /// Starts the binary on `config_path` (in that file's directory) and waits until it says
    /// it has started (a panic with its log if it exits first or after 20 s).
    pub async fn spawn(config_path: &Path) -> Replica {
        Replica::spawn_with_env(config_path, &[]).await
    }

    /// As [`Replica::spawn`], with more environment variables (`RUST_LOG` can be overridden).
    pub async fn spawn_with_env(config_path: &Path, env: &[(&str, &str)]) -> Replica {
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(config_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A relative path in the config (the store's `snapshot`) means the same whether it is
        // taken from the working directory or from the config file's.
        if let Some(dir) = config_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            command.current_dir(dir);
        }
        super::etcd::die_with_parent(&mut command);
        let mut child = command.spawn().unwrap();
        let (stdout, _) = collect(Box::new(child.stdout.take().unwrap()));
        let (stderr, stderr_closed) = collect(Box::new(child.stderr.take().unwrap()));
        let mut replica = Replica {
            pid: child.id(),
            child: Mutex::new(child),
            addr: ([0, 0, 0, 0], 0).into(),
            admin_addr: ([0, 0, 0, 0], 0).into(),
            stdout,
            stderr,
            stderr_closed,
            exit: Mutex::new(None),
        };
        let started = replica.wait_for_log("canary-proxy started", WITHIN).await;
        let field = |name: &str| -> SocketAddr {
            let rest = started
                .split(&format!("{name}="))
                .nth(1)
                .unwrap_or_else(|| panic!("no {name}= in {started:?}"));
            rest.split_whitespace().next().unwrap().parse().unwrap()
        };
        replica.addr = field("listen");
        replica.admin_addr = field("admin");
        replica
    }

    /// `http://ADDR{path}` on its proxy listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://ADMIN{path}` on its admin listener.
    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its process log (stderr) so far, line by line.
    pub fn log(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Its stdout (the access log) so far, line by line.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// How many log lines there are so far: a mark for [`Replica::wait_for_log_since`].
    pub fn log_mark(&self) -> usize {
        self.stderr.lock().unwrap().len()
    }

    /// The first log line containing `needle`, once there is one; a panic with the whole log
    /// after `timeout`, or as soon as the process has exited without writing it.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_since(0, needle, timeout).await
    }

    /// As [`Replica::wait_for_log`], looking only at the lines from number `mark` on (the
    /// [`Replica::log_mark`] taken before the action that should log).
    pub async fn wait_for_log_since(&self, mark: usize, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            // Whether it had exited is read before the log, so a line written just before
            // the exit is still seen.
            let exited = self.exit_status();
            let found = self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .skip(mark)
                .find(|line| line.contains(needle))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            if let Some(status) = exited {
                // The pipe may still hold the last lines: wait for the reader to reach its end.
                let read_by = Instant::now() + Duration::from_secs(5);
                while !self.stderr_closed.load(Ordering::SeqCst) && Instant::now() < read_by {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let log = self.log();
                if let Some(line) = log.iter().skip(mark).find(|line| line.contains(needle)) {
                    return line.clone();
                }
                panic!(
                    "the replica exited ({status}) without logging {needle:?}; its log:\n{}",
                    log.join("\n")
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "the replica did not log {needle:?} within {timeout:?}; its log:\n{}",
                    self.log().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its exit status, if it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut exit = self.exit.lock().unwrap();
        if exit.is_none() {
            *exit = self.child.lock().unwrap().try_wait().unwrap();
        }
        *exit
    }

    /// Kills it with SIGKILL (a crashed replica: no drain, no goodbye) and waits until it is
    /// gone. Its log stays readable.
    pub fn kill(&self) {
        let mut exit = self.exit.lock().unwrap();
        if exit.is_none() {
            let mut child = self.child.lock().unwrap();
            let _ = child.kill();
            *exit = Some(child.wait().unwrap());
        }
    }

    /// Sends SIGTERM (a graceful stop: it drains) and waits until it has exited; its exit
    /// status. A panic (after SIGKILL) if it is still running after 20 s.
    pub async fn terminate(&self) -> ExitStatus {
        if let Some(status) = self.exit_status() {
            return status;
        }
        let pid = rustix::process::Pid::from_raw(self.pid as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "the replica still ran {WITHIN:?} after SIGTERM; its log:\n{}",
                    self.log().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lines read from `pipe` on a thread of their own (so the process never blocks on it), and
/// a flag set when the pipe has been read to its end.
fn collect(pipe: Box<dyn std::io::Read + Send>) -> (Arc<Mutex<Vec<String>>>, Arc<AtomicBool>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let closed = Arc::new(AtomicBool::new(false));
    let (sink, done) = (lines.clone(), closed.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
        done.store(true, Ordering::SeqCst);
    });
    (lines, closed)
}

/// Writes `dir/canary.toml` for the binary without a store: proxy and admin on
/// `127.0.0.1:0`, one `[[backend]]` per `(name, urls, weight)` (as [`super::config`]), and
/// `extra` (TOML: bare keys land in `[proxy]`; an `[admin]` table in it gets the `listen`
/// line). Returns the file's path.
pub fn proxy_config(dir: &Path, backends: &[(&str, Vec<String>, u32)], extra: &str) -> PathBuf {
    let admin_listen = "listen = \"127.0.0.1:0\"\n";
    let mut tables = String::from(extra);
    if !tables.is_empty() && !tables.ends_with('\n') {
        tables.push('\n');
    }
    let admin = if tables.starts_with("[admin]\n") {
        Some(0)
    } else {
        tables.find("\n[admin]\n").map(|at| at + 1)
    };
    match admin {
        Some(at) => tables.insert_str(at + "[admin]\n".len(), admin_listen),
        None => tables.push_str(&format!("[admin]\n{admin_listen}")),
    }
    let path = dir.join("canary.toml");
    std::fs::write(&path, super::config(backends, &tables)).unwrap();
    path
}

/// Writes `dir/canary.toml` for a replica sharing the etcd at `etcd_endpoint`: as
/// [`proxy_config`], and
///
/// ```toml
/// [store]
/// etcd = ["ETCD_ENDPOINT"]
/// prefix = "PREFIX"
/// snapshot = "canary.snapshot.json"
/// ```
///
/// Give each replica its own `dir` (its snapshot is written there). Returns the file's path.
pub fn replica_config(
    dir: &Path,
    etcd_endpoint: &str,
    prefix: &str,
    backends: &[(&str, Vec<String>, u32)],
    extra: &str,
) -> PathBuf {
    let mut tables = String::from(extra);
    if !tables.is_empty() && !tables.ends_with('\n') {
        tables.push('\n');
    }
    tables.push_str(&format!(
        "[store]\netcd = [\"{etcd_endpoint}\"]\nprefix = \"{prefix}\"\nsnapshot = \"canary.snapshot.json\"\n"
    ));
    proxy_config(dir, backends, &tables)
}
