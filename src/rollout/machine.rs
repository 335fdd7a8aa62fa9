//! The rollout's state machine: states, steps, approval gates, operator commands, and what the
//! verdicts do. Pure: it is handed the time, the traffic and the verdicts, and answers with
//! the canary percent the weights must take; the controller applies it through the control
//! plane (the one path for table changes).
//!
//! States: `idle` -> (`shadow`, when the plan has a shadow stage: canary 0, the canary gets
//! copies only) -> `running` (a step's traffic is set) -> ... -> `promoted` (canary 100), or
//! `rolled_back` (canary 0) on a `fail` verdict or `abort`. A step listed in `approve` is
//! entered as `waiting_approval`, with the previous step's traffic, until `resume`. `paused`
//! holds the current traffic until `resume`. A `fail` rolls back from every active state,
//! paused and waiting for approval included.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::analysis::Verdict;
use crate::config::{OnInconclusive, RolloutConfig};

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Idle,
    /// The shadow stage before step 1: no user reaches the canary, which gets copies of
    /// requests whose answers are compared with the served ones.
    Shadow,
    Running,
    WaitingApproval,
    Paused,
    Promoted,
    RolledBack,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Idle,
        State::Shadow,
        State::Running,
        State::WaitingApproval,
        State::Paused,
        State::Promoted,
        State::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Shadow => "shadow",
            State::Running => "running",
            State::WaitingApproval => "waiting_approval",
            State::Paused => "paused",
            State::Promoted => "promoted",
            State::RolledBack => "rolled_back",
        }
    }

    /// The rollout owns the weights of its two backends in these states.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            State::Shadow | State::Running | State::WaitingApproval | State::Paused
        )
    }
}

/// What an operator asks for (`POST /admin/rollout/COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Start,
    Pause,
    Resume,
    Promote,
    Abort,
}

impl Command {
    pub fn parse(name: &str) -> Option<Command> {
        Some(match name {
            "start" => Command::Start,
            "pause" => Command::Pause,
            "resume" => Command::Resume,
            "promote" => Command::Promote,
            "abort" => Command::Abort,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Start => "start",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Promote => "promote",
            Command::Abort => "abort",
        }
    }
}

/// A transition, as history and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Started,
    Advanced,
    AwaitingApproval,
    Approved,
    Paused,
    Resumed,
    Promoted,
    RolledBack,
    Aborted,
    Held,
    Reset,
}

impl Event {
    pub const ALL: [Event; 11] = [
        Event::Started,
        Event::Advanced,
        Event::AwaitingApproval,
        Event::Approved,
        Event::Paused,
        Event::Resumed,
        Event::Promoted,
        Event::RolledBack,
        Event::Aborted,
        Event::Held,
        Event::Reset,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Event::Started => "started",
            Event::Advanced => "advanced",
            Event::AwaitingApproval => "awaiting_approval",
            Event::Approved => "approved",
            Event::Paused => "paused",
            Event::Resumed => "resumed",
            Event::Promoted => "promoted",
            Event::RolledBack => "rolled_back",
            Event::Aborted => "aborted",
            Event::Held => "held",
            Event::Reset => "reset",
        }
    }
}

/// One line of the rollout's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Unix time, milliseconds.
    pub at: u64,
    pub event: Event,
    /// The state after the transition.
    pub state: State,
    /// The step index after the transition.
    pub step: usize,
    pub canary_percent: u32,
    /// The rollout was in its shadow stage after the transition (or ended there).
    #[serde(default)]
    pub shadow: bool,
    pub reason: String,
}

/// The plan a rollout follows, from `[rollout]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// How long the shadow stage before step 1 lasts at least; `None`: no shadow stage.
    pub shadow: Option<Duration>,
    pub steps: Vec<u32>,
    pub step_time: Duration,
    pub approve: Vec<u32>,
    pub min_requests: u64,
    pub max_step_time: Duration,
    pub on_inconclusive: OnInconclusive,
}

impl From<&RolloutConfig> for Plan {
    fn from(config: &RolloutConfig) -> Self {
        Plan {
            shadow: config.shadow,
            steps: config.steps.clone(),
            step_time: config.step_time,
            approve: config.approve.clone(),
            min_requests: config.analysis.min_requests,
            max_step_time: config.analysis.max_step_time,
            on_inconclusive: config.analysis.on_inconclusive,
        }
    }
}

/// What the analysis saw at the current step (or in the shadow stage), for
/// [`Machine::tick`].
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Time spent at this step (since it started, or since the proxy restarted).
    pub elapsed: Duration,
    /// Requests each version answered at this step; in the shadow stage, both are the
    /// paired copies.
    pub baseline_requests: u64,
    pub canary_requests: u64,
    pub errors: Verdict,
    /// Not judged in the shadow stage: `inconclusive` there.
    pub latency: Verdict,
    /// Judged in the shadow stage only: `inconclusive` at the steps.
    pub differences: Verdict,
}

/// A command that makes no sense in the current state (409).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} a rollout that is {state}: {why}", command = .command.as_str(), state = .state.as_str())]
pub struct Conflict {
    pub command: Command,
    pub state: State,
    pub why: &'static str,
}

/// What a transition asks of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub event: Event,
    /// The canary percent the weights must take now, when they change.
    pub canary_percent: Option<u32>,
    /// A step began: its clock, its shown counts and its `pass` evidence restart.
    pub new_step: bool,
}

/// The rollout's state, its step, the traffic it set, and its history. Persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub state: State,
    /// Index into the plan's steps: the current step, or the one waiting for approval.
    pub step: usize,
    /// The canary's share of baseline + canary traffic the rollout last set.
    pub canary_percent: u32,
    /// While paused: the state `resume` returns to.
    pub resume_to: Option<State>,
    /// The rollout is in its shadow stage (paused there included), or ended there (rolled
    /// back or aborted before step 1).
    #[serde(default)]
    pub shadow: bool,
    pub history: Vec<HistoryEntry>,
}

/// History entries kept; older ones are dropped.
const HISTORY: usize = 200;

impl Default for Machine {
    fn default() -> Self {
        Machine {
            state: State::Idle,
            step: 0,
            canary_percent: 0,
            resume_to: None,
            shadow: false,
            history: Vec::new(),
        }
    }
}

impl Machine {
    /// Applies an operator's command.
    pub fn command(&mut self, plan: &Plan, command: Command, now: u64) -> Result<Change, Conflict> {
        let conflict = |why| Conflict {
            command,
            state: self.state,
            why,
        };
        match (command, self.state) {
            (Command::Start, State::Idle | State::RolledBack) => Ok(match plan.shadow {
                Some(shadow) => {
                    self.step = 0;
                    self.shadow = true;
                    let reason = format!(
                        "started by the operator; the shadow stage ({}): the canary gets copies only",
                        crate::duration::format_duration(shadow)
                    );
                    self.transition(State::Shadow, Event::Started, Some(0), true, now, &reason)
                }
                None => {
                    self.shadow = false;
                    self.enter_step(plan, 0, Event::Started, now, "started by the operator")
                }
            }),
            (Command::Start, State::Promoted) => Err(conflict(
                "it was promoted; a reload naming a new baseline/canary pair resets it",
            )),
            (Command::Start, _) => Err(conflict("it is already under way")),
            (Command::Pause, State::Shadow | State::Running | State::WaitingApproval) => {
                self.resume_to = Some(self.state);
                Ok(self.transition(
                    State::Paused,
                    Event::Paused,
                    None,
                    false,
                    now,
                    "paused by the operator",
                ))
            }
            (Command::Pause, State::Paused) => Err(conflict("it is paused already")),
            (Command::Pause, _) => Err(conflict("only a rollout under way can be paused")),
            (Command::Resume, State::Paused) => {
                let state = self.resume_to.take().unwrap_or(State::Running);
                Ok(self.transition(
                    state,
                    Event::Resumed,
                    None,
                    false,
                    now,
                    "resumed by the operator",
                ))
            }
            (Command::Resume, State::WaitingApproval) => {
                Ok(self.start_step(plan, Event::Approved, now, "approved by the operator"))
            }
            (Command::Resume, _) => Err(conflict(
                "only a paused rollout or one waiting for approval can be resumed",
            )),
            (Command::Promote, state) if state.is_active() => Ok(self.finish(
                plan,
                State::Promoted,
                Event::Promoted,
                now,
                "promoted by the operator",
            )),
            (Command::Abort, state) if state.is_active() => Ok(self.finish(
                plan,
                State::RolledBack,
                Event::Aborted,
                now,
                "aborted by the operator",
            )),
            (Command::Promote | Command::Abort, _) => Err(conflict(
                "only a rollout under way can be promoted or aborted",
            )),
        }
    }

    /// Whether the rollout is in its shadow stage (paused there included).
    pub fn in_shadow(&self) -> bool {
        self.shadow && self.state.is_active()
    }

    /// Applies the verdicts of one analysis interval; `None` when nothing changes.
    pub fn tick(&mut self, plan: &Plan, report: &StepReport, now: u64) -> Option<Change> {
        if !self.state.is_active() {
            return None;
        }
        let failed = [
            ("errors", report.errors),
            ("latency", report.latency),
            ("differences", report.differences),
        ]
        .into_iter()
        .find(|(_, verdict)| *verdict == Verdict::Fail);
        if let Some((metric, _)) = failed {
            let reason = if self.in_shadow() {
                format!(
                    "the {metric} verdict failed in the shadow stage: the canary's answers to copies are worse; no user reached it"
                )
            } else {
                format!("the {metric} verdict failed: the canary is worse")
            };
            return Some(self.finish(plan, State::RolledBack, Event::RolledBack, now, &reason));
        }
        if self.state == State::Shadow {
            return self.shadow_tick(plan, report, now);
        }
        if self.state != State::Running {
            return None;
        }
        let passed = report.errors == Verdict::Pass && report.latency == Verdict::Pass;
        let enough = report.baseline_requests >= plan.min_requests
            && report.canary_requests >= plan.min_requests;
        if report.elapsed >= plan.step_time && enough && passed {
            let reason = format!("step {} passed", self.step + 1);
            return Some(self.enter_step(plan, self.step + 1, Event::Advanced, now, &reason));
        }
        if report.elapsed < plan.max_step_time {
            return None;
        }
        let reason = format!(
            "step {} still inconclusive after max_step_time ({})",
            self.step + 1,
            crate::duration::format_duration(plan.max_step_time)
        );
        match plan.on_inconclusive {
            OnInconclusive::Hold => {
                // Said once per step: a held step stays quiet afterwards.
                let said = self
                    .history
                    .last()
                    .is_some_and(|h| h.event == Event::Held && h.step == self.step);
                (!said).then(|| {
                    self.transition(State::Running, Event::Held, None, false, now, &reason)
                })
            }
            OnInconclusive::Rollback => {
                Some(self.finish(plan, State::RolledBack, Event::RolledBack, now, &reason))
            }
            OnInconclusive::Advance => {
                Some(self.enter_step(plan, self.step + 1, Event::Advanced, now, &reason))
            }
        }
    }

    /// The shadow stage: step 1 starts once both its verdicts pass, after `shadow` and
    /// `min_requests` pairs. It never advances without a pass: still inconclusive at
    /// `max_step_time`, it rolls back (or holds, with `on_inconclusive = "hold"`).
    fn shadow_tick(&mut self, plan: &Plan, report: &StepReport, now: u64) -> Option<Change> {
        let shadow = plan.shadow.unwrap_or_default();
        let passed = report.errors == Verdict::Pass && report.differences == Verdict::Pass;
        let enough = report.canary_requests >= plan.min_requests;
        if report.elapsed >= shadow && enough && passed {
            self.shadow = false;
            return Some(self.enter_step(plan, 0, Event::Advanced, now, "the shadow stage passed"));
        }
        if report.elapsed < plan.max_step_time.max(shadow) {
            return None;
        }
        let reason = format!(
            "the shadow stage is still inconclusive after max_step_time ({})",
            crate::duration::format_duration(plan.max_step_time.max(shadow))
        );
        if plan.on_inconclusive == OnInconclusive::Hold {
            let said = self
                .history
                .last()
                .is_some_and(|h| h.event == Event::Held && h.state == State::Shadow);
            return (!said)
                .then(|| self.transition(State::Shadow, Event::Held, None, false, now, &reason));
        }
        let reason = format!("{reason}; it never advances without a pass");
        Some(self.finish(plan, State::RolledBack, Event::RolledBack, now, &reason))
    }

    /// Back to `idle`, history kept (a reload named another baseline/canary pair).
    pub fn reset(&mut self, now: u64, reason: &str) -> Change {
        self.resume_to = None;
        self.shadow = false;
        self.step = 0;
        self.canary_percent = 0;
        self.transition(State::Idle, Event::Reset, None, false, now, reason)
    }

    /// Moves to step `index`: it waits for approval when the plan says so, else its traffic
    /// is set (the last step, 100, is the promotion).
    fn enter_step(
        &mut self,
        plan: &Plan,
        index: usize,
        event: Event,
        now: u64,
        reason: &str,
    ) -> Change {
        let index = index.min(plan.steps.len().saturating_sub(1));
        let percent = plan.steps.get(index).copied().unwrap_or(100);
        self.step = index;
        if plan.approve.contains(&percent) {
            // The traffic of the step before (none before the first step) until approval; a
            // rollout that starts here takes the weights over at once.
            let before = index.checked_sub(1).map_or(0, |i| plan.steps[i]);
            let weights = (event == Event::Started).then_some(before);
            let event = match event {
                Event::Advanced => Event::AwaitingApproval,
                other => other,
            };
            let reason = format!(
                "{reason}; step {} ({percent}%) waits for approval",
                index + 1
            );
            return self.transition(State::WaitingApproval, event, weights, true, now, &reason);
        }
        self.start_step(plan, event, now, reason)
    }

    /// Sets the current step's traffic (the last step promotes).
    fn start_step(&mut self, plan: &Plan, event: Event, now: u64, reason: &str) -> Change {
        let percent = plan.steps.get(self.step).copied().unwrap_or(100);
        if percent >= 100 {
            return self.finish(plan, State::Promoted, Event::Promoted, now, reason);
        }
        self.transition(State::Running, event, Some(percent), true, now, reason)
    }

    /// Ends the rollout: promoted (canary 100) or rolled back (canary 0).
    fn finish(
        &mut self,
        plan: &Plan,
        state: State,
        event: Event,
        now: u64,
        reason: &str,
    ) -> Change {
        self.resume_to = None;
        if state == State::Promoted {
            self.step = plan.steps.len().saturating_sub(1);
            self.shadow = false;
        }
        let percent = if state == State::Promoted { 100 } else { 0 };
        self.transition(state, event, Some(percent), false, now, reason)
    }

    fn transition(
        &mut self,
        state: State,
        event: Event,
        canary_percent: Option<u32>,
        new_step: bool,
        now: u64,
        reason: &str,
    ) -> Change {
        self.state = state;
        if let Some(percent) = canary_percent {
            self.canary_percent = percent;
        }
        if self.history.len() >= HISTORY {
            self.history.remove(0);
        }
        self.history.push(HistoryEntry {
            at: now,
            event,
            state,
            step: self.step,
            canary_percent: self.canary_percent,
            shadow: self.shadow,
            reason: reason.to_string(),
        });
        Change {
            event,
            canary_percent,
            new_step,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(approve: &[u32]) -> Plan {
        Plan {
            shadow: None,
            steps: vec![1, 5, 20, 50, 100],
            step_time: Duration::from_secs(60),
            approve: approve.to_vec(),
            min_requests: 100,
            max_step_time: Duration::from_secs(600),
            on_inconclusive: OnInconclusive::Hold,
        }
    }

    fn report(elapsed: u64, requests: u64, errors: Verdict, latency: Verdict) -> StepReport {
        StepReport {
            elapsed: Duration::from_secs(elapsed),
            baseline_requests: requests,
            canary_requests: requests,
            errors,
            latency,
            differences: UNSURE,
        }
    }

    /// A shadow stage's report: `pairs` copies paired with served answers.
    fn shadow_report(
        elapsed: u64,
        pairs: u64,
        errors: Verdict,
        differences: Verdict,
    ) -> StepReport {
        StepReport {
            differences,
            ..report(elapsed, pairs, errors, UNSURE)
        }
    }

    fn shadow_plan(approve: &[u32], on_inconclusive: OnInconclusive) -> Plan {
        Plan {
            shadow: Some(Duration::from_secs(30)),
            on_inconclusive,
            ..plan(approve)
        }
    }

    #[test]
    fn a_shadow_stage_gives_the_canary_no_users_until_both_its_verdicts_pass() {
        let plan = shadow_plan(&[], OnInconclusive::Hold);
        let mut m = Machine::default();
        let started = m.command(&plan, Command::Start, 1).unwrap();
        assert_eq!(
            (started.event, started.canary_percent, started.new_step),
            (Event::Started, Some(0), true)
        );
        assert_eq!(m.state, State::Shadow);
        assert!(m.in_shadow());
        // Too early, too few pairs, or one verdict short of a pass: nothing moves.
        assert_eq!(m.tick(&plan, &shadow_report(29, 500, PASS, PASS), 2), None);
        assert_eq!(m.tick(&plan, &shadow_report(30, 99, PASS, PASS), 3), None);
        assert_eq!(
            m.tick(&plan, &shadow_report(30, 500, PASS, UNSURE), 4),
            None
        );
        assert_eq!(
            m.tick(&plan, &shadow_report(30, 500, UNSURE, PASS), 5),
            None
        );
        // Paused in the shadow stage, it stays there; resumed, it goes back to it.
        m.command(&plan, Command::Pause, 6).unwrap();
        assert!(m.in_shadow());
        assert_eq!(m.tick(&plan, &shadow_report(60, 500, PASS, PASS), 7), None);
        m.command(&plan, Command::Resume, 8).unwrap();
        assert_eq!(m.state, State::Shadow);
        let passed = m
            .tick(&plan, &shadow_report(30, 500, PASS, PASS), 9)
            .unwrap();
        assert_eq!(
            (passed.event, passed.canary_percent, passed.new_step),
            (Event::Advanced, Some(1), true)
        );
        assert_eq!((m.state, m.step), (State::Running, 0));
        assert!(!m.in_shadow());
        assert_eq!(m.history.last().unwrap().reason, "the shadow stage passed");
        // Step 1 then goes as without a shadow stage.
        let next = m.tick(&plan, &report(60, 500, PASS, PASS), 10).unwrap();
        assert_eq!(next.canary_percent, Some(5));
        // A step 1 that waits for approval keeps the canary at 0 once the shadow passes.
        let plan = shadow_plan(&[1], OnInconclusive::Hold);
        let mut m = Machine::default();
        m.command(&plan, Command::Start, 1).unwrap();
        let waiting = m
            .tick(&plan, &shadow_report(30, 500, PASS, PASS), 2)
            .unwrap();
        assert_eq!(
            (waiting.event, waiting.canary_percent),
            (Event::AwaitingApproval, None)
        );
        assert_eq!((m.state, m.canary_percent), (State::WaitingApproval, 0));
    }

    #[test]
    fn a_failing_shadow_stage_rolls_back_before_any_user_reached_the_canary() {
        let plan = shadow_plan(&[], OnInconclusive::Hold);
        for (errors, differences, metric) in [(FAIL, UNSURE, "errors"), (PASS, FAIL, "differences")]
        {
            for pause in [false, true] {
                let mut m = Machine::default();
                m.command(&plan, Command::Start, 1).unwrap();
                if pause {
                    m.command(&plan, Command::Pause, 2).unwrap();
                }
                let failed = m
                    .tick(&plan, &shadow_report(1, 50, errors, differences), 3)
                    .unwrap();
                assert_eq!(
                    (failed.event, failed.canary_percent),
                    (Event::RolledBack, Some(0))
                );
                assert_eq!(m.state, State::RolledBack);
                let reason = &m.history.last().unwrap().reason;
                assert!(
                    reason.contains(metric) && reason.contains("shadow stage"),
                    "{reason}"
                );
            }
        }
        // An operator can still end the shadow stage either way.
        let mut m = Machine::default();
        m.command(&plan, Command::Start, 1).unwrap();
        let aborted = m.command(&plan, Command::Abort, 2).unwrap();
        assert_eq!(aborted.canary_percent, Some(0));
        m.command(&plan, Command::Start, 3).unwrap();
        assert_eq!(
            m.state,
            State::Shadow,
            "a restart goes through the shadow stage again"
        );
        let promoted = m.command(&plan, Command::Promote, 4).unwrap();
        assert_eq!(promoted.canary_percent, Some(100));
    }

    #[test]
    fn an_inconclusive_shadow_stage_never_advances() {
        for (rule, state) in [
            (OnInconclusive::Hold, State::Shadow),
            (OnInconclusive::Rollback, State::RolledBack),
            (OnInconclusive::Advance, State::RolledBack),
        ] {
            let plan = shadow_plan(&[], rule);
            let mut m = Machine::default();
            m.command(&plan, Command::Start, 1).unwrap();
            assert_eq!(
                m.tick(&plan, &shadow_report(599, 0, UNSURE, UNSURE), 2),
                None
            );
            let change = m
                .tick(&plan, &shadow_report(600, 0, UNSURE, PASS), 3)
                .unwrap();
            assert_eq!((m.state, m.canary_percent), (state, 0), "{rule:?}");
            assert_ne!(change.canary_percent, Some(1));
            if rule == OnInconclusive::Hold {
                assert_eq!(change.event, Event::Held);
                assert_eq!(
                    m.tick(&plan, &shadow_report(700, 0, UNSURE, UNSURE), 4),
                    None
                );
            }
        }
    }

    const PASS: Verdict = Verdict::Pass;
    const FAIL: Verdict = Verdict::Fail;
    const UNSURE: Verdict = Verdict::Inconclusive;

    #[test]
    fn a_passing_canary_walks_the_steps_and_is_promoted() {
        let plan = plan(&[]);
        let mut m = Machine::default();
        let started = m.command(&plan, Command::Start, 1).unwrap();
        assert_eq!(started.canary_percent, Some(1));
        assert!(started.new_step);
        assert_eq!(m.state, State::Running);
        // Too early, too few requests, or not passing: nothing moves.
        assert_eq!(m.tick(&plan, &report(59, 500, PASS, PASS), 2), None);
        assert_eq!(m.tick(&plan, &report(60, 99, PASS, PASS), 3), None);
        assert_eq!(m.tick(&plan, &report(60, 500, PASS, UNSURE), 4), None);
        let mut percents = vec![];
        for now in 5..9 {
            let change = m.tick(&plan, &report(60, 500, PASS, PASS), now).unwrap();
            percents.push(change.canary_percent.unwrap());
        }
        assert_eq!(percents, [5, 20, 50, 100]);
        assert_eq!(m.state, State::Promoted);
        assert_eq!(m.history.last().unwrap().event, Event::Promoted);
        assert_eq!(m.tick(&plan, &report(60, 500, FAIL, FAIL), 9), None);
    }

    #[test]
    fn any_fail_rolls_back_at_once_even_paused_or_waiting_for_approval() {
        let plan = plan(&[20]);
        for setup in [&[][..], &[Command::Pause][..]] {
            let mut m = Machine::default();
            m.command(&plan, Command::Start, 1).unwrap();
            for &command in setup {
                m.command(&plan, command, 2).unwrap();
            }
            let change = m.tick(&plan, &report(1, 3, UNSURE, FAIL), 3).unwrap();
            assert_eq!(change.event, Event::RolledBack);
            assert_eq!(change.canary_percent, Some(0));
            assert_eq!(m.state, State::RolledBack);
        }
        // Waiting for approval of step 3 (20%), with step 2's traffic.
        let mut m = Machine::default();
        m.command(&plan, Command::Start, 1).unwrap();
        m.tick(&plan, &report(60, 500, PASS, PASS), 2).unwrap();
        let waiting = m.tick(&plan, &report(60, 500, PASS, PASS), 3).unwrap();
        assert_eq!(waiting.event, Event::AwaitingApproval);
        assert_eq!(waiting.canary_percent, None, "5% stays until approval");
        assert_eq!(
            (m.state, m.step, m.canary_percent),
            (State::WaitingApproval, 2, 5)
        );
        assert_eq!(m.tick(&plan, &report(600, 500, PASS, PASS), 4), None);
        let failed = m.tick(&plan, &report(600, 500, FAIL, PASS), 5).unwrap();
        assert_eq!(failed.canary_percent, Some(0));
    }

    #[test]
    fn approval_gates_wait_for_resume() {
        let plan = plan(&[1, 100]);
        let mut m = Machine::default();
        let started = m.command(&plan, Command::Start, 1).unwrap();
        assert_eq!(m.state, State::WaitingApproval);
        assert_eq!(
            started.canary_percent,
            Some(0),
            "no canary traffic before approval"
        );
        let approved = m.command(&plan, Command::Resume, 2).unwrap();
        assert_eq!(
            (approved.event, approved.canary_percent),
            (Event::Approved, Some(1))
        );
        for now in 3..6 {
            m.tick(&plan, &report(60, 500, PASS, PASS), now).unwrap();
        }
        assert_eq!((m.state, m.canary_percent), (State::Running, 50));
        // The promotion (100) is listed: it waits too.
        m.tick(&plan, &report(60, 500, PASS, PASS), 6).unwrap();
        assert_eq!((m.state, m.canary_percent), (State::WaitingApproval, 50));
        let promoted = m.command(&plan, Command::Resume, 7).unwrap();
        assert_eq!(promoted.canary_percent, Some(100));
        assert_eq!(m.state, State::Promoted);
    }

    #[test]
    fn commands_that_make_no_sense_are_conflicts() {
        let plan = plan(&[]);
        let mut m = Machine::default();
        for command in [
            Command::Pause,
            Command::Resume,
            Command::Promote,
            Command::Abort,
        ] {
            let conflict = m.command(&plan, command, 1).unwrap_err();
            assert_eq!(conflict.state, State::Idle);
        }
        m.command(&plan, Command::Start, 1).unwrap();
        assert!(m.command(&plan, Command::Start, 2).is_err());
        assert!(m.command(&plan, Command::Resume, 2).is_err());
        m.command(&plan, Command::Pause, 3).unwrap();
        assert!(m.command(&plan, Command::Pause, 3).is_err());
        // Paused: the verdicts may still roll back, but do not advance.
        assert_eq!(m.tick(&plan, &report(600, 500, PASS, PASS), 4), None);
        let resumed = m.command(&plan, Command::Resume, 5).unwrap();
        assert_eq!((resumed.canary_percent, m.state), (None, State::Running));
        let promoted = m.command(&plan, Command::Promote, 6).unwrap();
        assert_eq!(promoted.canary_percent, Some(100));
        let conflict = m.command(&plan, Command::Start, 7).unwrap_err();
        assert_eq!(conflict.state, State::Promoted);
        assert!(conflict.to_string().contains("reload"), "{conflict}");
        let change = m.reset(8, "new pair");
        assert_eq!((change.event, m.state), (Event::Reset, State::Idle));
        m.command(&plan, Command::Start, 9).unwrap();
        let aborted = m.command(&plan, Command::Abort, 10).unwrap();
        assert_eq!(
            (aborted.event, aborted.canary_percent),
            (Event::Aborted, Some(0))
        );
        // A rolled-back rollout can start again from the first step.
        let again = m.command(&plan, Command::Start, 11).unwrap();
        assert_eq!((again.canary_percent, m.step), (Some(1), 0));
    }

    #[test]
    fn an_inconclusive_step_does_what_the_plan_says_at_max_step_time() {
        for (rule, state, percent) in [
            (OnInconclusive::Hold, State::Running, 1),
            (OnInconclusive::Rollback, State::RolledBack, 0),
            (OnInconclusive::Advance, State::Running, 5),
        ] {
            let plan = Plan {
                on_inconclusive: rule,
                ..plan(&[])
            };
            let mut m = Machine::default();
            m.command(&plan, Command::Start, 1).unwrap();
            assert_eq!(m.tick(&plan, &report(599, 0, UNSURE, UNSURE), 2), None);
            m.tick(&plan, &report(600, 0, UNSURE, UNSURE), 3).unwrap();
            assert_eq!((m.state, m.canary_percent), (state, percent), "{rule:?}");
            if rule == OnInconclusive::Hold {
                // Said once, not every interval.
                assert_eq!(m.tick(&plan, &report(700, 0, UNSURE, UNSURE), 4), None);
            }
        }
    }

    #[test]
    fn no_traffic_never_fails_nor_advances() {
        let plan = plan(&[]);
        let mut m = Machine::default();
        m.command(&plan, Command::Start, 1).unwrap();
        for now in 2..100 {
            assert_eq!(m.tick(&plan, &report(now, 0, UNSURE, UNSURE), now), None);
        }
        assert_eq!((m.state, m.canary_percent), (State::Running, 1));
    }

    #[test]
    fn history_is_bounded_and_serializes() {
        let plan = plan(&[]);
        let mut m = Machine::default();
        for now in 0..150 {
            m.command(&plan, Command::Start, now).unwrap();
            m.command(&plan, Command::Abort, now).unwrap();
        }
        assert_eq!(m.history.len(), HISTORY);
        let text = serde_json::to_string(&m).unwrap();
        let back: Machine = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
    }
}
