//! `rollwave sim`: a fleet of virtual agents in one process, to try the
//! control plane at the size of a data center (like Kubernetes' kubemark
//! hollow nodes and KWOK, or Nomad's nomad-nodesim).
//!
//! A virtual agent is not a mock of the server's view of an agent: it
//! enrolls with the join token for a credential of its own and opens its own
//! session, both through the agent's code (`enroll::enroll`,
//! `dial_session`), speaks the agent protocol (hello, status on every
//! change, task phases and results, pongs), and rides out a control plane
//! restart by reconnecting with backoff. Only the executor is cheap: a task
//! waits `--task-latency` and then changes a version in memory. Each agent
//! is one tokio task holding one connection, so ten thousand fit in one
//! process.
//!
//! It counts what the control plane made the fleet do, above all how often
//! each node switched to each version: a task sent again after a restart
//! must be answered from the node's record, never run twice, and the report
//! shows whether it was.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use rollwave_agent::{Dialed, SessionStream};
use rollwave_api::{
    AgentMessage, ServerMessage, Task, TaskAction, TaskOutcome, AGENT_PROTOCOL,
    SESSION_SILENCE_LIMIT,
};
use rollwave_core::{Health, ServiceView};
use rollwave_tls::ClientTls;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

use crate::cli::SimArgs;
use crate::client::user_error;

/// As the agent: a refused credential is not retried quickly.
const REFUSED_BACKOFF: Duration = Duration::from_secs(30);
/// How long the control plane has to answer the first request before the
/// sim gives up on it: it must say at once that nothing is there.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(5);

/// The kinds of task, as the report names them.
const KINDS: [&str; 4] = ["stage", "upgrade", "revert", "dry_run"];
/// What became of a task, as the report names it, by index.
const OUTCOMES: [&str; 3] = ["succeeded", "failed", "answered_again"];
const SUCCEEDED: usize = 0;
const FAILED: usize = 1;
const ANSWERED_AGAIN: usize = 2;

/// Runs the fleet until SIGINT or SIGTERM; writes the report last.
pub async fn run(server: &str, tls: &ClientTls, args: SimArgs) -> anyhow::Result<ExitCode> {
    let config = Config::from_args(server, tls, &args)?;
    let http = http_client(&config)?;
    preflight(&http, &config.server).await?;
    let mut credentials = match &args.credentials {
        Some(path) => load_credentials(path)?,
        None => BTreeMap::new(),
    };
    let sim = Arc::new(Sim::new(config, args.agents));
    let reporter = tokio::spawn(report_loop(sim.clone(), args.report.clone(), args.quiet));

    // One first, alone: a refused join token is one line, not one per node.
    let first = sim.name(0);
    if let std::collections::btree_map::Entry::Vacant(entry) = credentials.entry(first) {
        let (server, join) = (&sim.config.server, &sim.config.join);
        let token =
            rollwave_agent::enroll::enroll(&http, std::slice::from_ref(server), join, entry.key())
                .await?;
        entry.insert(token);
    }
    let known: Vec<Option<String>> = (0..args.agents)
        .map(|i| credentials.get(&sim.name(i)).cloned())
        .collect();
    let enrolling = known.into_iter().enumerate().map(|(i, known)| {
        let name = sim.name(i);
        let (http, sim) = (http.clone(), sim.clone());
        async move {
            let token = match known {
                Some(t) => t,
                None => {
                    let join = &sim.config.join;
                    rollwave_agent::enroll::enroll(
                        &http,
                        std::slice::from_ref(&sim.config.server),
                        join,
                        &name,
                    )
                    .await?
                }
            };
            sim.enrolled.fetch_add(1, Ordering::Relaxed);
            // Each node connects as soon as it has its credential, while
            // the others are still enrolling.
            tokio::spawn(VirtualAgent::new(&sim, i, token.clone()).run(sim.clone()));
            anyhow::Ok((name, token))
        }
    });
    let mut enrolled = futures_util::stream::iter(enrolling).buffer_unordered(args.concurrency);
    let shutdown = crate::commands::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            next = enrolled.next() => match next {
                Some(Ok((name, token))) => {
                    credentials.insert(name, token);
                }
                Some(Err(e)) => {
                    save_credentials(args.credentials.as_deref(), &credentials)?;
                    return Err(e);
                }
                None => break,
            },
            _ = &mut shutdown => {
                save_credentials(args.credentials.as_deref(), &credentials)?;
                finish(&sim, args.report.as_deref(), args.quiet, reporter).await?;
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    drop(enrolled);
    save_credentials(args.credentials.as_deref(), &credentials)?;
    shutdown.await;
    finish(&sim, args.report.as_deref(), args.quiet, reporter).await?;
    Ok(ExitCode::SUCCESS)
}

async fn finish(
    sim: &Sim,
    report: Option<&Path>,
    quiet: bool,
    reporter: tokio::task::JoinHandle<()>,
) -> anyhow::Result<()> {
    reporter.abort();
    if let Some(path) = report {
        write_report(path, &sim.report())?;
    }
    if !quiet {
        eprintln!("{}", sim.progress());
    }
    Ok(())
}

/// The flags, checked, in the form the agents use.
struct Config {
    server: String,
    tls: Option<Arc<rollwave_tls::ClientConfig>>,
    service: String,
    version: Option<String>,
    labels: Vec<(String, Template)>,
    latency: Duration,
    fail_rate: f64,
    seed: u64,
    concurrency: usize,
    report_every: Duration,
    join: String,
}

impl Config {
    fn from_args(server: &str, tls: &ClientTls, args: &SimArgs) -> anyhow::Result<Config> {
        let server = server.trim_end_matches('/').to_string();
        let tls = if server.starts_with("https://") {
            Some(tls.config().map_err(|e| user_error(e.to_string()))?)
        } else if server.starts_with("http://") {
            if tls.ca_file.is_some() || tls.pin.is_some() {
                return Err(user_error(format!(
                    "--server: {server} is plain HTTP, which --ca-file and --pin cannot verify; use https://"
                )));
            }
            None
        } else {
            return Err(user_error(format!(
                "--server: {server:?} must start with http:// or https://"
            )));
        };
        if args.agents == 0 {
            return Err(user_error("--agents: must be at least 1"));
        }
        if let Some(limit) = open_files_limit() {
            // One socket per agent, and a few for the rest.
            let needed = args.agents as u64 + 64;
            if needed > limit {
                return Err(user_error(format!(
                    "--agents {}: needs about {needed} open files, and this process may open {limit}; raise the limit (`ulimit -n {needed}`) or run fewer agents",
                    args.agents
                )));
            }
        }
        if args.concurrency == 0 {
            return Err(user_error("--concurrency: must be at least 1"));
        }
        rollwave_core::validate_service_name("--service", &args.service)
            .map_err(|e| user_error(e.to_string()))?;
        if let Some(v) = &args.version {
            rollwave_core::parse_version("--version", v).map_err(|e| user_error(e.to_string()))?;
        }
        let duration = |flag: &str, text: &str| {
            humantime::parse_duration(text)
                .map_err(|e| user_error(format!("{flag}: {text:?} is not a duration: {e}")))
        };
        let latency = duration("--task-latency", &args.task_latency)?;
        let report_every = duration("--report-every", &args.report_every)?;
        if report_every.is_zero() {
            return Err(user_error("--report-every: must be above 0"));
        }
        let fail_rate = args
            .fail_rate
            .parse::<f64>()
            .ok()
            .filter(|p| (0.0..=1.0).contains(p))
            .ok_or_else(|| {
                user_error(format!(
                    "--fail-rate: {:?} is not a probability between 0 and 1",
                    args.fail_rate
                ))
            })?;
        let labels = match &args.labels {
            Some(text) => parse_labels(text).map_err(|e| user_error(format!("--labels: {e}")))?,
            None => Vec::new(),
        };
        let path = &args.join_token_file;
        let join = std::fs::read_to_string(path)
            .map_err(|e| {
                user_error(format!(
                    "--join-token-file: reading {}: {e}",
                    path.display()
                ))
            })?
            .trim()
            .to_string();
        if join.is_empty() {
            return Err(user_error(format!(
                "--join-token-file: {} is empty",
                path.display()
            )));
        }
        Ok(Config {
            server,
            tls,
            service: args.service.clone(),
            version: args.version.clone(),
            labels,
            latency,
            fail_rate,
            seed: args.seed,
            concurrency: args.concurrency,
            report_every,
            join,
        })
    }
}

/// The soft limit on open files, from /proc (Linux), if it has one.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One client for every enrollment: its connections are reused, so ten
/// thousand enrollments do not cost ten thousand TLS handshakes.
fn http_client(config: &Config) -> anyhow::Result<reqwest::Client> {
    let builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none());
    let builder = match &config.tls {
        Some(tls) => builder.use_preconfigured_tls((**tls).clone()),
        None => builder,
    };
    builder.build().context("building http client")
}

/// Fails at once, in one line, when nothing answers at `server` (or not as
/// a rollwave control plane, or with a certificate that is refused): the
/// agents themselves would wait for it forever.
async fn preflight(http: &reqwest::Client, server: &str) -> anyhow::Result<()> {
    let url = format!("{server}/v1/health");
    let resp = http
        .get(&url)
        .timeout(PREFLIGHT_TIMEOUT)
        .send()
        .await
        .map_err(|e| {
            let why =
                rollwave_tls::describe_error(&e).unwrap_or_else(|| rollwave_core::error_chain(&e));
            anyhow::anyhow!("cannot reach the control plane at {server}: {why}")
        })?;
    let status = resp.status();
    let health: Option<rollwave_api::HealthResponse> = resp.json().await.ok();
    if !status.is_success() || health.is_none() {
        anyhow::bail!("{url} answered {status}, not as a rollwave control plane does");
    }
    Ok(())
}

/// A label value with `{i}` and `{i%K}` in it.
#[derive(Debug, Clone, PartialEq)]
struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Index,
    Modulo(u64),
}

impl Template {
    fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(format!("{text:?}: '}}' without '{{'"));
            }
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("{text:?}: '{{' without '}}'"))?;
            let inner = &rest[open + 1..close];
            let piece = match inner.strip_prefix("i%") {
                _ if inner == "i" => Piece::Index,
                Some(k) => match k.parse::<u64>() {
                    Ok(k) if k > 0 => Piece::Modulo(k),
                    _ => {
                        return Err(format!(
                            "{text:?}: in {{{inner}}}, K must be a whole number above 0"
                        ))
                    }
                },
                None => {
                    return Err(format!(
                        "{text:?}: unknown placeholder {{{inner}}}; use {{i}} or {{i%K}}"
                    ))
                }
            };
            pieces.push(piece);
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Template(pieces))
    }

    fn render(&self, i: u64) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Index => out.push_str(&i.to_string()),
                Piece::Modulo(k) => out.push_str(&(i % k).to_string()),
            }
        }
        out
    }
}

fn parse_labels(text: &str) -> Result<Vec<(String, Template)>, String> {
    let mut labels: Vec<(String, Template)> = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{pair:?} has no key"));
        }
        if labels.iter().any(|(k, _)| k == key) {
            return Err(format!("{key:?} is given twice"));
        }
        labels.push((key.to_string(), Template::parse(value.trim())?));
    }
    Ok(labels)
}

/// A number in [0, 1) that depends only on its inputs: the same seed fails
/// the same tasks on the same nodes whatever order they arrive in.
/// A reconnection's random number, drawn from the seed.
fn random(sim: &Sim, node: usize, attempt: u64) -> u64 {
    let d = draw(sim.config.seed, node, &format!("reconnect-{attempt}"));
    (d * u64::MAX as f64) as u64
}

fn draw(seed: u64, node: usize, task: &str) -> f64 {
    // FNV-1a over the task id, then splitmix64's finalizer to spread it.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in task.bytes().chain((node as u64).to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// What the whole fleet shares: the flags, the counters, and each node's
/// switches (read by the report while the node's agent writes them).
struct Sim {
    config: Config,
    dials: Semaphore,
    enrolled: AtomicUsize,
    connected: AtomicUsize,
    sessions: AtomicU64,
    refused: AtomicU64,
    tasks: [[AtomicU64; OUTCOMES.len()]; KINDS.len()],
    nodes: Vec<Mutex<NodeRecord>>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct NodeRecord {
    version: Option<String>,
    switches: u32,
    /// Switches by the version switched to.
    switched_to: BTreeMap<String, u32>,
}

impl Sim {
    fn new(config: Config, agents: usize) -> Sim {
        let dials = Semaphore::new(config.concurrency);
        let nodes = (0..agents)
            .map(|_| {
                Mutex::new(NodeRecord {
                    version: config.version.clone(),
                    ..Default::default()
                })
            })
            .collect();
        Sim {
            config,
            dials,
            enrolled: AtomicUsize::new(0),
            connected: AtomicUsize::new(0),
            sessions: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            tasks: Default::default(),
            nodes,
        }
    }

    fn name(&self, index: usize) -> String {
        format!("sim-{}", index + 1)
    }

    fn count(&self, kind: usize, outcome: usize) {
        self.tasks[kind][outcome].fetch_add(1, Ordering::Relaxed);
    }

    fn records(&self) -> Vec<NodeRecord> {
        self.nodes
            .iter()
            .map(|n| n.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    fn report(&self) -> Report {
        let records = self.records();
        let mut versions = BTreeMap::new();
        for r in &records {
            let v = r.version.clone().unwrap_or_else(|| "none".into());
            *versions.entry(v).or_insert(0) += 1;
        }
        let tasks = KINDS
            .iter()
            .enumerate()
            .map(|(k, kind)| {
                let by_outcome = OUTCOMES
                    .iter()
                    .enumerate()
                    .map(|(o, outcome)| {
                        (
                            outcome.to_string(),
                            self.tasks[k][o].load(Ordering::Relaxed),
                        )
                    })
                    .collect();
                (kind.to_string(), by_outcome)
            })
            .collect();
        Report {
            agents: records.len(),
            enrolled: self.enrolled.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            sessions_opened: self.sessions.load(Ordering::Relaxed),
            sessions_refused: self.refused.load(Ordering::Relaxed),
            tasks,
            switches: records.iter().map(|r| u64::from(r.switches)).sum(),
            nodes_switched_more_than_once: records.iter().filter(|r| r.switches > 1).count(),
            nodes_switched_to_a_version_twice: records
                .iter()
                .filter(|r| r.switched_to.values().any(|&n| n > 1))
                .count(),
            versions,
            nodes: records
                .into_iter()
                .enumerate()
                .map(|(i, r)| (self.name(i), r))
                .collect(),
        }
    }

    /// One line: how far enrollment got and what the fleet did.
    fn progress(&self) -> String {
        let r = self.report();
        let sum = |o: usize| -> u64 {
            (0..KINDS.len())
                .map(|k| self.tasks[k][o].load(Ordering::Relaxed))
                .sum()
        };
        format!(
            "sim: {} agents, {} enrolled, {} connected; tasks {} succeeded, {} failed, {} answered again; {} switches, {} nodes switched to one version twice",
            r.agents,
            r.enrolled,
            r.connected,
            sum(SUCCEEDED),
            sum(FAILED),
            sum(ANSWERED_AGAIN),
            r.switches,
            r.nodes_switched_to_a_version_twice
        )
    }
}

/// What `--report` holds.
#[derive(Serialize)]
struct Report {
    agents: usize,
    enrolled: usize,
    /// Sessions open now.
    connected: usize,
    /// Sessions opened so far, reconnections included.
    sessions_opened: u64,
    sessions_refused: u64,
    /// By kind (`stage`, `upgrade`, `revert`, `dry_run`), then outcome
    /// (`succeeded`, `failed`, `answered_again`: a task received again and
    /// answered from the node's record).
    tasks: BTreeMap<String, BTreeMap<String, u64>>,
    /// Changes of the running version, all nodes together.
    switches: u64,
    nodes_switched_more_than_once: usize,
    /// Nodes that switched to one version more than once: what a task run
    /// twice would do.
    nodes_switched_to_a_version_twice: usize,
    /// Nodes by running version (`none`: nothing installed).
    versions: BTreeMap<String, usize>,
    nodes: BTreeMap<String, NodeRecord>,
}

/// Replaced whole: a reader never sees half a report.
fn write_report(path: &Path, report: &Report) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(report)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

async fn report_loop(sim: Arc<Sim>, report: Option<PathBuf>, quiet: bool) {
    let mut every = tokio::time::interval(sim.config.report_every);
    every.tick().await;
    loop {
        every.tick().await;
        if let Some(path) = &report {
            let (sim, path) = (sim.clone(), path.clone());
            let written =
                tokio::task::spawn_blocking(move || write_report(&path, &sim.report())).await;
            if let Ok(Err(e)) = written {
                tracing::warn!(error = %crate::error_line(&e), "writing the report");
            }
        }
        if !quiet {
            eprintln!("{}", sim.progress());
        }
    }
}

fn load_credentials(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| user_error(format!("--credentials: {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(user_error(format!(
            "--credentials: reading {}: {e}",
            path.display()
        ))),
    }
}

fn save_credentials(path: Option<&Path>, all: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    rollwave_tls::write_atomic(path, &serde_json::to_vec(all)?, 0o600)
        .with_context(|| format!("storing the credentials {}", path.display()))
}

/// A task being carried out: it ends at `due`.
struct Running {
    due: Instant,
    task: Task,
}

/// One node: its state lives here across sessions, as an agent's lives on
/// its disk.
struct VirtualAgent {
    index: usize,
    name: String,
    credential: String,
    labels: BTreeMap<String, String>,
    version: Option<String>,
    staged: Vec<String>,
    /// Finished tasks, by id: what a task received again is answered with.
    done: HashMap<String, TaskOutcome>,
    running: Vec<Running>,
    /// What the session has yet to send; task results are kept across a
    /// reconnection, the rest is said again by the next hello.
    outbox: VecDeque<AgentMessage>,
}

enum Ended {
    Closed,
    Refused(String),
}

impl VirtualAgent {
    fn new(sim: &Sim, index: usize, credential: String) -> VirtualAgent {
        let number = index as u64 + 1;
        VirtualAgent {
            index,
            name: sim.name(index),
            credential,
            labels: sim
                .config
                .labels
                .iter()
                .map(|(k, t)| (k.clone(), t.render(number)))
                .collect(),
            version: sim.config.version.clone(),
            staged: sim.config.version.iter().cloned().collect(),
            done: HashMap::new(),
            running: Vec::new(),
            outbox: VecDeque::new(),
        }
    }

    /// Connects and reconnects for ever, with the agent's backoff, its
    /// jitter drawn from the seed.
    async fn run(mut self, sim: Arc<Sim>) {
        let url = rollwave_agent::session_url(&sim.config.server);
        // Small buffers: the messages are small, and there are many sessions.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let mut backoff = rollwave_agent::Backoff::default();
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let dialed = {
                let _permit = sim.dials.acquire().await;
                let connector = sim.config.tls.clone().map(Connector::Rustls);
                rollwave_agent::dial_session(&url, &self.credential, connector, Some(ws_config))
                    .await
            };
            let wait = match dialed {
                Ok(Dialed::Open(ws)) => {
                    sim.sessions.fetch_add(1, Ordering::Relaxed);
                    sim.connected.fetch_add(1, Ordering::Relaxed);
                    let ended = self.session(&sim, *ws).await;
                    sim.connected.fetch_sub(1, Ordering::Relaxed);
                    self.outbox
                        .retain(|m| matches!(m, AgentMessage::TaskResult { .. }));
                    backoff = rollwave_agent::Backoff::default();
                    match ended {
                        Ok(Ended::Refused(reason)) => {
                            sim.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(node = %self.name, reason = %reason, "the control plane refused the session");
                            REFUSED_BACKOFF
                        }
                        Ok(Ended::Closed) | Err(_) => {
                            tracing::debug!(node = %self.name, "session ended; reconnecting");
                            backoff.next(random(&sim, self.index, attempt))
                        }
                    }
                }
                Ok(Dialed::Refused(reason)) => {
                    sim.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node = %self.name, reason = %reason, "the control plane refused the credential");
                    REFUSED_BACKOFF
                }
                // One server: a follower is retried like one that is down.
                Ok(Dialed::Follower(leader)) => {
                    tracing::debug!(node = %self.name, %leader, "the control plane follows");
                    backoff.next(random(&sim, self.index, attempt))
                }
                Err(e) => {
                    tracing::debug!(node = %self.name, error = %e, "control plane unreachable");
                    backoff.next(random(&sim, self.index, attempt))
                }
            };
            self.idle(&sim, wait).await;
        }
    }

    /// Waits without a session; tasks under way still finish, and their
    /// results wait for the next session.
    async fn idle(&mut self, sim: &Sim, wait: Duration) {
        let until = Instant::now() + wait;
        loop {
            match self.next_due().filter(|d| *d < until) {
                Some(due) => {
                    tokio::time::sleep_until(due).await;
                    self.finish_due(sim);
                }
                None => {
                    tokio::time::sleep_until(until).await;
                    return;
                }
            }
        }
    }

    fn view(&self, sim: &Sim) -> BTreeMap<String, ServiceView> {
        let health = match self.version {
            Some(_) => Health::Healthy,
            None => Health::Stopped,
        };
        BTreeMap::from([(
            sim.config.service.clone(),
            ServiceView {
                version: self.version.clone(),
                health,
                staged: self.staged.clone(),
                ..Default::default()
            },
        )])
    }

    async fn session(&mut self, sim: &Sim, ws: SessionStream) -> anyhow::Result<Ended> {
        let (mut sink, mut stream) = ws.split();
        let hello = AgentMessage::Hello {
            protocol: AGENT_PROTOCOL,
            node: self.name.clone(),
            labels: self.labels.clone(),
            agent_version: format!("{} (sim)", env!("CARGO_PKG_VERSION")),
            services: self.view(sim),
        };
        send(&mut sink, &hello).await?;
        self.flush(&mut sink).await?;
        // As the agent: a session that carries nothing, not even the
        // control plane's pings, for this long is dead.
        let silence = tokio::time::sleep(SESSION_SILENCE_LIMIT);
        tokio::pin!(silence);
        loop {
            let due = self.next_due();
            tokio::select! {
                _ = &mut silence => {
                    anyhow::bail!("the control plane sent nothing for {SESSION_SILENCE_LIMIT:?}");
                }
                _ = async { match due { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    self.finish_due(sim);
                    self.flush(&mut sink).await?;
                }
                // Reading also answers the control plane's pings: the
                // WebSocket queues the pong and sends it on the next read.
                frame = stream.next() => {
                    silence.as_mut().reset(Instant::now() + SESSION_SILENCE_LIMIT);
                    match frame {
                        Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMessage>(text.as_str()) {
                            Ok(ServerMessage::Task(task)) => {
                                self.receive(sim, task);
                                self.flush(&mut sink).await?;
                            }
                            Ok(ServerMessage::Logs(req)) => {
                                // Answered, as an agent would, so that a
                                // request to a virtual node does not wait.
                                self.outbox.push_back(AgentMessage::Logs(rollwave_api::LogsReply {
                                    id: req.id,
                                    outcome: rollwave_api::LogsOutcome::Failed {
                                        reason: "a virtual agent runs no service and keeps no log".into(),
                                    },
                                }));
                                self.flush(&mut sink).await?;
                            }
                            Ok(ServerMessage::Refused { reason }) => return Ok(Ended::Refused(reason)),
                            Ok(ServerMessage::Welcome { .. } | ServerMessage::ActiveVersions { .. }) => {}
                            Err(e) => tracing::warn!(node = %self.name, error = %e, "malformed message from the control plane"),
                        },
                        Some(Ok(Message::Close(_))) | None => return Ok(Ended::Closed),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                    }
                }
            }
        }
    }

    async fn flush(
        &mut self,
        sink: &mut futures_util::stream::SplitSink<SessionStream, Message>,
    ) -> anyhow::Result<()> {
        while let Some(msg) = self.outbox.front() {
            send(sink, msg).await?;
            self.outbox.pop_front();
        }
        Ok(())
    }

    fn next_due(&self) -> Option<Instant> {
        self.running.iter().map(|r| r.due).min()
    }

    /// A task arrives: answered from the record if it already ran, ignored
    /// if it is running (the control plane sends in-flight tasks again when
    /// a node reconnects), started otherwise.
    fn receive(&mut self, sim: &Sim, task: Task) {
        let kind = kind_index(&task.action);
        if let Some(outcome) = self.done.get(&task.id) {
            sim.count(kind, ANSWERED_AGAIN);
            self.outbox.push_back(AgentMessage::TaskResult {
                task_id: task.id,
                outcome: outcome.clone(),
            });
            return;
        }
        if self.running.iter().any(|r| r.task.id == task.id) {
            return;
        }
        if task.service != sim.config.service {
            let outcome = TaskOutcome::Failed {
                reason: format!("this node runs no service {:?}", task.service),
            };
            sim.count(kind, FAILED);
            self.done.insert(task.id.clone(), outcome.clone());
            self.outbox.push_back(AgentMessage::TaskResult {
                task_id: task.id,
                outcome,
            });
            return;
        }
        let phase = match &task.action {
            TaskAction::Stage { .. } => "downloading",
            TaskAction::Upgrade { .. } => "switching",
            TaskAction::Revert { .. } => "rolling_back",
            TaskAction::DryRun { .. } => "hook dry_run running",
        };
        self.outbox.push_back(AgentMessage::TaskPhase {
            task_id: task.id.clone(),
            phase: phase.into(),
        });
        // An upgrade holds its health gate as well, as an agent does.
        let gate = match &task.action {
            TaskAction::Upgrade {
                min_healthy_time_ms,
                ..
            } => Duration::from_millis(*min_healthy_time_ms),
            _ => Duration::ZERO,
        };
        self.running.push(Running {
            due: Instant::now() + sim.config.latency + gate,
            task,
        });
    }

    /// Ends every task whose time has come.
    fn finish_due(&mut self, sim: &Sim) {
        let now = Instant::now();
        let (due, running): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| r.due <= now);
        self.running = running;
        for r in due {
            self.finish(sim, r.task);
        }
    }

    fn finish(&mut self, sim: &Sim, task: Task) {
        let kind = kind_index(&task.action);
        let fails = draw(sim.config.seed, self.index, &task.id) < sim.config.fail_rate;
        let before = (self.version.clone(), self.staged.len());
        let outcome = match &task.action {
            TaskAction::Stage { version, .. } if !fails => {
                self.stage(version);
                TaskOutcome::Succeeded
            }
            TaskAction::Upgrade { version, .. } if !fails => {
                self.stage(version);
                self.switch(sim, Some(version.clone()));
                TaskOutcome::Succeeded
            }
            TaskAction::Stage { version, .. } | TaskAction::Upgrade { version, .. } => {
                TaskOutcome::Failed {
                    reason: format!("simulated failure of {version} (--fail-rate)"),
                }
            }
            TaskAction::Revert { to_version, .. } => {
                self.switch(sim, to_version.clone());
                TaskOutcome::Succeeded
            }
            TaskAction::DryRun { version, .. } => {
                self.stage(version);
                TaskOutcome::Succeeded
            }
        };
        if (self.version.clone(), self.staged.len()) != before {
            self.outbox.push_back(AgentMessage::Status {
                services: self.view(sim),
            });
        }
        let counted = match outcome {
            TaskOutcome::Succeeded => SUCCEEDED,
            TaskOutcome::Failed { .. } => FAILED,
        };
        sim.count(kind, counted);
        self.done.insert(task.id.clone(), outcome.clone());
        self.outbox.push_back(AgentMessage::TaskResult {
            task_id: task.id,
            outcome,
        });
    }

    fn stage(&mut self, version: &str) {
        if !self.staged.iter().any(|v| v == version) {
            self.staged.push(version.to_string());
        }
    }

    /// Runs `version` from now on; a switch only if it is not running yet.
    fn switch(&mut self, sim: &Sim, version: Option<String>) {
        if self.version == version {
            return;
        }
        self.version = version.clone();
        let mut record = sim.nodes[self.index]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        record.version = version.clone();
        record.switches += 1;
        *record
            .switched_to
            .entry(version.unwrap_or_else(|| "none".into()))
            .or_insert(0) += 1;
    }
}

fn kind_index(action: &TaskAction) -> usize {
    match action {
        TaskAction::Stage { .. } => 0,
        TaskAction::Upgrade { .. } => 1,
        TaskAction::Revert { .. } => 2,
        TaskAction::DryRun { .. } => 3,
    }
}

async fn send(
    sink: &mut futures_util::stream::SplitSink<SessionStream, Message>,
    msg: &AgentMessage,
) -> anyhow::Result<()> {
    sink.send(Message::text(serde_json::to_string(msg)?))
        .await
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_templates() {
        let labels = parse_labels("rack=r{i%40}, zone = z{i%3} ,host=h{i},role=api").unwrap();
        let render = |i| {
            labels
                .iter()
                .map(|(k, t)| format!("{k}={}", t.render(i)))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(render(7), "rack=r7,zone=z1,host=h7,role=api");
        assert_eq!(render(40), "rack=r0,zone=z1,host=h40,role=api");
        assert_eq!(Template::parse("{i}{i%2}-x").unwrap().render(3), "31-x");
    }

    #[test]
    fn bad_label_templates_say_what_is_wrong() {
        let err = |t: &str| parse_labels(t).unwrap_err();
        assert_eq!(err("rack"), "\"rack\" is not key=value");
        assert_eq!(err("=r1"), "\"=r1\" has no key");
        assert_eq!(err("a=1,a=2"), "\"a\" is given twice");
        assert!(err("rack=r{i%0}").contains("K must be a whole number above 0"));
        assert!(err("rack=r{j}").contains("unknown placeholder {j}"));
        assert!(err("rack=r{i").contains("'{' without '}'"));
        assert!(err("rack=r}").contains("'}' without '{'"));
    }

    #[test]
    fn draws_depend_only_on_seed_node_and_task() {
        assert_eq!(draw(1, 2, "t"), draw(1, 2, "t"));
        assert_ne!(draw(1, 2, "t"), draw(2, 2, "t"));
        assert_ne!(draw(1, 2, "t"), draw(1, 3, "t"));
        // Roughly uniform: about a tenth below 0.1.
        let below = (0..10_000)
            .filter(|i| draw(7, *i, "rollout-1/upgrade") < 0.1)
            .count();
        assert!((800..1200).contains(&below), "{below}");
    }
}
