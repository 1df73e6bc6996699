//! Probes that read what a service answers, with real agents and services:
//! a health check that compares the version a node reports with the one it
//! should run, and role probes reported to the control plane.

use rollwave::demo_service::{tarball, DemoRelease};
use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_api::PushResponse;
use rollwave_core::{NodeState, RolloutState};

use crate::harness::*;

/// Pushes `version` of `api` built from the code of `answers`: the service
/// it runs reports `answers` as its version, as a release packaged from a
/// stale build would.
async fn push_stale(fleet: &Fleet, version: &str, answers: &str) {
    let bytes = tarball(&DemoRelease {
        version: answers.into(),
        healthy: true,
        broken_on: Vec::new(),
        error_rate: 0.0,
    })
    .unwrap();
    let _: PushResponse = fleet
        .api()
        .unwrap()
        .post_bytes(&format!("/v1/releases/{SERVICE}/{version}"), bytes)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_answers_with_the_old_version_fails_its_gate() {
    let mut spec = FleetSpec::new(exe().into(), 2);
    spec.health_path = "/version".into();
    spec.health_settings =
        vec![r#"expect_json = { field = "version", equals = "{version}" }"#.into()];
    let fleet = installed(spec).await;

    // Healthy by status (200) but running the old code: the gate fails on
    // the first node, naming the field and both versions, and the rollout
    // goes back.
    push_stale(&fleet, "2.0.0", "1.0.0").await;
    let r = start(&fleet, "2.0.0", |s| s.healthy_deadline = Some("3s".into()))
        .await
        .unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert_eq!(r.state, RolloutState::RolledBack, "{r:#?}");
    let failed: Vec<_> = r
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Failed)
        .collect();
    assert_eq!(failed.len(), 1, "{r:#?}");
    let reason = failed[0].reason.as_deref().unwrap();
    assert!(
        reason.contains(r#"/version: field "version" is "1.0.0", expected "2.0.0""#),
        "{reason}"
    );
    assert!(reason.contains("GET http://127.0.0.1:"), "{reason}");
    assert!(reason.contains("the node stayed on 1.0.0"), "{reason}");
    assert_fleet_on(&fleet, "1.0.0").await;

    // A release that says what it is passes the same check everywhere.
    push(&fleet, "3.0.0", true).await;
    let r = start(&fleet, "3.0.0", |_| {}).await.unwrap();
    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert_fleet_on(&fleet, "3.0.0").await;
}

/// Every node's `api` role and role error, by node name.
async fn roles(fleet: &Fleet) -> Vec<(String, Option<String>, Option<String>)> {
    nodes(fleet)
        .await
        .into_iter()
        .map(|n| {
            let s = n.services.get(SERVICE).cloned().unwrap_or_default();
            (n.name, s.role, s.role_error)
        })
        .collect()
}

/// Waits until the nodes report `want`: (role, role error) by node, in
/// node order.
async fn wait_roles(fleet: &Fleet, want: &[(Option<&str>, Option<&str>)]) {
    let want: Vec<(String, Option<String>, Option<String>)> = want
        .iter()
        .enumerate()
        .map(|(i, (role, error))| {
            (
                format!("node-{}", i + 1),
                role.map(str::to_string),
                error.map(str::to_string),
            )
        })
        .collect();
    wait_until(&format!("roles {want:?}"), || async {
        (roles(fleet).await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_are_reported_and_a_bad_answer_is_named() {
    // Each node's probe reads its answer from a file the test writes.
    let answers = tempfile::tempdir().unwrap();
    let answer = |node: &str, text: &str| {
        std::fs::write(answers.path().join(node), text).unwrap();
    };
    answer("node-1", "leader\n");
    answer("node-2", "follower\n");
    answer("node-3", "Follower");
    let script = format!("cat {}/\"$ROLLWAVE_NODE\"", answers.path().display());
    let mut spec = FleetSpec::new(exe().into(), 3);
    spec.service_settings = vec![format!(
        r#"role = {{ type = "exec", command = ["sh", "-c", {script:?}], interval = "200ms", timeout = "200ms" }}"#
    )];
    let fleet = installed(spec).await;

    wait_roles(
        &fleet,
        &[
            (Some("leader"), None),
            (Some("follower"), None),
            (Some("follower"), None),
        ],
    )
    .await;
    let out = cli(&fleet, &["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().next().unwrap().contains("ROLE"), "{text}");
    // The role comes after the health.
    let role_of = |node: &str| {
        let line = text
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_default();
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "healthy");
        at.and_then(|i| words.get(i + 1)).map(|w| w.to_string())
    };
    assert_eq!(role_of("node-1").as_deref(), Some("leader"), "{text}");
    assert_eq!(role_of("node-2").as_deref(), Some("follower"), "{text}");

    // Leadership moves: the control plane hears of it without a restart.
    answer("node-1", "follower");
    answer("node-2", "leader");
    wait_roles(
        &fleet,
        &[
            (Some("follower"), None),
            (Some("leader"), None),
            (Some("follower"), None),
        ],
    )
    .await;

    // An answer that is not a role word is named, beside the last role.
    answer("node-3", "I am the leader!");
    let why =
        r#"answered "I am the leader!" which is not a role word (1-32 letters, digits, _ or -)"#;
    wait_roles(
        &fleet,
        &[
            (Some("follower"), None),
            (Some("leader"), None),
            (Some("follower"), Some(why)),
        ],
    )
    .await;
    let out = cli(&fleet, &["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("node-3")).unwrap();
    assert!(line.contains(&format!("follower (stale: {why})")), "{text}");

    // So is a probe that fails.
    std::fs::remove_file(answers.path().join("node-3")).unwrap();
    wait_until("node-3's probe to fail", || async {
        let all = roles(&fleet).await;
        let error = all[2].2.clone()?;
        error.starts_with("exit status 1: cat: ").then_some(())
    })
    .await;

    answer("node-3", "follower");
    wait_roles(
        &fleet,
        &[
            (Some("follower"), None),
            (Some("leader"), None),
            (Some("follower"), None),
        ],
    )
    .await;
}
