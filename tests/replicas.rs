//! Several replicas sharing one routing table and one rollout through etcd (`[store]`): real
//! `canary-proxy` processes, a real etcd (Debian's 3.4), real upstreams, all on loopback.
//! Each test starts its own etcd, so killing it touches no other test.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::etcd::Etcd;
use common::replica::{Replica, replica_config};
use common::*;

const PREFIX: &str = "/canary-proxy/test";
const TABLE_KEY: &str = "/canary-proxy/test/table";
const WAIT: Duration = Duration::from_secs(20);

/// A replica's own directory (its config and snapshot) and the process serving it.
struct Member {
    _dir: tempfile::TempDir,
    config: PathBuf,
    replica: Replica,
}

impl Member {
    /// Starts a replica of `backends` (with their file weights) sharing `etcd`, with `extra`
    /// TOML, and waits until it has the shared table.
    async fn start(etcd: &Etcd, backends: &[(&str, Vec<String>, u32)], extra: &str) -> Member {
        let dir = tempfile::tempdir().unwrap();
        let config = replica_config(dir.path(), &etcd.endpoint(), PREFIX, backends, extra);
        // Leases of 2 s (the shortest allowed) rather than 10: a killed leader is replaced
        // within the test's patience.
        let text = std::fs::read_to_string(&config).unwrap();
        let text = text.replace(
            "snapshot = \"canary.snapshot.json\"\n",
            "snapshot = \"canary.snapshot.json\"\nlease_ttl = \"2s\"\n",
        );
        assert!(text.contains("lease_ttl"), "{text}");
        std::fs::write(&config, text).unwrap();
        let replica = Replica::spawn(&config).await;
        replica
            .wait_for_log("connected to etcd; watching the shared document", WAIT)
            .await;
        Member {
            _dir: dir,
            config,
            replica,
        }
    }

    /// Starts again from the same directory (its config and snapshot), as a restarted process.
    async fn restart(mut self) -> Member {
        self.replica.terminate().await;
        self.replica = Replica::spawn(&self.config).await;
        self
    }

    async fn weights(&self) -> Value {
        get_json(self.replica.admin("/admin/weight")).await
    }

    async fn etag(&self) -> String {
        let response = client()
            .get(self.replica.admin("/admin/weight"))
            .send()
            .await
            .unwrap();
        response.headers()["etag"].to_str().unwrap().to_owned()
    }

    async fn set_weights(&self, query: &str) -> reqwest::Response {
        client()
            .post(self.replica.admin(&format!("/admin/weight?{query}")))
            .send()
            .await
            .unwrap()
    }

    /// The backend that served a GET / through this replica.
    async fn served_by(&self) -> String {
        let response = client().get(self.replica.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.headers()["x-canary-backend"]
            .to_str()
            .unwrap()
            .to_owned()
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = get_text(self.replica.admin("/metrics")).await;
        metric(&text, name, &[])
    }

    async fn store_status(&self) -> Value {
        get_json(self.replica.admin("/admin/routes")).await["store"].clone()
    }
}

/// A reload of `member` answers 200 and leaves the document's revision where it was.
async fn reload_writes_nothing(etcd: &Etcd, member: &Member) {
    let revision = etcd.mod_revision(TABLE_KEY).await;
    let reload = client()
        .post(member.replica.admin("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    assert_eq!(etcd.mod_revision(TABLE_KEY).await, revision);
}

/// Waits until every member's data plane is served by `backend`.
async fn all_served_by(members: &[Member], backend: &str) {
    for member in members {
        eventually(&format!("all on {backend}"), WAIT, || async {
            member.served_by().await == backend
        })
        .await;
    }
}

async fn get_json(url: String) -> Value {
    serde_json::from_str(&get_text(url).await).unwrap()
}

/// Polls `check` every 20 ms until it holds; a panic naming `what` after `timeout`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < timeout,
            "not within {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

fn backends(
    v1: &Upstream,
    v2: &Upstream,
    weights: (u32, u32),
) -> Vec<(&'static str, Vec<String>, u32)> {
    vec![
        ("v1", vec![v1.url()], weights.0),
        ("v2", vec![v2.url()], weights.1),
    ]
}

/// Three replicas: the first seeds the document from its file (90/10); the other two have
/// other weights in theirs and adopt the shared ones.
async fn three(etcd: &Etcd, v1: &Upstream, v2: &Upstream, extra: &str) -> [Member; 3] {
    let a = Member::start(etcd, &backends(v1, v2, (90, 10)), extra).await;
    let b = Member::start(etcd, &backends(v1, v2, (50, 50)), extra).await;
    let c = Member::start(etcd, &backends(v1, v2, (1, 99)), extra).await;
    [a, b, c]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_on_one_replica_is_served_by_all_three_within_a_second() {
    let etcd = Etcd::start().await;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let [a, b, c] = three(&etcd, &v1, &v2, "").await;
    let seeded = serde_json::json!({"v1": 90, "v2": 10});
    for member in [&a, &b, &c] {
        assert_eq!(member.weights().await, seeded);
        assert_eq!(member.store_status().await["source"], "etcd");
    }
    a.replica
        .wait_for_log("seeded the shared document from this replica's table", WAIT)
        .await;
    assert_eq!(a.etag().await, c.etag().await);

    let written = Instant::now();
    let response = a.set_weights("v1=0&v2=100").await;
    assert_eq!(response.status(), 200);
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["stored_in"], "etcd");
    for member in [&b, &c] {
        eventually("the new weights served", Duration::from_secs(1), || async {
            member.served_by().await == "v2"
        })
        .await;
    }
    assert!(
        written.elapsed() < Duration::from_secs(1),
        "{:?}",
        written.elapsed()
    );
    for member in [&a, &b, &c] {
        for _ in 0..10 {
            assert_eq!(member.served_by().await, "v2");
        }
        assert_eq!(member.etag().await, etag);
        assert_eq!(
            member.weights().await,
            serde_json::json!({"v1": 0, "v2": 100})
        );
    }
    let revision: f64 = etag.trim_matches('"').parse().unwrap();
    assert_eq!(c.metric("canary_store_revision").await, revision);
    assert_eq!(c.metric("canary_store_up").await, 1.0);
    // The document in etcd is what every replica serves.
    let document: Value = serde_json::from_str(&etcd.get(TABLE_KEY).await.unwrap()).unwrap();
    assert_eq!(document["weights"], serde_json::json!({"v1": 0, "v2": 100}));
    assert_eq!(etcd.mod_revision(TABLE_KEY).await, Some(revision as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_with_the_same_etag_exactly_one_wins() {
    let etcd = Etcd::start().await;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let members = three(&etcd, &v1, &v2, "").await;
    for round in 0..3u32 {
        let etag = members[0].etag().await;
        let writes = members.iter().enumerate().map(|(i, member)| {
            let url = member
                .replica
                .admin(&format!("/admin/weight?v2={}", 20 + 10 * i as u32 + round));
            let etag = etag.clone();
            async move {
                let response = client()
                    .post(url)
                    .header("if-match", etag)
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
                (status, body)
            }
        });
        let answers = futures_util::future::join_all(writes).await;
        let won: Vec<&(u16, Value)> = answers.iter().filter(|(s, _)| *s == 200).collect();
        let lost = answers.iter().filter(|(s, _)| *s == 412).count();
        assert_eq!((won.len(), lost), (1, 2), "round {round}: {answers:?}");
        for (_, body) in answers.iter().filter(|(s, _)| *s == 412) {
            // Lost at the compare-and-swap, or, had the winner's document arrived first, at
            // the If-Match check.
            let error = body["error"].as_str().unwrap();
            assert!(
                error.contains("changed the shared table first") || error.contains("If-Match"),
                "{body}"
            );
        }
        let winner = won[0].1["weights"].clone();
        for member in &members {
            eventually("every replica has the winner's weights", WAIT, || async {
                member.weights().await == winner
            })
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_replicas_keep_serving_and_refuse_writes_then_converge() {
    let etcd = Etcd::start().await;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let members = three(&etcd, &v1, &v2, "").await;
    assert_eq!(members[0].set_weights("v1=0&v2=100").await.status(), 200);
    all_served_by(&members, "v2").await;

    etcd.kill();
    for member in &members {
        eventually("etcd seen as down", WAIT, || async {
            member.metric("canary_store_up").await == 0.0
        })
        .await;
    }
    for member in &members {
        for _ in 0..5 {
            assert_eq!(member.served_by().await, "v2");
        }
        let ready = client()
            .get(member.replica.admin("/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200);
        let refused = member.set_weights("v1=100&v2=0").await;
        assert_eq!(refused.status(), 503);
        let body: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("etcd"), "{error}");
        assert_eq!(
            member.weights().await,
            serde_json::json!({"v1": 0, "v2": 100})
        );
        assert_eq!(member.store_status().await["up"], false);
    }
    members[1]
        .replica
        .wait_for_log("lost etcd; the table in force keeps serving", WAIT)
        .await;

    etcd.restart().await;
    // Writes work again once the replica has reconnected (its backoff is at most 5 s).
    eventually("a write through B", Duration::from_secs(30), || async {
        members[1].set_weights("v1=100&v2=0").await.status() == 200
    })
    .await;
    for member in &members {
        eventually(
            "every replica converges",
            Duration::from_secs(30),
            || async {
                member.served_by().await == "v1"
                    && member.weights().await == serde_json::json!({"v1": 100, "v2": 0})
            },
        )
        .await;
        assert_eq!(member.metric("canary_store_up").await, 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_document_is_refused_by_every_replica_and_the_next_write_replaces_it() {
    let etcd = Etcd::start().await;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let members = three(&etcd, &v1, &v2, "").await;
    assert_eq!(members[0].set_weights("v1=0&v2=100").await.status(), 200);
    all_served_by(&members, "v2").await;
    let bad = [
        "not json at all".to_owned(),
        r#"{"format": 1, "weights": {"v1": 100}, "faults": [{"backend": "v9", "abort_percent": 5}]}"#.to_owned(),
        r#"{"format": 1, "weights": {"v1": 0, "v2": 0}}"#.to_owned(),
        r#"{"format": 1, "weights": {"v1": 100}, "rules": [{"header": "x", "matches": "(", "backend": "v1"}]}"#.to_owned(),
    ];
    for (i, document) in bad.iter().enumerate() {
        let marks: Vec<usize> = members.iter().map(|m| m.replica.log_mark()).collect();
        etcd.put(TABLE_KEY, document).await;
        for (member, mark) in members.iter().zip(marks) {
            member
                .replica
                .wait_for_log_since(mark, "the shared document is invalid and was refused", WAIT)
                .await;
            for _ in 0..5 {
                assert_eq!(member.served_by().await, "v2", "document {i}");
            }
            assert_eq!(
                member.metric("canary_store_documents_refused_total").await,
                (i + 1) as f64
            );
        }
    }
    // An admin write compares against the bad document's revision and replaces it.
    assert_eq!(members[2].set_weights("v1=100").await.status(), 200);
    for member in &members {
        eventually("the written table everywhere", WAIT, || async {
            member.weights().await == serde_json::json!({"v1": 100, "v2": 100})
        })
        .await;
    }
    let document: Value = serde_json::from_str(&etcd.get(TABLE_KEY).await.unwrap()).unwrap();
    assert_eq!(document["format"], 1);
    // A deleted document is written back from the table in force.
    assert!(etcd.delete(TABLE_KEY).await);
    let back = eventually("the document written back", WAIT, || async {
        etcd.get(TABLE_KEY).await.is_some()
    })
    .await;
    let document: Value = serde_json::from_str(&etcd.get(TABLE_KEY).await.unwrap()).unwrap();
    assert_eq!(
        document["weights"],
        serde_json::json!({"v1": 100, "v2": 100}),
        "{back:?}"
    );
    for member in &members {
        eventually("every replica at the document's revision", WAIT, || async {
            member.etag().await == format!("\"{}\"", etcd.mod_revision(TABLE_KEY).await.unwrap())
        })
        .await;
    }
    assert_eq!(members[0].set_weights("v2=0").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_while_etcd_is_down_serves_the_snapshot_and_says_so() {
    let etcd = Etcd::start().await;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let a = Member::start(&etcd, &backends(&v1, &v2, (100, 0)), "").await;
    assert_eq!(a.set_weights("v1=0&v2=100").await.status(), 200);
    let etag = a.etag().await;
    etcd.kill();
    let a = a.restart().await;
    a.replica
        .wait_for_log(
            "etcd is unreachable at start: serving the local snapshot",
            WAIT,
        )
        .await;
    let status = a.store_status().await;
    assert_eq!(status["source"], "snapshot", "{status}");
    assert_eq!(status["up"], false);
    assert_eq!(a.served_by().await, "v2");
    assert_eq!(a.etag().await, etag);
    assert_eq!(a.set_weights("v1=1").await.status(), 503);

    etcd.restart().await;
    eventually("back on etcd", Duration::from_secs(30), || async {
        a.store_status().await["source"] == "etcd"
    })
    .await;
    assert_eq!(a.set_weights("v1=1").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_publishes_what_the_file_changed_and_keeps_the_rest() {
    let etcd = Etcd::start().await;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let a = Member::start(&etcd, &backends(&v1, &v2, (100, 0)), "").await;
    let b = Member::start(&etcd, &backends(&v1, &v2, (100, 0)), "").await;
    assert_eq!(a.set_weights("v1=70&v2=30").await.status(), 200);
    // The operator adds a rule to A's file and reloads A: the rule reaches B, the weights
    // set through the API stay (the file's weights did not change).
    let text = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(
        &a.config,
        format!("{text}\n[[rule]]\nheader = \"x-beta\"\nequals = \"yes\"\nbackend = \"v2\"\n"),
    )
    .unwrap();
    let reload = client()
        .post(a.replica.admin("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    eventually("B routes by the published rule", WAIT, || async {
        let response = client()
            .get(b.replica.url("/"))
            .header("x-beta", "yes")
            .send()
            .await
            .unwrap();
        response.headers()["x-canary-backend"] == "v2"
    })
    .await;
    for member in [&a, &b] {
        assert_eq!(
            member.weights().await,
            serde_json::json!({"v1": 70, "v2": 30})
        );
        let routes = get_json(member.replica.admin("/admin/routes")).await;
        assert_eq!(routes["rules"].as_array().unwrap().len(), 1, "{routes}");
    }
    // A reload that changes nothing shared writes nothing.
    reload_writes_nothing(&etcd, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_leader_is_killed_finishes_on_another_replica() {
    let etcd = Etcd::start().await;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let extra = "[rollout]\nbaseline = \"v1\"\ncanary = \"v2\"\nsteps = [50, 100]\n\
                 step_time = \"3s\"\n[rollout.analysis]\ninterval = \"250ms\"\n\
                 min_requests = 20\nlatency_tolerance = 4.0\nerror_tolerance = 0.05\n";
    let members = three(&etcd, &v1, &v2, extra).await;
    let stop = Arc::new(AtomicBool::new(false));
    let urls: Vec<String> = members.iter().map(|m| m.replica.url("/")).collect();
    let mut load = Vec::new();
    for url in urls.iter().cycle().take(12) {
        let (url, stop, c) = (url.clone(), stop.clone(), client());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(response) = c.get(&url).send().await {
                    let _ = response.bytes().await;
                }
            }
        }));
    }
    let leader = async |members: &[&Member]| -> Option<usize> {
        for (i, member) in members.iter().enumerate() {
            if member.store_status().await["leader"] == true {
                return Some(i);
            }
        }
        None
    };
    let all: Vec<&Member> = members.iter().collect();
    eventually("a leader", WAIT, || async { leader(&all).await.is_some() }).await;
    let first = leader(&all).await.unwrap();
    // The operator starts it on a replica that does not lead.
    let follower = (first + 1) % 3;
    let started = client()
        .post(members[follower].replica.admin("/admin/rollout/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 200);
    for member in &members {
        eventually("running at 50% everywhere", WAIT, || async {
            let status = get_json(member.replica.admin("/admin/rollout")).await;
            status["state"] == "running" && status["canary_percent"] == 50
        })
        .await;
    }
    members[first].replica.kill();
    let killed = Instant::now();
    let killed_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let rest: Vec<&Member> = members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != first)
        .map(|(_, m)| m)
        .collect();
    eventually("a new leader", Duration::from_secs(20), || async {
        leader(&rest).await.is_some()
    })
    .await;
    let handover = killed.elapsed();
    for member in &rest {
        eventually("promoted", Duration::from_secs(90), || async {
            let status = get_json(member.replica.admin("/admin/rollout")).await;
            status["state"] == "promoted"
        })
        .await;
        assert_eq!(
            member.weights().await,
            serde_json::json!({"v1": 0, "v2": 100})
        );
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    let new_leader = rest[leader(&rest).await.unwrap_or(0)];
    new_leader
        .replica
        .wait_for_log("this replica leads the rollout now", WAIT)
        .await;
    // Within the lease TTL (2 s) and a tick, with room for a loaded machine.
    assert!(handover < Duration::from_secs(6), "{handover:?}");
    let status = get_json(rest[0].replica.admin("/admin/rollout")).await;
    let events: Vec<&str> = status["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events.last(), Some(&"promoted"), "{events:?}");
    // Promoted by the new leader, after the first one was killed at 50%.
    let promoted_at = status["history"].as_array().unwrap().last().unwrap()["at"]
        .as_u64()
        .unwrap();
    assert!(promoted_at > killed_at_ms, "{status}");
    assert_eq!(
        events.iter().filter(|e| **e == "started").count(),
        1,
        "{events:?}"
    );
}

/// A replica whose watch fell behind a compaction reads the document again. It is made to
/// fall behind for real: stopped (SIGSTOP) while documents are written until etcd counts its
/// watcher as slow (more than the HTTP/2 windows and socket buffers between them hold), then
/// etcd compacts past them and the replica is continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_behind_a_compaction_reads_the_document_again() {
    let etcd = Etcd::start().await;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let a = Member::start(&etcd, &backends(&v1, &v2, (100, 0)), "").await;
    let b = Member::start(&etcd, &backends(&v1, &v2, (100, 0)), "").await;
    let pid = b.replica.pid().to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    // Valid documents, each padded to 4 KiB by its writer's name, v2 at 0 in all but the
    // last; written until etcd counts B's watcher as slow (unsynced: its stream is full),
    // which is what a compaction cancels.
    let gateway = format!("{}/v3/kv/put", etcd.endpoint());
    let base64 = |text: &str| base64_encode(text.as_bytes());
    let padding = "p".repeat(4096);
    let c = client();
    let put = async |weights: (u32, u32)| {
        let document = format!(
            r#"{{"format":1,"weights":{{"v1":{},"v2":{}}},"written_by":"{padding}"}}"#,
            weights.0, weights.1
        );
        let body = serde_json::json!({"key": base64(TABLE_KEY), "value": base64(&document)});
        let response = c
            .post(&gateway)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    };
    let slow_watchers = async || {
        let text = get_text(format!("{}/metrics", etcd.endpoint())).await;
        metric(&text, "etcd_debugging_mvcc_slow_watcher_total", &[])
    };
    let mut written = 0u32;
    while slow_watchers().await < 1.0 {
        assert!(written < 12_000, "B's watcher never fell behind");
        for _ in 0..1000 {
            put((100 + written % 7, 0)).await;
            written += 1;
        }
    }
    put((0, 100)).await;
    let revision = etcd.revision().await;
    etcd.compact(revision).await;
    let mark = b.replica.log_mark();
    signal("-CONT");
    b.replica
        .wait_for_log_since(mark, "the watch lost its history (compaction)", WAIT)
        .await;
    eventually("B serves the last document", WAIT, || async {
        b.served_by().await == "v2"
    })
    .await;
    assert_eq!(b.etag().await, format!("\"{revision}\""));
    eventually(
        "A, which watched all along, serves it too",
        WAIT,
        || async { a.served_by().await == "v2" },
    )
    .await;
}

/// Standard base64 (RFC 4648, with padding), for etcd's JSON gateway.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// etcd comes back empty (its data lost): the replicas write the table in force back, at a
/// revision far below the one they served, and take writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_that_lost_its_data_is_seeded_again_from_the_table_in_force() {
    let etcd = Etcd::start().await;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let a = Member::start(&etcd, &backends(&v1, &v2, (100, 0)), "").await;
    let b = Member::start(&etcd, &backends(&v1, &v2, (100, 0)), "").await;
    for weight in 1..=20 {
        let response = a.set_weights(&format!("v2={weight}")).await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(a.set_weights("v1=0&v2=100").await.status(), 200);
    eventually("B on v2", WAIT, || async { b.served_by().await == "v2" }).await;
    let before: u64 = b.etag().await.trim_matches('"').parse().unwrap();
    etcd.kill();
    std::fs::remove_dir_all(etcd.dir().join("data")).unwrap();
    etcd.restart().await;
    eventually(
        "the document written back",
        Duration::from_secs(30),
        || async { etcd.get(TABLE_KEY).await.is_some() },
    )
    .await;
    let document: Value = serde_json::from_str(&etcd.get(TABLE_KEY).await.unwrap()).unwrap();
    assert_eq!(document["weights"], serde_json::json!({"v1": 0, "v2": 100}));
    let revision = etcd.mod_revision(TABLE_KEY).await.unwrap() as u64;
    assert!(revision < before, "{revision} < {before}");
    for member in [&a, &b] {
        eventually(
            "at the new revision, and writable",
            Duration::from_secs(30),
            || async { member.etag().await == format!("\"{revision}\"") },
        )
        .await;
    }
    assert_eq!(b.set_weights("v1=100&v2=0").await.status(), 200);
    eventually("A follows B's write", WAIT, || async {
        a.served_by().await == "v1"
    })
    .await;
}

/// A rollout's change is one compare-and-swap of its state and its weights: an abort on the
/// leader racing another replica's writes either wins whole (rolled back, canary at 0) or,
/// having lost three times in a row, whole (412, still running at 50%), never half; and the
/// leader goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_change_racing_other_writes_is_all_or_nothing() {
    let etcd = Etcd::start().await;
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    // A rollout that never advances by itself: only the operator's commands move it.
    let extra = "[rollout]\nbaseline = \"v1\"\ncanary = \"v2\"\nsteps = [50, 100]\n\
                 step_time = \"120s\"\n[rollout.analysis]\ninterval = \"250ms\"\n\
                 min_requests = 1000000\n";
    let members = [
        Member::start(&etcd, &backends(&v1, &v2, (100, 0)), extra).await,
        Member::start(&etcd, &backends(&v1, &v2, (100, 0)), extra).await,
    ];
    let leader = async || loop {
        for (i, member) in members.iter().enumerate() {
            if member.store_status().await["leader"] == true {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let leading = tokio::time::timeout(WAIT, leader()).await.unwrap();
    let (l, f) = (&members[leading], &members[1 - leading]);
    let mut lost = 0;
    for attempt in 0..8 {
        let started = client()
            .post(l.replica.admin("/admin/rollout/start"))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), 200, "attempt {attempt}");
        // The other replica writes faults in a tight loop while the operator aborts.
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let (stop, url) = (stop.clone(), f.replica.admin("/admin/faults"));
            tokio::spawn(async move {
                let c = client();
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let body = if i.is_multiple_of(2) {
                        r#"[{"backend":"v1","delay_percent":1,"delay":"1ms"}]"#
                    } else {
                        "[]"
                    };
                    let _ = c.put(&url).body(body).send().await;
                    i += 1;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let abort = client()
            .post(l.replica.admin("/admin/rollout/abort"))
            .send()
            .await
            .unwrap();
        let status = abort.status().as_u16();
        stop.store(true, Ordering::Relaxed);
        flood.await.unwrap();
        let (expected_state, expected_v2) = match status {
            200 => ("rolled_back", 0),
            412 => {
                lost += 1;
                ("running", 50)
            }
            other => panic!("attempt {attempt}: abort answered {other}"),
        };
        for member in &members {
            eventually("the document's state everywhere", WAIT, || async {
                let status = get_json(member.replica.admin("/admin/rollout")).await;
                status["state"] == expected_state && member.weights().await["v2"] == expected_v2
            })
            .await;
        }
        let document: Value = serde_json::from_str(&etcd.get(TABLE_KEY).await.unwrap()).unwrap();
        assert_eq!(document["rollout"]["machine"]["state"], expected_state);
        assert_eq!(document["weights"]["v2"], expected_v2);
        if status == 412 {
            // The operator tries again, and it goes through whole.
            let again = client()
                .post(l.replica.admin("/admin/rollout/abort"))
                .send()
                .await
                .unwrap();
            assert_eq!(again.status(), 200);
            for member in &members {
                eventually("rolled back everywhere", WAIT, || async {
                    get_json(member.replica.admin("/admin/rollout")).await["state"] == "rolled_back"
                        && member.weights().await["v2"] == 0
                })
                .await;
            }
        }
    }
    eprintln!("aborts refused whole after losing three races: {lost} of 8");
}

/// A backend added to one replica's file first: its weight in the document is left alone by
/// the replicas that do not have it yet (their writes keep it, their reloads write nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_added_to_one_replica_first_is_left_alone_by_the_others() {
    let etcd = Etcd::start().await;
    let (v1, v2, v3) = (
        upstream("v1").await,
        upstream("v2").await,
        upstream("v3").await,
    );
    let a = Member::start(&etcd, &backends(&v1, &v2, (100, 0)), "").await;
    let mut with_v3 = backends(&v1, &v2, (100, 0));
    with_v3.push(("v3", vec![v3.url()], 0));
    let b = Member::start(&etcd, &with_v3, "").await;
    assert_eq!(b.set_weights("v1=50&v3=50").await.status(), 200);
    eventually("A takes the rest of the document", WAIT, || async {
        a.weights().await == serde_json::json!({"v1": 50, "v2": 0})
    })
    .await;
    assert_eq!(a.metric("canary_store_documents_refused_total").await, 0.0);
    // A write on A keeps v3's weight in the document.
    assert_eq!(a.set_weights("v2=1").await.status(), 200);
    let document: Value = serde_json::from_str(&etcd.get(TABLE_KEY).await.unwrap()).unwrap();
    assert_eq!(
        document["weights"],
        serde_json::json!({"v1": 50, "v2": 1, "v3": 50})
    );
    // A reload on A that changes nothing shared writes nothing.
    reload_writes_nothing(&etcd, &a).await;
    eventually("B has v3's weight and A's write", WAIT, || async {
        b.weights().await == serde_json::json!({"v1": 50, "v2": 1, "v3": 50})
    })
    .await;
    let served: Vec<String> = futures_util::future::join_all((0..40).map(|_| b.served_by())).await;
    assert!(served.iter().any(|s| s == "v3"), "{served:?}");
}
