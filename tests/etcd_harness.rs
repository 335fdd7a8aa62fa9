//! The harness the replica tests stand on, tested against the real things: an etcd started by
//! `common::etcd` keeps what it was given across a crash and a restart on the same port, and
//! compacts its history when told; the `canary-proxy` binary run by `common::replica` serves
//! through to an upstream and is gone when killed, stopped or dropped; the config files are
//! what they say.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::etcd::Etcd;
use common::replica::{Replica, proxy_config, replica_config};
use common::*;

/// Whether anything accepts connections at `addr`.
fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Whether the process `pid` still exists (running or not yet reaped).
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn etcd_addr(etcd: &Etcd) -> SocketAddr {
    ([127, 0, 0, 1], etcd.port()).into()
}

#[tokio::test]
async fn put_and_get_go_through_etcdctl() {
    let etcd = Etcd::start().await;
    assert_eq!(etcd.endpoint(), format!("http://127.0.0.1:{}", etcd.port()));
    let empty = etcd.revision().await;

    etcd.put("/t/doc", "{\"weights\": {\"v1\": 90}}").await;
    assert_eq!(
        etcd.get("/t/doc").await.as_deref(),
        Some("{\"weights\": {\"v1\": 90}}")
    );
    assert_eq!(etcd.get("/t/missing").await, None);
    assert_eq!(etcd.revision().await, empty + 1);
    assert_eq!(etcd.mod_revision("/t/doc").await, Some(empty + 1));
    assert_eq!(etcd.mod_revision("/t/missing").await, None);

    // Values that etcdctl's arguments would mangle: several lines, a leading dash, nothing.
    etcd.put("/t/lines", "a b\n-c\n").await;
    etcd.put("/t/dash", "-5").await;
    etcd.put("/t/empty", "").await;
    assert_eq!(etcd.get("/t/lines").await.as_deref(), Some("a b\n-c\n"));
    assert_eq!(etcd.get("/t/dash").await.as_deref(), Some("-5"));
    assert_eq!(etcd.get("/t/empty").await.as_deref(), Some(""));
    assert_eq!(etcd.revision().await, empty + 4);

    // An overwrite moves the key's mod_revision; the raw command sees the same store.
    etcd.put("/t/doc", "{}").await;
    assert_eq!(etcd.mod_revision("/t/doc").await, Some(empty + 5));
    assert_eq!(
        etcd.ctl(&["get", "/t/doc", "--print-value-only"]).await,
        "{}\n"
    );
    assert_eq!(
        etcd.keys("/t/").await,
        ["/t/dash", "/t/doc", "/t/empty", "/t/lines"]
    );
    assert!(etcd.delete("/t/dash").await);
    assert!(!etcd.delete("/t/dash").await);
    assert_eq!(etcd.get("/t/dash").await, None);

    // A failing command is an error with etcdctl's message.
    let refused = etcd.try_ctl(&["no-such-command"]).await.unwrap_err();
    assert!(refused.contains("no-such-command"), "{refused}");
}

#[tokio::test]
async fn a_killed_etcd_restarts_on_the_same_port_with_its_data() {
    let etcd = Etcd::start().await;
    let (endpoint, addr) = (etcd.endpoint(), etcd_addr(&etcd));
    etcd.put("/t/kept", "before the crash").await;
    let revision = etcd.revision().await;
    let first = etcd.pid().unwrap();

    etcd.kill();
    assert!(!alive(first), "etcd {first} survived SIGKILL");
    assert!(!etcd.is_running());
    assert!(!listening(addr), "{addr} still accepts after the kill");
    let started = std::time::Instant::now();
    let down = etcd
        .try_ctl(&["--command-timeout=1s", "get", "/t/kept"])
        .await
        .unwrap_err();
    assert!(down.contains("deadline exceeded"), "{down}");
    assert!(started.elapsed() < Duration::from_secs(4), "{down}");

    etcd.restart().await;
    assert!(etcd.is_running());
    assert_ne!(etcd.pid(), Some(first));
    assert_eq!(etcd.endpoint(), endpoint);
    assert!(listening(addr));
    assert_eq!(
        etcd.get("/t/kept").await.as_deref(),
        Some("before the crash")
    );
    assert_eq!(etcd.revision().await, revision);
    etcd.put("/t/after", "x").await;
    assert_eq!(etcd.revision().await, revision + 1);

    // A restart of a running etcd is a crash and a recovery too.
    let second = etcd.pid().unwrap();
    etcd.restart().await;
    assert!(!alive(second));
    assert_eq!(etcd.get("/t/after").await.as_deref(), Some("x"));

    // Dropped: its process is gone and nothing answers on its port.
    let last = etcd.pid().unwrap();
    drop(etcd);
    assert!(!alive(last), "etcd {last} survived the drop");
    assert!(!listening(addr));
}

#[tokio::test]
async fn compaction_drops_the_history_before_the_revision() {
    let etcd = Etcd::start().await;
    etcd.put("/t/doc", "v1").await;
    let old = etcd.mod_revision("/t/doc").await.unwrap();
    etcd.put("/t/doc", "v2").await;
    let new = etcd.revision().await;
    assert_eq!(new, old + 1);
    let at_old = etcd
        .ctl(&[
            "get",
            "/t/doc",
            "--print-value-only",
            &format!("--rev={old}"),
        ])
        .await;
    assert_eq!(at_old, "v1\n");

    etcd.compact(new).await;
    let compacted = etcd
        .try_ctl(&["get", "/t/doc", &format!("--rev={old}")])
        .await
        .unwrap_err();
    assert!(compacted.contains("compacted"), "{compacted}");
    // The latest value and the revision are untouched.
    assert_eq!(etcd.get("/t/doc").await.as_deref(), Some("v2"));
    assert_eq!(etcd.revision().await, new);
    // Compacting again at or below that revision is refused.
    let again = etcd
        .try_ctl(&["compaction", &new.to_string()])
        .await
        .unwrap_err();
    assert!(again.contains("compacted"), "{again}");
}

#[tokio::test]
async fn a_replica_without_a_store_serves_then_is_killed() {
    let v1 = upstream("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let path = proxy_config(dir.path(), &[("v1", vec![v1.url()], 1)], "");
    let replica = Replica::spawn(&path).await;
    assert_ne!(replica.addr.port(), 0);
    assert_ne!(replica.admin_addr.port(), 0);
    assert_ne!(replica.addr, replica.admin_addr);

    let response = client().get(replica.url("/hello")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-canary-backend"], "v1");
    assert_eq!(response.text().await.unwrap(), "v1");
    assert_eq!(v1.hits(), 1);
    let ready = client().get(replica.admin("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let started = replica
        .wait_for_log("canary-proxy started", Duration::from_secs(1))
        .await;
    assert!(
        started.contains(&format!("listen={}", replica.addr)),
        "{started}"
    );
    assert!(replica.log().iter().any(|line| line == &started));

    // A crash: SIGKILL, nothing listens any more, the log stays readable.
    let pid = replica.pid();
    replica.kill();
    assert!(!alive(pid), "replica {pid} survived SIGKILL");
    assert_eq!(replica.exit_status().unwrap().signal(), Some(9));
    assert!(!listening(replica.addr) && !listening(replica.admin_addr));
    assert!(client().get(replica.url("/")).send().await.is_err());
    assert_eq!(v1.hits(), 1);
    assert!(!replica.log().is_empty());
}

#[tokio::test]
async fn a_replica_stops_on_sigterm_and_when_dropped() {
    let v1 = upstream("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let path = proxy_config(dir.path(), &[("v1", vec![v1.url()], 1)], "");

    let replica = Replica::spawn(&path).await;
    let mark = replica.log_mark();
    let status = replica.terminate().await;
    assert!(status.success(), "{status}: {:?}", replica.log());
    let said = replica
        .wait_for_log_since(mark, "shutdown signal received", Duration::from_secs(5))
        .await;
    assert!(said.contains("shutdown"), "{said}");
    assert!(!listening(replica.addr));

    // Dropped without a word: gone as well.
    let replica = Replica::spawn(&path).await;
    let (pid, addr) = (replica.pid(), replica.addr);
    assert!(alive(pid) && listening(addr));
    drop(replica);
    assert!(!alive(pid), "replica {pid} survived the drop");
    assert!(!listening(addr));
}

#[tokio::test]
async fn waiting_for_a_line_that_never_comes_fails_with_the_log() {
    let v1 = upstream("v1").await;
    let dir = tempfile::tempdir().unwrap();
    let path = proxy_config(dir.path(), &[("v1", vec![v1.url()], 1)], "");
    let replica = Replica::spawn(&path).await;
    let waited = tokio::spawn(async move {
        replica
            .wait_for_log("no such line", Duration::from_millis(300))
            .await
    })
    .await
    .unwrap_err();
    let message = waited
        .into_panic()
        .downcast::<String>()
        .map(|m| *m)
        .unwrap_or_default();
    assert!(
        message.contains("did not log \"no such line\"")
            && message.contains("canary-proxy started"),
        "{message}"
    );
}

#[tokio::test]
async fn the_config_files_say_what_they_should() {
    let dir = tempfile::tempdir().unwrap();
    let backends = [
        ("v1", vec!["http://127.0.0.1:1".to_owned()], 90),
        ("v2", vec!["http://127.0.0.1:2".to_owned()], 10),
    ];

    // Without a store: the binary's own parser takes it, with both listeners on port 0.
    let plain = proxy_config(dir.path(), &backends, "[admin]\ntoken = \"t0k\"\n");
    assert_eq!(plain, dir.path().join("canary.toml"));
    let parsed = canary_proxy::config::load(&plain).expect("the store-less config parses");
    assert_eq!(parsed.proxy.listen.port(), 0);
    assert_eq!(parsed.admin.listen.port(), 0);
    assert!(parsed.admin.listen.ip().is_loopback());

    // With a store: the table the store is configured by, after everything else.
    let path = replica_config(
        dir.path(),
        "http://127.0.0.1:2379",
        "/canary-proxy/test-files",
        &backends,
        "[log]\naccess = \"json\"",
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let toml: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}:\n{text}"));
    let store = toml["store"].as_table().unwrap();
    assert_eq!(
        store["etcd"].as_array().unwrap(),
        &[toml::Value::from("http://127.0.0.1:2379")]
    );
    assert_eq!(store["prefix"].as_str(), Some("/canary-proxy/test-files"));
    assert_eq!(store["snapshot"].as_str(), Some("canary.snapshot.json"));
    assert_eq!(toml["admin"]["listen"].as_str(), Some("127.0.0.1:0"));
    assert_eq!(toml["proxy"]["listen"].as_str(), Some("127.0.0.1:0"));
    assert_eq!(toml["log"]["access"].as_str(), Some("json"));
    let names: Vec<&str> = toml["backend"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["v1", "v2"]);
    assert_eq!(toml["backend"][0]["weight"].as_integer(), Some(90));
}
