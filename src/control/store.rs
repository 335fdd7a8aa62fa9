//! The replica's side of `[store]`: several proxies share one routing table (and one
//! rollout) through one JSON document in etcd.
//!
//! - **Reading.** A task on a thread of its own connects, reads the document (or, when there
//!   is none, seeds it from this replica's table, only if still absent), applies it, and
//!   watches it from the next revision. Every put it sees is checked whole and swapped in; an
//!   invalid one is refused and logged, the table in force stays. A watch that lost history
//!   (compaction) reads the document again; a deleted document is written back from the
//!   table in force.
//! - **Writing.** Every change of the control plane becomes a compare-and-swap of the whole
//!   document on the revision this replica last applied (the admin `ETag`): a lost race is
//!   412, and the winner's document is applied at once. etcd unreachable: 503, nothing
//!   changes.
//! - **Outages.** The table in force keeps serving; reconnects back off exponentially with
//!   jitter. Each applied document is kept in the local snapshot file, so a start while etcd
//!   is down serves the last one known (and says so in the log and `/admin/routes`).
//! - **Rollout.** With `[rollout]`, the replica keeps a lease, publishes its meters under it
//!   every tick, sums everyone's, and campaigns for the leader key; only the leader runs the
//!   rollout's state machine, and its writes also compare that it still holds the key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use etcd_client::EventType;
use rand::RngExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::runtime::Handle;

use super::document::{Document, TableState};
use super::etcd::{Etcd, StoreError, Stored, Swap};
use super::{ControlError, ControlPlane};
use crate::config::StoreSettings;
use crate::rollout::cluster::ClusterMeter;
use crate::rollout::histogram::LATENCY_BUCKETS;
use crate::rollout::meter::Counts;
use crate::routing::RoutingTable;
use crate::routing::fault::Fault;

/// Where the table in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The config file: etcd has not answered since the start, and there was no snapshot.
    File,
    /// The local snapshot: etcd has not answered since the start.
    Snapshot,
    /// etcd.
    Etcd,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Snapshot => "snapshot",
            Source::Etcd => "etcd",
        }
    }
}

/// The link of one replica to the store; owned by the control plane.
pub struct StoreLink {
    settings: StoreSettings,
    /// This process's name in etcd (the leader key's value, its meters' key): random, so a
    /// restarted replica is a new one.
    replica: String,
    /// The connected client; `None` while etcd is unreachable.
    etcd: Mutex<Option<Etcd>>,
    /// The runtime of the link's thread, where requests from blocking code are run.
    runtime: OnceLock<Handle>,
    /// A leaf lock: what the table in force came from, and its document.
    state: Mutex<LinkState>,
    /// True while this replica holds the leader key (and etcd answers).
    leader: AtomicBool,
    /// Bumped when a document from another replica changed the rollout's state.
    rollout_changes: tokio::sync::watch::Sender<u64>,
    /// Everyone's meters, summed.
    cluster: Mutex<ClusterMeter>,
    /// Snapshots to write, to the writer thread: the disk's fsync stays off the write lock
    /// and the admin API's replies, and a burst is written once (the latest).
    snapshots: Mutex<std::sync::mpsc::Sender<Snapshot>>,
    /// The writer thread, joined when the link stops so the last snapshot is on disk.
    snapshot_writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct LinkState {
    source: Source,
    up: bool,
    /// The last valid document applied or written.
    document: Option<Document>,
    /// The last document seen, valid or refused (`None` after one that is not a document at
    /// all): what a write from here goes over. Its rollout state is the rollout's, and the
    /// weights of backends this replica lacks are kept from it.
    latest: Option<Document>,
}

/// The local snapshot: the last document applied and its revision.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    revision: i64,
    document: Document,
}

impl StoreLink {
    pub fn new(settings: StoreSettings) -> StoreLink {
        let (snapshots, writer) = snapshot_writer(settings.snapshot.clone());
        StoreLink {
            settings,
            replica: {
                let id = crate::id::hex(crate::id::random(&mut rand::rng()));
                String::from_utf8_lossy(&id[..16]).into_owned()
            },
            etcd: Mutex::new(None),
            runtime: OnceLock::new(),
            state: Mutex::new(LinkState {
                source: Source::File,
                up: false,
                document: None,
                latest: None,
            }),
            leader: AtomicBool::new(false),
            rollout_changes: tokio::sync::watch::Sender::new(0),
            cluster: Mutex::new(ClusterMeter::default()),
            snapshots: Mutex::new(snapshots),
            snapshot_writer: Mutex::new(writer),
        }
    }

    /// Lets the snapshot writer finish what is queued, and stops it.
    fn flush_snapshots(&self) {
        let (closed, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(
            &mut *self.snapshots.lock().unwrap_or_else(|e| e.into_inner()),
            closed,
        ));
        let writer = self
            .snapshot_writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// True while this replica leads the rollout and etcd answers.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire) && self.lock_state().up
    }

    /// The rollout's state in the last document applied.
    pub fn rollout_state(&self) -> Option<Value> {
        self.lock_state()
            .latest
            .as_ref()
            .and_then(|d| d.rollout.clone())
    }

    /// Sees a bump when another replica's document changed the rollout's state.
    pub fn subscribe_rollout(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rollout_changes.subscribe()
    }

    /// Everything every replica has counted for `version` (a backend's name).
    pub fn cluster_counts(&self, version: &str) -> Counts {
        self.cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .total(version)
    }

    /// For a reload of `new` over `old`: the config whose table goes in force (the file's,
    /// with the shared state over it, and what the file changed), and whether the shared
    /// document must change (then the reload is a write, refused while etcd is down). Before
    /// any document has been seen, the file is the table.
    pub fn merge_reload(
        &self,
        old: &crate::config::Config,
        new: &crate::config::Config,
    ) -> Result<(crate::config::Config, bool), ControlError> {
        let Some(shared) = self.lock_state().document.clone() else {
            return Ok((new.clone(), false));
        };
        let merged = shared.merged_with_reload(old, new);
        let state = merged
            .check(new)
            .map_err(|e| ControlError::Document(e.to_string()))?;
        let mut in_force = new.clone();
        for (backend, weight) in in_force.backends.iter_mut().zip(&state.weights) {
            backend.weight = *weight;
        }
        in_force.rules = state.rules;
        in_force.faults = state.faults;
        in_force.mirror = state.mirror;
        Ok((in_force, !merged.same_table(&shared)))
    }

    /// The document of `table` with the rollout's `rollout` state, keeping the weights the
    /// shared document gives backends this replica's config does not have (another replica's
    /// file has them already): a write from here does not undo them.
    fn document_of(&self, table: &RoutingTable, rollout: Option<Value>) -> Document {
        let mut document = Document::of(table, rollout, &self.replica);
        if let Some(shared) = &self.lock_state().latest {
            for (name, weight) in &shared.weights {
                if table.backend(name).is_none() {
                    document.weights.insert(name.clone(), *weight);
                }
            }
        }
        document
    }

    /// The link as `/admin/routes` shows it.
    pub fn status(&self) -> Value {
        let state = self.lock_state();
        json!({
            "etcd": self.settings.etcd,
            "prefix": self.settings.prefix,
            "replica": self.replica,
            "up": state.up,
            "source": state.source.as_str(),
            "leader": self.leader.load(Ordering::Acquire) && state.up,
        })
    }

    fn lock_state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn client(&self) -> Option<Etcd> {
        self.etcd.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `request` on the link's runtime and waits for it, from any thread (the control
    /// plane's changes run on blocking threads; this never needs a runtime of the caller's).
    fn call<T, F>(&self, request: impl FnOnce(Etcd) -> F) -> Result<T, ControlError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let (Some(etcd), Some(runtime)) = (self.client(), self.runtime.get()) else {
            return Err(ControlError::StoreUnavailable(
                "etcd is unreachable; reconnecting".to_owned(),
            ));
        };
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        let request = request(etcd);
        runtime.spawn(async move {
            let _ = answer.send(request.await);
        });
        match answered.recv_timeout(self.settings.timeout + Duration::from_secs(1)) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(ControlError::StoreUnavailable(error.to_string())),
            Err(_) => Err(ControlError::StoreUnavailable(
                "the request to etcd did not finish".to_owned(),
            )),
        }
    }

    /// Remembers `document` as the one in force (at `revision`) and, when it came from etcd,
    /// keeps it in the snapshot file. Answers whether the rollout's state changed with it.
    fn remember(&self, document: Document, revision: u64, source: Source) -> bool {
        let snapshot = Snapshot {
            revision: i64::try_from(revision).unwrap_or(i64::MAX),
            document,
        };
        if source == Source::Etcd {
            let sent = self
                .snapshots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(Snapshot {
                    revision: snapshot.revision,
                    document: snapshot.document.clone(),
                });
            if sent.is_err() {
                tracing::warn!("the store snapshot's writer has stopped; snapshots are not kept");
            }
        }
        let mut state = self.lock_state();
        let rollout_changed =
            state.latest.as_ref().map(|d| &d.rollout) != Some(&snapshot.document.rollout);
        state.source = source;
        state.latest = Some(snapshot.document.clone());
        state.document = Some(snapshot.document);
        rollout_changed
    }

    /// Remembers a refused document as the latest seen (`None`: not a document at all), not
    /// as the table's. Answers whether the rollout's state changed with it.
    fn remember_refused(&self, document: Option<Document>, source: Source) -> bool {
        let mut state = self.lock_state();
        let rollout = |d: &Option<Document>| d.as_ref().and_then(|d| d.rollout.clone());
        let rollout_changed = rollout(&state.latest) != rollout(&document);
        // Read from etcd all the same: writes (which replace it) may go there.
        state.source = source;
        state.latest = document;
        rollout_changed
    }

    fn set_up(&self, control: &ControlPlane, up: bool) {
        self.lock_state().up = up;
        control.metrics().store().set_up(up);
        if !up {
            *self.etcd.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    fn set_leader(&self, control: &ControlPlane, leader: bool) {
        let was = self.leader.swap(leader, Ordering::AcqRel);
        if was != leader {
            tracing::info!(replica = %self.replica, leader, "rollout leadership changed");
        }
        control.metrics().store().set_leader(leader);
    }
}

/// Starts the thread that writes snapshots to `path`, atomically, the latest of those queued
/// each time. It ends when the sender is dropped.
fn snapshot_writer(
    path: std::path::PathBuf,
) -> (
    std::sync::mpsc::Sender<Snapshot>,
    Option<std::thread::JoinHandle<()>>,
) {
    let (queue, queued) = std::sync::mpsc::channel::<Snapshot>();
    let spawned = std::thread::Builder::new()
        .name("canary-snapshot".to_owned())
        .spawn(move || {
            while let Ok(mut snapshot) = queued.recv() {
                while let Ok(newer) = queued.try_recv() {
                    snapshot = newer;
                }
                let written = serde_json::to_vec_pretty(&snapshot)
                    .map_err(std::io::Error::other)
                    .and_then(|bytes| super::persist::replace_file(&path, &bytes));
                if let Err(error) = written {
                    tracing::warn!(
                        path = %path.display(),
                        %error,
                        "cannot write the store snapshot; a start while etcd is down will not have this table"
                    );
                }
            }
        });
    match spawned {
        Ok(writer) => (queue, Some(writer)),
        Err(error) => {
            tracing::error!(%error, "cannot start the snapshot writer; snapshots are not kept");
            (queue, None)
        }
    }
}

/// Exponential backoff from 100 ms to 5 s, each pause drawn between half and all of it
/// ("equal jitter"), so replicas that lost etcd together do not come back in step.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session at least this long resets the backoff.
const SESSION_THAT_LASTED: Duration = Duration::from_secs(5);

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    fn pause(&mut self, rng: &mut impl rand::Rng) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let half = ceiling / 2;
        half + half.mul_f64(rng.random::<f64>())
    }
}

impl ControlPlane {
    /// Puts `next` in force in place of `current` (call with `writes` held): with a store,
    /// only once the document of `next` is written at `current`'s revision; `next` then
    /// takes the revision etcd gave it as its version.
    pub(super) fn commit(
        &self,
        current: &RoutingTable,
        next: RoutingTable,
    ) -> Result<u64, ControlError> {
        self.commit_as(current, next, false)
    }

    /// [`commit`](Self::commit); `by_leader`: the rollout's change, which a replica that
    /// leads makes only while it still holds the leader key.
    pub(super) fn commit_as(
        &self,
        current: &RoutingTable,
        mut next: RoutingTable,
        by_leader: bool,
    ) -> Result<u64, ControlError> {
        let Some(link) = self.store_link() else {
            let version = next.version;
            self.table.store(Arc::new(next));
            return Ok(version);
        };
        let document = link.document_of(&next, link.rollout_state());
        let revision = self.swap_document(link, current, &document, by_leader)?;
        next.version = revision;
        self.table.store(Arc::new(next));
        link.remember(document, revision, Source::Etcd);
        self.metrics().store().set_revision(revision);
        Ok(revision)
    }

    /// Writes a change of the rollout into the document in one compare-and-swap: its new
    /// `state`, and the `weights` of its two backends when the change sets them. Refused
    /// when the document's rollout state is no longer `based_on`,
    /// the state the change was decided from (another replica's command or leader came
    /// first), or, `as_leader`, when this replica no longer holds the leader key: both are
    /// [`ControlError::LostRace`].
    pub fn store_rollout(
        &self,
        state: Value,
        weights: &[(String, u32)],
        based_on: Option<&Value>,
        as_leader: bool,
    ) -> Result<u64, ControlError> {
        let Some(link) = self.store_link() else {
            return Ok(self.table.load().version);
        };
        // A race lost to a write that left the rollout's state as it was (another replica's
        // fault drill, say) is tried again on the winner's revision: the rollout's decision
        // does not give way to it.
        let mut attempts = 1;
        loop {
            match self.store_rollout_once(link, state.clone(), weights, based_on, as_leader) {
                Err(ControlError::LostRace { .. })
                    if attempts < 3 && link.rollout_state().as_ref() == based_on =>
                {
                    attempts += 1;
                }
                result => return result,
            }
        }
    }

    fn store_rollout_once(
        &self,
        link: &StoreLink,
        state: Value,
        weights: &[(String, u32)],
        based_on: Option<&Value>,
        as_leader: bool,
    ) -> Result<u64, ControlError> {
        let _write = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.table.load_full();
        if link.rollout_state().as_ref() != based_on {
            return Err(ControlError::LostRace {
                current: current.version,
            });
        }
        let indexed: Vec<(usize, u32)> = weights
            .iter()
            .filter_map(|(name, weight)| {
                let index = current.backends.iter().position(|b| &b.name == name)?;
                Some((index, *weight))
            })
            .collect();
        let mut next = current.with_weights(&indexed, current.version);
        let document = link.document_of(&next, Some(state));
        let revision = self.swap_document(link, &current, &document, as_leader)?;
        next.version = revision;
        if super::weights_of(&current) != super::weights_of(&next) {
            tracing::info!(
                target: "audit",
                version = revision,
                by = "rollout",
                old = %super::describe(&super::weights_of(&current)),
                new = %super::describe(&super::weights_of(&next)),
                "weights changed"
            );
        }
        self.table.store(Arc::new(next));
        link.remember(document, revision, Source::Etcd);
        self.metrics().store().set_revision(revision);
        Ok(revision)
    }

    /// The compare-and-swap of `document` on `current`'s revision. A lost race applies the
    /// winner's document and is [`ControlError::LostRace`].
    fn swap_document(
        &self,
        link: &StoreLink,
        current: &RoutingTable,
        document: &Document,
        as_leader: bool,
    ) -> Result<u64, ControlError> {
        let (source, up) = {
            let state = link.lock_state();
            (state.source, state.up)
        };
        if !up || source != Source::Etcd {
            return Err(ControlError::StoreUnavailable(
                "etcd is unreachable; reconnecting".to_owned(),
            ));
        }
        let revision = i64::try_from(current.version).unwrap_or(i64::MAX);
        let bytes = document.to_bytes();
        let leader = as_leader.then(|| link.replica().to_owned());
        let swapped = link.call(move |mut etcd| async move {
            etcd.replace_table(revision, bytes, leader.as_deref()).await
        })?;
        match swapped {
            Swap::Written(revision) => Ok(u64::try_from(revision).unwrap_or(0)),
            Swap::Lost(winner) => {
                if as_leader && winner.as_ref().is_some_and(|w| w.revision == revision) {
                    tracing::warn!("the rollout's write was refused: this replica no longer leads");
                }
                if let Some(winner) = &winner {
                    self.apply_stored_locked(link, winner, Source::Etcd, true);
                }
                Err(ControlError::LostRace {
                    current: self.table.load().version,
                })
            }
        }
    }

    /// The link to `[store]`, if the proxy has one.
    pub fn store_link(&self) -> Option<&StoreLink> {
        self.store.as_deref()
    }

    /// Applies a document read from etcd (or the snapshot). A watched one is skipped when
    /// its revision is in force already; a `current` one (read afresh, the winner of a race,
    /// the snapshot at start) is the truth whatever its revision, e.g. after etcd lost its
    /// data and the document was seeded again at a low revision.
    fn apply_stored(&self, link: &StoreLink, stored: &Stored, source: Source, current: bool) {
        let _write = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        self.apply_stored_locked(link, stored, source, current);
    }

    /// [`apply_stored`](Self::apply_stored) with `writes` held. An invalid document is
    /// refused and logged; the table in force stays, at the document's revision, so that the
    /// next write (which replaces the document) compares against it.
    fn apply_stored_locked(
        &self,
        link: &StoreLink,
        stored: &Stored,
        source: Source,
        is_current: bool,
    ) {
        let revision = u64::try_from(stored.revision).unwrap_or(0);
        let current = self.table.load_full();
        if revision <= current.version && !is_current {
            return;
        }
        let metrics = self.metrics().store();
        let parsed = Document::parse(&stored.bytes);
        let checked = parsed.clone().and_then(|document| {
            let config = self.lock_config();
            document.check(&config).map(|state| (document, state))
        });
        let (document, state) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                metrics.refused();
                tracing::error!(
                    revision,
                    error = %error,
                    "the shared document is invalid and was refused; the table in force stays \
                     (the next admin write replaces the document)"
                );
                self.table
                    .store(Arc::new(current.with_weights(&[], revision)));
                metrics.set_revision(revision);
                let parsed = parsed.ok();
                let by_other = parsed
                    .as_ref()
                    .is_some_and(|d| d.written_by != link.replica());
                if link.remember_refused(parsed, source) && by_other {
                    link.rollout_changes.send_modify(|n| *n += 1);
                }
                return;
            }
        };
        let same = link
            .lock_state()
            .document
            .as_ref()
            .is_some_and(|d| d.same_table(&document));
        let next = if same {
            current.with_weights(&[], revision)
        } else {
            let next = self.table_with(&current, state, revision);
            tracing::info!(
                target: "audit",
                version = revision,
                by = %document.written_by,
                source = source.as_str(),
                old = %super::describe(&super::weights_of(&current)),
                new = %super::describe(&super::weights_of(&next)),
                faults = %super::describe_faults(&super::faults_of(&next)),
                "routing table replaced by the shared document"
            );
            next
        };
        self.table.store(Arc::new(next));
        metrics.set_revision(revision);
        if document.written_at_ms > 0 {
            let lag = crate::utc::unix_ms().saturating_sub(document.written_at_ms);
            metrics.set_watch_lag(lag as f64 / 1000.0);
        }
        let by_other = document.written_by != link.replica();
        if link.remember(document, revision, source) && by_other {
            link.rollout_changes.send_modify(|n| *n += 1);
        }
    }

    /// `current` with a checked document's state in force, at `version`. Backends keep their
    /// pools and health; mirroring keeps its counts unless it copies other requests now.
    fn table_with(&self, current: &RoutingTable, state: TableState, version: u64) -> RoutingTable {
        let weights: Vec<(usize, u32)> = state.weights.iter().copied().enumerate().collect();
        let faults = current
            .backends
            .iter()
            .map(|backend| {
                let fault = state.faults.iter().find(|f| f.backend == backend.name)?;
                Some(match &backend.fault {
                    Some(kept) if &kept.config == fault => kept.clone(),
                    _ => Arc::new(Fault::new(fault.clone())),
                })
            })
            .collect();
        let mut next = current
            .with_weights(&weights, version)
            .with_faults(faults, version)
            .with_rules(&state.rules, version);
        if current.mirror.as_ref().map(|m| &m.config) != state.mirror.as_ref() {
            let mirror = state.mirror.and_then(|config| {
                let mut carried = current
                    .mirror
                    .as_ref()
                    .map(|m| m.carried())
                    .unwrap_or_default();
                if current.mirror.as_ref().is_some_and(|m| {
                    m.config.backend != config.backend || m.config.from != config.from
                }) {
                    carried.report = Arc::default();
                }
                next.build_mirror(config, carried, self.metrics())
                    .map(Arc::new)
            });
            next = next.with_mirror(mirror, version);
        }
        next
    }
}

/// The link's thread, started.
pub struct Started {
    /// Completes when the first table is in force.
    pub first: tokio::sync::oneshot::Receiver<()>,
    /// Completes when the link has stopped (and let its lease go).
    pub stopped: tokio::sync::oneshot::Receiver<()>,
}

/// Starts the link's thread when the config has `[store]`. Its `first` completes once the
/// first document is in force: from etcd, or, when etcd did not answer within
/// `store.timeout`, from the snapshot or the file.
pub fn start(control: &Arc<ControlPlane>) -> Option<Started> {
    let link = control.store.clone()?;
    let (ready, first) = tokio::sync::oneshot::channel();
    let (done, stopped) = tokio::sync::oneshot::channel();
    let control = control.clone();
    let spawned = std::thread::Builder::new()
        .name("canary-store".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "cannot start the store's runtime");
                    return;
                }
            };
            let _ = link.runtime.set(runtime.handle().clone());
            runtime.block_on(sync(link, control, ready));
            let _ = done.send(());
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the store's thread; the file's table serves");
        return None;
    }
    Some(Started { first, stopped })
}

/// The link's life: connect, read or seed, watch; on any failure, back off and start again.
async fn sync(
    link: Arc<StoreLink>,
    control: Arc<ControlPlane>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let shutdown = control.shutdown_token().clone();
    let mut ready = Some(ready);
    let mut backoff = Backoff::new();
    let mut lease = None;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_rng(&mut rand::rng());
    loop {
        let began = tokio::time::Instant::now();
        let session = session(&link, &control, &mut ready, &mut lease);
        let error = tokio::select! {
            () = shutdown.cancelled() => break,
            Err(error) = session => error,
        };
        // Back off afresh only after a session that lasted: one that fails right after
        // connecting is etcd still in trouble.
        if began.elapsed() > SESSION_THAT_LASTED {
            backoff.reset();
        }
        let was_up = link.lock_state().up;
        link.set_up(&control, false);
        link.set_leader(&control, false);
        if was_up {
            tracing::warn!(
                error = %error,
                "lost etcd; the table in force keeps serving, admin writes get 503 until it is back"
            );
        } else {
            tracing::debug!(error = %error, "etcd still unreachable");
        }
        if let Some(ready) = ready.take() {
            let (cold_link, cold_control) = (link.clone(), control.clone());
            let _ =
                tokio::task::spawn_blocking(move || cold_start(&cold_link, &cold_control, &error))
                    .await;
            let _ = ready.send(());
        }
        let pause = backoff.pause(&mut rng);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
        }
    }
    // A replica stopping lets its lease go, so its meters and, if it led, the leader key go
    // with it at once rather than at the end of the TTL.
    if let (Some(mut etcd), Some(id)) = (link.client(), lease) {
        let me = link.replica().to_owned();
        let _ = etcd.resign(&me).await;
        let _ = etcd.revoke(id).await;
    }
    link.set_up(&control, false);
    link.set_leader(&control, false);
    let flushing = link.clone();
    let _ = tokio::task::spawn_blocking(move || flushing.flush_snapshots()).await;
}

/// One connection's worth of work; returns only with the error that ended it.
async fn session(
    link: &Arc<StoreLink>,
    control: &Arc<ControlPlane>,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
    lease: &mut Option<i64>,
) -> Result<std::convert::Infallible, StoreError> {
    let mut etcd = Etcd::connect(&link.settings).await?;
    *link.etcd.lock().unwrap_or_else(|e| e.into_inner()) = Some(etcd.clone());
    link.set_up(control, true);
    let revision = adopt_or_seed(link, control, &mut etcd).await?;
    tracing::info!(
        revision,
        replica = %link.replica(),
        prefix = %link.settings.prefix,
        "connected to etcd; watching the shared document"
    );
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    let mut watch = etcd.watch_table(revision + 1).await?;
    let mut ticker = tokio::time::interval(tick_period(link, &control.config()));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            message = watch.message() => {
                let Some(response) = message? else {
                    return Err(StoreError("the watch ended".to_owned()));
                };
                if response.compact_revision() > 0 || response.canceled() {
                    tracing::warn!(
                        compact_revision = response.compact_revision(),
                        reason = response.cancel_reason(),
                        "the watch lost its history (compaction); reading the document again"
                    );
                    // A pause, in case compactions follow each other closely.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let revision = adopt_or_seed(link, control, &mut etcd).await?;
                    watch = etcd.watch_table(revision + 1).await?;
                    continue;
                }
                // One key: of a batch of events only the last one matters (a burst of
                // writes is applied once, not once each).
                if let Some(event) = response.events().last() {
                    match (event.event_type(), event.kv()) {
                        (EventType::Put, Some(kv)) => {
                            let stored = Stored {
                                revision: kv.mod_revision(),
                                bytes: kv.value().to_vec(),
                            };
                            apply_off_thread(link, control, stored, false).await;
                        }
                        (EventType::Delete, _) => {
                            tracing::warn!(
                                "the shared document was deleted; writing the table in force back"
                            );
                            adopt_or_seed(link, control, &mut etcd).await?;
                        }
                        (EventType::Put, None) => {}
                    }
                }
            }
            _ = ticker.tick() => {
                // The config as it is now (a reload may have changed the interval, or added
                // or removed [rollout]), read once for the beat and the next period.
                let config = control.config();
                heartbeat(link, control, &config, &mut etcd, lease).await?;
                let period = tick_period(link, &config);
                if period != ticker.period() {
                    ticker = tokio::time::interval(period);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    ticker.reset();
                }
            }
        }
    }
}

/// Applies `stored` on a blocking thread, in order (the caller waits). Never on the link's
/// own thread: applying takes the control plane's write lock, whose holder may be waiting
/// for an etcd request that this thread's runtime carries.
async fn apply_off_thread(
    link: &Arc<StoreLink>,
    control: &Arc<ControlPlane>,
    stored: Stored,
    is_current: bool,
) {
    let (link, control) = (link.clone(), control.clone());
    let applied = tokio::task::spawn_blocking(move || {
        control.apply_stored(&link, &stored, Source::Etcd, is_current)
    })
    .await;
    if let Err(error) = applied {
        tracing::error!(%error, "applying the shared document failed");
    }
}

/// Reads the document and applies it, or seeds it from the table in force when there is
/// none (only if still absent: of replicas starting together, one seeds, the others adopt).
/// Answers the revision in force.
async fn adopt_or_seed(
    link: &Arc<StoreLink>,
    control: &Arc<ControlPlane>,
    etcd: &mut Etcd,
) -> Result<i64, StoreError> {
    let stored = match etcd.read_table().await? {
        Some(stored) => stored,
        None => {
            let table = control.table().load_full();
            let document = link.document_of(&table, link.rollout_state());
            match etcd.create_table(document.to_bytes()).await? {
                Swap::Written(revision) => {
                    tracing::info!(
                        target: "audit",
                        revision,
                        "seeded the shared document from this replica's table"
                    );
                    Stored {
                        revision,
                        bytes: document.to_bytes(),
                    }
                }
                Swap::Lost(Some(stored)) => stored,
                Swap::Lost(None) => return Err(StoreError("the document vanished".to_owned())),
            }
        }
    };
    let revision = stored.revision;
    apply_off_thread(link, control, stored, true).await;
    Ok(revision)
}

/// How often the lease is renewed and the meters published: every analysis interval, and
/// at least three times per lease TTL.
fn tick_period(link: &StoreLink, config: &crate::config::Config) -> Duration {
    let interval = config
        .rollout
        .as_ref()
        .map_or(Duration::from_secs(1), |r| r.analysis.interval);
    interval.min(link.settings.lease_ttl / 3)
}

/// With a rollout configured: renews the lease, campaigns for the leader key, publishes this
/// replica's meters and sums everyone's.
async fn heartbeat(
    link: &StoreLink,
    control: &ControlPlane,
    config: &crate::config::Config,
    etcd: &mut Etcd,
    lease: &mut Option<i64>,
) -> Result<(), StoreError> {
    let Some(rollout) = &config.rollout else {
        link.set_leader(control, false);
        return Ok(());
    };
    let id = match *lease {
        Some(id) if etcd.keep_alive(id).await? => id,
        _ => {
            let ttl = i64::try_from(link.settings.lease_ttl.as_secs()).unwrap_or(10);
            let id = etcd.grant_lease(ttl).await?;
            *lease = Some(id);
            id
        }
    };
    let table = control.table().load();
    let mine: HashMap<&str, Counts> = [rollout.baseline, rollout.canary]
        .iter()
        .filter_map(|&i| {
            let name = config.backends.get(i)?.name.as_str();
            Some((name, table.backend(name)?.meter.as_ref()?.counts()))
        })
        .collect();
    let bytes = serde_json::to_vec(&mine).unwrap_or_default();
    etcd.publish_meters(link.replica(), bytes, id).await?;
    let published = etcd.read_meters().await?;
    let readings: Vec<(String, HashMap<String, Counts>)> = published
        .into_iter()
        .filter_map(|(replica, bytes)| Some((replica, serde_json::from_slice(&bytes).ok()?)))
        .collect();
    link.cluster
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .observe(readings.iter().flat_map(|(replica, versions)| {
            versions
                .iter()
                .filter(|(_, counts)| counts.latency.len() == LATENCY_BUCKETS)
                .map(move |(version, counts)| (replica.as_str(), version.as_str(), counts))
        }));
    // Campaigned for after the meters are summed: a replica that has just started and
    // leads at once has everyone's counts so far as its starting point, not as one interval.
    let holder = etcd.campaign(link.replica(), id).await?;
    link.set_leader(control, holder.as_deref() == Some(link.replica()));
    Ok(())
}

/// etcd did not answer at start: serve the snapshot if there is one, else the file.
fn cold_start(link: &StoreLink, control: &ControlPlane, error: &StoreError) {
    let path = &link.settings.snapshot;
    let snapshot = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<Snapshot>(&bytes).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match snapshot {
        Ok(snapshot) => {
            let stored = Stored {
                revision: snapshot.revision,
                bytes: snapshot.document.to_bytes(),
            };
            control.apply_stored(link, &stored, Source::Snapshot, true);
            tracing::warn!(
                error = %error,
                revision = snapshot.revision,
                path = %path.display(),
                "etcd is unreachable at start: serving the local snapshot of the shared table; \
                 admin writes get 503 until etcd answers"
            );
        }
        Err(reason) => tracing::warn!(
            error = %error,
            path = %path.display(),
            snapshot = %reason,
            "etcd is unreachable at start and there is no usable snapshot: serving the config \
             file's table; admin writes get 503 until etcd answers"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_to_its_ceiling_with_jitter_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new();
        let pauses: Vec<Duration> = (0..10).map(|_| backoff.pause(&mut rng)).collect();
        let mut ceiling = BACKOFF_FIRST;
        for pause in &pauses {
            assert!(
                *pause >= ceiling / 2 && *pause <= ceiling,
                "{pause:?} for {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(BACKOFF_MAX);
        }
        assert!(pauses[9] >= BACKOFF_MAX / 2);
        // Jitter: pauses drawn for the same ceiling differ.
        assert_ne!(pauses[8], pauses[9]);
        backoff.reset();
        assert!(backoff.pause(&mut rng) <= BACKOFF_FIRST);
    }
}
