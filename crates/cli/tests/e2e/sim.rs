//! `rollwave sim` against a real control plane: a few hundred virtual
//! agents ride out a `kill -9` of the control plane mid-rollout, and the
//! rollout ends with every node switched exactly once; bad input fails at
//! once with one line.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_core::{NodeState, Role, RolloutState};

use crate::harness::*;

const AGENTS: usize = 300;

/// The sim as a process, killed if the test ends before it was stopped.
struct SimProcess(Option<Child>);

impl SimProcess {
    /// Stops it as an operator would (SIGTERM) and returns its exit status.
    async fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("the sim runs");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap()
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls until `cond` holds. The limit (5 minutes) only guards against a
/// hung test: the control plane is slow at this size on a shared machine.
async fn wait_long<F, Fut, T>(what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..3000 {
        if let Some(v) = cond().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn read_report(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

async fn wait_connected(report: &Path, n: usize, what: &str) {
    wait_long(what, || {
        let connected = read_report(report).and_then(|r| r["connected"].as_u64());
        async move { (connected == Some(n as u64)).then_some(()) }
    })
    .await;
}

async fn write_join_token(fleet: &Fleet, name: &str) -> PathBuf {
    let join = fleet
        .create_token(name, Role::Join, Some("1h"))
        .await
        .unwrap();
    let path = fleet.dir.join(format!("{name}.token"));
    std::fs::write(&path, join.token).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_simulated_fleet_rides_out_a_control_plane_kill_mid_rollout() {
    // Over TLS: each virtual agent verifies the control plane as an agent
    // does, with the CA file `certs init` wrote.
    let mut spec = FleetSpec::new(exe().into(), 0);
    spec.tls = true;
    let mut fleet = Fleet::launch(spec).await.unwrap();
    let join = write_join_token(&fleet, "sim-join").await;
    push(&fleet, "1.0.0", true).await;
    push(&fleet, "2.0.0", true).await;
    let report = fleet.dir.join("sim-report.json");
    let stderr = std::fs::File::create(fleet.dir.join("sim.log")).unwrap();
    let mut sim = SimProcess(Some(
        fleet
            .command()
            .args(["sim", "--agents", &AGENTS.to_string(), "--version", "1.0.0"])
            .args(["--labels", "rack=r{i%10}", "--task-latency", "300ms"])
            .arg("--join-token-file")
            .arg(&join)
            .arg("--report")
            .arg(&report)
            .args(["--report-every", "200ms", "--quiet"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    ));
    wait_connected(&report, AGENTS, "every virtual agent to connect").await;
    let api = fleet.api().unwrap();
    wait_long("the control plane to see every node online", || {
        let api = api.clone();
        async move {
            let nodes: Vec<rollwave_api::NodeView> = api.get("/v1/nodes").await.ok()?;
            (nodes.iter().filter(|n| n.online).count() == AGENTS).then_some(())
        }
    })
    .await;
    let rack = nodes(&fleet)
        .await
        .into_iter()
        .find(|n| n.name == "sim-17")
        .map(|n| n.labels["rack"].clone());
    assert_eq!(rack.as_deref(), Some("r7"));

    let r = start(&fleet, "2.0.0", |s| {
        s.batch = Some("10%".into());
        s.min_healthy_time = Some("0s".into());
        s.healthy_deadline = Some("2m".into());
        s.progress_deadline = Some("10m".into());
    })
    .await
    .unwrap();
    // Killed with a wave done and the next one in flight.
    let id = r.id;
    wait_long("some nodes upgraded and others in flight", || {
        let api = api.clone();
        async move {
            let r = get(&api, id).await.ok()?;
            let upgraded = r.count(NodeState::Upgraded);
            (upgraded > 0 && upgraded < AGENTS && r.in_flight().count() > 0).then_some(())
        }
    })
    .await;
    fleet.kill_server();
    fleet.restart_server().await.unwrap();

    let r = wait_long("the rollout to end", || {
        let api = api.clone();
        async move { get(&api, id).await.ok().filter(|r| !r.is_active()) }
    })
    .await;
    assert_eq!(r.state, RolloutState::Completed, "{:?}", r.reason);
    assert!(r.fully_upgraded());
    let on = versions(&fleet).await;
    assert_eq!(on.len(), AGENTS);
    for (name, v) in on {
        assert_eq!(v.as_deref(), Some("2.0.0"), "{name}");
    }

    let status = sim.stop().await;
    assert!(status.success(), "{status}");
    // Written last, at SIGTERM.
    let report = read_report(&report).unwrap();
    assert_eq!(report["enrolled"], AGENTS);
    assert_eq!(report["versions"], serde_json::json!({ "2.0.0": AGENTS }));
    assert_eq!(report["nodes_switched_more_than_once"], 0, "{report:#}");
    assert_eq!(report["nodes_switched_to_a_version_twice"], 0);
    assert_eq!(report["switches"], AGENTS);
    for i in 1..=AGENTS {
        let node = &report["nodes"][format!("sim-{i}")];
        assert_eq!(
            node["switched_to"],
            serde_json::json!({ "2.0.0": 1 }),
            "sim-{i}"
        );
    }
    // Every session dropped with the control plane and was opened again.
    assert!(report["sessions_opened"].as_u64().unwrap() >= 2 * AGENTS as u64);
    assert_eq!(report["tasks"]["upgrade"]["failed"], 0);
}

/// Runs the sim with `args` against `server`; it must end on its own.
async fn sim_output(server: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(exe());
    cmd.args(["--server", server, "sim"]).args(args);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
    // Only a guard against a hang: "at once" is one attempt, no retries.
    match tokio::time::timeout(Duration::from_secs(60), waiting).await {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("rollwave sim {args:?} did not end on its own");
        }
    }
}

fn assert_one_line(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(
        stderr.contains(needle),
        "{stderr:?} should mention {needle:?}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sim_fails_at_once_with_one_line() {
    let fleet = Fleet::launch(FleetSpec::new(exe().into(), 0))
        .await
        .unwrap();
    let join = write_join_token(&fleet, "sim-join").await;
    let join = join.to_str().unwrap();
    let bogus = fleet.dir.join("bogus.token");
    std::fs::write(&bogus, "rw_0123456789ab_not-a-secret\n").unwrap();
    let viewer = fleet
        .create_token("not-a-join-token", Role::Viewer, None)
        .await
        .unwrap();
    let viewer_file = fleet.dir.join("viewer.token");
    std::fs::write(&viewer_file, viewer.token).unwrap();

    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("http://127.0.0.1:{port}");
    let agents = ["--agents", "5", "--join-token-file"];
    let out = sim_output(&nowhere, &[&agents[..], &[join]].concat()).await;
    assert_one_line(
        &out,
        1,
        &format!("cannot reach the control plane at {nowhere}"),
    );

    let url = fleet.url();
    let out = sim_output(&url, &[&agents[..], &[bogus.to_str().unwrap()]].concat()).await;
    assert_one_line(
        &out,
        1,
        "the control plane refused to enroll node sim-1 (401 Unauthorized)",
    );
    let out = sim_output(
        &url,
        &[&agents[..], &[viewer_file.to_str().unwrap()]].concat(),
    )
    .await;
    assert_one_line(
        &out,
        1,
        "the control plane refused to enroll node sim-1 (403 Forbidden)",
    );
    // Nothing was enrolled.
    assert!(nodes(&fleet).await.is_empty());

    let bad = |flag: &'static str, value: &'static str| {
        let mut args = agents.to_vec();
        args.extend([join, flag, value]);
        args
    };
    let out = sim_output(&url, &bad("--fail-rate", "1.5")).await;
    assert_one_line(
        &out,
        2,
        "--fail-rate: \"1.5\" is not a probability between 0 and 1",
    );
    let out = sim_output(&url, &bad("--labels", "rack=r{i%0}")).await;
    assert_one_line(&out, 2, "--labels: \"r{i%0}\": in {i%0}, K must be");
    let out = sim_output(&url, &bad("--task-latency", "soon")).await;
    assert_one_line(&out, 2, "--task-latency: \"soon\" is not a duration");
    let out = sim_output(&url, &bad("--version", "two")).await;
    assert_one_line(&out, 2, "--version: \"two\" is not a semantic version");
    let out = sim_output(
        &url,
        &["--agents", "5", "--join-token-file", "/nonexistent"],
    )
    .await;
    assert_one_line(&out, 2, "--join-token-file: reading /nonexistent");
}
