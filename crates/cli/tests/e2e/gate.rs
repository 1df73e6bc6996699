//! The version gate with real agents and services: finalize waits for every
//! node, reaches every service, and stops downgrades below it.

use rollwave_api::RolloutFile;
use rollwave_core::{Rollout, RolloutState, StrategyFile};

use crate::harness::*;

/// A rolling rollout of `version` on `nodes` (all nodes if empty).
async fn roll(
    fleet: &rollwave::fleet::Fleet,
    version: &str,
    nodes: &[&str],
) -> anyhow::Result<Rollout> {
    roll_with(fleet, version, nodes, |_| {}).await
}

async fn roll_with(
    fleet: &rollwave::fleet::Fleet,
    version: &str,
    nodes: &[&str],
    f: impl FnOnce(&mut RolloutFile),
) -> anyhow::Result<Rollout> {
    let mut spec = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some(version.into()),
        nodes: (!nodes.is_empty()).then(|| nodes.iter().map(|n| n.to_string()).collect()),
        strategy: StrategyFile {
            batch: Some("100%".into()),
            min_healthy_time: Some("300ms".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    f(&mut spec);
    let r = start_file(fleet, spec).await?.remove(0);
    let r = wait_done(fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    Ok(r)
}

#[tokio::test(flavor = "multi_thread")]
async fn finalize_waits_for_every_node_then_reaches_every_service() {
    let fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;
    roll(&fleet, "2.0.0", &["node-1", "node-2"]).await.unwrap();

    // Refused while node-3 runs the old binary, naming it.
    let out = cli(&fleet, &["finalize", "api"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node-3 runs 1.0.0"), "{err}");

    // Before any finalize, going back down is allowed, when said so.
    let err = roll(&fleet, "1.0.0", &["node-2"])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("older than what nodes run (node-2 runs 2.0.0)")
            && err.contains("--downgrade"),
        "{err}"
    );
    roll_with(&fleet, "1.0.0", &["node-2"], |f| f.downgrade = Some(true))
        .await
        .unwrap();
    let up = roll(&fleet, "2.0.0", &["node-2", "node-3"]).await.unwrap();

    let out = cli(&fleet, &["finalize", "api"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "api: active version 2.0.0 (was none)");
    let out = cli(&fleet, &["finalize", "api", "--to", "2.0.0"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "api: active version is already 2.0.0"
    );

    // Every service sees it: through the file the agent keeps for it.
    for node in &fleet.nodes {
        let url = format!("http://127.0.0.1:{}/active-version", node.port);
        wait_until(
            &format!("{} to see active version 2.0.0", node.name),
            || {
                let url = url.clone();
                async move {
                    let body = reqwest::get(&url).await.ok()?.text().await.ok()?;
                    (body.trim() == "2.0.0").then_some(())
                }
            },
        )
        .await;
        let file = node.state_dir.join("services/api/active_version");
        assert_eq!(std::fs::read_to_string(file).unwrap(), "2.0.0\n");
    }
    let out = cli(&fleet, &["services"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2.0.0 on 3"), "{text}");

    // Now the data may use 2.0.0's format: no way back below it, neither by
    // a new rollout nor by rolling the last one back.
    let err = roll_with(&fleet, "1.0.0", &["node-1"], |f| f.downgrade = Some(true))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("the active version of api is 2.0.0"), "{err}");
    let out = cli(&fleet, &["rollout", "rollback", &up.id.to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be rolled back"), "{err}");
    let r = get(&fleet.api().unwrap(), up.id).await.unwrap();
    assert_eq!(r.state, RolloutState::Completed);
    assert_fleet_on(&fleet, "2.0.0").await;

    // The execution log of that rollout, for one node.
    let out = cli(&fleet, &["logs", &up.id.to_string(), "--node", "node-2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in ["upgrade to 2.0.0 started", "switching", "upgraded to 2.0.0"] {
        assert!(
            text.lines()
                .any(|l| l.contains("node-2") && l.contains(step)),
            "{step}: {text}"
        );
    }
    assert!(!text.contains("node-3"), "{text}");
    let out = cli(&fleet, &["logs", &up.id.to_string(), "--node", "node-9"]);
    assert_eq!(out.status.code(), Some(2));

    // A rollout with auto_finalize moves the gate itself once every node
    // runs its version.
    push(&fleet, "3.0.0", true).await;
    let r = roll_with(&fleet, "3.0.0", &[], |f| {
        f.strategy.auto_finalize = Some(true)
    })
    .await
    .unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(
        r.finalized.as_deref(),
        Some("finalized: the active version of api is 3.0.0")
    );
    for node in &fleet.nodes {
        let url = format!("http://127.0.0.1:{}/active-version", node.port);
        wait_until(
            &format!("{} to see active version 3.0.0", node.name),
            || {
                let url = url.clone();
                async move {
                    let body = reqwest::get(&url).await.ok()?.text().await.ok()?;
                    (body.trim() == "3.0.0").then_some(())
                }
            },
        )
        .await;
    }
}
