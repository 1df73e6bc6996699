//! The default [`Store`] engine: one SQLite file beside the server.
//!
//! Records are stored as JSON text, with only the columns that queries key on
//! or compare (names, ids, generations, creation times) broken out. The
//! schema is versioned with `PRAGMA user_version` so that a later rollwave
//! can migrate the file and an older one refuses to open a file it does not
//! understand.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rollwave_core::{ActiveVersion, AuditEntry, NodeView, Release, Repush, Rollout, TokenRecord};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::{PutRelease, Result, Store, StoreError};

/// `MIGRATIONS[i]` takes the schema from version `i` to version `i + 1`.
/// Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the initial schema.
    "CREATE TABLE nodes (
        name TEXT PRIMARY KEY NOT NULL,
        json TEXT NOT NULL
    );
    CREATE TABLE releases (
        service TEXT NOT NULL,
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        json TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (service, version)
    );
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY NOT NULL,
        generation INTEGER NOT NULL,
        json TEXT NOT NULL
    );
    CREATE TABLE counters (
        name TEXT PRIMARY KEY NOT NULL,
        value INTEGER NOT NULL
    );",
    "CREATE TABLE active_versions (
        service TEXT PRIMARY KEY NOT NULL,
        json TEXT NOT NULL
    );",
    // AUTOINCREMENT: ids are never reused, so a page boundary stays put.
    "CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        json TEXT NOT NULL
    );",
    // 3 -> 4: API tokens (their secrets' hashes, never the secrets).
    "CREATE TABLE tokens (
        id TEXT PRIMARY KEY NOT NULL,
        json TEXT NOT NULL
    );",
];

/// The schema version this code writes and understands.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const ROLLOUT_ID_COUNTER: &str = "rollout_id";

/// Long enough to ride out another process's checkpoint or migration, short
/// enough that a wedged lock surfaces as an error rather than a hang.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Store`] in a single SQLite database file, in WAL mode.
///
/// Every operation is a few short statements, so they run inline on the
/// calling task behind one connection rather than on a blocking pool.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the database at `path`, creating the file and its schema if they
    /// are missing and migrating an older schema. The parent directory must exist.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut conn = Connection::open(path).map_err(at(path, "opening database"))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(at(path, "setting busy timeout on"))?;

        // Check before anything writes to the file: a newer rollwave may have
        // changed the meaning of tables this code would happily write to.
        let version = user_version(&conn).map_err(at(path, "reading schema version of"))?;
        refuse_unknown(path, version)?;

        // WAL lets readers (a CLI inspecting the file, a backup) proceed
        // while the server writes. synchronous=FULL because a commit lost to
        // a power cut could hand out a rollout id again, and task ids (which
        // agents deduplicate on) derive from it; writes are rare enough that
        // the extra fsync costs nothing that matters.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(at(path, "enabling write-ahead logging on"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "enabling write-ahead logging on {}: journal mode stayed {mode:?}",
                path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(at(path, "setting synchronous mode on"))?;

        migrate(&mut conn, path)?;

        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// The file this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held unwound through any open
        // transaction, whose drop rolled it back: the connection is still
        // consistent, so poisoning carries no information here.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wraps a SQLite error with what was being done and the file it was done to.
    fn backend(&self, what: impl std::fmt::Display) -> impl FnOnce(rusqlite::Error) -> StoreError {
        let message = format!("{what} in {}", self.path.display());
        move |e| StoreError::Backend(format!("{message}: {e}"))
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Wraps a SQLite error met while opening or migrating `path`.
fn at<'a>(path: &'a Path, what: &'a str) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
    move |e| StoreError::Backend(format!("{what} {}: {e}", path.display()))
}

fn refuse_unknown(path: &Path, version: i64) -> Result<()> {
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "database {} has schema version {version}, newer than version {SCHEMA_VERSION} \
             that this rollwave understands: run a newer rollwave, or restore a backup \
             taken before the upgrade",
            path.display()
        )));
    }
    if version < 0 {
        return Err(StoreError::Backend(format!(
            "database {} has schema version {version}: it was not written by rollwave",
            path.display()
        )));
    }
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    // IMMEDIATE takes the write lock before reading the version, so two
    // processes opening the same new file cannot both run a migration.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(at(path, "locking for schema migration"))?;
    let from = user_version(&tx).map_err(at(path, "reading schema version of"))?;
    refuse_unknown(path, from)?;
    if from == SCHEMA_VERSION {
        return Ok(());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        tx.execute_batch(sql).map_err(|e| {
            StoreError::Backend(format!(
                "migrating {} to schema version {}: {e}",
                path.display(),
                i + 1
            ))
        })?;
    }
    // PRAGMA takes no bound parameters; the value is our own constant.
    tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
        .map_err(at(path, "recording schema version of"))?;
    tx.commit()
        .map_err(at(path, "committing schema migration of"))
}

fn encode<T: serde::Serialize>(key: &str, value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(format!("encoding {key}: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(key: impl Into<String>, json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        key: key.into(),
        message: e.to_string(),
    })
}

fn sql_int(what: &str, value: u64) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| StoreError::Backend(format!("{what} {value} is too large to store")))
}

fn rollout_key(id: u64) -> String {
    format!("rollout {id}")
}

/// Decodes a rollout row, checking the JSON against the columns the store
/// relies on: a mismatch means the file was edited or damaged, and trusting
/// either copy could let a stale write through.
fn decode_rollout(id: i64, generation: i64, json: &str) -> Result<Rollout> {
    let key = format!("rollout {id}");
    let rollout: Rollout = decode(&key, json)?;
    if i64::try_from(rollout.id) != Ok(id) || i64::try_from(rollout.generation) != Ok(generation) {
        return Err(StoreError::Corrupt {
            key,
            message: format!(
                "record says id {} generation {}, its row says id {id} generation {generation}",
                rollout.id, rollout.generation
            ),
        });
    }
    Ok(rollout)
}

fn decode_release(service: &str, version: &str, json: &str) -> Result<Release> {
    decode(format!("release {service}@{version}"), json)
}

#[async_trait]
impl Store for SqliteStore {
    async fn upsert_node(&self, node: &NodeView) -> Result<()> {
        let key = format!("node {}", node.name);
        let stored = NodeView {
            online: false,
            ..node.clone()
        };
        let json = encode(&key, &stored)?;
        self.conn()
            .execute(
                "INSERT INTO nodes (name, json) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET json = excluded.json",
                params![node.name, json],
            )
            .map_err(self.backend(format_args!("storing {key}")))?;
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<NodeView>> {
        let conn = self.conn();
        let rows = (|| {
            let mut stmt = conn.prepare_cached("SELECT name, json FROM nodes ORDER BY name")?;
            let rows = stmt.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get(1)?)))?;
            rows.collect::<rusqlite::Result<Vec<(String, String)>>>()
        })()
        .map_err(self.backend("listing nodes"))?;
        rows.into_iter()
            .map(|(name, json)| {
                let mut node: NodeView = decode(format!("node {name}"), &json)?;
                // Whatever an older version stored, liveness is never persisted.
                node.online = false;
                Ok(node)
            })
            .collect()
    }

    async fn put_release(&self, release: &Release) -> Result<PutRelease> {
        let key = format!("release {}@{}", release.service, release.version);
        let json = encode(&key, release)?;
        let created_at = sql_int("release creation time", release.created_at)?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.backend(format_args!("starting to store {key}")))?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT json FROM releases WHERE service = ?1 AND version = ?2",
                params![release.service, release.version],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.backend(format_args!("reading {key}")))?;
        let outcome = match existing {
            Some(json) => {
                let existing = decode_release(&release.service, &release.version, &json)?;
                match existing.repush(release) {
                    Repush::Same => PutRelease::Unchanged(existing),
                    Repush::OtherContent => PutRelease::Conflict(existing),
                    Repush::OtherSignature => PutRelease::SignatureConflict(existing),
                    Repush::Sign(signed) => {
                        let json = encode(&key, &signed)?;
                        tx.execute(
                            "UPDATE releases SET json = ?3 WHERE service = ?1 AND version = ?2",
                            params![release.service, release.version, json],
                        )
                        .map_err(self.backend(format_args!("signing {key}")))?;
                        PutRelease::Signed(*signed)
                    }
                }
            }
            None => {
                tx.execute(
                    "INSERT INTO releases (service, version, sha256, json, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        release.service,
                        release.version,
                        release.sha256,
                        json,
                        created_at
                    ],
                )
                .map_err(self.backend(format_args!("storing {key}")))?;
                PutRelease::Created(release.clone())
            }
        };
        tx.commit()
            .map_err(self.backend(format_args!("committing {key}")))?;
        Ok(outcome)
    }

    async fn get_release(&self, service: &str, version: &str) -> Result<Option<Release>> {
        let json: Option<String> = self
            .conn()
            .query_row(
                "SELECT json FROM releases WHERE service = ?1 AND version = ?2",
                params![service, version],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.backend(format_args!("reading release {service}@{version}")))?;
        json.map(|json| decode_release(service, version, &json))
            .transpose()
    }

    async fn list_releases(&self) -> Result<Vec<Release>> {
        let conn = self.conn();
        let rows = (|| {
            // rowid breaks ties between releases pushed in the same millisecond
            // in the order they were pushed.
            let mut stmt = conn.prepare_cached(
                "SELECT service, version, json FROM releases
                 ORDER BY service, created_at, rowid",
            )?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            rows.collect::<rusqlite::Result<Vec<(String, String, String)>>>()
        })()
        .map_err(self.backend("listing releases"))?;
        rows.iter()
            .map(|(service, version, json)| decode_release(service, version, json))
            .collect()
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64> {
        let json = encode("audit entry", entry)?;
        let conn = self.conn();
        conn.execute("INSERT INTO audit (json) VALUES (?1)", params![json])
            .map_err(self.backend("appending to the audit trail"))?;
        u64::try_from(conn.last_insert_rowid()).map_err(|_| StoreError::Corrupt {
            key: "audit".into(),
            message: "negative row id".into(),
        })
    }

    async fn list_audit(&self, limit: usize, before: Option<u64>) -> Result<Vec<AuditEntry>> {
        let conn = self.conn();
        let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = (|| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, json FROM audit WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows =
                stmt.query_map(params![before, limit], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect::<rusqlite::Result<Vec<(i64, String)>>>()
        })()
        .map_err(self.backend("listing the audit trail"))?;
        rows.iter()
            .map(|(id, json)| {
                let mut e: AuditEntry = decode(format!("audit entry {id}"), json)?;
                e.id = *id as u64;
                Ok(e)
            })
            .collect()
    }

    async fn put_token(&self, token: &TokenRecord) -> Result<()> {
        let key = format!("token {}", token.name);
        let json = encode(&key, token)?;
        self.conn()
            .execute(
                "INSERT INTO tokens (id, json) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET json = excluded.json",
                params![token.id, json],
            )
            .map_err(self.backend(format_args!("storing {key}")))?;
        Ok(())
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let conn = self.conn();
        let rows = (|| {
            let mut stmt = conn.prepare_cached("SELECT id, json FROM tokens ORDER BY rowid")?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect::<rusqlite::Result<Vec<(String, String)>>>()
        })()
        .map_err(self.backend("listing tokens"))?;
        rows.iter()
            .map(|(id, json)| decode(format!("token {id}"), json))
            .collect()
    }

    async fn set_active_version(&self, active: &ActiveVersion) -> Result<()> {
        let key = format!("active version of {}", active.service);
        let json = encode(&key, active)?;
        self.conn()
            .execute(
                "INSERT INTO active_versions (service, json) VALUES (?1, ?2)
                 ON CONFLICT (service) DO UPDATE SET json = excluded.json",
                params![active.service, json],
            )
            .map_err(self.backend(format_args!("storing {key}")))?;
        Ok(())
    }

    async fn list_active_versions(&self) -> Result<Vec<ActiveVersion>> {
        let conn = self.conn();
        let rows = (|| {
            let mut stmt =
                conn.prepare_cached("SELECT service, json FROM active_versions ORDER BY service")?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect::<rusqlite::Result<Vec<(String, String)>>>()
        })()
        .map_err(self.backend("listing active versions"))?;
        rows.iter()
            .map(|(service, json)| {
                let key = format!("active version of {service}");
                let a: ActiveVersion = decode(&key, json)?;
                if &a.service != service {
                    return Err(StoreError::Corrupt {
                        key,
                        message: format!("the record names service {:?}", a.service),
                    });
                }
                Ok(a)
            })
            .collect()
    }

    async fn next_rollout_id(&self) -> Result<u64> {
        let mut conn = self.conn();
        let fail = || self.backend("allocating a rollout id");
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail())?;
        // Also above every stored rollout, so a counter lost to a restored
        // or hand-edited file still cannot hand out an id in use.
        let next: i64 = tx
            .query_row(
                "SELECT max(
                    coalesce((SELECT value FROM counters WHERE name = ?1), 0),
                    coalesce((SELECT max(id) FROM rollouts), 0)
                 ) + 1",
                params![ROLLOUT_ID_COUNTER],
                |row| row.get(0),
            )
            .map_err(fail())?;
        tx.execute(
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            params![ROLLOUT_ID_COUNTER, next],
        )
        .map_err(fail())?;
        tx.commit().map_err(fail())?;
        u64::try_from(next).map_err(|_| StoreError::Corrupt {
            key: "counter rollout_id".into(),
            message: format!("allocated id {next} is negative"),
        })
    }

    async fn insert_rollouts(&self, rollouts: &[Rollout]) -> Result<Vec<Rollout>> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(self.backend("starting a transaction"))?;
        let mut out = Vec::with_capacity(rollouts.len());
        for rollout in rollouts {
            let key = rollout_key(rollout.id);
            let id = sql_int("rollout id", rollout.id)?;
            let stored = Rollout {
                generation: 1,
                ..rollout.clone()
            };
            let json = encode(&key, &stored)?;
            let inserted = tx
                .execute(
                    "INSERT INTO rollouts (id, generation, json) VALUES (?1, 1, ?2)
                     ON CONFLICT (id) DO NOTHING",
                    params![id, json],
                )
                .map_err(self.backend(format_args!("storing {key}")))?;
            if inserted == 0 {
                // Dropping the transaction rolls back the ones before.
                return Err(StoreError::AlreadyExists(rollout.id));
            }
            out.push(stored);
        }
        tx.commit()
            .map_err(self.backend("committing new rollouts"))?;
        Ok(out)
    }

    async fn update_rollout(&self, rollout: &Rollout) -> Result<Rollout> {
        let key = rollout_key(rollout.id);
        let expected = rollout.generation;
        let Ok(id) = i64::try_from(rollout.id) else {
            return Err(StoreError::NotFound(rollout.id));
        };
        let Some(next) = expected
            .checked_add(1)
            .filter(|&n| i64::try_from(n).is_ok())
        else {
            return Err(StoreError::Backend(format!(
                "{key}: generation {expected} cannot be incremented"
            )));
        };
        let stored = Rollout {
            generation: next,
            ..rollout.clone()
        };
        let json = encode(&key, &stored)?;
        let mut conn = self.conn();
        // One transaction for the write and the read that explains a lost
        // swap, so the generation reported in a conflict is the one that won.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.backend(format_args!("starting to update {key}")))?;
        let changed = tx
            .execute(
                "UPDATE rollouts SET json = ?1, generation = generation + 1
                 WHERE id = ?2 AND generation = ?3",
                params![json, id, expected as i64],
            )
            .map_err(self.backend(format_args!("updating {key}")))?;
        if changed == 1 {
            tx.commit()
                .map_err(self.backend(format_args!("committing {key}")))?;
            return Ok(stored);
        }
        let found: Option<i64> = tx
            .query_row(
                "SELECT generation FROM rollouts WHERE id = ?1",
                params![id],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.backend(format_args!("reading {key}")))?;
        match found {
            None => Err(StoreError::NotFound(rollout.id)),
            Some(found) => match u64::try_from(found) {
                Ok(found) => Err(StoreError::Conflict {
                    id: rollout.id,
                    expected,
                    found,
                }),
                Err(_) => Err(StoreError::Corrupt {
                    key,
                    message: format!("generation {found} is negative"),
                }),
            },
        }
    }

    async fn get_rollout(&self, id: u64) -> Result<Option<Rollout>> {
        // Ids this large are never stored, so they cannot be found.
        let Ok(sql_id) = i64::try_from(id) else {
            return Ok(None);
        };
        let row: Option<(i64, String)> = self
            .conn()
            .query_row(
                "SELECT generation, json FROM rollouts WHERE id = ?1",
                params![sql_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(self.backend(format_args!("reading {}", rollout_key(id))))?;
        row.map(|(generation, json)| decode_rollout(sql_id, generation, &json))
            .transpose()
    }

    async fn list_rollouts(&self) -> Result<Vec<Rollout>> {
        let conn = self.conn();
        let rows = (|| {
            let mut stmt =
                conn.prepare_cached("SELECT id, generation, json FROM rollouts ORDER BY id DESC")?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            rows.collect::<rusqlite::Result<Vec<(i64, i64, String)>>>()
        })()
        .map_err(self.backend("listing rollouts"))?;
        rows.iter()
            .map(|(id, generation, json)| decode_rollout(*id, *generation, json))
            .collect()
    }
}

#[cfg(test)]
mod tests {
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
        store.conn().execute("DELETE FROM counters", []).unwrap();
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
        let conn = store.conn();
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
        store
            .conn()
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
        store
            .conn()
            .execute("UPDATE rollouts SET generation = 9 WHERE id = 5", [])
            .unwrap();
        let err = store.get_rollout(5).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { key, .. } if key == "rollout 5"),
            "{err:?}"
        );
    }
}
