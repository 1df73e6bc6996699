//! Runs tasks from the control plane: upgrade (stage, back up, switch, health
//! gate, roll back on failure) and revert.
//!
//! Every task is journaled in `state_dir/tasks/<id>.json` before it acts. A
//! task received again is answered from the journal when it has finished, and
//! resumed when it was cut short (agent killed): each step checks what is
//! already done, so nothing is done twice and nothing is skipped.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollwave_api::{AgentMessage, ArtifactRef, Task, TaskAction, TaskOutcome};
use rollwave_core::{format_duration, Health};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::artifact;
use crate::config::{ServiceConfig, SwitchMode};
use crate::layout::{copy_tree, remove_path, write_atomic, ServiceDirs};
use crate::supervisor::Supervisor;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    task: Task,
    /// The version `current` pointed at when the task first ran.
    previous: Option<String>,
    done: Option<TaskOutcome>,
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

pub struct Executor {
    state_dir: PathBuf,
    server: String,
    client: reqwest::Client,
    services: BTreeMap<String, Arc<Service>>,
    running: Mutex<HashSet<String>>,
    /// Messages for the control plane; queued while disconnected.
    outbox: mpsc::UnboundedSender<AgentMessage>,
    /// Signals that staged releases changed.
    changed: Arc<Notify>,
}

impl Executor {
    pub fn new(
        state_dir: PathBuf,
        server: String,
        client: reqwest::Client,
        services: BTreeMap<String, Arc<Service>>,
        outbox: mpsc::UnboundedSender<AgentMessage>,
        changed: Arc<Notify>,
    ) -> Arc<Self> {
        Arc::new(Executor {
            state_dir,
            server,
            client,
            services,
            running: Mutex::new(HashSet::new()),
            outbox,
            changed,
        })
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
                j
            }
            None => Journal {
                task: task.clone(),
                previous: svc.dirs.current_version(),
                done: None,
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
            } => {
                self.upgrade(
                    &task,
                    &svc,
                    journal.previous.as_deref(),
                    version,
                    artifact,
                    *min_healthy_time_ms,
                    *healthy_deadline_ms,
                )
                .await
            }
            TaskAction::Stage { version, artifact } => {
                match self.stage(&task, &svc, version, artifact).await {
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
        previous: Option<&str>,
        version: &str,
        art: &ArtifactRef,
        min_healthy_ms: u64,
        deadline_ms: u64,
    ) -> TaskOutcome {
        if let Err(reason) = self.stage(task, svc, version, art).await {
            return TaskOutcome::Failed { reason };
        }
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        self.phase(task, "switching");
        let result = match self
            .switch_to(task, svc, Some(version), Data::Backup(&task.id), deadline)
            .await
        {
            Ok(took) => {
                self.phase(task, &format!("serving after {}ms", took.as_millis()));
                self.phase(task, "gating");
                gate(svc, version, min_healthy_ms, deadline).await
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
            .switch_to(task, svc, previous, Data::Restore(&task.id), deadline)
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
    /// switch `current`, start, check, re-enable. Handoff mode: back up or
    /// restore, switch `current`, start the new version beside the old one on
    /// the same sockets, and promote it once healthy; if it never is, the old
    /// process, which never stopped serving, stays and `current` goes back.
    async fn switch_to(
        &self,
        task: &Task,
        svc: &Service,
        to: Option<&str>,
        data: Data<'_>,
        deadline: Instant,
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
                data.apply(svc)?;
                svc.dirs
                    .switch_current(to)
                    .map_err(|e| format!("switching the current link: {e}"))?;
                history(svc, &task.id, from.as_deref(), to);
            }
            Ok(())
        };
        match (svc.config.switch, to, &running) {
            (SwitchMode::Handoff, Some(v), Some(_)) => {
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

    async fn stage(
        &self,
        task: &Task,
        svc: &Service,
        version: &str,
        art: &ArtifactRef,
    ) -> Result<(), String> {
        if svc.dirs.is_staged(version, &art.sha256) {
            return Ok(());
        }
        self.phase(task, "downloading");
        svc.dirs
            .discard_unverified(version)
            .map_err(|e| format!("removing a partial release: {e}"))?;
        let tmp = svc.dirs.releases();
        let _ = artifact::clean_stale_tmp(&tmp);
        let url = format!("{}{}", self.server, art.path);
        let file = artifact::download_verified(&self.client, &url, &art.sha256, art.size, &tmp)
            .await
            .map_err(|e| format!("release {version} not installed: {e}"))?;
        self.phase(task, "unpacking");
        let dest = svc.dirs.release(version);
        let exec_name = svc.config.name.clone();
        let format = art.format;
        let file2 = file.clone();
        let staged =
            tokio::task::spawn_blocking(move || artifact::stage(&file2, format, &exec_name, &dest))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        let _ = std::fs::remove_file(&file);
        staged.map_err(|e| format!("release {version} not installed: {e}"))?;
        svc.dirs
            .mark_staged(version, &art.sha256)
            .map_err(|e| format!("recording staged release: {e}"))?;
        self.changed.notify_one();
        Ok(())
    }

    async fn revert(
        &self,
        task: &Task,
        svc: &Service,
        to: Option<&str>,
        upgrade_task: &str,
        deadline_ms: u64,
    ) -> TaskOutcome {
        self.phase(task, "switching");
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        match self
            .switch_to(task, svc, to, Data::Restore(upgrade_task), deadline)
            .await
        {
            Ok(_) => TaskOutcome::Succeeded,
            Err(reason) => TaskOutcome::Failed { reason },
        }
    }
}

/// What a switch does with the service's backup paths.
enum Data<'a> {
    /// Copy them, under this task's id, before switching.
    Backup(&'a str),
    /// Put back the copy taken by this task, before switching.
    Restore(&'a str),
}

impl Data<'_> {
    fn apply(&self, svc: &Service) -> Result<(), String> {
        match self {
            Data::Backup(task) => {
                backup(svc, task).map_err(|e| format!("backup failed, nothing switched: {e}"))
            }
            Data::Restore(task) => restore(svc, task).map_err(|e| format!("restoring backup: {e}")),
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

/// Copies the service's backup paths into `backups/<task>/`, then prunes old
/// generations. A backup is complete once its manifest exists.
fn backup(svc: &Service, task_id: &str) -> std::io::Result<()> {
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
    let mut entries = Vec::new();
    for (i, path) in svc.config.backup.iter().enumerate() {
        let exists = std::fs::symlink_metadata(path).is_ok();
        if exists {
            copy_tree(path, &dir.join(i.to_string()))?;
        }
        entries.push((path.clone(), exists));
    }
    let json = serde_json::to_vec_pretty(&entries).map_err(std::io::Error::other)?;
    write_atomic(&manifest, &json)?;
    prune_backups(&svc.dirs.backups(), svc.config.backups_kept);
    Ok(())
}

/// Puts the backed-up paths back as they were: present ones replaced by the
/// copy, ones that did not exist removed.
fn restore(svc: &Service, task_id: &str) -> std::io::Result<()> {
    let dir = svc.dirs.backups().join(task_id);
    let Ok(bytes) = std::fs::read(dir.join("manifest.json")) else {
        return Ok(());
    };
    let entries: Vec<(PathBuf, bool)> =
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
    for (i, (path, existed)) in entries.iter().enumerate() {
        remove_path(path)?;
        if *existed {
            copy_tree(&dir.join(i.to_string()), path)?;
        }
    }
    Ok(())
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
            (
                name.clone(),
                rollwave_core::ServiceView {
                    version: s.version,
                    health: s.health,
                    staged: svc.dirs.staged(),
                    ..Default::default()
                },
            )
        })
        .collect()
}

pub type Services = BTreeMap<String, Arc<Service>>;
