//! Recovery from a control plane killed mid-rollout.
//!
//! `cargo bench -p rollwave --bench recovery [-- --rounds 20 --nodes 4]`
//!
//! Starts a control plane and `--nodes` real agents, then, `--rounds` times,
//! runs the same rolling rollout twice: once untouched, once with the
//! control plane `kill -9`ed and restarted while its second node is in
//! flight. Prints the median and max of kill-to-resume (the first task
//! result recorded after the restart), server-back-to-resume and
//! kill-to-completion, beside the same rollout without a fault (from the
//! moment the kill would have come) and beside the goal: resume within 1 s
//! of the server being back; ideally at once. `ROLLWAVE_EXE` runs another
//! `rollwave` binary (an older build, to compare). Timings never fail the
//! benchmark; only something broken does.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rollwave::client::ApiClient;
use rollwave::demo::{push, start};
use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_api::RolloutResponse;
use rollwave_core::{NodeState, Rollout};

/// Past this a rollout, or a wait within it, is given up on.
const LIMIT: Duration = Duration::from_secs(300);
/// How often the rollout is read: the resolution of every figure.
const POLL: Duration = Duration::from_millis(20);

#[derive(Parser)]
#[command(about = "kill -9 of the control plane mid-rollout: time to resume and to complete")]
struct Args {
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
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
    if args.nodes < 2 || args.rounds == 0 {
        bail!("--nodes: at least 2, --rounds: at least 1");
    }
    let exe = std::env::var_os("ROLLWAVE_EXE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_rollwave").into());
    eprintln!(
        "recovery benchmark: {} nodes, {} rounds, {}",
        args.nodes,
        args.rounds,
        exe.display()
    );
    let mut fleet = Fleet::launch(FleetSpec::new(exe, args.nodes))
        .await
        .context("launching the fleet")?;
    let api = fleet.api()?;
    push(&api, "1.0.0", true).await?;
    let install = start(&api, "1.0.0", "100%", "0s", "1m").await?;
    wait_done(&api, install.id).await?;

    let mut clean_done = Vec::new();
    let mut resume = Vec::new();
    let mut back_to_resume = Vec::new();
    let mut done = Vec::new();
    let mut version = 1;
    for round in 1..=args.rounds {
        // Untouched: from the moment the kill would come to the end.
        version += 1;
        let r = rollout(&api, version).await?;
        second_in_flight(&api, r.id).await?;
        let at = Instant::now();
        wait_done(&api, r.id).await?;
        clean_done.push(at.elapsed());

        version += 1;
        let r = rollout(&api, version).await?;
        let finished_at_kill = second_in_flight(&api, r.id).await?;
        let killed = Instant::now();
        fleet.kill_server();
        fleet.restart_server().await?;
        let back = killed.elapsed();
        let api = fleet.api()?;
        let resumed = loop {
            if let Ok(r) = get(&api, r.id).await {
                if finished(&r) > finished_at_kill {
                    break killed.elapsed();
                }
            }
            if killed.elapsed() > LIMIT {
                bail!("rollout {} did not resume within {LIMIT:?}", r.id);
            }
            tokio::time::sleep(POLL).await;
        };
        wait_done(&api, r.id).await?;
        let completed = killed.elapsed();
        eprintln!(
            "round {round}: server back {:.2}s after the kill, resumed {:.2}s, done {:.2}s (untouched: {:.2}s)",
            back.as_secs_f64(),
            resumed.as_secs_f64(),
            completed.as_secs_f64(),
            clean_done.last().map_or(0.0, Duration::as_secs_f64),
        );
        resume.push(resumed);
        back_to_resume.push(resumed.saturating_sub(back));
        done.push(completed);
    }
    let line = |what: &str, v: &mut Vec<Duration>| {
        v.sort();
        println!(
            "{what:<44} median {:>6.2}s  max {:>6.2}s",
            v[v.len() / 2].as_secs_f64(),
            v[v.len() - 1].as_secs_f64()
        );
    };
    line("kill to resume (first result after restart)", &mut resume);
    line("server back to resume", &mut back_to_resume);
    line("kill to completion", &mut done);
    line("same point to completion, no fault", &mut clean_done);
    println!("goal: resume within 1.00s of the server being back; ideal: at once (0.00s)");
    Ok(())
}

/// A rolling rollout to `1.<version>.0`, one node at a time.
async fn rollout(api: &ApiClient, version: usize) -> anyhow::Result<Rollout> {
    let v = format!("1.{version}.0");
    push(api, &v, true).await?;
    start(api, &v, "1", "1s", "1m").await
}

/// Waits until one node is upgraded and the next is in flight; returns how
/// many nodes had finished then.
async fn second_in_flight(api: &ApiClient, id: u64) -> anyhow::Result<usize> {
    let began = Instant::now();
    loop {
        let r = get(api, id).await?;
        if r.count(NodeState::Upgraded) == 1 && r.in_flight().count() == 1 {
            return Ok(finished(&r));
        }
        if began.elapsed() > LIMIT || !r.is_active() {
            bail!("rollout {id} never had its second node in flight");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Nodes whose task has ended.
fn finished(r: &Rollout) -> usize {
    r.nodes
        .values()
        .filter(|n| n.state != NodeState::Pending && !n.state.in_flight())
        .count()
}

async fn get(api: &ApiClient, id: u64) -> anyhow::Result<Rollout> {
    let resp: RolloutResponse = api.get(&format!("/v1/rollouts/{id}")).await?;
    Ok(resp.rollout)
}

async fn wait_done(api: &ApiClient, id: u64) -> anyhow::Result<Rollout> {
    let began = Instant::now();
    loop {
        if let Ok(r) = get(api, id).await {
            if !r.is_active() {
                return Ok(r);
            }
        }
        if began.elapsed() > LIMIT {
            bail!("rollout {id} still running after {LIMIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}
