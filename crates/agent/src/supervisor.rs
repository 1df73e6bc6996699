//! One supervisor per service: runs whatever `current` points at, restarts it
//! with backoff when it exits, runs its health check, and stops it with the
//! configured signal and grace period.
//!
//! Services run in their own process group, so they outlive an agent that is
//! killed or restarted; the next agent re-adopts the process recorded in
//! `process.json` (checking its start time, so a recycled pid is never
//! mistaken for it) instead of starting a second copy.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rollwave_core::Health;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::config::{ServiceConfig, RELEASE_PLACEHOLDER};
use crate::health::{run_check, CheckResult, HealthTracker};
use crate::layout::{write_atomic, ServiceDirs};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A process that ran this long without exiting resets the restart backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const ADOPTED_POLL: Duration = Duration::from_millis(100);

/// What the supervisor reports about its service.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Version of the running process.
    pub version: Option<String>,
    pub pid: Option<u32>,
    pub health: Health,
    /// Increments with every process start; tells the health gate whether
    /// the process it watches is still the one it switched to.
    pub generation: u64,
    pub healthy_since: Option<Instant>,
    pub last_check: Option<CheckResult>,
    /// How the last process ended, e.g. "exited with status 1".
    pub last_exit: Option<String>,
    pub restarts: u32,
}

enum Cmd {
    /// Stop the process and keep it stopped.
    Stop(oneshot::Sender<()>),
    /// (Re)start from what `current` points at; replies with the new generation.
    Start(oneshot::Sender<Result<u64, String>>),
}

#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Cmd>,
    status: watch::Receiver<Status>,
}

impl Supervisor {
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    pub async fn stop(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Stop(tx))
            .await
            .map_err(|_| "supervisor stopped".to_string())?;
        rx.await.map_err(|_| "supervisor stopped".to_string())
    }

    pub async fn start(&self) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Start(tx))
            .await
            .map_err(|_| "supervisor stopped".to_string())?;
        rx.await.map_err(|_| "supervisor stopped".to_string())?
    }
}

/// Recorded so the next agent can re-adopt a running service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ProcessRecord {
    pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    start_ticks: u64,
    version: String,
}

enum Running {
    Child(Child),
    Adopted,
}

struct Proc {
    pid: u32,
    version: String,
    started: Instant,
    how: Running,
}

pub fn spawn(
    node: String,
    config: ServiceConfig,
    dirs: ServiceDirs,
    changed: Arc<Notify>,
    client: reqwest::Client,
) -> Supervisor {
    let (tx, rx) = mpsc::channel(16);
    let (status_tx, status) = watch::channel(Status::default());
    let s = State {
        node,
        config,
        dirs,
        changed,
        client,
        status: status_tx,
        proc: None,
        want_running: true,
        backoff: BACKOFF_MIN,
        restart_at: Some(Instant::now()),
        tracker: None,
    };
    tokio::spawn(s.run(rx));
    Supervisor { tx, status }
}

struct State {
    node: String,
    config: ServiceConfig,
    dirs: ServiceDirs,
    changed: Arc<Notify>,
    client: reqwest::Client,
    status: watch::Sender<Status>,
    proc: Option<Proc>,
    want_running: bool,
    backoff: Duration,
    restart_at: Option<Instant>,
    tracker: Option<HealthTracker>,
}

impl State {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        self.adopt();
        let interval = self.config.health.interval.max(Duration::from_millis(10));
        let mut next_check = Instant::now();
        loop {
            let restart_at = self
                .restart_at
                .filter(|_| self.proc.is_none() && self.want_running);
            let check_due = self.proc.is_some();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Cmd::Stop(reply)) => {
                        self.want_running = false;
                        self.stop().await;
                        let _ = reply.send(());
                    }
                    Some(Cmd::Start(reply)) => {
                        self.want_running = true;
                        self.stop().await;
                        let result = self.start();
                        next_check = Instant::now();
                        let _ = reply.send(result.map(|_| self.status.borrow().generation));
                    }
                },
                exit = wait_exit(&mut self.proc) => {
                    self.exited(exit);
                }
                _ = sleep_until_opt(restart_at) => {
                    if let Err(e) = self.start() {
                        tracing::info!(service = %self.config.name, reason = %e, "not started");
                    }
                    next_check = Instant::now();
                }
                _ = tokio::time::sleep_until(next_check), if check_due => {
                    // Checks run inline: the timeout bounds them, and a
                    // command arriving meanwhile waits at most that long.
                    let result = run_check(&self.config.health, &self.client).await;
                    next_check = Instant::now() + interval;
                    self.record_check(result);
                }
            }
        }
    }

    fn publish(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
        self.changed.notify_one();
    }

    fn record_check(&mut self, result: CheckResult) {
        if self.proc.is_none() {
            return;
        }
        let tracker = self
            .tracker
            .get_or_insert_with(|| HealthTracker::new(&self.config.health));
        let health = tracker.record(&result);
        let before = self.status.borrow().health;
        if health != before {
            tracing::info!(service = %self.config.name, health = ?health, check = %result.detail, "health changed");
        }
        self.publish(|s| {
            if health == Health::Healthy && s.healthy_since.is_none() {
                s.healthy_since = Some(Instant::now());
            } else if health != Health::Healthy {
                s.healthy_since = None;
            }
            s.health = health;
            s.last_check = Some(result);
        });
    }

    /// Re-adopts the process a previous agent left running, if it is still ours.
    fn adopt(&mut self) {
        let path = self.dirs.process_file();
        let Some(rec) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ProcessRecord>(&b).ok())
        else {
            return;
        };
        if proc_start_ticks(rec.pid) != Some(rec.start_ticks) {
            let _ = std::fs::remove_file(&path);
            return;
        }
        tracing::info!(service = %self.config.name, pid = rec.pid, version = %rec.version, "re-adopted running service");
        self.proc = Some(Proc {
            pid: rec.pid,
            version: rec.version.clone(),
            started: Instant::now(),
            how: Running::Adopted,
        });
        self.tracker = None;
        self.publish(|s| {
            s.version = Some(rec.version);
            s.pid = Some(rec.pid);
            s.health = Health::Starting;
            s.healthy_since = None;
            s.generation += 1;
        });
    }

    fn start(&mut self) -> Result<(), String> {
        let Some(version) = self.dirs.current_version() else {
            // Nothing to run until a task installs a release and asks.
            self.restart_at = None;
            self.publish(|s| {
                s.health = Health::Stopped;
                s.version = None;
            });
            return Err("no release installed".into());
        };
        let release_dir = self.dirs.release(&version);
        let release = release_dir.to_string_lossy().to_string();
        let fill = |s: &str| s.replace(RELEASE_PLACEHOLDER, &release);
        let mut cmd = Command::new(fill(&self.config.command[0]));
        cmd.args(self.config.command[1..].iter().map(|a| fill(a)))
            .envs(self.config.env.iter().map(|(k, v)| (k, fill(v))))
            .env("ROLLWAVE_NODE", &self.node)
            .env("ROLLWAVE_SERVICE", &self.config.name)
            .env("ROLLWAVE_VERSION", &version)
            .env("ROLLWAVE_RELEASE_DIR", &release)
            .current_dir(
                self.config
                    .working_dir
                    .as_deref()
                    .map(fill)
                    .unwrap_or_else(|| release.clone()),
            )
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        let result = cmd.spawn();
        let child = match result {
            Ok(c) => c,
            Err(e) => {
                let why = format!("starting {}: {e}", fill(&self.config.command[0]));
                self.schedule_restart();
                self.publish(|s| {
                    s.health = Health::Stopped;
                    s.last_exit = Some(why.clone());
                    s.version = None;
                    s.pid = None;
                });
                return Err(why);
            }
        };
        let pid = child.id().unwrap_or(0);
        if let Some(start_ticks) = proc_start_ticks(pid) {
            let rec = ProcessRecord {
                pid,
                start_ticks,
                version: version.clone(),
            };
            if let Ok(json) = serde_json::to_vec(&rec) {
                if let Err(e) = write_atomic(&self.dirs.process_file(), &json) {
                    tracing::warn!(service = %self.config.name, error = %e, "recording process");
                }
            }
        }
        tracing::info!(service = %self.config.name, pid, version = %version, "service started");
        self.proc = Some(Proc {
            pid,
            version: version.clone(),
            started: Instant::now(),
            how: Running::Child(child),
        });
        self.tracker = None;
        self.restart_at = None;
        self.publish(|s| {
            s.version = Some(version);
            s.pid = Some(pid);
            s.health = Health::Starting;
            s.healthy_since = None;
            s.generation += 1;
        });
        Ok(())
    }

    fn exited(&mut self, how: String) {
        let Some(p) = self.proc.take() else { return };
        tracing::warn!(service = %self.config.name, pid = p.pid, version = %p.version, exit = %how, "service exited");
        let _ = std::fs::remove_file(self.dirs.process_file());
        if p.started.elapsed() >= STABLE_AFTER {
            self.backoff = BACKOFF_MIN;
        }
        self.schedule_restart();
        self.publish(|s| {
            s.health = Health::Stopped;
            s.healthy_since = None;
            s.pid = None;
            s.version = None;
            s.last_exit = Some(how);
            s.restarts += 1;
        });
    }

    fn schedule_restart(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Signals the process group, waits out the grace period, then kills it.
    async fn stop(&mut self) {
        let Some(mut p) = self.proc.take() else {
            return;
        };
        let pgid = Pid::from_raw(p.pid as i32);
        let grace = Duration::from_millis(self.config.stop_grace_ms);
        let _ = killpg(pgid, self.config.stop_signal);
        let exited = tokio::time::timeout(grace, wait_proc(&mut p)).await.is_ok();
        if !exited {
            tracing::warn!(service = %self.config.name, pid = p.pid, "grace period over; killing");
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = wait_proc(&mut p).await;
        }
        let _ = std::fs::remove_file(self.dirs.process_file());
        tracing::info!(service = %self.config.name, pid = p.pid, version = %p.version, "service stopped");
        self.publish(|s| {
            s.health = Health::Stopped;
            s.healthy_since = None;
            s.pid = None;
            s.version = None;
        });
    }
}

async fn wait_proc(p: &mut Proc) -> String {
    match &mut p.how {
        Running::Child(child) => match child.wait().await {
            Ok(status) => describe_exit(status),
            Err(e) => format!("lost track of the process: {e}"),
        },
        Running::Adopted => loop {
            if !alive(p.pid) {
                return "exited (adopted process; status unknown)".to_string();
            }
            tokio::time::sleep(ADOPTED_POLL).await;
        },
    }
}

async fn wait_exit(proc: &mut Option<Proc>) -> String {
    match proc {
        Some(p) => wait_proc(p).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "exited".to_string(),
    }
}

/// A process is alive if it exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_fields(&stat).is_some_and(|f| f.first() != Some(&"Z")),
        Err(_) => false,
    }
}

fn proc_start_ticks(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    let fields = stat_fields(&stat)?;
    if fields.first() == Some(&"Z") {
        return None;
    }
    // Fields after the command: state is field 3, starttime is field 22.
    fields.get(22 - 3)?.parse().ok()
}

/// The fields of /proc/PID/stat after the parenthesised command name, which
/// may itself contain spaces and parentheses.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_start_time() {
        let me = std::process::id();
        assert!(proc_start_ticks(me).is_some());
        assert!(alive(me));
        assert!(!alive(u32::MAX - 1));
    }
}
