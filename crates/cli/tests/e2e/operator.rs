//! What an operator meets running the CLI by hand and in scripts: output
//! into a pipe that closes early, logs written to files.

use std::os::fd::OwnedFd;
use std::process::{Output, Stdio};

use rollwave_core::RolloutState;

use crate::harness::{get, installed_fleet, push};

/// Runs the CLI with its stdout a pipe whose reader is already gone, as in
/// `rollwave nodes | true`: every write fails with EPIPE.
fn into_closed_pipe(fleet: &rollwave::fleet::Fleet, args: &[&str]) -> Output {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(read);
    fleet
        .command()
        .args(args)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn output_into_a_closed_pipe_ends_quietly() {
    let fleet = installed_fleet(2).await;
    for args in [
        &["nodes"][..],
        &["rollout", "list"],
        &["logs", "1"],
        &["logs", "1", "--follow"],
        &["rollout", "status", "1", "--watch"],
        &["rollout", "status", "1", "--json"],
        &["audit"],
        &["completions", "bash"],
    ] {
        let out = into_closed_pipe(&fleet, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.is_empty(), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }

    // A script waiting on a rollout with its output piped into `grep -q`:
    // the wait goes on to the rollout's end, and the exit code says how it
    // ended, not whether anyone read the progress.
    push(&fleet, "2.0.0", true).await;
    let out = into_closed_pipe(
        &fleet,
        &["rollout", "start", "api@2.0.0", "--yes", "--wait"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let r = get(&fleet.api().unwrap(), 2).await.unwrap();
    assert_eq!(r.state, RolloutState::Completed, "{r:#?}");
    assert!(r.fully_upgraded());
}

/// Logs written to a file carry no terminal colour codes.
#[tokio::test(flavor = "multi_thread")]
async fn logs_in_files_have_no_colour_codes() {
    let fleet = installed_fleet(1).await;
    let logs = [
        fleet.dir.join("server.log"),
        fleet.nodes[0].state_dir.join("agent.log"),
    ];
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("INFO"), "{}: {text}", log.display());
        assert!(!text.contains('\x1b'), "{}: {text}", log.display());
    }
}
