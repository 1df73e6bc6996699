//! Backups with real agents: a migration that fails on one node rolls the
//! fleet back, every node's data comes back byte for byte and verified, and
//! `rollwave backups` lists what each node holds.

use std::path::Path;
use std::process::Command;

use rollwave_api::RolloutFile;
use rollwave_core::{BackupInfo, HooksFile, RolloutState, StrategyFile};

use crate::harness::*;

/// The file's sha256, by the system's own tool rather than the code under test.
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_migration_restores_every_nodes_data_verified() {
    // The node's hook, given its data dir (the service's backup path).
    let migrate = "echo 'schema 2' > \"$ROLLWAVE_DATA_DIR/db.txt\"; \
         test \"$ROLLWAVE_NODE\" != node-2 || { echo 'migration check failed'; exit 1; }";
    let fleet = installed_with_hooks(2, &[("migrate", migrate)]).await;
    push(&fleet, "2.0.0", true).await;
    let mut before = Vec::new();
    for node in &fleet.nodes {
        let file = node.state_dir.join("data").join("db.txt");
        std::fs::write(&file, format!("schema 1 of {}\n", node.name)).unwrap();
        before.push((file.clone(), sha256(&file)));
    }
    let spec = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some("2.0.0".into()),
        hooks: Some(HooksFile {
            post_node: vec![node_hook("migrate")],
            ..Default::default()
        }),
        strategy: StrategyFile {
            batch: Some("1".into()),
            min_healthy_time: Some("300ms".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = start_file(&fleet, spec).await.unwrap().remove(0);
    let r = wait_done(&fleet, r.id).await;

    // node-1 kept its migration until node-2 failed; then both went back.
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    assert_eq!(r.batches[0][0], "node-1", "{r:#?}");
    for node in &fleet.nodes {
        assert_eq!(switches_to(&node.state_dir, "2.0.0"), 1, "{}", node.name);
    }
    for (file, sha) in &before {
        assert_eq!(&sha256(file), sha, "{}", file.display());
    }
    assert_fleet_on(&fleet, "1.0.0").await;
    for node in ["node-1", "node-2"] {
        assert!(
            r.events.iter().any(|e| e.node.as_deref() == Some(node)
                && e.message.contains("restored backup")
                && e.message.contains("1 file")
                && e.message.contains(", verified")),
            "{node}: {:#?}",
            r.events
        );
    }
    let out = cli(&fleet, &["logs", &r.id.to_string(), "--node", "node-1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("verified"), "{text}");

    // Listed as node-1 last reported it: the upgrade's backup, newest first.
    let listed: Vec<BackupInfo> = wait_until("node-1 to report its backup", || {
        let out = cli(&fleet, &["backups", "node-1", "api", "--json"]);
        let listed: Vec<BackupInfo> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let reported = listed.first().is_some_and(|b| b.file_count >= 1);
        async move { reported.then_some(listed) }
    })
    .await;
    let newest = &listed[0];
    assert_eq!(
        (newest.from_version.as_deref(), newest.to_version.as_deref()),
        (Some("1.0.0"), Some("2.0.0")),
        "{listed:#?}"
    );
    assert_eq!(newest.file_count, 1, "{listed:#?}");
    let out = cli(&fleet, &["backups", "node-1", "api"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["TASK", "TAKEN", "FROM", "TO", "FILES", "SIZE"]);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[0], newest.task, "{table}");
    assert_eq!(&row[2..5], ["1.0.0", "2.0.0", "1"], "{table}");

    // Unknown names are user errors that name them.
    let out = cli(&fleet, &["backups", "n9", "api"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("node: \"n9\" is not known to the control plane"),
        "{stderr}"
    );
    let out = cli(&fleet, &["backups", "node-1", "db"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("service: node-1 does not run \"db\""),
        "{stderr}"
    );
}

/// Overwrites every file of a backup but its manifest, keeping sizes, so
/// that its restore fails verification.
fn corrupt_backup(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            corrupt_backup(&path);
        } else if path.file_name().is_some_and(|n| n != "manifest.json") {
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            std::fs::write(&path, vec![b'x'; len]).unwrap();
        }
    }
}

/// A rollback that cannot bring a node back says so: the rollout ends
/// `rollback_failed` naming the node and why, waiting exits non-zero, and
/// `/metrics` counts it.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_that_leaves_a_node_behind_ends_rollback_failed() {
    let fleet = installed_fleet(2).await;
    push(&fleet, "2.0.0", true).await;
    for node in &fleet.nodes {
        let file = node.state_dir.join("data").join("db.txt");
        std::fs::write(&file, format!("data of {}\n", node.name)).unwrap();
    }
    let out = cli(
        &fleet,
        &[
            "rollout",
            "start",
            "api@2.0.0",
            "--waves",
            "1:pause,100%",
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
    let listed: Vec<rollwave_core::RolloutSummary> = api.get("/v1/rollouts").await.unwrap();
    let id = listed[0].id;
    let r = wait_rollout(&fleet, id, "the canary wave to finish", |r| {
        r.waiting.as_deref().is_some_and(|w| w.contains("promote"))
    })
    .await;
    let canary = r.batches[0][0].clone();
    let node = fleet.nodes.iter().find(|n| n.name == canary).unwrap();
    let backup = node
        .state_dir
        .join("services/api/backups")
        .join(r.task_id(&canary, rollwave_core::TaskKind::Upgrade));
    corrupt_backup(&backup);

    let id_text = id.to_string();
    let out = cli(&fleet, &["rollout", "rollback", &id_text, "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("rollback_failed"), "{stdout}");

    let r = get(&api, id).await.unwrap();
    assert_eq!(r.state, RolloutState::RollbackFailed, "{r:#?}");
    let reason = r.reason.as_deref().unwrap();
    assert!(
        reason.starts_with(&format!(
            "1 of 2 nodes not back on their previous version: {canary} (rollback_failed: "
        )),
        "{reason}"
    );
    assert!(reason.contains("not verified"), "{reason}");
    assert!(
        reason.ends_with("the rollback followed: rollback requested by operator"),
        "{reason}"
    );
    let summary: rollwave_core::RolloutSummary = api
        .get(&format!("/v1/rollouts/{id}/summary"))
        .await
        .unwrap();
    assert_eq!(summary.state, RolloutState::RollbackFailed);
    assert_eq!(summary.problems.len(), 1, "{summary:#?}");
    assert_eq!(summary.problems[0].node, canary);

    let out = cli(&fleet, &["rollout", "status", &id_text, "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let text = fleet
        .http()
        .get(format!("{}/metrics", fleet.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines()
            .any(|l| l == "rollwave_rollouts{state=\"rollback_failed\"} 1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "rollwave_rollouts{state=\"rolled_back\"} 0"),
        "{text}"
    );
}

/// A backup path with `restore = "never"` is copied before the switch and
/// kept, but a rollback leaves the data the new version wrote there, and
/// says so; the service's other path is restored as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_path_never_restored_keeps_what_the_new_version_wrote() {
    // The hook writes to both paths, as the new version would, and fails on
    // node-2 so that the rollout rolls node-1 back.
    let migrate = "IFS=:; set -- $ROLLWAVE_DATA_PATHS; \
         echo 'schema 2' > \"$1/db.txt\"; echo 'term 2' > \"$2/term\"; \
         test \"$ROLLWAVE_NODE\" != node-2 || { echo 'migration check failed'; exit 1; }";
    let mut spec = rollwave::fleet::FleetSpec::new(exe().into(), 2);
    spec.hooks = vec![(
        "migrate".into(),
        vec!["sh".into(), "-c".into(), migrate.into()],
    )];
    spec.kept_data = true;
    let fleet = installed(spec).await;
    push(&fleet, "2.0.0", true).await;
    for node in &fleet.nodes {
        std::fs::write(node.state_dir.join("data/db.txt"), "schema 1\n").unwrap();
        std::fs::write(node.state_dir.join("raft/term"), "term 1\n").unwrap();
    }
    let spec = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some("2.0.0".into()),
        hooks: Some(HooksFile {
            post_node: vec![node_hook("migrate")],
            ..Default::default()
        }),
        strategy: StrategyFile {
            batch: Some("1".into()),
            min_healthy_time: Some("300ms".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = start_file(&fleet, spec).await.unwrap().remove(0);
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    assert_fleet_on(&fleet, "1.0.0").await;
    for node in &fleet.nodes {
        let dir = &node.state_dir;
        let db = std::fs::read_to_string(dir.join("data/db.txt")).unwrap();
        assert_eq!(
            db, "schema 1\n",
            "{}: the on_rollback path is restored",
            node.name
        );
        let term = std::fs::read_to_string(dir.join("raft/term")).unwrap();
        assert_eq!(
            term, "term 2\n",
            "{}: the never path keeps its data",
            node.name
        );
        // The copy is kept for manual recovery.
        let task = r.task_id(&node.name, rollwave_core::TaskKind::Upgrade);
        let copy = dir.join("services/api/backups").join(task).join("1/term");
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), "term 1\n");

        let kept = format!(
            "kept and not restored (restore = \"never\"): {}",
            dir.join("raft").display()
        );
        assert!(
            r.events
                .iter()
                .any(|e| e.node.as_deref() == Some(node.name.as_str())
                    && e.message.contains("restored backup")
                    && e.message.contains(&kept)),
            "{}: {:#?}",
            node.name,
            r.events
        );
        let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
        let raft = dir.join("raft").display().to_string();
        assert!(
            log.lines()
                .any(|l| l.contains("kept and not restored") && l.contains(&raft)),
            "{}: {log}",
            node.name
        );
    }
}
