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
use crate::config::ServiceConfig;
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
        if svc.dirs.current_version().as_deref() != Some(version) {
            self.phase(task, "switching");
            if let Err(e) = svc.supervisor.stop().await {
                return TaskOutcome::Failed { reason: e };
            }
            // Taken while the service is stopped, so it is consistent.
            if let Err(e) = backup(svc, &task.id) {
                let reason = format!("backup failed, nothing switched: {e}");
                let _ = svc.supervisor.start().await;
                return TaskOutcome::Failed { reason };
            }
            if let Err(e) = svc.dirs.switch_current(Some(version)) {
                let _ = svc.supervisor.start().await;
                return TaskOutcome::Failed {
                    reason: format!("switching the current link: {e}"),
                };
            }
            history(svc, &task.id, previous, Some(version));
            let _ = svc.supervisor.start().await;
        } else if svc.supervisor.status().borrow().version.as_deref() != Some(version) {
            // Resumed after the link switched but before the new process ran.
            let _ = svc.supervisor.start().await;
        }
        self.phase(task, "gating");
        match gate(svc, version, min_healthy_ms, deadline_ms).await {
            Ok(()) => TaskOutcome::Succeeded,
            Err(why) => {
                self.phase(task, "rolling_back");
                let back = self
                    .switch_back(svc, previous, &task.id, &task.id, deadline_ms)
                    .await;
                let to = previous.unwrap_or("no version");
                let reason = match back {
                    Ok(()) => format!("{why}; rolled back to {to}"),
                    Err(e) => format!("{why}; rollback to {to} failed too: {e}"),
                };
                TaskOutcome::Failed { reason }
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
        if let Err(e) = self
            .switch_back(svc, to, &task.id, upgrade_task, deadline_ms)
            .await
        {
            return TaskOutcome::Failed { reason: e };
        }
        TaskOutcome::Succeeded
    }

    /// Stops the service, restores the backup taken by `backup_task`, points
    /// `current` at `to` and starts it, waiting until it is healthy.
    async fn switch_back(
        &self,
        svc: &Service,
        to: Option<&str>,
        task_id: &str,
        backup_task: &str,
        deadline_ms: u64,
    ) -> Result<(), String> {
        if svc.dirs.current_version().as_deref() != to {
            svc.supervisor.stop().await?;
            restore(svc, backup_task).map_err(|e| format!("restoring backup: {e}"))?;
            let from = svc.dirs.current_version();
            svc.dirs
                .switch_current(to)
                .map_err(|e| format!("switching the current link: {e}"))?;
            history(svc, task_id, from.as_deref(), to);
        }
        let Some(to) = to else {
            return Ok(());
        };
        if svc.supervisor.status().borrow().version.as_deref() != Some(to) {
            svc.supervisor.start().await?;
        }
        gate(svc, to, 0, deadline_ms).await
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
/// `min_healthy_ms` without a break, within `deadline_ms`.
async fn gate(
    svc: &Service,
    version: &str,
    min_healthy_ms: u64,
    deadline_ms: u64,
) -> Result<(), String> {
    let mut status = svc.supervisor.status();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(deadline_ms);
    let min_healthy = Duration::from_millis(min_healthy_ms);
    let generation = status.borrow().generation;
    loop {
        let s = status.borrow_and_update().clone();
        if s.generation != generation
            || (s.pid.is_none() && s.last_exit.is_some() && s.version.is_none())
        {
            let how = s.last_exit.unwrap_or_else(|| "was restarted".into());
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
            return Err(format!(
                "health gate failed: {version} was not healthy for {} within {} (health {:?}; last check: {last})",
                format_duration(min_healthy_ms),
                format_duration(deadline_ms),
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
                },
            )
        })
        .collect()
}

pub type Services = BTreeMap<String, Arc<Service>>;
