//! What a release may take from a node's disk and the control plane's:
//! `max_release_size` and `min_free_disk` on agents, a bounded manifest scan
//! at push, and releases of failed upgrades removed.

use std::path::Path;

use rollwave::demo_service::{tarball_with, DemoRelease};
use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_api::{PushResponse, RolloutFile};
use rollwave_core::{HooksFile, NodeState, RolloutState, StrategyFile, MANIFEST_SCAN_BYTES};

use crate::harness::*;

/// Names in a node's releases directory of `api`, sorted.
fn releases_dir(state_dir: &Path) -> Vec<String> {
    let dir = state_dir.join("services").join(SERVICE).join("releases");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn demo(version: &str) -> DemoRelease {
    DemoRelease {
        version: version.into(),
        healthy: true,
        broken_on: Vec::new(),
        error_rate: 0.0,
    }
}

async fn push_bytes(fleet: &Fleet, version: &str, bytes: Vec<u8>) -> PushResponse {
    fleet
        .api()
        .unwrap()
        .post_bytes(&format!("/v1/releases/{SERVICE}/{version}"), bytes)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_over_max_release_size_is_refused_and_leaves_nothing_behind() {
    let fleet = installed(FleetSpec {
        agent_settings: vec!["max_release_size = \"1MiB\"".into()],
        ..FleetSpec::new(exe().into(), 1)
    })
    .await;
    // A few kilobytes that inflate to 2 MiB.
    let zeros = "\0".repeat(2 << 20);
    let bytes = tarball_with(&demo("2.0.0"), &[("zeros", &zeros, 0o644)]).unwrap();
    assert!(bytes.len() < 64 << 10, "{}", bytes.len());
    push_bytes(&fleet, "2.0.0", bytes).await;

    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert_ne!(r.state, RolloutState::Completed, "{r:#?}");
    let node = &r.nodes["node-1"];
    assert_eq!(node.state, NodeState::Failed, "{r:#?}");
    let reason = node.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains(
            "release 2.0.0 not installed: release unpacks to more than max_release_size (1 MiB)"
        ),
        "{reason}"
    );
    // Neither the release, nor its marker, nor a temporary file or directory.
    assert_eq!(
        releases_dir(&fleet.nodes[0].state_dir),
        ["1.0.0", "1.0.0.sha256"]
    );
    assert_fleet_on(&fleet, "1.0.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_free_space_margin_refuses_to_stage() {
    let fleet = Fleet::launch(FleetSpec {
        agent_settings: vec!["min_free_disk = \"1000000TiB\"".into()],
        ..FleetSpec::new(exe().into(), 1)
    })
    .await
    .unwrap();
    push(&fleet, "1.0.0", true).await;
    let r = start(&fleet, "1.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;
    let reason = r.nodes["node-1"].reason.as_deref().unwrap_or_default();
    let releases = fleet.nodes[0]
        .state_dir
        .join("services")
        .join(SERVICE)
        .join("releases");
    assert!(
        reason.contains(&format!(
            "release 1.0.0 not installed: not enough free disk space on {}: need ",
            releases.display()
        )),
        "{reason}"
    );
    assert!(reason.contains(", have "), "{reason}");
    assert!(releases_dir(&fleet.nodes[0].state_dir).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_of_an_upgrade_that_failed_before_its_switch_is_removed() {
    let fleet = installed_with_hooks(1, &[("refuse", "exit 1")]).await;
    push(&fleet, "2.0.0", true).await;
    let spec = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some("2.0.0".into()),
        hooks: Some(HooksFile {
            pre_node: vec![node_hook("refuse")],
            ..Default::default()
        }),
        strategy: StrategyFile {
            min_healthy_time: Some("0s".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = start_file(&fleet, spec).await.unwrap().remove(0);
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.nodes["node-1"].state, NodeState::Failed, "{r:#?}");
    assert_eq!(
        releases_dir(&fleet.nodes[0].state_dir),
        ["1.0.0", "1.0.0.sha256"]
    );
    assert_fleet_on(&fleet, "1.0.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_does_not_read_past_the_manifest_scan_and_agents_agree() {
    let fleet = installed_fleet(1).await;
    // Inflates past the scan's bound before its rollwave.toml, which is not
    // even valid: had the control plane read it, the push would be refused.
    let filler = "\0".repeat(MANIFEST_SCAN_BYTES as usize + (1 << 20));
    let bytes = tarball_with(
        &demo("2.0.0"),
        &[
            ("filler", &filler, 0o644),
            ("rollwave.toml", "not a manifest = [", 0o644),
        ],
    )
    .unwrap();
    assert!(bytes.len() < 1 << 20, "{}", bytes.len());
    let pushed = push_bytes(&fleet, "2.0.0", bytes).await;
    assert!(pushed.created);
    assert_eq!(pushed.release.manifest, None);

    // Within the bound, the same manifest is read and refused.
    let bytes = tarball_with(
        &demo("2.0.1"),
        &[("rollwave.toml", "not a manifest = [", 0o644)],
    )
    .unwrap();
    let refused = fleet
        .api()
        .unwrap()
        .post_bytes::<PushResponse>(&format!("/v1/releases/{SERVICE}/2.0.1"), bytes)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("rollwave.toml"), "{refused}");

    // A node never runs a manifest the control plane did not see.
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;
    let reason = r.nodes["node-1"].reason.as_deref().unwrap_or_default();
    assert!(
        reason
            .contains("rollwave.toml must be among the archive's first 10000 entries and 64.0 MiB"),
        "{reason}"
    );
    assert_eq!(
        releases_dir(&fleet.nodes[0].state_dir),
        ["1.0.0", "1.0.0.sha256"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_keep_the_current_the_previous_and_keep_releases_others() {
    let fleet = installed(FleetSpec {
        agent_settings: vec!["keep_releases = 1".into()],
        ..FleetSpec::new(exe().into(), 1)
    })
    .await;
    for version in ["2.0.0", "3.0.0", "4.0.0", "5.0.0"] {
        push(&fleet, version, true).await;
        let r = start(&fleet, version, |s| s.min_healthy_time = Some("0s".into()))
            .await
            .unwrap();
        let r = wait_done(&fleet, r.id).await;
        assert!(r.fully_upgraded(), "{r:#?}");
    }
    // 5.0.0 runs, 4.0.0 ran before it, and one more is kept.
    assert_eq!(
        releases_dir(&fleet.nodes[0].state_dir),
        [
            "3.0.0",
            "3.0.0.sha256",
            "4.0.0",
            "4.0.0.sha256",
            "5.0.0",
            "5.0.0.sha256"
        ]
    );
}
