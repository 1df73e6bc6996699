//! Migrations and dry runs declared by a release's own `rollwave.toml`, with
//! real agents and services: a migration that fails on one node restores
//! every node's data byte for byte; a failing dry run changes no node; a
//! passing one lets the migrations and the release's hooks run.

use std::path::{Path, PathBuf};
use std::process::Command;

use rollwave_core::{NodeState, RolloutState};

use crate::harness::*;

/// The file's sha256, by the system's own tool rather than the code under test.
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_string()
}

/// Writes each node's `data/db.txt` (its backup path); returns each file and
/// its checksum.
fn seed_data(fleet: &rollwave::fleet::Fleet) -> Vec<(PathBuf, String)> {
    fleet
        .nodes
        .iter()
        .map(|node| {
            let file = node.state_dir.join("data").join("db.txt");
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, format!("schema 1 of {}\n", node.name)).unwrap();
            let sum = sha256(&file);
            (file, sum)
        })
        .collect()
}

const MIGRATE: &str = r#"#!/bin/sh
set -e
echo "migrating $ROLLWAVE_DATA_DIR from $ROLLWAVE_FROM_VERSION to $ROLLWAVE_VERSION"
echo "schema 2" > "$ROLLWAVE_DATA_DIR/db.txt"
if [ "$ROLLWAVE_NODE" = "$FAIL_ON" ]; then
  echo "index users_by_email does not convert" >&2
  exit 3
fi
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_migration_restores_that_node_and_rolls_the_first_back_restored() {
    let fleet = installed_fleet(2).await;
    let before = seed_data(&fleet);
    let manifest = "[migrate]\ncommand = [\"sh\", \"-c\", \"FAIL_ON=node-2 exec ./migrate.sh\"]\ntimeout = \"30s\"\n";
    push_with(
        &fleet,
        "2.0.0",
        &[
            ("rollwave.toml", manifest, 0o644),
            ("migrate.sh", MIGRATE, 0o755),
        ],
    )
    .await
    .unwrap();
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;

    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    assert_eq!(r.batches[0][0], "node-1", "{r:#?}");
    let reason = r.nodes["node-2"].reason.as_deref().unwrap_or_default();
    assert!(
        reason.starts_with("migration failed: exited 3; rolled back to 1.0.0"),
        "{reason}"
    );
    let logged = |node: &str, want: &dyn Fn(&str) -> bool| {
        r.events
            .iter()
            .any(|e| e.node.as_deref() == Some(node) && want(&e.message))
    };
    assert!(
        logged("node-1", &|m| m.starts_with("hook migrate exited 0 in ")
            && m.contains("migrating")
            && m.contains("from 1.0.0 to 2.0.0")),
        "{:#?}",
        r.events
    );
    assert!(
        logged("node-2", &|m| m
            .starts_with("hook migrate failed: exited 3")
            && m.contains("index users_by_email does not convert")),
        "{:#?}",
        r.events
    );
    for node in ["node-1", "node-2"] {
        assert!(
            logged(node, &|m| m.starts_with("restored backup")
                && m.ends_with("verified")),
            "{node}: {:#?}",
            r.events
        );
    }
    assert_eq!(r.nodes["node-1"].state, NodeState::RolledBack);
    assert_eq!(r.nodes["node-2"].state, NodeState::Failed);
    for (file, sum) in &before {
        assert_eq!(&sha256(file), sum, "{} was not restored", file.display());
    }
    assert_fleet_on(&fleet, "1.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_dry_run_aborts_before_any_node_changes() {
    let fleet = installed_fleet(3).await;
    let before = seed_data(&fleet);
    // It writes to the data it was given, which must be a copy, then fails.
    let dry_run = r#"#!/bin/sh
echo "dry run against $ROLLWAVE_DATA_DIR (dry run: $ROLLWAVE_DRY_RUN)"
echo "schema 2" > "$ROLLWAVE_DATA_DIR/db.txt"
echo "2 rows would not convert" >&2
exit 1
"#;
    let manifest = "[migrate]\ncommand = [\"./migrate.sh\"]\n[dry_run]\ncommand = [\"./dry-run.sh\"]\ntimeout = \"30s\"\n";
    let pushed = push_with(
        &fleet,
        "2.0.0",
        &[
            ("rollwave.toml", manifest, 0o644),
            ("migrate.sh", MIGRATE, 0o755),
            ("dry-run.sh", dry_run, 0o755),
        ],
    )
    .await
    .unwrap();
    let declared = pushed.release.manifest.expect("the manifest is recorded");
    assert_eq!(declared.describe(), "migrate, dry_run");

    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;

    assert_eq!(r.state, RolloutState::Failed, "{r:#?}");
    let reason = r.reason.as_deref().unwrap_or_default();
    assert!(
        reason.starts_with("dry run on node-1 failed: exited 1: 2 rows would not convert")
            && reason.ends_with("no node was changed"),
        "{reason}"
    );
    assert!(
        r.events.iter().any(|e| e.node.as_deref() == Some("node-1")
            && e.message.starts_with("hook dry_run failed: exited 1")
            && e.message.contains("(dry run: 1)")),
        "{:#?}",
        r.events
    );
    for node in &fleet.nodes {
        assert_eq!(switches_to(&node.state_dir, "2.0.0"), 0, "{}", node.name);
        assert_eq!(
            r.nodes[&node.name].state,
            NodeState::Pending,
            "{}",
            node.name
        );
        let scratch = node.state_dir.join("services/api/dry-runs");
        let left = std::fs::read_dir(&scratch).map_or(0, |d| d.count());
        assert_eq!(
            left,
            0,
            "{}: the dry run's copy was left",
            scratch.display()
        );
    }
    for (file, sum) in &before {
        assert_eq!(&sha256(file), sum, "{} changed", file.display());
    }
    assert_fleet_on(&fleet, "1.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passing_dry_run_comes_first_then_each_node_migrates_and_runs_the_release_hooks() {
    let fleet = installed_fleet(2).await;
    seed_data(&fleet);
    let dry_run = "#!/bin/sh\nset -e\ngrep -q 'schema 1' \"$ROLLWAVE_DATA_DIR/db.txt\"\necho \"schema 2\" > \"$ROLLWAVE_DATA_DIR/db.txt\"\necho 'all rows convert'\n";
    let verify =
        "#!/bin/sh\nset -e\ngrep -q 'schema 2' \"$ROLLWAVE_DATA_DIR/db.txt\"\necho verified\n";
    let manifest = r#"
[migrate]
command = ["sh", "-c", "FAIL_ON=none exec ./migrate.sh"]
[dry_run]
command = ["./dry-run.sh"]
[[hooks.post_node]]
command = ["./verify.sh"]
"#;
    push_with(
        &fleet,
        "2.0.0",
        &[
            ("rollwave.toml", manifest, 0o644),
            ("migrate.sh", MIGRATE, 0o755),
            ("dry-run.sh", dry_run, 0o755),
            ("verify.sh", verify, 0o755),
        ],
    )
    .await
    .unwrap();
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;

    assert!(r.fully_upgraded(), "{r:#?}");
    let at = |want: &dyn Fn(&str) -> bool| {
        r.events
            .iter()
            .position(|e| want(&e.message))
            .unwrap_or_else(|| panic!("not in the log: {:#?}", r.events))
    };
    let passed = at(&|m| m.starts_with("dry run passed in "));
    let dry_output =
        at(&|m| m.starts_with("hook dry_run exited 0") && m.ends_with("all rows convert"));
    let first_switch = at(&|m| m == "switching");
    assert!(
        dry_output < passed && passed < first_switch,
        "{:#?}",
        r.events
    );
    for node in &fleet.nodes {
        let data = std::fs::read_to_string(node.state_dir.join("data/db.txt")).unwrap();
        assert_eq!(data, "schema 2\n", "{}", node.name);
        let migrated = r
            .events
            .iter()
            .filter(|e| {
                e.node.as_deref() == Some(node.name.as_str())
                    && e.message.starts_with("hook migrate exited 0")
            })
            .count();
        assert_eq!(migrated, 1, "{}: {:#?}", node.name, r.events);
        assert!(
            r.events
                .iter()
                .any(|e| e.node.as_deref() == Some(node.name.as_str())
                    && e.message
                        .starts_with("hook release.hooks.post_node[0] exited 0")
                    && e.message.ends_with("verified")),
            "{}: {:#?}",
            node.name,
            r.events
        );
    }
    assert_fleet_on(&fleet, "2.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_with_an_invalid_manifest_is_refused_and_not_stored() {
    let fleet = rollwave::fleet::Fleet::launch(rollwave::fleet::FleetSpec::new(exe().into(), 1))
        .await
        .unwrap();
    let manifest = "[migrate]\ntimeout = \"5m\"\n";
    let err = push_with(&fleet, "2.0.0", &[("rollwave.toml", manifest, 0o644)])
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "release api@2.0.0 refused: rollwave.toml: migrate.command: is required: the program and its arguments, e.g. [\"./bin/migrate\"]"
    );
    let out = cli(&fleet, &["release", "list", "--json"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}
