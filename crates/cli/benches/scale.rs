//! What a large fleet costs the control plane, with `rollwave sim`.
//!
//! `cargo bench -p rollwave --bench scale [-- --agents 1000]`
//! `cargo bench -p rollwave --bench scale -- --sizes 100,1000,10000`
//! `cargo bench -p rollwave --features etcd --bench scale -- --sizes 1000,10000 --store sqlite,etcd`
//!
//! For each size N: starts a control plane (the built binary, in a temporary
//! directory, so that its CPU, memory and disk writes can be read from
//! /proc), then `rollwave sim --agents N` as a process of its own, and
//! measures:
//!
//! - connect + enroll: from starting the sim to N sessions open;
//! - the server's RSS with all connected, and its CPU while idle;
//! - a rollout of all N in 10 waves (`--batch 10%`, `min_healthy_time` 0,
//!   the sim's task latency 50 ms): each wave's orchestration overhead (its
//!   duration minus the task latency), the server's CPU and the bytes it
//!   wrote per node, and the latency of `GET /v1/health` and of the
//!   rollout's status polled throughout;
//! - a second rollout during which the control plane is `kill -9`ed and
//!   restarted: it must complete, with no node switched twice (the sim
//!   counts).
//!
//! Prints one JSON object: each figure beside its goal and the ideal it is
//! compared to (with `--sizes` or several `--store`s, one per store and
//! size, and a table on stderr, a column each).
//! Timings never fail it; it exits non-zero only if something broke (a
//! rollout that did not complete, a node switched twice, a process that
//! would not start).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rollwave::fleet::free_port;
use rollwave_api::{CreateToken, CreatedToken, RolloutResponse, StartRollout};
use rollwave_core::{NodeState, Role, Rollout, RolloutFile, RolloutSummary, StrategyFile};
use serde_json::{json, Value};

/// The rollout's status as a client polls it: its summary (counts, the
/// problems), as `rollout status --watch` does; the whole rollout (every
/// node, the log) is read once it has ended.
fn status_path(id: u64) -> String {
    format!("/v1/rollouts/{id}/summary")
}

#[derive(Parser)]
#[command(about = "scale benchmark: a control plane and `rollwave sim --agents N`")]
struct Args {
    /// Virtual agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Run each of these sizes in turn (comma-separated), instead of --agents.
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// How long a virtual agent takes to run a task.
    #[arg(long, default_value = "50ms")]
    task_latency: String,
    /// How long to measure the idle server's CPU.
    #[arg(long, default_value = "10s")]
    idle: String,
    /// Enrollments and connects the sim keeps in flight.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Serve over TLS (certificates from `rollwave certs init`).
    #[arg(long)]
    tls: bool,
    /// The control plane's store: `sqlite`, or `etcd` (a real etcd member
    /// started by the benchmark; needs the bench built with the `etcd`
    /// feature, as bench/run.sh does); `sqlite,etcd` runs every size on
    /// each, side by side in the table.
    #[arg(long, alias = "stores", default_value = "sqlite", value_delimiter = ',', value_parser = ["sqlite", "etcd"])]
    store: Vec<String>,
    /// Give up on connecting, or on a rollout, after this long.
    #[arg(long, default_value = "30m")]
    limit: String,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone)]
struct Settings {
    latency: Duration,
    idle: Duration,
    limit: Duration,
    concurrency: usize,
    tls: bool,
    store: String,
}

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_rollwave")
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// CPU time (user + system) of a process, from /proc.
fn cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').context("unreadable /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // In USER_HZ, which Linux fixes at 100 for every userspace ABI.
    Ok(Duration::from_millis(ticks * 10))
}

/// Resident memory of a process in KiB (VmRSS).
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// Bytes a process caused to be written to storage.
fn write_bytes(pid: u32) -> anyhow::Result<u64> {
    proc_field(&format!("/proc/{pid}/io"), "write_bytes:")
}

fn proc_field(path: &str, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("{path} has no {field}"))?;
    line[field.len()..]
        .split_whitespace()
        .next()
        .context("empty field")?
        .parse()
        .with_context(|| format!("{path}: {field}"))
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn round(x: f64, places: i32) -> f64 {
    let m = 10f64.powi(places);
    (x * m).round() / m
}

/// A figure beside its goal and its ideal.
fn figure(value: impl Into<Value>, goal: &str, ideal: Value) -> Value {
    let value: Value = value.into();
    json!({ "value": value, "goal": goal, "ideal": ideal })
}

struct ControlPlane {
    /// `--store` and its value, for the etcd engine.
    store_args: Vec<String>,
    /// The etcd the control plane keeps its state in, if it does.
    #[cfg(feature = "etcd")]
    etcd: Option<rollwave_store::etcd::testing::TestEtcd>,
    dir: tempfile::TempDir,
    port: u16,
    url: String,
    ca_file: Option<PathBuf>,
    proc: Option<Proc>,
    http: reqwest::Client,
    admin: String,
}

impl ControlPlane {
    async fn start(tls: bool, store: &str) -> anyhow::Result<ControlPlane> {
        #[cfg(feature = "etcd")]
        let etcd = match store {
            "etcd" => Some(rollwave_store::etcd::testing::TestEtcd::start().await),
            _ => None,
        };
        #[cfg(feature = "etcd")]
        let store_args = match &etcd {
            Some(e) => vec!["--store".to_string(), e.store_url()],
            None => Vec::new(),
        };
        #[cfg(not(feature = "etcd"))]
        let store_args: Vec<String> = match store {
            "etcd" => {
                bail!("--store etcd: build the benchmark with --features etcd (bench/run.sh does)")
            }
            _ => Vec::new(),
        };
        let dir = tempfile::Builder::new()
            .prefix("rollwave-scale-")
            .tempdir()?;
        let port = free_port()?;
        let ca_file = if tls {
            let status = Command::new(exe())
                .args(["certs", "init", "--dir"])
                .arg(dir.path().join("certs"))
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                bail!("rollwave certs init: {status}");
            }
            Some(dir.path().join("certs").join("ca.pem"))
        } else {
            None
        };
        let scheme = if tls { "https" } else { "http" };
        let mut cp = ControlPlane {
            store_args,
            #[cfg(feature = "etcd")]
            etcd,
            url: format!("{scheme}://127.0.0.1:{port}"),
            dir,
            port,
            ca_file,
            proc: None,
            http: reqwest::Client::new(),
            admin: String::new(),
        };
        cp.spawn().await?;
        let token_file = cp
            .dir
            .path()
            .join("data")
            .join(rollwave_server::ADMIN_TOKEN_FILE);
        // On etcd, written once the server is elected leader.
        for _ in 0..300 {
            if token_file.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cp.admin = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading {}", token_file.display()))?
            .trim()
            .to_string();
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("authorization", format!("Bearer {}", cp.admin).parse()?);
        let tls = rollwave_tls::ClientTls {
            ca_file: cp.ca_file.clone(),
            pin: None,
        };
        let mut builder = reqwest::Client::builder().default_headers(headers);
        if cp.ca_file.is_some() {
            builder = builder.use_preconfigured_tls((*tls.config()?).clone());
        }
        cp.http = builder.build()?;
        // On etcd the token is written while the elected server loads the
        // state, before it answers as the leader.
        let began = Instant::now();
        while !cp
            .get::<rollwave_api::HealthResponse>("/v1/health")
            .await
            .is_ok_and(|h| h.leader)
        {
            if began.elapsed() > Duration::from_secs(60) {
                bail!("the control plane did not lead within 60s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(cp)
    }

    /// Starts the server on the port and data dir it had before, and waits
    /// for it to answer.
    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(exe());
        cmd.args(["server", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(&self.store_args);
        match &self.ca_file {
            Some(_) => {
                let certs = self.dir.path().join("certs");
                cmd.arg("--tls-cert")
                    .arg(certs.join("server.pem"))
                    .arg("--tls-key")
                    .arg(certs.join("server.key"));
            }
            None => {
                cmd.arg("--insecure-plain-http");
            }
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))?;
        let child = cmd
            .env("ROLLWAVE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting rollwave server")?;
        self.proc = Some(Proc(child));
        let started = Instant::now();
        let probe = match &self.ca_file {
            Some(ca) => {
                let tls = rollwave_tls::ClientTls {
                    ca_file: Some(ca.clone()),
                    pin: None,
                };
                reqwest::Client::builder()
                    .use_preconfigured_tls((*tls.config()?).clone())
                    .build()?
            }
            None => reqwest::Client::new(),
        };
        while probe
            .get(format!("{}/v1/health", self.url))
            .send()
            .await
            .is_err()
        {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the control plane did not answer within 60s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    /// The store's own processes (etcd), whose CPU and writes are the
    /// control plane's too.
    fn store_pids(&self) -> Vec<u32> {
        #[cfg(feature = "etcd")]
        if let Some(e) = &self.etcd {
            return e.pids();
        }
        Vec::new()
    }

    /// CPU time and bytes written of the store's processes together.
    fn store_usage(&self) -> anyhow::Result<(Duration, u64)> {
        let mut total = (Duration::ZERO, 0);
        for pid in self.store_pids() {
            total.0 += cpu(pid)?;
            total.1 += write_bytes(pid)?;
        }
        Ok(total)
    }

    fn kill9(&mut self) {
        self.proc = None;
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await?
            .error_for_status()?;
        Ok(resp.json().await?)
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: reqwest::Body,
        json: bool,
    ) -> anyhow::Result<T> {
        let mut req = self.http.post(format!("{}{path}", self.url)).body(body);
        if json {
            req = req.header("content-type", "application/json");
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    async fn connected(&self) -> anyhow::Result<usize> {
        let h: rollwave_api::HealthResponse = self.get("/v1/health").await?;
        Ok(h.agents_connected)
    }

    async fn start_rollout(&self, version: &str) -> anyhow::Result<u64> {
        let spec = RolloutFile {
            service: Some("api".into()),
            version: Some(version.into()),
            strategy: StrategyFile {
                batch: Some("10%".into()),
                min_healthy_time: Some("0s".into()),
                healthy_deadline: Some("10m".into()),
                progress_deadline: Some("30m".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let body = serde_json::to_vec(&StartRollout {
            spec,
            plan_id: None,
        })?;
        let resp: RolloutResponse = self.post("/v1/rollouts", body.into(), true).await?;
        Ok(resp.rollout.id)
    }
}

/// Waits until `n` sessions are open.
async fn wait_connected(cp: &ControlPlane, n: usize, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if cp.connected().await.ok() == Some(n) {
            return Ok(());
        }
        if started.elapsed() > limit {
            bail!(
                "only {} of {n} agents connected within {limit:?}",
                cp.connected().await.unwrap_or(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Round trips of `GET path`, one after another every `every`, until `stop`.
fn poll_latency(
    cp: &ControlPlane,
    path: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<f64>> {
    let (http, url) = (cp.http.clone(), format!("{}{path}", cp.url));
    tokio::spawn(async move {
        let mut took = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let ok = match http.get(&url).send().await {
                Ok(resp) => resp.bytes().await.is_ok(),
                Err(_) => false,
            };
            if ok {
                took.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            tokio::time::sleep(every).await;
        }
        took
    })
}

/// Polls the rollout until it has ended (riding out a control plane that
/// is down); what it ended as.
async fn wait_rollout_end(cp: &ControlPlane, id: u64, limit: Duration) -> anyhow::Result<Rollout> {
    let started = Instant::now();
    loop {
        if let Ok(s) = cp.get::<RolloutSummary>(&status_path(id)).await {
            if s.settled() {
                let r = cp
                    .get::<RolloutResponse>(&format!("/v1/rollouts/{id}"))
                    .await?;
                if !r.rollout.is_active() {
                    return Ok(r.rollout);
                }
            }
        }
        if started.elapsed() > limit {
            bail!("rollout {id} did not end within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each wave's duration from the end of the one before (the first from the
/// rollout's start), minus the task latency: what orchestration added.
/// The first wave also waits for its nodes' stage tasks.
fn wave_overheads(r: &Rollout, latency: Duration) -> Vec<f64> {
    let mut prev = r.created_at;
    let mut out = Vec::new();
    for batch in &r.batches {
        let end = batch
            .iter()
            .filter_map(|n| r.nodes.get(n))
            .map(|n| n.updated_at)
            .max()
            .unwrap_or(prev);
        out.push(end.saturating_sub(prev) as f64 - latency.as_secs_f64() * 1000.0);
        prev = end;
    }
    out
}

fn read_report(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Waits for the sim's report to show every node on `version`.
async fn wait_report_on(report: &Path, version: &str, n: usize) -> anyhow::Result<Value> {
    for _ in 0..600 {
        if let Some(r) = read_report(report) {
            if r["versions"][version].as_u64() == Some(n as u64) {
                return Ok(r);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the sim's report never showed every node on {version}")
}

/// Nodes the report shows switched to `version` other than exactly once.
fn not_once(report: &Value, version: &str) -> usize {
    report["nodes"].as_object().map_or(0, |nodes| {
        nodes
            .values()
            .filter(|n| n["switched_to"][version].as_u64() != Some(1))
            .count()
    })
}

async fn run_size(n: usize, s: &Settings) -> anyhow::Result<Value> {
    eprintln!("== {n} agents");
    let mut cp = ControlPlane::start(s.tls, &s.store).await?;
    let baseline_rss = rss_kib(cp.pid())?;
    // The floor for any request: one bare round trip to an idle server.
    let mut floor = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        cp.get::<Value>("/v1/health").await?;
        floor.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let floor = percentile(floor, 0.5);
    let join: CreatedToken = {
        let req = CreateToken {
            name: "scale-join".into(),
            role: Role::Join,
            ttl: Some("4h".into()),
            uses: None,
            node: None,
        };
        cp.post("/v1/tokens", serde_json::to_vec(&req)?.into(), true)
            .await?
    };
    let join_file = cp.dir.path().join("join.token");
    std::fs::write(&join_file, &join.token)?;
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        let exe = format!("#!/bin/sh\n# api {v}\nexec sleep 3600\n").into_bytes();
        let _: Value = cp
            .post(&format!("/v1/releases/api/{v}"), exe.into(), false)
            .await?;
    }

    let report = cp.dir.path().join("sim-report.json");
    let mut sim_cmd = Command::new(exe());
    sim_cmd.args(["--server", &cp.url]);
    if let Some(ca) = &cp.ca_file {
        sim_cmd.arg("--ca-file").arg(ca);
    }
    sim_cmd
        .args(["sim", "--agents", &n.to_string(), "--version", "1.0.0"])
        .args(["--labels", "rack=r{i%40}"])
        .args([
            "--task-latency",
            &humantime::format_duration(s.latency).to_string(),
        ])
        .args(["--concurrency", &s.concurrency.to_string()])
        .arg("--join-token-file")
        .arg(&join_file)
        .arg("--report")
        .arg(&report)
        .args(["--report-every", "1s", "--quiet"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(cp.dir.path().join("sim.log"))?);
    let started = Instant::now();
    let sim = Proc(sim_cmd.spawn().context("starting rollwave sim")?);
    wait_connected(&cp, n, s.limit).await?;
    let connect = started.elapsed();
    eprintln!(
        "{n} agents enrolled and connected in {:.1}s",
        connect.as_secs_f64()
    );
    // Let the handshakes' garbage settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kib(cp.pid())?;
    let sim_rss = rss_kib(sim.pid())?;
    let cpu0 = cpu(cp.pid())?;
    tokio::time::sleep(s.idle).await;
    let idle_pct = (cpu(cp.pid())? - cpu0).as_secs_f64() / s.idle.as_secs_f64() * 100.0;
    eprintln!("idle: RSS {} MiB, CPU {idle_pct:.1}%", rss / 1024);

    // The measured rollout.
    let (cpu0, written0) = (cpu(cp.pid())?, write_bytes(cp.pid())?);
    let store0 = cp.store_usage()?;
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let id = cp.start_rollout("2.0.0").await?;
    let status_of = status_path(id);
    let health = poll_latency(
        &cp,
        "/v1/health".into(),
        Duration::from_millis(50),
        stop.clone(),
    );
    let status = poll_latency(
        &cp,
        status_path(id),
        Duration::from_millis(100),
        stop.clone(),
    );
    let ended = wait_rollout_end(&cp, id, s.limit).await;
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (cpu_used, written) = (cpu(cp.pid())? - cpu0, write_bytes(cp.pid())? - written0);
    let store1 = cp.store_usage()?;
    let (store_cpu, store_written) = (store1.0 - store0.0, store1.1 - store0.1);
    let (health, status) = (health.await?, status.await?);
    let r = ended?;
    if !r.fully_upgraded() {
        bail!(
            "the rollout of {n} nodes did not complete: {:?} {:?}",
            r.state,
            r.reason
        );
    }
    let r1 = wait_report_on(&report, "2.0.0", n).await?;
    let twice1 = not_once(&r1, "2.0.0");
    let overheads = wave_overheads(&r, s.latency);
    eprintln!("rollout of {n} nodes: {:.1}s", took.as_secs_f64());

    // The rollout the control plane is killed in.
    let id = cp.start_rollout("3.0.0").await?;
    let started = Instant::now();
    loop {
        if let Ok(s) = cp.get::<RolloutSummary>(&status_path(id)).await {
            let count = |state: NodeState| s.counts.get(state.as_str()).copied().unwrap_or(0);
            let upgraded = count(NodeState::Upgraded);
            let in_flight: usize = NodeState::ALL
                .into_iter()
                .filter(|st| st.in_flight())
                .map(count)
                .sum();
            if upgraded > 0 && upgraded < n && in_flight > 0 {
                break;
            }
            if s.settled() {
                bail!("the second rollout ended before the control plane could be killed");
            }
        }
        if started.elapsed() > s.limit {
            bail!("the second rollout never got under way");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cp.kill9();
    let restarted = Instant::now();
    cp.spawn().await?;
    wait_connected(&cp, n, s.limit).await?;
    let reconnect = restarted.elapsed();
    let r = wait_rollout_end(&cp, id, s.limit).await?;
    let resumed = r.fully_upgraded();
    let r2 = wait_report_on(&report, "3.0.0", n).await;
    let r2 = r2.unwrap_or_else(|_| read_report(&report).unwrap_or(Value::Null));
    let twice2 = not_once(&r2, "3.0.0");
    let twice_any = r2["nodes_switched_to_a_version_twice"]
        .as_u64()
        .unwrap_or(u64::MAX);
    eprintln!("killed mid-rollout: resumed {resumed}, nodes not switched exactly once: {twice2}");
    let _ = kill(Pid::from_raw(sim.pid() as i32), Signal::SIGTERM);
    drop(sim);

    let per_node = |x: f64| x / n as f64;
    let out = json!({
        "agents": n,
        "tls": s.tls,
        "store": s.store,
        "task_latency_ms": s.latency.as_millis() as u64,
        "connect_enroll_s": figure(
            round(connect.as_secs_f64(), 2),
            "< 60 at 10,000 agents",
            // Two loopback round trips per agent (enroll, upgrade), as many
            // in flight as the sim allows.
            json!(round(floor * 2.0 * n as f64 / s.concurrency as f64 / 1000.0, 4)),
        ),
        "server_rss_mib": figure(
            round(rss as f64 / 1024.0, 1),
            "< 1024",
            json!({ "no_agents": round(baseline_rss as f64 / 1024.0, 1) }),
        ),
        "idle_cpu_pct_of_one_core": figure(round(idle_pct, 2), "< 5", json!(0)),
        "sim_rss_kib_per_agent": round(sim_rss as f64 / n as f64, 1),
        "rollout": {
            "waves": r.batches.len(),
            "duration_s": round(took.as_secs_f64(), 2),
            "wave_overhead_ms": {
                "p50": round(percentile(overheads.clone(), 0.5), 1),
                "max": round(percentile(overheads.clone(), 1.0), 1),
                "each": overheads.iter().map(|x| round(*x, 0)).collect::<Vec<_>>(),
                "goal": "< 1000",
                "ideal": 0,
            },
            "server_cpu_ms_per_node": figure(
                round(per_node(cpu_used.as_secs_f64() * 1000.0), 3), "< 0.5", json!(0)),
            "bytes_written_per_node": figure(
                round(per_node(written as f64), 0), "< 8192", json!("one node record and a log entry, a few hundred bytes")),
            // etcd's own work for the same rollout (zero on SQLite, whose
            // work is the server's).
            "store_cpu_ms_per_node": figure(
                round(per_node(store_cpu.as_secs_f64() * 1000.0), 3), "< 0.5", json!(0)),
            "store_bytes_written_per_node": figure(
                round(per_node(store_written as f64), 0), "< 8192", json!("one node record and a log entry, a few hundred bytes")),
            "health_ms": {
                "p50": round(percentile(health.clone(), 0.5), 2),
                "p99": round(percentile(health.clone(), 0.99), 2),
                "samples": health.len(),
                "goal": "p99 < 100",
                "ideal": round(floor, 2),
            },
            "status_ms": {
                "path": status_of,
                "p50": round(percentile(status.clone(), 0.5), 2),
                "p99": round(percentile(status.clone(), 0.99), 2),
                "samples": status.len(),
                "goal": "p99 < 100",
                "ideal": round(floor, 2),
            },
            "nodes_not_switched_exactly_once": figure(twice1, "0", json!(0)),
        },
        "kill_9_mid_rollout": {
            "completed": resumed,
            "reconnect_s": round(reconnect.as_secs_f64(), 2),
            "nodes_not_switched_exactly_once": figure(twice2, "0", json!(0)),
            "nodes_switched_to_a_version_twice": twice_any,
        },
    });
    if !resumed || twice1 > 0 || twice2 > 0 || twice_any > 0 {
        println!("{out:#}");
        bail!("broken at {n} agents: a rollout did not complete or a node switched twice");
    }
    Ok(out)
}

/// The sizes side by side, one figure a row, on stderr.
fn table(runs: &[Value]) -> String {
    let rows: [(&str, &str, &[&str]); 12] = [
        (
            "connect + enroll (s)",
            "< 60 at 10k",
            &["connect_enroll_s", "value"],
        ),
        (
            "server RSS, all connected (MiB)",
            "< 1024",
            &["server_rss_mib", "value"],
        ),
        (
            "idle server CPU (% of a core)",
            "< 5",
            &["idle_cpu_pct_of_one_core", "value"],
        ),
        ("rollout (s)", "", &["rollout", "duration_s"]),
        (
            "wave overhead, max (ms)",
            "< 1000",
            &["rollout", "wave_overhead_ms", "max"],
        ),
        (
            "server CPU per node (ms)",
            "< 0.5",
            &["rollout", "server_cpu_ms_per_node", "value"],
        ),
        (
            "bytes written per node",
            "< 8192",
            &["rollout", "bytes_written_per_node", "value"],
        ),
        (
            "store's CPU per node (ms; etcd)",
            "< 0.5",
            &["rollout", "store_cpu_ms_per_node", "value"],
        ),
        (
            "store's bytes written per node (etcd)",
            "< 8192",
            &["rollout", "store_bytes_written_per_node", "value"],
        ),
        (
            "GET /v1/health p99 (ms)",
            "< 100",
            &["rollout", "health_ms", "p99"],
        ),
        (
            "rollout status p99 (ms)",
            "< 100",
            &["rollout", "status_ms", "p99"],
        ),
        (
            "kill -9 mid-rollout: all back (s)",
            "",
            &["kill_9_mid_rollout", "reconnect_s"],
        ),
    ];
    let mut out = format!(
        "| figure | goal | {} |\n|---|---|{}\n",
        runs.iter()
            .map(|r| format!("{} {}", r["store"].as_str().unwrap_or("?"), r["agents"]))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(runs.len())
    );
    for (name, goal, path) in rows {
        let cells: Vec<String> = runs
            .iter()
            .map(|r| path.iter().fold(r, |v, k| &v[*k]).to_string())
            .collect();
        out.push_str(&format!("| {name} | {goal} | {} |\n", cells.join(" | ")));
    }
    out
}

async fn run(args: Args) -> anyhow::Result<()> {
    let parse = |flag: &str, text: &str| {
        humantime::parse_duration(text).with_context(|| format!("{flag}: {text:?}"))
    };
    let settings = Settings {
        latency: parse("--task-latency", &args.task_latency)?,
        idle: parse("--idle", &args.idle)?,
        limit: parse("--limit", &args.limit)?,
        concurrency: args.concurrency,
        tls: args.tls,
        store: String::new(),
    };
    let mut stores = args.store.clone();
    stores.dedup();
    let sizes = args.sizes.clone().unwrap_or_else(|| vec![args.agents]);
    if stores.len() == 1 && args.sizes.is_none() {
        let settings = Settings {
            store: stores[0].clone(),
            ..settings
        };
        let out = run_size(args.agents, &settings).await?;
        println!("{out:#}");
        return Ok(());
    }
    // Each store at each size, one after the other on the same machine,
    // so that the columns compare.
    let mut runs = Vec::new();
    for store in &stores {
        let settings = Settings {
            store: store.clone(),
            ..settings.clone()
        };
        for &n in &sizes {
            runs.push(run_size(n, &settings).await?);
        }
    }
    eprint!("{}", table(&runs));
    println!("{:#}", json!({ "runs": runs }));
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
