//! The SQLite engine's own tests, beside the conformance suite.

use super::*;
use crate::conformance;

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollwave.db");
    (dir, path)
}

#[tokio::test]
async fn passes_the_conformance_suite() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).unwrap();
    conformance::test_suite(&store).await;
}

#[tokio::test]
async fn passes_the_retention_suite() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).unwrap();
    conformance::retention_suite(&store).await;
}

#[tokio::test]
async fn data_and_id_counter_survive_reopen() {
    let (_dir, path) = temp_db();
    let node = conformance::node("web-1", &[("zone", "a")], Some("1.0.0"));
    let release = conformance::release("api", "2.0.0", "aa", 100);
    let (id, rollout) = {
        let store = SqliteStore::open(&path).unwrap();
        store.upsert_node(&node).await.unwrap();
        store.put_release(&release).await.unwrap();
        let id = store.next_rollout_id().await.unwrap();
        let inserted = store
            .insert_rollout(&conformance::rollout(id, 1_000))
            .await
            .unwrap();
        let updated = store.update_rollout(&inserted).await.unwrap();
        (id, updated)
    };

    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.list_nodes().await.unwrap(), vec![node_offline(node)]);
    assert_eq!(store.list_releases().await.unwrap(), vec![release]);
    assert_eq!(store.get_rollout(id).await.unwrap(), Some(rollout.clone()));
    assert_eq!(rollout.generation, 2);
    let next = store.next_rollout_id().await.unwrap();
    assert!(next > id, "id {next} reused after reopen (last was {id})");
}

fn node_offline(node: NodeView) -> NodeView {
    NodeView {
        online: false,
        ..node
    }
}

#[tokio::test]
async fn ids_stay_above_stored_rollouts_if_the_counter_is_lost() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).unwrap();
    store
        .insert_rollout(&conformance::rollout(41, 1_000))
        .await
        .unwrap();
    raw(&path).execute("DELETE FROM counters", []).unwrap();
    assert_eq!(store.next_rollout_id().await.unwrap(), 42);
}

#[test]
fn refuses_a_database_from_a_newer_version() {
    let (_dir, path) = temp_db();
    drop(SqliteStore::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);

    let err = SqliteStore::open(&path).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
        "{message}"
    );
}

#[test]
fn creates_the_schema_at_the_current_version() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).unwrap();
    let conn = raw(store.path());
    assert_eq!(user_version(&conn).unwrap(), SCHEMA_VERSION);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn reports_a_file_that_is_not_a_database() {
    let (_dir, path) = temp_db();
    std::fs::write(
        &path,
        "definitely not sqlite, just some text that is long enough",
    )
    .unwrap();
    let message = SqliteStore::open(&path).unwrap_err().to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
}

#[tokio::test]
async fn corrupt_json_names_the_record() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).unwrap();
    store
        .insert_rollout(&conformance::rollout(3, 1_000))
        .await
        .unwrap();
    raw(&path)
        .execute("UPDATE rollouts SET json = '{\"id\": 3' WHERE id = 3", [])
        .unwrap();
    match store.get_rollout(3).await {
        Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "rollout 3"),
        other => panic!("expected a corrupt record, got {other:?}"),
    }
    match store.list_rollouts().await {
        Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "rollout 3"),
        other => panic!("expected a corrupt record, got {other:?}"),
    }
}

#[tokio::test]
async fn a_record_whose_generation_disagrees_with_its_row_is_corrupt() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).unwrap();
    store
        .insert_rollout(&conformance::rollout(5, 1_000))
        .await
        .unwrap();
    raw(&path)
        .execute("UPDATE rollouts SET generation = 9 WHERE id = 5", [])
        .unwrap();
    let err = store.get_rollout(5).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { key, .. } if key == "rollout 5"),
        "{err:?}"
    );
}

/// A connection of its own to the file, to damage it as a test needs.
fn raw(path: &std::path::Path) -> Connection {
    Connection::open(path).unwrap()
}

/// A file written by the schema before rollouts were split (version 4) is
/// migrated: every node, log entry and the plan come back as they were.
#[tokio::test]
async fn migrates_a_rollout_stored_as_one_document() {
    let (_dir, path) = temp_db();
    let mut rollout = conformance::rollout(7, 1_000);
    rollout.generation = 3;
    rollout.pause(2_000).unwrap();
    {
        let conn = raw(&path);
        conn.execute_batch(&MIGRATIONS[..4].join(";\n")).unwrap();
        conn.pragma_update(None, "user_version", 4).unwrap();
        conn.execute(
            "INSERT INTO rollouts (id, generation, json) VALUES (7, 3, ?1)",
            params![serde_json::to_string(&rollout).unwrap()],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert!(!rollout.nodes.is_empty() && !rollout.events.is_empty());
    assert_eq!(store.get_rollout(7).await.unwrap(), Some(rollout.clone()));
    assert_eq!(
        store.list_active_rollouts().await.unwrap(),
        vec![rollout.clone()]
    );
    let paused = store.update_rollout(&rollout).await.unwrap();
    assert_eq!(paused.generation, 4);
    assert_eq!(store.get_rollout(7).await.unwrap(), Some(paused));
}

/// Releases stored with one signature (version 5) come back with it as
/// their only one; unsigned ones with none.
#[tokio::test]
async fn migrates_a_release_with_one_signature() {
    let (_dir, path) = temp_db();
    {
        let conn = raw(&path);
        conn.execute_batch(&MIGRATIONS[..5].join(";\n")).unwrap();
        conn.pragma_update(None, "user_version", 5).unwrap();
        for (version, extra) in [
            ("1.0.0", r#","signature":null,"signed_by":null"#),
            (
                "2.0.0",
                r#","signature":"untrusted comment: x\n","signed_by":"ABCD""#,
            ),
        ] {
            let json = format!(
                r#"{{"service":"api","version":"{version}","sha256":"aa","size":1,"format":"tar_gz","filename":"api.tar.gz","created_at":1{extra}}}"#
            );
            conn.execute(
                "INSERT INTO releases (service, version, sha256, json, created_at)
                 VALUES ('api', ?1, 'aa', ?2, 1)",
                params![version, json],
            )
            .unwrap();
        }
    }
    let store = SqliteStore::open(&path).unwrap();
    let unsigned = store.get_release("api", "1.0.0").await.unwrap().unwrap();
    assert_eq!(unsigned.signatures, vec![]);
    let signed = store.get_release("api", "2.0.0").await.unwrap().unwrap();
    assert_eq!(
        signed.signatures,
        vec![rollwave_core::SignatureRecord {
            key_id: "ABCD".into(),
            text: "untrusted comment: x\n".into()
        }]
    );
}

/// What a node result writes: one node row and the new log entries, not
/// the other nodes (their rows are left as they were, even if a test
/// changed them behind the store's back).
#[tokio::test]
async fn a_write_touches_only_the_nodes_that_changed() {
    let (_dir, path) = temp_db();
    let store = SqliteStore::open(&path).unwrap();
    let v1 = store
        .insert_rollout(&conformance::rollout(9, 1_000))
        .await
        .unwrap();
    let names: Vec<String> = v1.nodes.keys().cloned().collect();
    assert!(names.len() >= 2, "{names:?}");
    raw(&path)
        .execute(
            "UPDATE rollout_nodes SET state = 'marked' WHERE rollout_id = 9 AND name = ?1",
            params![names[1]],
        )
        .unwrap();
    let mut next = v1.clone();
    next.nodes.get_mut(&names[0]).unwrap().reason = Some("changed".into());
    next.pause(2_000).unwrap();
    let generations = store
        .write_rollouts(&[crate::RolloutWrite::diff(&v1, &next)])
        .await
        .unwrap();
    assert_eq!(
        generations
            .into_iter()
            .map(|g| g.unwrap())
            .collect::<Vec<_>>(),
        [2]
    );
    let states: Vec<(String, String)> = {
        let conn = raw(&path);
        let mut stmt = conn
            .prepare("SELECT name, state FROM rollout_nodes WHERE rollout_id = 9 ORDER BY name")
            .unwrap();
        let rows = stmt
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap();
        rows.map(Result::unwrap).collect()
    };
    assert_eq!(states[1], (names[1].clone(), "marked".to_string()));
    let events: i64 = raw(&path)
        .query_row(
            "SELECT count(*) FROM rollout_events WHERE rollout_id = 9",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(events as usize, next.events.len());
}

#[tokio::test]
async fn copies_into_another_store() {
    let (_a, from) = temp_db();
    let (_b, to) = temp_db();
    conformance::copy_suite(
        &SqliteStore::open(&from).unwrap(),
        &SqliteStore::open(&to).unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn takes_a_snapshot_of_one_instant() {
    let (_dir, path) = temp_db();
    conformance::snapshot_suite(&SqliteStore::open(&path).unwrap()).await;
}

#[tokio::test]
async fn is_backed_up_and_restored() {
    let (_a, from) = temp_db();
    let (_b, to) = temp_db();
    let files = tempfile::tempdir().unwrap();
    conformance::backup_suite(
        &SqliteStore::open(&from).unwrap(),
        &SqliteStore::open(&to).unwrap(),
        files.path(),
    )
    .await;
}
