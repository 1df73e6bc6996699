//! Rollouts on a healthy fleet: rolling batches, a bad release rolled back,
//! and the operator's controls.

use rollwave_core::{NodeState, RolloutState};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn rolling_upgrade_moves_every_node_once_in_batches() {
    let fleet = installed_fleet(4).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| s.batch = Some("2".into()))
        .await
        .unwrap();
    assert_eq!(r.batches.len(), 2);
    assert!(r.batches.iter().all(|b| b.len() == 2));
    // Watched as a script sees it (stdout is not a terminal): plain lines.
    let mut watch = fleet.command();
    watch.args(["rollout", "status", &r.id.to_string(), "--watch"]);
    let watched = tokio::task::spawn_blocking(move || watch.output().unwrap());
    let r = wait_done(&fleet, r.id).await;
    let out = watched.await.unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let progress: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("progress: "))
        .collect();
    assert_eq!(
        progress.last(),
        Some(&"completed 4/4 done: 4 upgraded"),
        "{text}"
    );
    let done = |l: &str| -> usize {
        l.split(' ')
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        progress.windows(2).all(|w| done(w[0]) <= done(w[1])),
        "{text}"
    );
    assert!(text.contains("upgraded to 2.0.0 in "), "{text}");
    assert!(text.contains(&format!("rollout {}: ", r.id)), "{text}");
    assert_eq!(r.state, RolloutState::Completed, "{r:#?}");
    assert!(r.fully_upgraded());

    assert_fleet_on(&fleet, "2.0.0").await;
    for node in &fleet.nodes {
        let to_new = switches_to(&node.state_dir, "2.0.0");
        assert_eq!(to_new, 1, "{} switched to 2.0.0 {to_new} times", node.name);
    }
    // Batch 2 started only after batch 1 finished.
    let finished_first: u64 = r.batches[0]
        .iter()
        .map(|n| r.nodes[n].updated_at)
        .max()
        .unwrap();
    for n in &r.batches[1] {
        let started = r.nodes[n].task.as_ref().unwrap().started_at;
        assert!(
            started >= finished_first,
            "{n} started before batch 1 ended"
        );
    }

    // The CLI agrees, and --wait exits 0 for a fully upgraded fleet.
    let out = cli(&fleet, &["rollout", "status", &r.id.to_string(), "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&fleet, &["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches("2.0.0").count() >= 4, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_release_is_rolled_back_everywhere() {
    let fleet = installed_fleet(4).await;
    push(&fleet, "2.0.0", false).await;
    let r = start(&fleet, "2.0.0", |s| {
        s.batch = Some("2".into());
        s.healthy_deadline = Some("3s".into());
    })
    .await
    .unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    let failed: Vec<_> = r
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Failed)
        .collect();
    assert!(!failed.is_empty());
    for n in failed {
        let reason = n.reason.as_deref().unwrap();
        // The reason names the check and its last output.
        assert!(reason.contains("http 503"), "{reason}");
        // A handoff never stopped the old version: nothing to roll back.
        assert!(reason.contains("the node stayed on 1.0.0"), "{reason}");
    }
    // No node of the second batch was touched.
    for n in &r.batches[1] {
        assert_eq!(r.nodes[n].state, NodeState::Pending);
    }
    assert_fleet_on(&fleet, "1.0.0").await;
    let out = cli(&fleet, &["rollout", "status", &r.id.to_string(), "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a rolled-back rollout must not exit 0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_beyond_max_failures_roll_back_nodes_already_upgraded() {
    // 2.0.0 is healthy on node-1 and node-2 but broken on node-3 and node-4.
    let fleet = installed_fleet(4).await;
    push_broken_on(&fleet, "2.0.0", &["node-3", "node-4"]).await;
    let r = start(&fleet, "2.0.0", |s| {
        s.batch = Some("1".into());
        s.max_failures = Some(1);
        s.healthy_deadline = Some("3s".into());
    })
    .await
    .unwrap();
    // Batches are in name order on a healthy fleet.
    assert_eq!(r.batches.concat(), ["node-1", "node-2", "node-3", "node-4"]);
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    assert_eq!(r.nodes["node-1"].state, NodeState::RolledBack);
    assert_eq!(r.nodes["node-2"].state, NodeState::RolledBack);
    assert_eq!(r.nodes["node-3"].state, NodeState::Failed);
    assert_eq!(r.nodes["node-4"].state, NodeState::Failed);
    assert!(
        r.reason.as_deref().unwrap().contains("max_failures = 1"),
        "{r:#?}"
    );
    assert_fleet_on(&fleet, "1.0.0").await;
    let history = switches(&fleet.nodes[0].state_dir);
    assert_eq!(
        history[history.len() - 2..],
        [
            ("1.0.0".into(), "2.0.0".into()),
            ("2.0.0".into(), "1.0.0".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_rollback_returns_upgraded_nodes() {
    let fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;
    let good = start(&fleet, "2.0.0", |s| s.batch = Some("1".into()))
        .await
        .unwrap();
    wait_rollout(&fleet, good.id, "one node upgraded", |r| {
        r.count(NodeState::Upgraded) >= 1
    })
    .await;
    let api = fleet.api().unwrap();
    let _: rollwave_api::RolloutResponse = api
        .post(
            &format!("/v1/rollouts/{}/rollback", good.id),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    let r = wait_done(&fleet, good.id).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    assert_eq!(r.count(NodeState::Upgraded), 0);
    assert!(r.count(NodeState::RolledBack) >= 1, "{r:#?}");
    assert_fleet_on(&fleet, "1.0.0").await;
    // Rolling back a finished rollout again changes nothing and is not an error.
    let again: rollwave_api::RolloutResponse = api
        .post(
            &format!("/v1/rollouts/{}/rollback", good.id),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_eq!(again.rollout.state, RolloutState::RolledBack);
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_holds_the_rollout_and_resume_finishes_it() {
    let fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| s.min_healthy_time = Some("1s".into()))
        .await
        .unwrap();
    let api = fleet.api().unwrap();
    let paused: rollwave_api::RolloutResponse = api
        .post(
            &format!("/v1/rollouts/{}/pause", r.id),
            &serde_json::json!({}),
        )
        .await
        .unwrap();
    assert_eq!(paused.rollout.state, RolloutState::Paused);
    // The node in flight finishes; nothing new starts while paused.
    let r = wait_rollout(&fleet, r.id, "in-flight node to finish", |r| {
        r.in_flight().count() == 0
    })
    .await;
    assert_eq!(r.state, RolloutState::Paused);
    let started = r.nodes.values().filter(|n| n.task.is_some()).count();
    assert_eq!(started, 1, "{r:#?}");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let still = get(&api, r.id).await.unwrap();
    assert_eq!(still.state, RolloutState::Paused);
    assert_eq!(still.nodes.values().filter(|n| n.task.is_some()).count(), 1);

    let out = cli(&fleet, &["rollout", "resume", &r.id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_the_rollout_and_keeps_upgraded_nodes() {
    let fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| s.min_healthy_time = Some("1s".into()))
        .await
        .unwrap();
    wait_rollout(&fleet, r.id, "first node upgraded", |r| {
        r.count(NodeState::Upgraded) == 1
    })
    .await;
    let out = cli(&fleet, &["rollout", "cancel", &r.id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.state, RolloutState::Cancelled);
    let upgraded = r.count(NodeState::Upgraded);
    assert!((1..=2).contains(&upgraded), "{r:#?}");
    assert_eq!(r.count(NodeState::Pending), 3 - upgraded);
    let on_new = versions(&fleet)
        .await
        .into_iter()
        .filter(|(_, v)| v.as_deref() == Some("2.0.0"))
        .count();
    assert_eq!(on_new, upgraded);
    // A cancelled rollout cannot be resumed.
    let out = cli(&fleet, &["rollout", "resume", &r.id.to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
}
