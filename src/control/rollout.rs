//! Runs the rollout: every analysis interval it reads both versions' meters, feeds the
//! analysis, and applies what the state machine decides through the control plane (the same
//! versioned, audited, persisted weight change as the admin API); operators' commands come
//! through here too. While a rollout is under way it owns its two backends' weights: admin
//! writes to them get 409.
//!
//! A plan with a shadow stage (`[rollout] shadow`) starts there: the canary keeps weight 0
//! and the rollout puts mirroring to it in force (`[mirror]`'s settings when it names the
//! canary, else mirroring's defaults), owning it until the stage ends; then mirroring is
//! what the config file says again. Each interval it reads the mirror's pairs and
//! comparisons, not the meters.
//!
//! What survives a restart (state, step, history, and the `fail` evidence, so that a restart
//! never hands a bad canary a fresh chance) is written after every interval and transition to
//! `NAME.rollout.json` beside the config file `NAME.toml`, atomically. A restarted step starts
//! its clock, its shown counts and its `pass` evidence afresh.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ControlError, ControlPlane, WeightOwner};
use crate::chain::Chain;
use crate::config::{MirrorConfig, RolloutConfig};
use crate::rollout::Event;
use crate::rollout::analysis::{
    AnalysisSettings, Evidence, MetricVerdict, ShadowTick, Verdict, VersionTick,
};
use crate::rollout::histogram;
use crate::rollout::machine::{Change, Command, Conflict, Machine, Plan, State, StepReport};
use crate::rollout::meter::Counts;

/// Why a rollout command was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("no rollout is configured: add a [rollout] table to the config file and reload")]
    NotConfigured,
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("the rollout's change could not be applied")]
    Weights(#[source] ControlError),
}

/// The rollout of the current config, if it has one.
pub struct RolloutController {
    control: Arc<ControlPlane>,
    run: Mutex<Option<Run>>,
    /// The analysis interval in milliseconds, for the driver to read without the lock (held
    /// while the state file is written).
    interval_ms: AtomicU64,
    /// Where the state is persisted; `None` without a config file.
    state_path: Option<PathBuf>,
}

/// What is persisted.
#[derive(Serialize, Deserialize)]
struct Persisted {
    baseline: String,
    canary: String,
    machine: Machine,
    evidence: Evidence,
}

/// A configured rollout and everything it measures.
struct Run {
    config: RolloutConfig,
    plan: Plan,
    baseline: String,
    canary: String,
    machine: Machine,
    evidence: Evidence,
    /// When the current step began, or the proxy restarted into it.
    step_started: Instant,
    /// Meter readings (baseline, canary) when the step began, for the counts shown.
    at_step_start: [Counts; 2],
    /// Meter readings at the last interval, for the analysis (each interval's own traffic).
    at_last_tick: [Counts; 2],
    /// The verdicts of the last interval: errors, latency, differences (inconclusive but in
    /// the shadow stage).
    verdicts: Option<[MetricVerdict; 3]>,
    /// The mirror's cumulative pairs and comparisons at the last interval.
    shadow_last: ShadowTick,
    /// What the shadow stage of this rollout has seen, and its last differences verdict
    /// (kept, for the status, after it).
    shadow_seen: ShadowTick,
    shadow_differences: Option<MetricVerdict>,
    /// Meter readings when the rollout ended (promoted, rolled back), so the counts shown
    /// are the last step's, not the traffic after it.
    at_end: Option<[Counts; 2]>,
    /// With `[store]`: whether this replica led the rollout at the last interval (only the
    /// leader runs the state machine and writes its intervals; the others follow the shared
    /// document).
    leading: bool,
    /// With `[store]`: the rollout state in the shared document this run was last in step
    /// with (taken or written). A change decided from it is written only if the document
    /// still has it: a command or a leader that came first is never overwritten.
    shared: Option<Value>,
    rng: StdRng,
}

impl RolloutController {
    /// The rollout of the control plane's config, resumed from its state file when one names
    /// the same baseline and canary.
    pub fn new(control: Arc<ControlPlane>) -> Arc<Self> {
        let state_path = control
            .config_path()
            .map(|p| p.with_extension("rollout.json"));
        let controller = Arc::new(RolloutController {
            control,
            run: Mutex::new(None),
            interval_ms: AtomicU64::new(1000),
            state_path,
        });
        controller.follow_config();
        controller
    }

    /// The rollout as `GET /admin/rollout` shows it; `None` when none is configured.
    pub fn status(&self) -> Option<Value> {
        self.lock().as_ref().map(|run| run.status(&self.control))
    }

    /// Applies an operator's command and answers the resulting status. Blocks on file I/O
    /// (the weight change, the state file): call it from a blocking context.
    pub fn command(&self, command: Command) -> Result<Value, RolloutError> {
        let mut guard = self.lock();
        let run = guard.as_mut().ok_or(RolloutError::NotConfigured)?;
        // With a store, a command that lost a race for the shared document (another
        // replica's write came first) is decided again on the state now in force, up to 3
        // times: an abort must not give way to a fault drill's writes.
        let mut attempts = 1;
        loop {
            match self.command_once(run, command) {
                Err(RolloutError::Weights(ControlError::LostRace { .. })) if attempts < 3 => {
                    attempts += 1;
                }
                result => return result,
            }
        }
    }

    fn command_once(&self, run: &mut Run, command: Command) -> Result<Value, RolloutError> {
        let before = run.saved();
        let change = run
            .machine
            .command(&run.plan, command, crate::utc::unix_ms())?;
        if change.event == Event::Started {
            // A new rollout: its evidence (and its tolerances) start afresh.
            run.evidence = Evidence::new(&settings(&run.config));
            run.shadow_seen = ShadowTick::default();
            run.shadow_differences = None;
        }
        // An operator's command is not fenced by the leader key: any replica takes it, and
        // the shared state it was decided from is checked all the same.
        let applied = self.apply(
            run,
            change,
            &format!("operator: {}", command.as_str()),
            false,
        );
        if let Err(error) = applied {
            self.revert(run, before);
            return Err(error);
        }
        if change.event == Event::Started {
            // The mirroring the shadow stage put in force counts from here.
            run.shadow_last = run.read_shadow(&self.control);
        }
        Ok(run.status(&self.control))
    }

    /// Drives the rollout until `shutdown`: an analysis every interval, and the config
    /// followed after each reload.
    pub async fn drive(self: Arc<Self>, shutdown: CancellationToken) {
        let mut reloads = self.control.subscribe_reloads();
        let mut shared = self
            .control
            .store_link()
            .map(|link| link.subscribe_rollout());
        loop {
            let interval = Duration::from_millis(self.interval_ms.load(Ordering::Relaxed));
            let shared_change = async {
                match shared.as_mut() {
                    Some(changes) => changes.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                true = shared_change => {
                    let controller = self.clone();
                    let _ = tokio::task::spawn_blocking(move || controller.adopt_shared()).await;
                }
                changed = reloads.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let controller = self.clone();
                    let _ = tokio::task::spawn_blocking(move || controller.follow_config()).await;
                }
                () = tokio::time::sleep(interval) => {
                    let controller = self.clone();
                    let _ = tokio::task::spawn_blocking(move || controller.tick()).await;
                }
            }
        }
    }

    /// One analysis interval: the traffic since the last one goes into the evidence, the
    /// verdicts into the state machine.
    pub fn tick(&self) {
        let mut guard = self.lock();
        let Some(run) = guard.as_mut() else {
            return;
        };
        if let Some(link) = self.control.store_link() {
            let leading = link.is_leader();
            let took_the_lead = leading && !run.leading;
            run.leading = leading;
            if took_the_lead {
                self.take_the_lead(run);
            }
            if !leading {
                // Another replica runs the state machine; this one follows the document.
                run.at_last_tick = run.read_meters(&self.control);
                return;
            }
            self.ensure_weights(run);
            // Mirroring as the stage says, given back if a write of it was refused before.
            self.own_mirror(run);
        }
        let now = run.read_meters(&self.control);
        let shadow_now = run.read_shadow(&self.control);
        let shadow = shadow_now.since(&run.shadow_last);
        run.shadow_last = shadow_now;
        if run.machine.in_shadow() {
            run.at_last_tick = now;
            self.shadow_tick(run, &shadow);
        } else if run.machine.state.is_active() {
            let [baseline, canary] = [0, 1].map(|i| now[i].since(&run.at_last_tick[i]));
            run.evidence.observe(
                &VersionTick {
                    requests: canary.requests,
                    errors: canary.errors,
                    latency: &canary.latency,
                },
                &VersionTick {
                    requests: baseline.requests,
                    errors: baseline.errors,
                    latency: &baseline.latency,
                },
                &mut run.rng,
            );
            let verdicts = [run.evidence.errors(), run.evidence.latency(), INCONCLUSIVE];
            let metrics = &self.control.metrics().rollout;
            metrics.verdict("errors", verdicts[0].verdict.as_str());
            metrics.verdict("latency", verdicts[1].verdict.as_str());
            run.verdicts = Some(verdicts);
            let [baseline_step, canary_step] = [0, 1].map(|i| now[i].since(&run.at_step_start[i]));
            let report = StepReport {
                elapsed: run.step_started.elapsed(),
                baseline_requests: baseline_step.requests,
                canary_requests: canary_step.requests,
                errors: verdicts[0].verdict,
                latency: verdicts[1].verdict,
                differences: Verdict::Inconclusive,
            };
            run.at_last_tick = now;
            self.decide(run, &report);
        } else {
            run.at_last_tick = now;
        }
    }

    /// One interval of the shadow stage: the copies' pairs and comparisons since the last
    /// one go into the evidence; latency is not judged on copies.
    fn shadow_tick(&self, run: &mut Run, tick: &ShadowTick) {
        // Mirroring to the canary, whatever changed it since (a reload that removed the
        // canary's endpoints, a config file edited).
        self.own_mirror(run);
        run.evidence.observe_shadow(tick, &mut run.rng);
        run.shadow_seen = run.shadow_seen.plus(tick);
        let differences = run.evidence.differences().unwrap_or(INCONCLUSIVE);
        run.shadow_differences = Some(differences);
        let verdicts = [run.evidence.errors(), INCONCLUSIVE, differences];
        let metrics = &self.control.metrics().rollout;
        metrics.verdict("errors", verdicts[0].verdict.as_str());
        metrics.verdict("differences", verdicts[2].verdict.as_str());
        run.verdicts = Some(verdicts);
        let report = StepReport {
            elapsed: run.step_started.elapsed(),
            baseline_requests: run.shadow_seen.pairs,
            canary_requests: run.shadow_seen.pairs,
            errors: verdicts[0].verdict,
            latency: Verdict::Inconclusive,
            differences: verdicts[2].verdict,
        };
        self.decide(run, &report);
    }

    /// Hands an interval's report to the state machine and carries out what it decides.
    fn decide(&self, run: &mut Run, report: &StepReport) {
        let before = run.saved();
        if let Some(change) = run.machine.tick(&run.plan, report, crate::utc::unix_ms()) {
            if let Err(error) = self.apply(run, change, "analysis", true) {
                tracing::error!(error = %Chain(&error), "the rollout could not apply its step");
                self.revert(run, before);
            }
            return;
        }
        // The evidence moved: keep it.
        self.persist(run);
    }

    /// Takes the rollout section of the current config: a new baseline/canary pair resets the
    /// rollout to `idle`; the same pair keeps its state under the new plan; none ends it.
    pub fn follow_config(&self) {
        let config = self.control.config();
        let mut guard = self.lock();
        let interval = config.rollout.as_ref().map_or(1000, |r| {
            u64::try_from(r.analysis.interval.as_millis()).unwrap_or(u64::MAX)
        });
        self.interval_ms.store(interval.max(1), Ordering::Relaxed);
        let Some(rollout) = config.rollout else {
            if guard.take().is_some() {
                tracing::info!("the config has no [rollout] any more; the rollout is dropped");
            }
            self.control.set_weight_owner(None);
            if self
                .control
                .store_link()
                .is_some_and(|link| !link.is_leader())
            {
                // The leader, if there still is one, gives the shared mirroring back.
                self.control.mark_mirror_owner(None);
            } else {
                self.release_mirror();
            }
            return;
        };
        let baseline = config.backends[rollout.baseline].name.clone();
        let canary = config.backends[rollout.canary].name.clone();
        let plan = Plan::from(&rollout);
        if let Some(run) = guard.as_mut()
            && run.baseline == baseline
            && run.canary == canary
        {
            run.machine.step = run.machine.step.min(plan.steps.len().saturating_sub(1));
            let (old, new) = (settings(&run.config), settings(&rollout));
            if old.max_diff_rate.is_some() != new.max_diff_rate.is_some() {
                tracing::warn!(
                    "rollout.shadow was added or removed; it applies from the next start of this rollout"
                );
            } else if old != new {
                // New tolerances would start the evidence afresh, a fresh chance to fail for a
                // bad canary: they apply from the next rollout.
                tracing::warn!(
                    "rollout.analysis tolerances or confidence changed; they apply from the next start of this rollout"
                );
            }
            run.config = rollout;
            run.plan = plan;
            self.own_weights(run);
            self.own_mirror(run);
            return;
        }
        let settings = settings(&rollout);
        let old = guard.take();
        let leading = old.as_ref().is_some_and(|old| old.leading);
        let (machine, evidence) = match (old, self.load(&baseline, &canary)) {
            // This pair's state saved (the state file after a restart, or the shared
            // document another replica already wrote it to).
            (_, Some(persisted)) => {
                let mut evidence = persisted.evidence;
                // A restarted step starts its pass evidence afresh.
                evidence.start_step();
                (persisted.machine, evidence)
            }
            // Another pair replaces a rollout this process ran: it starts over, history kept.
            (Some(old), None) => {
                let mut machine = old.machine;
                machine.reset(
                    crate::utc::unix_ms(),
                    &format!("the config names a new pair: {baseline} -> {canary}"),
                );
                self.control.metrics().rollout.transition(Event::Reset);
                (machine, Evidence::new(&settings))
            }
            (None, None) => (Machine::default(), Evidence::new(&settings)),
        };
        let mut run = Run {
            config: rollout,
            plan,
            baseline,
            canary,
            machine,
            evidence,
            step_started: Instant::now(),
            at_step_start: [Counts::default(), Counts::default()],
            at_last_tick: [Counts::default(), Counts::default()],
            verdicts: None,
            shadow_last: ShadowTick::default(),
            shadow_seen: ShadowTick::default(),
            shadow_differences: None,
            at_end: None,
            // A new pair on the leader: it leads this one too (and writes its reset).
            leading,
            shared: self
                .control
                .store_link()
                .and_then(|link| link.rollout_state()),
            rng: StdRng::seed_from_u64(rand::rng().random()),
        };
        let now = run.read_meters(&self.control);
        run.at_step_start = now.clone();
        run.at_last_tick = now;
        run.shadow_last = run.read_shadow(&self.control);
        if run.machine.state.is_active() && self.control.store_link().is_none() {
            // The weights were written back to the config file with each step; set them again
            // in case the file was edited while the proxy was down. (With a store the shared
            // document has them, and its leader keeps them.)
            let percent = run.machine.canary_percent;
            if let Err(error) = self.set_weights(&run, percent) {
                tracing::error!(error = %Chain(&error), "the rollout could not restore its weights");
            }
            tracing::info!(
                state = run.machine.state.as_str(),
                step = run.machine.step,
                canary_percent = percent,
                "rollout resumed; the step's clock and counts start afresh"
            );
        }
        self.own_weights(&run);
        self.own_mirror(&run);
        self.show(&run);
        self.persist(&mut run);
        *guard = Some(run);
    }

    /// Carries out a transition: weights, step bookkeeping, metrics, state file, webhook.
    /// With a store, the change is one compare-and-swap of the step's weights and the new
    /// state (`fenced`: only while this replica holds the leader key); refused, nothing of it
    /// is carried out, and the caller puts the run back ([`revert`](Self::revert)).
    fn apply(
        &self,
        run: &mut Run,
        change: Change,
        by: &str,
        fenced: bool,
    ) -> Result<(), RolloutError> {
        let shared = self.control.store_link().is_some();
        let result = if shared {
            self.share(run, change.canary_percent, fenced)
                .map_err(RolloutError::Weights)?;
            Ok(())
        } else {
            match change.canary_percent {
                Some(percent) => self
                    .set_weights(run, percent)
                    .map(|_| ())
                    .map_err(RolloutError::Weights),
                None => Ok(()),
            }
        };
        run.at_end = match run.machine.state {
            State::Promoted | State::RolledBack => Some(run.read_meters(&self.control)),
            _ => None,
        };
        if change.new_step {
            run.step_started = Instant::now();
            let now = run.read_meters(&self.control);
            run.at_step_start = now;
            run.evidence.start_step();
            // The last verdicts were the step before's; the new step has none yet.
            run.verdicts = None;
        }
        let entry = run.machine.history.last().cloned();
        tracing::info!(
            target: "audit",
            event = change.event.as_str(),
            state = run.machine.state.as_str(),
            step = run.machine.step,
            canary_percent = run.machine.canary_percent,
            by,
            reason = entry.as_ref().map_or("", |e| e.reason.as_str()),
            "rollout transition"
        );
        self.control.metrics().rollout.transition(change.event);
        self.own_weights(run);
        self.own_mirror(run);
        self.show(run);
        if !shared {
            self.persist(run);
        }
        if let (Some(url), Some(entry)) = (run.config.webhook.clone(), entry) {
            let body = json!({
                "baseline": run.baseline,
                "canary": run.canary,
                "event": entry.event,
                "state": entry.state,
                "step": entry.step,
                "canary_percent": entry.canary_percent,
                "reason": entry.reason,
                "at": entry.at,
            });
            super::webhook::post(url, body, self.control.metrics().clone());
        }
        result
    }

    fn set_weights(&self, run: &Run, canary_percent: u32) -> Result<(), ControlError> {
        let changes = [
            (run.baseline.clone(), 100 - canary_percent.min(100)),
            (run.canary.clone(), canary_percent.min(100)),
        ];
        self.control
            .set_owned_weights(&changes, "rollout")
            .map(|_| ())
    }

    /// While under way, the rollout owns its two backends' weights.
    fn own_weights(&self, run: &Run) {
        let owner = run.machine.state.is_active().then(|| WeightOwner {
            backends: vec![run.baseline.clone(), run.canary.clone()],
            owner: format!("the rollout ({})", run.machine.state.as_str()),
        });
        self.control.set_weight_owner(owner);
    }

    /// In the shadow stage, the rollout owns mirroring and keeps copies going to the canary
    /// (set again if anything changed it); out of it, it gives mirroring back as the config
    /// file has it.
    fn own_mirror(&self, run: &Run) {
        if self.control.store_link().is_some() && !run.leading {
            // The leader puts the stage's mirroring in the shared document; here admin writes
            // to mirroring are only refused while it owns it.
            let owner = run.machine.in_shadow().then(|| SHADOW_OWNER.to_owned());
            self.control.mark_mirror_owner(owner);
            return;
        }
        if !run.machine.in_shadow() {
            self.release_mirror();
            return;
        }
        let config = shadow_mirror(self.control.config().mirror, &run.baseline, &run.canary);
        if let Err(error) = self.control.own_mirror(SHADOW_OWNER, config) {
            tracing::error!(error = %Chain(&error), "the shadow stage could not mirror to the canary");
        }
    }

    /// Gives mirroring back, as the config file has it, if the rollout owned it.
    fn release_mirror(&self) {
        if let Err(error) = self.control.release_mirror() {
            tracing::error!(error = %Chain(&error), "the rollout could not give mirroring back");
        }
    }

    fn show(&self, run: &Run) {
        self.control.metrics().rollout.show(
            run.machine.state,
            run.machine.step,
            run.machine.canary_percent,
        );
    }

    /// Keeps the rollout's state: in the shared document with a store (only the leader
    /// writes its intervals), else in the state file.
    fn persist(&self, run: &mut Run) {
        if self.control.store_link().is_some() {
            if run.leading {
                let before = run.saved();
                match self.share(run, None, true) {
                    Ok(()) => {}
                    Err(ControlError::LostRace { .. }) => self.revert(run, before),
                    Err(error) => {
                        tracing::warn!(error = %Chain(&error), "the rollout's state was not stored; the next interval writes it again");
                    }
                }
            }
            return;
        }
        let Some(path) = &self.state_path else {
            return;
        };
        let persisted = run.persisted();
        let written = serde_json::to_vec(&persisted)
            .map_err(std::io::Error::other)
            .and_then(|bytes| super::persist::replace_file(path, &bytes));
        if let Err(error) = written {
            tracing::error!(path = %path.display(), %error, "cannot write the rollout state");
        }
    }

    /// Writes the rollout's state into the shared document, with the step's weights for
    /// `canary_percent`, in one compare-and-swap: as its leader (refused if this replica no
    /// longer leads), or for an operator's command on a replica that does not lead; either
    /// way refused if the document's state is no longer the one this run was in step with.
    /// Nothing to write (the state as last shared, no weights) writes nothing.
    fn share(
        &self,
        run: &mut Run,
        canary_percent: Option<u32>,
        fenced: bool,
    ) -> Result<(), ControlError> {
        let persisted = run.persisted();
        let value = serde_json::to_value(&persisted)
            .map_err(|e| ControlError::MalformedJson(e.to_string()))?;
        if canary_percent.is_none() && run.shared.as_ref() == Some(&value) {
            return Ok(());
        }
        let weights: Vec<(String, u32)> = canary_percent
            .map(|percent| {
                let percent = percent.min(100);
                vec![
                    (run.baseline.clone(), 100 - percent),
                    (run.canary.clone(), percent),
                ]
            })
            .unwrap_or_default();
        self.control
            .store_rollout(value.clone(), &weights, run.shared.as_ref(), fenced)?;
        run.shared = Some(value);
        Ok(())
    }

    /// A change was refused by the shared document: the run takes the document's state, or,
    /// when the document has none of this pair, goes back to `before` (what it was before the
    /// change); the step's clock and counts restart if that is another step than `before`'s.
    fn revert(&self, run: &mut Run, before: Saved) {
        let Some(link) = self.control.store_link() else {
            return;
        };
        // In step with whatever the document holds now, readable here or not.
        run.shared = link.rollout_state();
        let (machine, evidence) = match self.load_shared(&run.baseline, &run.canary) {
            Some((shared, _)) => (shared.machine, shared.evidence),
            None => (before.machine.clone(), before.evidence),
        };
        self.take_state(run, machine, evidence, &before.machine);
        tracing::info!(
            state = run.machine.state.as_str(),
            step = run.machine.step,
            "the rollout's change lost to another write; the shared state is in force"
        );
    }

    /// Puts `machine` and `evidence` in force in the run; `from` is the machine its step's
    /// clock and counts belong to: another state or step restarts them.
    fn take_state(&self, run: &mut Run, machine: Machine, evidence: Evidence, from: &Machine) {
        let moved = machine.state != from.state
            || machine.step != from.step
            || machine.history.len() != from.history.len();
        run.machine = machine;
        run.evidence = evidence;
        if moved {
            let now = run.read_meters(&self.control);
            run.step_started = Instant::now();
            run.at_step_start = now.clone();
            run.at_last_tick = now.clone();
            run.at_end =
                matches!(run.machine.state, State::Promoted | State::RolledBack).then_some(now);
            run.evidence.start_step();
            tracing::info!(
                state = run.machine.state.as_str(),
                step = run.machine.step,
                canary_percent = run.machine.canary_percent,
                "rollout state taken from the shared document"
            );
        }
        run.verdicts = Some([run.evidence.errors(), run.evidence.latency(), INCONCLUSIVE]);
        self.own_weights(run);
        self.own_mirror(run);
        self.show(run);
    }

    /// The rollout's state in the shared document, if it is of this pair, and as stored.
    fn load_shared(&self, baseline: &str, canary: &str) -> Option<(Persisted, Value)> {
        let value = self.control.store_link()?.rollout_state()?;
        match serde_json::from_value::<Persisted>(value.clone()) {
            Ok(persisted) if persisted.baseline == baseline && persisted.canary == canary => {
                Some((persisted, value))
            }
            Ok(_) => None,
            Err(error) => {
                tracing::error!(%error, "the rollout state in the shared document is unreadable; ignored");
                None
            }
        }
    }

    /// Another replica changed the rollout in the shared document (its leader's interval, an
    /// operator's command there): this one takes its state.
    pub fn adopt_shared(&self) {
        let mut guard = self.lock();
        let Some(run) = guard.as_mut() else {
            return;
        };
        // In step with whatever the document holds now, readable here or not.
        run.shared = self.control.store_link().and_then(|l| l.rollout_state());
        let Some((shared, _)) = self.load_shared(&run.baseline, &run.canary) else {
            return;
        };
        let from = run.machine.clone();
        self.take_state(run, shared.machine, shared.evidence, &from);
    }

    /// This replica has just become the leader: the step goes on from the shared state, its
    /// clock, counts and pass evidence afresh, as after a restart.
    fn take_the_lead(&self, run: &mut Run) {
        run.shared = self.control.store_link().and_then(|l| l.rollout_state());
        if let Some((shared, _)) = self.load_shared(&run.baseline, &run.canary) {
            run.machine = shared.machine;
            run.evidence = shared.evidence;
        }
        let now = run.read_meters(&self.control);
        run.step_started = Instant::now();
        run.at_step_start = now.clone();
        run.at_last_tick = now;
        run.evidence.start_step();
        run.verdicts = None;
        tracing::info!(
            target: "audit",
            state = run.machine.state.as_str(),
            step = run.machine.step,
            canary_percent = run.machine.canary_percent,
            "this replica leads the rollout now; the step goes on, its clock and counts afresh"
        );
        self.own_weights(run);
        self.own_mirror(run);
        self.show(run);
    }

    /// The leader keeps the weights the rollout's step says (a write lost to a race, or an
    /// old leader's, is set again).
    fn ensure_weights(&self, run: &mut Run) {
        if !run.machine.state.is_active() {
            return;
        }
        let percent = run.machine.canary_percent.min(100);
        let table = self.control.table().load();
        let weight = |name: &str| table.backend(name).map(|b| b.weight);
        if weight(&run.baseline) == Some(100 - percent) && weight(&run.canary) == Some(percent) {
            return;
        }
        // With its state, over the state it was decided from: an abort that came first is
        // never undone in the weights.
        let before = run.saved();
        match self.share(run, Some(percent), true) {
            Ok(()) => {}
            Err(ControlError::LostRace { .. }) => self.revert(run, before),
            Err(error) => {
                tracing::warn!(error = %Chain(&error), "the rollout could not set its step's weights; trying again next interval");
            }
        }
    }

    fn load(&self, baseline: &str, canary: &str) -> Option<Persisted> {
        if self.control.store_link().is_some() {
            return self
                .load_shared(baseline, canary)
                .map(|(persisted, _)| persisted);
        }
        let path = self.state_path.as_ref()?;
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "cannot read the rollout state; starting idle");
                return None;
            }
        };
        match serde_json::from_slice::<Persisted>(&bytes) {
            Ok(persisted) if persisted.baseline == baseline && persisted.canary == canary => {
                Some(persisted)
            }
            Ok(_) => {
                tracing::info!(path = %path.display(), "the saved rollout is of another pair; starting idle");
                None
            }
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "the rollout state is unreadable; starting idle");
                None
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Run>> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// [`Persisted`] by reference, to write without a copy of the evidence.
#[derive(Serialize)]
struct PersistedRef<'a> {
    baseline: &'a str,
    canary: &'a str,
    machine: &'a Machine,
    evidence: &'a Evidence,
}

/// Who owns mirroring during the shadow stage, as a refused admin write names it.
const SHADOW_OWNER: &str = "the rollout's shadow stage";

/// The verdict of a metric not judged at this stage.
const INCONCLUSIVE: MetricVerdict = MetricVerdict {
    verdict: Verdict::Inconclusive,
    low: f64::NEG_INFINITY,
    high: f64::INFINITY,
};

/// The mirroring of a shadow stage: `[mirror]`'s when it names the canary (validation
/// refuses one that names another backend, copies another's requests than the baseline's,
/// or does not compare), else the defaults; either way, of the baseline's requests only.
fn shadow_mirror(configured: Option<MirrorConfig>, baseline: &str, canary: &str) -> MirrorConfig {
    let mut config = configured
        .filter(|m| m.backend == canary)
        .unwrap_or_else(|| MirrorConfig::to_backend(canary));
    config.from = Some(baseline.to_owned());
    config
}

/// A run's state before a change, to go back to when the change is refused.
struct Saved {
    machine: Machine,
    evidence: Evidence,
}

impl Run {
    fn saved(&self) -> Saved {
        Saved {
            machine: self.machine.clone(),
            evidence: self.evidence.clone(),
        }
    }

    /// What is persisted of the run (state file or shared document).
    fn persisted(&self) -> PersistedRef<'_> {
        PersistedRef {
            baseline: &self.baseline,
            canary: &self.canary,
            machine: &self.machine,
            evidence: &self.evidence,
        }
    }

    /// The mirror's cumulative pairs and comparisons of copies to the canary (zero while
    /// nothing mirrors to it).
    fn read_shadow(&self, control: &ControlPlane) -> ShadowTick {
        let table = control.table().load();
        let Some(mirror) = table
            .mirror
            .as_ref()
            .filter(|m| m.config.backend == self.canary)
        else {
            return ShadowTick::default();
        };
        let pairs = mirror.report.pairs();
        ShadowTick {
            pairs: pairs.pairs,
            copy_only_errors: pairs.copy_only_errors,
            served_only_errors: pairs.served_only_errors,
            compared: pairs.compared,
            different: pairs.different,
        }
    }

    /// The meters of the two versions now (zero for a version that has none yet).
    fn read_meters(&self, control: &ControlPlane) -> [Counts; 2] {
        if let Some(link) = control.store_link() {
            // Every replica's meters, summed.
            return [&self.baseline, &self.canary].map(|name| link.cluster_counts(name));
        }
        let table = control.table().load();
        [&self.baseline, &self.canary].map(|name| {
            table
                .backend(name)
                .and_then(|b| b.meter.as_ref())
                .map(|meter| meter.counts())
                .unwrap_or_default()
        })
    }

    /// The shadow stage as the status shows it: the plan's, and what it saw (`null` without
    /// one). The differences verdict is the stage's last, kept after it.
    fn shadow_status(&self) -> Value {
        // A stage the config no longer has (a reload took `shadow` out mid-stage) is shown
        // until the rollout leaves it.
        if self.plan.shadow.is_none() && !self.machine.shadow {
            return Value::Null;
        }
        let duration = self.plan.shadow.map(crate::duration::format_duration);
        let seen = &self.shadow_seen;
        let differences = self.shadow_differences.map(|v| {
            // A rate: the bounds of `d` below 0 or above 1 say nothing more.
            json!({"verdict": v.verdict, "low": v.low.max(0.0), "high": v.high.min(1.0)})
        });
        json!({
            "before_step_1": self.machine.shadow,
            "duration": duration,
            "max_diff_rate": self.config.analysis.max_diff_rate,
            "pairs": seen.pairs,
            "copy_only_errors": seen.copy_only_errors,
            "served_only_errors": seen.served_only_errors,
            "compared": seen.compared,
            "different": seen.different,
            "difference_rate": (seen.compared > 0).then(|| seen.different as f64 / seen.compared as f64),
            "differences": differences,
        })
    }

    fn status(&self, control: &ControlPlane) -> Value {
        let now = match &self.at_end {
            Some(end) => end.clone(),
            None => self.read_meters(control),
        };
        let shown = |i: usize| {
            let counts = now[i].since(&self.at_step_start[i]);
            let quantile = |q| histogram::quantile_micros(&counts.latency, q).map(|us| us / 1000.0);
            json!({
                "requests": counts.requests,
                "errors": counts.errors,
                "error_rate": counts.error_rate(),
                "p50_ms": quantile(0.5),
                "p99_ms": quantile(0.99),
            })
        };
        let verdict = |i: usize| {
            self.verdicts.as_ref().map_or(
                json!({"verdict": "inconclusive", "low": null, "high": null}),
                |v| json!({"verdict": v[i].verdict, "low": v[i].low, "high": v[i].high}),
            )
        };
        let step_time = crate::duration::format_duration(self.plan.step_time);
        // Each version's p99 interval at this step (null where there is no bound yet).
        let latency = self.evidence.latency_intervals();
        let millis = |(low, high): (f64, f64)| json!([low / 1000.0, high / 1000.0]);
        let pairs = self.evidence.pairs();
        json!({
            "state": self.machine.state.as_str(),
            "step": self.machine.step,
            "steps": self.plan.steps,
            "approve": self.plan.approve,
            "canary_percent": self.machine.canary_percent,
            "baseline_name": self.baseline,
            "canary_name": self.canary,
            "step_elapsed_s": self.machine.state.is_active().then(|| self.step_started.elapsed().as_secs_f64()),
            "step_time": step_time,
            "min_requests": self.plan.min_requests,
            // What the verdicts are held against, for views of the intervals below.
            "analysis": {
                "interval": crate::duration::format_duration(self.config.analysis.interval),
                "error_tolerance": self.config.analysis.error_tolerance,
                "latency_tolerance": self.config.analysis.latency_tolerance,
                "confidence": self.config.analysis.confidence,
                "max_step_time": crate::duration::format_duration(self.plan.max_step_time),
                "on_inconclusive": self.plan.on_inconclusive.as_str(),
            },
            "baseline": shown(0),
            "canary": shown(1),
            "verdict": {
                "errors": verdict(0)["verdict"],
                "latency": verdict(1)["verdict"],
                "differences": verdict(2)["verdict"],
            },
            "shadow": self.shadow_status(),
            "intervals": {
                "errors": verdict(0),
                "latency": verdict(1),
                "differences": verdict(2),
                "canary_p99_ms": millis(latency.canary_p99),
                "baseline_p99_ms": millis(latency.baseline_p99),
                "pairs": {"rollout": pairs.0, "step": pairs.1},
            },
            "history": self.machine.history,
        })
    }
}

fn settings(config: &RolloutConfig) -> AnalysisSettings {
    AnalysisSettings {
        error_tolerance: config.analysis.error_tolerance,
        latency_tolerance: config.analysis.latency_tolerance,
        confidence: config.analysis.confidence,
        max_diff_rate: config.shadow.map(|_| config.analysis.max_diff_rate),
    }
}
