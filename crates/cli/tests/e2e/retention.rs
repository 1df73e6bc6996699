//! Retention with a real control plane: a release is deleted only when
//! nothing uses it, its artifact only when no other release has the same
//! bytes, never under a push or a rollout start racing it; old rollouts and
//! audit entries are pruned, never an active rollout, and lists still page.

use std::process::Output;

use rollwave::fleet::FleetSpec;
use rollwave_api::{DeleteReleaseResponse, Release};
use rollwave_core::{AuditEntry, RolloutFile, RolloutState, RolloutSummary, StrategyFile};
use sha2::{Digest, Sha256};

use crate::harness::*;

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A refusal: exit 2 and one line on stderr that holds `needle`.
fn assert_refused(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(needle), "{stderr:?} should say {needle:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
}

/// An executable artifact of about 3 MB, different for each `seed`.
fn artifact(seed: u32) -> Vec<u8> {
    let mut bytes = b"#!/bin/sh\nexit 0\n".to_vec();
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    bytes.extend((0..3 << 20).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    bytes
}

async fn push_bytes(fleet: &rollwave::fleet::Fleet, version: &str, bytes: Vec<u8>) -> u16 {
    let resp = fleet
        .http()
        .post(format!("{}/v1/releases/{SERVICE}/{version}", fleet.url()))
        .body(bytes)
        .send()
        .await
        .unwrap();
    resp.status().as_u16()
}

async fn newest_audit(fleet: &rollwave::fleet::Fleet) -> AuditEntry {
    let entries: Vec<AuditEntry> = fleet.api().unwrap().get("/v1/audit?limit=1").await.unwrap();
    entries.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_is_deleted_only_once_nothing_uses_it() {
    let fleet = installed_fleet(2).await;
    let api = fleet.api().unwrap();
    let blobs = fleet.dir.join("server-data").join("blobs");
    let delete = |release: &str| cli(&fleet, &["release", "delete", release]);

    assert_refused(&delete("api"), "release: \"api\" must be service@version");
    assert_refused(&delete("api@not a version"), "release");
    assert_refused(&delete("api@9.9.9"), "release api@9.9.9 not found");
    assert_refused(
        &delete("api@1.0.0"),
        "release api@1.0.0 is in use: nodes node-1, node-2 run it",
    );

    // A rollout that has not finished uses its target and what it may roll
    // nodes back to.
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |_| {}).await.unwrap();
    let id = r.id.to_string();
    assert!(cli(&fleet, &["rollout", "pause", &id]).status.success());
    wait_rollout(&fleet, r.id, "the rollout to pause", |r| {
        r.state == RolloutState::Paused
    })
    .await;
    assert_refused(
        &delete("api@2.0.0"),
        &format!("release api@2.0.0 is in use: rollout {id} of api@2.0.0 targets it (paused)"),
    );
    assert_refused(
        &delete("api@1.0.0"),
        &format!("release api@1.0.0 is in use: rollout {id} of api@2.0.0 (paused) may roll nodes node-1, node-2 back to it"),
    );
    assert!(cli(&fleet, &["rollout", "resume", &id]).status.success());
    assert!(wait_done(&fleet, r.id).await.fully_upgraded());
    // Finished, the nodes would still go back to it.
    assert_refused(
        &delete("api@1.0.0"),
        "release api@1.0.0 is in use: nodes node-1, node-2 ran it before their current version",
    );

    push(&fleet, "3.0.0", true).await;
    let r = start(&fleet, "3.0.0", |_| {}).await.unwrap();
    assert!(wait_done(&fleet, r.id).await.fully_upgraded());
    // Two switches back, 1.0.0 is used by nothing.
    let one: Release = api.get("/v1/releases/api/1.0.0").await.unwrap();
    assert!(blobs.join(&one.sha256).exists());
    let out = delete("api@1.0.0");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(&format!(
            "deleted api@1.0.0 (sha256 {}, {} bytes): artifact removed",
            one.sha256, one.size
        )),
        "{stdout}"
    );
    let gone = api.get::<Release>("/v1/releases/api/1.0.0").await;
    assert!(
        gone.unwrap_err().to_string().contains("not found"),
        "the record is gone"
    );
    assert!(!blobs.join(&one.sha256).exists(), "the artifact is gone");
    let entry = newest_audit(&fleet).await;
    assert_eq!(
        (entry.action.as_str(), entry.target.as_str(), entry.ok),
        ("release.delete", "api@1.0.0", true)
    );
    assert!(
        entry.detail.contains("and its artifact"),
        "{}",
        entry.detail
    );
    assert_refused(&delete("api@1.0.0"), "release api@1.0.0 not found");

    assert!(cli(&fleet, &["finalize", "api"]).status.success());
    assert_refused(
        &delete("api@3.0.0"),
        "release api@3.0.0 is in use: it is the active version of api",
    );

    // Two versions with the same bytes: the artifact stays until the last
    // of them goes.
    let bytes = b"#!/bin/sh\necho shared\n".to_vec();
    let shared = sha256(&bytes);
    assert_eq!(push_bytes(&fleet, "4.0.0", bytes.clone()).await, 201);
    assert_eq!(push_bytes(&fleet, "4.0.1", bytes).await, 201);
    let first: DeleteReleaseResponse = api.delete("/v1/releases/api/4.0.0").await.unwrap();
    assert!(!first.artifact_removed);
    assert_eq!(first.shared_with, vec!["api@4.0.1".to_string()]);
    assert!(blobs.join(&shared).exists());
    let fetched = fleet
        .http()
        .get(format!("{}/v1/releases/api/4.0.1/artifact", fleet.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200, "the other version is still served");
    let last: DeleteReleaseResponse = api.delete("/v1/releases/api/4.0.1").await.unwrap();
    assert!(last.artifact_removed);
    assert!(last.shared_with.is_empty());
    assert!(!blobs.join(&shared).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn deletes_racing_pushes_and_starts_never_leave_a_release_without_its_artifact() {
    let fleet = installed_fleet(1).await;
    let api = fleet.api().unwrap();

    // A delete of A and a push of B with A's bytes, at once; the delete
    // sent a little later each round, so that it meets the push at each of
    // its steps (upload, commit, release stored) in turn.
    const ROUNDS: u32 = 40;
    for round in 0..ROUNDS {
        let bytes = artifact(round);
        let (a, b) = (format!("5.{round}.0"), format!("6.{round}.0"));
        assert_eq!(push_bytes(&fleet, &a, bytes.clone()).await, 201);
        let path = format!("/v1/releases/{SERVICE}/{a}");
        let delay = std::time::Duration::from_millis(10 * u64::from(round));
        let (deleted, pushed) = tokio::join!(
            async {
                tokio::time::sleep(delay).await;
                api.delete::<DeleteReleaseResponse>(&path).await
            },
            push_bytes(&fleet, &b, bytes)
        );
        assert_eq!(pushed, 201, "round {round}");
        deleted.unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    let blobs = fleet.dir.join("server-data").join("blobs");
    let releases: Vec<Release> = api.get("/v1/releases").await.unwrap();
    assert_eq!(releases.len(), 1 + ROUNDS as usize, "1.0.0 and every B");
    for r in &releases {
        let content = std::fs::read(blobs.join(&r.sha256))
            .unwrap_or_else(|e| panic!("{}@{}: its artifact: {e}", r.service, r.version));
        assert_eq!(sha256(&content), r.sha256, "{}@{}", r.service, r.version);
    }

    // A rollout start and a delete of its release, at once: one of them
    // wins, never both.
    let (mut started, mut deleted) = (0, 0);
    for round in 0..4u32 {
        let version = format!("7.{round}.0");
        push(&fleet, &version, true).await;
        let path = format!("/v1/releases/{SERVICE}/{version}");
        let (start, delete) = tokio::join!(
            start(&fleet, &version, |s| s.min_healthy_time = Some("0s".into())),
            api.delete::<DeleteReleaseResponse>(&path)
        );
        match (start, delete) {
            (Ok(r), Err(e)) => {
                assert!(e.to_string().contains("is in use"), "{e}");
                let _: Release = api.get(&path).await.unwrap();
                assert!(wait_done(&fleet, r.id).await.fully_upgraded());
                started += 1;
            }
            (Err(e), Ok(_)) => {
                assert!(e.to_string().contains("not found"), "{e}");
                assert!(api.get::<Release>(&path).await.is_err());
                deleted += 1;
            }
            (start, delete) => panic!("round {round}: start {start:?}, delete {delete:?}"),
        }
    }
    println!("start won {started} times, delete {deleted} times");
}

/// Starts a rollout of `service` at `version` on every node and waits for it.
async fn roll(fleet: &rollwave::fleet::Fleet, service: &str, version: &str) -> u64 {
    push_service(fleet, service, version).await;
    let r = start_file(
        fleet,
        RolloutFile {
            service: Some(service.into()),
            version: Some(version.into()),
            strategy: StrategyFile {
                batch: Some("100%".into()),
                min_healthy_time: Some("0s".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let id = r[0].id;
    assert!(wait_done(fleet, id).await.fully_upgraded());
    id
}

async fn listed(fleet: &rollwave::fleet::Fleet) -> Vec<u64> {
    // A page at a time, as the dashboard reads them.
    let http = fleet.http();
    let mut ids = Vec::new();
    let mut path = "/v1/rollouts?limit=1".to_string();
    loop {
        let resp = http
            .get(format!("{}{path}", fleet.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let link = resp
            .headers()
            .get(reqwest::header::LINK)
            .map(|v| v.to_str().unwrap().to_string());
        let page: Vec<RolloutSummary> = resp.json().await.unwrap();
        ids.extend(page.iter().map(|s| s.id));
        match link {
            Some(link) => {
                path = link
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_string()
            }
            None => return ids,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn old_rollouts_and_audit_entries_are_pruned_but_never_an_active_rollout() {
    let mut spec = FleetSpec::new(exe().into(), 2);
    spec.extra_services = vec!["db".into()];
    let mut fleet = installed(spec).await;
    let install = listed(&fleet).await[0];
    // A rollout of api that stays paused: active, whatever its age.
    push(&fleet, "2.0.0", true).await;
    let paused = start(&fleet, "2.0.0", |_| {}).await.unwrap().id;
    assert!(cli(&fleet, &["rollout", "pause", &paused.to_string()])
        .status
        .success());
    wait_rollout(&fleet, paused, "the rollout to pause", |r| {
        r.state == RolloutState::Paused && !r.nodes.values().any(|n| n.state.in_flight())
    })
    .await;
    let db1 = roll(&fleet, "db", "1.0.0").await;
    let db2 = roll(&fleet, "db", "2.0.0").await;
    assert_eq!(listed(&fleet).await, vec![db2, db1, paused, install]);
    let audit: Vec<AuditEntry> = fleet.api().unwrap().get("/v1/audit").await.unwrap();
    assert!(audit.len() > 3, "{audit:?}");

    // By count: the newest two stay, and the active one.
    fleet.set_server_args(
        ["--max-rollouts", "2", "--max-audit-entries", "3"]
            .map(String::from)
            .to_vec(),
    );
    fleet.restart_server().await.unwrap();
    let api = fleet.api().unwrap();
    wait_until("the install rollout to be pruned", || {
        let api = api.clone();
        async move { get(&api, install).await.is_err().then_some(()) }
    })
    .await;
    assert_eq!(listed(&fleet).await, vec![db2, db1, paused]);
    let audit: Vec<AuditEntry> = api.get("/v1/audit").await.unwrap();
    assert_eq!(audit.len(), 3, "{audit:?}");
    let out = cli(&fleet, &["rollout", "list", "--json"]);
    assert!(out.status.success());
    let summaries: Vec<RolloutSummary> = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u64> = summaries.iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![db2, db1, paused]);

    // By age: everything that ended over a second ago goes, but the newest
    // rollout and entry (ids are never handed out again) and the active one.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    fleet.set_server_args(
        ["--rollout-retention", "1s", "--audit-retention", "1s"]
            .map(String::from)
            .to_vec(),
    );
    fleet.restart_server().await.unwrap();
    let api = fleet.api().unwrap();
    wait_until("db 1.0.0's rollout to be pruned", || {
        let api = api.clone();
        async move { get(&api, db1).await.is_err().then_some(()) }
    })
    .await;
    assert_eq!(listed(&fleet).await, vec![db2, paused]);
    let audit: Vec<AuditEntry> = api.get("/v1/audit").await.unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");

    // The paused rollout goes on, and new ids follow the old ones.
    assert!(cli(&fleet, &["rollout", "resume", &paused.to_string()])
        .status
        .success());
    assert!(wait_done(&fleet, paused).await.fully_upgraded());
    let db3 = roll(&fleet, "db", "3.0.0").await;
    assert!(db3 > db2);
    let audit: Vec<AuditEntry> = api.get("/v1/audit").await.unwrap();
    assert!(audit.windows(2).all(|w| w[0].id > w[1].id), "{audit:?}");
}

#[test]
fn a_bad_retention_flag_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (flag, value, needle) in [
        (
            "--rollout-retention",
            "soon",
            "--rollout-retention: \"soon\" is not a duration like 365d, 12h or 30m, or forever",
        ),
        (
            "--audit-retention",
            "0s",
            "--audit-retention: \"0s\" would keep nothing",
        ),
        (
            "--max-rollouts",
            "0",
            "--max-rollouts: \"0\" is not a whole number from 1, or unlimited",
        ),
        (
            "--max-audit-entries",
            "many",
            "--max-audit-entries: \"many\" is not a whole number",
        ),
    ] {
        let out = std::process::Command::new(exe())
            .args(["server", "--insecure-plain-http", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data)
            .args([flag, value])
            .output()
            .unwrap();
        assert_refused(&out, needle);
    }
    assert!(!data.exists(), "refused before anything was created");
}
