//! Runs tasks from the control plane: upgrade (stage, back up, switch, health
//! gate, roll back on failure) and revert.
//!
//! Every task is journaled in `state_dir/tasks/<id>.json` before it acts. A
//! task received again is answered from the journal when it has finished, and
//! resumed when it was cut short (agent killed): each step checks what is
//! already done, so nothing is done twice and nothing is skipped.
//!
//! Hooks are the exception: they run at least once. A task cut short while
//! its `pre_node` hooks run runs them again; once they have all passed that is
//! journaled, and they never run again for the task (the node may have changed
//! since). `post_node` hooks run again if the task is resumed before its result
//! is journaled.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rollwave_api::{AgentMessage, ArtifactRef, Task, TaskAction, TaskOutcome};
use rollwave_core::{
    format_duration, Health, Hook, HookAction, OnError, ReleaseManifest, TrustedKeys,
    MAX_MANIFEST_BYTES, RELEASE_MANIFEST,
};
use rollwave_hooks::HookContext;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::{ServiceConfig, SwitchMode};
use crate::disk::DiskLimits;
use crate::layout::{copy_tree, remove_path, write_atomic, ServiceDirs};
use crate::supervisor::Supervisor;
use crate::{artifact, download};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    task: Task,
    /// The version `current` pointed at when the task first ran.
    previous: Option<String>,
    /// Every `pre_node` hook passed (or failed with `on_error = continue`).
    #[serde(default)]
    pre_node_done: bool,
    /// The release's migration started: if the task is resumed before it
    /// is `migrated`, the backup is restored before it runs again.
    #[serde(default)]
    migrating: bool,
    #[serde(default)]
    migrated: bool,
    done: Option<TaskOutcome>,
    /// Read back from disk by an agent that restarted while the task ran.
    #[serde(skip)]
    resumed: bool,
}

/// Turns `node` hooks into the commands this service declares for them.
/// An `exec` hook is refused unless it came from the release itself: the
/// control plane may ask for a declared hook by name, never send a command.
fn declared_hooks(
    config: &ServiceConfig,
    hooks: &[Hook],
    exec_allowed: bool,
) -> Result<Vec<Hook>, String> {
    hooks
        .iter()
        .map(|h| match &h.action {
            HookAction::Node { hook } => match config.hooks.get(hook) {
                Some(command) => Ok(Hook {
                    action: HookAction::Exec {
                        command: command.clone(),
                    },
                    ..h.clone()
                }),
                None => Err(format!(
                    "hook {}: node hook {hook:?} is not declared for service {} in this node's agent.toml (service.hooks)",
                    h.name, config.name
                )),
            },
            HookAction::Exec { command } if !exec_allowed => Err(format!(
                "hook {}: refusing to run {:?} sent by the control plane: commands must be declared in this node's agent.toml",
                h.name,
                command.first().map(String::as_str).unwrap_or_default()
            )),
            _ => Ok(h.clone()),
        })
        .collect()
}

pub struct Service {
    pub config: ServiceConfig,
    pub dirs: ServiceDirs,
    pub supervisor: Supervisor,
    /// One task at a time per service.
    lock: tokio::sync::Mutex<()>,
}

impl Service {
    pub fn new(config: ServiceConfig, dirs: ServiceDirs, supervisor: Supervisor) -> Self {
        Service {
            config,
            dirs,
            supervisor,
            lock: tokio::sync::Mutex::new(()),
        }
    }
}

/// How long a task keeps trying to download its artifact. The task carries
/// no deadline of its own; this is the default `progress_deadline`, past
/// which the control plane gives up on the task anyway.
const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(600);

pub struct Executor {
    state_dir: PathBuf,
    /// The control plane the session is open with: artifacts are
    /// downloaded from it (replicas: the leader).
    server: std::sync::RwLock<String>,
    client: reqwest::Client,
    services: BTreeMap<String, Arc<Service>>,
    running: Mutex<HashSet<String>>,
    /// Messages for the control plane; queued while disconnected.
    outbox: mpsc::UnboundedSender<AgentMessage>,
    /// Signals that staged releases or backups changed.
    changed: Arc<Notify>,
    /// For http hooks: one client, so connections to a webhook are reused.
    hooks_client: reqwest::Client,
    /// This node's name, told to hooks (see [`Executor::set_node`]).
    node: OnceLock<String>,
    /// With any, nothing is staged unless its signature verifies with one.
    trusted: TrustedKeys,
    /// What staging may take from the disk.
    disk: DiskLimits,
}

impl Executor {
    /// Downloads go to `server` from now on: the session moved to it.
    pub fn set_server(&self, server: &str) {
        *self
            .server
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = server.to_string();
    }

    fn server(&self) -> String {
        self.server
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state_dir: PathBuf,
        server: String,
        client: reqwest::Client,
        services: BTreeMap<String, Arc<Service>>,
        outbox: mpsc::UnboundedSender<AgentMessage>,
        changed: Arc<Notify>,
        trusted: TrustedKeys,
        disk: DiskLimits,
    ) -> Arc<Self> {
        let hooks_client = rollwave_hooks::client().unwrap_or_else(|e| {
            // The agent's own client differs only in its read timeout, which
            // a hook's timeout makes moot.
            tracing::warn!(error = %e, "building the webhook client; using the download client");
            client.clone()
        });
        Arc::new(Executor {
            state_dir,
            server: std::sync::RwLock::new(server),
            client,
            services,
            running: Mutex::new(HashSet::new()),
            outbox,
            changed,
            hooks_client,
            node: OnceLock::new(),
            trusted,
            disk,
        })
    }

    /// Tells the executor the node's name, for hooks (`ROLLWAVE_NODE` and
    /// the event's `node`); until it is set, hooks are not told. Only the
    /// first call counts.
    pub fn set_node(&self, node: &str) {
        let _ = self.node.set(node.to_string());
    }

    fn journal_path(&self, id: &str) -> PathBuf {
        self.state_dir.join("tasks").join(format!("{id}.json"))
    }

    fn read_journal(&self, id: &str) -> Option<Journal> {
        let bytes = std::fs::read(self.journal_path(id)).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "unreadable task journal; starting the task afresh");
                None
            }
        }
    }

    fn write_journal(&self, j: &Journal) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(j).map_err(|e| e.to_string())?;
        write_atomic(&self.journal_path(&j.task.id), &json)
            .map_err(|e| format!("writing task journal: {e}"))
    }

    /// Accepts a task: answers from the journal, ignores a duplicate of a
    /// running task, or starts it.
    pub fn submit(self: &Arc<Self>, task: Task) {
        if !valid_task_id(&task.id) {
            tracing::warn!(task = %task.id, "refusing task with an invalid id");
            return;
        }
        if let Some(Journal {
            done: Some(outcome),
            ..
        }) = self.read_journal(&task.id)
        {
            tracing::info!(task = %task.id, "task already done; reporting its result again");
            let _ = self.outbox.send(AgentMessage::TaskResult {
                task_id: task.id,
                outcome,
            });
            return;
        }
        if !self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task.id.clone())
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let id = task.id.clone();
            let outcome = me.run(task).await;
            me.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            if let Some(outcome) = outcome {
                let _ = me.outbox.send(AgentMessage::TaskResult {
                    task_id: id,
                    outcome,
                });
            }
        });
    }

    fn phase(&self, task: &Task, phase: &str) {
        tracing::info!(task = %task.id, service = %task.service, phase, "task step");
        let _ = self.outbox.send(AgentMessage::TaskPhase {
            task_id: task.id.clone(),
            phase: phase.to_string(),
        });
    }

    async fn run(&self, task: Task) -> Option<TaskOutcome> {
        let Some(svc) = self.services.get(&task.service).cloned() else {
            return Some(TaskOutcome::Failed {
                reason: format!("this node does not run service {:?}", task.service),
            });
        };
        let _one_at_a_time = svc.lock.lock().await;
        let mut journal = match self.read_journal(&task.id) {
            Some(j) if j.done.is_some() => return j.done,
            Some(j) => {
                tracing::info!(task = %task.id, "resuming task cut short by an agent restart");
                Journal { resumed: true, ..j }
            }
            None => Journal {
                task: task.clone(),
                previous: svc.dirs.current_version(),
                pre_node_done: false,
                migrating: false,
                migrated: false,
                done: None,
                resumed: false,
            },
        };
        // Persisted before anything is touched: a resumed task must know the
        // version the node ran before it, not the one it may have switched to.
        if let Err(e) = self.write_journal(&journal) {
            return Some(TaskOutcome::Failed { reason: e });
        }
        let outcome = match &task.action {
            TaskAction::Upgrade {
                version,
                artifact,
                min_healthy_time_ms,
                healthy_deadline_ms,
                pre_node,
                post_node,
            } => {
                self.upgrade(
                    &task,
                    &svc,
                    &mut journal,
                    version,
                    artifact,
                    *min_healthy_time_ms,
                    *healthy_deadline_ms,
                    NodeHooks {
                        pre: pre_node,
                        post: post_node,
                    },
                )
                .await
            }
            TaskAction::Stage { version, artifact } => {
                match self.stage(&task, &svc, version, artifact).await {
                    Ok(()) => TaskOutcome::Succeeded,
                    Err(reason) => TaskOutcome::Failed { reason },
                }
            }
            TaskAction::DryRun { version, artifact } => {
                match self.dry_run(&task, &svc, version, artifact).await {
                    Ok(()) => TaskOutcome::Succeeded,
                    Err(reason) => TaskOutcome::Failed { reason },
                }
            }
            TaskAction::Revert {
                to_version,
                upgrade_task,
                healthy_deadline_ms,
            } => {
                self.revert(
                    &task,
                    &svc,
                    to_version.as_deref(),
                    upgrade_task,
                    *healthy_deadline_ms,
                )
                .await
            }
        };
        if let (TaskAction::Upgrade { version, .. }, TaskOutcome::Failed { .. }) =
            (&task.action, &outcome)
        {
            self.discard_unused(&svc, version);
        }
        if let TaskAction::Upgrade { version, .. } | TaskAction::Stage { version, .. } =
            &task.action
        {
            self.prune_releases(&svc, version);
        }
        journal.done = Some(outcome.clone());
        if let Err(e) = self.write_journal(&journal) {
            tracing::error!(task = %task.id, error = %e, "recording task result");
        }
        Some(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    async fn upgrade(
        &self,
        task: &Task,
        svc: &Service,
        journal: &mut Journal,
        version: &str,
        art: &ArtifactRef,
        min_healthy_ms: u64,
        deadline_ms: u64,
        hooks: NodeHooks<'_>,
    ) -> TaskOutcome {
        let previous = journal.previous.clone();
        let previous = previous.as_deref();
        // Before anything is fetched: a task asking for a command this node
        // does not declare changes nothing.
        let (task_pre, task_post) = match (
            declared_hooks(&svc.config, hooks.pre, false),
            declared_hooks(&svc.config, hooks.post, false),
        ) {
            (Ok(pre), Ok(post)) => (pre, post),
            (Err(reason), _) | (_, Err(reason)) => return TaskOutcome::Failed { reason },
        };
        if let Err(reason) = self.stage(task, svc, version, art).await {
            return TaskOutcome::Failed { reason };
        }
        let release = match release_manifest(svc, version) {
            Ok(m) => m,
            Err(reason) => return TaskOutcome::Failed { reason },
        };
        // The release's own commands came in the artifact this agent
        // verified, so they may be exec hooks.
        let (release_pre, release_post) = match (
            declared_hooks(&svc.config, &release.pre_node, true),
            declared_hooks(&svc.config, &release.post_node, true),
        ) {
            (Ok(pre), Ok(post)) => (pre, post),
            (Err(reason), _) | (_, Err(reason)) => return TaskOutcome::Failed { reason },
        };
        // The release's hooks run inside the rollout's: its checks see the
        // node before the rollout's own undo (e.g. re-enabling traffic).
        let pre: Vec<Hook> = task_pre.into_iter().chain(release_pre).collect();
        let post: Vec<Hook> = release_post.into_iter().chain(task_post).collect();
        // After staging, so that a node whose artifact cannot be installed
        // never runs them; before the switch, so that a failure leaves the
        // node untouched.
        if !journal.pre_node_done && !pre.is_empty() {
            let ran = self
                .run_hooks(task, svc, "pre_node", &pre, previous, version)
                .await;
            if let Err(reason) = ran {
                return TaskOutcome::Failed { reason };
            }
            journal.pre_node_done = true;
            if let Err(reason) = self.write_journal(journal) {
                return TaskOutcome::Failed { reason };
            }
        }
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        self.phase(task, "switching");
        // `current` points at the new version but it is not what runs: the
        // agent was killed mid-switch (a handoff candidate on trial is
        // killed when the agent comes back; a restart may have stopped the
        // old process only). The switch is idempotent and runs again, so
        // the new version starts a second time: say so.
        let running = svc.supervisor.status().borrow().version.clone();
        if journal.resumed
            && svc.dirs.current_version().as_deref() == Some(version)
            && running.as_deref() != Some(version)
        {
            self.phase(
                task,
                &format!(
                    "resuming the switch to {version} interrupted by an agent restart: starting it again"
                ),
            );
        }
        let migration = release.migrate.as_ref().map(|hook| Migration {
            hook,
            ctx: self.data_context(task, svc, "migrate", previous, version, None),
            journal: &mut *journal,
        });
        let result = match self
            .switch_to(
                task,
                svc,
                Some(version),
                Data::Backup(&task.id),
                deadline,
                migration,
            )
            .await
        {
            Ok(took) => {
                self.phase(task, &format!("serving after {}ms", took.as_millis()));
                self.phase(task, "gating");
                gate(svc, version, min_healthy_ms, deadline).await
            }
            Err(e) => Err(e),
        };
        // A failed post_node hook is a failed gate: the node goes back.
        let result = match result {
            Ok(()) => {
                self.run_hooks(task, svc, "post_node", &post, previous, version)
                    .await
            }
            Err(e) => Err(e),
        };
        let Err(why) = result else {
            return TaskOutcome::Succeeded;
        };
        let to = previous.unwrap_or("no version");
        let on_previous = svc.dirs.current_version().as_deref() == previous
            && svc.supervisor.status().borrow().version.as_deref() == previous;
        if on_previous {
            return TaskOutcome::Failed {
                reason: format!("{why}; the node stayed on {to}"),
            };
        }
        self.phase(task, "rolling_back");
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        let back = self
            .switch_to(task, svc, previous, Data::Restore(&task.id), deadline, None)
            .await;
        let reason = match back {
            Ok(_) => format!("{why}; rolled back to {to}"),
            Err(e) => format!("{why}; rollback to {to} failed too: {e}"),
        };
        TaskOutcome::Failed { reason }
    }

    /// Moves the service to `to` and waits, until `deadline`, for the first
    /// passing health check. Returns the time from the switch command to then.
    ///
    /// Restart mode: drain in the load balancer, stop, back up or restore,
    /// switch `current`, migrate, start, check, re-enable. Handoff mode: back
    /// up or restore, switch `current`, start the new version beside the old
    /// one on the same sockets, and promote it once healthy; if it never is,
    /// the old process, which never stopped serving, stays and `current` goes
    /// back. A migration always switches by restart: the data must not change
    /// under a running old version (the agent still holds `listen` sockets,
    /// so clients wait in the backlog rather than being refused).
    async fn switch_to(
        &self,
        task: &Task,
        svc: &Service,
        to: Option<&str>,
        data: Data<'_>,
        deadline: Instant,
        migration: Option<Migration<'_>>,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let from = svc.dirs.current_version();
        let linked = from.as_deref() == to;
        let running = svc.supervisor.status().borrow().version.clone();
        if let (true, Some(v)) = (linked && running.as_deref() == to, to) {
            // A resumed task that already got here: wait for health, and
            // re-enable the node in case the cut came between start and ready.
            gate(svc, v, 0, deadline).await?;
            let took = started.elapsed();
            if let (SwitchMode::Restart, Some(lb)) = (svc.config.switch, &svc.config.drain) {
                lb.ready().await.map_err(|e| format!("re-enabling: {e}"))?;
            }
            return Ok(took);
        }
        let relink = |svc: &Service| -> Result<(), String> {
            if !linked {
                if let Some(phase) = data.apply(svc, from.as_deref(), to)? {
                    self.phase(task, &phase);
                }
                // The node's list of backups changed.
                self.changed.notify_one();
                svc.dirs
                    .switch_current(to)
                    .map_err(|e| format!("switching the current link: {e}"))?;
                history(svc, &task.id, from.as_deref(), to);
            }
            Ok(())
        };
        match (svc.config.switch, to, &running) {
            (SwitchMode::Handoff, Some(v), Some(_)) if migration.is_none() => {
                relink(svc)?;
                let tried = match svc.supervisor.handoff().await {
                    Ok(_) => gate(svc, v, 0, deadline).await,
                    Err(e) => Err(e),
                };
                match tried {
                    Ok(()) => {
                        svc.supervisor.promote().await?;
                        Ok(started.elapsed())
                    }
                    Err(why) => {
                        // The old process never stopped: point `current` back at it.
                        svc.supervisor.abort().await?;
                        if !linked {
                            svc.dirs.switch_current(from.as_deref()).map_err(|e| {
                                format!("{why}; switching the current link back: {e}")
                            })?;
                            history(svc, &task.id, to, from.as_deref());
                        }
                        Err(why)
                    }
                }
            }
            _ => {
                // Nothing to drain (or re-enable) when nothing ran before.
                let lb = svc.config.drain.as_ref().filter(|_| running.is_some());
                if let Some(lb) = lb {
                    self.phase(task, "draining");
                    if let Err(e) = lb.drain().await {
                        // Nothing was stopped: put the node back in service.
                        let undo = match lb.ready().await {
                            Ok(()) => String::new(),
                            Err(e) => format!(" (and re-enabling failed: {e})"),
                        };
                        return Err(format!("draining: {e}{undo}"));
                    }
                }
                svc.supervisor.stop().await?;
                relink(svc)?;
                if let Some(m) = migration {
                    self.migrate(task, svc, m).await?;
                }
                if let Some(v) = to {
                    svc.supervisor.start().await?;
                    gate(svc, v, 0, deadline).await?;
                }
                let took = started.elapsed();
                if let Some(lb) = lb {
                    lb.ready().await.map_err(|e| format!("re-enabling: {e}"))?;
                }
                Ok(took)
            }
        }
    }

    /// Runs `hooks` in order, each announced by a phase and reported by
    /// another (which is how their output reaches the rollout's execution
    /// log). Fails with the task's reason at the first that fails with
    /// `on_error = fail`.
    async fn run_hooks(
        &self,
        task: &Task,
        svc: &Service,
        which: &str,
        hooks: &[Hook],
        previous: Option<&str>,
        version: &str,
    ) -> Result<(), String> {
        if hooks.is_empty() {
            return Ok(());
        }
        let ctx = self.hook_context(task, svc, which, previous, version);
        for hook in hooks {
            // Named, not described: a webhook's URL may hold its secret.
            self.phase(task, &format!("hook {} running", hook.name));
            let report = rollwave_hooks::run(hook, &ctx, &self.hooks_client).await;
            let summary = report.summary();
            match (report.error, hook.on_error) {
                (None, _) => self.phase(task, &summary),
                (Some(_), OnError::Continue) => {
                    self.phase(task, &format!("{summary}; going on (on_error = continue)"))
                }
                (Some(error), OnError::Fail) => {
                    self.phase(task, &summary);
                    return Err(format!("{which} hook {} failed: {error}", hook.name));
                }
            }
        }
        Ok(())
    }

    fn hook_context(
        &self,
        task: &Task,
        svc: &Service,
        which: &str,
        previous: Option<&str>,
        version: &str,
    ) -> HookContext {
        let node = self.node.get();
        let service = &svc.config.name;
        let release = svc.dirs.release(version);
        let mut env = BTreeMap::from([
            ("ROLLWAVE_HOOK", which.to_string()),
            ("ROLLWAVE_ROLLOUT", task.rollout.to_string()),
            ("ROLLWAVE_TASK", task.id.clone()),
            ("ROLLWAVE_SERVICE", service.clone()),
            ("ROLLWAVE_VERSION", version.to_string()),
            (
                "ROLLWAVE_FROM_VERSION",
                previous.unwrap_or_default().to_string(),
            ),
            ("ROLLWAVE_RELEASE_DIR", release.display().to_string()),
        ]);
        if let Some(node) = node {
            env.insert("ROLLWAVE_NODE", node.clone());
        }
        // Where the data is, for hooks that back up or verify it.
        let paths = &svc.config.backup;
        if let Some(first) = paths.first() {
            env.insert("ROLLWAVE_DATA_DIR", first.display().to_string());
        }
        let all: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        env.insert("ROLLWAVE_DATA_PATHS", all.join(":"));
        let message = format!(
            "{which} hook of rollout {}: {service} {} -> {version} on {}",
            task.rollout,
            previous.unwrap_or("nothing"),
            node.map_or("this node", String::as_str)
        );
        HookContext {
            env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            event: serde_json::json!({
                "hook": which,
                "rollout": task.rollout,
                "task": task.id,
                "node": node,
                "service": service,
                "version": version,
                "from_version": previous,
                "message": message,
            }),
            dir: None,
        }
    }

    /// Runs the release's migration, at least once: a run cut short by an
    /// agent restart is undone from the task's backup before it runs again,
    /// so it always starts from the data the old version left.
    async fn migrate(&self, task: &Task, svc: &Service, m: Migration<'_>) -> Result<(), String> {
        if m.journal.migrated {
            return Ok(());
        }
        if m.journal.migrating {
            self.phase(
                task,
                "the migration was cut short: restoring the backup first",
            );
            if let Some(phase) = Data::Restore(&task.id).apply(svc, None, None)? {
                self.phase(task, &phase);
            }
        } else {
            m.journal.migrating = true;
            self.write_journal(m.journal)?;
        }
        if svc.config.backup.is_empty() {
            self.phase(
                task,
                "migrating without a backup: the service declares no backup paths",
            );
        }
        self.phase(task, "hook migrate running");
        let report = rollwave_hooks::run(m.hook, &m.ctx, &self.hooks_client).await;
        self.phase(task, &report.summary());
        if let Some(e) = report.error {
            return Err(format!("migration failed: {e}"));
        }
        m.journal.migrated = true;
        self.write_journal(m.journal)
    }

    /// Stages the release and runs its dry run against a throwaway copy of
    /// the service's backup paths; the service and its data are untouched.
    async fn dry_run(
        &self,
        task: &Task,
        svc: &Service,
        version: &str,
        art: &ArtifactRef,
    ) -> Result<(), String> {
        self.stage(task, svc, version, art).await?;
        let Some(hook) = release_manifest(svc, version)?.dry_run else {
            self.phase(task, "the release declares no dry run");
            return Ok(());
        };
        let scratch = svc.dirs.dry_runs().join(&task.id);
        let paths = svc.config.backup.clone();
        let dir = scratch.clone();
        let copied = tokio::task::spawn_blocking(move || copy_for_dry_run(&paths, &dir))
            .await
            .map_err(|e| e.to_string())?;
        let copies = match copied {
            Ok((copies, files)) => {
                self.phase(
                    task,
                    &format!(
                        "copied {files} file{} of data for the dry run",
                        if files == 1 { "" } else { "s" }
                    ),
                );
                copies
            }
            Err(e) => {
                let _ = remove_path(&scratch);
                return Err(format!("copying data for the dry run: {e}"));
            }
        };
        let current = svc.dirs.current_version();
        let ctx = self.data_context(
            task,
            svc,
            "dry_run",
            current.as_deref(),
            version,
            Some(&copies),
        );
        self.phase(task, "hook dry_run running");
        let report = rollwave_hooks::run(&hook, &ctx, &self.hooks_client).await;
        self.phase(task, &report.summary());
        if let Err(e) = remove_path(&scratch) {
            tracing::warn!(task = %task.id, error = %e, "removing the dry run's copy of the data");
        }
        match report.error {
            None => Ok(()),
            Some(e) => Err(format!("{e}{}", tail(&report.output))),
        }
    }

    /// What `migrate` and `dry_run` run with: the service's environment and
    /// the hook variables, from the release directory; for a dry run,
    /// `ROLLWAVE_DATA_DIR` and `ROLLWAVE_DATA_PATHS` name the copies.
    fn data_context(
        &self,
        task: &Task,
        svc: &Service,
        which: &str,
        previous: Option<&str>,
        version: &str,
        copies: Option<&[PathBuf]>,
    ) -> HookContext {
        let mut ctx = self.hook_context(task, svc, which, previous, version);
        let mut env = svc.config.env.clone();
        env.append(&mut ctx.env);
        if let Some(copies) = copies {
            if let Some(first) = copies.first() {
                env.insert("ROLLWAVE_DATA_DIR".into(), first.display().to_string());
            }
            let all: Vec<String> = copies.iter().map(|p| p.display().to_string()).collect();
            env.insert("ROLLWAVE_DATA_PATHS".into(), all.join(":"));
        }
        env.insert(
            "ROLLWAVE_DRY_RUN".into(),
            if copies.is_some() { "1" } else { "0" }.into(),
        );
        if let Ok(Some(active)) = svc.dirs.active_version() {
            env.insert("ROLLWAVE_ACTIVE_VERSION".into(), active);
        }
        ctx.env = env;
        ctx.dir = Some(svc.dirs.release(version));
        ctx
    }

    /// Downloads, verifies and unpacks the release, unless it is staged
    /// already. Every path that installs an artifact comes through here.
    async fn stage(
        &self,
        task: &Task,
        svc: &Service,
        version: &str,
        art: &ArtifactRef,
    ) -> Result<(), String> {
        let not_installed = |e: String| format!("release {version} not installed: {e}");
        let not_downloaded = |e: String| format!("{e}; release {version} not installed");
        if svc.dirs.is_staged(version, &art.sha256) {
            let vouched = svc
                .dirs
                .staged_signer(version)
                .is_some_and(|id| self.trusts(&id));
            if self.trusted.is_empty() || vouched {
                return Ok(());
            }
            // Staged before this agent trusted these keys. The artifact's
            // sha256 is the marker's, so a signature over it covers what is
            // unpacked: verify it rather than unpack again (which could not
            // replace a release the service runs from).
            self.phase(
                task,
                "downloading to verify the signature of a staged release",
            );
            let file = self.download(svc, art).await.map_err(not_downloaded)?;
            let signer = self.verify_signature(task, &file, art, version).await;
            let _ = std::fs::remove_file(&file);
            let signer = signer.map_err(not_installed)?;
            svc.dirs
                .mark_staged(version, &art.sha256, Some(&signer))
                .map_err(|e| format!("recording staged release: {e}"))?;
            return Ok(());
        }
        self.phase(task, "downloading");
        svc.dirs
            .discard_unverified(version)
            .map_err(|e| format!("removing a partial release: {e}"))?;
        // Before a byte is fetched. An executable is as large as its
        // artifact; an archive's files take at least about as much as the
        // archive (gzip rarely shrinks what it cannot compress), and are
        // checked again, each before it is written, while unpacking.
        if art.format == rollwave_api::ArtifactFormat::Executable
            && art.size > self.disk.max_release_size
        {
            return Err(not_installed(self.disk.too_large()));
        }
        let releases = svc.dirs.releases();
        self.disk
            .check_space(&releases, art.size.saturating_mul(2))
            .map_err(not_installed)?;
        let file = self.download(svc, art).await.map_err(not_downloaded)?;
        let signer = if self.trusted.is_empty() {
            None
        } else {
            match self.verify_signature(task, &file, art, version).await {
                Ok(id) => Some(id),
                Err(e) => {
                    let _ = std::fs::remove_file(&file);
                    return Err(not_installed(e));
                }
            }
        };
        self.phase(task, "unpacking");
        let dest = svc.dirs.release(version);
        let exec_name = svc.config.name.clone();
        let format = art.format;
        let file2 = file.clone();
        let disk = self.disk;
        let staged = tokio::task::spawn_blocking(move || {
            artifact::stage(&file2, format, &exec_name, &dest, disk)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let _ = std::fs::remove_file(&file);
        staged.map_err(not_installed)?;
        svc.dirs
            .mark_staged(version, &art.sha256, signer.as_deref())
            .map_err(|e| format!("recording staged release: {e}"))?;
        self.changed.notify_one();
        Ok(())
    }

    /// Removes the release of a failed upgrade that the node does not run:
    /// it failed here, and kept, it would only take disk space (a later
    /// rollout to it stages it again).
    fn discard_unused(&self, svc: &Service, version: &str) {
        let running = svc.supervisor.status().borrow().version.clone();
        if svc.dirs.current_version().as_deref() == Some(version)
            || running.as_deref() == Some(version)
        {
            return;
        }
        match svc.dirs.remove_release(version) {
            Ok(true) => {
                tracing::info!(service = %svc.config.name, version, "removed the release of a failed upgrade");
                self.changed.notify_one();
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(service = %svc.config.name, version, error = %e, "removing the release of a failed upgrade")
            }
        }
    }

    /// Keeps `keep_releases` releases besides the current one, the previous
    /// one and `staging` (the task's, which a later task of its rollout
    /// switches to); removes older ones. Runs under the service's lock, so
    /// no task of the service is staging meanwhile.
    fn prune_releases(&self, svc: &Service, staging: &str) {
        let current = svc.dirs.current_version();
        let previous = svc.dirs.previous_version();
        let running = svc.supervisor.status().borrow().version.clone();
        let keep: Vec<&str> = [
            Some(staging),
            current.as_deref(),
            previous.as_deref(),
            running.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        match svc.dirs.prune_releases(&keep, self.disk.keep_releases) {
            Ok(removed) if removed.is_empty() => {}
            Ok(removed) => {
                tracing::info!(service = %svc.config.name, removed = %removed.join(", "), keep_releases = self.disk.keep_releases, "removed old releases");
                self.changed.notify_one();
            }
            Err(e) => {
                tracing::warn!(service = %svc.config.name, error = %e, "removing old releases")
            }
        }
    }

    /// The artifact, size and sha256 verified, in a temporary file of the
    /// service's releases directory, which the caller removes. Retried and
    /// resumed until [`DOWNLOAD_DEADLINE`]. Its errors start with `download
    /// failed:`, which a task's failure reason keeps first, so that a node
    /// the artifact never reached reads apart from a bad release.
    async fn download(&self, svc: &Service, art: &ArtifactRef) -> Result<PathBuf, String> {
        let tmp = svc.dirs.releases();
        let _ = artifact::clean_stale_tmp(&tmp);
        let url = format!("{}{}", self.server(), art.path);
        let retry = download::Retry::until(Instant::now() + DOWNLOAD_DEADLINE);
        download::download_verified(&self.client, &url, &art.sha256, art.size, &tmp, &retry)
            .await
            .map_err(|e| e.to_string())
    }

    /// Checks the task's signature over the downloaded file with the
    /// trusted keys; returns the key id.
    async fn verify_signature(
        &self,
        task: &Task,
        file: &Path,
        art: &ArtifactRef,
        version: &str,
    ) -> Result<String, String> {
        self.phase(task, "verifying signature");
        let (file, keys, signatures) = (
            file.to_path_buf(),
            self.trusted.clone(),
            art.signatures.clone(),
        );
        let (service, release) = (task.service.clone(), version.to_string());
        let verified = tokio::task::spawn_blocking(move || {
            let signatures: Vec<&str> = signatures.iter().map(String::as_str).collect();
            artifact::verify_signature(&file, &signatures, &keys, &service, &release)
        })
        .await
        .map_err(|e| e.to_string())?;
        match verified {
            Ok(id) => {
                tracing::info!(task = %task.id, service = %task.service, version, key_id = %id, "signature verified");
                self.phase(task, &format!("signature verified: key id {id}"));
                Ok(id)
            }
            Err(e) => {
                tracing::warn!(task = %task.id, service = %task.service, version, error = %e, "release refused");
                Err(e.to_string())
            }
        }
    }

    async fn revert(
        &self,
        task: &Task,
        svc: &Service,
        to: Option<&str>,
        upgrade_task: &str,
        deadline_ms: u64,
    ) -> TaskOutcome {
        if let Err(reason) = self.may_revert_to(svc, to, upgrade_task) {
            return TaskOutcome::Failed { reason };
        }
        self.phase(task, "switching");
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        match self
            .switch_to(task, svc, to, Data::Restore(upgrade_task), deadline, None)
            .await
        {
            Ok(_) => TaskOutcome::Succeeded,
            Err(reason) => TaskOutcome::Failed { reason },
        }
    }

    fn trusts(&self, key_id: &str) -> bool {
        self.trusted.keys().iter().any(|k| k.id() == key_id)
    }

    /// A revert names the version to go back to, and a release staged
    /// before this agent trusted keys was never verified. With trusted keys,
    /// a revert goes only to a release whose signature was verified here, to
    /// the version the node ran before the upgrade it undoes, or to the one
    /// it runs.
    fn may_revert_to(
        &self,
        svc: &Service,
        to: Option<&str>,
        upgrade_task: &str,
    ) -> Result<(), String> {
        let Some(v) = to else { return Ok(()) };
        if self.trusted.is_empty()
            || svc.dirs.current_version().as_deref() == Some(v)
            || svc.dirs.staged_signer(v).is_some_and(|id| self.trusts(&id))
            || self
                .read_journal(upgrade_task)
                .is_some_and(|j| j.previous.as_deref() == Some(v))
        {
            return Ok(());
        }
        Err(format!(
            "not switching back to {v}: no trusted key's signature was verified for it, and this node did not run it before task {upgrade_task}"
        ))
    }
}

/// The release's migration, run between the switch of `current` and the
/// start of the new version.
struct Migration<'a> {
    hook: &'a Hook,
    ctx: HookContext,
    /// Where its progress is journaled.
    journal: &'a mut Journal,
}

/// The staged release's `rollwave.toml` (empty when it has none). Its
/// commands are resolved against the release directory, so `./bin/migrate`
/// is the release's own.
fn release_manifest(svc: &Service, version: &str) -> Result<ReleaseManifest, String> {
    let dir = svc.dirs.release(version);
    let path = dir.join(RELEASE_MANIFEST);
    let text = match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ReleaseManifest::default()),
        Err(e) => return Err(format!("release {version}: {}: {e}", path.display())),
        Ok(m) if m.len() > MAX_MANIFEST_BYTES => {
            return Err(format!(
                "release {version}: {RELEASE_MANIFEST} is {} bytes, more than {MAX_MANIFEST_BYTES}",
                m.len()
            ))
        }
        Ok(_) => std::fs::read_to_string(&path)
            .map_err(|e| format!("release {version}: {}: {e}", path.display()))?,
    };
    let mut m = ReleaseManifest::parse(&text).map_err(|e| format!("release {version}: {e}"))?;
    let hooks = m
        .migrate
        .iter_mut()
        .chain(m.dry_run.iter_mut())
        .chain(m.pre_node.iter_mut())
        .chain(m.post_node.iter_mut());
    for hook in hooks {
        if let HookAction::Exec { command } = &mut hook.action {
            let program = Path::new(&command[0]);
            if program.is_relative() && command[0].contains('/') {
                command[0] = dir.join(program).display().to_string();
            }
        }
    }
    Ok(m)
}

/// Copies each of `paths` that exists to `<dir>/<i>`; returns where each
/// copy is (or would be) and how many entries were copied.
fn copy_for_dry_run(paths: &[PathBuf], dir: &Path) -> std::io::Result<(Vec<PathBuf>, u64)> {
    remove_path(dir)?;
    std::fs::create_dir_all(dir)?;
    let mut copies = Vec::with_capacity(paths.len());
    let mut files = 0;
    for (i, path) in paths.iter().enumerate() {
        let copy = dir.join(i.to_string());
        if std::fs::symlink_metadata(path).is_ok() {
            files += copy_tree(path, &copy)?;
        }
        copies.push(copy);
    }
    Ok((copies, files))
}

/// The end of a failed command's output, for the task's reason: the
/// execution log has it whole.
fn tail(output: &str) -> String {
    let last = output.trim().lines().last().unwrap_or_default();
    if last.is_empty() {
        String::new()
    } else {
        let cut: String = last.chars().take(200).collect();
        format!(": {cut}")
    }
}

/// The hooks of an upgrade.
struct NodeHooks<'a> {
    /// Run after staging, before anything on the node changes.
    pre: &'a [Hook],
    /// Run once the new version passed its health gate.
    post: &'a [Hook],
}

/// What a switch does with the service's backup paths.
enum Data<'a> {
    /// Copy them, under this task's id, before switching.
    Backup(&'a str),
    /// Put back the copy taken by this task, before switching.
    Restore(&'a str),
}

impl Data<'_> {
    /// Returns, for a restore, the phase that reports it.
    fn apply(
        &self,
        svc: &Service,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Option<String>, String> {
        match self {
            Data::Backup(task) => backup(svc, task, from, to)
                .map(|()| None)
                .map_err(|e| format!("backup failed, nothing switched: {e}")),
            Data::Restore(task) => Ok(restore(svc, task)?.map(|(r, kept)| {
                let mut phase = match r {
                    Restored::Verified { files, bytes } => format!(
                        "restored backup {task}: {files} file{}, {}, verified",
                        if files == 1 { "" } else { "s" },
                        rollwave_core::format_bytes(bytes)
                    ),
                    Restored::Unverified => {
                        format!("restored backup {task}: not verified: backup predates checksums")
                    }
                };
                if !kept.is_empty() {
                    let kept: Vec<String> = kept.iter().map(|p| p.display().to_string()).collect();
                    phase.push_str(&format!(
                        "; kept and not restored (restore = \"never\"): {}",
                        kept.join(", ")
                    ));
                }
                phase
            })),
        }
    }
}

fn history(svc: &Service, task: &str, from: Option<&str>, to: Option<&str>) {
    if let Err(e) = svc.dirs.record_switch(task, from, to) {
        tracing::warn!(service = %svc.config.name, error = %e, "recording switch history");
    }
}

fn valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Waits until the service runs `version` and has been healthy for
/// `min_healthy_ms` without a break, before `deadline`. Fails at once if the
/// watched process ends or is replaced.
async fn gate(
    svc: &Service,
    version: &str,
    min_healthy_ms: u64,
    deadline: Instant,
) -> Result<(), String> {
    let mut status = svc.supervisor.status();
    let started = Instant::now();
    let min_healthy = Duration::from_millis(min_healthy_ms);
    let generation = status.borrow().generation;
    loop {
        let s = status.borrow_and_update().clone();
        if s.generation != generation || s.pid.is_none() {
            let how = s.last_exit.unwrap_or_else(|| "was replaced".into());
            return Err(format!(
                "health gate failed after {}: {version} {how}",
                format_duration(started.elapsed().as_millis() as u64 / 100 * 100)
            ));
        }
        let mut wake = deadline;
        if s.health == Health::Healthy && s.version.as_deref() == Some(version) {
            let since = s.healthy_since.unwrap_or_else(Instant::now);
            if since.elapsed() >= min_healthy {
                return Ok(());
            }
            wake = wake.min(since + min_healthy);
        }
        if Instant::now() >= deadline {
            let last = s
                .last_check
                .map(|c| c.detail)
                .unwrap_or_else(|| "no check completed".into());
            let wanted = if min_healthy_ms == 0 {
                "never became healthy".to_string()
            } else {
                format!("was not healthy for {}", format_duration(min_healthy_ms))
            };
            return Err(format!(
                "health gate failed: {version} {wanted} within healthy_deadline (health {:?}; last check: {last})",
                s.health
            ));
        }
        let _ = tokio::time::timeout_at(wake, status.changed()).await;
    }
}

/// `backups/<task>/manifest.json`. Written last: a backup is complete once
/// it exists.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    task: String,
    /// Unix milliseconds.
    taken_at: u64,
    from_version: Option<String>,
    to_version: Option<String>,
    /// Sums first, so that listing backups need not read past them.
    file_count: u64,
    bytes: u64,
    /// The configured paths, in order: the copy of the i-th is `<i>/`.
    paths: Vec<BackedUpPath>,
    /// Every regular file copied, by path inside the backup directory.
    files: Vec<BackedUpFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BackedUpPath {
    path: PathBuf,
    existed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BackedUpFile {
    /// `<index>/<relative path>`, or `<index>` when the path is a file.
    path: String,
    size: u64,
    sha256: String,
}

/// A manifest as written now, or as written before checksums: a JSON array
/// of `[path, existed]` pairs. Those backups still restore.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AnyManifest {
    V2(Manifest),
    V1(Vec<(PathBuf, bool)>),
}

fn read_manifest(dir: &Path) -> std::io::Result<Option<AnyManifest>> {
    let bytes = match std::fs::read(dir.join("manifest.json")) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        std::io::Error::other(format!(
            "{}: not a backup manifest: {e}",
            dir.join("manifest.json").display()
        ))
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Copies the service's backup paths into `backups/<task>/`, hashing each
/// file as it is copied, then prunes old generations.
fn backup(
    svc: &Service,
    task_id: &str,
    from: Option<&str>,
    to: Option<&str>,
) -> std::io::Result<()> {
    if svc.config.backup.is_empty() {
        return Ok(());
    }
    let dir = svc.dirs.backups().join(task_id);
    let manifest = dir.join("manifest.json");
    if manifest.exists() {
        return Ok(());
    }
    remove_path(&dir)?;
    std::fs::create_dir_all(&dir)?;
    let mut paths = Vec::new();
    let mut files = Vec::new();
    for (i, path) in svc.config.backup.iter().enumerate() {
        let existed = std::fs::symlink_metadata(path).is_ok();
        if existed {
            copy_hashed(path, &dir.join(i.to_string()), &i.to_string(), &mut files)?;
        }
        paths.push(BackedUpPath {
            path: path.clone(),
            existed,
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let m = Manifest {
        task: task_id.to_string(),
        taken_at: unix_ms(),
        from_version: from.map(str::to_string),
        to_version: to.map(str::to_string),
        file_count: files.len() as u64,
        bytes: files.iter().map(|f| f.size).sum(),
        paths,
        files,
    };
    let json = serde_json::to_vec_pretty(&m).map_err(std::io::Error::other)?;
    write_atomic(&manifest, &json)?;
    prune_backups(&svc.dirs.backups(), svc.config.backups_kept);
    Ok(())
}

/// As `copy_tree`, recording every regular file copied with the size and
/// sha256 of the bytes written, read once: a file that changes while it is
/// copied is recorded as copied, not as it is afterwards.
fn copy_hashed(
    from: &Path,
    to: &Path,
    rel: &str,
    files: &mut Vec<BackedUpFile>,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
    } else if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        std::fs::set_permissions(to, meta.permissions())?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            let name = entry.file_name();
            let rel = format!("{rel}/{}", name.to_string_lossy());
            copy_hashed(&entry.path(), &to.join(&name), &rel, files)?;
        }
    } else {
        let mut src = std::fs::File::open(from)?;
        let mut dst = std::fs::File::create(to)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0; 64 * 1024];
        let mut size = 0;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            dst.write_all(&buf[..n])?;
            size += n as u64;
        }
        dst.set_permissions(meta.permissions())?;
        files.push(BackedUpFile {
            path: rel.to_string(),
            size,
            sha256: hex::encode(hasher.finalize()),
        });
    }
    Ok(())
}

/// Every regular file under `path` (or `path` itself), named as in a
/// manifest with `rel` for `path`, with its size, and its sha256 if `hash`.
/// Symlinks are neither followed nor counted, as in a backup.
fn walk_files(
    path: &Path,
    rel: &str,
    hash: bool,
    out: &mut Vec<(String, PathBuf, u64, Option<String>)>,
) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let rel = format!("{rel}/{}", entry.file_name().to_string_lossy());
            walk_files(&entry.path(), &rel, hash, out)?;
        }
        return Ok(());
    }
    let sha = if hash {
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
        Some(hex::encode(hasher.finalize()))
    } else {
        None
    };
    out.push((rel.to_string(), path.to_path_buf(), meta.len(), sha));
    Ok(())
}

/// What a restore put back.
#[derive(Debug, PartialEq, Eq)]
enum Restored {
    /// Every file read back matched the manifest.
    Verified { files: u64, bytes: u64 },
    /// Taken before manifests had checksums.
    Unverified,
}

/// Puts the backed-up paths back as they were (present ones replaced by the
/// copy, ones that did not exist removed), then reads them back and checks
/// them against the manifest. Paths the service marks `restore = "never"`
/// are left as they are (their copy stays in the backup) and returned
/// beside what was restored. `None` if the task took no backup.
fn restore(svc: &Service, task_id: &str) -> Result<Option<(Restored, Vec<PathBuf>)>, String> {
    let dir = svc.dirs.backups().join(task_id);
    let failed = |e: std::io::Error| format!("restoring backup {task_id}: {e}");
    let Some(manifest) = read_manifest(&dir).map_err(failed)? else {
        return Ok(None);
    };
    let (paths, files) = match manifest {
        AnyManifest::V2(m) => (
            m.paths.into_iter().map(|p| (p.path, p.existed)).collect(),
            Some(m.files),
        ),
        AnyManifest::V1(paths) => (paths, None),
    };
    let kept_paths: Vec<PathBuf> = paths
        .iter()
        .filter(|(p, _)| svc.config.never_restore.contains(p))
        .map(|(p, _)| p.clone())
        .collect();
    let kept = |i: usize| svc.config.never_restore.contains(&paths[i].0);
    for (i, (path, existed)) in paths.iter().enumerate() {
        if kept(i) {
            tracing::info!(backup = %task_id, path = %path.display(), "kept, not restored (restore = \"never\")");
            continue;
        }
        remove_path(path).map_err(failed)?;
        if *existed {
            copy_tree(&dir.join(i.to_string()), path).map_err(failed)?;
        }
    }
    let Some(mut expected) = files else {
        return Ok(Some((Restored::Unverified, kept_paths)));
    };
    // A file's path in the manifest starts with its backup path's index.
    expected.retain(|f| {
        let index = f.path.split('/').next().and_then(|i| i.parse().ok());
        !index.is_some_and(kept)
    });
    let mut found = Vec::new();
    for (i, (path, existed)) in paths.iter().enumerate() {
        if *existed && !kept(i) {
            walk_files(path, &i.to_string(), true, &mut found).map_err(failed)?;
        }
    }
    let not_verified = |why: String| format!("restore of backup {task_id} not verified: {why}");
    if found.len() != expected.len() {
        return Err(not_verified(format!(
            "{} files restored, {} expected",
            found.len(),
            expected.len()
        )));
    }
    let found: BTreeMap<String, (PathBuf, u64, Option<String>)> = found
        .into_iter()
        .map(|(rel, path, size, sha)| (rel, (path, size, sha)))
        .collect();
    for want in &expected {
        let Some((path, size, sha)) = found.get(&want.path) else {
            return Err(not_verified(format!("{} missing", want.path)));
        };
        if *size != want.size {
            return Err(not_verified(format!(
                "{}: {size} bytes, {} expected",
                path.display(),
                want.size
            )));
        }
        if sha.as_deref() != Some(want.sha256.as_str()) {
            return Err(not_verified(format!("{}: sha256 differs", path.display())));
        }
    }
    let restored = Restored::Verified {
        files: expected.len() as u64,
        bytes: expected.iter().map(|f| f.size).sum(),
    };
    Ok(Some((restored, kept_paths)))
}

/// The complete backups of a service (those with a manifest), newest first.
fn list_backups(dir: &Path) -> Vec<rollwave_core::BackupInfo> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut all: Vec<rollwave_core::BackupInfo> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| backup_info(&e.path()))
        .collect();
    all.sort_by(|a, b| (b.taken_at, &b.task).cmp(&(a.taken_at, &a.task)));
    all
}

fn backup_info(dir: &Path) -> Option<rollwave_core::BackupInfo> {
    match read_manifest(dir) {
        Ok(Some(AnyManifest::V2(m))) => Some(rollwave_core::BackupInfo {
            task: m.task,
            taken_at: m.taken_at,
            from_version: m.from_version,
            to_version: m.to_version,
            file_count: m.file_count,
            bytes: m.bytes,
        }),
        Ok(Some(AnyManifest::V1(paths))) => {
            // No sums recorded: count what the copy holds.
            let taken = std::fs::metadata(dir.join("manifest.json"))
                .and_then(|m| m.modified())
                .ok()?;
            let mut files = Vec::new();
            for (i, (_, existed)) in paths.iter().enumerate() {
                if *existed {
                    let _ = walk_files(&dir.join(i.to_string()), &i.to_string(), false, &mut files);
                }
            }
            Some(rollwave_core::BackupInfo {
                task: dir.file_name()?.to_string_lossy().into_owned(),
                taken_at: taken
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                from_version: None,
                to_version: None,
                file_count: files.len() as u64,
                bytes: files.iter().map(|f| f.2).sum(),
            })
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(backup = %dir.display(), error = %e, "skipping unreadable backup");
            None
        }
    }
}

fn prune_backups(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut all: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    all.sort();
    let excess = all.len().saturating_sub(keep);
    for (_, path) in all.into_iter().take(excess) {
        let _ = remove_path(&path);
    }
}

/// Snapshot of every service as reported to the control plane.
pub fn snapshot(
    services: &BTreeMap<String, Arc<Service>>,
) -> BTreeMap<String, rollwave_core::ServiceView> {
    services
        .iter()
        .map(|(name, svc)| {
            let s = svc.supervisor.status().borrow().clone();
            let role = svc.supervisor.role().borrow().clone();
            (
                name.clone(),
                rollwave_core::ServiceView {
                    version: s.version,
                    health: s.health,
                    role: role.role,
                    role_error: role.error,
                    staged: svc.dirs.staged(),
                    previous: svc.dirs.previous_version(),
                    backups: list_backups(&svc.dirs.backups()),
                    ..Default::default()
                },
            )
        })
        .collect()
}

pub type Services = BTreeMap<String, Arc<Service>>;

#[cfg(test)]
mod tests {
    use super::*;

    use rollwave_api::ArtifactFormat;
    use rollwave_core::HookAction;

    use crate::supervisor::testing::{shell_service, PATIENCE};

    /// Stands in for the artifact's hash: 2.0.0 is staged ahead, as if by a
    /// stage task, so no control plane is needed to download it.
    const SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    /// A node running service `api` 1.0.0 (backing up `data`) with 2.0.0
    /// staged, and its executor.
    struct Node {
        tmp: tempfile::TempDir,
        svc: Arc<Service>,
        executor: Arc<Executor>,
        outbox: mpsc::UnboundedReceiver<AgentMessage>,
        data: PathBuf,
    }

    impl Node {
        /// The service declares hooks `t0` to `t3`, each running the script
        /// [`Node::hook`] writes for it.
        async fn start() -> Node {
            Node::start_with("http://127.0.0.1:9".into(), TrustedKeys::default()).await
        }

        /// A node whose control plane is `server`, trusting `trusted`.
        async fn start_with(server: String, trusted: TrustedKeys) -> Node {
            let tmp = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(tmp.path().join("tasks")).unwrap();
            let data = tmp.path().join("data");
            std::fs::write(&data, "v1 data\n").unwrap();
            // Bounded, so a failed test leaves no process behind for long.
            let script = "i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done";
            let mut s = shell_service(tmp.path(), "api", script, None).installed();
            s.config.backup = vec![data.clone()];
            s.config.hooks = (0..4)
                .map(|i| {
                    let script = tmp.path().join(format!("t{i}.sh")).display().to_string();
                    (format!("t{i}"), vec!["sh".into(), script])
                })
                .collect();
            std::fs::create_dir_all(s.dirs.release("2.0.0")).unwrap();
            s.dirs.mark_staged("2.0.0", SHA, None).unwrap();
            let svc = Arc::new(s.start());
            let (tx, outbox) = mpsc::unbounded_channel();
            let executor = Executor::new(
                tmp.path().to_path_buf(),
                server,
                reqwest::Client::new(),
                BTreeMap::from([("api".to_string(), svc.clone())]),
                tx,
                Arc::new(Notify::new()),
                trusted,
                DiskLimits::default(),
            );
            executor.set_node("n1");
            let node = Node {
                tmp,
                svc,
                executor,
                outbox,
                data,
            };
            node.wait_running("1.0.0").await;
            node
        }

        /// The pid of the healthy process running `version`, once there is one.
        async fn wait_running(&self, version: &str) -> u32 {
            let mut status = self.svc.supervisor.status();
            let deadline = Instant::now() + PATIENCE;
            loop {
                let s = status.borrow_and_update().clone();
                if let (Some(pid), Some(v), Health::Healthy) = (s.pid, &s.version, s.health) {
                    if v == version {
                        return pid;
                    }
                }
                assert!(Instant::now() < deadline, "{version} not running: {s:?}");
                let _ = tokio::time::timeout(Duration::from_millis(100), status.changed()).await;
            }
        }

        /// Submits `task` and returns its phases and outcome.
        async fn run(&mut self, task: Task) -> (Vec<String>, TaskOutcome) {
            let id = task.id.clone();
            self.executor.submit(task);
            let mut phases = Vec::new();
            loop {
                let msg = tokio::time::timeout(PATIENCE, self.outbox.recv())
                    .await
                    .expect("no task result")
                    .unwrap();
                match msg {
                    AgentMessage::TaskPhase { task_id, phase } if task_id == id => {
                        phases.push(phase)
                    }
                    AgentMessage::TaskResult { task_id, outcome } if task_id == id => {
                        return (phases, outcome)
                    }
                    _ => {}
                }
            }
        }

        fn path(&self, name: &str) -> String {
            self.tmp.path().join(name).display().to_string()
        }

        fn current(&self) -> String {
            self.svc.dirs.current_link().display().to_string()
        }
    }

    fn upgrade(id: &str, pre_node: Vec<Hook>, post_node: Vec<Hook>) -> Task {
        Task {
            id: id.into(),
            rollout: 7,
            service: "api".into(),
            action: TaskAction::Upgrade {
                version: "2.0.0".into(),
                artifact: ArtifactRef {
                    path: "/v1/releases/api/2.0.0/artifact".into(),
                    sha256: SHA.into(),
                    size: 0,
                    format: ArtifactFormat::Executable,
                    signatures: vec![],
                },
                min_healthy_time_ms: 0,
                healthy_deadline_ms: 20_000,
                pre_node,
                post_node,
            },
        }
    }

    impl Node {
        /// A rollout's hook `name` asking for the node's hook `t<i>`, which
        /// runs `script`.
        fn hook(&self, i: usize, name: &str, script: &str, on_error: OnError) -> Hook {
            std::fs::write(self.tmp.path().join(format!("t{i}.sh")), script).unwrap();
            node_hook(name, &format!("t{i}"), on_error)
        }
    }

    /// A rollout's hook `name`, asking for the node's hook `hook`.
    fn node_hook(name: &str, hook: &str, on_error: OnError) -> Hook {
        Hook {
            name: name.into(),
            action: HookAction::Node { hook: hook.into() },
            timeout: 20_000,
            retries: 0,
            on_error,
        }
    }

    fn position(phases: &[String], wanted: impl Fn(&str) -> bool) -> usize {
        phases
            .iter()
            .position(|p| wanted(p))
            .unwrap_or_else(|| panic!("no such phase in {phases:?}"))
    }

    #[tokio::test]
    async fn failed_pre_node_hook_fails_the_task_with_the_node_untouched() {
        let mut node = Node::start().await;
        let pid = node.wait_running("1.0.0").await;
        let env = node.path("env");
        let script =
            format!("env | grep '^ROLLWAVE_' | sort > {env}; echo 'not today' >&2; exit 3");
        let pre = vec![node.hook(0, "hooks.pre_node[0]", &script, OnError::Fail)];
        let (phases, outcome) = node.run(upgrade("r7-up-n1", pre, Vec::new())).await;

        assert_eq!(
            outcome,
            TaskOutcome::Failed {
                reason: "pre_node hook hooks.pre_node[0] failed: exited 3".into()
            }
        );
        assert_eq!(phases.len(), 2, "{phases:?}");
        assert_eq!(phases[0], "hook hooks.pre_node[0] running");
        assert!(
            phases[1].starts_with("hook hooks.pre_node[0] failed: exited 3 in "),
            "{phases:?}"
        );
        assert!(phases[1].ends_with(": not today"), "{phases:?}");

        // Nothing stopped, switched or backed up.
        assert_eq!(node.svc.dirs.current_version().as_deref(), Some("1.0.0"));
        let s = node.svc.supervisor.status().borrow().clone();
        assert_eq!((s.pid, s.version.as_deref()), (Some(pid), Some("1.0.0")));
        assert!(!node.svc.dirs.backups().join("r7-up-n1").exists());
        assert!(!node.svc.dirs.history().exists());

        let env = std::fs::read_to_string(&env).unwrap();
        let release = node.svc.dirs.release("2.0.0");
        for line in [
            "ROLLWAVE_HOOK=pre_node".to_string(),
            "ROLLWAVE_ROLLOUT=7".to_string(),
            "ROLLWAVE_TASK=r7-up-n1".to_string(),
            "ROLLWAVE_NODE=n1".to_string(),
            "ROLLWAVE_SERVICE=api".to_string(),
            "ROLLWAVE_VERSION=2.0.0".to_string(),
            "ROLLWAVE_FROM_VERSION=1.0.0".to_string(),
            format!("ROLLWAVE_RELEASE_DIR={}", release.display()),
        ] {
            assert!(env.lines().any(|l| l == line), "{line} not in {env}");
        }
        node.svc.supervisor.stop().await.unwrap();
    }

    #[tokio::test]
    async fn failed_post_node_hook_rolls_back_and_restores_the_backup() {
        let mut node = Node::start().await;
        let (data, seen, current) = (node.data.clone(), node.path("seen"), node.current());
        let pre = vec![
            node.hook(
                0,
                "hooks.pre_node[0]",
                "echo flaky; exit 1",
                OnError::Continue,
            ),
            node.hook(1, "hooks.pre_node[1]", "true", OnError::Fail),
        ];
        let post = vec![node.hook(
            2,
            "hooks.post_node[0]",
            &format!(
                "readlink {current} > {seen}; echo 'v2 data' > {}; echo 'smoke test failed'; exit 4",
                data.display()
            ),
            OnError::Fail,
        )];
        let (phases, outcome) = node.run(upgrade("r7-up-n1", pre, post)).await;

        assert_eq!(
            outcome,
            TaskOutcome::Failed {
                reason: "post_node hook hooks.post_node[0] failed: exited 4; rolled back to 1.0.0"
                    .into()
            }
        );
        // It ran against the new version, which is gone again with its data.
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), "releases/2.0.0\n");
        assert_eq!(node.svc.dirs.current_version().as_deref(), Some("1.0.0"));
        node.wait_running("1.0.0").await;
        assert_eq!(std::fs::read_to_string(&data).unwrap(), "v1 data\n");

        let restored = position(&phases, |p| {
            p == "restored backup r7-up-n1: 1 file, 8 B, verified"
        });
        let went_on = position(&phases, |p| {
            p.starts_with("hook hooks.pre_node[0] failed: exited 1 in ")
                && p.ends_with(": flaky; going on (on_error = continue)")
        });
        let passed = position(&phases, |p| {
            p.starts_with("hook hooks.pre_node[1] exited 0 in ")
        });
        let switching = position(&phases, |p| p == "switching");
        let gating = position(&phases, |p| p == "gating");
        let post_running = position(&phases, |p| p == "hook hooks.post_node[0] running");
        let post_failed = position(&phases, |p| {
            p.starts_with("hook hooks.post_node[0] failed: exited 4 in ")
                && p.ends_with(": smoke test failed")
        });
        let rolling_back = position(&phases, |p| p == "rolling_back");
        assert!(
            went_on < passed
                && passed < switching
                && gating < post_running
                && post_running < post_failed
                && post_failed < rolling_back
                && rolling_back < restored,
            "{phases:?}"
        );
        node.svc.supervisor.stop().await.unwrap();
    }

    #[tokio::test]
    async fn hooks_run_around_the_switch_and_not_again_for_a_done_task() {
        let mut node = Node::start().await;
        let (log, current) = (node.path("log"), node.current());
        let script = format!("echo \"$ROLLWAVE_HOOK $(readlink {current})\" >> {log}");
        let task = upgrade(
            "r7-up-n1",
            vec![node.hook(0, "hooks.pre_node[0]", &script, OnError::Fail)],
            vec![node.hook(1, "hooks.post_node[0]", &script, OnError::Fail)],
        );
        let (phases, outcome) = node.run(task.clone()).await;
        assert_eq!(outcome, TaskOutcome::Succeeded, "{phases:?}");
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "pre_node releases/1.0.0\npost_node releases/2.0.0\n"
        );
        assert_eq!(phases[0], "hook hooks.pre_node[0] running");
        assert!(
            phases[1].starts_with("hook hooks.pre_node[0] exited 0 in "),
            "{phases:?}"
        );
        assert_eq!(phases[2], "switching");
        assert_eq!(phases[phases.len() - 2], "hook hooks.post_node[0] running");
        assert!(
            phases[phases.len() - 1].starts_with("hook hooks.post_node[0] exited 0 in "),
            "{phases:?}"
        );
        node.wait_running("2.0.0").await;

        // Received again: answered from the journal, no hook run.
        let (phases, outcome) = node.run(task).await;
        assert_eq!((phases, outcome), (Vec::new(), TaskOutcome::Succeeded));
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "pre_node releases/1.0.0\npost_node releases/2.0.0\n"
        );
        node.svc.supervisor.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_migration_cut_short_is_undone_from_the_backup_before_it_runs_again() {
        let mut node = Node::start().await;
        let seen = node.path("seen");
        let manifest = format!(
            "[migrate]\ncommand = [\"sh\", \"-c\", \"cat \\\"$ROLLWAVE_DATA_DIR\\\" >> {seen}; echo 'v2 data' > \\\"$ROLLWAVE_DATA_DIR\\\"\"]\n"
        );
        let release = node.svc.dirs.release("2.0.0");
        std::fs::write(release.join(RELEASE_MANIFEST), manifest).unwrap();
        let task = upgrade("r7-up-n1", Vec::new(), Vec::new());
        // As left by an agent killed mid-migration: backed up, switched,
        // the old version stopped, the data half migrated.
        backup(&node.svc, "r7-up-n1", Some("1.0.0"), Some("2.0.0")).unwrap();
        node.svc.supervisor.stop().await.unwrap();
        node.svc.dirs.switch_current(Some("2.0.0")).unwrap();
        std::fs::write(&node.data, "half migrated\n").unwrap();
        node.executor
            .write_journal(&Journal {
                task: task.clone(),
                previous: Some("1.0.0".into()),
                pre_node_done: true,
                migrating: true,
                migrated: false,
                done: None,
                resumed: false,
            })
            .unwrap();

        let (phases, outcome) = node.run(task).await;

        assert_eq!(outcome, TaskOutcome::Succeeded, "{phases:?}");
        let restored = position(&phases, |p| {
            p == "restored backup r7-up-n1: 1 file, 8 B, verified"
        });
        let migrated = position(&phases, |p| p.starts_with("hook migrate exited 0 in "));
        assert!(restored < migrated, "{phases:?}");
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), "v1 data\n");
        assert_eq!(std::fs::read_to_string(&node.data).unwrap(), "v2 data\n");
        node.wait_running("2.0.0").await;
    }

    #[tokio::test]
    async fn commands_the_node_does_not_declare_are_refused_before_anything_changes() {
        let mut node = Node::start().await;
        let marker = node.path("ran");
        let sent = Hook {
            name: "hooks.pre_node[0]".into(),
            action: HookAction::Exec {
                command: vec!["touch".into(), marker.clone()],
            },
            timeout: 20_000,
            retries: 0,
            on_error: OnError::Fail,
        };
        let (_, outcome) = node.run(upgrade("r7-up-n1", vec![sent], Vec::new())).await;
        assert_eq!(
            outcome,
            TaskOutcome::Failed {
                reason: "hook hooks.pre_node[0]: refusing to run \"touch\" sent by the control plane: commands must be declared in this node's agent.toml".into()
            }
        );
        assert!(!Path::new(&marker).exists(), "the command ran");
        let undeclared = node_hook("hooks.post_node[0]", "nope", OnError::Fail);
        let (_, outcome) = node
            .run(upgrade("r7-up-n2", Vec::new(), vec![undeclared]))
            .await;
        let TaskOutcome::Failed { reason } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(
            reason.contains("node hook \"nope\" is not declared for service api"),
            "{reason}"
        );
        assert_eq!(node.svc.dirs.current_version().as_deref(), Some("1.0.0"));
        node.svc.supervisor.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_resumed_task_does_not_rerun_pre_node_hooks_that_passed() {
        let mut node = Node::start().await;
        // Would fail the task if it ran again.
        let pre = vec![node.hook(0, "hooks.pre_node[0]", "exit 1", OnError::Fail)];
        let task = upgrade("r7-up-n1", pre, Vec::new());
        // As journaled by an agent killed right after the hooks passed.
        node.executor
            .write_journal(&Journal {
                task: task.clone(),
                previous: Some("1.0.0".into()),
                pre_node_done: true,
                migrating: false,
                migrated: false,
                done: None,
                resumed: false,
            })
            .unwrap();
        let (phases, outcome) = node.run(task).await;
        assert_eq!(outcome, TaskOutcome::Succeeded, "{phases:?}");
        assert!(!phases.iter().any(|p| p.contains("hook")), "{phases:?}");
        node.wait_running("2.0.0").await;
        node.svc.supervisor.stop().await.unwrap();
    }

    // ---- signatures ----

    struct Signer {
        pk: minisign::PublicKey,
        sk: minisign::SecretKey,
    }

    impl Signer {
        fn new() -> Signer {
            let minisign::KeyPair { pk, sk } =
                minisign::KeyPair::generate_unencrypted_keypair().unwrap();
            Signer { pk, sk }
        }

        fn sign(&self, bytes: &[u8], release: &str) -> String {
            let comment = format!("rollwave release {release} sha256:{}", sha256(bytes));
            minisign::sign(Some(&self.pk), &self.sk, bytes, Some(&comment), None)
                .unwrap()
                .into_string()
        }

        fn key(&self) -> rollwave_core::TrustedKey {
            rollwave_core::TrustedKey::from_base64(&self.pk.to_base64()).unwrap()
        }

        fn id(&self) -> String {
            self.key().id().to_string()
        }
    }

    /// Serves `bytes` at `/artifact` until the test ends.
    async fn serve_artifact(bytes: &'static [u8]) -> String {
        let app = axum::Router::new().route(
            "/artifact",
            axum::routing::get(move || async move { bytes }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn stage_task(
        id: &str,
        version: &str,
        bytes: &[u8],
        signatures: impl IntoIterator<Item = String>,
    ) -> Task {
        Task {
            id: id.into(),
            rollout: 7,
            service: "api".into(),
            action: TaskAction::Stage {
                version: version.into(),
                artifact: ArtifactRef {
                    path: "/artifact".into(),
                    sha256: sha256(bytes),
                    size: bytes.len() as u64,
                    format: ArtifactFormat::Executable,
                    signatures: signatures.into_iter().collect(),
                },
            },
        }
    }

    const RELEASE: &[u8] = b"#!/bin/sh\nexec sleep 60\n";

    /// Nothing of `version` is installed and no download is left behind.
    fn not_installed(node: &Node, version: &str) {
        let releases = node.svc.dirs.releases();
        assert!(!node.svc.dirs.release(version).exists());
        let left: Vec<_> = std::fs::read_dir(&releases)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", releases.display());
    }

    #[tokio::test]
    async fn with_trusted_keys_only_a_release_signed_for_it_is_staged() {
        let (owner, other) = (Signer::new(), Signer::new());
        let trusted = TrustedKeys::new(vec![owner.key()]).unwrap();
        let url = serve_artifact(RELEASE).await;
        let mut node = Node::start_with(url, trusted).await;
        let mut tampered = RELEASE.to_vec();
        tampered.push(b'\n');
        let cases = [
            (None, format!("unsigned (trusted: {})", owner.id())),
            (
                Some(other.sign(RELEASE, "api@3.0.0")),
                format!(
                    "signed by untrusted key id {} (trusted: {})",
                    other.id(),
                    owner.id()
                ),
            ),
            (
                Some(owner.sign(&tampered, "api@3.0.0")),
                format!("signature does not match the artifact (key id {})", owner.id()),
            ),
            (
                Some(owner.sign(RELEASE, "tool@1.0.0")),
                "signed for tool@1.0.0, not api@3.0.0".to_string(),
            ),
            (
                Some("untrusted comment: x\n".to_string()),
                "signature is not a minisign signature: it has 1 line; a .minisig file has 4 (untrusted comment, signature, trusted comment, global signature)".to_string(),
            ),
        ];
        for (i, (signature, why)) in cases.into_iter().enumerate() {
            let task = stage_task(&format!("st-{i}"), "3.0.0", RELEASE, signature);
            let (phases, outcome) = node.run(task).await;
            assert_eq!(
                outcome,
                TaskOutcome::Failed {
                    reason: format!("release 3.0.0 not installed: {why}")
                },
                "{phases:?}"
            );
            assert!(!phases.iter().any(|p| p == "unpacking"), "{phases:?}");
            not_installed(&node, "3.0.0");
        }

        // A signature by an untrusted key beside the owner's does not keep
        // the release out.
        let signatures = [
            other.sign(RELEASE, "api@3.0.0"),
            owner.sign(RELEASE, "api@3.0.0"),
        ];
        let (phases, outcome) = node
            .run(stage_task("st-ok", "3.0.0", RELEASE, signatures))
            .await;
        assert_eq!(outcome, TaskOutcome::Succeeded, "{phases:?}");
        let verified = position(&phases, |p| {
            p == format!("signature verified: key id {}", owner.id())
        });
        assert!(
            verified < position(&phases, |p| p == "unpacking"),
            "{phases:?}"
        );
        assert_eq!(
            std::fs::read(node.svc.dirs.release("3.0.0").join("api")).unwrap(),
            RELEASE
        );
        assert_eq!(node.svc.dirs.staged_signer("3.0.0"), Some(owner.id()));
        assert_eq!(node.svc.dirs.current_version().as_deref(), Some("1.0.0"));
        node.svc.supervisor.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_release_staged_before_keys_were_trusted_is_verified_before_use() {
        // 2.0.0 was staged (marker without a signer) by an agent that
        // trusted no key; its artifact's sha256 is the marker's.
        let owner = Signer::new();
        let trusted = TrustedKeys::new(vec![owner.key()]).unwrap();
        let url = serve_artifact(RELEASE).await;
        let mut node = Node::start_with(url, trusted).await;
        node.svc
            .dirs
            .mark_staged("2.0.0", &sha256(RELEASE), None)
            .unwrap();

        let (phases, outcome) = node.run(stage_task("pre-1", "2.0.0", RELEASE, None)).await;
        assert_eq!(
            outcome,
            TaskOutcome::Failed {
                reason: format!(
                    "release 2.0.0 not installed: unsigned (trusted: {})",
                    owner.id()
                )
            },
            "{phases:?}"
        );
        assert_eq!(node.svc.dirs.staged_signer("2.0.0"), None);

        // A revert may not pick it either, as it was never verified.
        let (_, outcome) = node.run(revert_to("rv-1", "2.0.0", "no-such-task")).await;
        assert_eq!(
            outcome,
            TaskOutcome::Failed {
                reason: "not switching back to 2.0.0: no trusted key's signature was verified for it, and this node did not run it before task no-such-task".into()
            }
        );
        assert_eq!(node.svc.dirs.current_version().as_deref(), Some("1.0.0"));

        let good = owner.sign(RELEASE, "api@2.0.0");
        let (phases, outcome) = node
            .run(stage_task("pre-2", "2.0.0", RELEASE, Some(good)))
            .await;
        assert_eq!(outcome, TaskOutcome::Succeeded, "{phases:?}");
        // Verified, not unpacked again: the staged directory is kept.
        assert!(!phases.iter().any(|p| p == "unpacking"), "{phases:?}");
        assert!(node.svc.dirs.release("2.0.0").is_dir());
        assert_eq!(node.svc.dirs.staged_signer("2.0.0"), Some(owner.id()));
        not_installed(&node, "3.0.0");
        node.svc.supervisor.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_download_is_reported_as_one_not_as_a_bad_release() {
        // The control plane has no such artifact (404): no retry helps.
        let url = serve_artifact(RELEASE).await;
        let mut node = Node::start_with(url.clone(), TrustedKeys::default()).await;
        let mut task = stage_task("dl-1", "3.0.0", RELEASE, None);
        if let TaskAction::Stage { artifact, .. } = &mut task.action {
            artifact.path = "/gone".into();
        }
        let (phases, outcome) = node.run(task).await;
        let TaskOutcome::Failed { reason } = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(
            reason,
            format!("download failed: {url}/gone: server answered 404 Not Found; release 3.0.0 not installed"),
            "{phases:?}"
        );
        assert!(!phases.iter().any(|p| p == "unpacking"), "{phases:?}");
        not_installed(&node, "3.0.0");
        node.svc.supervisor.stop().await.unwrap();
    }

    fn revert_to(id: &str, version: &str, upgrade_task: &str) -> Task {
        Task {
            id: id.into(),
            rollout: 7,
            service: "api".into(),
            action: TaskAction::Revert {
                to_version: Some(version.into()),
                upgrade_task: upgrade_task.into(),
                healthy_deadline_ms: 20_000,
            },
        }
    }

    fn revert(id: &str, upgrade_task: &str) -> Task {
        Task {
            id: id.into(),
            rollout: 7,
            service: "api".into(),
            action: TaskAction::Revert {
                to_version: Some("1.0.0".into()),
                upgrade_task: upgrade_task.into(),
                healthy_deadline_ms: 20_000,
            },
        }
    }

    fn sha256(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// Upgrades `node` to 2.0.0, which backs up its data, then changes the
    /// data as a migration would.
    async fn upgraded(node: &mut Node) {
        let (phases, outcome) = node.run(upgrade("r7-up-n1", Vec::new(), Vec::new())).await;
        assert_eq!(outcome, TaskOutcome::Succeeded, "{phases:?}");
        node.wait_running("2.0.0").await;
        std::fs::write(&node.data, "v2 data, migrated\n").unwrap();
    }

    #[tokio::test]
    async fn a_backup_records_versions_and_checksums_and_is_listed() {
        let mut node = Node::start().await;
        upgraded(&mut node).await;
        let dir = node.svc.dirs.backups().join("r7-up-n1");
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(m["task"], "r7-up-n1");
        assert_eq!(m["from_version"], "1.0.0");
        assert_eq!(m["to_version"], "2.0.0");
        assert!(m["taken_at"].as_u64().unwrap() > 0, "{m}");
        assert_eq!(
            m["paths"],
            serde_json::json!([{ "path": node.data, "existed": true }])
        );
        assert_eq!(
            m["files"],
            serde_json::json!([{ "path": "0", "size": 8, "sha256": sha256(b"v1 data\n") }])
        );
        assert_eq!(
            (m["file_count"].as_u64(), m["bytes"].as_u64()),
            (Some(1), Some(8))
        );
        assert_eq!(std::fs::read(dir.join("0")).unwrap(), b"v1 data\n");

        let services = BTreeMap::from([("api".to_string(), node.svc.clone())]);
        let listed = &snapshot(&services)["api"].backups;
        assert_eq!(
            listed,
            &[rollwave_core::BackupInfo {
                task: "r7-up-n1".into(),
                taken_at: m["taken_at"].as_u64().unwrap(),
                from_version: Some("1.0.0".into()),
                to_version: Some("2.0.0".into()),
                file_count: 1,
                bytes: 8,
            }]
        );
        node.svc.supervisor.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_revert_restores_the_backup_verified() {
        let mut node = Node::start().await;
        upgraded(&mut node).await;
        let (phases, outcome) = node.run(revert("r7-rv-n1", "r7-up-n1")).await;
        assert_eq!(outcome, TaskOutcome::Succeeded, "{phases:?}");
        assert!(
            phases.contains(&"restored backup r7-up-n1: 1 file, 8 B, verified".to_string()),
            "{phases:?}"
        );
        assert_eq!(std::fs::read_to_string(&node.data).unwrap(), "v1 data\n");
        node.wait_running("1.0.0").await;
        node.svc.supervisor.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_revert_from_a_tampered_backup_fails_not_verified() {
        let mut node = Node::start().await;
        upgraded(&mut node).await;
        // Same size, other bytes: only the checksum can tell.
        let copy = node.svc.dirs.backups().join("r7-up-n1").join("0");
        std::fs::write(&copy, "v1 dat4\n").unwrap();
        let (phases, outcome) = node.run(revert("r7-rv-n1", "r7-up-n1")).await;
        assert_eq!(
            outcome,
            TaskOutcome::Failed {
                reason: format!(
                    "restore of backup r7-up-n1 not verified: {}: sha256 differs",
                    node.data.display()
                )
            },
            "{phases:?}"
        );
        assert!(
            !phases.iter().any(|p| p.starts_with("restored")),
            "{phases:?}"
        );
        // Not switched back onto data it cannot vouch for.
        assert_eq!(node.svc.dirs.current_version().as_deref(), Some("2.0.0"));
        node.svc.supervisor.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_backup_from_before_checksums_still_restores() {
        let mut node = Node::start().await;
        upgraded(&mut node).await;
        let dir = node.svc.dirs.backups().join("r7-up-n1");
        let old = serde_json::to_vec(&serde_json::json!([[node.data, true]])).unwrap();
        std::fs::write(dir.join("manifest.json"), old).unwrap();

        let services = BTreeMap::from([("api".to_string(), node.svc.clone())]);
        let listed = &snapshot(&services)["api"].backups;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(
            (
                listed[0].task.as_str(),
                listed[0].file_count,
                listed[0].bytes
            ),
            ("r7-up-n1", 1, 8)
        );

        let (phases, outcome) = node.run(revert("r7-rv-n1", "r7-up-n1")).await;
        assert_eq!(outcome, TaskOutcome::Succeeded, "{phases:?}");
        assert!(
            phases.contains(
                &"restored backup r7-up-n1: not verified: backup predates checksums".to_string()
            ),
            "{phases:?}"
        );
        assert_eq!(std::fs::read_to_string(&node.data).unwrap(), "v1 data\n");
        node.svc.supervisor.stop().await.unwrap();
    }
}
