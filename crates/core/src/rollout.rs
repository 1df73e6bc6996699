//! The persisted state of one rollout and the operator commands on it.
//!
//! Every mutation here is a pure function of the current state, its input and
//! `now`; the server persists the result before acting on it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{format_duration, RolloutSpec, Timestamp};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused,
    /// Every planned node has finished (upgraded, failed within budget, or unreachable).
    Completed,
    /// Stopped by failures, with automatic rollback off.
    Failed,
    /// Stopped by the operator; upgraded nodes stay upgraded.
    Cancelled,
    /// Returning every upgraded node to its previous version.
    RollingBack,
    /// Every node the rollout changed is back on its previous version.
    RolledBack,
    /// The rollback ended with nodes that are not back, or not known to be:
    /// a revert that failed, or a node lost while its task ran. The reason
    /// names them.
    RollbackFailed,
}

impl RolloutState {
    /// Every state, for what lists them all (metrics export each from the
    /// start, at 0).
    pub const ALL: [RolloutState; 8] = [
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Completed,
        RolloutState::Failed,
        RolloutState::Cancelled,
        RolloutState::RollingBack,
        RolloutState::RolledBack,
        RolloutState::RollbackFailed,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RolloutState::Completed
                | RolloutState::Failed
                | RolloutState::Cancelled
                | RolloutState::RolledBack
                | RolloutState::RollbackFailed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Failed => "failed",
            RolloutState::Cancelled => "cancelled",
            RolloutState::RollingBack => "rolling_back",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::RollbackFailed => "rollback_failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Pending,
    /// An upgrade task is in flight.
    Upgrading,
    /// Passed its health gate on the target version.
    Upgraded,
    /// Failed its upgrade; its agent put it back on its previous version.
    Failed,
    /// Could not be reached when its turn came or while its task ran: not a
    /// verdict on the release.
    Unreachable,
    /// A revert task is in flight.
    RollingBack,
    RolledBack,
    RollbackFailed,
    /// All at once, phase one: downloading and verifying the release.
    Staging,
    /// All at once: the release is ready; the switch waits for every node.
    Staged,
    /// Back after being unreachable: switching to the version the rest of
    /// the rollout reached.
    Converging,
    /// Running the release's dry run against a copy of its data; the node
    /// itself does not change.
    DryRunning,
}

impl NodeState {
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            NodeState::Upgrading
                | NodeState::RollingBack
                | NodeState::Staging
                | NodeState::Converging
                | NodeState::DryRunning
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Pending => "pending",
            NodeState::Upgrading => "upgrading",
            NodeState::Upgraded => "upgraded",
            NodeState::Failed => "failed",
            NodeState::Unreachable => "unreachable",
            NodeState::RollingBack => "rolling_back",
            NodeState::RolledBack => "rolled_back",
            NodeState::RollbackFailed => "rollback_failed",
            NodeState::Staging => "staging",
            NodeState::Staged => "staged",
            NodeState::Converging => "converging",
            NodeState::DryRunning => "dry_running",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Stage, back up, switch to the target version and pass the health gate.
    Upgrade,
    /// Return to the version the node ran before this rollout.
    Revert,
    /// Download, verify and unpack the target version ahead of the node's
    /// turn; switches nothing.
    Stage,
    /// An upgrade of a node that was unreachable during the rollout, once
    /// it is back.
    Converge,
    /// Stage the release and run its dry run against a throwaway copy of
    /// the service's data; switches nothing.
    DryRun,
}

impl TaskKind {
    /// Every kind, for what lists them all.
    pub const ALL: [TaskKind; 5] = [
        TaskKind::Upgrade,
        TaskKind::Revert,
        TaskKind::Stage,
        TaskKind::Converge,
        TaskKind::DryRun,
    ];
}

/// A task assigned to a node. Its id is derived from the rollout, the node and
/// the kind, so re-sending it after a crash is recognised by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskRef {
    pub id: String,
    pub kind: TaskKind,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub started_at: Timestamp,
}

/// What an agent reports when a task ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum TaskOutcome {
    Succeeded,
    Failed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeProgress {
    pub batch: usize,
    /// The version the node ran when the rollout started.
    pub from_version: Option<String>,
    pub state: NodeState,
    /// The in-flight task, or the last one.
    pub task: Option<TaskRef>,
    /// The latest step an agent reported for the in-flight task.
    #[serde(default)]
    pub phase: Option<String>,
    pub reason: Option<String>,
    /// Since when (Unix milliseconds) the node has been offline while its
    /// turn had come.
    #[serde(default)]
    #[schema(value_type = Option<u64>)]
    pub waiting_since: Option<Timestamp>,
    /// Whether a stage task (download ahead of its turn) was sent.
    #[serde(default)]
    pub stage_sent: bool,
    /// Whether the node reached the target version by converging (its
    /// backup is under the converge task).
    #[serde(default)]
    pub converged: bool,
    /// Whether its role probe said `leader` when it started (with
    /// `order = "leader_last"`): its task runs the `pre_leader` hooks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leader: bool,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub updated_at: Timestamp,
}

impl NodeProgress {
    /// Whether a rollback cannot count this node as back on the version it
    /// ran before: its revert failed, or it was lost while a task that
    /// switches versions ran, so what it runs now is not known.
    pub fn not_back(&self) -> bool {
        match self.state {
            NodeState::RollbackFailed => true,
            NodeState::Unreachable => self.task.as_ref().is_some_and(|t| {
                matches!(
                    t.kind,
                    TaskKind::Upgrade | TaskKind::Revert | TaskKind::Converge
                )
            }),
            _ => false,
        }
    }
}

/// Joins a rollback's own reason to why it was started, in a
/// `RollbackFailed` rollout's reason; [`Rollout::rollback_cause`] splits it.
const ROLLBACK_CAUSE: &str = "; the rollback followed: ";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RolloutEvent {
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Rollout {
    pub id: u64,
    /// Bumped by the store on every write; writes compare and swap on it.
    pub generation: u64,
    pub spec: RolloutSpec,
    pub state: RolloutState,
    /// Why the rollout is in its state (failure, cancellation, rollback).
    pub reason: Option<String>,
    /// What the rollout waits for now, if anything.
    #[serde(default)]
    pub waiting: Option<String>,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub created_at: Timestamp,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub updated_at: Timestamp,
    /// Unix milliseconds.
    #[schema(value_type = Option<u64>)]
    pub finished_at: Option<Timestamp>,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub last_progress_at: Timestamp,
    /// The waves, in order; each starts when the one before has finished.
    pub batches: Vec<Vec<String>>,
    /// Per wave: whether the rollout waits for a promotion once it is done.
    #[serde(default)]
    pub pauses: Vec<bool>,
    /// Waves whose pause the operator has lifted.
    #[serde(default)]
    pub promoted: Vec<usize>,
    pub nodes: BTreeMap<String, NodeProgress>,
    /// Nodes running the service that the selector left out.
    pub left_out: Vec<String>,
    pub events: Vec<RolloutEvent>,
    /// Rollouts started by the same request that must complete before this
    /// one starts (`depends_on`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<u64>,
    /// Set once every rollout in `after` has completed.
    #[serde(default)]
    pub dependencies_done: bool,
    /// A newer rollout of the same service: this one no longer converges
    /// the nodes it could not reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<u64>,
    /// With `auto_finalize`: what finalizing at the end did (or why not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalized: Option<String>,
    /// The `pre_rollout` hooks have run and passed: nodes may change.
    #[serde(default)]
    pub pre_rollout_done: bool,
    /// The hooks of the end (`post_rollout`, then `on_success` or
    /// `on_failure`) have run.
    #[serde(default)]
    pub end_hooks_done: bool,
    /// The release's dry run passed (see [`RolloutSpec::dry_run`]).
    #[serde(default)]
    pub dry_run_done: bool,
    /// How many nodes a rollback sends back at once, as the operator asked
    /// (`rollback --batch`; 100% with `--all-at-once`); `None`: the
    /// rollout's own `max_unavailable`, so that a rollback takes no more of
    /// the service down than the rollout was allowed to.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub rollback_batch: Option<crate::Amount>,
    /// The analyses of each wave so far, with their measurements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<crate::AnalysisRun>,
}

/// Which hooks of a rollout run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookStage {
    PreRollout,
    End,
}

/// A rollout another one depends on, as the executor sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub id: u64,
    pub service: String,
    pub version: String,
    pub state: RolloutState,
}

/// An operator command that does not apply to the rollout's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rollout {id} is {state}: cannot {command}")]
pub struct CommandError {
    pub id: u64,
    pub state: &'static str,
    pub command: &'static str,
}

impl Rollout {
    /// What taking `node` to the rollout's version is, in words that say
    /// so: "downgrade" when it runs a newer version, else "upgrade".
    pub fn move_of(&self, node: &str) -> &'static str {
        let from = self.nodes.get(node).and_then(|n| n.from_version.as_deref());
        let newer = |from: &str| match (
            semver::Version::parse(from),
            semver::Version::parse(&self.spec.version),
        ) {
            (Ok(from), Ok(to)) => from > to,
            _ => false,
        };
        if from.is_some_and(newer) {
            "downgrade"
        } else {
            "upgrade"
        }
    }

    /// A copy without the parts that grow with the fleet (`nodes`,
    /// `events`, `batches`, `left_out`), which stores keep as records of
    /// their own. Every field is named, so a new one cannot be forgotten.
    pub fn header(&self) -> Rollout {
        let Rollout {
            id,
            generation,
            spec,
            state,
            reason,
            waiting,
            created_at,
            updated_at,
            finished_at,
            last_progress_at,
            batches: _,
            pauses,
            promoted,
            nodes: _,
            left_out: _,
            events: _,
            after,
            dependencies_done,
            superseded_by,
            finalized,
            pre_rollout_done,
            end_hooks_done,
            dry_run_done,
            rollback_batch,
            analysis,
        } = self;
        Rollout {
            id: *id,
            generation: *generation,
            spec: spec.clone(),
            state: *state,
            reason: reason.clone(),
            waiting: waiting.clone(),
            created_at: *created_at,
            updated_at: *updated_at,
            finished_at: *finished_at,
            last_progress_at: *last_progress_at,
            batches: Vec::new(),
            pauses: pauses.clone(),
            promoted: promoted.clone(),
            nodes: BTreeMap::new(),
            left_out: Vec::new(),
            events: Vec::new(),
            after: after.clone(),
            dependencies_done: *dependencies_done,
            superseded_by: *superseded_by,
            finalized: finalized.clone(),
            pre_rollout_done: *pre_rollout_done,
            end_hooks_done: *end_hooks_done,
            dry_run_done: *dry_run_done,
            rollback_batch: *rollback_batch,
            analysis: analysis.clone(),
        }
    }

    pub fn task_id(&self, node: &str, kind: TaskKind) -> String {
        let k = match kind {
            TaskKind::Upgrade => "up",
            TaskKind::Revert => "rb",
            TaskKind::Stage => "st",
            TaskKind::Converge => "cv",
            TaskKind::DryRun => "dr",
        };
        format!("r{}-{k}-{node}", self.id)
    }

    /// Whether this rollout still waits for the rollouts it depends on.
    pub fn blocked(&self) -> bool {
        !self.after.is_empty() && !self.dependencies_done
    }

    /// Holds the rollout until every rollout it depends on has completed,
    /// and cancels it, untouched, if one of them ends any other way. Returns
    /// whether the planner may step it.
    pub fn await_dependencies(&mut self, deps: &[Dependency], now: Timestamp) -> bool {
        if !self.blocked() || !matches!(self.state, RolloutState::Running | RolloutState::Paused) {
            return true;
        }
        if let Some(d) = deps
            .iter()
            .find(|d| d.state.is_terminal() && d.state != RolloutState::Completed)
        {
            let reason = format!(
                "not started: rollout {} of {}@{}, which it depends on, ended {}",
                d.id,
                d.service,
                d.version,
                d.state.as_str()
            );
            self.set_state(RolloutState::Cancelled, Some(reason), now);
            return false;
        }
        let open: Vec<String> = deps
            .iter()
            .filter(|d| d.state != RolloutState::Completed)
            .map(|d| format!("rollout {} of {} ({})", d.id, d.service, d.state.as_str()))
            .collect();
        if open.is_empty() {
            self.dependencies_done = true;
            self.waiting = None;
            // The wait was not a lack of progress.
            self.last_progress_at = now;
            let done: Vec<String> = deps
                .iter()
                .map(|d| format!("{}@{}", d.service, d.version))
                .collect();
            self.event(
                now,
                None,
                format!("{} completed: starting", done.join(", ")),
            );
            return true;
        }
        if self.state == RolloutState::Running {
            self.waiting = Some(format!("waits for {} to complete", open.join(", ")));
        }
        false
    }

    /// Hands the nodes this rollout could not reach over to a newer rollout
    /// of the same service, which sets the version they should reach.
    pub fn supersede(&mut self, by: u64, now: Timestamp) {
        if self.superseded_by.is_some() {
            return;
        }
        self.superseded_by = Some(by);
        self.event(
            now,
            None,
            format!("superseded by rollout {by}: it takes over the nodes this one could not reach"),
        );
        self.updated_at = now;
    }

    /// Whether the rollout has ended with nothing in flight; a completed one
    /// may still converge nodes that come back (see [`Rollout::converging`]).
    pub fn settled(&self) -> bool {
        self.state.is_terminal() && self.in_flight().next().is_none()
    }

    /// Whether the executor still has to watch this rollout.
    pub fn is_active(&self) -> bool {
        !self.state.is_terminal()
            || self.nodes.values().any(|n| n.state.in_flight())
            || self.converging()
            || self.finalize_due()
            || self.end_hooks_due()
    }

    /// Whether the `pre_rollout` hooks must run before anything starts.
    pub fn pre_rollout_due(&self) -> bool {
        !self.spec.hooks.pre_rollout.is_empty()
            && !self.pre_rollout_done
            && self.state == RolloutState::Running
    }

    /// Whether the hooks of the end must run: the rollout ended, with
    /// nothing in flight, and they have not run.
    pub fn end_hooks_due(&self) -> bool {
        !self.end_hooks_done && self.settled() && !self.end_hooks().is_empty()
    }

    /// The hooks of the end, in order: `post_rollout`, then `on_success` for
    /// a completed rollout or `on_failure` for one that failed or was rolled
    /// back (a cancelled one gets only `post_rollout`).
    pub fn end_hooks(&self) -> Vec<crate::Hook> {
        let h = &self.spec.hooks;
        let mut out = h.post_rollout.clone();
        match self.state {
            RolloutState::Completed => out.extend(h.on_success.iter().cloned()),
            RolloutState::Failed | RolloutState::RolledBack | RolloutState::RollbackFailed => {
                out.extend(h.on_failure.iter().cloned())
            }
            _ => {}
        }
        out
    }

    /// Records how a stage of hooks ran. A failed `pre_rollout` hook (with
    /// `on_error = "fail"`) fails the rollout before any node changed.
    pub fn record_hooks(
        &mut self,
        stage: HookStage,
        reports: &[crate::HookReport],
        now: Timestamp,
    ) {
        for r in reports {
            self.event(now, None, r.summary());
        }
        let failed = reports
            .iter()
            .zip(match stage {
                HookStage::PreRollout => self.spec.hooks.pre_rollout.clone(),
                HookStage::End => self.end_hooks(),
            })
            .find(|(r, h)| !r.ok && h.on_error == crate::OnError::Fail)
            .map(|(r, _)| r.clone());
        let running = matches!(self.state, RolloutState::Running | RolloutState::Paused);
        match stage {
            // Cancelled or rolled back while its hooks ran: only the log.
            HookStage::PreRollout if !running => {}
            HookStage::PreRollout => {
                if let Some(f) = failed {
                    let reason = format!(
                        "pre_rollout hook {} failed ({}): no node was changed",
                        f.name,
                        f.error.as_deref().unwrap_or("failed")
                    );
                    self.set_state(RolloutState::Failed, Some(reason), now);
                } else {
                    self.pre_rollout_done = true;
                    // Time spent in hooks is not a lack of progress.
                    self.last_progress_at = now;
                }
            }
            HookStage::End => self.end_hooks_done = true,
        }
        self.updated_at = now;
    }

    /// Whether `auto_finalize` still has to run: the rollout completed and
    /// converges nothing more.
    pub fn finalize_due(&self) -> bool {
        self.spec.auto_finalize
            && self.state == RolloutState::Completed
            && self.finalized.is_none()
            && !self.converging()
            && self.in_flight().next().is_none()
    }

    /// Records what `auto_finalize` did.
    pub fn record_finalize(&mut self, outcome: String, now: Timestamp) {
        self.event(now, None, outcome.clone());
        self.finalized = Some(outcome);
        self.updated_at = now;
    }

    /// Whether this completed rollout still brings nodes it could not reach
    /// to its version when they come back.
    pub fn converging(&self) -> bool {
        self.state == RolloutState::Completed
            && self.superseded_by.is_none()
            && self
                .nodes
                .values()
                .any(|n| matches!(n.state, NodeState::Unreachable | NodeState::Converging))
    }

    pub fn in_flight(&self) -> impl Iterator<Item = (&str, &TaskRef)> {
        self.nodes.iter().filter_map(|(name, n)| {
            n.task
                .as_ref()
                .filter(|_| n.state.in_flight())
                .map(|t| (name.as_str(), t))
        })
    }

    pub fn count(&self, state: NodeState) -> usize {
        self.nodes.values().filter(|n| n.state == state).count()
    }

    /// Whether every node the rollout targeted ended on the target version.
    pub fn fully_upgraded(&self) -> bool {
        self.state == RolloutState::Completed
            && self.nodes.values().all(|n| n.state == NodeState::Upgraded)
    }

    /// Ends a rollback that has nothing left in flight: `RolledBack` when
    /// every node is back, else `RollbackFailed`, with a reason that names
    /// the nodes that are not (and why) before why the rollback started.
    pub(crate) fn finish_rollback(&mut self, now: Timestamp) {
        let mut not_back = Vec::new();
        let mut total = 0;
        for (name, n) in self.nodes.iter().filter(|(_, n)| n.not_back()) {
            total += 1;
            if not_back.len() < crate::summary::PROBLEMS_SHOWN {
                let why = n.reason.as_deref().unwrap_or("no reason given");
                not_back.push(format!("{name} ({}: {why})", n.state.as_str()));
            }
        }
        let cause = self.rollback_cause().map(str::to_string);
        if total == 0 {
            self.set_state(RolloutState::RolledBack, None, now);
            self.reason = cause;
            return;
        }
        let more = match total - not_back.len() {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        let mut reason = format!(
            "{total} of {} not back on their previous version: {}{more}",
            crate::count(self.nodes.len(), "node"),
            not_back.join("; ")
        );
        if let Some(c) = cause {
            reason.push_str(ROLLBACK_CAUSE);
            reason.push_str(&c);
        }
        self.set_state(RolloutState::RollbackFailed, Some(reason), now);
    }

    /// Why the rollback was started: the reason, without what a
    /// `RollbackFailed` state added to it.
    pub fn rollback_cause(&self) -> Option<&str> {
        let reason = self.reason.as_deref()?;
        if self.state != RolloutState::RollbackFailed {
            return Some(reason);
        }
        reason
            .split_once(ROLLBACK_CAUSE)
            .map(|(_, cause)| cause)
            .or(Some(reason))
    }

    pub(crate) fn event(&mut self, now: Timestamp, node: Option<&str>, message: String) {
        self.events.push(RolloutEvent {
            at: now,
            node: node.map(str::to_string),
            message,
        });
    }

    pub(crate) fn set_state(
        &mut self,
        state: RolloutState,
        reason: Option<String>,
        now: Timestamp,
    ) {
        if self.state == state {
            return;
        }
        let msg = match &reason {
            Some(r) => format!("rollout {}: {r}", state.as_str()),
            None => format!("rollout {}", state.as_str()),
        };
        self.event(now, None, msg);
        self.state = state;
        if reason.is_some() {
            self.reason = reason;
        }
        if state.is_terminal() {
            self.finished_at = Some(now);
            self.waiting = None;
        }
    }

    fn refuse(&self, command: &'static str) -> CommandError {
        CommandError {
            id: self.id,
            state: self.state.as_str(),
            command,
        }
    }

    pub fn pause(&mut self, now: Timestamp) -> Result<(), CommandError> {
        match self.state {
            RolloutState::Running => {
                self.set_state(RolloutState::Paused, None, now);
                self.waiting = Some("paused by operator: resume to continue".into());
                Ok(())
            }
            RolloutState::Paused => Ok(()),
            _ => Err(self.refuse("pause")),
        }
    }

    pub fn resume(&mut self, now: Timestamp) -> Result<(), CommandError> {
        match self.state {
            RolloutState::Paused => {
                self.set_state(RolloutState::Running, None, now);
                self.waiting = None;
                // Time spent paused is not a lack of progress.
                self.last_progress_at = now;
                Ok(())
            }
            RolloutState::Running => Ok(()),
            _ => Err(self.refuse("resume")),
        }
    }

    /// Lets a canary continue past the wave it paused after.
    pub fn promote(&mut self, now: Timestamp) -> Result<(), CommandError> {
        let waiting = (0..self.batches.len()).find(|&w| {
            self.pauses.get(w) == Some(&true)
                && !self.promoted.contains(&w)
                && self.batches[..=w].iter().flatten().all(|n| {
                    let s = self.nodes[n].state;
                    s != NodeState::Pending && !s.in_flight()
                })
        });
        match (self.state, waiting) {
            (RolloutState::Running | RolloutState::Paused, Some(w)) => {
                self.promoted.push(w);
                // Time spent waiting for the operator is not a lack of progress.
                self.last_progress_at = now;
                self.event(now, None, format!("wave {} promoted by operator", w + 1));
                Ok(())
            }
            _ => Err(CommandError {
                id: self.id,
                state: "not waiting for a promotion",
                command: "promote",
            }),
        }
    }

    pub fn cancel(&mut self, now: Timestamp) -> Result<(), CommandError> {
        let switching = self.spec.all_at_once
            && self
                .nodes
                .values()
                .any(|n| matches!(n.state, NodeState::Upgrading | NodeState::Upgraded));
        if switching && !self.state.is_terminal() {
            // Stopping here could leave the fleet mixed, which all at once
            // promises never to do.
            return Err(CommandError {
                id: self.id,
                state: "switching every node at once (roll it back instead)",
                command: "cancel",
            });
        }
        match self.state {
            RolloutState::Running | RolloutState::Paused => {
                self.set_state(
                    RolloutState::Cancelled,
                    Some("cancelled by operator; upgraded nodes keep the new version".into()),
                    now,
                );
                Ok(())
            }
            RolloutState::Cancelled => Ok(()),
            _ => Err(self.refuse("cancel")),
        }
    }

    /// Returns every node this rollout upgraded to its previous version.
    /// Starts rolling back, `batch` nodes at a time (`None`: within the
    /// rollout's `max_unavailable`).
    pub fn rollback(
        &mut self,
        batch: Option<crate::Amount>,
        now: Timestamp,
    ) -> Result<(), CommandError> {
        match self.state {
            // A revert that failed is answered from the node's journal if
            // sent again: a node that did not come back needs the operator.
            RolloutState::RollingBack | RolloutState::RolledBack | RolloutState::RollbackFailed => {
                Ok(())
            }
            _ => {
                self.set_state(
                    RolloutState::RollingBack,
                    Some("rollback requested by operator".into()),
                    now,
                );
                self.finished_at = None;
                self.rollback_batch = batch;
                Ok(())
            }
        }
    }

    /// Records a progress step of an in-flight task; stale reports are ignored.
    pub fn record_phase(&mut self, node: &str, task_id: &str, phase: &str, now: Timestamp) -> bool {
        let Some(n) = self.nodes.get_mut(node) else {
            return false;
        };
        let current = n.task.as_ref().is_some_and(|t| t.id == task_id) && n.state.in_flight();
        if !current || n.phase.as_deref() == Some(phase) {
            return false;
        }
        n.phase = Some(phase.to_string());
        n.updated_at = now;
        self.event(now, Some(node), phase.to_string());
        true
    }

    fn record_dry_run(
        &mut self,
        node: &str,
        outcome: &TaskOutcome,
        elapsed: Timestamp,
        now: Timestamp,
    ) -> bool {
        // Only the dry run in flight counts: one given up (its node went
        // away; another ran it) may report long after, even once the node
        // has been given up as unreachable in its wave.
        let Some(n) = self
            .nodes
            .get_mut(node)
            .filter(|n| n.state == NodeState::DryRunning)
        else {
            return false;
        };
        // The node did not change: it waits for its turn like any other.
        n.state = NodeState::Pending;
        n.reason = None;
        n.phase = None;
        n.updated_at = now;
        self.last_progress_at = now;
        match outcome {
            TaskOutcome::Succeeded => {
                self.dry_run_done = true;
                let msg = format!("dry run passed in {}", format_duration(elapsed));
                self.event(now, Some(node), msg);
            }
            TaskOutcome::Failed { reason } => {
                self.event(now, Some(node), format!("dry run failed: {reason}"));
                if matches!(self.state, RolloutState::Running | RolloutState::Paused) {
                    let why = format!("dry run on {node} failed: {reason}; no node was changed");
                    self.set_state(RolloutState::Failed, Some(why), now);
                }
            }
        }
        true
    }

    /// Records the end of a task. Idempotent: a result for a task that is not
    /// the node's current one, or that was already recorded, changes nothing.
    pub fn record_result(
        &mut self,
        node: &str,
        task_id: &str,
        outcome: &TaskOutcome,
        now: Timestamp,
    ) -> bool {
        let move_of = self.move_of(node);
        let Some(n) = self.nodes.get_mut(node) else {
            return false;
        };
        let Some(task) = n.task.as_ref().filter(|t| t.id == task_id) else {
            return false;
        };
        // A node given up as unreachable may still report how its task ended.
        if !n.state.in_flight() && n.state != NodeState::Unreachable {
            return false;
        }
        let kind = task.kind;
        let elapsed = now.saturating_sub(task.started_at);
        let (state, reason, msg) = match (kind, outcome) {
            // Only all at once makes a stage task a node's own task.
            (TaskKind::Stage, TaskOutcome::Succeeded) => (
                NodeState::Staged,
                None,
                format!("staged {}", self.spec.version),
            ),
            (TaskKind::Stage, TaskOutcome::Failed { reason }) => (
                NodeState::Failed,
                Some(format!("staging failed: {reason}")),
                format!("staging failed, nothing switched on this node: {reason}"),
            ),
            (TaskKind::Converge, TaskOutcome::Succeeded) => (
                NodeState::Upgraded,
                None,
                format!(
                    "converged to {} in {}",
                    self.spec.version,
                    format_duration(elapsed)
                ),
            ),
            (TaskKind::Converge, TaskOutcome::Failed { reason }) => (
                NodeState::Failed,
                Some(reason.clone()),
                format!("converging failed, node back on its previous version: {reason}"),
            ),
            (TaskKind::Upgrade, TaskOutcome::Succeeded) => (
                NodeState::Upgraded,
                None,
                format!(
                    "{move_of}d to {} in {}",
                    self.spec.version,
                    format_duration(elapsed)
                ),
            ),
            (TaskKind::Upgrade, TaskOutcome::Failed { reason }) => (
                NodeState::Failed,
                Some(reason.clone()),
                format!("{move_of} failed, node back on its previous version: {reason}"),
            ),
            (TaskKind::Revert, TaskOutcome::Succeeded) => (
                NodeState::RolledBack,
                None,
                format!(
                    "rolled back to {}",
                    n.from_version.as_deref().unwrap_or("its previous version")
                ),
            ),
            (TaskKind::Revert, TaskOutcome::Failed { reason }) => (
                NodeState::RollbackFailed,
                Some(reason.clone()),
                format!("rollback failed: {reason}"),
            ),
            (TaskKind::DryRun, _) => return self.record_dry_run(node, outcome, elapsed, now),
        };
        n.state = state;
        n.reason = reason;
        n.phase = None;
        n.updated_at = now;
        n.converged |= kind == TaskKind::Converge && state == NodeState::Upgraded;
        self.last_progress_at = now;
        self.event(now, Some(node), msg);
        // A node given up as unreachable may report a late upgrade after the
        // rollback finished: reopen it, so that this node is returned too.
        // Any late result of a rollback that did not bring every node back
        // may change that verdict: the next step decides it again.
        let reopen = match self.state {
            RolloutState::RolledBack => state == NodeState::Upgraded,
            RolloutState::RollbackFailed => true,
            _ => false,
        };
        if reopen {
            let cause = self.rollback_cause().map(str::to_string);
            self.set_state(RolloutState::RollingBack, None, now);
            self.reason = cause;
            self.finished_at = None;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{plan_batches, Fleet, Health, NodeView, RolloutFile, ServiceView};

    fn blocked_rollout() -> Rollout {
        let fleet: Fleet = [(
            "n1".to_string(),
            NodeView {
                name: "n1".into(),
                labels: Default::default(),
                online: true,
                last_seen: 0,
                services: [(
                    "api".to_string(),
                    ServiceView {
                        version: Some("1.0.0".into()),
                        health: Health::Healthy,
                        staged: Vec::new(),
                        ..Default::default()
                    },
                )]
                .into(),
            },
        )]
        .into();
        let spec = RolloutFile {
            service: Some("api".into()),
            version: Some("2.0.0".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let mut r = plan_batches(2, spec, &fleet, 0).unwrap();
        r.after = vec![1];
        r
    }

    fn db(state: RolloutState) -> Dependency {
        Dependency {
            id: 1,
            service: "db".into(),
            version: "2.0.0".into(),
            state,
        }
    }

    #[test]
    fn a_dependent_waits_then_starts_with_a_fresh_progress_clock() {
        let mut r = blocked_rollout();
        assert!(!r.await_dependencies(&[db(RolloutState::Running)], 1_000));
        assert_eq!(
            r.waiting.as_deref(),
            Some("waits for rollout 1 of db (running) to complete")
        );
        let before = r.clone();
        assert!(!r.await_dependencies(&[db(RolloutState::Running)], 2_000));
        assert_eq!(r, before, "waiting again changes nothing");
        assert!(r.await_dependencies(&[db(RolloutState::Completed)], 60_000));
        assert!(!r.blocked());
        assert_eq!(r.last_progress_at, 60_000);
        assert_eq!(r.waiting, None);
        assert!(r.await_dependencies(&[db(RolloutState::RolledBack)], 61_000));
    }

    fn report(ok: bool) -> crate::HookReport {
        crate::HookReport {
            name: "hooks.pre_rollout[0]".into(),
            ok,
            attempts: 1,
            exit_code: Some(if ok { 0 } else { 3 }),
            http_status: None,
            duration_ms: 5,
            output: String::new(),
            error: (!ok).then(|| "exited 3".into()),
        }
    }

    fn with_pre_rollout_hook() -> Rollout {
        let mut r = blocked_rollout();
        r.after.clear();
        r.spec.hooks.pre_rollout = crate::HooksFile {
            pre_rollout: vec![crate::HookFile {
                command: Some(vec!["true".into()]),
                ..Default::default()
            }],
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .pre_rollout;
        r
    }

    #[test]
    fn a_failed_pre_rollout_hook_fails_the_rollout_before_any_change() {
        let mut r = with_pre_rollout_hook();
        assert!(r.pre_rollout_due());
        r.record_hooks(HookStage::PreRollout, &[report(false)], 1_000);
        assert_eq!(r.state, RolloutState::Failed);
        assert_eq!(
            r.reason.as_deref(),
            Some("pre_rollout hook hooks.pre_rollout[0] failed (exited 3): no node was changed")
        );
        assert_eq!(r.count(NodeState::Pending), 1);

        let mut r = with_pre_rollout_hook();
        r.record_hooks(HookStage::PreRollout, &[report(true)], 1_000);
        assert!(r.pre_rollout_done && !r.pre_rollout_due());
        assert_eq!(r.state, RolloutState::Running);

        // Cancelled while its hook ran: a late failure changes nothing more.
        let mut r = with_pre_rollout_hook();
        r.cancel(500).unwrap();
        r.record_hooks(HookStage::PreRollout, &[report(false)], 1_000);
        assert_eq!(r.state, RolloutState::Cancelled);
    }

    #[test]
    fn a_dependent_of_a_failed_rollout_is_cancelled_untouched() {
        let mut r = blocked_rollout();
        assert!(!r.await_dependencies(&[db(RolloutState::RolledBack)], 1_000));
        assert_eq!(r.state, RolloutState::Cancelled);
        assert_eq!(
            r.reason.as_deref(),
            Some("not started: rollout 1 of db@2.0.0, which it depends on, ended rolled_back")
        );
        assert_eq!(r.count(NodeState::Pending), 1);
    }
}
