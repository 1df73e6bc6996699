//! The rollout executor: a single task that owns every active rollout.
//!
//! It is level-triggered. On any event (an agent report, an operator command,
//! a deadline) it records the input, asks the pure planner what to do next,
//! persists that decision with a compare-and-swap on the rollout's generation,
//! and only then sends the tasks the decision implies. A crash between any two
//! of these steps is harmless: after a restart the rollouts are loaded, agents
//! reconnect, in-flight tasks are sent again, and agents recognise task ids
//! they have already run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rollwave_api::{artifact_path, ArtifactRef, FinalizeResponse, ServerMessage, Task, TaskAction};
use rollwave_core::{
    check_downgrade, check_finalize, newest_running, plan_batches, step_in_place,
    validate_service_name, ActiveVersion, Dependency, Dispatch, FinalizeError, Hook, HookReport,
    HookStage, Measurement, NodeProgress, NodeState, OnError, Release, Rollout, RolloutFile,
    RolloutState, TaskKind, TaskOutcome, TaskRef,
};
use rollwave_store::{RolloutWrite, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::{now_ms, ApiError, Shared};

/// Refuses a rollout that would take nodes to an older version than they
/// run unless the request says `downgrade`.
fn explicit_downgrade(r: &Rollout) -> Result<(), ApiError> {
    let Ok(target) = semver::Version::parse(&r.spec.version) else {
        return Ok(());
    };
    let newer: Vec<String> = r
        .nodes
        .iter()
        .filter_map(|(name, n)| {
            let from = n.from_version.as_deref()?;
            let v = semver::Version::parse(from).ok()?;
            (v > target).then(|| format!("{name} runs {from}"))
        })
        .collect();
    if newer.is_empty() {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "downgrade: {}@{} is older than what nodes run ({}): say so with --downgrade (downgrade = true)",
        r.spec.service,
        r.spec.version,
        newer.join(", ")
    )))
}

/// `node a, node b and 3 others`: a few names and how many more.
fn some_of(nodes: &[&str]) -> String {
    const SHOWN: usize = 3;
    let word = if nodes.len() == 1 { "node" } else { "nodes" };
    let names = nodes[..nodes.len().min(SHOWN)].join(", ");
    match nodes.len().saturating_sub(SHOWN) {
        0 => format!("{word} {names}"),
        more => format!("{word} {names} and {more} more"),
    }
}

/// Even with nothing to wake for, look again this often: a cheap backstop.
const MAX_SLEEP: Duration = Duration::from_secs(5);

/// At most this many events are taken between two passes.
const MAX_EVENTS_PER_PASS: usize = 10_000;

/// A rollout is stepped again no sooner than this many times what its last
/// step cost (stepping, comparing, publishing: all O(its nodes)), so that a
/// large rollout under a stream of results takes a bounded share of the CPU
/// and each step takes every result that arrived meanwhile at once.
const STEP_COST_FACTOR: u32 = 4;
/// ... and never more often than this (results that arrive within it share
/// one write: one sync, one copy of the rollout's header), nor less often
/// than the ceiling.
const MIN_STEP_GAP: Duration = Duration::from_millis(20);
const MAX_STEP_GAP: Duration = Duration::from_millis(500);

pub enum Event {
    Kick,
    AgentConnected(String),
    Phase {
        node: String,
        task_id: String,
        phase: String,
    },
    Result {
        node: String,
        task_id: String,
        outcome: TaskOutcome,
    },
    /// Starts the rollouts of a request: one per service, in dependency order.
    Start {
        file: RolloutFile,
        /// Start only if the plan made now has this id.
        plan_id: Option<String>,
        reply: oneshot::Sender<Result<Vec<Rollout>, ApiError>>,
    },
    Command {
        id: u64,
        command: Command,
        reply: oneshot::Sender<Result<Rollout, ApiError>>,
    },
    /// A stage of a rollout's hooks has run.
    HooksDone {
        id: u64,
        stage: HookStage,
        reports: Vec<HookReport>,
    },
    /// Sets a service's active version once every node runs it or newer.
    Finalize {
        service: String,
        to: Option<String>,
        reply: oneshot::Sender<Result<FinalizeResponse, ApiError>>,
    },
    /// Plans a rollout against the fleet as it is now, storing nothing.
    Plan {
        file: RolloutFile,
        reply: oneshot::Sender<Result<Vec<Rollout>, ApiError>>,
    },
    /// Deletes a release unless something uses it: decided here, in turn
    /// with rollout starts, so that no rollout can start on a release
    /// being deleted nor a release go under a rollout being started.
    DeleteRelease {
        service: String,
        version: String,
        /// The bytes the caller locked: refused if the release now has others.
        sha256: String,
        reply: oneshot::Sender<Result<Release, ApiError>>,
    },
    /// An analysis query answered (or failed): recorded on the rollout
    /// here, and written with the step that follows, like a task result.
    Measured {
        id: u64,
        wave: usize,
        name: String,
        measurement: Measurement,
    },
    /// A release pushed unsigned was signed: the one change a stored
    /// release can undergo, so tasks sent from now on carry the signature.
    ReleaseSigned {
        service: String,
        version: String,
    },
}

#[derive(Debug, Clone, Copy)]
pub enum Command {
    Pause,
    Resume,
    Cancel,
    /// How many nodes at once (`None`: within the rollout's budget).
    Rollback(Option<rollwave_core::Amount>),
    Promote,
}

#[derive(Clone)]
pub struct Handle(mpsc::UnboundedSender<Event>);

pub fn channel() -> (Handle, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Handle(tx), rx)
}

impl Handle {
    pub fn send(&self, event: Event) {
        // Only fails when the reconciler is gone, i.e. during shutdown.
        let _ = self.0.send(event);
    }

    pub async fn start(
        &self,
        file: RolloutFile,
        plan_id: Option<String>,
    ) -> Result<Vec<Rollout>, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Event::Start {
            file,
            plan_id,
            reply,
        });
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("reconciler stopped")))
    }

    pub async fn plan(&self, file: RolloutFile) -> Result<Vec<Rollout>, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Event::Plan { file, reply });
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("reconciler stopped")))
    }

    pub async fn finalize(
        &self,
        service: String,
        to: Option<String>,
    ) -> Result<FinalizeResponse, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Event::Finalize { service, to, reply });
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("reconciler stopped")))
    }

    pub async fn delete_release(
        &self,
        service: String,
        version: String,
        sha256: String,
    ) -> Result<Release, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Event::DeleteRelease {
            service,
            version,
            sha256,
            reply,
        });
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("reconciler stopped")))
    }

    pub async fn command(&self, id: u64, command: Command) -> Result<Rollout, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Event::Command { id, command, reply });
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("reconciler stopped")))
    }
}

struct Reconciler {
    shared: Arc<Shared>,
    /// Every rollout the reconciler watches, as it is now: what the store
    /// holds plus observations not yet written (task phases, results
    /// waiting for the next step).
    active: BTreeMap<u64, Rollout>,
    /// What the store holds of each active rollout, to write only what
    /// changed.
    stored: HashMap<u64, Stored>,
    /// Rollouts something happened to since their last step.
    due: BTreeSet<u64>,
    /// Each rollout's last step: when, and when the next may run.
    paced: HashMap<u64, Pace>,
    /// When the planner asked to look at each rollout again.
    wakeups: HashMap<u64, u64>,
    releases: HashMap<(String, String), Release>,
    /// Hook stages running now, each in a task of its own, so that a slow
    /// hook holds up only its rollout.
    hooks_running: HashSet<(u64, HookStage)>,
    hook_client: reqwest::Client,
    /// Analysis queries in flight, by rollout, wave and analysis: one at a
    /// time each, in a task of its own, so that a slow Prometheus holds up
    /// nothing but its analysis.
    measuring: HashSet<(u64, usize, String)>,
    prometheus: reqwest::Client,
    /// What the change stream has carried of each rollout.
    feed: crate::events::RolloutFeed,
}

/// What the store holds of a rollout: enough to tell what changed.
struct Stored {
    header: Rollout,
    nodes: BTreeMap<String, NodeProgress>,
    events: usize,
}

impl Stored {
    fn of(r: &Rollout) -> Stored {
        Stored {
            header: r.header(),
            nodes: r.nodes.clone(),
            events: r.events.len(),
        }
    }
}

#[derive(Clone, Copy)]
struct Pace {
    next: Instant,
}

/// Whether two records of a node differ in more than what a task phase
/// changes: a phase is an observation, written with the next decision.
fn decided(stored: &NodeProgress, now: &NodeProgress) -> bool {
    let NodeProgress {
        batch,
        from_version,
        state,
        task,
        phase: _,
        reason,
        waiting_since,
        stage_sent,
        converged,
        leader,
        updated_at: _,
    } = now;
    *batch != stored.batch
        || *from_version != stored.from_version
        || *state != stored.state
        || *task != stored.task
        || *reason != stored.reason
        || *waiting_since != stored.waiting_since
        || *stage_sent != stored.stage_sent
        || *converged != stored.converged
        || *leader != stored.leader
}

/// The rollout a task id belongs to: ids are `r<rollout>-<kind>-<node>`
/// (`Rollout::task_id`).
fn rollout_of_task(task_id: &str) -> Option<u64> {
    task_id.strip_prefix('r')?.split('-').next()?.parse().ok()
}

/// Loads the active rollouts and starts the reconciler task.
pub async fn spawn(
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Event>,
) -> Result<(), StoreError> {
    let mut active = BTreeMap::new();
    for r in shared.store.list_active_rollouts().await? {
        active.insert(r.id, r);
    }
    // Finished rollouts count in the metrics: their summaries, a page at a
    // time, cost their headers and node counts, not their node records.
    let mut before = None;
    loop {
        let page = shared.store.list_rollout_summaries(500, before).await?;
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        for s in page.iter().filter(|s| !active.contains_key(&s.id)) {
            shared.metrics.rollout_finished(s.id, s.state);
        }
    }
    if !active.is_empty() {
        tracing::info!(rollouts = ?active.keys().collect::<Vec<_>>(), "resuming rollouts");
    }
    let hook_client = rollwave_hooks::client()
        .map_err(|e| StoreError::Backend(format!("building the webhook client: {e}")))?;
    let prometheus = crate::analysis::client()
        .map_err(|e| StoreError::Backend(format!("building the Prometheus client: {e}")))?;
    let mut feed = crate::events::RolloutFeed::default();
    for r in active.values() {
        feed.baseline(r);
    }
    let stored = active.values().map(|r| (r.id, Stored::of(r))).collect();
    let due = active.keys().copied().collect();
    let r = Reconciler {
        shared,
        feed,
        active,
        stored,
        due,
        paced: HashMap::new(),
        wakeups: HashMap::new(),
        releases: HashMap::new(),
        hooks_running: HashSet::new(),
        hook_client,
        measuring: HashSet::new(),
        prometheus,
    };
    tokio::spawn(r.run(events));
    Ok(())
}

impl Reconciler {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        let mut sleep = MAX_SLEEP;
        loop {
            let event = match tokio::time::timeout(sleep, events.recv()).await {
                Ok(Some(e)) => Some(e),
                Ok(None) => return,
                Err(_) => None,
            };
            if let Some(e) = event {
                self.handle(e).await;
            }
            // Everything queued meanwhile, but not forever: under a stream
            // that never runs dry, rollouts still get stepped.
            for _ in 0..MAX_EVENTS_PER_PASS {
                let Ok(e) = events.try_recv() else { break };
                self.handle(e).await;
            }
            sleep = self.reconcile().await;
        }
    }

    async fn handle(&mut self, event: Event) {
        let now = now_ms();
        match event {
            // The fleet changed (a status, a node gone): any rollout may
            // now start a node or give one up.
            Event::Kick => self.due.extend(self.active.keys().copied()),
            Event::ReleaseSigned { service, version } => {
                self.releases.remove(&(service, version));
            }
            Event::AgentConnected(node) => {
                self.due.extend(self.active.keys().copied());
                // One lookup per rollout: the node's own record.
                let mut tasks: Vec<(u64, TaskRef)> = Vec::new();
                for r in self.active.values() {
                    let Some(n) = r.nodes.get(&node) else {
                        continue;
                    };
                    if let Some(t) = n.task.as_ref().filter(|_| n.state.in_flight()) {
                        tasks.push((r.id, t.clone()));
                    }
                    // A stage task sent before a disconnect may never have
                    // arrived; the agent answers it from its journal if it did.
                    if n.stage_sent && n.state == NodeState::Pending && !r.state.is_terminal() {
                        tasks.push((
                            r.id,
                            TaskRef {
                                id: r.task_id(&node, TaskKind::Stage),
                                kind: TaskKind::Stage,
                                started_at: now,
                            },
                        ));
                    }
                }
                for (id, task) in tasks {
                    self.send_task(id, &node, &task).await;
                }
            }
            Event::Phase {
                node,
                task_id,
                phase,
            } => {
                for r in self.active.values_mut() {
                    // Observations, not decisions: kept in memory (and shown
                    // through `live`), written with the rollout's next decision.
                    let new = r.record_phase(&node, &task_id, &phase, now);
                    if new {
                        self.due.insert(r.id);
                        if phase.starts_with("hook ") && phase.contains(" failed: ") {
                            self.shared.metrics.hook_failed("node");
                        }
                    }
                }
            }
            Event::Result {
                node,
                task_id,
                outcome,
            } => {
                // Recorded here, written with the step that follows: the
                // results of a wave arrive together and share one write.
                let ids: Vec<u64> = match rollout_of_task(&task_id) {
                    Some(id) if self.active.contains_key(&id) => vec![id],
                    _ => self.active.keys().copied().collect(),
                };
                for id in ids {
                    let Some(r) = self.active.get_mut(&id) else {
                        continue;
                    };
                    let task = r.nodes.get(&node).and_then(|n| n.task.clone());
                    let wave_was_done = crate::metrics::wave_done(r, &node);
                    if r.record_result(&node, &task_id, &outcome, now) {
                        if let Some(t) = task {
                            let took = now.saturating_sub(t.started_at);
                            self.shared.metrics.task_ended(t.kind, &outcome, took);
                            if !wave_was_done {
                                self.shared.metrics.wave_finished(r, &node, now);
                            }
                        }
                        tracing::info!(rollout = id, node = %node, task = %task_id, ?outcome, "task ended");
                        self.due.insert(id);
                    }
                }
            }
            Event::Measured {
                id,
                wave,
                name,
                measurement,
            } => {
                self.measuring.remove(&(id, wave, name.clone()));
                let verdict = measurement.verdict;
                let Some(r) = self.active.get_mut(&id) else {
                    return;
                };
                if r.record_measurement(wave, &name, measurement, now) {
                    self.shared.metrics.measured(verdict);
                    tracing::info!(rollout = id, wave, analysis = %name, verdict = verdict.as_str(), "measured");
                    self.due.insert(id);
                }
            }
            Event::Start {
                file,
                plan_id,
                reply,
            } => {
                let result = self.start(file, plan_id, now).await;
                let _ = reply.send(result);
            }
            Event::Plan { file, reply } => {
                let result = self.plan(file, now).await;
                let _ = reply.send(result);
            }
            Event::HooksDone { id, stage, reports } => {
                self.hooks_running.remove(&(id, stage));
                for _ in reports.iter().filter(|r| !r.ok) {
                    self.shared.metrics.hook_failed("control_plane");
                }
                if let Some(mut r) = self.active.get(&id).cloned() {
                    r.record_hooks(stage, &reports, now);
                    tracing::info!(
                        rollout = id,
                        ?stage,
                        ok = reports.iter().all(|r| r.ok),
                        "hooks ran"
                    );
                    self.save(r).await;
                }
            }
            Event::Finalize { service, to, reply } => {
                let result = self.finalize(&service, to, "finalize".into(), now).await;
                let _ = reply.send(result);
            }
            Event::Command { id, command, reply } => {
                let result = self.command(id, command, now).await;
                let _ = reply.send(result);
            }
            Event::DeleteRelease {
                service,
                version,
                sha256,
                reply,
            } => {
                let result = self.delete_release(&service, &version, &sha256).await;
                let _ = reply.send(result);
            }
        }
    }

    /// Deletes a release from the store if no rollout the reconciler
    /// watches targets it or may roll back to it, it is not the service's
    /// active version, and no node runs it or ran it last (a revert goes
    /// back there). The refusal names what uses it.
    async fn delete_release(
        &mut self,
        service: &str,
        version: &str,
        sha256: &str,
    ) -> Result<Release, ApiError> {
        let name = format!("{service}@{version}");
        let release = self
            .shared
            .store
            .get_release(service, version)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("release {name} not found")))?;
        if release.sha256 != sha256 {
            return Err(ApiError::conflict(format!(
                "release {name} was pushed again with other bytes while it was being deleted: try again"
            )));
        }
        let in_use = |why: String| ApiError::conflict(format!("release {name} is in use: {why}"));
        for r in self.active.values().filter(|r| r.spec.service == service) {
            let what = format!("rollout {} of {}@{}", r.id, r.spec.service, r.spec.version);
            let state = if r.converging() {
                "converging nodes that came back"
            } else {
                r.state.as_str()
            };
            if r.spec.version == version {
                return Err(in_use(format!("{what} targets it ({state})")));
            }
            let back: Vec<&str> = r
                .nodes
                .iter()
                .filter(|(_, n)| n.from_version.as_deref() == Some(version))
                .map(|(node, _)| node.as_str())
                .collect();
            if !back.is_empty() {
                return Err(in_use(format!(
                    "{what} ({state}) may roll {} back to it",
                    some_of(&back)
                )));
            }
        }
        if let Some(active) = self.shared.store.get_active_version(service).await? {
            if active.version == version {
                return Err(in_use(format!(
                    "it is the active version of {service} (set by {})",
                    active.by
                )));
            }
        }
        let (running, previous) = {
            let fleet = self.shared.fleet.lock().unwrap_or_else(|e| e.into_inner());
            let mut running = Vec::new();
            let mut previous = Vec::new();
            for (node, view) in fleet.iter() {
                let Some(s) = view.services.get(service) else {
                    continue;
                };
                if s.version.as_deref() == Some(version) {
                    running.push(node.clone());
                } else if s.previous.as_deref() == Some(version) {
                    previous.push(node.clone());
                }
            }
            (running, previous)
        };
        if !running.is_empty() {
            let nodes: Vec<&str> = running.iter().map(String::as_str).collect();
            let verb = if nodes.len() == 1 { "runs" } else { "run" };
            return Err(in_use(format!("{} {verb} it", some_of(&nodes))));
        }
        if !previous.is_empty() {
            let nodes: Vec<&str> = previous.iter().map(String::as_str).collect();
            return Err(in_use(format!(
                "{} ran it before their current version and would go back to it",
                some_of(&nodes)
            )));
        }
        self.shared.store.delete_release(service, version).await?;
        self.releases
            .remove(&(service.to_string(), version.to_string()));
        tracing::info!(service, version, sha256, "release deleted");
        Ok(release)
    }

    /// Validates a request against the releases and the fleet and plans one
    /// rollout per service (id 0), changing nothing.
    /// The plan `start` would follow now, refused for every reason `start`
    /// would refuse it: a plan that is the plan.
    async fn plan(&mut self, file: RolloutFile, now: u64) -> Result<Vec<Rollout>, ApiError> {
        let planned = self.make_plan(file, now).await?;
        self.check_start(&planned).await?;
        Ok(planned)
    }

    async fn make_plan(&mut self, file: RolloutFile, now: u64) -> Result<Vec<Rollout>, ApiError> {
        let specs = file.resolve_all()?;
        let fleet = self.fleet();
        let mut planned = Vec::with_capacity(specs.len());
        for mut spec in specs {
            let release = self
                .release(&spec.service, &spec.version)
                .await?
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "release {}@{} not found: push it first with `rollwave release push {} {} FILE`",
                        spec.service, spec.version, spec.service, spec.version
                    ))
                })?;
            spec.dry_run = release.manifest.is_some_and(|m| m.dry_run.is_some());
            planned.push(plan_batches(0, spec, &fleet, now)?);
        }
        Ok(planned)
    }

    async fn start(
        &mut self,
        file: RolloutFile,
        plan_id: Option<String>,
        now: u64,
    ) -> Result<Vec<Rollout>, ApiError> {
        let planned = self.make_plan(file, now).await?;
        let superseded = self.check_start(&planned).await?;
        if let Some(reviewed) = plan_id {
            let current = rollwave_core::plan_id(&planned);
            if current != reviewed.trim() {
                return Err(ApiError::conflict(format!(
                    "plan_id: the plan changed since plan {} (the fleet, the release or the spec): it is now plan {current}; review it again with `rollwave plan`",
                    reviewed.trim()
                )));
            }
        }
        self.insert(planned, superseded, now).await
    }

    /// What would refuse to start `planned` now (a downgrade not asked for
    /// or below the active version, another rollout of the service in
    /// progress); else the converging rollouts the new ones supersede.
    async fn check_start(&self, planned: &[Rollout]) -> Result<Vec<u64>, ApiError> {
        for p in planned {
            let active = self
                .shared
                .store
                .get_active_version(&p.spec.service)
                .await?;
            check_downgrade(&p.spec.service, &p.spec.version, active.as_ref())
                .map_err(ApiError::conflict)?;
            if !p.spec.downgrade {
                explicit_downgrade(p)?;
            }
        }
        let mut superseded = Vec::new();
        for p in planned {
            let service = &p.spec.service;
            let same = self.active.values().filter(|r| &r.spec.service == service);
            for r in same {
                // A completed rollout waiting for offline nodes gives way:
                // the new one sets the version they should reach.
                if r.converging() && r.in_flight().next().is_none() {
                    superseded.push(r.id);
                    continue;
                }
                return Err(ApiError::conflict(format!(
                    "rollout {} of {} is {}: wait for it to finish, cancel it or roll it back first",
                    r.id,
                    r.spec.service,
                    if r.converging() {
                        "converging a node that came back"
                    } else {
                        r.state.as_str()
                    }
                )));
            }
        }
        Ok(superseded)
    }

    async fn insert(
        &mut self,
        mut planned: Vec<Rollout>,
        superseded: Vec<u64>,
        now: u64,
    ) -> Result<Vec<Rollout>, ApiError> {
        // Ids are allocated only for plans that stand.
        let mut ids = HashMap::new();
        for p in &mut planned {
            p.id = self.shared.store.next_rollout_id().await?;
            ids.insert(p.spec.service.clone(), p.id);
        }
        for p in &mut planned {
            p.after = p.spec.depends_on.iter().map(|d| ids[d]).collect();
        }
        for old in superseded {
            let Some(mut r) = self.active.get(&old).cloned() else {
                continue;
            };
            r.supersede(ids[&r.spec.service], now);
            self.save(r).await;
        }
        // All or none: a crash must not leave a dependent without the
        // rollout it waits for, or the reverse.
        let stored = self.shared.store.insert_rollouts(&planned).await?;
        for r in stored {
            tracing::info!(rollout = r.id, service = %r.spec.service, version = %r.spec.version, nodes = r.nodes.len(), after = ?r.after, "rollout started");
            if !r.is_active() {
                // Ended as planned (every node on the version already):
                // nothing to watch.
                tracing::info!(rollout = r.id, state = r.state.as_str(), reason = ?r.reason, "rollout finished");
                self.shared.metrics.rollout_finished(r.id, r.state);
                self.finished(&r);
                continue;
            }
            self.stored.insert(r.id, Stored::of(&r));
            self.now_due(r.id);
            self.active.insert(r.id, r);
        }
        self.reconcile().await;
        let mut out = Vec::with_capacity(planned.len());
        for p in &planned {
            out.push(self.current(p.id).await?);
        }
        Ok(out)
    }

    /// Moves a service's active version, in one store write, then tells
    /// every agent. Serialized with rollouts here, so that no rollout below
    /// the new version can start in between.
    async fn finalize(
        &mut self,
        service: &str,
        to: Option<String>,
        by: String,
        now: u64,
    ) -> Result<FinalizeResponse, ApiError> {
        validate_service_name("service", service)?;
        let fleet = self.fleet();
        let version = match to {
            Some(v) => v,
            None => newest_running(service, &fleet)
                .ok_or_else(|| ApiError::not_found(format!("no node runs service {service:?}")))?,
        };
        let current = self.shared.store.get_active_version(service).await?;
        let changed =
            check_finalize(service, &version, &fleet, current.as_ref()).map_err(|e| match e {
                FinalizeError::Spec(e) => ApiError::from(e),
                FinalizeError::NoNodes(_) => ApiError::not_found(e.to_string()),
                FinalizeError::Behind { .. } | FinalizeError::Lower { .. } => {
                    ApiError::conflict(e.to_string())
                }
            })?;
        let previous = current.as_ref().map(|a| a.version.clone());
        if !changed {
            let active = current.expect("unchanged means it was set");
            return Ok(FinalizeResponse {
                active,
                previous,
                changed: false,
            });
        }
        let active = ActiveVersion {
            service: service.to_string(),
            version: version.trim().to_string(),
            set_at: now,
            by,
        };
        self.shared.store.set_active_version(&active).await?;
        tracing::info!(service, version = %active.version, previous = ?previous, by = %active.by, "active version set");
        let active_versions = crate::active_versions(&self.shared).await?;
        self.shared
            .sessions
            .broadcast(&ServerMessage::ActiveVersions { active_versions });
        Ok(FinalizeResponse {
            active,
            previous,
            changed: true,
        })
    }

    /// Runs a stage of hooks in a task of its own, once at a time per
    /// rollout and stage; the result comes back as `HooksDone`. After a
    /// crash a stage that had not been recorded runs again: hooks run at
    /// least once.
    fn run_hooks(&mut self, id: u64, stage: HookStage, hooks: Vec<Hook>, name: &str) {
        if hooks.is_empty() || !self.hooks_running.insert((id, stage)) {
            return;
        }
        let Some(r) = self.active.get(&id) else {
            return;
        };
        let message = format!(
            "rollout {} of {}@{} {}{}",
            r.id,
            r.spec.service,
            r.spec.version,
            r.state.as_str(),
            r.reason
                .as_deref()
                .map(|x| format!(": {x}"))
                .unwrap_or_default()
        );
        let env: BTreeMap<String, String> = [
            ("ROLLWAVE_HOOK", name.to_string()),
            ("ROLLWAVE_ROLLOUT", r.id.to_string()),
            ("ROLLWAVE_SERVICE", r.spec.service.clone()),
            ("ROLLWAVE_VERSION", r.spec.version.clone()),
            ("ROLLWAVE_STATE", r.state.as_str().to_string()),
            ("ROLLWAVE_REASON", r.reason.clone().unwrap_or_default()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let event = serde_json::json!({
            "hook": name,
            "rollout": r.id,
            "service": r.spec.service,
            "version": r.spec.version,
            "state": r.state.as_str(),
            "reason": r.reason,
            "message": message,
        });
        let ctx = rollwave_hooks::HookContext {
            env,
            event,
            dir: None,
        };
        let client = self.hook_client.clone();
        let handle = self.shared.reconciler.clone();
        tracing::info!(rollout = id, ?stage, hooks = hooks.len(), "running hooks");
        tokio::spawn(async move {
            let mut reports = Vec::with_capacity(hooks.len());
            for hook in &hooks {
                // `hooks.on_success[1]` runs as `on_success`.
                let stage_name = hook
                    .name
                    .trim_start_matches("hooks.")
                    .split('[')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let mut ctx = ctx.clone();
                ctx.env.insert("ROLLWAVE_HOOK".into(), stage_name.clone());
                ctx.event["hook"] = stage_name.into();
                let report = rollwave_hooks::run(hook, &ctx, &client).await;
                let stop = !report.ok && hook.on_error == OnError::Fail;
                reports.push(report);
                // The hooks after a failed one guard a step that will not
                // happen.
                if stop && stage == HookStage::PreRollout {
                    break;
                }
            }
            handle.send(Event::HooksDone { id, stage, reports });
        });
    }

    /// The rollouts `r` depends on, as they are now.
    async fn dependencies(&self, r: &Rollout) -> Vec<Dependency> {
        let mut deps = Vec::with_capacity(r.after.len());
        for &id in &r.after {
            let found = match self.active.get(&id) {
                Some(d) => Some(d.clone()),
                None => match self.shared.store.get_rollout(id).await {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::error!(rollout = r.id, dependency = id, error = %e, "loading dependency");
                        // Unknown is not completed: keep waiting.
                        deps.push(Dependency {
                            id,
                            service: "?".into(),
                            version: "?".into(),
                            state: RolloutState::Running,
                        });
                        continue;
                    }
                },
            };
            deps.push(match found {
                Some(d) => Dependency {
                    id,
                    service: d.spec.service.clone(),
                    version: d.spec.version.clone(),
                    state: d.state,
                },
                // Gone from the store: it can never complete.
                None => Dependency {
                    id,
                    service: "?".into(),
                    version: "?".into(),
                    state: RolloutState::Cancelled,
                },
            });
        }
        deps
    }

    async fn command(&mut self, id: u64, command: Command, now: u64) -> Result<Rollout, ApiError> {
        let mut r = match self.active.get(&id) {
            Some(r) => r.clone(),
            None => self
                .shared
                .store
                .get_rollout(id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("rollout {id} not found")))?,
        };
        // Read from the store, its log is older than this stream or carried.
        self.feed.baseline(&r);
        if let (Command::Rollback(_), Some(other)) = (
            command,
            self.active
                .values()
                .find(|o| o.id != id && o.spec.service == r.spec.service),
        ) {
            return Err(ApiError::conflict(format!(
                "rollout {} of {} is {}: cancel it before rolling back rollout {id}",
                other.id,
                other.spec.service,
                other.state.as_str()
            )));
        }
        if let Command::Rollback(_) = command {
            let active = self
                .shared
                .store
                .get_active_version(&r.spec.service)
                .await?;
            let below: Vec<String> = r
                .nodes
                .values()
                .filter_map(|n| n.from_version.clone())
                .filter(|v| check_downgrade(&r.spec.service, v, active.as_ref()).is_err())
                .collect();
            if let Some(v) = below.first() {
                let reason = check_downgrade(&r.spec.service, v, active.as_ref())
                    .expect_err("filtered on refusal");
                return Err(ApiError::conflict(format!(
                    "rollout {id} cannot be rolled back: {reason}"
                )));
            }
        }
        let before = r.clone();
        match command {
            Command::Pause => r.pause(now)?,
            Command::Resume => r.resume(now)?,
            Command::Cancel => r.cancel(now)?,
            Command::Rollback(batch) => r.rollback(batch, now)?,
            Command::Promote => r.promote(now)?,
        }
        if r != before {
            r.updated_at = now;
            tracing::info!(rollout = id, ?command, "operator command");
            self.save(r).await;
        }
        self.now_due(id);
        self.reconcile().await;
        self.current(id).await
    }

    async fn current(&self, id: u64) -> Result<Rollout, ApiError> {
        match self.active.get(&id) {
            Some(r) => Ok(r.clone()),
            None => self
                .shared
                .store
                .get_rollout(id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("rollout {id} not found"))),
        }
    }

    /// Marks a rollout to be stepped in the next pass, whatever its pace:
    /// an operator waits for the answer.
    fn now_due(&mut self, id: u64) {
        self.due.insert(id);
        self.paced.remove(&id);
    }

    /// Steps the rollouts something happened to (or whose deadline came),
    /// each no more often than its pace allows, writes every decision of
    /// the pass in one store call, then sends the tasks they imply. Returns
    /// how long to sleep until the next deadline.
    async fn reconcile(&mut self) -> Duration {
        let now = now_ms();
        let clock = Instant::now();
        let mut wake = now + MAX_SLEEP.as_millis() as u64;
        if let Some(at) = self.measure(now) {
            wake = wake.min(at);
        }
        let mut ready = Vec::new();
        for (&id, &at) in &self.wakeups {
            if at <= now {
                self.due.insert(id);
            } else {
                wake = wake.min(at);
            }
        }
        for &id in &self.due {
            match self.paced.get(&id) {
                Some(p) if p.next > clock => {
                    let ms = p.next.duration_since(clock).as_millis() as u64;
                    wake = wake.min(now + ms.max(1));
                }
                _ => ready.push(id),
            }
        }
        if ready.is_empty() {
            return Duration::from_millis(wake.saturating_sub(now).max(1));
        }
        for id in &ready {
            self.due.remove(id);
            self.wakeups.remove(id);
        }
        let mut go = Vec::with_capacity(ready.len());
        for id in ready {
            // A cheap backstop, as every wait has a deadline of its own: a
            // rollout nothing happens to is looked at again at least this often.
            self.wakeups.insert(id, now + MAX_SLEEP.as_millis() as u64);
            if self.before_step(id, now).await {
                go.push(id);
            }
        }
        let mut stepped: Vec<(u64, Vec<Dispatch>, Instant)> = Vec::new();
        let mut quiet = Vec::new();
        // The fleet is read in place, not copied: stepping is synchronous
        // and short next to a copy of every node's view, and sessions only
        // hold this lock to change one node.
        let shared = self.shared.clone();
        {
            let fleet = shared.fleet.lock().unwrap_or_else(|e| e.into_inner());
            for id in go {
                let started = Instant::now();
                let Some(r) = self.active.get_mut(&id) else {
                    continue;
                };
                let header = r.header();
                let events = r.events.len();
                let actions = step_in_place(r, &fleet, now);
                if let Some(t) = actions.next_wakeup {
                    let backstop = self.wakeups.entry(id).or_insert(t);
                    *backstop = (*backstop).min(t);
                    wake = wake.min(t);
                }
                // What the step did beyond what the store holds: the header,
                // log entries it added, or a node changed in more than its phase
                // (a result recorded since the last write is a decision too).
                let stepped_header = r.header() != header || r.events.len() != events;
                let node_decided = self.stored.get(&id).is_none_or(|st| {
                    r.nodes
                        .iter()
                        .any(|(name, n)| st.nodes.get(name).is_none_or(|s| decided(s, n)))
                });
                let header_decided = self
                    .stored
                    .get(&id)
                    .is_none_or(|st| st.header != r.header());
                if stepped_header || node_decided || header_decided {
                    r.updated_at = now;
                    let dispatch = actions.dispatch.into_iter().chain(actions.stage).collect();
                    stepped.push((id, dispatch, started));
                } else {
                    quiet.push((id, started));
                }
            }
        }
        for (id, started) in quiet {
            self.publish(id);
            self.pace(id, started);
        }
        // Persist first: a task is only sent once the decision is durable.
        let saved = self
            .write(stepped.iter().map(|(id, _, _)| *id).collect())
            .await;
        for ((id, dispatch, started), ok) in stepped.into_iter().zip(saved) {
            if !ok {
                continue;
            }
            for d in &dispatch {
                self.send_task(id, &d.node, &d.task).await;
            }
            self.pace(id, started);
        }
        let now = now_ms();
        Duration::from_millis(wake.saturating_sub(now).max(1))
    }

    /// Sends the analysis queries that are due, each in a task of its own
    /// whose answer comes back as `Measured`; returns when the next one is
    /// due. The rollout says what is due (from its stored measurements), so
    /// after a restart an analysis goes on where it was.
    fn measure(&mut self, now: u64) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut go = Vec::new();
        for r in self.active.values() {
            for due in r.analysis_due() {
                if due.at > now {
                    next = Some(next.map_or(due.at, |n| n.min(due.at)));
                    continue;
                }
                let key = (due.rollout, due.wave, due.analysis.name.clone());
                if !self.measuring.contains(&key) {
                    go.push((key, due));
                }
            }
        }
        for (key, due) in go {
            self.measuring.insert(key);
            let client = self.prometheus.clone();
            let handle = self.shared.reconciler.clone();
            tokio::spawn(async move {
                let answer = crate::analysis::query(&client, &due.analysis).await;
                let measurement = due.analysis.judge(answer, now_ms());
                handle.send(Event::Measured {
                    id: due.rollout,
                    wave: due.wave,
                    name: due.analysis.name,
                    measurement,
                });
            });
        }
        next
    }

    /// Sets when a rollout stepped at `started` may be stepped again.
    fn pace(&mut self, id: u64, started: Instant) {
        let cost = started.elapsed();
        let gap = (cost * STEP_COST_FACTOR).clamp(MIN_STEP_GAP, MAX_STEP_GAP);
        self.paced.insert(
            id,
            Pace {
                next: Instant::now() + gap,
            },
        );
    }

    /// What comes before the planner: end hooks, auto finalize,
    /// dependencies, `pre_rollout` hooks. Returns whether to step now.
    async fn before_step(&mut self, id: u64, now: u64) -> bool {
        let Some(r) = self.active.get(&id) else {
            return false;
        };
        if r.end_hooks_due() {
            let hooks = r.end_hooks();
            let finalize = r.finalize_due();
            self.run_hooks(id, HookStage::End, hooks, "end");
            if !finalize {
                return false;
            }
        }
        let Some(r) = self.active.get(&id) else {
            return false;
        };
        if r.finalize_due() {
            let mut r = r.clone();
            let outcome = match self
                .finalize(
                    &r.spec.service,
                    Some(r.spec.version.clone()),
                    format!("rollout {id}"),
                    now,
                )
                .await
            {
                Ok(f) => format!(
                    "finalized: the active version of {} is {}",
                    r.spec.service, f.active.version
                ),
                Err(e) => format!("not finalized: {}", e.message),
            };
            r.record_finalize(outcome, now);
            self.save(r).await;
            return false;
        }
        if r.blocked() {
            let deps = self.dependencies(r).await;
            let mut held = r.clone();
            let go = held.await_dependencies(&deps, now);
            if held != *r {
                held.updated_at = now;
                self.save(held).await;
            }
            if !go {
                return false;
            }
        }
        let Some(r) = self.active.get(&id) else {
            return false;
        };
        if r.pre_rollout_due() {
            let hooks = r.spec.hooks.pre_rollout.clone();
            self.run_hooks(id, HookStage::PreRollout, hooks, "pre_rollout");
            return false;
        }
        true
    }

    /// Writes a rollout changed outside the planner (a command, hooks, a
    /// dependency) at once; see [`Reconciler::write`].
    async fn save(&mut self, r: Rollout) -> bool {
        let id = r.id;
        self.active.insert(id, r);
        // What changed it may let the planner act.
        self.due.insert(id);
        self.write(vec![id]).await.remove(0)
    }

    /// Writes what changed in each of these active rollouts since the store
    /// last had them, in one store call (one transaction, one sync), and
    /// publishes them. A rollout whose write failed is read back from the
    /// store, so memory never runs ahead of it; its outcome is `false`.
    async fn write(&mut self, ids: Vec<u64>) -> Vec<bool> {
        if ids.is_empty() {
            return Vec::new();
        }
        let outcomes = {
            let writes: Vec<RolloutWrite<'_>> = ids
                .iter()
                .filter_map(|id| {
                    let r = self.active.get(id)?;
                    Some(match self.stored.get(id) {
                        Some(st) => RolloutWrite {
                            rollout: r,
                            nodes: Some(
                                r.nodes
                                    .iter()
                                    .filter(|(name, n)| st.nodes.get(*name) != Some(*n))
                                    .map(|(name, _)| name.as_str())
                                    .collect(),
                            ),
                            events_stored: st.events,
                            plan: false,
                        },
                        // Read from the store for a command (a finished
                        // rollout rolled back): written whole.
                        None => RolloutWrite::full(r),
                    })
                })
                .collect();
            let written: Vec<(u64, Option<Vec<String>>)> = writes
                .iter()
                .map(|w| {
                    (
                        w.rollout.id,
                        w.nodes
                            .as_ref()
                            .map(|n| n.iter().map(|s| s.to_string()).collect()),
                    )
                })
                .collect();
            let results = match self.shared.store.write_rollouts(&writes).await {
                Ok(results) => results,
                Err(e) => writes.iter().map(|_| Err(e.clone())).collect(),
            };
            written.into_iter().zip(results).collect::<Vec<_>>()
        };
        let mut out = Vec::with_capacity(ids.len());
        for ((id, nodes), result) in outcomes {
            match result {
                Ok(generation) => {
                    let Some(r) = self.active.get_mut(&id) else {
                        out.push(false);
                        continue;
                    };
                    r.generation = generation;
                    match (self.stored.get_mut(&id), nodes) {
                        (Some(st), Some(nodes)) => {
                            for name in nodes {
                                if let Some(n) = r.nodes.get(&name) {
                                    st.nodes.insert(name, n.clone());
                                }
                            }
                            st.header = r.header();
                            st.events = r.events.len();
                        }
                        _ => {
                            self.stored.insert(id, Stored::of(r));
                        }
                    }
                    if r.is_active() {
                        self.publish(id);
                    } else {
                        let r = self.active.remove(&id).expect("looked up above");
                        self.forget(id);
                        tracing::info!(rollout = id, state = r.state.as_str(), reason = ?r.reason, "rollout finished");
                        self.shared.metrics.rollout_finished(id, r.state);
                        self.finished(&r);
                        // Rollouts that depend on it (or wait for it to give
                        // way) may go on now.
                        self.due.extend(self.active.keys().copied());
                    }
                    out.push(true);
                }
                Err(e) => {
                    tracing::error!(rollout = id, error = %e, "persisting rollout; reloading");
                    self.reload(id).await;
                    out.push(false);
                }
            }
        }
        out
    }

    /// Drops the in-memory change of a rollout whose write failed.
    async fn reload(&mut self, id: u64) {
        let reloaded = self.shared.store.get_rollout(id).await;
        if let Ok(Some(stored)) = &reloaded {
            self.feed.reloaded(stored);
        }
        match reloaded {
            Ok(Some(stored)) if stored.is_active() => {
                self.stored.insert(id, Stored::of(&stored));
                self.active.insert(id, stored);
                self.due.insert(id);
                self.publish(id);
            }
            Ok(stored) => {
                let was_active = self.active.remove(&id).is_some();
                self.forget(id);
                if let Some(stored) = stored {
                    if was_active {
                        self.shared.metrics.rollout_finished(id, stored.state);
                    }
                    self.finished(&stored);
                }
            }
            Err(e) => {
                // Memory is kept, unwritten: the next step tries again.
                tracing::error!(rollout = id, error = %e, "reloading rollout");
                self.due.insert(id);
            }
        }
    }

    fn forget(&mut self, id: u64) {
        self.stored.remove(&id);
        self.due.remove(&id);
        self.paced.remove(&id);
        self.wakeups.remove(&id);
    }

    async fn send_task(&mut self, id: u64, node: &str, task: &TaskRef) {
        let Some((service, version)) = self
            .active
            .get(&id)
            .map(|r| (r.spec.service.clone(), r.spec.version.clone()))
        else {
            return;
        };
        let release = match task.kind {
            TaskKind::Revert => None,
            _ => match self.release(&service, &version).await {
                Ok(Some(rel)) => Some(rel),
                Ok(None) => {
                    tracing::error!(rollout = id, "release of a running rollout is missing");
                    return;
                }
                Err(e) => {
                    tracing::error!(rollout = id, error = %e.message, "loading release");
                    return;
                }
            },
        };
        let Some(r) = self.active.get(&id) else {
            return;
        };
        let action = match task.kind {
            TaskKind::Upgrade | TaskKind::Stage | TaskKind::Converge | TaskKind::DryRun => {
                let release = match release {
                    Some(rel) => rel,
                    None => return,
                };
                let artifact = ArtifactRef {
                    path: artifact_path(&release.service, &release.version),
                    sha256: release.sha256.clone(),
                    size: release.size,
                    format: release.format,
                    signatures: release.signatures.iter().map(|s| s.text.clone()).collect(),
                };
                let version = r.spec.version.clone();
                if task.kind == TaskKind::Stage {
                    TaskAction::Stage { version, artifact }
                } else if task.kind == TaskKind::DryRun {
                    TaskAction::DryRun { version, artifact }
                } else {
                    TaskAction::Upgrade {
                        version,
                        artifact,
                        min_healthy_time_ms: r.spec.min_healthy_time,
                        healthy_deadline_ms: r.spec.healthy_deadline,
                        // The leader's own hooks (moving leadership away)
                        // come before any other, as its turn starts.
                        pre_node: if r.nodes.get(node).is_some_and(|n| n.leader) {
                            let hooks = &r.spec.hooks;
                            [hooks.pre_leader.as_slice(), &hooks.pre_node].concat()
                        } else {
                            r.spec.hooks.pre_node.clone()
                        },
                        post_node: r.spec.hooks.post_node.clone(),
                    }
                }
            }
            TaskKind::Revert => TaskAction::Revert {
                to_version: r.nodes.get(node).and_then(|n| n.from_version.clone()),
                // The task that took the backup this revert restores.
                upgrade_task: if r.nodes.get(node).is_some_and(|n| n.converged) {
                    r.task_id(node, TaskKind::Converge)
                } else {
                    r.task_id(node, TaskKind::Upgrade)
                },
                healthy_deadline_ms: r.spec.healthy_deadline,
            },
        };
        let msg = ServerMessage::Task(Task {
            id: task.id.clone(),
            rollout: r.id,
            service: r.spec.service.clone(),
            action,
        });
        if self.shared.sessions.send(node, msg) {
            tracing::debug!(node = %node, task = %task.id, "task sent");
        } else {
            tracing::debug!(node = %node, task = %task.id, "node offline; task is sent when it reconnects");
        }
    }

    async fn release(&mut self, service: &str, version: &str) -> Result<Option<Release>, ApiError> {
        let key = (service.to_string(), version.to_string());
        if let Some(r) = self.releases.get(&key) {
            return Ok(Some(r.clone()));
        }
        let found = self.shared.store.get_release(service, version).await?;
        if let Some(r) = &found {
            self.releases.insert(key, r.clone());
        }
        Ok(found)
    }

    /// Shares the active rollouts with readers: the newest state, including
    /// phases not yet written; then streams what changed, so that a client
    /// that reads a rollout after an event sees at least what it announced.
    fn publish(&mut self, id: u64) {
        let Some(r) = self.active.get(&id) else {
            return;
        };
        let copy = Arc::new(r.clone());
        self.shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, copy);
        self.feed.observe(r, &self.shared.events);
    }

    /// A rollout left `active`: readers now get it from the store, and its
    /// last changes are streamed now, as the next `publish` no longer sees it.
    fn finished(&mut self, r: &Rollout) {
        self.shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&r.id);
        self.feed.finish(r, &self.shared.events);
    }

    fn fleet(&self) -> rollwave_core::Fleet {
        self.shared
            .fleet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
