//! The control plane: every change to the routing table (weights, faults, reloads) goes
//! through here.
//!
//! A change is serialized with the others, checked whole, built as a new table and swapped in
//! with one store, so a request sees either the old table or the new one. Each change bumps the
//! version (the admin API's `ETag`), can be made conditional on the version the operator last
//! saw (`If-Match`), and is logged with its old and new values (target `audit`).
//!
//! With `[store]` ([`store`]), the version is the etcd revision of the document replicas
//! share, and a change is put in force only once its document is written there by
//! compare-and-swap; changes other replicas write arrive through the store's watch.

pub mod document;
mod etcd;
pub mod fault_json;
pub mod health;
pub mod mirror_json;
pub mod persist;
pub mod rollout;
pub mod store;
mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::chain::Chain;
use crate::config::{self, Config, ConfigError, FaultConfig, MAX_WEIGHT, MirrorConfig, TokenError};
use crate::metrics::Metrics;
use crate::routing::fault::Fault;
use crate::routing::{RoutingTable, SharedTable};
use crate::tls::ListenerTls;
use health::HealthSupervisor;
use persist::PersistError;

/// Why a change was refused; the table is untouched.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "If-Match names no current version: the table is at version {current}; re-read and retry"
    )]
    Stale { current: u64 },
    #[error("unknown backend {0:?}")]
    UnknownBackend(String),
    #[error("weight of {backend:?} must be an integer from 0 to {MAX_WEIGHT}, got {value}")]
    InvalidWeight { backend: String, value: String },
    #[error("all weights would be 0; at least one backend must keep a weight above 0")]
    AllZero,
    #[error("no weights given")]
    NoWeights,
    #[error("malformed JSON body: {0}")]
    MalformedJson(String),
    #[error("the proxy was started without a config file, so there is nothing to reload")]
    NoConfigFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(
        "the admin API listens on {listen} until a restart, and this file sets no admin token: \
         applying it would open that listener to anyone; keep `token` or `token_env`"
    )]
    WouldOpenAdmin { listen: SocketAddr },
    #[error("the change stopped before it completed; read the table to see its state")]
    Interrupted(#[source] tokio::task::JoinError),
    #[error("faults[{index}].{field}: {message}")]
    InvalidFault {
        index: usize,
        field: &'static str,
        message: String,
    },
    #[error("backend {0:?} is given two faults; one fault per backend")]
    RepeatedFault(String),
    #[error("mirror.{field}: {message}")]
    InvalidMirror {
        field: &'static str,
        message: String,
    },
    /// The weights of these backends are driven by something else (the progressive rollout).
    #[error("the weight of {backend:?} is set by {owner}; use its commands instead")]
    Owned { backend: String, owner: String },
    /// `[store]`: another replica's write (or the rollout's) changed the shared document
    /// first; nothing changed here.
    #[error(
        "another write changed the shared table first (it is now at version {current}); \
         re-read and retry"
    )]
    LostRace { current: u64 },
    /// `[store]`: the shared document does not fit the reloaded file.
    #[error("the reloaded file does not fit the shared document: {0}")]
    Document(String),
    /// `[store]`: etcd cannot take the write now; nothing changed.
    #[error(
        "the shared table in etcd cannot be changed now ({0}); the table in force keeps \
         serving; retry when etcd is back"
    )]
    StoreUnavailable(String),
    /// Mirroring is driven by something else (the rollout's shadow stage).
    #[error("mirroring is set by {owner}; it gives it back when its shadow stage ends")]
    MirrorOwned { owner: String },
}

/// Backends whose weights only their owner (the rollout) may set, and who that is, for the
/// message of a refused write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightOwner {
    pub backends: Vec<String>,
    /// Says who, e.g. "the rollout (running)".
    pub owner: String,
}

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("proxy.tls: cannot set TLS up")]
    Tls(#[source] rustls::Error),
}

/// The result of a weight change.
#[derive(Debug)]
pub struct WeightsApplied {
    pub version: u64,
    /// Every backend's weight after the change, in declaration order.
    pub weights: Vec<(String, u32)>,
    /// Whether the change was written back to the config file (`None` when there is none,
    /// or with a store).
    pub persisted: Option<Result<(), PersistError>>,
    /// True when the change is in the shared document in etcd (`[store]`), which keeps it
    /// across restarts in place of the file.
    pub shared: bool,
}

/// The faults in force after a change.
#[derive(Debug)]
pub struct FaultsApplied {
    pub version: u64,
    pub faults: Vec<FaultConfig>,
}

/// Owns the shared routing table and everything that changes it.
pub struct ControlPlane {
    table: SharedTable,
    config_path: Option<PathBuf>,
    metrics: Arc<Metrics>,
    health: HealthSupervisor,
    /// The admin bearer token; replaced by a reload.
    token: RwLock<Option<String>>,
    /// `admin.allowed_hosts`: names the admin API answers to besides IP literals and
    /// `localhost`; replaced by a reload.
    allowed_hosts: RwLock<Arc<[String]>>,
    /// The address the admin listener is bound to: `admin.listen` of the config the proxy
    /// started with, then the listener's own address once it serves. A reload cannot move
    /// the listener, so this (not the new file's `admin.listen`) decides whether a token is
    /// required.
    admin_bound: Mutex<SocketAddr>,
    /// The config the current table came from, to warn about changes a reload cannot apply.
    config: Mutex<Config>,
    /// TLS on the client listener (`proxy.tls` as the proxy started); a reload replaces its
    /// certificates.
    tls: Option<ListenerTls>,
    /// Serializes read-modify-write changes so none is lost.
    writes: Mutex<()>,
    /// Backends whose weights admin writes may not touch (409). A leaf lock: taken briefly,
    /// never while waiting for another.
    weight_owner: Mutex<Option<WeightOwner>>,
    /// Who drives mirroring, when admin writes may not touch it (409). A leaf lock.
    mirror_owner: Mutex<Option<String>>,
    /// Bumped after every successful reload, for whoever follows the config (the rollout).
    reloads: tokio::sync::watch::Sender<u64>,
    /// `[store]`: the link to etcd through which replicas share the table; `None` without.
    store: Option<Arc<store::StoreLink>>,
    shutdown: CancellationToken,
}

impl ControlPlane {
    /// Builds the first table (version 1) from a validated config. `config_path` is where
    /// reloads read from and weight changes are written back to.
    pub fn new(config: Config, config_path: Option<PathBuf>) -> Result<Arc<Self>, StartError> {
        let token = config.admin.resolve_token()?;
        let metrics = Arc::new(Metrics::new());
        let table = RoutingTable::from_config(&config, 1, None, &metrics);
        let tls = config
            .proxy
            .tls
            .as_ref()
            .map(ListenerTls::new)
            .transpose()
            .map_err(StartError::Tls)?;
        warn_about_unverified_tls(&config);
        let shutdown = CancellationToken::new();
        let store = config
            .store
            .clone()
            .map(|settings| Arc::new(store::StoreLink::new(settings)));
        if store.is_some() {
            // Exported from the start: 0 until etcd answers.
            metrics.store().set_up(false);
            metrics.store().set_leader(false);
        }
        let control = ControlPlane {
            table: Arc::new(ArcSwap::from_pointee(table)),
            config_path,
            metrics,
            health: HealthSupervisor::new(shutdown.child_token()),
            token: RwLock::new(token),
            allowed_hosts: RwLock::new(config.admin.allowed_hosts.clone().into()),
            admin_bound: Mutex::new(config.admin.listen),
            config: Mutex::new(config),
            tls,
            writes: Mutex::new(()),
            weight_owner: Mutex::new(None),
            mirror_owner: Mutex::new(None),
            reloads: tokio::sync::watch::Sender::new(0),
            store,
            shutdown,
        };
        control.health.sync(&control.table.load());
        Ok(Arc::new(control))
    }

    /// The config file the proxy reads on reload, if it was started from one.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config_path.as_deref()
    }

    pub fn table(&self) -> &SharedTable {
        &self.table
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn health(&self) -> &HealthSupervisor {
        &self.health
    }

    /// TLS on the client listener, when `proxy.tls` was set at start.
    pub fn listener_tls(&self) -> Option<&ListenerTls> {
        self.tls.as_ref()
    }

    /// Cancelled when the proxy shuts down; background tasks watch it.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The settings the proxy was started with (listeners, timeouts of the server).
    pub fn config(&self) -> Config {
        self.lock_config().clone()
    }

    /// Records where the admin listener is bound (the admin server calls it when it starts).
    pub fn admin_listening_on(&self, addr: SocketAddr) {
        *self.admin_bound.lock().unwrap_or_else(|e| e.into_inner()) = addr;
    }

    /// `admin.allowed_hosts` as currently configured.
    pub fn allowed_hosts(&self) -> Arc<[String]> {
        self.allowed_hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True when `presented` matches the admin token, or when no token is configured.
    pub fn authorized(&self, presented: Option<&[u8]>) -> bool {
        let token = self.token.read().unwrap_or_else(|e| e.into_inner());
        match (token.as_deref(), presented) {
            (None, _) => true,
            (Some(expected), Some(presented)) => constant_time_eq(expected.as_bytes(), presented),
            (Some(_), None) => false,
        }
    }

    /// Runs a change (`set_weights`, `reload`) on tokio's blocking pool and waits for it.
    /// Changes read, write and sync the config file; on the runtime that serves the admin API
    /// and runs the health checks (one thread in the binary) that would stall them all while
    /// the disk is slow. The changes stay serialized by the control plane's own lock, and the
    /// result comes back once the change is applied, so a reply sent after it is never ahead of
    /// the table.
    pub async fn run_blocking<T: Send + 'static>(
        self: &Arc<Self>,
        change: impl FnOnce(&ControlPlane) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let control = self.clone();
        tokio::task::spawn_blocking(move || change(&control))
            .await
            .map_err(ControlError::Interrupted)?
    }

    /// Hands the weights of some backends to an owner (the rollout), or gives them back
    /// (`None`): while owned, [`set_weights`](Self::set_weights) refuses to touch them.
    pub fn set_weight_owner(&self, owner: Option<WeightOwner>) {
        *self.weight_owner.lock().unwrap_or_else(|e| e.into_inner()) = owner;
    }

    /// A receiver that sees the table version after each successful reload.
    pub fn subscribe_reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Sets the weights of the named backends (others keep theirs) and writes them back to
    /// the config file; refused for backends another party owns ([`WeightOwner`]). Blocks on
    /// file I/O: from async code, call it through [`run_blocking`](Self::run_blocking).
    pub fn set_weights(
        &self,
        changes: &[(String, u32)],
        if_match: Option<&[u64]>,
    ) -> Result<WeightsApplied, ControlError> {
        retrying_lost_races(if_match, || self.change_weights(changes, if_match, false))
    }

    /// [`set_weights`](Self::set_weights) for the owner of the weights (the rollout): the same
    /// versioned, audited, persisted change, not refused for owned backends.
    pub fn set_owned_weights(
        &self,
        changes: &[(String, u32)],
        by: &str,
    ) -> Result<WeightsApplied, ControlError> {
        let applied = self.change_weights(changes, None, true)?;
        tracing::info!(target: "audit", by, version = applied.version, "weights set by their owner");
        Ok(applied)
    }

    fn change_weights(
        &self,
        changes: &[(String, u32)],
        if_match: Option<&[u64]>,
        as_owner: bool,
    ) -> Result<WeightsApplied, ControlError> {
        if changes.is_empty() {
            return Err(ControlError::NoWeights);
        }
        let _write = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        if !as_owner {
            let owner = self.weight_owner.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(owner) = owner.as_ref()
                && let Some((name, _)) = changes.iter().find(|(n, _)| owner.backends.contains(n))
            {
                return Err(ControlError::Owned {
                    backend: name.clone(),
                    owner: owner.owner.clone(),
                });
            }
        }
        let current = self.table.load_full();
        check_version(if_match, current.version)?;
        let mut indexed = Vec::with_capacity(changes.len());
        for (name, weight) in changes {
            let index = current
                .backends
                .iter()
                .position(|b| &b.name == name)
                .ok_or_else(|| ControlError::UnknownBackend(name.clone()))?;
            if *weight > MAX_WEIGHT {
                return Err(ControlError::InvalidWeight {
                    backend: name.clone(),
                    value: weight.to_string(),
                });
            }
            indexed.push((index, *weight));
        }
        let next = current.with_weights(&indexed, current.version + 1);
        if next.backends.iter().all(|b| b.weight == 0) {
            return Err(ControlError::AllZero);
        }
        let weights = weights_of(&next);
        let version = self.commit_as(&current, next, as_owner)?;
        tracing::info!(
            target: "audit",
            version,
            old = %describe(&weights_of(&current)),
            new = %describe(&weights),
            "weights changed"
        );
        // With a store, the shared document (and its snapshot) keeps the weights, not the
        // file.
        let file = self.config_path.as_ref().filter(|_| self.store.is_none());
        let persisted = file.map(|path| {
            let all: Vec<(&str, u32)> = weights.iter().map(|(n, w)| (n.as_str(), *w)).collect();
            let result = persist::write_weights(path, &all);
            if let Err(error) = &result {
                tracing::error!(
                    error = %Chain(error),
                    "weight change applied but not written to the config file"
                );
            }
            result
        });
        Ok(WeightsApplied {
            version,
            weights,
            persisted,
            shared: self.store.is_some(),
        })
    }

    /// Puts `faults` in force in place of those in force now (an empty list removes them
    /// all): versioned and audited like a weight change, not written to the config file, so a
    /// drill ends with the process (or a reload, which applies the file's `[[fault]]`).
    pub fn set_faults(
        &self,
        faults: Vec<FaultConfig>,
        if_match: Option<&[u64]>,
    ) -> Result<FaultsApplied, ControlError> {
        retrying_lost_races(if_match, || {
            let _write = self.writes.lock().unwrap_or_else(|e| e.into_inner());
            let current = self.table.load_full();
            check_version(if_match, current.version)?;
            self.replace_faults(&current, faults.clone())
        })
    }

    /// Removes the fault of `backend`, or every fault (`None`); like
    /// [`set_faults`](Self::set_faults).
    pub fn clear_faults(
        &self,
        backend: Option<&str>,
        if_match: Option<&[u64]>,
    ) -> Result<FaultsApplied, ControlError> {
        retrying_lost_races(if_match, || self.clear_faults_once(backend, if_match))
    }

    fn clear_faults_once(
        &self,
        backend: Option<&str>,
        if_match: Option<&[u64]>,
    ) -> Result<FaultsApplied, ControlError> {
        let _write = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.table.load_full();
        check_version(if_match, current.version)?;
        if let Some(name) = backend
            && current.backend(name).is_none()
        {
            return Err(ControlError::UnknownBackend(name.to_owned()));
        }
        let faults = faults_of(&current);
        let kept: Vec<FaultConfig> = faults
            .iter()
            .filter(|f| backend.is_some_and(|name| f.backend != name))
            .cloned()
            .collect();
        if kept.len() == faults.len() {
            // Nothing to remove: no change, no new version.
            return Ok(FaultsApplied {
                version: current.version,
                faults,
            });
        }
        self.replace_faults(&current, kept)
    }

    fn replace_faults(
        &self,
        current: &RoutingTable,
        faults: Vec<FaultConfig>,
    ) -> Result<FaultsApplied, ControlError> {
        let mut by_backend: Vec<Option<Arc<Fault>>> = vec![None; current.backends.len()];
        for fault in faults {
            let index = current
                .backends
                .iter()
                .position(|b| b.name == fault.backend)
                .ok_or_else(|| ControlError::UnknownBackend(fault.backend.clone()))?;
            if by_backend[index].is_some() {
                return Err(ControlError::RepeatedFault(fault.backend));
            }
            by_backend[index] = Some(Arc::new(Fault::new(fault)));
        }
        let next = current.with_faults(by_backend, current.version + 1);
        let faults = faults_of(&next);
        let version = self.commit(current, next)?;
        tracing::info!(
            target: "audit",
            version,
            old = %describe_faults(&faults_of(current)),
            new = %describe_faults(&faults),
            "faults changed"
        );
        Ok(FaultsApplied { version, faults })
    }

    /// Who drives mirroring now, if anyone but the admin API.
    pub fn mirror_owner(&self) -> Option<String> {
        self.mirror_owner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records who owns mirroring without changing the table (a replica following the
    /// rollout's leader through the shared document, which sets the mirroring itself).
    pub fn mark_mirror_owner(&self, owner: Option<String>) {
        self.set_mirror_owner(owner);
    }

    fn set_mirror_owner(&self, owner: Option<String>) {
        *self.mirror_owner.lock().unwrap_or_else(|e| e.into_inner()) = owner;
    }

    /// Hands mirroring to `owner` (e.g. "the rollout's shadow stage") and puts `config` in
    /// force, in one write: no admin write lands between the two, and admin writes get 409
    /// from then on. Nothing changes when `config` is in force already.
    pub fn own_mirror(&self, owner: &str, config: MirrorConfig) -> Result<(), ControlError> {
        let _write = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.table.load_full();
        if !current.mirror.as_ref().is_some_and(|m| m.config == config) {
            // Counts and noise learned copying other requests say nothing about these
            // copies: the owner judges its own from the start.
            let fresh = current
                .mirror
                .as_ref()
                .is_some_and(|m| m.config.from != config.from);
            self.store_mirror(&current, Some(config), owner, fresh, true)?;
        }
        self.set_mirror_owner(Some(owner.to_owned()));
        Ok(())
    }

    /// Clears mirroring's counts (`POST /admin/mirror/reset`): 409 while mirroring has an
    /// owner, which judges them; `None` when mirroring is off. Under the write lock, so an
    /// owner cannot take mirroring over between the check and the reset.
    pub fn reset_mirror_counts(&self) -> Result<Option<Arc<RoutingTable>>, ControlError> {
        let _write = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        self.check_mirror_not_owned()?;
        let table = self.table.load_full();
        let Some(mirror) = &table.mirror else {
            return Ok(None);
        };
        mirror.report.reset();
        tracing::info!(target: "audit", "mirror counts reset");
        Ok(Some(table))
    }

    /// Gives mirroring back, if it has an owner, and puts the config file's in force, in one
    /// write.
    pub fn release_mirror(&self) -> Result<(), ControlError> {
        let _write = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(owner) = self.mirror_owner() else {
            return Ok(());
        };
        let config = self.lock_config().mirror.clone();
        let current = self.table.load_full();
        if current.mirror.as_ref().map(|m| &m.config) != config.as_ref() {
            // The owner stays until its mirroring is gone, so that a refused write (with a
            // store: a lost race) is tried again.
            self.store_mirror(&current, config, &owner, false, true)?;
        }
        self.set_mirror_owner(None);
        Ok(())
    }

    /// Puts mirroring as `config` says in force (`None`: stops it): versioned and audited, not
    /// written to the config file, as faults are. Its counts, and the count of copies still
    /// running, go on from the mirroring it replaces. Refused (409) while mirroring has an
    /// owner.
    pub fn set_mirror(
        &self,
        config: Option<MirrorConfig>,
        if_match: Option<&[u64]>,
    ) -> Result<u64, ControlError> {
        retrying_lost_races(if_match, || self.change_mirror(config.clone(), if_match))
    }

    fn change_mirror(
        &self,
        config: Option<MirrorConfig>,
        if_match: Option<&[u64]>,
    ) -> Result<u64, ControlError> {
        let _write = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        self.check_mirror_not_owned()?;
        let current = self.table.load_full();
        check_version(if_match, current.version)?;
        self.store_mirror(&current, config, "admin", false, false)
    }

    /// 409 while mirroring has an owner.
    pub fn check_mirror_not_owned(&self) -> Result<(), ControlError> {
        match self.mirror_owner() {
            Some(owner) => Err(ControlError::MirrorOwned { owner }),
            None => Ok(()),
        }
    }

    /// Puts mirroring as `config` says in force over `current` (call with `writes` held). Its
    /// counts go on from the mirroring it replaces, unless `fresh_counts` or the copies go to
    /// another backend now.
    fn store_mirror(
        &self,
        current: &RoutingTable,
        config: Option<MirrorConfig>,
        by: &str,
        fresh_counts: bool,
        by_rollout: bool,
    ) -> Result<u64, ControlError> {
        let mirror = match config {
            None => None,
            Some(config) => {
                let unknown = [Some(&config.backend), config.from.as_ref()]
                    .into_iter()
                    .flatten()
                    .find(|name| current.backend(name).is_none())
                    .cloned();
                if let Some(name) = unknown {
                    return Err(ControlError::UnknownBackend(name));
                }
                let backend = config.backend.clone();
                let mut carried = current
                    .mirror
                    .as_ref()
                    .map(|m| m.carried())
                    .unwrap_or_default();
                if fresh_counts
                    || current
                        .mirror
                        .as_ref()
                        .is_some_and(|m| m.config.backend != config.backend)
                {
                    carried.report = Arc::default();
                }
                let mirror = current
                    .build_mirror(config, carried, &self.metrics)
                    .ok_or(ControlError::UnknownBackend(backend))?;
                Some(Arc::new(mirror))
            }
        };
        let next = current.with_mirror(mirror, current.version + 1);
        let describe = |t: &RoutingTable| {
            t.mirror.as_ref().map_or("off".to_owned(), |m| {
                format!(
                    "{}% of {:?} to {}",
                    m.config.percent, m.config.methods, m.config.backend
                )
            })
        };
        let (old, new) = (describe(current), describe(&next));
        // The rollout's mirroring, with a store, only while this replica leads it.
        let version = self.commit_as(current, next, by_rollout)?;
        tracing::info!(
            target: "audit",
            version,
            by,
            old = %old,
            new = %new,
            "mirroring changed"
        );
        Ok(version)
    }

    /// Re-reads the config file and applies it whole, or leaves everything as it was. Blocks
    /// on file I/O: from async code, call it through [`run_blocking`](Self::run_blocking).
    /// Backends whose connection settings are unchanged keep their pools and health state.
    /// `if_match`: the versions the caller accepts (`None`: any).
    ///
    /// `canary_config_reloads_total` counts attempts to apply a file: a refused precondition
    /// or a proxy without a config file is not one, an unreadable or invalid file is.
    pub fn reload(&self, if_match: Option<&[u64]>) -> Result<u64, ControlError> {
        let result = self.try_reload(if_match);
        match &result {
            Ok(_) => self.metrics.config_reload(true),
            Err(ControlError::Stale { .. } | ControlError::NoConfigFile) => {}
            Err(_) => self.metrics.config_reload(false),
        }
        match &result {
            Ok(version) => {
                tracing::info!(target: "audit", version, "config reloaded");
                self.reloads.send_replace(*version);
            }
            Err(error) => {
                tracing::error!(
                    error = %Chain(error),
                    "config reload rejected; the old table keeps serving"
                )
            }
        }
        result
    }

    fn try_reload(&self, if_match: Option<&[u64]>) -> Result<u64, ControlError> {
        let path = self
            .config_path
            .as_ref()
            .ok_or(ControlError::NoConfigFile)?;
        let _write = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.table.load_full();
        check_version(if_match, current.version)?;
        let config = config::load(path)?;
        let token = config.admin.resolve_token()?;
        // A reload can never weaken access: the listener stays where it was bound.
        let listen = *self.admin_bound.lock().unwrap_or_else(|e| e.into_inner());
        if token.is_none() && !listen.ip().is_loopback() {
            return Err(ControlError::WouldOpenAdmin { listen });
        }
        // With a store, the shared document's state stays in force, but for what the file
        // changes: that is published to every replica.
        let (in_force, publish) = match self.store_link() {
            Some(link) => link.merge_reload(&self.lock_config(), &config)?,
            None => (config.clone(), false),
        };
        let mut next = RoutingTable::from_config(
            &in_force,
            current.version + 1,
            Some(&current),
            &self.metrics,
        );
        // Mirroring that has an owner (the rollout's shadow stage) stays as its owner set it.
        if let Some(owner) = self.mirror_owner()
            && let Some(owned) = &current.mirror
        {
            match next.build_mirror(owned.config.clone(), owned.carried(), &self.metrics) {
                Some(mirror) => next = next.with_mirror(Some(Arc::new(mirror)), next.version),
                None => tracing::warn!(
                    owner,
                    backend = owned.config.backend,
                    "the new config has no backend for the owner's mirroring; mirroring is the file's"
                ),
            }
        }
        let (old_weights, new_weights) = (weights_of(&current), weights_of(&next));
        let (old_faults, new_faults) = (faults_of(&current), faults_of(&next));
        let access_log_changed = (next.access_log != current.access_log).then_some(next.access_log);
        let version = if publish {
            self.commit(&current, next)?
        } else {
            if self.store.is_some() {
                // Nothing shared changed: the document's revision stays the version.
                next.version = current.version;
            }
            let version = next.version;
            self.table.store(Arc::new(next));
            version
        };
        tracing::info!(
            target: "audit",
            version,
            old = %describe(&old_weights),
            new = %describe(&new_weights),
            old_faults = %describe_faults(&old_faults),
            new_faults = %describe_faults(&new_faults),
            published = publish,
            "routing table replaced by reload"
        );
        self.warn_about_restart_only_changes(&config);
        if let Some(on) = access_log_changed {
            let access = if on { "json" } else { "off" };
            tracing::info!(access, "access log changed by the reload");
        }
        warn_about_unverified_tls(&config);
        if let (Some(tls), Some(settings)) = (&self.tls, &config.proxy.tls) {
            // Read and checked with the file: new handshakes get them from now on.
            tls.replace(settings);
            tracing::info!(
                target: "audit",
                version,
                certificates = 1 + settings.sni.len(),
                "listener certificates re-read"
            );
        }
        self.health.sync(&self.table.load());
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token;
        *self
            .allowed_hosts
            .write()
            .unwrap_or_else(|e| e.into_inner()) = config.admin.allowed_hosts.clone().into();
        *self.lock_config() = config;
        Ok(version)
    }

    fn warn_about_restart_only_changes(&self, next: &Config) {
        let old = self.lock_config();
        let changed = [
            ("proxy.listen", old.proxy.listen != next.proxy.listen),
            ("admin.listen", old.admin.listen != next.admin.listen),
            (
                "admin.max_connections",
                old.admin.max_connections != next.admin.max_connections,
            ),
            (
                "admin.header_read_timeout",
                old.admin.header_read_timeout != next.admin.header_read_timeout,
            ),
            ("proxy.workers", old.proxy.workers != next.proxy.workers),
            (
                "proxy.header_read_timeout",
                old.proxy.header_read_timeout != next.proxy.header_read_timeout,
            ),
            (
                "proxy.shutdown_grace",
                old.proxy.shutdown_grace != next.proxy.shutdown_grace,
            ),
            (
                "proxy.send_timeout",
                old.proxy.send_timeout != next.proxy.send_timeout,
            ),
            ("log.format", old.log.format != next.log.format),
            ("store", old.store != next.store),
            // Against the listener as it runs (a file that turned TLS off, then on again,
            // changes nothing).
            ("proxy.tls", self.tls.is_some() != next.proxy.tls.is_some()),
        ];
        for (key, _) in changed.iter().filter(|(_, changed)| *changed) {
            tracing::warn!(
                key,
                "changed in the config file; this setting takes effect on restart"
            );
        }
    }

    fn lock_config(&self) -> std::sync::MutexGuard<'_, Config> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `insecure_skip_verify` is said out loud whenever a config with it is taken: a backend
/// reached so is reached over TLS nobody vouches for.
fn warn_about_unverified_tls(config: &Config) {
    for backend in &config.backends {
        if backend
            .tls
            .as_ref()
            .is_some_and(|tls| tls.insecure_skip_verify)
        {
            tracing::warn!(
                backend = %backend.name,
                "backend.tls.insecure_skip_verify is on: the certificates of this backend's https endpoints are not verified"
            );
        }
    }
}

/// Runs a change again (up to 3 times) when it lost a race for the shared document and the
/// caller did not ask for a version (`If-Match`): as on a single proxy, where writes take
/// turns, such a write is applied over what came first. The winner's document is in force
/// by then, so the change is decided again on it.
fn retrying_lost_races<T>(
    if_match: Option<&[u64]>,
    mut change: impl FnMut() -> Result<T, ControlError>,
) -> Result<T, ControlError> {
    let mut attempts = 1;
    loop {
        match change() {
            Err(ControlError::LostRace { .. }) if if_match.is_none() && attempts < 3 => {
                attempts += 1;
            }
            result => return result,
        }
    }
}

/// `If-Match` with strong comparison: the current version must be one of those listed.
fn check_version(if_match: Option<&[u64]>, current: u64) -> Result<(), ControlError> {
    match if_match {
        Some(accepted) if !accepted.contains(&current) => Err(ControlError::Stale { current }),
        _ => Ok(()),
    }
}

pub(super) fn weights_of(table: &RoutingTable) -> Vec<(String, u32)> {
    table
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.weight))
        .collect()
}

/// The faults in force in `table`, in backend order.
pub fn faults_of(table: &RoutingTable) -> Vec<FaultConfig> {
    table
        .backends
        .iter()
        .filter_map(|b| b.fault.as_ref().map(|f| f.config.clone()))
        .collect()
}

/// The faults as the audit log shows them: `v2: abort 5% (503), delay 10% (200ms) if
/// x-fault`, or `none`.
pub(super) fn describe_faults(faults: &[FaultConfig]) -> String {
    if faults.is_empty() {
        return "none".to_owned();
    }
    let parts: Vec<String> = faults
        .iter()
        .map(|f| format!("{}: {f}", f.backend))
        .collect();
    parts.join("; ")
}

pub(super) fn describe(weights: &[(String, u32)]) -> String {
    let parts: Vec<String> = weights.iter().map(|(n, w)| format!("{n}={w}")).collect();
    parts.join(",")
}

/// Compares in time that depends only on the lengths, so the token cannot be guessed byte by
/// byte from response times. (A length mismatch returns early; the length is not the secret.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn chain_shows_each_cause_once() {
        let error = PersistError::Read {
            path: PathBuf::from("dir/canary.toml"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        };
        assert_eq!(error.to_string(), "cannot read dir/canary.toml");
        assert_eq!(
            Chain(&error).to_string(),
            "cannot read dir/canary.toml: gone"
        );
        let reload = ControlError::from(ConfigError::Read {
            path: "canary.toml".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        });
        assert_eq!(
            Chain(&reload).to_string(),
            "canary.toml: cannot read config: gone"
        );
    }

    #[test]
    fn stale_versions_are_refused() {
        assert!(check_version(None, 4).is_ok());
        assert!(check_version(Some(&[4]), 4).is_ok());
        assert!(check_version(Some(&[2, 4]), 4).is_ok());
        assert!(matches!(
            check_version(Some(&[3]), 4),
            Err(ControlError::Stale { current: 4 })
        ));
        assert!(matches!(
            check_version(Some(&[]), 4),
            Err(ControlError::Stale { current: 4 })
        ));
    }
}
