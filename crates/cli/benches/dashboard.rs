//! What watching a big fleet costs: 1,000 simulated agents, a rollout of all
//! of them, and 10 dashboards open.
//!
//! `cargo bench -p rollwave --bench dashboard [-- --nodes 1000 --dashboards 10]`
//!
//! Starts a real control plane (the built binary, its own process, so that its
//! CPU can be read from /proc) and `--nodes` simulated agents in this process:
//! each speaks the real agent protocol over its own WebSocket and answers
//! every task like a fast, healthy node (a phase, then a status report on the
//! new version and the result, after `--task-ms`). Then, while a rollout of
//! every node runs, `--dashboards` clients each load the fleet page as the
//! browser does (the page, its assets, the JSON it fetches) and follow
//! `/v1/events` to the rollout's end.
//!
//! Reports: the fleet page's load time (and its bytes) against one bare
//! request's round trip (the floor on loopback); how far behind the stream
//! was (each `log` event's receipt against its timestamp: the ideal is 0);
//! whether every dashboard received every log entry; and the server's CPU
//! during the rollout. Only something broken fails the benchmark, never a
//! timing.

use std::collections::BTreeMap;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use rollwave::client::ApiClient;
use rollwave::fleet::free_port;
use rollwave_api::{
    AgentMessage, CreateToken, CreatedToken, RolloutResponse, ServerMessage, TaskAction,
    TaskOutcome, AGENT_CONNECT_PATH, AGENT_PROTOCOL,
};
use rollwave_core::{Health, Role, Rollout, RolloutFile, ServiceView, StrategyFile};
use tokio_tungstenite::tungstenite::Message;

/// The goal of the issue: the fleet page loads in under a second.
const PAGE_GOAL_MS: f64 = 1_000.0;
/// Upper bound on the rollout; past it the benchmark gives up.
const ROLLOUT_LIMIT: Duration = Duration::from_secs(600);
/// What the page fetches once loaded (see crates/server/ui/app.js).
const PAGE_JSON: [&str; 3] = ["/v1/nodes", "/v1/rollouts", "/v1/services"];

#[derive(Parser)]
#[command(about = "dashboard benchmark: 1,000 simulated nodes, 10 dashboards")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    #[arg(long, default_value_t = 10)]
    dashboards: usize,
    /// How long a simulated node takes to run a task, in milliseconds.
    #[arg(long, default_value_t = 50)]
    task_ms: u64,
    /// The rollout's batch.
    #[arg(long, default_value = "10%")]
    batch: String,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Server {
    child: Child,
    url: String,
    admin_token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start() -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let child = Command::new(env!("CARGO_BIN_EXE_rollwave"))
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                // The README's figures are the event stream's own cost, without
                // TLS's per byte.
                "--insecure-plain-http",
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rollwave server")?;
        let mut server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            admin_token: String::new(),
            _dir: dir,
        };
        let started = Instant::now();
        while reqwest::get(format!("{}/v1/health", server.url))
            .await
            .is_err()
        {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the control plane did not answer within 30s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let token_file = server
            ._dir
            .path()
            .join("data")
            .join(rollwave_server::ADMIN_TOKEN_FILE);
        server.admin_token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading {}", token_file.display()))?
            .trim()
            .to_string();
        Ok(server)
    }

    /// CPU time the server process has used (user + system), from /proc.
    fn cpu(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses.
        let rest = &stat[stat.rfind(')').context("unreadable /proc stat")? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // In USER_HZ, which Linux fixes at 100 for every userspace ABI.
        Ok(Duration::from_millis(ticks * 10))
    }
}

fn service(version: &str, staged: &[String]) -> BTreeMap<String, ServiceView> {
    BTreeMap::from([(
        "api".to_string(),
        ServiceView {
            version: Some(version.into()),
            health: Health::Healthy,
            staged: staged.to_vec(),
            ..Default::default()
        },
    )])
}

/// One simulated node: connects, says hello on 1.0.0, and answers every task
/// as a fast, healthy node would, until the connection closes.
async fn simulate(
    server: String,
    join: String,
    node: String,
    rack: usize,
    task_ms: u64,
) -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    // Enrolled as a real agent is: the join token for its own credential.
    let credential: rollwave_api::CreatedToken = reqwest::Client::new()
        .post(format!("{server}/v1/enroll"))
        .bearer_auth(&join)
        .json(&rollwave_api::Enroll { node: node.clone() })
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("{node}: enrolling"))?
        .json()
        .await?;
    let ws_url = format!("{}{AGENT_CONNECT_PATH}", server.replacen("http", "ws", 1));
    let mut request = ws_url.into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", credential.token).parse()?,
    );
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("{node}: connecting"))?;
    let (mut tx, mut rx) = ws.split();
    let send =
        |m: &AgentMessage| Message::Text(serde_json::to_string(m).unwrap_or_default().into());
    let hello = AgentMessage::Hello {
        protocol: AGENT_PROTOCOL,
        node: node.clone(),
        labels: BTreeMap::from([("rack".to_string(), format!("r{}", rack % 10))]),
        agent_version: "sim".into(),
        services: service("1.0.0", &[]),
    };
    tx.send(send(&hello)).await?;
    let mut version = "1.0.0".to_string();
    let mut staged: Vec<String> = Vec::new();
    while let Some(msg) = rx.next().await {
        let Message::Text(text) = msg? else { continue };
        let Ok(ServerMessage::Task(task)) = serde_json::from_str::<ServerMessage>(&text) else {
            continue;
        };
        let phase = AgentMessage::TaskPhase {
            task_id: task.id.clone(),
            phase: "switching".into(),
        };
        tx.send(send(&phase)).await?;
        tokio::time::sleep(Duration::from_millis(task_ms)).await;
        match &task.action {
            TaskAction::Upgrade { version: v, .. } => version = v.clone(),
            TaskAction::Stage { version: v, .. } | TaskAction::DryRun { version: v, .. } => {
                staged.push(v.clone())
            }
            TaskAction::Revert { to_version, .. } => {
                version = to_version.clone().unwrap_or_default()
            }
        }
        let status = AgentMessage::Status {
            services: service(&version, &staged),
        };
        tx.send(send(&status)).await?;
        let result = AgentMessage::TaskResult {
            task_id: task.id,
            outcome: TaskOutcome::Succeeded,
        };
        tx.send(send(&result)).await?;
    }
    Ok(())
}

/// What one dashboard saw.
#[derive(Default)]
struct Seen {
    load: Duration,
    bytes: usize,
    /// Log entries of the rollout, by index.
    log: Vec<usize>,
    /// Receipt minus the entry's timestamp, in milliseconds.
    lags: Vec<f64>,
}

/// Loads the page as the browser does, then follows the stream until the
/// rollout's log says it completed.
async fn dashboard(url: String, token: String, rollout: u64) -> anyhow::Result<Seen> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse()?);
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()?;
    let started = Instant::now();
    let mut bytes = 0;
    let page = http.get(format!("{url}/")).send().await?.text().await?;
    bytes += page.len();
    let assets: Vec<String> = page
        .split(['"', '\''])
        .filter(|s| s.starts_with("/ui/"))
        .map(str::to_string)
        .collect();
    let fetches = assets
        .iter()
        .map(String::as_str)
        .chain(PAGE_JSON)
        .map(|p| http.get(format!("{url}{p}")).send());
    for r in futures_util::future::join_all(fetches).await {
        let r = r?.error_for_status()?;
        bytes += r.bytes().await?.len();
    }
    let load = started.elapsed();
    let mut seen = Seen {
        load,
        bytes,
        ..Default::default()
    };
    let resp = http
        .get(format!("{url}/v1/events?rollout={rollout}"))
        .send()
        .await?
        .error_for_status()?;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut kind = String::new();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            let line = line.trim_end();
            if let Some(k) = line.strip_prefix("event:") {
                kind = k.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                if kind != "log" {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(data.trim())?;
                let at = v["at"].as_u64().unwrap_or_default() as f64;
                seen.lags.push(now_ms() - at);
                seen.log
                    .push(v["index"].as_u64().unwrap_or_default() as usize);
                let msg = v["message"].as_str().unwrap_or_default();
                if v["node"].is_null() && msg.starts_with("rollout completed") {
                    return Ok(seen);
                }
            }
        }
    }
    bail!("the stream ended before the rollout completed")
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn run(args: Args) -> anyhow::Result<()> {
    let server = Server::start().await?;
    let api = ApiClient::new(&server.url, &Default::default())?
        .with_token(Some(server.admin_token.clone()));
    let token = |name: &str, role: Role| CreateToken {
        name: name.into(),
        role,
        ttl: Some("1h".into()),
        uses: None,
        node: None,
    };
    let join: CreatedToken = api
        .post("/v1/tokens", &token("sim-join", Role::Join))
        .await?;
    let viewer: CreatedToken = api
        .post("/v1/tokens", &token("dashboards", Role::Viewer))
        .await?;
    for v in ["1.0.0", "2.0.0"] {
        let exe = format!("#!/bin/sh\n# api {v}\nexec sleep 3600\n").into_bytes();
        let _: serde_json::Value = api
            .post_bytes(&format!("/v1/releases/api/{v}"), exe)
            .await?;
    }
    let mut agents = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let node = format!("sim-{i:04}");
        agents.push(tokio::spawn(simulate(
            server.url.clone(),
            join.token.clone(),
            node,
            i,
            args.task_ms,
        )));
    }
    let started = Instant::now();
    loop {
        let health: serde_json::Value = api.get("/v1/health").await?;
        if health["agents_connected"].as_u64() == Some(args.nodes as u64) {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "only {} of {} agents connected",
                health["agents_connected"],
                args.nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} simulated agents connected in {:.1}s",
        args.nodes,
        started.elapsed().as_secs_f64()
    );

    // The floor: one bare request's round trip on loopback.
    let http = reqwest::Client::new();
    let mut floor = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        http.get(format!("{}/v1/health", server.url))
            .send()
            .await?
            .bytes()
            .await?;
        floor.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    let spec = RolloutFile {
        service: Some("api".into()),
        version: Some("2.0.0".into()),
        strategy: StrategyFile {
            batch: Some(args.batch.as_str().into()),
            min_healthy_time: Some("0s".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let cpu_before = server.cpu()?;
    let t0 = Instant::now();
    let resp: RolloutResponse = api.start_rollout(spec).await?;
    let id = resp.rollout.id;
    let dashboards: Vec<_> = (0..args.dashboards)
        .map(|_| tokio::spawn(dashboard(server.url.clone(), viewer.token.clone(), id)))
        .collect();
    let mut seen = Vec::new();
    for d in dashboards {
        seen.push(
            tokio::time::timeout(ROLLOUT_LIMIT, d)
                .await
                .context("rollout too slow")???,
        );
    }
    let took = t0.elapsed();
    let cpu = server.cpu()? - cpu_before;
    let r: Rollout = api
        .get::<RolloutResponse>(&format!("/v1/rollouts/{id}"))
        .await?
        .rollout;
    if !r.fully_upgraded() {
        bail!("the rollout did not complete: {:?} {:?}", r.state, r.reason);
    }
    // A dashboard joins with no position: it gets a `reset`, loads the
    // snapshot, and from then on must get every entry, in order, to the end.
    let complete = seen.iter().all(|s| {
        s.log.windows(2).all(|w| w[1] == w[0] + 1) && s.log.last() == Some(&(r.events.len() - 1))
    });
    let loads: Vec<f64> = seen.iter().map(|s| s.load.as_secs_f64() * 1000.0).collect();
    let lags: Vec<f64> = seen.iter().flat_map(|s| s.lags.iter().copied()).collect();
    let load_p50 = percentile(loads.clone(), 0.5);
    println!(
        "rollout of {} nodes (batch {}): {:.1}s, {} log entries",
        args.nodes,
        args.batch,
        took.as_secs_f64(),
        r.events.len()
    );
    println!(
        "fleet page load ({} dashboards, during the rollout): p50 {:.1} ms, max {:.1} ms, {} KiB each (goal < {PAGE_GOAL_MS} ms; floor: one bare request p50 {:.2} ms)",
        args.dashboards,
        load_p50,
        percentile(loads, 1.0),
        seen.first().map_or(0, |s| s.bytes) / 1024,
        percentile(floor, 0.5),
    );
    println!(
        "event stream lag behind the log (ideal 0): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; every dashboard got every entry from its start to the end, in order: {}",
        percentile(lags.clone(), 0.5),
        percentile(lags.clone(), 0.99),
        percentile(lags, 1.0),
        if complete { "yes" } else { "NO" }
    );
    println!(
        "server CPU during the rollout: {:.2}s over {:.1}s = {:.0}% of one core",
        cpu.as_secs_f64(),
        took.as_secs_f64(),
        cpu.as_secs_f64() / took.as_secs_f64() * 100.0
    );
    for a in agents {
        a.abort();
    }
    if !complete {
        bail!("a dashboard missed log entries");
    }
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
