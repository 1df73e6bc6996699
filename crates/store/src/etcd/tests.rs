//! The etcd engine against a real etcd (Debian's `etcd-server`), started
//! per test on loopback in a temporary directory.

use super::testing::{free_port, TestEtcd};
use super::*;
use crate::conformance;

#[tokio::test(flavor = "multi_thread")]
async fn passes_the_conformance_suite() {
    let etcd = TestEtcd::start().await;
    // The connection check above wrote the default prefix's meta record:
    // the suite wants an empty store.
    conformance::test_suite(&etcd.store("/suite/").await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn passes_the_retention_suite() {
    let etcd = TestEtcd::start().await;
    conformance::retention_suite(&etcd.store("/retention/").await).await;
}

/// A rollout too large for one etcd transaction is split, and reads back
/// whole; a later write of a few nodes is one small transaction.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_larger_than_a_transaction_round_trips() {
    let etcd = TestEtcd::start().await;
    let store = etcd.store("/big/").await;
    let mut r = conformance::rollout(1, 1_000);
    let template = r.nodes.values().next().unwrap().clone();
    for i in 0..2_500 {
        r.nodes.insert(format!("node-{i:05}"), template.clone());
    }
    r.batches = vec![r.nodes.keys().cloned().collect()];
    let stored = store.insert_rollout(&r).await.unwrap();
    assert_eq!(store.get_rollout(1).await.unwrap(), Some(stored.clone()));
    let mut next = stored.clone();
    next.pause(2_000).unwrap();
    let generation = store
        .write_rollouts(&[RolloutWrite::diff(&stored, &next)])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(generation, 2);
    let read = store.get_rollout(1).await.unwrap().unwrap();
    assert_eq!(read, Rollout { generation, ..next });
    let summaries = store.list_rollout_summaries(10, None).await.unwrap();
    assert_eq!(summaries, vec![RolloutSummary::of(&read)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_etcd_is_named_in_one_line() {
    let port = free_port();
    let err = EtcdStore::connect(&EtcdOptions {
        endpoints: vec![format!("http://127.0.0.1:{port}")],
        ..Default::default()
    })
    .await
    .err()
    .expect("nothing listens there");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("storage failure: etcd http://127.0.0.1:{port}: ")),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_schema_is_refused() {
    let etcd = TestEtcd::start().await;
    let store = etcd.store("/newer/").await;
    let mut kv = store.client.kv_client();
    kv.put(
        store.key("meta"),
        format!(r#"{{"schema":{},"cluster":"x"}}"#, SCHEMA_VERSION + 1),
        None,
    )
    .await
    .unwrap();
    let err = EtcdStore::connect(&EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: "/newer/".into(),
        ..Default::default()
    })
    .await
    .err()
    .unwrap();
    assert!(
        err.to_string().contains(&format!(
            "schema version {}, newer than version {SCHEMA_VERSION}",
            SCHEMA_VERSION + 1
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_store_is_copied_into_etcd() {
    let etcd = TestEtcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = crate::SqliteStore::open(&dir.path().join("rollwave.db")).unwrap();
    conformance::copy_suite(&sqlite, &etcd.store("/copy/").await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn takes_a_snapshot_of_one_revision() {
    let etcd = TestEtcd::start().await;
    conformance::snapshot_suite(&etcd.store("/snapshot/").await).await;
}

/// A backup taken of etcd restores into SQLite, and one of SQLite into
/// etcd, which adopts no cluster id (SQLite has none) but leads above
/// every term.
#[tokio::test(flavor = "multi_thread")]
async fn is_backed_up_and_restored_across_engines() {
    let etcd = TestEtcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    let sqlite = |name: &str| crate::SqliteStore::open(&dir.path().join(name)).unwrap();
    conformance::backup_suite(&etcd.store("/from/").await, &sqlite("a.db"), &one).await;
    conformance::backup_suite(&sqlite("b.db"), &etcd.store("/to/").await, &two).await;
}

/// A restore into an empty prefix takes the backed-up cluster's id, so the
/// replicas' data dirs (bound to it) serve the restored store.
#[tokio::test(flavor = "multi_thread")]
async fn a_restored_cluster_keeps_its_id() {
    let etcd = TestEtcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let from = etcd.store("/old/").await;
    conformance::fill(&from).await;
    let file = dir.path().join("backup");
    crate::backup::backup(&from, &file, false).await.unwrap();
    let to = etcd.store("/new/").await;
    assert_ne!(to.cluster, from.cluster);
    crate::backup::restore(&file, &to, false).await.unwrap();
    let reopened = etcd.store("/new/").await;
    assert_eq!(reopened.cluster, from.cluster);
}
