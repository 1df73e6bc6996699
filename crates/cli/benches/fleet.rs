//! A fleet of real agents on this machine, as an operator would run it.
//!
//! `cargo bench -p rollwave --bench fleet [-- --agents 200 --batch 10%]`
//!
//! Starts one control plane (plain HTTP) and `--agents` real `rollwave
//! agent` processes, each supervising the demo service, then installs 1.0.0
//! on all of them at once and rolls them to 2.0.0 in batches. Prints one
//! JSON object: how long the agents took to come online and each rollout to
//! complete, the nodes that failed, what downloads went through (timed-out
//! attempts, retries, 429s), and what the control plane spent (CPU from
//! `/proc/PID/stat`, bytes written from `/proc/PID/io`), beside the goal:
//! 0 failed nodes and 0 download timeouts. Timings never fail the benchmark;
//! only something broken does (the fleet, a rollout that does not end).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use rollwave::client::ApiClient;
use rollwave::demo::{push, start};
use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_api::RolloutResponse;
use rollwave_core::{NodeState, Rollout};
use serde_json::json;

/// Past this a rollout is given up on.
const ROLLOUT_LIMIT: Duration = Duration::from_secs(1800);

/// `/proc/PID/stat` counts CPU time in USER_HZ, fixed at 100 for user space.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Parser)]
#[command(
    about = "real agents on this machine: online, install and upgrade times, control-plane cost"
)]
struct Args {
    /// Agents (each also runs one demo service process).
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Batch of the upgrade (the install is one batch of 100%).
    #[arg(long, default_value = "10%")]
    batch: String,
    /// The agents' health check interval: every check is an HTTP request,
    /// and a thousand agents at the tests' 100 ms would load the machine
    /// more than the control plane does.
    #[arg(long, default_value = "1s")]
    check_interval: String,
    /// `rollwave server --max-downloads` (default: the server's own).
    #[arg(long)]
    max_downloads: Option<usize>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Fleet processes live in their own process groups: on ctrl-c, return
    // normally so that the Fleet is dropped and kills them.
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
    if args.agents == 0 {
        bail!("--agents: must be at least 1");
    }
    let exe = rollwave_exe()?;
    // The control plane holds a socket per agent and the agents inherit the
    // limits too: raise the soft limits to the hard ones.
    let raised = json!({
        "open_files": raise(Resource::RLIMIT_NOFILE)?,
        "processes": raise(Resource::RLIMIT_NPROC)?,
    });
    let (open_files, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if open_files < 2 * args.agents as u64 + 256 {
        bail!(
            "--agents {}: the open files limit is {open_files} and cannot be raised further; \
             the control plane needs about two per agent",
            args.agents
        );
    }
    let mut spec = FleetSpec::new(exe.clone(), args.agents);
    spec.check_interval = args.check_interval.clone();
    if let Some(n) = args.max_downloads {
        spec.server_args = vec!["--max-downloads".into(), n.to_string()];
    }
    eprintln!(
        "fleet benchmark: {} agents ({} cpus), {}",
        args.agents,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        exe.display()
    );
    let began = Instant::now();
    let fleet = Fleet::launch(spec)
        .await
        .with_context(|| format!("launching a fleet of {} agents", args.agents))?;
    let online_after = began.elapsed();
    eprintln!(
        "{} agents online after {:.1}s (logs under {})",
        args.agents,
        online_after.as_secs_f64(),
        fleet.dir.display()
    );
    let pid = fleet
        .server_pid()
        .context("the control plane is not running")?;
    let api = fleet.api()?;

    push(&api, "1.0.0", true).await?;
    let before_install = Usage::of(pid)?;
    let install = start(&api, "1.0.0", "100%", "0s", "1m").await?;
    let install = wait_done(&api, install.id).await?;
    let after_install = Usage::of(pid)?;
    eprintln!(
        "install: {} in {:.1}s",
        install.state.as_str(),
        duration_s(&install)
    );

    push(&api, "2.0.0", true).await?;
    let before_upgrade = Usage::of(pid)?;
    let upgrade = start(&api, "2.0.0", &args.batch, "0s", "1m").await?;
    let upgrade = wait_done(&api, upgrade.id).await?;
    let after_upgrade = Usage::of(pid)?;
    eprintln!(
        "upgrade: {} in {:.1}s",
        upgrade.state.as_str(),
        duration_s(&upgrade)
    );

    let downloads = Downloads::read(&fleet, &[&install, &upgrade]);
    let refused = metric(&fleet, "rollwave_downloads_refused_total").await;
    let failed_nodes = not_upgraded(&install) + not_upgraded(&upgrade);
    let install_cpu = after_install.cpu_s - before_install.cpu_s;
    let upgrade_cpu = after_upgrade.cpu_s - before_upgrade.cpu_s;
    let per_result = |cpu: f64| round(cpu * 1000.0 / args.agents as f64);
    let figures = json!({
        "agents": args.agents,
        "online_after_s": round(online_after.as_secs_f64()),
        "install_rollout_s": round(duration_s(&install)),
        "install_state": install.state.as_str(),
        "upgrade_rollout_s": round(duration_s(&upgrade)),
        "upgrade_state": upgrade.state.as_str(),
        "upgrade_batch": args.batch,
        "failed_nodes": failed_nodes,
        "download_timeouts": downloads.timeouts,
        "download_retries": downloads.retries,
        "download_failures": downloads.failures,
        "downloads_refused_429": refused,
        "server_cpu_s": {
            "install": round(install_cpu),
            "upgrade": round(upgrade_cpu),
            "whole_run": round(after_upgrade.cpu_s),
        },
        "server_cpu_ms_per_node_result": {
            "install": per_result(install_cpu),
            "upgrade": per_result(upgrade_cpu),
        },
        "server_bytes_written": {
            "install": after_install.write_bytes - before_install.write_bytes,
            "upgrade": after_upgrade.write_bytes - before_upgrade.write_bytes,
        },
        "server_bytes_written_syscalls": {
            "install": after_install.wchar - before_install.wchar,
            "upgrade": after_upgrade.wchar - before_upgrade.wchar,
        },
        "health_check_interval": args.check_interval,
        "max_downloads": args.max_downloads.unwrap_or(rollwave_server::DEFAULT_MAX_DOWNLOADS),
        "limits_raised": raised,
        "goal": { "failed_nodes": 0, "download_timeouts": 0 },
        "goal_met": failed_nodes == 0 && downloads.timeouts == 0,
    });
    println!("{}", serde_json::to_string_pretty(&figures)?);
    Ok(())
    // The fleet is dropped here: every process it started is killed.
}

/// The binary under test: the one cargo built for this bench, or, when run
/// outside cargo, `ROLLWAVE_EXE`.
fn rollwave_exe() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::var_os("ROLLWAVE_EXE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_rollwave").into());
    if !exe.is_file() {
        bail!(
            "rollwave executable {} not found: run through `cargo bench -p rollwave --bench fleet`",
            exe.display()
        );
    }
    Ok(exe)
}

/// Raises a soft limit to its hard limit; returns what it was and is.
fn raise(resource: Resource) -> anyhow::Result<serde_json::Value> {
    let (soft, hard) = getrlimit(resource)?;
    if soft < hard {
        setrlimit(resource, hard, hard).with_context(|| format!("raising {resource:?}"))?;
    }
    let shown = |n: u64| {
        if n == nix::sys::resource::RLIM_INFINITY {
            json!("unlimited")
        } else {
            json!(n)
        }
    };
    Ok(json!({ "from": shown(soft), "to": shown(hard) }))
}

/// What a process has used so far.
struct Usage {
    cpu_s: f64,
    /// Bytes it caused to reach storage (`write_bytes`).
    write_bytes: u64,
    /// Bytes it passed to write calls (`wchar`), cached or not.
    wchar: u64,
}

impl Usage {
    fn of(pid: u32) -> anyhow::Result<Usage> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the command name, which is in parentheses and may
        // hold spaces: state is field 3, utime 14 and stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> anyhow::Result<u64> {
            fields
                .get(i - 3)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("/proc/{pid}/stat has no field {i}: {stat}"))
        };
        let cpu_s = (ticks(14)? + ticks(15)?) as f64 / TICKS_PER_SECOND;
        let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
            .with_context(|| format!("reading /proc/{pid}/io"))?;
        let field = |name: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        Ok(Usage {
            cpu_s,
            write_bytes: field("write_bytes"),
            wchar: field("wchar"),
        })
    }
}

/// What the agents' downloads went through, from their logs and the
/// rollouts' failure reasons.
struct Downloads {
    /// Attempts that timed out, retried or not.
    timeouts: usize,
    retries: usize,
    /// Nodes whose task failed because the download did.
    failures: usize,
}

impl Downloads {
    fn read(fleet: &Fleet, rollouts: &[&Rollout]) -> Downloads {
        let mut d = Downloads {
            timeouts: 0,
            retries: 0,
            failures: 0,
        };
        for node in &fleet.nodes {
            let log = std::fs::read_to_string(node.state_dir.join("agent.log")).unwrap_or_default();
            for line in log
                .lines()
                .filter(|l| l.contains("download failed; retrying"))
            {
                d.retries += 1;
                d.timeouts += usize::from(line.contains("timed out"));
            }
        }
        for r in rollouts {
            for n in r.nodes.values() {
                let reason = n.reason.as_deref().unwrap_or("");
                if reason.starts_with("download failed:") {
                    d.failures += 1;
                    d.timeouts += usize::from(reason.contains("timed out"));
                }
            }
        }
        d
    }
}

fn not_upgraded(r: &Rollout) -> usize {
    r.nodes
        .values()
        .filter(|n| n.state != NodeState::Upgraded)
        .count()
}

fn duration_s(r: &Rollout) -> f64 {
    r.finished_at
        .unwrap_or(r.updated_at)
        .saturating_sub(r.created_at) as f64
        / 1000.0
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A counter from the control plane's metrics, 0 if it cannot be read.
async fn metric(fleet: &Fleet, name: &str) -> u64 {
    let text = async {
        fleet
            .http()
            .get(format!("{}/metrics", fleet.url()))
            .send()
            .await?
            .text()
            .await
    };
    text.await
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Polls the rollout until it has ended. A slow or briefly unanswering
/// control plane is waited for: that is what is being measured.
async fn wait_done(api: &ApiClient, id: u64) -> anyhow::Result<Rollout> {
    let began = Instant::now();
    loop {
        if let Ok(resp) = api
            .get::<RolloutResponse>(&format!("/v1/rollouts/{id}"))
            .await
        {
            if !resp.rollout.is_active() {
                return Ok(resp.rollout);
            }
        }
        if began.elapsed() > ROLLOUT_LIMIT {
            bail!(
                "rollout {id} still running after {}s",
                ROLLOUT_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
