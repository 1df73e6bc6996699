//! The behaviour every [`Store`] engine must have, as one test suite.
//!
//! Each engine's tests call [`test_suite`] on a fresh, empty store, so an
//! engine cannot pass by being lenient where the server relies on it being
//! strict (compare-and-swap, id allocation, ordering). The small constructors
//! here are public so engines and their callers can build records for their
//! own tests.
//!
//! This is test support: it panics on the first failed expectation.

use std::collections::BTreeMap;

use rollwave_core::{
    plan_batches, ActiveVersion, ArtifactFormat, AuditEntry, Fleet, Health, NodeView, Release,
    Role, Rollout, RolloutFile, ServiceView, SignatureRecord, Timestamp, TokenRecord,
};

use crate::{Prune, PutRelease, RolloutWrite, Store, StoreError};

/// Runs every check against `store`, which must be empty.
pub async fn test_suite(store: &dyn Store) {
    nodes(store).await;
    releases(store).await;
    rollout_ids(store).await;
    rollouts(store).await;
    rollout_writes(store).await;
    concurrent_rollout_writes(store).await;
    summaries(store).await;
    active_versions(store).await;
    audit(store).await;
    tokens(store).await;
}

/// Deleting releases and pruning rollouts and audit entries, against
/// `store`, which must be empty.
pub async fn retention_suite(store: &dyn Store) {
    release_deletion(store).await;
    rollout_pruning(store).await;
    audit_pruning(store).await;
}

async fn release_deletion(store: &dyn Store) {
    let a = release("api", "1.0.0", "aaaa", 10);
    // The same bytes under another version.
    let b = release("api", "2.0.0", "aaaa", 20);
    let c = release("web", "1.0.0", "cccc", 30);
    for r in [&a, &b, &c] {
        store.put_release(r).await.unwrap();
    }
    let signature = SignatureRecord {
        key_id: "K1".into(),
        text: "sig".into(),
    };
    store
        .sign_release("api", "1.0.0", &signature)
        .await
        .unwrap()
        .unwrap();
    assert!(store.delete_release("api", "1.0.0").await.unwrap());
    assert_eq!(store.get_release("api", "1.0.0").await.unwrap(), None);
    assert_eq!(
        store.list_releases().await.unwrap(),
        vec![b.clone(), c.clone()],
        "the other version of the same bytes stays"
    );
    assert!(
        !store.delete_release("api", "1.0.0").await.unwrap(),
        "deleting again finds nothing"
    );
    assert!(!store.delete_release("api", "9.9.9").await.unwrap());
    // Pushed again, it is a new release: its old signature went with it.
    assert_eq!(
        store.put_release(&a).await.unwrap(),
        PutRelease::Created(a.clone())
    );
    assert_eq!(store.get_release("api", "1.0.0").await.unwrap(), Some(a));
}

async fn rollout_pruning(store: &dyn Store) {
    let prune = |before, keep, limit| Prune {
        before,
        keep,
        limit,
    };
    let ids_listed = || async {
        store
            .list_rollouts()
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        store.prune_rollouts(&prune(u64::MAX, 1, 10)).await.unwrap(),
        0
    );
    // Eight rollouts, created a second apart; each but two cancelled half a
    // second after it was created.
    let mut ids = Vec::new();
    for i in 0..8u64 {
        let id = store.next_rollout_id().await.unwrap();
        let created = 1_000 * (i + 1);
        let mut r = rollout(id, created);
        match i {
            // Running: never pruned.
            2 => {}
            // Completed, but a node could not be reached: the rollout still
            // converges it, so it is active.
            4 => {
                r.state = rollwave_core::RolloutState::Completed;
                r.finished_at = Some(created + 500);
                if let Some(n) = r.nodes.values_mut().next() {
                    n.state = rollwave_core::NodeState::Unreachable;
                }
                assert!(r.is_active());
            }
            _ => r.cancel(created + 500).unwrap(),
        }
        store.insert_rollout(&r).await.unwrap();
        ids.push(id);
    }
    assert_eq!(
        store.prune_rollouts(&prune(1_000, 1, 10)).await.unwrap(),
        0,
        "nothing ended before the first was created"
    );
    // Two ended before 3,600 (the third runs); one per call.
    for want in [1, 1, 0] {
        assert_eq!(
            store.prune_rollouts(&prune(3_600, 1, 1)).await.unwrap(),
            want
        );
    }
    let mut left: Vec<u64> = ids[2..].iter().rev().copied().collect();
    assert_eq!(ids_listed().await, left);
    assert_eq!(store.get_rollout(ids[0]).await.unwrap(), None);
    // The count alone: the newest three stay; of the others, only the
    // cancelled one goes (one runs, one converges).
    assert_eq!(
        store
            .prune_rollouts(&prune(u64::MAX, 3, 100))
            .await
            .unwrap(),
        1
    );
    left.retain(|id| *id != ids[3]);
    assert_eq!(ids_listed().await, left);
    // Keeping none keeps the newest all the same.
    assert_eq!(
        store
            .prune_rollouts(&prune(u64::MAX, 0, 100))
            .await
            .unwrap(),
        2
    );
    assert_eq!(ids_listed().await, vec![ids[7], ids[4], ids[2]]);
    let active: Vec<u64> = store
        .list_active_rollouts()
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(active, vec![ids[2], ids[4]]);
    // Pages are still right across the gaps.
    let page = |limit, before| async move {
        store
            .list_rollout_summaries(limit, before)
            .await
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(page(2, None).await, vec![ids[7], ids[4]]);
    assert_eq!(page(2, Some(ids[4])).await, vec![ids[2]]);
    assert_eq!(page(2, Some(ids[2])).await, Vec::<u64>::new());
    let next = store.next_rollout_id().await.unwrap();
    assert!(next > ids[7], "id {next} handed out again");
    // Nothing of a pruned rollout is left behind: one stored again under
    // its id reads back as stored, without the old one's nodes or log.
    let mut again = rollout(ids[0], 50_000);
    again.nodes.retain(|name, _| name == "web-1");
    again.batches = vec![vec!["web-1".into()]];
    let stored = store.insert_rollout(&again).await.unwrap();
    assert_eq!(store.get_rollout(ids[0]).await.unwrap(), Some(stored));
}

async fn audit_pruning(store: &dyn Store) {
    let prune = |before, keep, limit| Prune {
        before,
        keep,
        limit,
    };
    let entry = |at| AuditEntry {
        id: 0,
        at,
        actor: "ops".into(),
        remote: None,
        action: "rollout.start".into(),
        target: String::new(),
        ok: true,
        status: 201,
        detail: String::new(),
    };
    let mut ids = Vec::new();
    for at in [10, 20, 30, 40, 50, 60] {
        ids.push(store.append_audit(&entry(at)).await.unwrap());
    }
    let ats = || async {
        store
            .list_audit(100, None)
            .await
            .unwrap()
            .iter()
            .map(|e| e.at)
            .collect::<Vec<_>>()
    };
    for want in [2, 1, 0] {
        assert_eq!(store.prune_audit(&prune(35, 1, 2)).await.unwrap(), want);
    }
    assert_eq!(ats().await, vec![60, 50, 40]);
    assert_eq!(
        store.prune_audit(&prune(u64::MAX, 2, 100)).await.unwrap(),
        1
    );
    assert_eq!(ats().await, vec![60, 50]);
    let page = store.list_audit(1, Some(ids[5])).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!((page[0].id, page[0].at), (ids[4], 50), "paging back");
    assert_eq!(
        store.prune_audit(&prune(u64::MAX, 0, 100)).await.unwrap(),
        1,
        "the newest stays"
    );
    assert_eq!(ats().await, vec![60]);
    let next = store.append_audit(&entry(70)).await.unwrap();
    assert!(next > ids[5], "audit id {next} handed out again");
}

async fn tokens(store: &dyn Store) {
    assert_eq!(store.list_tokens().await.unwrap(), vec![]);
    let token = |id: &str, name: &str| TokenRecord {
        id: id.into(),
        name: name.into(),
        role: Role::Join,
        node: None,
        secret_sha256: "00".repeat(32),
        created_at: 1,
        created_by: "bootstrap-admin".into(),
        expires_at: Some(10),
        revoked_at: None,
        uses_left: Some(1),
    };
    // Ids sort the other way from the order of creation.
    store.put_token(&token("ff", "first")).await.unwrap();
    store.put_token(&token("00", "second")).await.unwrap();
    let mut used = token("ff", "first");
    used.uses_left = Some(0);
    used.revoked_at = Some(5);
    store.put_token(&used).await.unwrap();
    assert_eq!(
        store.list_tokens().await.unwrap(),
        vec![used.clone(), token("00", "second")],
        "replaced in place, oldest first"
    );
    // An enrollment: the join token's use and the new credential together.
    let mut spent = token("00", "second");
    spent.uses_left = Some(0);
    let mut credential = token("aa", "agent@web-1");
    credential.role = Role::Agent;
    credential.node = Some("web-1".into());
    store
        .put_tokens(&[spent.clone(), credential.clone()])
        .await
        .unwrap();
    assert_eq!(
        store.list_tokens().await.unwrap(),
        vec![used, spent, credential]
    );
}

async fn audit(store: &dyn Store) {
    assert_eq!(store.list_audit(10, None).await.unwrap(), vec![]);
    let entry = |action: &str, at| AuditEntry {
        id: 0,
        at,
        actor: "ops".into(),
        remote: Some("127.0.0.1:5000".into()),
        action: action.into(),
        target: "rollout 7".into(),
        ok: true,
        status: 200,
        detail: String::new(),
    };
    let mut ids = Vec::new();
    for (i, action) in ["rollout.start", "rollout.pause", "rollout.resume"]
        .iter()
        .enumerate()
    {
        ids.push(store.append_audit(&entry(action, i as u64)).await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let all = store.list_audit(10, None).await.unwrap();
    let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["rollout.resume", "rollout.pause", "rollout.start"],
        "newest first"
    );
    assert_eq!(all[0].id, ids[2]);
    assert_eq!(
        all[2],
        AuditEntry {
            id: ids[0],
            ..entry("rollout.start", 0)
        }
    );
    let page = store.list_audit(1, Some(ids[2])).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, ids[1], "paging back from an id");
}

async fn active_versions(store: &dyn Store) {
    assert_eq!(store.list_active_versions().await.unwrap(), vec![]);
    assert_eq!(store.get_active_version("api").await.unwrap(), None);
    let v = |service: &str, version: &str, at| ActiveVersion {
        service: service.into(),
        version: version.into(),
        set_at: at,
        by: "finalize".into(),
    };
    store
        .set_active_version(&v("db", "1.0.0", 1))
        .await
        .unwrap();
    store
        .set_active_version(&v("api", "1.0.0", 2))
        .await
        .unwrap();
    store
        .set_active_version(&v("api", "2.0.0", 3))
        .await
        .unwrap();
    assert_eq!(
        store.list_active_versions().await.unwrap(),
        vec![v("api", "2.0.0", 3), v("db", "1.0.0", 1)],
        "one per service, by name, the last write wins"
    );
    assert_eq!(
        store.get_active_version("api").await.unwrap(),
        Some(v("api", "2.0.0", 3))
    );
}

/// A node running `api` at `version` (or not running it, if `None`), online.
pub fn node(name: &str, labels: &[(&str, &str)], version: Option<&str>) -> NodeView {
    NodeView {
        name: name.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        online: true,
        last_seen: 1_000,
        services: BTreeMap::from([(
            "api".to_string(),
            ServiceView {
                version: version.map(str::to_string),
                health: if version.is_some() {
                    Health::Healthy
                } else {
                    Health::Stopped
                },
                staged: version.map(str::to_string).into_iter().collect(),
                ..Default::default()
            },
        )]),
    }
}

pub fn release(service: &str, version: &str, sha256: &str, created_at: Timestamp) -> Release {
    Release {
        service: service.to_string(),
        version: version.to_string(),
        sha256: sha256.to_string(),
        size: 1234,
        format: ArtifactFormat::TarGz,
        filename: format!("{service}-{version}.tar.gz"),
        created_at,
        manifest: None,
        signatures: vec![],
    }
}

/// A fresh rollout of `api` 2.0.0 over three nodes, as the planner creates it
/// (generation 0, not yet stored).
pub fn rollout(id: u64, now: Timestamp) -> Rollout {
    let spec = RolloutFile {
        service: Some("api".into()),
        version: Some("2.0.0".into()),
        ..Default::default()
    }
    .resolve()
    .expect("a valid rollout spec");
    let fleet: Fleet = ["web-1", "web-2", "web-3"]
        .into_iter()
        .map(|name| (name.to_string(), node(name, &[], Some("1.0.0"))))
        .collect();
    plan_batches(id, spec, &fleet, now).expect("planning a rollout over a fleet running api")
}

async fn nodes(store: &dyn Store) {
    assert_eq!(store.list_nodes().await.unwrap(), vec![]);

    let b = node("node-b", &[("zone", "b")], Some("1.0.0"));
    let a = node("node-a", &[("zone", "a")], None);
    store.upsert_node(&b).await.unwrap();
    store.upsert_node(&a).await.unwrap();
    let offline = |n: &NodeView| NodeView {
        online: false,
        ..n.clone()
    };
    assert_eq!(
        store.list_nodes().await.unwrap(),
        vec![offline(&a), offline(&b)],
        "nodes are listed by name, with online = false"
    );

    let mut a2 = node("node-a", &[("zone", "c"), ("tier", "edge")], Some("2.0.0"));
    a2.last_seen = 5_000;
    store.upsert_node(&a2).await.unwrap();
    assert_eq!(
        store.list_nodes().await.unwrap(),
        vec![offline(&a2), offline(&b)],
        "an upsert replaces the node of the same name"
    );

    // Several at once, in one transaction: new ones added, others replaced.
    let c = node("node-c", &[], Some("1.0.0"));
    let mut b2 = b.clone();
    b2.last_seen = 6_000;
    store.upsert_nodes(&[c.clone(), b2.clone()]).await.unwrap();
    assert_eq!(
        store.list_nodes().await.unwrap(),
        vec![offline(&a2), offline(&b2), offline(&c)]
    );
}

async fn releases(store: &dyn Store) {
    assert_eq!(store.list_releases().await.unwrap(), vec![]);
    assert_eq!(store.get_release("api", "2.0.0").await.unwrap(), None);

    let api2 = release("api", "2.0.0", "aaaa", 200);
    assert_eq!(
        store.put_release(&api2).await.unwrap(),
        PutRelease::Created(api2.clone())
    );
    assert_eq!(
        store.get_release("api", "2.0.0").await.unwrap(),
        Some(api2.clone())
    );

    // Pushing the same content again later keeps the original record.
    let again = release("api", "2.0.0", "aaaa", 900);
    assert_eq!(
        store.put_release(&again).await.unwrap(),
        PutRelease::Unchanged(api2.clone())
    );

    let different = release("api", "2.0.0", "bbbb", 900);
    assert_eq!(
        store.put_release(&different).await.unwrap(),
        PutRelease::Conflict(api2.clone())
    );
    assert_eq!(
        store.get_release("api", "2.0.0").await.unwrap(),
        Some(api2.clone()),
        "a conflicting push stores nothing"
    );

    // Signatures are added to the same content, each once; a push without
    // one keeps them. (Real signatures are compared by key and trusted
    // comment, in core; these stand-ins by their text.)
    let sig = |text: &str| SignatureRecord {
        key_id: "0123456789ABCDEF".into(),
        text: text.into(),
    };
    let signed = |text: &str| Release {
        signatures: vec![sig(text)],
        ..release("api", "2.0.0", "aaaa", 900)
    };
    let api2 = Release {
        signatures: vec![sig("sig-a")],
        ..api2
    };
    assert_eq!(
        store.put_release(&signed("sig-a")).await.unwrap(),
        PutRelease::Signed(api2.clone())
    );
    assert_eq!(
        store.get_release("api", "2.0.0").await.unwrap(),
        Some(api2.clone()),
        "the signature is stored, the rest of the record kept"
    );
    for push in [signed("sig-a"), again] {
        assert_eq!(
            store.put_release(&push).await.unwrap(),
            PutRelease::Unchanged(api2.clone())
        );
    }
    let api2 = Release {
        signatures: vec![sig("sig-a"), sig("sig-b")],
        ..api2
    };
    assert_eq!(
        store.put_release(&signed("sig-b")).await.unwrap(),
        PutRelease::Signed(api2.clone()),
        "a second signature is added beside the first"
    );
    let api2 = Release {
        signatures: vec![sig("sig-a"), sig("sig-b"), sig("sig-c")],
        ..api2
    };
    assert_eq!(
        store
            .sign_release("api", "2.0.0", &sig("sig-c"))
            .await
            .unwrap(),
        Some(PutRelease::Signed(api2.clone())),
        "signing without the bytes adds one too"
    );
    assert_eq!(
        store
            .sign_release("api", "2.0.0", &sig("sig-c"))
            .await
            .unwrap(),
        Some(PutRelease::Unchanged(api2.clone()))
    );
    assert_eq!(
        store
            .sign_release("api", "9.9.9", &sig("sig-c"))
            .await
            .unwrap(),
        None,
        "signing a missing release stores nothing"
    );
    assert_eq!(store.get_release("api", "9.9.9").await.unwrap(), None);
    let mut full = api2.clone();
    for i in full.signatures.len()..rollwave_core::MAX_RELEASE_SIGNATURES {
        let next = sig(&format!("sig-{i}"));
        full.signatures.push(next.clone());
        assert_eq!(
            store.sign_release("api", "2.0.0", &next).await.unwrap(),
            Some(PutRelease::Signed(full.clone()))
        );
    }
    assert_eq!(
        store.put_release(&signed("one-more")).await.unwrap(),
        PutRelease::TooManySignatures(full.clone())
    );
    let other_content = Release {
        sha256: "bbbb".into(),
        ..signed("sig-a")
    };
    assert_eq!(
        store.put_release(&other_content).await.unwrap(),
        PutRelease::Conflict(full.clone())
    );
    assert_eq!(
        store.get_release("api", "2.0.0").await.unwrap(),
        Some(full.clone()),
        "a refused push stores nothing"
    );
    let api2 = full;

    // Created out of order, across services, to check the listing order.
    let web1 = release("web", "1.0.0", "cccc", 50);
    let api1 = release("api", "1.0.0", "dddd", 100);
    let api3 = release("api", "3.0.0", "eeee", 300);
    for r in [&web1, &api3, &api1] {
        assert_eq!(
            store.put_release(r).await.unwrap(),
            PutRelease::Created(r.clone())
        );
    }
    assert_eq!(
        store.list_releases().await.unwrap(),
        vec![api1, api2, api3, web1.clone()],
        "releases are listed by service, then creation time"
    );
    assert_eq!(store.get_release("web", "1.0.0").await.unwrap(), Some(web1));
    assert_eq!(store.get_release("web", "2.0.0").await.unwrap(), None);
    assert_eq!(store.get_release("nope", "1.0.0").await.unwrap(), None);
}

async fn rollout_ids(store: &dyn Store) {
    let mut last = store.next_rollout_id().await.unwrap();
    assert!(last >= 1, "rollout ids start at 1, got {last}");
    for _ in 0..5 {
        let next = store.next_rollout_id().await.unwrap();
        assert!(next > last, "rollout id {next} after {last}");
        last = next;
    }

    // Callers allocating at the same time still get distinct ids.
    let (a, b, c) = tokio::join!(
        store.next_rollout_id(),
        store.next_rollout_id(),
        store.next_rollout_id()
    );
    let mut ids = vec![a.unwrap(), b.unwrap(), c.unwrap()];
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "concurrent allocations collided: {ids:?}");
    assert!(ids[0] > last, "ids {ids:?} reuse one up to {last}");
}

async fn rollouts(store: &dyn Store) {
    assert_eq!(store.list_rollouts().await.unwrap(), vec![]);

    let id = store.next_rollout_id().await.unwrap();
    assert_eq!(store.get_rollout(id).await.unwrap(), None);

    // Whatever generation the caller passes, a new rollout starts at 1.
    let mut planned = rollout(id, 10_000);
    planned.generation = 7;
    let v1 = store.insert_rollout(&planned).await.unwrap();
    assert_eq!(v1.generation, 1);
    assert_eq!(
        v1,
        Rollout {
            generation: 1,
            ..planned.clone()
        }
    );
    assert_eq!(store.get_rollout(id).await.unwrap(), Some(v1.clone()));

    match store.insert_rollout(&planned).await {
        Err(StoreError::AlreadyExists(got)) => assert_eq!(got, id),
        other => panic!("inserting rollout {id} twice: expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(store.get_rollout(id).await.unwrap(), Some(v1.clone()));

    // Several rollouts go in together or not at all.
    let (a, b) = (
        store.next_rollout_id().await.unwrap(),
        store.next_rollout_id().await.unwrap(),
    );
    match store
        .insert_rollouts(&[rollout(a, 10_000), rollout(id, 10_000)])
        .await
    {
        Err(StoreError::AlreadyExists(got)) => assert_eq!(got, id),
        other => panic!("expected AlreadyExists for rollout {id}, got {other:?}"),
    }
    assert_eq!(
        store.get_rollout(a).await.unwrap(),
        None,
        "half a group stored"
    );
    let pair = store
        .insert_rollouts(&[rollout(a, 10_000), rollout(b, 10_000)])
        .await
        .unwrap();
    assert_eq!(
        pair.iter().map(|r| r.generation).collect::<Vec<_>>(),
        [1, 1]
    );
    assert_eq!(store.get_rollout(b).await.unwrap(), Some(pair[1].clone()));

    // A write at the current generation wins and bumps it.
    let mut paused = v1.clone();
    paused.pause(11_000).unwrap();
    let v2 = store.update_rollout(&paused).await.unwrap();
    assert_eq!(v2.generation, 2);
    assert_eq!(
        v2,
        Rollout {
            generation: 2,
            ..paused
        }
    );
    assert_eq!(store.get_rollout(id).await.unwrap(), Some(v2.clone()));

    // A writer still holding generation 1 lost the race: refused, nothing stored.
    let mut stale = v1.clone();
    stale.cancel(12_000).unwrap();
    match store.update_rollout(&stale).await {
        Err(StoreError::Conflict {
            id: got,
            expected,
            found,
        }) => assert_eq!((got, expected, found), (id, 1, 2)),
        other => panic!("stale write of rollout {id}: expected Conflict, got {other:?}"),
    }
    assert_eq!(store.get_rollout(id).await.unwrap(), Some(v2.clone()));

    // A generation from the future is just as wrong.
    let ahead = Rollout {
        generation: 40,
        ..v2.clone()
    };
    match store.update_rollout(&ahead).await {
        Err(StoreError::Conflict {
            expected, found, ..
        }) => assert_eq!((expected, found), (40, 2)),
        other => panic!("write of rollout {id} at generation 40: expected Conflict, got {other:?}"),
    }
    assert_eq!(store.get_rollout(id).await.unwrap(), Some(v2.clone()));

    // Two writers racing from the same generation: exactly one wins.
    let mut resumed = v2.clone();
    resumed.resume(13_000).unwrap();
    let mut cancelled = v2.clone();
    cancelled.cancel(13_000).unwrap();
    let (r1, r2) = tokio::join!(
        store.update_rollout(&resumed),
        store.update_rollout(&cancelled)
    );
    let winner = match (r1, r2) {
        (Ok(w), Err(StoreError::Conflict { found: 3, .. }))
        | (Err(StoreError::Conflict { found: 3, .. }), Ok(w)) => w,
        other => panic!("racing writes of rollout {id}: expected one win, got {other:?}"),
    };
    assert_eq!(winner.generation, 3);
    assert_eq!(store.get_rollout(id).await.unwrap(), Some(winner.clone()));

    let missing = id + 1_000;
    let ghost = Rollout {
        id: missing,
        generation: 1,
        ..winner.clone()
    };
    match store.update_rollout(&ghost).await {
        Err(StoreError::NotFound(got)) => assert_eq!(got, missing),
        other => panic!("update of missing rollout {missing}: expected NotFound, got {other:?}"),
    }
    assert_eq!(store.get_rollout(missing).await.unwrap(), None);

    // Newest first: by id, not by creation time or last update.
    let id2 = store.next_rollout_id().await.unwrap();
    let second = store.insert_rollout(&rollout(id2, 5_000)).await.unwrap();
    let id3 = store.next_rollout_id().await.unwrap();
    let third = store.insert_rollout(&rollout(id3, 1_000)).await.unwrap();
    let winner = store.update_rollout(&winner).await.unwrap();
    assert_eq!(
        store.list_rollouts().await.unwrap(),
        vec![third, second, pair[1].clone(), pair[0].clone(), winner],
        "rollouts are listed newest first"
    );
}

/// Writes that carry only what changed: the rollout read back is the one
/// written, whatever part of it each write named.
async fn rollout_writes(store: &dyn Store) {
    let id = store.next_rollout_id().await.unwrap();
    let v1 = store.insert_rollout(&rollout(id, 20_000)).await.unwrap();
    let names: Vec<String> = v1.nodes.keys().cloned().collect();

    // One node changes and the log grows: only that is written.
    let mut next = v1.clone();
    next.nodes.get_mut(&names[0]).unwrap().reason = Some("looked at".into());
    next.pause(21_000).unwrap();
    let got = store
        .write_rollouts(&[RolloutWrite::diff(&v1, &next)])
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(*got[0].as_ref().unwrap(), 2);
    let v2 = Rollout {
        generation: 2,
        ..next
    };
    assert_eq!(store.get_rollout(id).await.unwrap(), Some(v2.clone()));

    // Several rollouts in one call: a lost swap refuses that one alone.
    let other = store.next_rollout_id().await.unwrap();
    let o1 = store.insert_rollout(&rollout(other, 20_000)).await.unwrap();
    let mut o2 = o1.clone();
    o2.cancel(22_000).unwrap();
    let mut stale = v1.clone();
    stale.cancel(22_000).unwrap();
    let got = store
        .write_rollouts(&[
            RolloutWrite::diff(&v1, &stale),
            RolloutWrite::diff(&o1, &o2),
        ])
        .await
        .unwrap();
    match &got[0] {
        Err(StoreError::Conflict {
            expected, found, ..
        }) => assert_eq!((*expected, *found), (1, 2)),
        other => panic!("stale write in a group: expected Conflict, got {other:?}"),
    }
    assert_eq!(*got[1].as_ref().unwrap(), 2);
    assert_eq!(store.get_rollout(id).await.unwrap(), Some(v2.clone()));
    let o2 = Rollout {
        generation: 2,
        ..o2
    };
    assert_eq!(store.get_rollout(other).await.unwrap(), Some(o2.clone()));

    // A full write replaces every part, the log included.
    let mut rewritten = v2.clone();
    rewritten.events.truncate(1);
    rewritten.nodes.get_mut(&names[1]).unwrap().reason = Some("full".into());
    let v3 = store.update_rollout(&rewritten).await.unwrap();
    assert_eq!(v3.generation, 3);
    assert_eq!(store.get_rollout(id).await.unwrap(), Some(v3.clone()));

    // Active: what the control plane loads at start.
    let active = store.list_active_rollouts().await.unwrap();
    assert!(
        active.contains(&v3),
        "a paused rollout is active: {active:?}"
    );
    assert!(
        !active.iter().any(|r| r.id == other),
        "a cancelled rollout with nothing in flight is not active"
    );
}

/// Writers racing on one rollout from many tasks: for each generation,
/// exactly one wins, and every write that won is the one stored next.
async fn concurrent_rollout_writes(store: &dyn Store) {
    let id = store.next_rollout_id().await.unwrap();
    let v1 = store.insert_rollout(&rollout(id, 30_000)).await.unwrap();
    let names: Vec<String> = v1.nodes.keys().cloned().collect();
    let mut current = v1;
    for round in 0..5u64 {
        let candidates: Vec<Rollout> = names
            .iter()
            .map(|name| {
                let mut r = current.clone();
                r.nodes.get_mut(name).unwrap().reason = Some(format!("round {round} by {name}"));
                r
            })
            .collect();
        let writes = candidates.iter().map(|r| async {
            store
                .write_rollouts(&[RolloutWrite::diff(&current, r)])
                .await
                .unwrap()
                .remove(0)
        });
        let results = futures_join_all(writes).await;
        let winners: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_ok())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for (i, r) in results.iter().enumerate() {
            if i != winners[0] {
                assert!(
                    matches!(r, Err(StoreError::Conflict { .. })),
                    "round {round}: a loser must see a conflict, got {r:?}"
                );
            }
        }
        let won = Rollout {
            generation: current.generation + 1,
            ..candidates[winners[0]].clone()
        };
        assert_eq!(store.get_rollout(id).await.unwrap(), Some(won.clone()));
        current = won;
    }
}

/// Polls every future together on one task, as concurrent requests would
/// reach a store (the suite depends on no particular runtime feature).
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut pending: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, f) in pending.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}

/// Summaries page back from the newest rollout and count nodes per state
/// without reading the node records.
async fn summaries(store: &dyn Store) {
    let all = store.list_rollouts().await.unwrap();
    assert!(all.len() >= 3, "the suite stored rollouts before this");
    let first = store.list_rollout_summaries(2, None).await.unwrap();
    assert_eq!(
        first.iter().map(|s| s.id).collect::<Vec<_>>(),
        all.iter().take(2).map(|r| r.id).collect::<Vec<_>>(),
        "newest first"
    );
    let next = store
        .list_rollout_summaries(2, Some(first[1].id))
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|s| s.id).collect::<Vec<_>>(),
        all.iter().skip(2).take(2).map(|r| r.id).collect::<Vec<_>>(),
        "the next page starts below the cursor"
    );
    for r in &all {
        let s = store
            .list_rollout_summaries(1, Some(r.id + 1))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(s, rollwave_core::RolloutSummary::of(r), "rollout {}", r.id);
    }
    assert_eq!(
        store.list_rollout_summaries(5, Some(1)).await.unwrap(),
        vec![]
    );
}

/// `store copy` between two engines: `from` and `to` must be empty. The
/// copy brings every kind of record, refuses a non-empty target unless
/// forced, and a forced copy again changes nothing.
/// Writes one record or more of every kind into `from`; returns its
/// token, active version and last rollout id.
pub async fn fill(from: &dyn Store) -> (TokenRecord, ActiveVersion, u64) {
    from.upsert_nodes(&[
        node("a", &[("zone", "z1")], Some("1.0.0")),
        node("b", &[], None),
    ])
    .await
    .unwrap();
    from.put_release(&release("api", "1.0.0", "aaaa", 10))
        .await
        .unwrap();
    from.put_release(&release("api", "2.0.0", "bbbb", 20))
        .await
        .unwrap();
    let token = TokenRecord {
        id: "t1".into(),
        name: "ops".into(),
        role: Role::Operator,
        node: None,
        secret_sha256: "00".repeat(32),
        created_at: 1,
        created_by: "bootstrap-admin".into(),
        expires_at: None,
        revoked_at: None,
        uses_left: None,
    };
    from.put_token(&token).await.unwrap();
    let active = ActiveVersion {
        service: "api".into(),
        version: "1.0.0".into(),
        set_at: 5,
        by: "ops".into(),
    };
    from.set_active_version(&active).await.unwrap();
    let first = from.next_rollout_id().await.unwrap();
    from.insert_rollout(&rollout(first, 1_000)).await.unwrap();
    let second = from.next_rollout_id().await.unwrap();
    let mut r2 = from.insert_rollout(&rollout(second, 2_000)).await.unwrap();
    r2.pause(3_000).unwrap();
    from.update_rollout(&r2).await.unwrap();
    for (i, action) in ["push", "start"].iter().enumerate() {
        from.append_audit(&AuditEntry {
            id: 0,
            at: i as u64,
            actor: "ops".into(),
            remote: None,
            action: (*action).into(),
            target: "api".into(),
            ok: true,
            status: 200,
            detail: String::new(),
        })
        .await
        .unwrap();
    }

    (token, active, second)
}

pub async fn copy_suite(from: &dyn Store, to: &dyn Store) {
    use crate::copy::{copy, CopyError};
    let (token, active, second) = fill(from).await;

    let done = copy(from, to, false).await.unwrap();
    assert_eq!(
        (
            done.nodes,
            done.tokens,
            done.releases,
            done.rollouts,
            done.audit
        ),
        (2, 1, (2, 0), (2, 0), (2, 0))
    );
    assert_eq!(
        to.list_nodes().await.unwrap(),
        from.list_nodes().await.unwrap()
    );
    assert_eq!(
        to.list_releases().await.unwrap(),
        from.list_releases().await.unwrap()
    );
    assert_eq!(to.list_tokens().await.unwrap(), vec![token]);
    assert_eq!(to.list_active_versions().await.unwrap(), vec![active]);
    let copied = to.list_rollouts().await.unwrap();
    let source = from.list_rollouts().await.unwrap();
    assert_eq!(copied.len(), 2);
    for (c, s) in copied.iter().zip(&source) {
        // A copy starts its generations again.
        assert_eq!(
            c,
            &Rollout {
                generation: 1,
                ..s.clone()
            }
        );
    }
    let actions = |entries: Vec<AuditEntry>| -> Vec<String> {
        entries.into_iter().map(|e| e.action).collect()
    };
    assert_eq!(
        actions(to.list_audit(10, None).await.unwrap()),
        vec!["start", "push"]
    );
    assert!(
        to.next_rollout_id().await.unwrap() > second,
        "ids go on above the copied rollouts"
    );

    match copy(from, to, false).await {
        Err(CopyError::NotEmpty(held)) => assert!(held.contains("nodes"), "{held}"),
        other => panic!("a copy into a non-empty store: {other:?}"),
    }
    let again = copy(from, to, true).await.unwrap();
    assert_eq!(
        (again.releases, again.rollouts, again.audit),
        ((0, 2), (0, 2), (0, 2))
    );
    assert_eq!(to.list_audit(10, None).await.unwrap().len(), 2);
}

/// [`Store::snapshot`] on `store`, which must be empty: it holds what the
/// lists hold, one instant of it while a rollout is written concurrently,
/// and [`Store::continue_from`] only ever raises the term.
pub async fn snapshot_suite(store: &dyn Store) {
    fill(store).await;
    let snapshot = store.snapshot().await.unwrap();
    assert_eq!(snapshot.nodes, store.list_nodes().await.unwrap());
    assert_eq!(snapshot.tokens, store.list_tokens().await.unwrap());
    assert_eq!(snapshot.releases, store.list_releases().await.unwrap());
    assert_eq!(
        snapshot.active_versions,
        store.list_active_versions().await.unwrap()
    );
    assert_eq!(snapshot.rollouts, store.list_rollouts().await.unwrap());
    let mut audit = store.list_audit(100, None).await.unwrap();
    audit.reverse();
    assert_eq!(snapshot.audit, audit, "oldest first");

    // A rollout written over and over, every node record and the header
    // together: each snapshot sees one write whole, never half of one.
    let id = store.next_rollout_id().await.unwrap();
    let first = store.insert_rollout(&rollout(id, 40_000)).await.unwrap();
    let writes = 30u64;
    let writer = async {
        let mut current = first.clone();
        for k in 1..=writes {
            let mut next = current.clone();
            for n in next.nodes.values_mut() {
                n.reason = Some(format!("write {k}"));
            }
            let generation = store
                .write_rollouts(&[RolloutWrite::diff(&current, &next)])
                .await
                .unwrap()
                .remove(0)
                .unwrap();
            current = Rollout { generation, ..next };
        }
    };
    let seen = std::sync::Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    let reader = async {
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let snapshot = store.snapshot().await.unwrap();
            let r = snapshot.rollouts.iter().find(|r| r.id == id).unwrap();
            let reasons: std::collections::BTreeSet<_> =
                r.nodes.values().map(|n| n.reason.clone()).collect();
            assert_eq!(reasons.len(), 1, "one write whole: {reasons:?}");
            let reason = reasons.into_iter().next().unwrap();
            let expected = (r.generation > 1).then(|| format!("write {}", r.generation - 1));
            assert_eq!(reason, expected, "the header and its nodes of one write");
            seen.lock().unwrap().push(r.generation);
            tokio::task::yield_now().await;
        }
    };
    let writer = async {
        writer.await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::join!(writer, reader);
    assert!(!seen.lock().unwrap().is_empty());

    let before = store.snapshot().await.unwrap().term;
    let base = store.term_base().await.unwrap();
    store.continue_from(base + 1_000, None).await.unwrap();
    assert_eq!(store.term_base().await.unwrap(), base + 1_000);
    store.continue_from(base + 10, None).await.unwrap();
    assert_eq!(
        store.term_base().await.unwrap(),
        base + 1_000,
        "never lowered"
    );
    assert!(store.snapshot().await.unwrap().term >= before + 1_000);
}

/// `store backup` from `from` and `store restore` into `to`, both empty:
/// the restored store holds what was saved, leads above its terms, and
/// every bad input is refused without writing.
pub async fn backup_suite(from: &dyn Store, to: &dyn Store, dir: &std::path::Path) {
    use crate::backup::{backup, restore, BackupError};
    use crate::copy::CopyError;
    let (token, active, _) = fill(from).await;
    let file = dir.join("rollwave.backup");
    let saved = backup(from, &file, false).await.unwrap();
    assert_eq!(
        (saved.nodes, saved.rollouts, saved.audit),
        (2, (2, 0), (2, 0))
    );
    match backup(from, &file, false).await {
        Err(BackupError::Exists(p)) => assert_eq!(p, file),
        other => panic!("a backup over an existing file: {other:?}"),
    }
    backup(from, &file, true).await.unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec!["rollwave.backup"],
        "one file, nothing beside it"
    );

    let not_a_backup = dir.join("other.db");
    rusqlite::Connection::open(&not_a_backup)
        .unwrap()
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    for bad in [not_a_backup.clone(), dir.join("missing")] {
        let err = restore(&bad, to, false).await.unwrap_err();
        assert!(
            matches!(err, BackupError::NotABackup(..) | BackupError::Missing(_)),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with(&bad.display().to_string()),
            "{err}"
        );
    }
    std::fs::write(&not_a_backup, "not a database at all").unwrap();
    assert!(matches!(
        restore(&not_a_backup, to, false).await,
        Err(BackupError::NotABackup(..))
    ));
    assert_eq!(
        to.snapshot().await.unwrap().nodes,
        vec![],
        "nothing written"
    );

    let term = from.snapshot().await.unwrap().term;
    let restored = restore(&file, to, false).await.unwrap();
    assert_eq!(restored, saved);
    assert_eq!(
        to.list_nodes().await.unwrap(),
        from.list_nodes().await.unwrap()
    );
    assert_eq!(
        to.list_releases().await.unwrap(),
        from.list_releases().await.unwrap()
    );
    assert_eq!(to.list_tokens().await.unwrap(), vec![token]);
    assert_eq!(to.list_active_versions().await.unwrap(), vec![active]);
    let ids = |rs: Vec<Rollout>| rs.iter().map(|r| (r.id, r.state)).collect::<Vec<_>>();
    assert_eq!(
        ids(to.list_rollouts().await.unwrap()),
        ids(from.list_rollouts().await.unwrap())
    );
    assert!(
        to.term_base().await.unwrap() > term,
        "the restored store leads above every term of the saved one"
    );
    match restore(&file, to, false).await {
        Err(BackupError::Copy(CopyError::NotEmpty(_))) => {}
        other => panic!("a restore into a store that is not empty: {other:?}"),
    }
    let again = restore(&file, to, true).await.unwrap();
    assert_eq!(
        again.rollouts,
        (0, 2),
        "a forced restore adds nothing twice"
    );
}
