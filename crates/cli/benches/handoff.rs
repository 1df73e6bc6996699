//! What clients experience during a rolling upgrade, for each switch mode.
//!
//! `cargo bench -p rollwave --bench handoff [-- --switch handoff|restart|both
//! --nodes 10 --min-healthy-time 2s]`
//!
//! For each mode, on a fresh local fleet (real processes on loopback):
//! install 1.0.0, push 2.0.0, load every node with `wrk` (a fresh connection
//! per request, so a switch cannot hide behind kept-alive connections), first
//! with no rollout (the steady state: the ideal a rollout is compared to),
//! then while rolling out 2.0.0 one node at a time. It reports requests,
//! failures and latency of both runs, and each node's switch time as its agent
//! measured it. Timings never fail the benchmark; only something broken does
//! (the fleet, the rollout, wrk).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rollwave::client::ApiClient;
use rollwave::demo::{push, start};
use rollwave::fleet::{free_port, Fleet, FleetSpec};
use rollwave_api::RolloutResponse;
use rollwave_core::Rollout;
use serde::Deserialize;

/// The goal: a rollout run makes at least this many requests, none failed.
const MIN_REQUESTS: u64 = 100_000;
const SWITCH_P50_GOAL_MS: u64 = 100;
const SWITCH_P99_GOAL_MS: u64 = 500;
/// The rollout run's p99 latency stays within this factor of steady state.
const LATENCY_FACTOR: f64 = 2.0;
/// How long wrk keeps running after the rollout ended.
const TAIL: Duration = Duration::from_secs(1);
/// Upper bound on a rollout; past it the benchmark gives up.
const ROLLOUT_LIMIT: Duration = Duration::from_secs(600);
const STARTUP_SAMPLES: usize = 5;

#[derive(Parser)]
#[command(about = "rolling-upgrade benchmark: what clients see during a switch")]
struct Args {
    /// Switch mode to measure: handoff, restart, or both (one after the
    /// other, each on a fresh fleet).
    #[arg(long, default_value = "both", value_parser = ["handoff", "restart", "both"])]
    switch: String,
    /// Nodes in the fleet (wrk runs one thread per node).
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// min_healthy_time of the measured rollout (batch 1).
    #[arg(long, default_value = "2s")]
    min_healthy_time: String,
    /// Length of the steady-state run, in seconds.
    #[arg(long, default_value_t = 10)]
    steady_secs: u64,
    /// Open connections per node.
    #[arg(long, default_value_t = 2)]
    connections_per_node: usize,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Fleet processes live in their own process groups: on ctrl-c, return
    // normally so that every Fleet is dropped and kills them.
    let result = tokio::select! {
        r = run(args) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: fleet stopped and cleaned up");
            return ExitCode::from(130);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", rollwave::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > 200 {
        bail!("--nodes: must be between 1 and 200");
    }
    if args.connections_per_node == 0 {
        bail!("--connections-per-node: must be at least 1");
    }
    check_wrk()?;
    let exe = rollwave_exe()?;
    let modes: &[&str] = match args.switch.as_str() {
        "both" => &["handoff", "restart"],
        "handoff" => &["handoff"],
        _ => &["restart"],
    };
    println!("rollwave handoff benchmark");
    println!("  binary:   {}", exe.display());
    println!(
        "  fleet:    {} nodes on loopback, {} cpus; load: wrk -t{} -c{}, fresh connection per request",
        args.nodes,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.nodes,
        args.nodes * args.connections_per_node,
    );
    println!(
        "  rollout:  1.0.0 -> 2.0.0, batch 1, min_healthy_time {}; health checks every {}",
        args.min_healthy_time,
        FleetSpec::new(exe.clone(), 1).check_interval
    );
    println!(
        "  failed:   refused or reset connections (wrk retries at once, so one outage counts \
         many times), timeouts (> 2 s) and non-2xx answers"
    );
    let startup = {
        let exe = exe.clone();
        tokio::task::spawn_blocking(move || service_startup(&exe, STARTUP_SAMPLES))
            .await
            .context("measuring the demo service start-up")??
    };
    let startup = Stats::of(startup);
    println!(
        "  reference: demo service start-up (spawn to first 200 on /healthz, {STARTUP_SAMPLES} runs): p50 {} ms, max {} ms",
        startup.p50, startup.max
    );
    let mut results = Vec::new();
    for mode in modes {
        println!();
        println!("== switch: {mode} ==");
        let r = bench_mode(&args, &exe, mode).await?;
        print!("{}", report(&r, &startup, args.nodes));
        results.push(r);
    }
    if results.len() > 1 {
        println!();
        print!("{}", comparison(&results));
    }
    Ok(())
}

/// The binary under test: the one cargo built for this bench, or, when run
/// outside cargo, `ROLLWAVE_EXE`.
fn rollwave_exe() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::var_os("ROLLWAVE_EXE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_rollwave").into());
    if !exe.is_file() {
        bail!(
            "rollwave executable {} not found: run through `cargo bench -p rollwave --bench handoff`",
            exe.display()
        );
    }
    Ok(exe)
}

fn check_wrk() -> anyhow::Result<()> {
    match std::process::Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        // wrk --version exits non-zero after printing its usage.
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "wrk is not installed: install it with `sudo apt-get install -y wrk` (scripts/test.sh does)"
        ),
        Err(e) => Err(e).context("running wrk"),
    }
}

struct ModeResult {
    mode: String,
    steady: WrkResult,
    rollout: WrkResult,
    /// From the rollout's creation to its end, control-plane clock.
    rollout_s: f64,
    /// Per node, from the switch command to the new version's first passed
    /// health check, as the agent measured it.
    switch_ms: Vec<u64>,
    /// The agents' health check interval.
    check_interval: String,
}

async fn bench_mode(args: &Args, exe: &Path, mode: &str) -> anyhow::Result<ModeResult> {
    let spec = FleetSpec {
        switch: mode.into(),
        ..FleetSpec::new(exe.to_path_buf(), args.nodes)
    };
    let check_interval = spec.check_interval.clone();
    let fleet = Fleet::launch(spec)
        .await
        .with_context(|| format!("launching a fleet of {} nodes", args.nodes))?;
    let api = fleet.api()?;
    push(&api, "1.0.0", true).await?;
    let install = start(&api, "1.0.0", "100%", "0s", "30s").await?;
    let install = wait_done(&api, install.id).await?;
    if !install.fully_upgraded() {
        bail!(
            "installing 1.0.0 failed ({}): {}; logs under {}",
            install.state.as_str(),
            install.reason.unwrap_or_default(),
            fleet.dir.display()
        );
    }
    push(&api, "2.0.0", true).await?;
    println!(
        "fleet of {} nodes on 1.0.0 (logs under {})",
        args.nodes,
        fleet.dir.display()
    );

    let ports: Vec<u16> = fleet.nodes.iter().map(|n| n.port).collect();
    let script = fleet.dir.join("wrk.lua");
    std::fs::write(&script, wrk_script(&ports)).context("writing the wrk script")?;
    let connections = args.nodes * args.connections_per_node;

    println!("steady state: {}s of load, no rollout", args.steady_secs);
    let steady = Wrk::start(&script, ports[0], args.nodes, connections, args.steady_secs)?
        .finish()
        .await?;

    println!("rollout: load running, rolling out 2.0.0");
    let wrk = Wrk::start(
        &script,
        ports[0],
        args.nodes,
        connections,
        ROLLOUT_LIMIT.as_secs() + 60,
    )?;
    // Let wrk open its connections first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rollout = start(&api, "2.0.0", "1", &args.min_healthy_time, "30s").await?;
    let rollout = wait_done(&api, rollout.id).await?;
    tokio::time::sleep(TAIL).await;
    let loaded = wrk.interrupt().await?;
    if !rollout.fully_upgraded() {
        bail!(
            "rollout of 2.0.0 did not complete ({}): {}; logs under {}",
            rollout.state.as_str(),
            rollout.reason.clone().unwrap_or_default(),
            fleet.dir.display()
        );
    }
    let switch_ms = rollout
        .events
        .iter()
        .filter_map(|e| {
            e.message
                .strip_prefix("serving after ")?
                .strip_suffix("ms")?
                .parse()
                .ok()
        })
        .collect();
    let rollout_ms = rollout
        .finished_at
        .unwrap_or(rollout.updated_at)
        .saturating_sub(rollout.created_at);
    Ok(ModeResult {
        mode: mode.into(),
        steady,
        rollout: loaded,
        rollout_s: rollout_ms as f64 / 1000.0,
        switch_ms,
        check_interval,
    })
    // The fleet is dropped here: every process it started is killed.
}

/// Polls the rollout until it has ended and nothing is in flight.
async fn wait_done(api: &ApiClient, id: u64) -> anyhow::Result<Rollout> {
    let began = Instant::now();
    loop {
        let resp: RolloutResponse = api.get(&format!("/v1/rollouts/{id}")).await?;
        if !resp.rollout.is_active() {
            return Ok(resp.rollout);
        }
        if began.elapsed() > ROLLOUT_LIMIT {
            bail!(
                "rollout {id} still running after {}s",
                ROLLOUT_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The wrk script: thread i loads node i (round robin when there are more
/// threads than nodes), every request on a fresh connection, and `done`
/// prints one JSON line tagged `rollwave-wrk`.
fn wrk_script(ports: &[u16]) -> String {
    format!(
        r#"local ports = {{ {ports} }}
local next_port = 0

function setup(thread)
  local port = ports[next_port % #ports + 1]
  next_port = next_port + 1
  thread.addr = wrk.lookup("127.0.0.1", port)[1]
end

wrk.headers["Connection"] = "close"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'rollwave-wrk {{"duration_us":%.0f,"requests":%.0f,"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,"p50_us":%.0f,"p99_us":%.0f,"max_us":%.0f}}\n',
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"#,
        ports = ports
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

#[derive(Debug, Clone, Deserialize)]
struct WrkResult {
    duration_us: u64,
    /// Completed responses, non-2xx included (those also count in `status`).
    requests: u64,
    connect: u64,
    read: u64,
    write: u64,
    status: u64,
    timeout: u64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

impl WrkResult {
    fn failed(&self) -> u64 {
        self.connect + self.read + self.write + self.status + self.timeout
    }

    fn per_second(&self) -> f64 {
        self.requests as f64 / (self.duration_us.max(1) as f64 / 1e6)
    }
}

/// A running wrk; killed if dropped before it finished.
struct Wrk {
    child: tokio::process::Child,
}

impl Wrk {
    fn start(
        script: &Path,
        port: u16,
        threads: usize,
        connections: usize,
        secs: u64,
    ) -> anyhow::Result<Wrk> {
        let child = tokio::process::Command::new("wrk")
            .arg(format!("-t{threads}"))
            .arg(format!("-c{}", connections.max(threads)))
            .arg(format!("-d{secs}s"))
            .arg("--timeout")
            .arg("2s")
            .arg("-s")
            .arg(script)
            // The script sends each thread to its own node; this URL only
            // gives the path and Host header.
            .arg(format!("http://127.0.0.1:{port}/"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting wrk")?;
        Ok(Wrk { child })
    }

    /// Stops wrk with SIGINT (it prints its summary and runs `done`) and
    /// reads the result.
    async fn interrupt(self) -> anyhow::Result<WrkResult> {
        if let Some(pid) = self.child.id() {
            kill(Pid::from_raw(pid as i32), Signal::SIGINT).context("interrupting wrk")?;
        }
        self.finish().await
    }

    async fn finish(self) -> anyhow::Result<WrkResult> {
        let out = self
            .child
            .wait_with_output()
            .await
            .context("waiting for wrk")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("rollwave-wrk "))
            .with_context(|| {
                format!(
                    "wrk ({}) printed no result: {}{}",
                    out.status,
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })?;
        serde_json::from_str(line).with_context(|| format!("parsing wrk's result {line:?}"))
    }
}

/// Milliseconds from spawning `rollwave demo-service` to its first 200 on
/// /healthz, polled every millisecond: the floor under any switch.
fn service_startup(exe: &Path, samples: usize) -> anyhow::Result<Vec<u64>> {
    let dir = tempfile::Builder::new()
        .prefix("rollwave-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    std::fs::write(dir.path().join("release.toml"), "version = \"1.0.0\"\n")?;
    let mut out = Vec::new();
    for _ in 0..samples {
        let port = free_port()?;
        let began = Instant::now();
        let child = std::process::Command::new(exe)
            .arg("demo-service")
            .arg("--release")
            .arg(dir.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rollwave demo-service")?;
        let mut child = KillOnDrop(child);
        loop {
            if healthz_ok(port) {
                out.push(began.elapsed().as_millis() as u64);
                break;
            }
            if let Some(status) = child.0.try_wait()? {
                bail!("rollwave demo-service exited with {status} before serving");
            }
            if began.elapsed() > Duration::from_secs(10) {
                bail!("rollwave demo-service did not answer /healthz within 10s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(out)
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn healthz_ok(port: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let mut head = [0u8; 12];
    conn.write_all(request.as_bytes()).is_ok()
        && conn.read_exact(&mut head).is_ok()
        && head.ends_with(b" 200")
}

/// Nearest-rank percentiles of a small sample.
struct Stats {
    n: usize,
    p50: u64,
    p99: u64,
    max: u64,
}

impl Stats {
    fn of(mut v: Vec<u64>) -> Stats {
        v.sort_unstable();
        let rank = |p: f64| -> u64 {
            if v.is_empty() {
                return 0;
            }
            let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1]
        };
        Stats {
            n: v.len(),
            p50: rank(50.0),
            p99: rank(99.0),
            max: v.last().copied().unwrap_or(0),
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "pass"
    } else {
        "MISS"
    }
}

fn report(r: &ModeResult, startup: &Stats, nodes: usize) -> String {
    let (s, l) = (&r.steady, &r.rollout);
    let sw = Stats::of(r.switch_ms.clone());
    let mut o = String::new();
    let row = |o: &mut String, name: &str, a: String, b: String| {
        let _ = writeln!(o, "  {name:<22} {a:>24}   {b:>24}");
    };
    let _ = writeln!(o);
    row(
        &mut o,
        "",
        "steady state (ideal)".into(),
        "during rollout".into(),
    );
    row(
        &mut o,
        "load duration",
        format!("{:.1} s", s.duration_us as f64 / 1e6),
        format!(
            "{:.1} s (rollout {:.1} s)",
            l.duration_us as f64 / 1e6,
            r.rollout_s
        ),
    );
    row(
        &mut o,
        "requests",
        s.requests.to_string(),
        l.requests.to_string(),
    );
    row(
        &mut o,
        "requests/s",
        format!("{:.0}", s.per_second()),
        format!("{:.0}", l.per_second()),
    );
    row(
        &mut o,
        "failed",
        s.failed().to_string(),
        l.failed().to_string(),
    );
    row(
        &mut o,
        "  connect/read/write",
        format!("{}/{}/{}", s.connect, s.read, s.write),
        format!("{}/{}/{}", l.connect, l.read, l.write),
    );
    row(
        &mut o,
        "  non-2xx/timeout",
        format!("{}/{}", s.status, s.timeout),
        format!("{}/{}", l.status, l.timeout),
    );
    row(&mut o, "latency p50", ms(s.p50_us), ms(l.p50_us));
    row(&mut o, "latency p99", ms(s.p99_us), ms(l.p99_us));
    row(&mut o, "latency max", ms(s.max_us), ms(l.max_us));
    let _ = writeln!(
        o,
        "  switch time            p50 {} ms, p99 {} ms, max {} ms ({} of {nodes} nodes reported)",
        sw.p50, sw.p99, sw.max, sw.n
    );
    let _ = writeln!(
        o,
        "    reference: the demo service starts in {} ms (p50; max {} ms) from spawn to first 200;",
        startup.p50, startup.max
    );
    let _ = writeln!(
        o,
        "    until its first healthy check the agent checks a new process every 20 ms (then every {}); \
         the rest is CPU shared with the load on this machine",
        r.check_interval
    );

    let no_failures = l.failed() == 0 && l.requests >= MIN_REQUESTS;
    let switch_ok = sw.n == nodes && sw.p50 < SWITCH_P50_GOAL_MS && sw.p99 < SWITCH_P99_GOAL_MS;
    let ratio = l.p99_us as f64 / s.p99_us.max(1) as f64;
    let latency_ok = ratio <= LATENCY_FACTOR;
    let _ = writeln!(o, "  verdict ({}):", r.mode);
    let _ = writeln!(
        o,
        "    [{}] failed requests: {} of {} (goal: 0 of >= {MIN_REQUESTS})",
        mark(no_failures),
        l.failed(),
        l.requests
    );
    let _ = writeln!(
        o,
        "    [{}] switch time: p50 {} ms, p99 {} ms (goal: p50 < {SWITCH_P50_GOAL_MS} ms, p99 < {SWITCH_P99_GOAL_MS} ms)",
        mark(switch_ok),
        sw.p50,
        sw.p99
    );
    let _ = writeln!(
        o,
        "    [{}] latency p99 during rollout: {} = {ratio:.2}x steady state {} (goal: <= {LATENCY_FACTOR}x)",
        mark(latency_ok),
        ms(l.p99_us),
        ms(s.p99_us)
    );
    o
}

fn comparison(results: &[ModeResult]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "== comparison ==");
    let _ = writeln!(
        o,
        "  {:<8} {:>16} {:>10} {:>12} {:>12} {:>16} {:>16}",
        "switch",
        "rollout requests",
        "failed",
        "switch p50",
        "switch p99",
        "p99 steady",
        "p99 rollout"
    );
    for r in results {
        let sw = Stats::of(r.switch_ms.clone());
        let _ = writeln!(
            o,
            "  {:<8} {:>16} {:>10} {:>9} ms {:>9} ms {:>16} {:>16}",
            r.mode,
            r.rollout.requests,
            r.rollout.failed(),
            sw.p50,
            sw.p99,
            ms(r.steady.p99_us),
            ms(r.rollout.p99_us)
        );
    }
    o
}
