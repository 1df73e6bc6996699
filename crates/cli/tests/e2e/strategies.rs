//! Strategies with real agents: a canary held for a manual promotion, a
//! quorum floor with a node already down, the dry-run plan, staging ahead and
//! a dependency between two services.

use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_api::NodeView;
use rollwave_api::RolloutFile;
use rollwave_core::{Health, NodeState, Rollout, RolloutState, StrategyFile};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn canary_waits_for_promotion_after_its_first_wave() {
    let fleet = installed_fleet(4).await;
    push(&fleet, "2.0.0", true).await;
    let out = cli(
        &fleet,
        &[
            "rollout",
            "start",
            "api@2.0.0",
            "--waves",
            "1:pause,50%,100%",
            "--min-healthy-time",
            "300ms",
            "--yes",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api = fleet.api().unwrap();
    let id: Vec<rollwave_core::RolloutSummary> = api.get("/v1/rollouts").await.unwrap();
    let id = id[0].id;
    let r = wait_rollout(&fleet, id, "the canary wave to finish", |r| {
        r.waiting.as_deref().is_some_and(|w| w.contains("promote"))
    })
    .await;
    assert_eq!(
        r.batches.iter().map(Vec::len).collect::<Vec<_>>(),
        [1, 1, 2]
    );
    assert_eq!(r.count(NodeState::Upgraded), 1);
    assert_eq!(r.count(NodeState::Pending), 3);
    // The status says why it waits.
    let out = cli(&fleet, &["rollout", "status", &id.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("rollwave rollout promote {id}")),
        "{text}"
    );
    // Nothing moves without the operator.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(get(&api, id).await.unwrap().count(NodeState::Pending), 3);

    let out = cli(&fleet, &["rollout", "promote", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = wait_done(&fleet, id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert_fleet_on(&fleet, "2.0.0").await;
    // Promoting again is refused: nothing waits.
    let out = cli(&fleet, &["rollout", "promote", &id.to_string()]);
    assert_eq!(out.status.code(), Some(2));
}

fn healthy(nodes: &[NodeView]) -> usize {
    nodes
        .iter()
        .filter(|n| {
            n.online
                && n.services
                    .get(SERVICE)
                    .is_some_and(|s| s.health == Health::Healthy)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn min_healthy_holds_while_a_node_is_already_down() {
    // A 3-member quorum; node-3 never got a working 1.0.0, so it is down.
    let fleet = Fleet::launch(FleetSpec::new(exe().into(), 3))
        .await
        .unwrap();
    push_broken_on(&fleet, "1.0.0", &["node-3"]).await;
    let r = start(&fleet, "1.0.0", |s| {
        s.batch = Some("100%".into());
        s.min_healthy_time = Some("0s".into());
        s.healthy_deadline = Some("2s".into());
        s.max_failures = Some(1);
    })
    .await
    .unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.nodes["node-3"].state, NodeState::Failed, "{r:#?}");
    assert_eq!(healthy(&nodes(&fleet).await), 2);

    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| {
        s.batch = Some("1".into());
        s.max_unavailable = Some("3".into());
        s.min_healthy = Some(rollwave_core::CountOrText::Count(2));
    })
    .await
    .unwrap();
    // The node already down goes first: switching it costs nothing.
    assert_eq!(r.batches[0], ["node-3"]);
    let api = fleet.api().unwrap();
    let mut lowest = usize::MAX;
    let r = loop {
        let r = get(&api, r.id).await.unwrap();
        let n = nodes(&fleet).await;
        // Once node-3 serves, the floor of 2 healthy nodes always holds.
        if r.nodes["node-3"].state == NodeState::Upgraded {
            lowest = lowest.min(healthy(&n));
        }
        if !r.is_active() {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(r.fully_upgraded(), "{r:#?}");
    assert!(lowest >= 2, "only {lowest} healthy nodes at one point");
    assert_fleet_on(&fleet, "2.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_shows_waves_and_changes_nothing() {
    let fleet = installed_fleet(6).await;
    push(&fleet, "2.0.0", true).await;
    let out = cli(
        &fleet,
        &[
            "plan",
            "api@2.0.0",
            "--spread-by",
            "rack",
            "--batch",
            "3",
            "--min-healthy",
            "4",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("in 2 waves"), "{text}");
    assert!(text.contains("spread_by rack"), "{text}");
    assert!(text.contains("min_healthy 4"), "{text}");
    assert!(text.contains("estimated duration"), "{text}");
    // Each wave of 3 spans the 3 racks.
    let out = cli(
        &fleet,
        &[
            "plan",
            "api@2.0.0",
            "--spread-by",
            "rack",
            "--batch",
            "3",
            "--json",
        ],
    );
    let plan: rollwave_api::RolloutResponse = serde_json::from_slice(&out.stdout).unwrap();
    assert!(plan.plan_id.is_some());
    for wave in &plan.rollout.batches {
        let mut racks: Vec<_> = wave
            .iter()
            .map(|n| (n.trim_start_matches("node-").parse::<usize>().unwrap() - 1) % 3)
            .collect();
        racks.sort();
        assert_eq!(racks, [0, 1, 2], "{wave:?}");
    }
    // A floor the fleet cannot meet is refused with the reason.
    let out = cli(&fleet, &["plan", "api@2.0.0", "--min-healthy", "6"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("strategy.min_healthy"));
    let out = cli(&fleet, &["plan", "api@2.0.0", "--nodes", "node-1,node-9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node-9"));
    let rollouts: Vec<rollwave_core::RolloutSummary> =
        fleet.api().unwrap().get("/v1/rollouts").await.unwrap();
    assert_eq!(rollouts.len(), 1, "only the install: a plan stores nothing");
    assert_eq!(rollouts[0].state, RolloutState::Completed);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_node_stages_the_release_ahead_of_its_wave() {
    let fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| {
        s.batch = Some("1".into());
        s.min_healthy_time = Some("2s".into());
    })
    .await
    .unwrap();
    let last = r.batches[2][0].clone();
    // While the first wave holds its health gate, the last node already has
    // 2.0.0 downloaded, verified and unpacked, and still runs 1.0.0.
    let api = fleet.api().unwrap();
    let view = wait_until("the last node to stage 2.0.0", || {
        let (api, last) = (api.clone(), last.clone());
        async move {
            let nodes: Vec<NodeView> = api.get("/v1/nodes").await.ok()?;
            let v = nodes.into_iter().find(|n| n.name == last)?;
            let s = v.services.get(SERVICE)?.clone();
            s.staged.contains(&"2.0.0".to_string()).then_some(s)
        }
    })
    .await;
    assert_eq!(view.version.as_deref(), Some("1.0.0"));
    assert_eq!(
        get(&api, r.id).await.unwrap().nodes[&last].state,
        NodeState::Pending
    );
    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    // Its upgrade found the release staged: no download in its wave.
    let downloads = r
        .events
        .iter()
        .filter(|e| e.node.as_deref() == Some(&last) && e.message == "downloading")
        .count();
    assert_eq!(downloads, 0, "{:#?}", r.events);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_starts_only_once_the_one_it_depends_on_completed() {
    let mut spec = FleetSpec::new(exe().into(), 3);
    spec.extra_services = vec!["db".into()];
    let fleet = installed(spec).await;
    push_service(&fleet, "db", "1.0.0").await;
    let install = start_file(
        &fleet,
        RolloutFile {
            service: Some("db".into()),
            version: Some("1.0.0".into()),
            strategy: StrategyFile {
                batch: Some("100%".into()),
                min_healthy_time: Some("0s".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(wait_done(&fleet, install[0].id).await.fully_upgraded());
    push_service(&fleet, "db", "2.0.0").await;
    push(&fleet, "2.0.0", true).await;

    // Listed dependent first: the order comes from depends_on.
    let file = fleet.dir.join("rollout.toml");
    std::fs::write(
        &file,
        r#"
[[services]]
name = "api"
version = "2.0.0"
depends_on = ["db"]

[[services]]
name = "db"
version = "2.0.0"

[strategy]
batch = 1
min_healthy_time = "300ms"
"#,
    )
    .unwrap();
    let path = file.display().to_string();
    let out = cli(
        &fleet,
        &["rollout", "start", "-f", &path, "--yes", "--wait"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("once db completed (depends_on)"), "{text}");

    let summaries: Vec<rollwave_core::RolloutSummary> =
        fleet.api().unwrap().get("/v1/rollouts").await.unwrap();
    let mut rollouts: Vec<Rollout> = Vec::new();
    for s in &summaries {
        let resp: rollwave_api::RolloutResponse = fleet
            .api()
            .unwrap()
            .get(&format!("/v1/rollouts/{}", s.id))
            .await
            .unwrap();
        rollouts.push(resp.rollout);
    }
    let db = rollouts
        .iter()
        .find(|r| r.spec.service == "db" && r.spec.version == "2.0.0");
    let api = rollouts
        .iter()
        .find(|r| r.spec.service == "api" && r.spec.version == "2.0.0");
    let (db, api) = (db.unwrap(), api.unwrap());
    assert!(db.fully_upgraded() && api.fully_upgraded(), "{rollouts:#?}");
    assert_eq!(api.after, [db.id]);
    // No node of api switched before db had completed everywhere.
    let db_done = db.finished_at.unwrap();
    for (name, n) in &api.nodes {
        let started = n.task.as_ref().unwrap().started_at;
        assert!(
            started >= db_done,
            "{name} started at {started}, db done at {db_done}"
        );
    }
    for (name, v) in versions_of(&fleet, "db").await {
        assert_eq!(v.as_deref(), Some("2.0.0"), "{name}");
    }
    assert_fleet_on(&fleet, "2.0.0").await;

    // A cycle is refused before anything starts, naming it.
    std::fs::write(
        &file,
        r#"
[[services]]
name = "api"
version = "2.0.0"
depends_on = ["db"]

[[services]]
name = "db"
version = "2.0.0"
depends_on = ["api"]
"#,
    )
    .unwrap();
    let out = cli(&fleet, &["rollout", "start", "-f", &path, "--yes"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("services: depends_on forms a cycle: api -> db -> api"),
        "{err}"
    );
}

/// The moments upgrade tasks were sent, and the moment the last stage ended.
fn phases(r: &Rollout) -> (Vec<u64>, u64) {
    let starts: Vec<u64> = r
        .events
        .iter()
        .filter(|e| e.message.starts_with("upgrade to"))
        .map(|e| e.at)
        .collect();
    let staged = r
        .events
        .iter()
        .filter(|e| e.message.starts_with("staged"))
        .map(|e| e.at)
        .max()
        .unwrap_or(u64::MAX);
    (starts, staged)
}

#[tokio::test(flavor = "multi_thread")]
async fn all_at_once_stages_everywhere_then_switches_together_or_not_at_all() {
    let fleet = installed_fleet(4).await;
    let all_at_once = |s: &mut StrategyFile| {
        s.kind = Some("all_at_once".into());
        s.batch = None;
        s.healthy_deadline = Some("5s".into());
    };

    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", all_at_once).await.unwrap();
    assert_eq!(r.batches.len(), 1);
    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    let (starts, staged) = phases(&r);
    assert_eq!(starts.len(), 4, "{:#?}", r.events);
    // Every switch was sent in one step, after every node had staged.
    assert!(
        starts.iter().all(|&t| t == starts[0] && t >= staged),
        "{:#?}",
        r.events
    );
    assert_fleet_on(&fleet, "2.0.0").await;

    // node-3 fails its gate on 3.0.0: every node goes back to 2.0.0.
    push_broken_on(&fleet, "3.0.0", &["node-3"]).await;
    let r = start(&fleet, "3.0.0", all_at_once).await.unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    assert_eq!(r.nodes["node-3"].state, NodeState::Failed);
    assert_eq!(r.count(NodeState::RolledBack), 3, "{r:#?}");
    assert!(r.reason.as_deref().unwrap().contains("node-3"), "{r:#?}");
    let (starts, _) = phases(&r);
    assert!(starts.iter().all(|&t| t == starts[0]), "{:#?}", r.events);
    assert_fleet_on(&fleet, "2.0.0").await;
    for node in &fleet.nodes {
        assert_eq!(switches_to(&node.state_dir, "3.0.0"), 1, "{}", node.name);
    }
}
