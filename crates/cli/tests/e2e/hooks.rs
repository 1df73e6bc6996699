//! Hooks with real agents: order and environment, webhooks received by a
//! real listener, and failures that stop before anything changes.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rollwave_api::RolloutFile;
use rollwave_core::{HookFile, HooksFile, NodeState, Rollout, RolloutState, StrategyFile};

use crate::harness::*;

/// A script appending one line (`what` expanded by the shell) to `log`.
fn echo(log: &Path, what: &str) -> String {
    format!("echo \"{what}\" >> {}", log.display())
}

/// An exec hook (run by the control plane) appending to `log`.
fn append(log: &Path, what: &str) -> HookFile {
    shell(&echo(log, what))
}

fn shell(script: &str) -> HookFile {
    HookFile {
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        ..Default::default()
    }
}

async fn roll(fleet: &rollwave::fleet::Fleet, hooks: HooksFile) -> Rollout {
    let spec = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some("2.0.0".into()),
        hooks: Some(hooks),
        strategy: StrategyFile {
            batch: Some("1".into()),
            min_healthy_time: Some("300ms".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = start_file(fleet, spec).await.unwrap().remove(0);
    wait_done(fleet, r.id).await
}

/// A webhook receiver: every JSON body posted to it, in order.
async fn receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body.0);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

#[tokio::test(flavor = "multi_thread")]
async fn hooks_run_in_order_with_the_rollout_and_node_in_their_environment() {
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("hooks.log");
    let pre = echo(
        &log,
        "pre_node $ROLLWAVE_NODE $ROLLWAVE_FROM_VERSION $ROLLWAVE_VERSION",
    );
    let post = echo(&log, "post_node $ROLLWAVE_NODE");
    let fleet = installed_with_hooks(2, &[("pre", &pre), ("post", &post)]).await;
    push(&fleet, "2.0.0", true).await;
    let (url, posted) = receiver().await;
    let hooks = HooksFile {
        pre_rollout: vec![append(
            &log,
            "pre_rollout $ROLLWAVE_ROLLOUT $ROLLWAVE_SERVICE $ROLLWAVE_VERSION",
        )],
        pre_node: vec![node_hook("pre")],
        post_node: vec![node_hook("post")],
        pre_leader: Vec::new(),
        post_rollout: vec![append(&log, "post_rollout $ROLLWAVE_STATE")],
        on_success: vec![
            append(&log, "on_success"),
            HookFile {
                url: Some(url),
                ..Default::default()
            },
        ],
        on_failure: vec![append(&log, "on_failure")],
    };
    let r = roll(&fleet, hooks).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    let id = r.id;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let first = &r.batches[0][0];
    let second = &r.batches[1][0];
    assert_eq!(
        lines,
        [
            format!("pre_rollout {id} api 2.0.0"),
            format!("pre_node {first} 1.0.0 2.0.0"),
            format!("post_node {first}"),
            format!("pre_node {second} 1.0.0 2.0.0"),
            format!("post_node {second}"),
            "post_rollout completed".to_string(),
            "on_success".to_string(),
        ]
    );
    let posted = posted.lock().unwrap().clone();
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(posted[0]["hook"], "on_success");
    assert_eq!(posted[0]["rollout"], id);
    assert_eq!(posted[0]["state"], "completed");
    // Each hook's outcome is in the execution log.
    let out = cli(&fleet, &["logs", &id.to_string(), "--node", first]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hook hooks.pre_node[0] exited 0"), "{text}");
    assert!(
        text.contains("hook hooks.pre_rollout[0] exited 0"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_pre_rollout_hook_changes_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("hooks.log");
    let fleet = installed_with_hooks(2, &[("pre", &echo(&log, "pre_node"))]).await;
    push(&fleet, "2.0.0", true).await;
    let hooks = HooksFile {
        pre_rollout: vec![shell("echo 'metadata backup failed' >&2; exit 3")],
        pre_node: vec![node_hook("pre")],
        on_failure: vec![append(&log, "on_failure $ROLLWAVE_STATE")],
        ..Default::default()
    };
    let r = roll(&fleet, hooks).await;
    assert_eq!(r.state, RolloutState::Failed, "{r:#?}");
    let reason = r.reason.as_deref().unwrap();
    assert!(
        reason.contains(
            "pre_rollout hook hooks.pre_rollout[0] failed (exited 3): no node was changed"
        ),
        "{reason}"
    );
    assert!(r
        .events
        .iter()
        .any(|e| e.message.contains("metadata backup failed")));
    assert_eq!(r.count(NodeState::Pending), 2);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "on_failure failed\n"
    );
    for node in &fleet.nodes {
        assert_eq!(switches_to(&node.state_dir, "2.0.0"), 0, "{}", node.name);
    }
    assert_fleet_on(&fleet, "1.0.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_pre_node_hook_fails_that_node_untouched() {
    let drain = "test \"$ROLLWAVE_NODE\" != node-2 || { echo drain refused; exit 1; }";
    let fleet = installed_with_hooks(2, &[("drain", drain)]).await;
    push(&fleet, "2.0.0", true).await;
    let hooks = HooksFile {
        pre_node: vec![node_hook("drain")],
        ..Default::default()
    };
    let r = roll(&fleet, hooks).await;
    // node-2 failed before anything changed on it; node-1 was switched back.
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    let n2 = &r.nodes["node-2"];
    assert_eq!(n2.state, NodeState::Failed);
    assert!(
        n2.reason
            .as_deref()
            .unwrap()
            .starts_with("pre_node hook hooks.pre_node[0] failed"),
        "{n2:#?}"
    );
    assert_eq!(switches_to(&fleet.nodes[1].state_dir, "2.0.0"), 0);
    assert_fleet_on(&fleet, "1.0.0").await;
}
