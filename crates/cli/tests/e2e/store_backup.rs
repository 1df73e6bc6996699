//! `rollwave store backup` of a running control plane, its store lost,
//! `rollwave store restore`: the fleet carries on where the backup was.

use std::process::{Command, Output};

use crate::harness::{assert_fleet_on, exe, installed_fleet, push, start, wait_done};

fn rollwave(args: &[&str]) -> Output {
    Command::new(exe()).args(args).output().unwrap()
}

fn one_line_error(out: &Output, names: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(names), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_store_is_restored_from_a_backup_taken_while_it_ran() {
    let mut fleet = installed_fleet(2).await;
    push(&fleet, "2.0.0", true).await;
    let data = fleet.dir.join("server-data");
    let db = format!("sqlite:{}", data.join("rollwave.db").display());
    let file = fleet.dir.join("rollwave.backup");
    let file_arg = file.to_str().unwrap();

    // While the control plane runs.
    let out = rollwave(&["store", "backup", "--from", &db, "--to", file_arg]);
    assert!(out.status.success(), "{out:?}");
    let saved = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        saved.starts_with("saved 2 nodes, ") && saved.contains("2 releases, "),
        "{saved}"
    );
    let again = rollwave(&["store", "backup", "--from", &db, "--to", file_arg]);
    one_line_error(&again, "--to: ");

    // The disk that held the store is lost; artifacts (files named by
    // their hash) were backed up as files and are still in blobs/.
    fleet.kill_server();
    for f in ["rollwave.db", "rollwave.db-wal", "rollwave.db-shm"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    let bad = rollwave(&["store", "restore", "--from", &db[7..], "--to", &db]);
    one_line_error(&bad, "--from: ");
    let out = rollwave(&["store", "restore", "--from", file_arg, "--to", &db]);
    assert!(out.status.success(), "{out:?}");
    let restored = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        restored.trim().strip_prefix("restored "),
        saved
            .strip_prefix("saved ")
            .and_then(|s| s.split(" to ").next()),
        "everything saved is restored"
    );
    let into_full = rollwave(&["store", "restore", "--from", file_arg, "--to", &db]);
    one_line_error(&into_full, "--to: the target store is not empty");

    // The same tokens (the agents' credentials, the admin's), the same
    // releases and history: the fleet reconnects and rolls on.
    fleet.restart_server().await.unwrap();
    fleet.wait_online(2).await.unwrap();
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    assert_eq!(r.id, 2, "ids go on after the restored rollout");
    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert_fleet_on(&fleet, "2.0.0").await;
    for node in &fleet.nodes {
        // The restored store leads above every term before it, so an
        // agent that followed a replicated control plane follows it too.
        let term: u64 = std::fs::read_to_string(node.state_dir.join("term"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(term > 1_000_000, "{}: term {term}", node.name);
    }
}
