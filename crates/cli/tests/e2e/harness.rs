//! Shared set-up: a fleet with 1.0.0 installed, waiting helpers, and
//! inspection of what agents did on disk.

use std::future::Future;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use rollwave::client::ApiClient;
use rollwave::demo_service::{tarball, tarball_with, DemoRelease};
use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_api::{NodeView, PushResponse, RolloutFile, RolloutResponse};
use rollwave_core::{Rollout, StrategyFile};

pub const SERVICE: &str = "api";

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_rollwave")
}

/// A fleet of `nodes` agents, with release 1.0.0 pushed and installed
/// everywhere. Dropping it kills every process it started.
pub async fn installed_fleet(nodes: usize) -> Fleet {
    installed(FleetSpec::new(exe().into(), nodes)).await
}

/// A fleet of `nodes` agents whose `api` service declares `hooks`, each a
/// shell script by name; 1.0.0 installed everywhere.
pub async fn installed_with_hooks(nodes: usize, hooks: &[(&str, &str)]) -> Fleet {
    let mut spec = FleetSpec::new(exe().into(), nodes);
    spec.hooks = hooks
        .iter()
        .map(|(name, script)| {
            let command = vec!["sh".into(), "-c".into(), script.to_string()];
            (name.to_string(), command)
        })
        .collect();
    installed(spec).await
}

/// A rollout hook running the hook `name` the nodes declare.
pub fn node_hook(name: &str) -> rollwave_core::HookFile {
    rollwave_core::HookFile {
        kind: Some("node".into()),
        hook: Some(name.into()),
        ..Default::default()
    }
}

/// A fleet as `spec` says, with 1.0.0 pushed and installed everywhere.
pub async fn installed(spec: FleetSpec) -> Fleet {
    let fleet = Fleet::launch(spec).await.unwrap();
    push(&fleet, "1.0.0", true).await;
    let r = start(&fleet, "1.0.0", |s| {
        s.batch = Some("100%".into());
        s.min_healthy_time = Some("0s".into());
    })
    .await
    .unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "install failed: {r:#?}");
    fleet
}

pub async fn push(fleet: &Fleet, version: &str, healthy: bool) -> PushResponse {
    upload(
        fleet,
        version,
        DemoRelease {
            version: version.into(),
            healthy,
            broken_on: Vec::new(),
            error_rate: 0.0,
        },
    )
    .await
}

/// A release that is healthy everywhere but on `nodes`.
pub async fn push_broken_on(fleet: &Fleet, version: &str, nodes: &[&str]) -> PushResponse {
    upload(
        fleet,
        version,
        DemoRelease {
            version: version.into(),
            healthy: true,
            broken_on: nodes.iter().map(|n| n.to_string()).collect(),
            error_rate: 0.0,
        },
    )
    .await
}

/// A release that passes its health checks everywhere but answers 500 to
/// `rate` of the requests to `/` (0.1: every tenth).
pub async fn push_failing_requests(fleet: &Fleet, version: &str, rate: f64) -> PushResponse {
    upload(
        fleet,
        version,
        DemoRelease {
            version: version.into(),
            healthy: true,
            broken_on: Vec::new(),
            error_rate: rate,
        },
    )
    .await
}

async fn upload(fleet: &Fleet, version: &str, release: DemoRelease) -> PushResponse {
    upload_to(fleet, SERVICE, version, release).await
}

/// Pushes a demo release of `service`, healthy everywhere.
pub async fn push_service(fleet: &Fleet, service: &str, version: &str) -> PushResponse {
    let release = DemoRelease {
        version: version.into(),
        healthy: true,
        broken_on: Vec::new(),
        error_rate: 0.0,
    };
    upload_to(fleet, service, version, release).await
}

async fn upload_to(
    fleet: &Fleet,
    service: &str,
    version: &str,
    release: DemoRelease,
) -> PushResponse {
    let bytes = tarball(&release).unwrap();
    fleet
        .api()
        .unwrap()
        .post_bytes(&format!("/v1/releases/{service}/{version}"), bytes)
        .await
        .unwrap()
}

/// Pushes a healthy demo release of `api` with more files in its archive
/// (path, content, mode), e.g. a `rollwave.toml` and its scripts.
pub async fn push_with(
    fleet: &Fleet,
    version: &str,
    files: &[(&str, &str, u32)],
) -> anyhow::Result<PushResponse> {
    let release = DemoRelease {
        version: version.into(),
        healthy: true,
        broken_on: Vec::new(),
        error_rate: 0.0,
    };
    let bytes = tarball_with(&release, files)?;
    fleet
        .api()?
        .post_bytes(&format!("/v1/releases/{SERVICE}/{version}"), bytes)
        .await
}

/// Starts the rollouts of a request; returns them in dependency order.
pub async fn start_file(fleet: &Fleet, spec: RolloutFile) -> anyhow::Result<Vec<Rollout>> {
    let resp = fleet.api()?.start_rollout(spec).await?;
    let mut all = vec![resp.rollout];
    all.extend(resp.dependents);
    Ok(all)
}

/// Starts a rollout of `version` with test-friendly timings, adjusted by `f`.
pub async fn start(
    fleet: &Fleet,
    version: &str,
    f: impl FnOnce(&mut StrategyFile),
) -> anyhow::Result<Rollout> {
    start_on(&fleet.api()?, version, f).await
}

/// [`start`] through `api`, e.g. another replica of the control plane.
pub async fn start_on(
    api: &ApiClient,
    version: &str,
    f: impl FnOnce(&mut StrategyFile),
) -> anyhow::Result<Rollout> {
    let mut strategy = StrategyFile {
        batch: Some("1".into()),
        min_healthy_time: Some("300ms".into()),
        healthy_deadline: Some("20s".into()),
        progress_deadline: Some("2m".into()),
        ..Default::default()
    };
    f(&mut strategy);
    let spec = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some(version.into()),
        selector: None,
        nodes: None,
        services: None,
        downgrade: None,
        hooks: None,
        strategy,
        analysis: None,
    };
    let resp: RolloutResponse = api.start_rollout(spec).await?;
    Ok(resp.rollout)
}

pub async fn get(api: &ApiClient, id: u64) -> anyhow::Result<Rollout> {
    let resp: RolloutResponse = api.get(&format!("/v1/rollouts/{id}")).await?;
    Ok(resp.rollout)
}

/// Polls until `cond` holds. The limit only guards against a hung test; no
/// test depends on how fast anything happens.
pub async fn wait_until<F, Fut, T>(what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..1200 {
        if let Some(v) = cond().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

pub async fn wait_rollout(
    fleet: &Fleet,
    id: u64,
    what: &str,
    f: impl Fn(&Rollout) -> bool,
) -> Rollout {
    let api = fleet.api().unwrap();
    wait_until(what, || {
        let api = api.clone();
        let f = &f;
        async move { get(&api, id).await.ok().filter(|r| f(r)) }
    })
    .await
}

/// Waits until the rollout has ended and nothing is in flight.
pub async fn wait_done(fleet: &Fleet, id: u64) -> Rollout {
    wait_rollout(fleet, id, "the rollout to end", |r| !r.is_active()).await
}

pub async fn nodes(fleet: &Fleet) -> Vec<NodeView> {
    fleet.nodes_view().await.unwrap()
}

/// Running version of the service on every node, by node name.
pub async fn versions(fleet: &Fleet) -> Vec<(String, Option<String>)> {
    versions_of(fleet, SERVICE).await
}

/// Running version of `service` on every node, by node name.
pub async fn versions_of(fleet: &Fleet, service: &str) -> Vec<(String, Option<String>)> {
    nodes(fleet)
        .await
        .into_iter()
        .map(|n| {
            let v = n.services.get(service).and_then(|s| s.version.clone());
            (n.name, v)
        })
        .collect()
}

/// What the node's service itself answers (not what the agent reports).
pub async fn served_version(port: u16) -> Option<String> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.split_whitespace().nth(1).map(str::to_string)
}

/// Switches of `current` the agent recorded, as `(from, to)` pairs.
pub fn switches(state_dir: &Path) -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(state_dir.join("services").join(SERVICE).join("history.log"))
            .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            match parts.as_slice() {
                [_, _, from, "->", to] => Some((from.to_string(), to.to_string())),
                _ => None,
            }
        })
        .collect()
}

/// How many times the node's agent switched the service to `version`.
pub fn switches_to(state_dir: &Path, version: &str) -> usize {
    switches(state_dir)
        .into_iter()
        .filter(|(_, to)| to == version)
        .count()
}

/// Runs the `rollwave` CLI against the fleet's control plane, as its admin.
pub fn cli(fleet: &Fleet, args: &[&str]) -> Output {
    fleet.command().args(args).output().unwrap()
}

/// Every node runs `version`, as its agent reports and as its service answers.
pub async fn assert_fleet_on(fleet: &Fleet, version: &str) {
    for (name, v) in versions(fleet).await {
        assert_eq!(v.as_deref(), Some(version), "{name}");
    }
    for node in &fleet.nodes {
        let served = served_version(node.port).await;
        assert_eq!(served.as_deref(), Some(version), "{} serves", node.name);
    }
}
