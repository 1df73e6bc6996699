//! One supervisor per service: runs whatever `current` points at, restarts it
//! with backoff when it exits, runs its health check, and stops it with the
//! configured signal and grace period.
//!
//! With `listen` sockets the supervisor opens them once and keeps them for
//! its whole life, passing them to every process it starts. A handoff starts
//! the new version as a *candidate* on the same sockets while the current
//! process keeps serving; the candidate is promoted once healthy and the old
//! process is then stopped gracefully. The listening sockets never close, so
//! no connection is refused. Each process also gets a private loopback
//! socket (named `health`) through which the agent checks that process alone.
//!
//! Services run in their own process group, so they outlive an agent that is
//! killed or restarted; the next agent re-adopts the processes recorded in
//! `process.json` (checking their start time, so a recycled pid is never
//! mistaken for them) and takes the listening sockets back from them.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use rollwave_core::Health;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::config::{ServiceConfig, RELEASE_PLACEHOLDER};
use crate::fds;
use crate::health::{run_check, CheckKind, CheckResult, HealthTracker, ResolvedCheck};
use crate::layout::{write_atomic, ServiceDirs};
use crate::logs::ServiceLog;
use crate::role::RoleStatus;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A process that ran this long without exiting resets the restart backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const ADOPTED_POLL: Duration = Duration::from_millis(50);
const LISTEN_BACKLOG: u32 = 1024;
/// Check cadence for a process not yet healthy, during its first STARTUP_WINDOW.
const STARTUP_CHECK_EVERY: Duration = Duration::from_millis(20);
const STARTUP_WINDOW: Duration = Duration::from_secs(10);

/// What the supervisor reports about its service: the process it watches,
/// which is the handoff candidate while there is one.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub version: Option<String>,
    pub pid: Option<u32>,
    pub health: Health,
    /// Increments whenever the watched process changes; tells the health
    /// gate whether the process it watches is still the one it started.
    pub generation: u64,
    pub healthy_since: Option<Instant>,
    pub last_check: Option<CheckResult>,
    /// How the last process ended, e.g. "exited with status 1".
    pub last_exit: Option<String>,
    pub restarts: u32,
}

enum Cmd {
    /// Stop every process and keep the service stopped.
    Stop(oneshot::Sender<()>),
    /// Stop, then start from what `current` points at; replies the generation.
    Start(oneshot::Sender<Result<u64, String>>),
    /// Start a candidate from `current` beside the running process.
    Handoff(oneshot::Sender<Result<u64, String>>),
    /// The candidate becomes the current process; the old one is stopped.
    Promote(oneshot::Sender<Result<(), String>>),
    /// Stop the candidate; the current process was never touched.
    Abort(oneshot::Sender<()>),
    /// Send the reload signal, if the service has one, to the current
    /// process and the candidate; replies the pids signalled.
    Reload(oneshot::Sender<Vec<u32>>),
    /// A process stopped in the background has exited (internal).
    Retired(u32),
}

#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Cmd>,
    status: watch::Receiver<Status>,
    role: watch::Receiver<RoleStatus>,
}

impl Supervisor {
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// What the service's role probe last found; always empty for a
    /// service without one.
    pub fn role(&self) -> watch::Receiver<RoleStatus> {
        self.role.clone()
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| "supervisor stopped".to_string())?;
        rx.await.map_err(|_| "supervisor stopped".to_string())
    }

    pub async fn stop(&self) -> Result<(), String> {
        self.call(Cmd::Stop).await
    }

    pub async fn start(&self) -> Result<u64, String> {
        self.call(Cmd::Start).await?
    }

    pub async fn handoff(&self) -> Result<u64, String> {
        self.call(Cmd::Handoff).await?
    }

    pub async fn promote(&self) -> Result<(), String> {
        self.call(Cmd::Promote).await?
    }

    pub async fn abort(&self) -> Result<(), String> {
        self.call(Cmd::Abort).await
    }

    /// Asks the running processes to reload (the service's `reload_signal`);
    /// a no-op for a service without one or with nothing running.
    pub async fn reload(&self) -> Result<Vec<u32>, String> {
        self.call(Cmd::Reload).await
    }
}

/// Recorded so the next agent can re-adopt running processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ProcessRecord {
    pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    start_ticks: u64,
    version: String,
    #[serde(default)]
    health_addr: Option<SocketAddr>,
    role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Role {
    Current,
    /// On trial beside the current process.
    Candidate,
    /// Told to stop and draining; killed by the next agent if it outlives us.
    Retiring,
}

enum Running {
    Child(Child),
    Adopted,
}

struct Proc {
    pid: u32,
    start_ticks: u64,
    version: String,
    started: Instant,
    how: Running,
    health_addr: Option<SocketAddr>,
    /// The service's check, aimed at this process's private socket.
    check: ResolvedCheck,
    tracker: HealthTracker,
    healthy_since: Option<Instant>,
    ever_healthy: bool,
    last_check: Option<CheckResult>,
}

impl Proc {
    fn record(&self, role: Role) -> ProcessRecord {
        ProcessRecord {
            pid: self.pid,
            start_ticks: self.start_ticks,
            version: self.version.clone(),
            health_addr: self.health_addr,
            role,
        }
    }
}

pub fn spawn(
    node: String,
    config: ServiceConfig,
    dirs: ServiceDirs,
    changed: Arc<Notify>,
    client: reqwest::Client,
    agent_socket: PathBuf,
    log: Arc<ServiceLog>,
) -> Supervisor {
    let (tx, rx) = mpsc::channel(16);
    let (status_tx, status) = watch::channel(Status::default());
    let (role_tx, role) = watch::channel(RoleStatus::default());
    // Beside the supervisor's loop rather than in it, unlike the health
    // check: a role probe decides no switch, so it must never hold up one.
    if let Some(probe) = config.role.clone() {
        tokio::spawn(crate::role::watch(
            probe,
            node.clone(),
            config.name.clone(),
            client.clone(),
            status.clone(),
            role_tx,
            changed.clone(),
        ));
    }
    let s = State {
        me: tx.clone(),
        retiring: Vec::new(),
        node,
        config,
        dirs,
        changed,
        client,
        agent_socket,
        log,
        status: status_tx,
        proc: None,
        candidate: None,
        listeners: Vec::new(),
        want_running: true,
        backoff: BACKOFF_MIN,
        restart_at: Some(Instant::now()),
    };
    tokio::spawn(s.run(rx));
    Supervisor { tx, status, role }
}

struct State {
    /// For background stops to report back.
    me: mpsc::Sender<Cmd>,
    /// Processes stopping in the background.
    retiring: Vec<ProcessRecord>,
    node: String,
    config: ServiceConfig,
    dirs: ServiceDirs,
    changed: Arc<Notify>,
    client: reqwest::Client,
    /// Told to every process, so it can ask the agent for its active version.
    agent_socket: PathBuf,
    /// Every process's stdout and stderr.
    log: Arc<ServiceLog>,
    status: watch::Sender<Status>,
    proc: Option<Proc>,
    candidate: Option<Proc>,
    /// The service's public sockets, held for the supervisor's whole life.
    listeners: Vec<OwnedFd>,
    want_running: bool,
    backoff: Duration,
    restart_at: Option<Instant>,
}

impl State {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        self.adopt();
        let interval = self.config.health.interval.max(Duration::from_millis(10));
        let mut next_check = Instant::now();
        loop {
            let restart_at = self
                .restart_at
                .filter(|_| self.proc.is_none() && self.candidate.is_none() && self.want_running);
            let check_due = self.watched().is_some();
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    self.command(cmd).await;
                    next_check = Instant::now();
                }
                exit = wait_exit(&mut self.proc) => self.exited(false, exit),
                exit = wait_exit(&mut self.candidate) => self.exited(true, exit),
                _ = sleep_until_opt(restart_at) => {
                    if let Err(e) = self.start() {
                        tracing::info!(service = %self.config.name, reason = %e, "not started");
                    }
                    next_check = Instant::now();
                }
                _ = tokio::time::sleep_until(next_check), if check_due => {
                    // Checks run inline: the timeout bounds them, and a
                    // command arriving meanwhile waits at most that long.
                    let check = self.watched().map(|p| p.check.clone());
                    if let Some(check) = check {
                        let result = run_check(&check, &self.client).await;
                        self.record_check(result);
                    }
                    // A process that has not been healthy yet is checked more
                    // often for a while, like a startup probe: a switch waits
                    // for its first healthy verdict.
                    let starting = self.watched().is_some_and(|p| {
                        !p.ever_healthy && p.started.elapsed() < STARTUP_WINDOW
                    });
                    let pace = if starting { interval.min(STARTUP_CHECK_EVERY) } else { interval };
                    next_check = Instant::now() + pace;
                }
            }
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Stop(reply) => {
                self.want_running = false;
                self.stop_all().await;
                let _ = reply.send(());
            }
            Cmd::Start(reply) => {
                self.want_running = true;
                self.stop_all().await;
                let r = self.start().map(|_| self.status.borrow().generation);
                let _ = reply.send(r);
            }
            Cmd::Handoff(reply) => {
                let r = self.handoff().await;
                let _ = reply.send(r.map(|_| self.status.borrow().generation));
            }
            Cmd::Promote(reply) => {
                let r = match self.candidate.take() {
                    Some(c) => {
                        if let Some(old) = self.proc.replace(c) {
                            // Stopped in the background: the old process
                            // drains its connections while the new one serves.
                            self.retire(old);
                        }
                        self.save_records();
                        self.publish_watched(false);
                        Ok(())
                    }
                    None => Err("no handoff candidate to promote".to_string()),
                };
                let _ = reply.send(r);
            }
            Cmd::Reload(reply) => {
                let _ = reply.send(self.reload());
            }
            Cmd::Retired(pid) => {
                self.retiring.retain(|r| r.pid != pid);
                self.save_records();
            }
            Cmd::Abort(reply) => {
                if let Some(c) = self.candidate.take() {
                    self.save_records();
                    self.publish_watched(true);
                    // In the background, like a promoted-away process: the
                    // candidate finishes the requests it took meanwhile.
                    self.retire(c);
                    self.save_records();
                }
                if self.proc.is_none() && self.want_running {
                    self.schedule_restart();
                }
                let _ = reply.send(());
            }
        }
    }

    /// Sends the reload signal to the current process and the candidate:
    /// both serve, so both must learn of the change. Retiring processes are
    /// left alone, they are on their way out.
    fn reload(&self) -> Vec<u32> {
        let Some(signal) = self.config.reload_signal else {
            return Vec::new();
        };
        let mut signalled = Vec::new();
        for p in self.proc.iter().chain(self.candidate.iter()) {
            match signal_proc(p, signal) {
                Ok(true) => signalled.push(p.pid),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(service = %self.config.name, pid = p.pid, signal = %signal, error = %e, "sending the reload signal")
                }
            }
        }
        signalled
    }

    /// Stops a process in the background, recording it until it is gone.
    fn retire(&mut self, p: Proc) {
        self.retiring.push(p.record(Role::Retiring));
        let (name, signal) = (self.config.name.clone(), self.config.stop_signal);
        let grace = Duration::from_millis(self.config.stop_grace_ms);
        let me = self.me.clone();
        tokio::spawn(async move {
            let pid = p.pid;
            stop_proc(name, p, signal, grace).await;
            let _ = me.send(Cmd::Retired(pid)).await;
        });
    }

    /// Starts a candidate beside the current process. Without sockets to
    /// share (no `listen`, or they could not be taken back after an agent
    /// restart) it falls back to stop-then-start.
    async fn handoff(&mut self) -> Result<(), String> {
        self.want_running = true;
        if let Some(c) = self.candidate.take() {
            stop_proc(self.config.name.clone(), c, Signal::SIGKILL, Duration::ZERO).await;
        }
        if self.config.listen.is_empty() || self.proc.is_none() || self.ensure_listeners().is_err()
        {
            if !self.config.listen.is_empty() && self.proc.is_some() {
                tracing::warn!(service = %self.config.name, "listening sockets unavailable; switching by restart");
            }
            self.stop_all().await;
            return self.start();
        }
        let version = self
            .dirs
            .current_version()
            .ok_or_else(|| "no release installed".to_string())?;
        let p = self.spawn_proc(&version)?;
        tracing::info!(service = %self.config.name, pid = p.pid, version = %version, "handoff candidate started");
        self.candidate = Some(p);
        self.save_records();
        self.publish_watched(true);
        Ok(())
    }

    fn watched(&self) -> Option<&Proc> {
        self.candidate.as_ref().or(self.proc.as_ref())
    }

    /// Publishes the watched process; `new` marks a change of process.
    fn publish_watched(&self, new: bool) {
        let w = self.watched().map(|p| {
            (
                p.version.clone(),
                p.pid,
                p.tracker.health(),
                p.healthy_since,
                p.last_check.clone(),
            )
        });
        self.status.send_modify(|s| {
            if new {
                s.generation += 1;
            }
            match w {
                Some((version, pid, health, since, last)) => {
                    s.version = Some(version);
                    s.pid = Some(pid);
                    s.health = health;
                    s.healthy_since = since;
                    s.last_check = last;
                }
                None => {
                    s.version = None;
                    s.pid = None;
                    s.health = Health::Stopped;
                    s.healthy_since = None;
                }
            }
        });
        self.changed.notify_one();
    }

    fn record_check(&mut self, result: CheckResult) {
        let name = self.config.name.clone();
        let Some(p) = self.candidate.as_mut().or(self.proc.as_mut()) else {
            return;
        };
        let before = p.tracker.health();
        let health = p.tracker.record(&result);
        if health != before {
            tracing::info!(service = %name, pid = p.pid, health = ?health, check = %result.detail, "health changed");
        }
        if health == Health::Healthy {
            p.ever_healthy = true;
            p.healthy_since.get_or_insert_with(Instant::now);
        } else {
            p.healthy_since = None;
        }
        p.last_check = Some(result);
        self.publish_watched(false);
    }

    /// Opens the public sockets if they are not open yet.
    fn ensure_listeners(&mut self) -> Result<(), String> {
        if !self.listeners.is_empty() || self.config.listen.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for addr in &self.config.listen {
            out.push(listen_on(*addr).map_err(|e| format!("listening on {addr}: {e}"))?);
        }
        self.listeners = out;
        Ok(())
    }

    /// Re-adopts the processes a previous agent left running, if they are
    /// still ours, and takes their listening sockets back.
    fn adopt(&mut self) {
        let path = self.dirs.process_file();
        let Some(records) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<ProcessRecord>>(&b).ok())
        else {
            return;
        };
        for rec in records {
            if proc_start_ticks(rec.pid) != Some(rec.start_ticks) {
                continue;
            }
            let check = aimed(&self.config.health, rec.health_addr).for_version(&rec.version);
            let p = Proc {
                pid: rec.pid,
                start_ticks: rec.start_ticks,
                version: rec.version.clone(),
                started: Instant::now(),
                how: Running::Adopted,
                health_addr: rec.health_addr,
                tracker: HealthTracker::new(&check),
                check,
                healthy_since: None,
                ever_healthy: false,
                last_check: None,
            };
            if rec.role != Role::Current {
                // A handoff cut short (its task will run it again), or a
                // process that was draining when the agent died: stopped
                // gracefully, as it would have been.
                tracing::warn!(service = %self.config.name, pid = rec.pid, role = ?rec.role, "stopping a process left by the previous agent");
                self.retire(p);
                continue;
            }
            if !self.config.listen.is_empty() {
                match take_listeners(rec.pid, &self.config.listen) {
                    Ok(l) => self.listeners = l,
                    Err(e) => {
                        tracing::warn!(service = %self.config.name, error = %e, "could not take the listening sockets back; the next switch will restart the service")
                    }
                }
            }
            tracing::info!(service = %self.config.name, pid = rec.pid, version = %rec.version, "re-adopted running service");
            self.proc = Some(p);
        }
        self.save_records();
        self.publish_watched(true);
    }

    fn save_records(&self) {
        let mut records: Vec<ProcessRecord> =
            self.proc.iter().map(|p| p.record(Role::Current)).collect();
        records.extend(self.candidate.iter().map(|p| p.record(Role::Candidate)));
        records.extend(self.retiring.iter().cloned());
        let result = serde_json::to_vec(&records)
            .map_err(std::io::Error::other)
            .and_then(|json| write_atomic(&self.dirs.process_file(), &json));
        if let Err(e) = result {
            tracing::warn!(service = %self.config.name, error = %e, "recording processes");
        }
    }

    /// Starts the current release as the current process.
    fn start(&mut self) -> Result<(), String> {
        let Some(version) = self.dirs.current_version() else {
            // Nothing to run until a task installs a release and asks.
            self.restart_at = None;
            self.publish_watched(false);
            return Err("no release installed".into());
        };
        match self.spawn_proc(&version) {
            Ok(p) => {
                tracing::info!(service = %self.config.name, pid = p.pid, version = %version, "service started");
                self.proc = Some(p);
                self.restart_at = None;
                self.save_records();
                self.publish_watched(true);
                Ok(())
            }
            Err(why) => {
                self.schedule_restart();
                self.status.send_modify(|s| s.last_exit = Some(why.clone()));
                self.publish_watched(true);
                Err(why)
            }
        }
    }

    fn spawn_proc(&mut self, version: &str) -> Result<Proc, String> {
        let release = self.dirs.release(version).to_string_lossy().to_string();
        let fill = |s: &str| s.replace(RELEASE_PLACEHOLDER, &release);
        let program = fill(&self.config.command[0]);
        let args: Vec<String> = self.config.command[1..].iter().map(|a| fill(a)).collect();
        let sockets = !self.config.listen.is_empty();
        let mut cmd = if sockets {
            // LISTEN_PID must be the service's own pid, known only after
            // fork: a shim sets it and execs the service, keeping the pid.
            let exe =
                std::env::current_exe().map_err(|e| format!("locating the agent binary: {e}"))?;
            let mut c = Command::new(exe);
            c.arg("listen-exec").arg("--").arg(&program).args(&args);
            c
        } else {
            let mut c = Command::new(&program);
            c.args(&args);
            c
        };
        let (out, err) = self.log.stdio().map_err(|e| {
            format!(
                "opening the log pipe of {} in {}: {e}",
                self.config.name,
                self.log.path().parent().unwrap_or(Path::new(".")).display()
            )
        })?;
        let active_file = self.dirs.active_version_file();
        // Read at spawn time: a change after this reaches the process by the
        // file, the agent socket or the reload signal, not by its env.
        let active = self.dirs.active_version().unwrap_or_else(|e| {
            tracing::warn!(service = %self.config.name, file = %active_file.display(), error = %e, "reading the active version");
            None
        });
        // Without a version the variable is unset, not inherited from the
        // agent's own environment.
        cmd.env_remove("ROLLWAVE_ACTIVE_VERSION");
        cmd.envs(self.config.env.iter().map(|(k, v)| (k, fill(v))))
            .env("ROLLWAVE_ACTIVE_VERSION_FILE", &active_file)
            .env("ROLLWAVE_AGENT_SOCKET", &self.agent_socket)
            .env("ROLLWAVE_NODE", &self.node)
            .env("ROLLWAVE_SERVICE", &self.config.name)
            .env("ROLLWAVE_VERSION", version)
            .env("ROLLWAVE_RELEASE_DIR", &release)
            .current_dir(
                self.config
                    .working_dir
                    .as_deref()
                    .map(fill)
                    .unwrap_or_else(|| release.clone()),
            )
            .stdin(Stdio::null())
            // Never the agent's own: a service's output goes to its log,
            // and keeps going there after the agent is gone.
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(false);
        if let Some(v) = &active {
            cmd.env("ROLLWAVE_ACTIVE_VERSION", v);
        }
        let mut health_addr = None;
        let mut keep = Vec::new();
        if sockets {
            self.ensure_listeners()?;
            let private = listen_on("127.0.0.1:0".parse().expect("literal address"))
                .map_err(|e| format!("opening the private health socket: {e}"))?;
            let private_addr =
                std::net::TcpListener::from(private.try_clone().map_err(|e| e.to_string())?)
                    .local_addr()
                    .map_err(|e| e.to_string())?;
            health_addr = Some(private_addr);
            let mut all: Vec<&OwnedFd> = self.listeners.iter().collect();
            all.push(&private);
            let mut names = vec!["listen"; self.listeners.len()];
            names.push("health");
            cmd.env("LISTEN_FDS", all.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            keep = fds::pass_fds(&mut cmd, &all).map_err(|e| format!("passing sockets: {e}"))?;
            keep.push(private);
        }
        let spawned = cmd.spawn();
        drop(keep);
        let child = spawned.map_err(|e| format!("starting {program}: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let check = aimed(&self.config.health, health_addr).for_version(version);
        Ok(Proc {
            pid,
            start_ticks: proc_start_ticks(pid).unwrap_or(0),
            version: version.to_string(),
            started: Instant::now(),
            how: Running::Child(child),
            health_addr,
            tracker: HealthTracker::new(&check),
            check,
            healthy_since: None,
            ever_healthy: false,
            last_check: None,
        })
    }

    fn exited(&mut self, candidate: bool, how: String) {
        let slot = if candidate {
            &mut self.candidate
        } else {
            &mut self.proc
        };
        let Some(p) = slot.take() else { return };
        tracing::warn!(service = %self.config.name, pid = p.pid, version = %p.version, exit = %how, candidate, "service exited");
        if p.started.elapsed() >= STABLE_AFTER {
            self.backoff = BACKOFF_MIN;
        }
        // A failed candidate is the handoff's failure, not a crash to retry.
        if !candidate && self.candidate.is_none() {
            self.schedule_restart();
        }
        self.save_records();
        self.status.send_modify(|s| {
            s.last_exit = Some(how);
            s.restarts += 1;
        });
        // The watched process changed if it was the one that ended.
        let watched_changed = candidate || self.candidate.is_none();
        self.publish_watched(watched_changed);
    }

    fn schedule_restart(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    async fn stop_all(&mut self) {
        let grace = Duration::from_millis(self.config.stop_grace_ms);
        let procs: Vec<Proc> = self
            .candidate
            .take()
            .into_iter()
            .chain(self.proc.take())
            .collect();
        let had = !procs.is_empty();
        for p in procs {
            stop_proc(self.config.name.clone(), p, self.config.stop_signal, grace).await;
        }
        if had {
            self.save_records();
            self.publish_watched(true);
        }
    }
}

/// Signals a process group, waits out the grace period, then kills it.
async fn stop_proc(service: String, mut p: Proc, signal: Signal, grace: Duration) {
    let pgid = Pid::from_raw(p.pid as i32);
    let _ = killpg(pgid, signal);
    if tokio::time::timeout(grace, wait_proc(&mut p))
        .await
        .is_err()
    {
        tracing::warn!(service = %service, pid = p.pid, "grace period over; killing");
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = wait_proc(&mut p).await;
    }
    tracing::info!(service = %service, pid = p.pid, version = %p.version, "service stopped");
}

/// Signals one process (not its group: a reload is addressed to the service,
/// whose children may not expect the signal). Returns false when the process
/// is already gone.
fn signal_proc(p: &Proc, signal: Signal) -> nix::Result<bool> {
    // Pid 0 would signal the agent's own process group.
    if p.pid == 0 {
        return Ok(false);
    }
    // A child is ours until reaped, so its pid cannot be recycled; an
    // adopted process is identified by its start time.
    if matches!(p.how, Running::Adopted) && proc_start_ticks(p.pid) != Some(p.start_ticks) {
        return Ok(false);
    }
    match kill(Pid::from_raw(p.pid as i32), signal) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A listening socket with a generous backlog: during a restart-mode switch
/// connections wait in it instead of being refused.
fn listen_on(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(LISTEN_BACKLOG)?;
    Ok(listener.into_std()?.into())
}

/// Takes the public sockets back from a running service (fds 3, 4, ...),
/// checking each is bound where the configuration says.
fn take_listeners(pid: u32, addrs: &[SocketAddr]) -> Result<Vec<OwnedFd>, String> {
    let mut out = Vec::new();
    for (i, want) in addrs.iter().enumerate() {
        let fd = fds::take_fd(pid, fds::LISTEN_FDS_START + i as i32)
            .map_err(|e| format!("taking fd {} from pid {pid}: {e}", 3 + i))?;
        let l = std::net::TcpListener::from(fd);
        let got = l.local_addr().map_err(|e| e.to_string())?;
        if got != *want {
            return Err(format!(
                "fd {} of pid {pid} is bound to {got}, not {want}",
                3 + i
            ));
        }
        out.push(l.into());
    }
    Ok(out)
}

/// The service's check aimed at one process's private socket, if it has one.
fn aimed(check: &ResolvedCheck, private: Option<SocketAddr>) -> ResolvedCheck {
    let Some(addr) = private else {
        return check.clone();
    };
    let mut c = check.clone();
    c.kind = match &check.kind {
        CheckKind::Http { url, expect } => {
            let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
            let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
            CheckKind::Http {
                url: format!("{scheme}://{addr}{path}"),
                expect: expect.clone(),
            }
        }
        CheckKind::Tcp { .. } => CheckKind::Tcp {
            address: addr.to_string(),
        },
        other => other.clone(),
    };
    c
}

async fn wait_proc(p: &mut Proc) -> String {
    match &mut p.how {
        Running::Child(child) => match child.wait().await {
            Ok(status) => describe_exit(status),
            Err(e) => format!("lost track of the process: {e}"),
        },
        Running::Adopted => loop {
            if proc_start_ticks(p.pid) != Some(p.start_ticks) {
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

/// Start time of a live (not zombie) process, which with its pid identifies it.
fn proc_start_ticks(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // Fields after the parenthesised command name (which may contain spaces).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    // State is field 3, starttime field 22.
    fields.get(22 - 3)?.parse().ok()
}

/// A real supervisor running a shell script as its service, for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use nix::sys::signal::Signal;
    use tokio::sync::Notify;

    use crate::config::{ServiceConfig, SwitchMode};
    use crate::executor::Service;
    use crate::health::{CheckKind, ResolvedCheck};
    use crate::layout::{agent_socket, ServiceDirs};

    /// How long a test waits for an effect it polls for; only a broken
    /// build waits this long.
    pub const PATIENCE: Duration = Duration::from_secs(20);

    pub struct ShellService {
        pub config: ServiceConfig,
        pub dirs: ServiceDirs,
        socket: PathBuf,
        state_dir: PathBuf,
    }

    /// A service running `sh -c script` from release 1.0.0 once installed.
    /// Scripts should end on their own (a bounded loop), so a failed test
    /// leaves no process behind for long.
    pub fn shell_service(
        state_dir: &Path,
        name: &str,
        script: &str,
        reload_signal: Option<Signal>,
    ) -> ShellService {
        let dirs = ServiceDirs::new(state_dir, name);
        dirs.create().unwrap();
        let config = ServiceConfig {
            name: name.to_string(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            env: Default::default(),
            working_dir: None,
            role: None,
            health: ResolvedCheck {
                kind: CheckKind::Exec {
                    command: vec!["true".into()],
                },
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(5),
                healthy_threshold: 1,
                unhealthy_threshold: 1,
            },
            stop_signal: Signal::SIGKILL,
            reload_signal,
            stop_grace_ms: 10_000,
            backup: Vec::new(),
            never_restore: Vec::new(),
            backups_kept: 1,
            listen: Vec::new(),
            switch: SwitchMode::Restart,
            drain: None,
            hooks: Default::default(),
            logs: Default::default(),
        };
        ShellService {
            config,
            dirs,
            socket: agent_socket(state_dir),
            state_dir: state_dir.to_path_buf(),
        }
    }

    impl ShellService {
        pub fn env(mut self, key: &str, path: &Path) -> Self {
            self.config
                .env
                .insert(key.to_string(), path.display().to_string());
            self
        }

        /// Installs release 1.0.0 (an empty directory) as `current`.
        pub fn installed(self) -> Self {
            std::fs::create_dir_all(self.dirs.release("1.0.0")).unwrap();
            self.dirs.switch_current(Some("1.0.0")).unwrap();
            self
        }

        /// Starts its supervisor, which starts the service if installed.
        pub fn start(self) -> Service {
            let log = crate::logs::ServiceLog::start(
                &self.state_dir,
                &self.config.name,
                self.config.logs,
            )
            .unwrap();
            let sup = super::spawn(
                "n1".into(),
                self.config.clone(),
                self.dirs.clone(),
                Arc::new(Notify::new()),
                reqwest::Client::new(),
                self.socket,
                log,
            );
            Service::new(self.config, self.dirs, sup)
        }
    }

    /// Polls `path` until its content satisfies `done`, or fails the test
    /// after PATIENCE showing what it last held.
    pub async fn wait_for_file(path: &Path, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let text = std::fs::read_to_string(path).ok();
            if let Some(t) = &text {
                if done(t) {
                    return t.clone();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} still holds {text:?} after {PATIENCE:?}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{shell_service, wait_for_file};
    use super::*;

    #[test]
    fn reads_own_start_time() {
        assert!(proc_start_ticks(std::process::id()).is_some());
        assert!(proc_start_ticks(u32::MAX - 1).is_none());
    }

    #[test]
    fn aims_checks_at_the_private_socket() {
        let check = |kind| ResolvedCheck {
            kind,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        };
        let addr: SocketAddr = "127.0.0.1:4321".parse().unwrap();
        let expect = crate::health::HttpExpect {
            status: Some(vec![200]),
            ..Default::default()
        };
        let http = check(CheckKind::Http {
            url: "http://127.0.0.1:8080/healthz?x=1".into(),
            expect: expect.clone(),
        });
        assert_eq!(
            aimed(&http, Some(addr)).kind,
            CheckKind::Http {
                url: "http://127.0.0.1:4321/healthz?x=1".into(),
                expect,
            }
        );
        assert_eq!(aimed(&http, None), http);
        let tcp = check(CheckKind::Tcp {
            address: "127.0.0.1:8080".into(),
        });
        assert_eq!(
            aimed(&tcp, Some(addr)).kind,
            CheckKind::Tcp {
                address: "127.0.0.1:4321".into()
            }
        );
    }

    #[tokio::test]
    async fn passes_the_active_version_and_delivers_the_reload_signal() {
        let tmp = tempfile::tempdir().unwrap();
        let (env, got) = (tmp.path().join("env"), tmp.path().join("got"));
        let script = r#"trap 'echo hup >> "$GOT"' HUP
echo "${ROLLWAVE_ACTIVE_VERSION-unset} $ROLLWAVE_ACTIVE_VERSION_FILE $ROLLWAVE_AGENT_SOCKET" > "$ENV.tmp"
mv "$ENV.tmp" "$ENV"
i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"#;
        let svc = shell_service(tmp.path(), "api", script, Some(Signal::SIGHUP))
            .env("ENV", &env)
            .env("GOT", &got)
            .installed();
        svc.dirs.write_active_version("1.0.0").unwrap();
        let svc = svc.start();

        let seen = wait_for_file(&env, |_| true).await;
        let file = svc.dirs.active_version_file();
        let socket = tmp.path().join("agent.sock");
        assert_eq!(
            seen,
            format!("1.0.0 {} {}\n", file.display(), socket.display())
        );
        let pid = svc.supervisor.status().borrow().pid;
        assert_eq!(svc.supervisor.reload().await.unwrap(), Vec::from_iter(pid));
        wait_for_file(&got, |t| t == "hup\n").await;

        // Nothing running: nothing to signal.
        svc.supervisor.stop().await.unwrap();
        assert_eq!(svc.supervisor.reload().await.unwrap(), Vec::<u32>::new());
    }

    #[tokio::test]
    async fn without_a_reload_signal_reload_is_a_no_op_and_the_version_unset() {
        let tmp = tempfile::tempdir().unwrap();
        let env = tmp.path().join("env");
        let script = r#"echo "${ROLLWAVE_ACTIVE_VERSION-unset}" > "$ENV.tmp"
mv "$ENV.tmp" "$ENV"
i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"#;
        let svc = shell_service(tmp.path(), "api", script, None)
            .env("ENV", &env)
            .installed()
            .start();
        assert_eq!(wait_for_file(&env, |_| true).await, "unset\n");
        assert_eq!(svc.supervisor.reload().await.unwrap(), Vec::<u32>::new());
        svc.supervisor.stop().await.unwrap();
    }

    /// Waits until the service's role status satisfies `done`.
    async fn wait_role(
        svc: &crate::executor::Service,
        done: impl Fn(&RoleStatus) -> bool,
    ) -> RoleStatus {
        let mut role = svc.supervisor.role();
        let deadline = Instant::now() + super::testing::PATIENCE;
        loop {
            let now = role.borrow_and_update().clone();
            if done(&now) {
                return now;
            }
            assert!(Instant::now() < deadline, "role still {now:?}");
            let _ = tokio::time::timeout(Duration::from_millis(100), role.changed()).await;
        }
    }

    #[tokio::test]
    async fn probes_the_role_while_the_service_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("role");
        std::fs::write(&file, "leader\n").unwrap();
        let script = "i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done";
        let mut svc = shell_service(tmp.path(), "etcd", script, None).installed();
        svc.config.role = Some(crate::role::ResolvedProbe {
            kind: crate::role::ProbeKind::Exec {
                command: vec!["cat".into(), file.display().to_string()],
            },
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
        });
        let svc = svc.start();
        let leader = RoleStatus {
            role: Some("leader".into()),
            error: None,
        };
        wait_role(&svc, |r| *r == leader).await;

        std::fs::write(&file, "Follower").unwrap();
        wait_role(&svc, |r| r.role.as_deref() == Some("follower")).await;

        // A bad answer is named, and the last good role kept beside it.
        std::fs::write(&file, "I am the leader!").unwrap();
        let bad = wait_role(&svc, |r| r.error.is_some()).await;
        assert_eq!(bad.role.as_deref(), Some("follower"));
        assert_eq!(
            bad.error.as_deref(),
            Some(
                r#"answered "I am the leader!" which is not a role word (1-32 letters, digits, _ or -)"#
            )
        );
        std::fs::remove_file(&file).unwrap();
        let missing = wait_role(&svc, |r| {
            r.error
                .as_deref()
                .is_some_and(|e| e.starts_with("exit status 1: "))
        })
        .await;
        assert!(missing.error.unwrap().contains("No such file"));

        // A stopped service has no role.
        std::fs::write(&file, "leader").unwrap();
        wait_role(&svc, |r| *r == leader).await;
        svc.supervisor.stop().await.unwrap();
        wait_role(&svc, |r| *r == RoleStatus::default()).await;
    }
}
