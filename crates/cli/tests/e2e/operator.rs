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

    // Output lost otherwise (a full disk) is said, and fails the command.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = fleet
        .command()
        .args(["nodes"])
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim(),
        "error: writing to standard output: No space left on device (os error 28)"
    );

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

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn refused(out: &Output, names: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(names), "{err}");
}

/// Steering by service name, or by nothing when one rollout is in
/// progress; a service's history.
#[tokio::test(flavor = "multi_thread")]
async fn rollouts_are_steered_by_service_name() {
    use crate::harness::{cli, start, wait_rollout};
    let fleet = installed_fleet(2).await;
    // Slow enough to steer: a node passes its health gate after a minute,
    // but a rollback does not wait for it.
    refused(
        &cli(&fleet, &["rollout", "pause"]),
        "no rollout is in progress: name one by id or by service",
    );
    refused(
        &cli(&fleet, &["rollout", "pause", "api"]),
        "api has no rollout in progress",
    );
    refused(
        &cli(&fleet, &["rollout", "pause", "not a name"]),
        "id: \"not a name\" is neither a rollout id nor a service name",
    );
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| {
        s.min_healthy_time = Some("1m".into());
        s.healthy_deadline = Some("2m".into());
    })
    .await
    .unwrap();
    let out = cli(&fleet, &["rollout", "pause"]);
    assert_eq!(
        stdout(&out).trim(),
        format!("rollout {} is paused", r.id),
        "{out:?}"
    );
    let out = cli(&fleet, &["rollout", "resume", "api"]);
    assert_eq!(
        stdout(&out).trim(),
        format!("rollout {} is running", r.id),
        "{out:?}"
    );
    wait_rollout(&fleet, r.id, "a node upgrading", |r| {
        r.events
            .iter()
            .any(|e| e.message.starts_with("upgrade to 2.0.0 started"))
    })
    .await;
    // Rolling back by name takes the service's rollout in progress.
    let out = cli(&fleet, &["rollout", "rollback", "api"]);
    assert_eq!(
        stdout(&out).trim(),
        format!("rollout {} is rolling_back", r.id),
        "{out:?}"
    );
    let out = cli(&fleet, &["rollout", "history", "api", "--json"]);
    let history: Vec<rollwave_core::RolloutSummary> = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u64> = history.iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![r.id, 1], "newest first, only api's");
    let out = cli(&fleet, &["rollout", "history", "web"]);
    assert_eq!(stdout(&out).trim(), "web has no rollouts");
}

/// Bad strategies are refused by name instead of being changed quietly, and
/// `plan` takes no flag that only starting means.
#[tokio::test(flavor = "multi_thread")]
async fn plans_and_strategies_that_would_surprise_are_refused() {
    use crate::harness::cli;
    let fleet = installed_fleet(2).await;
    push(&fleet, "2.0.0", true).await;
    refused(
        &cli(&fleet, &["plan", "api@2.0.0", "--yes"]),
        "--yes: plan starts nothing",
    );
    refused(
        &cli(&fleet, &["plan", "api@2.0.0", "--wait"]),
        "--wait: plan starts nothing",
    );
    for (waves, field) in [
        ("50%,10%", "strategy.waves[1]: 10%"),
        ("1,1,1", "strategy.waves[1]: 1"),
    ] {
        for verb in [&["plan"][..], &["rollout", "start", "--yes"]] {
            let mut args = verb.to_vec();
            args.extend(["api@2.0.0", "--waves", waves]);
            refused(&cli(&fleet, &args), field);
        }
    }
    refused(
        &cli(&fleet, &["plan", "api@2.0.0", "--spread-by", "zone"]),
        "strategy.spread_by: none of the 2 selected nodes has label \"zone\"",
    );
    let list: Vec<rollwave_core::RolloutSummary> =
        serde_json::from_slice(&cli(&fleet, &["rollout", "list", "--json"]).stdout).unwrap();
    assert_eq!(list.len(), 1, "nothing started");
}

/// What the rollout, the log and the audit trail say is what happened.
#[tokio::test(flavor = "multi_thread")]
async fn words_match_what_happened() {
    use crate::harness::{cli, start, wait_done};
    let fleet = installed_fleet(2).await;
    push(&fleet, "2.0.0", true).await;
    let up = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let up = wait_done(&fleet, up.id).await;
    assert!(up.fully_upgraded());

    // Again to the version every node runs: done at once, and said so.
    let again = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let again = wait_done(&fleet, again.id).await;
    assert_eq!(again.state, RolloutState::Completed);
    assert_eq!(
        again.reason.as_deref(),
        Some("already on 2.0.0: all 2 selected nodes run it, nothing switched")
    );
    assert!(again.nodes.is_empty(), "{again:#?}");

    // A downgrade is called one.
    let mut spec = rollwave_api::RolloutFile {
        service: Some("api".into()),
        version: Some("1.0.0".into()),
        downgrade: Some(true),
        ..Default::default()
    };
    spec.strategy.min_healthy_time = Some("300ms".into());
    let down = crate::harness::start_file(&fleet, spec)
        .await
        .unwrap()
        .remove(0);
    let down = wait_done(&fleet, down.id).await;
    assert!(down.fully_upgraded(), "{down:#?}");
    let messages: Vec<&str> = down.events.iter().map(|e| e.message.as_str()).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("downgrade to 1.0.0 started")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("downgraded to 1.0.0 in ")),
        "{messages:?}"
    );
    assert!(
        !messages.iter().any(|m| m.contains("upgrade")),
        "{messages:?}"
    );
    assert!(
        messages[0].ends_with("over 2 nodes in 2 waves"),
        "{messages:?}"
    );

    // One spelling of the release format, in JSON and in text.
    let releases = stdout(&cli(&fleet, &["release", "list", "--json"]));
    assert!(releases.contains("\"format\": \"tar.gz\""), "{releases}");
    let text = stdout(&cli(&fleet, &["release", "list"]));
    assert!(text.contains("tar.gz") && !text.contains("targz"), "{text}");

    // The audit trail names the rollout a start made.
    let audit: Vec<rollwave_core::AuditEntry> =
        serde_json::from_slice(&cli(&fleet, &["audit", "--json"]).stdout).unwrap();
    let starts: Vec<&str> = audit
        .iter()
        .filter(|e| e.action == "rollout.start")
        .map(|e| e.target.as_str())
        .collect();
    let expected: Vec<String> = [down.id, again.id, up.id, 1]
        .iter()
        .map(|id| format!("rollout {id}"))
        .collect();
    assert_eq!(starts, expected);
}

/// The most reverts in flight at once, from the rollout's log.
fn reverts_at_once(r: &rollwave_core::Rollout) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for e in &r.events {
        if e.message.starts_with("rollback to ") {
            now += 1;
            most = most.max(now);
        } else if e.message.starts_with("rolled back to ")
            || e.message.starts_with("rollback failed")
        {
            now = now.saturating_sub(1);
        }
    }
    most
}

/// A rollback keeps to the rollout's budget unless told otherwise.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_goes_in_waves_within_the_budget() {
    use crate::harness::{cli, start, wait_done};
    let fleet = installed_fleet(4).await;
    push(&fleet, "2.0.0", true).await;
    let roll = |batch: Option<&'static str>| {
        let fleet = &fleet;
        async move {
            // One node at a time: max_unavailable is the batch, 1.
            let r = start(fleet, "2.0.0", |_| {}).await.unwrap();
            let r = wait_done(fleet, r.id).await;
            assert!(r.fully_upgraded(), "{r:#?}");
            let id = r.id.to_string();
            let mut args = vec!["rollout", "rollback", id.as_str(), "--wait"];
            args.extend(batch.iter().flat_map(|b| ["--batch", *b]));
            let out = cli(fleet, &args);
            assert!(out.status.success(), "{out:?}");
            let r = get(&fleet.api().unwrap(), r.id).await.unwrap();
            assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
            r
        }
    };
    let r = roll(None).await;
    assert_eq!(reverts_at_once(&r), 1, "{:#?}", r.events);
    // Two at a time, when asked: both sent in one step.
    let r = roll(Some("2")).await;
    assert_eq!(reverts_at_once(&r), 2, "{:#?}", r.events);

    for bad in [
        &["--batch", "0"][..],
        &["--batch", "x"],
        &["--batch", "2", "--all-at-once"],
    ] {
        let mut args = vec!["rollout", "rollback", "api"];
        args.extend(bad);
        let out = cli(&fleet, &args);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
}

/// Runs `rollwave rollout start ...` on a terminal (a pseudo-terminal),
/// answering `answer` to its question; returns what the terminal showed
/// and the exit code.
fn start_on_a_terminal(
    fleet: &rollwave::fleet::Fleet,
    args: &[&str],
    answer: &str,
) -> (String, i32) {
    use std::io::{Read, Write};
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = || Stdio::from(pty.slave.try_clone().unwrap());
    let mut child = fleet
        .command()
        .args(args)
        .stdin(slave())
        .stdout(slave())
        .stderr(slave())
        .spawn()
        .unwrap();
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    master.write_all(answer.as_bytes()).unwrap();
    let status = child.wait().unwrap();
    // Once the child is gone, reading ends with EIO after what it wrote.
    let mut shown = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        shown.extend_from_slice(&buf[..n]);
    }
    (
        String::from_utf8_lossy(&shown).to_string(),
        status.code().unwrap_or(-1),
    )
}

/// `plan` refuses what `start` would refuse and shows what the quorum floor
/// does to a wave; its id holds `start` to the plan reviewed; on a terminal
/// `start` shows the plan and asks before anything starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_is_the_plan() {
    use crate::harness::{cli, start, wait_done};
    let fleet = installed_fleet(3).await;
    push(&fleet, "2.0.0", true).await;

    // The quorum floor serialises a wave of two.
    let out = cli(
        &fleet,
        &["plan", "api@2.0.0", "--batch", "2", "--min-healthy", "2"],
    );
    let text = stdout(&out);
    assert!(
        text.contains("(1 at a time: min_healthy 2 of 3 healthy nodes running api)"),
        "{text}"
    );

    // The id holds a start to the plan reviewed.
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("plan id: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let changed = cli(
        &fleet,
        &[
            "rollout",
            "start",
            "api@2.0.0",
            "--yes",
            "--batch",
            "1",
            "--min-healthy",
            "2",
            "--plan-id",
            &id,
        ],
    );
    refused(&changed, "plan_id: the plan changed since plan");
    refused(
        &cli(&fleet, &["plan", "api@2.0.0", "--plan-id", &id]),
        "--plan-id: plan makes a plan id",
    );

    // On a terminal: the plan, a question, and nothing started on a no.
    let (shown, code) = start_on_a_terminal(&fleet, &["rollout", "start", "api@2.0.0"], "n\n");
    assert_eq!(code, 1, "{shown}");
    assert!(
        shown.contains("plan: api") && shown.contains("Start this rollout? [y/N]"),
        "{shown}"
    );
    assert!(shown.contains("nothing started"), "{shown}");
    let list: Vec<rollwave_core::RolloutSummary> =
        serde_json::from_slice(&cli(&fleet, &["rollout", "list", "--json"]).stdout).unwrap();
    assert_eq!(list.len(), 1, "only the install");

    let out = cli(
        &fleet,
        &[
            "rollout",
            "start",
            "api@2.0.0",
            "--yes",
            "--batch",
            "2",
            "--min-healthy",
            "2",
            "--plan-id",
            &id,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let r = wait_done(&fleet, 2).await;
    assert!(r.fully_upgraded(), "{r:#?}");

    // What start refuses, plan refuses: a downgrade not asked for, and a
    // start beside a rollout in progress.
    refused(&cli(&fleet, &["plan", "api@1.0.0"]), "--downgrade");
    let slow = start(&fleet, "1.0.0", |s| {
        s.min_healthy_time = Some("1m".into());
        s.healthy_deadline = Some("2m".into());
    });
    let _ = slow.await.unwrap_err();
    let mut spec = rollwave_api::RolloutFile {
        service: Some("api".into()),
        version: Some("1.0.0".into()),
        downgrade: Some(true),
        ..Default::default()
    };
    spec.strategy.min_healthy_time = Some("1m".into());
    spec.strategy.healthy_deadline = Some("2m".into());
    let down = crate::harness::start_file(&fleet, spec)
        .await
        .unwrap()
        .remove(0);
    refused(
        &cli(&fleet, &["plan", "api@1.0.0", "--downgrade"]),
        &format!("rollout {} of api is running", down.id),
    );

    // On a terminal, a yes starts the plan shown.
    let (shown, code) = start_on_a_terminal(
        &fleet,
        &["rollout", "start", "api@2.0.0", "--downgrade"],
        "y\n",
    );
    assert_eq!(code, 2, "refused beside the rollout in progress: {shown}");
}
