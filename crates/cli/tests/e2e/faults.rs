//! Faults mid-rollout: the control plane or an agent killed with SIGKILL, an
//! agent gone silent as behind a partition, and artifacts that do not match
//! what was pushed.

use nix::sys::signal::Signal;
use rollwave_core::{NodeState, RolloutState};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_killed_mid_rollout_resumes_where_it_was() {
    let mut fleet = installed_fleet(4).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| s.min_healthy_time = Some("1s".into()))
        .await
        .unwrap();
    // Kill it while the second node is in flight.
    wait_rollout(&fleet, r.id, "second node in flight", |r| {
        r.count(NodeState::Upgraded) == 1 && r.in_flight().count() == 1
    })
    .await;
    fleet.kill_server();
    fleet.restart_server().await.unwrap();
    fleet.wait_online(4).await.unwrap();

    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.state, RolloutState::Completed, "{r:#?}");
    assert!(r.fully_upgraded());
    assert_fleet_on(&fleet, "2.0.0").await;
    for node in &fleet.nodes {
        let to_new = switches_to(&node.state_dir, "2.0.0");
        assert_eq!(to_new, 1, "{} switched to 2.0.0 {to_new} times", node.name);
    }
    // Kill it again after the end: a finished rollout stays finished.
    fleet.kill_server();
    fleet.restart_server().await.unwrap();
    let again = get(&fleet.api().unwrap(), r.id).await.unwrap();
    assert_eq!(again.state, RolloutState::Completed);
    assert_eq!(again.generation, r.generation);
}

/// A deploy script's `rollout start --wait` outlives a control plane
/// restart: it retries, then reports the rollout's real end.
#[tokio::test(flavor = "multi_thread")]
async fn rollout_start_wait_rides_out_a_control_plane_restart() {
    let mut fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;
    let stderr = fleet.dir.join("cli.stderr");
    let mut wait = fleet
        .command()
        .args(["rollout", "start", "api@2.0.0", "--batch", "1"])
        .args(["--min-healthy-time", "1s", "--yes", "--wait"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let api = fleet.api().unwrap();
    // Rollout 1 installed 1.0.0.
    wait_until("the first node upgraded", || {
        let api = api.clone();
        async move {
            let r = get(&api, 2).await.ok()?;
            (r.count(NodeState::Upgraded) >= 1).then_some(())
        }
    })
    .await;
    fleet.kill_server();
    let read = || std::fs::read_to_string(&stderr).unwrap_or_default();
    wait_until("the CLI to notice", || {
        let noticed = read().contains("retrying for up to 2m");
        async move { noticed.then_some(()) }
    })
    .await;
    fleet.restart_server().await.unwrap();
    let status = tokio::task::spawn_blocking(move || wait.wait().unwrap())
        .await
        .unwrap();
    let text = read();
    assert!(status.success(), "{status}: {text}");
    assert!(text.contains("the control plane answers again"), "{text}");
    assert_fleet_on(&fleet, "2.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_task_resumes_it_without_switching_twice() {
    let mut fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| s.min_healthy_time = Some("2s".into()))
        .await
        .unwrap();
    let first = r.batches[0][0].clone();
    let i = fleet.nodes.iter().position(|n| n.name == first).unwrap();
    // Kill the agent while its node holds the health gate on 2.0.0.
    wait_rollout(&fleet, r.id, "first node gating", |r| {
        r.nodes[&first].phase.as_deref() == Some("gating")
    })
    .await;
    fleet.kill_agent(i);
    // Its service keeps serving while the agent is gone.
    assert_eq!(
        served_version(fleet.nodes[i].port).await.as_deref(),
        Some("2.0.0")
    );
    fleet.start_agent(i).unwrap();

    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    let to_new = switches_to(&fleet.nodes[i].state_dir, "2.0.0");
    assert_eq!(to_new, 1);
    // The re-adopted service was not restarted: one process served throughout.
    let log = std::fs::read_to_string(fleet.nodes[i].state_dir.join("agent.log")).unwrap();
    let (_, after) = log
        .split_once("re-adopted running service")
        .unwrap_or_else(|| panic!("no re-adoption in:\n{log}"));
    assert!(
        !after.contains("service started") && !after.contains("candidate started"),
        "started again after re-adoption:\n{log}"
    );
}

/// An agent killed mid-switch starts the new version again when it comes
/// back (the switch is idempotent), and says so in its log and the node's
/// lines of the rollout's execution log.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_switch_says_it_starts_the_new_version_again() {
    let mut fleet = installed_fleet(2).await;
    // Never healthy: the handoff's candidate stays on trial until the
    // health deadline, which leaves time to kill the agent mid-switch.
    push(&fleet, "2.0.0", false).await;
    let r = start(&fleet, "2.0.0", |s| {
        s.healthy_deadline = Some("4s".into());
    })
    .await
    .unwrap();
    let first = r.batches[0][0].clone();
    let i = fleet.nodes.iter().position(|n| n.name == first).unwrap();
    let current = fleet.nodes[i].state_dir.join("services/api/current");
    wait_until("the first node's current link to point at 2.0.0", || {
        let switched =
            std::fs::read_link(&current).is_ok_and(|t| t.file_name().is_some_and(|n| n == "2.0.0"));
        async move { switched.then_some(()) }
    })
    .await;
    fleet.kill_agent(i);
    fleet.start_agent(i).unwrap();

    let r = wait_done(&fleet, r.id).await;
    let line = "resuming the switch to 2.0.0 interrupted by an agent restart: starting it again";
    assert!(
        r.events
            .iter()
            .any(|e| e.node.as_deref() == Some(first.as_str()) && e.message == line),
        "{:#?}",
        r.events
    );
    let log = std::fs::read_to_string(fleet.nodes[i].state_dir.join("agent.log")).unwrap();
    assert!(log.contains(line), "{log}");
    // Only the restarted node's switch was cut short.
    let other = &fleet.nodes[1 - i].name;
    assert!(!r
        .events
        .iter()
        .any(|e| e.node.as_deref() == Some(other.as_str())
            && e.message.contains("interrupted by an agent restart")));
}

/// A stopped agent keeps its connection open and answers nothing, as one
/// cut off by a partition would: no FIN, no RST, only silence.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_silent_mid_task_is_unreachable_not_failed_and_converges_once_back() {
    let fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| {
        s.batch = Some("1".into());
        s.max_unavailable = Some("1".into());
        s.min_healthy_time = Some("2s".into());
        s.healthy_deadline = Some("5s".into());
    })
    .await
    .unwrap();
    let first = r.batches[0][0].clone();
    let i = fleet.nodes.iter().position(|n| n.name == first).unwrap();
    wait_rollout(&fleet, r.id, "first node gating", |r| {
        r.nodes[&first].phase.as_deref() == Some("gating")
    })
    .await;
    fleet.signal_agent(i, Signal::SIGSTOP);
    let silent_since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;

    let r = wait_rollout(&fleet, r.id, "the silent node given up", |r| {
        r.nodes[&first].state != NodeState::Upgrading
    })
    .await;
    let node = &r.nodes[&first];
    assert_eq!(node.state, NodeState::Unreachable, "{r:#?}");
    let reason = node.reason.as_deref().unwrap();
    assert!(reason.contains("outcome is unknown"), "{reason}");
    assert_eq!(r.count(NodeState::Failed), 0, "{r:#?}");
    // Last seen when it last spoke, not when its silence was noticed.
    let view = nodes(&fleet).await;
    let view = view.iter().find(|n| n.name == first).unwrap();
    assert!(!view.online);
    assert!(
        view.last_seen <= silent_since + 2_000,
        "last seen {} ms after it fell silent",
        view.last_seen.saturating_sub(silent_since)
    );
    // Its service was never touched: still serving the new version.
    assert_eq!(
        served_version(fleet.nodes[i].port).await.as_deref(),
        Some("2.0.0")
    );
    // With max_unavailable 1 spent on it, nothing else starts meanwhile.
    assert_eq!(r.count(NodeState::Pending), 2, "{r:#?}");

    fleet.signal_agent(i, Signal::SIGCONT);
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.state, RolloutState::Completed, "{r:#?}");
    assert!(r.fully_upgraded(), "{r:#?}");
    for node in &fleet.nodes {
        let to_new = switches_to(&node.state_dir, "2.0.0");
        assert_eq!(to_new, 1, "{} switched to 2.0.0 {to_new} times", node.name);
    }
}

/// A frozen control plane keeps every connection open and answers nothing,
/// as a lost host or a partition looks to the agents: they must notice on
/// their own, or they would wait on a dead connection forever.
#[tokio::test(flavor = "multi_thread")]
async fn agents_notice_a_silent_control_plane_and_reconnect_when_it_answers() {
    let fleet = installed_fleet(2).await;
    fleet.signal_server(Signal::SIGSTOP);
    let log = |i: usize| {
        std::fs::read_to_string(fleet.nodes[i].state_dir.join("agent.log")).unwrap_or_default()
    };
    // The open session goes silent, then reconnecting gets no answer.
    for needle in ["the control plane sent nothing for", "no answer within"] {
        wait_until(needle, || {
            let found = (0..2).all(|i| log(i).contains(needle));
            async move { found.then_some(()) }
        })
        .await;
    }
    fleet.signal_server(Signal::SIGCONT);
    fleet.wait_online(2).await.unwrap();
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_artifact_is_refused_and_nothing_is_installed() {
    let fleet = installed_fleet(3).await;
    let pushed = push(&fleet, "2.0.0", true).await;
    // Corrupt the stored blob behind the control plane's back: same size,
    // different content.
    let blob = fleet
        .dir
        .join("server-data/blobs")
        .join(&pushed.release.sha256);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();

    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    let failed = &r.nodes[&r.batches[0][0]];
    assert_eq!(failed.state, NodeState::Failed);
    let reason = failed.reason.as_deref().unwrap();
    assert!(reason.contains("sha256"), "{reason}");
    assert!(reason.contains("not installed"), "{reason}");
    for node in &fleet.nodes {
        let release = node
            .state_dir
            .join("services")
            .join(SERVICE)
            .join("releases/2.0.0");
        assert!(!release.exists(), "{} has {}", node.name, release.display());
    }
    assert_fleet_on(&fleet, "1.0.0").await;

    // A truncated artifact is refused the same way.
    std::fs::write(&blob, &bytes[..bytes.len() / 2]).unwrap();
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;
    let reason = r.nodes[&r.batches[0][0]].reason.clone().unwrap();
    assert!(
        reason.contains("truncated") || reason.contains("bytes"),
        "{reason}"
    );
    assert_fleet_on(&fleet, "1.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_node_is_skipped_then_converges_when_it_returns() {
    let mut fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;
    // node-3's agent and service are gone before the rollout starts.
    fleet.kill_agent(2);
    rollwave::fleet::kill_services(&fleet.nodes[2].state_dir);
    let api = fleet.api().unwrap();
    wait_until("node-3 offline", || {
        let api = api.clone();
        async move {
            let nodes: Vec<rollwave_api::NodeView> = api.get("/v1/nodes").await.ok()?;
            nodes
                .iter()
                .any(|n| n.name == "node-3" && !n.online)
                .then_some(())
        }
    })
    .await;
    let r = start(&fleet, "2.0.0", |s| {
        s.batch = Some("1".into());
        s.max_unavailable = Some("2".into());
        s.healthy_deadline = Some("2s".into());
    })
    .await
    .unwrap();
    // Offline nodes go last and are reported before anything starts.
    assert_eq!(r.batches.last().unwrap(), &["node-3".to_string()]);
    assert!(
        r.events
            .iter()
            .any(|e| e.message.contains("node-3 (offline)")),
        "{:#?}",
        r.events
    );
    let r = wait_rollout(&fleet, r.id, "the rollout to complete", |r| {
        r.state == RolloutState::Completed
    })
    .await;
    assert_eq!(r.nodes["node-3"].state, NodeState::Unreachable, "{r:#?}");
    assert!(r.nodes["node-3"]
        .reason
        .as_deref()
        .unwrap()
        .contains("offline"));
    assert_eq!(r.count(NodeState::Failed), 0);
    assert!(!r.fully_upgraded());
    // The fleet's desired version is known for the node left behind.
    let view = nodes(&fleet).await;
    let behind = view.iter().find(|n| n.name == "node-3").unwrap();
    assert_eq!(behind.services[SERVICE].desired.as_deref(), Some("2.0.0"));
    let out = cli(&fleet, &["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("node-3")).unwrap();
    assert!(line.contains("behind: 2.0.0"), "{text}");

    // Back online, it converges: switched under the rollout's gate, once.
    fleet.start_agent(2).unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.state, RolloutState::Completed);
    assert!(r.fully_upgraded(), "{r:#?}");
    assert!(
        r.events
            .iter()
            .any(|e| e.node.as_deref() == Some("node-3") && e.message.contains("converg")),
        "{:#?}",
        r.events
    );
    assert_fleet_on(&fleet, "2.0.0").await;
    assert_eq!(switches_to(&fleet.nodes[2].state_dir, "2.0.0"), 1);
}

/// Alive and not a zombie (PID 1 may not reap orphans here).
fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.split_whitespace().next() != Some("Z"))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_a_fleet_kills_every_process_it_started() {
    let fleet = installed_fleet(2).await;
    let mut pids = Vec::new();
    for node in &fleet.nodes {
        let rec = std::fs::read(node.state_dir.join("services/api/process.json")).unwrap();
        let rec: serde_json::Value = serde_json::from_slice(&rec).unwrap();
        pids.push(rec[0]["pid"].as_i64().unwrap());
    }
    let dir = fleet.dir.clone();
    assert!(pids.iter().all(|p| alive(*p)));
    drop(fleet);
    for pid in pids {
        assert!(!alive(pid), "service {pid} outlived its fleet");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}
