//! The audit trail with a real control plane: every change made through the
//! API, refusals included, in order, and nothing for reads.

use rollwave_api::{RolloutResponse, StartRollout};
use rollwave_core::{AuditEntry, RolloutFile};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn every_change_through_the_api_is_in_the_audit_trail() {
    let fleet = installed_fleet(2).await;
    let api = fleet.api().unwrap();
    push(&fleet, "2.0.0", true).await;
    // The same version with other content is refused.
    let other = push_with(&fleet, "2.0.0", &[("notes.txt", "other content", 0o644)]).await;
    assert!(other.is_err(), "a conflicting push must fail");
    let spec = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some("2.0.0".into()),
        ..Default::default()
    };
    // A plan changes nothing: not audited.
    let _: RolloutResponse = api
        .post(
            "/v1/plan",
            &StartRollout {
                spec: spec.clone(),
                plan_id: None,
            },
        )
        .await
        .unwrap();
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let id = r.id.to_string();
    assert!(cli(&fleet, &["rollout", "pause", &id]).status.success());
    assert!(!cli(&fleet, &["rollout", "promote", &id]).status.success());
    assert!(cli(&fleet, &["rollout", "resume", &id]).status.success());
    let r = wait_done(&fleet, r.id).await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert!(cli(&fleet, &["finalize", "api"]).status.success());

    let out = cli(&fleet, &["audit", "--json", "--limit", "9"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<AuditEntry> = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<(&str, &str, bool)> = entries
        .iter()
        .rev()
        .map(|e| (e.action.as_str(), e.target.as_str(), e.ok))
        .collect();
    let target = format!("rollout {id}");
    assert_eq!(
        got,
        [
            ("release.push", "api@1.0.0", true),
            ("rollout.start", "rollout 1", true),
            ("release.push", "api@2.0.0", true),
            ("release.push", "api@2.0.0", false),
            ("rollout.start", target.as_str(), true),
            ("rollout.pause", target.as_str(), true),
            ("rollout.promote", target.as_str(), false),
            ("rollout.resume", target.as_str(), true),
            ("service.finalize", "service api", true),
        ],
        "{entries:#?}"
    );
    let by_action = |action: &str, ok: bool| {
        // The newest such entry.
        entries
            .iter()
            .find(|e| e.action == action && e.ok == ok)
            .unwrap()
    };
    assert_eq!(
        by_action("rollout.start", true).detail,
        format!("started rollout {id} of api@2.0.0")
    );
    let conflict = by_action("release.push", false);
    assert_eq!(conflict.status, 409);
    assert!(
        conflict
            .detail
            .starts_with("release api@2.0.0 already exists"),
        "{conflict:?}"
    );
    let promote = by_action("rollout.promote", false);
    assert_eq!(promote.status, 409);
    assert!(promote.detail.contains("cannot promote"), "{promote:?}");
    for e in &entries {
        assert_eq!(e.actor, rollwave_server::BOOTSTRAP_ADMIN);
        assert!(
            e.remote
                .as_deref()
                .is_some_and(|r| r.starts_with("127.0.0.1:")),
            "{e:?}"
        );
    }
    assert!(entries
        .windows(2)
        .all(|w| w[0].id > w[1].id && w[0].at >= w[1].at));

    let out = cli(&fleet, &["audit"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["AT", "ACTOR", "ACTION", "TARGET", "RESULT"]);
    assert!(text.contains("refused (409): "), "{text}");
    let out = cli(&fleet, &["audit", "--limit", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("limit: 0 is not between 1 and 10000"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
