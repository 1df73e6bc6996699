//! `rollwave demo`: a real local fleet upgraded end to end under load.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use rollwave_api::{PushResponse, RolloutFile, RolloutResponse};
use rollwave_core::{NodeState, Rollout, RolloutState, StrategyFile};
use serde::Serialize;

use crate::cli::DemoArgs;
use crate::client::{user_error, ApiClient};
use crate::demo_service::{tarball, DemoRelease};
use crate::fleet::{Fleet, FleetSpec};
use crate::load::Load;

pub const SERVICE: &str = "api";
const MIN_HEALTHY_TIME: &str = "1s";

#[derive(Debug, Serialize)]
pub struct Summary {
    pub nodes: usize,
    pub waves: usize,
    pub elapsed_s: f64,
    pub wave_times_s: Vec<f64>,
    /// Per wave: time not spent switching nodes and holding them healthy
    /// (null for a wave whose nodes did not all upgrade).
    pub overhead_per_wave_s: Vec<Option<f64>>,
    /// Mean time from a node's switch to its first healthy check (null if
    /// no node upgraded).
    pub service_start_s: Option<f64>,
    pub min_healthy_time_s: f64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    /// Running version -> node count.
    pub versions: BTreeMap<String, usize>,
    pub rolled_back: bool,
    pub rollout_state: String,
    pub reason: Option<String>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.nodes == 0 || args.nodes > 200 {
        return Err(user_error("--nodes: must be between 1 and 200"));
    }
    tokio::select! {
        r = demo(args) => r,
        _ = crate::commands::shutdown_signal() => {
            eprintln!("interrupted: fleet stopped and cleaned up");
            Ok(ExitCode::from(130))
        }
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let quiet = args.json;
    let say = |s: String| {
        if !quiet {
            crate::outln!("{s}");
        }
    };
    let exe = std::env::current_exe().context("locating the rollwave executable")?;
    say(format!(
        "starting a control plane and {} agents, each supervising an `{SERVICE}` service (switch: {})",
        args.nodes,
        args.switch.as_str()
    ));
    let fleet = Fleet::launch(FleetSpec {
        switch: args.switch.as_str().into(),
        tls: true,
        ..FleetSpec::new(exe, args.nodes)
    })
    .await?;
    let api = fleet.api()?;
    say(format!(
        "control plane at {}; {} agents connected (data and logs under {})",
        fleet.url(),
        args.nodes,
        fleet.dir.display()
    ));

    push(&api, "1.0.0", true).await?;
    let install = start(&api, "1.0.0", "100%", "0s", "30s").await?;
    let install = crate::commands::follow(&api, install.id, false, false).await?;
    if !install.fully_upgraded() {
        bail!(
            "installing 1.0.0 failed: {}",
            install.reason.unwrap_or_default()
        );
    }
    say(format!("fleet installed on {SERVICE} 1.0.0"));

    push(&api, "2.0.0", !args.bad).await?;
    let load = Load::start(fleet.service_urls(), 4, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let batch = args.nodes.div_ceil(3).to_string();
    let deadline = if args.bad { "5s" } else { "30s" };
    if args.bad {
        say("rolling out 2.0.0, a release that never becomes healthy".into());
    }
    let rollout = start(&api, "2.0.0", &batch, MIN_HEALTHY_TIME, deadline).await?;
    if !quiet {
        let nodes = fleet.nodes_view().await?;
        crate::out!(
            "{}{}",
            crate::render::plan(&rollout, &nodes),
            crate::render::started(&rollout)
        );
    }
    let rollout = crate::commands::follow(&api, rollout.id, !quiet, false).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = load.stop().await;

    let nodes = fleet.nodes_view().await?;
    let mut versions = BTreeMap::new();
    for n in &nodes {
        let v = n
            .services
            .get(SERVICE)
            .and_then(|s| s.version.clone())
            .unwrap_or_else(|| "none".into());
        *versions.entry(v).or_default() += 1;
    }
    let summary = summarize(&rollout, stats.ok, stats.failed, versions);
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary, &stats.errors);
    }
    let ok = if args.bad {
        summary.rolled_back && summary.versions.get("1.0.0") == Some(&args.nodes)
    } else {
        rollout.fully_upgraded()
    };
    if args.keep {
        let url = fleet.url();
        let ca_file = fleet.client_tls().ca_file.unwrap_or_default();
        let dir = fleet.detach();
        let token = dir
            .join("server-data")
            .join(rollwave_server::ADMIN_TOKEN_FILE);
        crate::outln!(
            "fleet left running: server {url} (data and logs under {}); try `rollwave --server {url} --ca-file {} --token-file {} nodes`",
            dir.display(),
            ca_file.display(),
            token.display(),
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Pushes a demo release of the `api` service.
pub async fn push(api: &ApiClient, version: &str, healthy: bool) -> anyhow::Result<()> {
    let bytes = tarball(&DemoRelease {
        version: version.into(),
        healthy,
        broken_on: Vec::new(),
        error_rate: 0.0,
    })?;
    let _: PushResponse = api
        .post_bytes(
            &format!("/v1/releases/{SERVICE}/{version}?filename={SERVICE}-{version}.tar.gz"),
            bytes,
        )
        .await?;
    Ok(())
}

/// Starts a rolling rollout of the `api` service.
pub async fn start(
    api: &ApiClient,
    version: &str,
    batch: &str,
    min_healthy_time: &str,
    healthy_deadline: &str,
) -> anyhow::Result<Rollout> {
    let spec = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some(version.into()),
        selector: None,
        nodes: None,
        services: None,
        downgrade: None,
        hooks: None,
        strategy: StrategyFile {
            batch: Some(batch.into()),
            min_healthy_time: Some(min_healthy_time.into()),
            healthy_deadline: Some(healthy_deadline.into()),
            ..Default::default()
        },
        analysis: None,
    };
    let resp: RolloutResponse = api.start_rollout(spec).await?;
    Ok(resp.rollout)
}

/// Times taken from the rollout's own event log (control-plane clock).
pub fn summarize(r: &Rollout, ok: u64, failed: u64, versions: BTreeMap<String, usize>) -> Summary {
    let event_at = |node: &str, msg: &str| {
        r.events
            .iter()
            .find(|e| e.node.as_deref() == Some(node) && e.message.starts_with(msg))
            .map(|e| e.at)
    };
    let mut wave_times = Vec::new();
    let mut overheads = Vec::new();
    let mut starts = Vec::new();
    for batch in &r.batches {
        let began = batch
            .iter()
            .filter_map(|n| r.nodes[n].task.as_ref().map(|t| t.started_at))
            .min();
        let ended = batch
            .iter()
            .filter(|n| r.nodes[*n].state != NodeState::Pending)
            .map(|n| r.nodes[n].updated_at)
            .max();
        let (Some(began), Some(ended)) = (began, ended) else {
            continue;
        };
        let wave = ended.saturating_sub(began);
        // Switch to healthy-for-min_healthy_time, the part a perfect
        // orchestrator could not shorten.
        let switch_and_gate = batch
            .iter()
            .filter_map(|n| {
                Some(event_at(n, "upgraded")?.saturating_sub(event_at(n, "switching")?))
            })
            .max()
            .unwrap_or(0);
        if switch_and_gate > 0 {
            starts.push(switch_and_gate.saturating_sub(r.spec.min_healthy_time));
        }
        wave_times.push(wave as f64 / 1000.0);
        let all_upgraded = batch
            .iter()
            .all(|n| r.nodes[n].state == NodeState::Upgraded);
        overheads.push(
            (all_upgraded && switch_and_gate > 0)
                .then(|| wave.saturating_sub(switch_and_gate) as f64 / 1000.0),
        );
    }
    let elapsed = r
        .finished_at
        .unwrap_or(r.updated_at)
        .saturating_sub(r.created_at);
    let service_start = (!starts.is_empty())
        .then(|| starts.iter().sum::<u64>() as f64 / starts.len() as f64 / 1000.0);
    Summary {
        nodes: r.nodes.len(),
        waves: r.batches.len(),
        elapsed_s: elapsed as f64 / 1000.0,
        wave_times_s: wave_times,
        overhead_per_wave_s: overheads,
        service_start_s: service_start,
        min_healthy_time_s: r.spec.min_healthy_time as f64 / 1000.0,
        requests_ok: ok,
        requests_failed: failed,
        versions,
        rolled_back: r.state == RolloutState::RolledBack,
        rollout_state: r.state.as_str().into(),
        reason: r.reason.clone(),
    }
}

fn print_summary(s: &Summary, errors: &[String]) {
    crate::outln!();
    crate::outln!("summary");
    crate::outln!("  nodes:            {}", s.nodes);
    crate::outln!("  waves:            {}", s.waves);
    crate::outln!(
        "  rollout:          {} in {:.1}s",
        s.rollout_state,
        s.elapsed_s
    );
    for (i, (w, o)) in s
        .wave_times_s
        .iter()
        .zip(&s.overhead_per_wave_s)
        .enumerate()
    {
        match o {
            Some(o) => crate::outln!(
                "  wave {}:           {w:.2}s (orchestration overhead {:.0} ms)",
                i + 1,
                o * 1000.0
            ),
            None => crate::outln!(
                "  wave {}:           {w:.2}s (not every node upgraded)",
                i + 1
            ),
        }
    }
    if let Some(start) = s.service_start_s {
        crate::outln!(
            "  per node:         service start {:.0} ms + min_healthy_time {:.1}s",
            start * 1000.0,
            s.min_healthy_time_s
        );
    }
    crate::outln!(
        "  requests:         {} ok, {} failed",
        s.requests_ok,
        s.requests_failed
    );
    for e in errors.iter().take(3) {
        crate::outln!("    e.g. {e}");
    }
    let versions: Vec<String> = s
        .versions
        .iter()
        .map(|(v, c)| format!("{v}: {c}"))
        .collect();
    crate::outln!("  versions:         {}", versions.join(", "));
    if let Some(reason) = &s.reason {
        crate::outln!("  outcome:          {reason}");
    }
}
