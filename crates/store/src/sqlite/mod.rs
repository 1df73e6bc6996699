//! The default [`Store`] engine: one SQLite file beside the server.
//!
//! Records are stored as JSON text, with only the columns that queries key on
//! or compare (names, ids, generations, states, creation times) broken out. A
//! rollout is a header row, a plan row, one row per node and an append-only
//! log, so that a node result writes one node row and one log row, never the
//! whole rollout (the same keys an etcd engine would use:
//! `rollouts/<id>`, `rollouts/<id>/nodes/<name>`, `rollouts/<id>/log/<seq>`).
//!
//! Writes go through one thread that commits whatever is queued in one
//! transaction ([`writer`]); reads run on a connection of their own on
//! tokio's blocking pool. Neither blocks the async runtime.
//!
//! The schema is versioned with `PRAGMA user_version` so that a later
//! rollwave can migrate the file and an older one refuses to open a file it
//! does not understand.

mod rollouts;
#[cfg(test)]
mod tests;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rollwave_core::{
    ActiveVersion, AuditEntry, NodeView, Release, Repush, Rollout, RolloutSummary, SignatureRecord,
    TokenRecord,
};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::{Prune, PutRelease, Result, RolloutWrite, Snapshot, Store, StoreError};
use writer::Writer;

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
    // 4 -> 5: a rollout becomes a header, its plan, a row per node and an
    // append-only log, moved out of the one document it was. `active` is
    // what the server loads at start; rows written before it existed are
    // loaded unless plainly finished, and the server checks each anyway.
    "CREATE TABLE rollout_plans (
        rollout_id INTEGER PRIMARY KEY NOT NULL,
        json TEXT NOT NULL
    );
    CREATE TABLE rollout_nodes (
        rollout_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (rollout_id, name)
    ) WITHOUT ROWID;
    CREATE TABLE rollout_events (
        rollout_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (rollout_id, seq)
    ) WITHOUT ROWID;
    INSERT INTO rollout_plans (rollout_id, json)
        SELECT id, json_object('batches', json_extract(json, '$.batches'),
                               'left_out', json_extract(json, '$.left_out'))
        FROM rollouts;
    INSERT INTO rollout_nodes (rollout_id, name, state, json)
        SELECT r.id, n.key, json_extract(n.value, '$.state'), n.value
        FROM rollouts r, json_each(r.json, '$.nodes') n;
    INSERT INTO rollout_events (rollout_id, seq, json)
        SELECT r.id, e.key, e.value FROM rollouts r, json_each(r.json, '$.events') e;
    ALTER TABLE rollouts ADD COLUMN active INTEGER NOT NULL DEFAULT 1;
    UPDATE rollouts SET
        json = json_set(json, '$.nodes', json('{}'), '$.events', json('[]'),
                        '$.batches', json('[]'), '$.left_out', json('[]')),
        active = json_extract(json, '$.state') NOT IN ('completed', 'failed', 'cancelled', 'rolled_back')
            OR json_extract(json, '$.end_hooks_done') IS NOT 1
            OR EXISTS (SELECT 1 FROM rollout_nodes n WHERE n.rollout_id = rollouts.id
                       AND n.state IN ('upgrading', 'rolling_back', 'staging', 'converging',
                                       'dry_running', 'unreachable'));",
    // 5 -> 6: a release carries several signatures (`signatures`, a list
    // of key id and text) where it carried one (`signature`, `signed_by`).
    "UPDATE releases SET json = json_set(
        json_remove(json, '$.signature', '$.signed_by'),
        '$.signatures',
        CASE WHEN json_extract(json, '$.signature') IS NULL THEN json('[]')
        ELSE json_array(json_object(
            'key_id', coalesce(json_extract(json, '$.signed_by'), ''),
            'text', json_extract(json, '$.signature')))
        END);",
];

/// The schema version this code writes and understands.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const ROLLOUT_ID_COUNTER: &str = "rollout_id";
/// The term this store's control plane leads in: 0 unless the store took
/// over another's history ([`Store::continue_from`]).
const TERM_BASE_COUNTER: &str = "term_base";

/// Long enough to ride out another process's checkpoint or migration, short
/// enough that a wedged lock surfaces as an error rather than a hang.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Store`] in a single SQLite database file, in WAL mode.
pub struct SqliteStore {
    path: PathBuf,
    writer: Writer,
    /// Reads run on these, beside the writer: WAL lets them see the last
    /// commit without waiting for the one in progress. Several, so that a
    /// large read (a whole 10,000-node rollout) does not hold up small ones.
    readers: Arc<[Mutex<Connection>]>,
}

/// How many connections serve reads.
const READERS: usize = 4;

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
        let mut conn = connect(path)?;

        // Check before anything writes to the file: a newer rollwave may have
        // changed the meaning of tables this code would happily write to.
        let version = user_version(&conn).map_err(at(path, "reading schema version of"))?;
        refuse_unknown(path, version)?;

        // WAL lets readers (the API, a CLI inspecting the file, a backup)
        // proceed while the server writes. synchronous=FULL because a commit
        // lost to a power cut could hand out a rollout id again, and task ids
        // (which agents deduplicate on) derive from it; group commit keeps
        // the syncs few.
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

        let readers = (0..READERS)
            .map(|_| {
                let reader = connect(path)?;
                reader
                    .pragma_update(None, "query_only", true)
                    .map_err(at(path, "opening a reader of"))?;
                Ok(Mutex::new(reader))
            })
            .collect::<Result<Vec<_>>>()?;
        let writer = Writer::spawn(conn, path.display().to_string()).map_err(|e| {
            StoreError::Backend(format!("starting the writer of {}: {e}", path.display()))
        })?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer,
            readers: readers.into(),
        })
    }

    /// The file this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the whole database, as of one instant, to the new file
    /// `path`, as one file (no write-ahead log beside it), marked with
    /// `application_id`.
    pub(crate) async fn save_to(&self, path: &Path, application_id: i32) -> Result<()> {
        let (path, source) = (path.to_path_buf(), self.path.clone());
        // A connection of its own: the readers are query-only, and the
        // writer's batches are transactions, which VACUUM cannot run in.
        tokio::task::spawn_blocking(move || {
            let target = path.to_str().ok_or_else(|| {
                StoreError::Backend(format!("{}: not a UTF-8 path", path.display()))
            })?;
            connect(&source)?
                .execute("VACUUM INTO ?1", params![target])
                .map_err(at(&path, "writing"))?;
            let out = Connection::open(&path).map_err(at(&path, "opening"))?;
            out.pragma_update(None, "application_id", application_id)
                .map_err(at(&path, "marking"))?;
            let _: String = out
                .query_row("PRAGMA journal_mode = DELETE", [], |row| row.get(0))
                .map_err(at(&path, "leaving write-ahead logging on"))?;
            out.close().map_err(|(_, e)| at(&path, "closing")(e))
        })
        .await
        .map_err(|e| StoreError::Backend(format!("saving a copy: the task failed: {e}")))?
    }

    /// Runs `f` on the reader connection, on the blocking pool. `what`
    /// says what was being read, for errors.
    async fn read<R, F>(&self, what: String, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            // A free connection if there is one, else wait for the first.
            // A panic while a lock was held cannot leave a read half done
            // in a way that matters: poisoning carries no information.
            let conn = readers
                .iter()
                .find_map(|r| match r.try_lock() {
                    Ok(conn) => Some(conn),
                    Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                })
                .unwrap_or_else(|| readers[0].lock().unwrap_or_else(PoisonError::into_inner));
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("{what}: the reading task failed: {e}")))?
    }

    /// Wraps a SQLite error with what was being done and the file it was done to.
    fn backend(&self, what: &str) -> impl Fn(rusqlite::Error) -> StoreError {
        let message = format!("{what} in {}", self.path.display());
        move |e| StoreError::Backend(format!("{message}: {e}"))
    }
}

fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(at(path, "opening database"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(at(path, "setting busy timeout on"))?;
    Ok(conn)
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

/// Wraps a SQLite error with what was being done to which file.
fn failed(path: &str, what: &str) -> impl Fn(rusqlite::Error) -> StoreError {
    let message = format!("{what} in {path}");
    move |e| StoreError::Backend(format!("{message}: {e}"))
}

/// The stored release `service@version`, read inside a write.
fn read_release(
    conn: &Connection,
    path: &str,
    service: &str,
    version: &str,
) -> Result<Option<Release>> {
    let json: Option<String> = conn
        .query_row(
            "SELECT json FROM releases WHERE service = ?1 AND version = ?2",
            params![service, version],
            |row| row.get(0),
        )
        .optional()
        .map_err(failed(
            path,
            &format!("reading release {service}@{version}"),
        ))?;
    json.map(|json| decode_release(service, version, &json))
        .transpose()
}

/// Answers a push of `pushed` onto the stored `existing`, inside a write:
/// a new signature is stored, anything else changes nothing.
fn repush(
    conn: &Connection,
    path: &str,
    existing: Release,
    pushed: &Release,
) -> Result<PutRelease> {
    Ok(match existing.repush(pushed) {
        Repush::Same => PutRelease::Unchanged(existing),
        Repush::OtherContent => PutRelease::Conflict(existing),
        Repush::TooManySignatures => PutRelease::TooManySignatures(existing),
        Repush::Sign(signed) => {
            let key = format!("release {}@{}", signed.service, signed.version);
            let json = encode(&key, &signed)?;
            conn.execute(
                "UPDATE releases SET json = ?3 WHERE service = ?1 AND version = ?2",
                params![signed.service, signed.version, json],
            )
            .map_err(failed(path, &format!("signing {key}")))?;
            PutRelease::Signed(*signed)
        }
    })
}

fn decode_release(service: &str, version: &str, json: &str) -> Result<Release> {
    decode(format!("release {service}@{version}"), json)
}

/// Reads every row of a two-column `(key, json)` query.
fn pairs(conn: &Connection, sql: &str) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    rows.collect()
}

#[async_trait]
impl Store for SqliteStore {
    async fn upsert_nodes(&self, nodes: &[NodeView]) -> Result<()> {
        let rows = nodes
            .iter()
            .map(|node| {
                let stored = NodeView {
                    online: false,
                    ..node.clone()
                };
                Ok((
                    node.name.clone(),
                    encode(&format!("node {}", node.name), &stored)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let fail = self.backend("storing nodes");
        self.writer
            .write(move |conn| {
                let mut stmt = conn
                    .prepare_cached(
                        "INSERT INTO nodes (name, json) VALUES (?1, ?2)
                         ON CONFLICT (name) DO UPDATE SET json = excluded.json",
                    )
                    .map_err(&fail)?;
                for (name, json) in &rows {
                    stmt.execute(params![name, json]).map_err(&fail)?;
                }
                Ok(())
            })
            .await
    }

    async fn list_nodes(&self) -> Result<Vec<NodeView>> {
        let path = self.path.clone();
        self.read("listing nodes".into(), move |conn| nodes(conn, &path))
            .await
    }

    async fn put_release(&self, release: &Release) -> Result<PutRelease> {
        let release = release.clone();
        let path = self.path.display().to_string();
        self.writer
            .write(move |conn| {
                match read_release(conn, &path, &release.service, &release.version)? {
                    None => {
                        let key = format!("release {}@{}", release.service, release.version);
                        let json = encode(&key, &release)?;
                        let created_at = sql_int("release creation time", release.created_at)?;
                        conn.execute(
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
                        .map_err(failed(&path, &format!("storing {key}")))?;
                        Ok(PutRelease::Created(release))
                    }
                    Some(existing) => repush(conn, &path, existing, &release),
                }
            })
            .await
    }

    async fn sign_release(
        &self,
        service: &str,
        version: &str,
        signature: &SignatureRecord,
    ) -> Result<Option<PutRelease>> {
        let (service, version, signature) =
            (service.to_string(), version.to_string(), signature.clone());
        let path = self.path.display().to_string();
        self.writer
            .write(move |conn| {
                let Some(existing) = read_release(conn, &path, &service, &version)? else {
                    return Ok(None);
                };
                let pushed = Release {
                    signatures: vec![signature],
                    ..existing.clone()
                };
                repush(conn, &path, existing, &pushed).map(Some)
            })
            .await
    }

    async fn get_release(&self, service: &str, version: &str) -> Result<Option<Release>> {
        let (s, v) = (service.to_string(), version.to_string());
        let fail = self.backend(&format!("reading release {service}@{version}"));
        let json: Option<String> = self
            .read(
                format!("reading release {service}@{version}"),
                move |conn| {
                    conn.query_row(
                        "SELECT json FROM releases WHERE service = ?1 AND version = ?2",
                        params![s, v],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(fail)
                },
            )
            .await?;
        json.map(|json| decode_release(service, version, &json))
            .transpose()
    }

    async fn list_releases(&self) -> Result<Vec<Release>> {
        let path = self.path.clone();
        self.read("listing releases".into(), move |conn| releases(conn, &path))
            .await
    }

    async fn delete_release(&self, service: &str, version: &str) -> Result<bool> {
        let (s, v) = (service.to_string(), version.to_string());
        let fail = self.backend(&format!("deleting release {service}@{version}"));
        self.writer
            .write(move |conn| {
                // Its signatures are part of its record.
                let deleted = conn
                    .execute(
                        "DELETE FROM releases WHERE service = ?1 AND version = ?2",
                        params![s, v],
                    )
                    .map_err(fail)?;
                Ok(deleted > 0)
            })
            .await
    }

    async fn prune_rollouts(&self, prune: &Prune) -> Result<usize> {
        let prune = *prune;
        let path = self.path.display().to_string();
        self.writer
            .write(move |conn| rollouts::prune(conn, &path, &prune))
            .await
    }

    async fn prune_audit(&self, prune: &Prune) -> Result<usize> {
        let keep = i64::try_from(prune.keep.max(1)).unwrap_or(i64::MAX);
        let before = i64::try_from(prune.before).unwrap_or(i64::MAX);
        let limit = i64::try_from(prune.limit).unwrap_or(i64::MAX);
        let fail = self.backend("pruning the audit trail");
        self.writer
            .write(move |conn| {
                let below: Option<i64> = conn
                    .prepare_cached("SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?1")
                    .and_then(|mut s| s.query_row(params![keep - 1], |row| row.get(0)).optional())
                    .map_err(&fail)?;
                let Some(below) = below else {
                    return Ok(0);
                };
                // The oldest entries, up to the first written at or after
                // the cutoff: entries are appended as they happen, so the
                // ones after it are newer too (a clock set back only delays
                // their turn).
                let rows = {
                    let mut stmt = conn
                        .prepare_cached(
                            "SELECT id, json_extract(json, '$.at') FROM audit
                             WHERE id < ?1 ORDER BY id LIMIT ?2",
                        )
                        .map_err(&fail)?;
                    let rows = stmt
                        .query_map(params![below, limit], |row| {
                            Ok((row.get::<_, i64>(0)?, row.get::<_, Option<i64>>(1)?))
                        })
                        .map_err(&fail)?;
                    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&fail)?
                };
                let last = rows
                    .iter()
                    .take_while(|(_, at)| at.is_some_and(|at| at < before))
                    .last()
                    .map(|(id, _)| *id);
                let Some(last) = last else { return Ok(0) };
                // AUTOINCREMENT: the ids deleted are never handed out again.
                let deleted = conn
                    .prepare_cached("DELETE FROM audit WHERE id <= ?1")
                    .and_then(|mut s| s.execute(params![last]))
                    .map_err(&fail)?;
                Ok(deleted)
            })
            .await
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64> {
        let json = encode("audit entry", entry)?;
        let fail = self.backend("appending to the audit trail");
        self.writer
            .write(move |conn| {
                conn.prepare_cached("INSERT INTO audit (json) VALUES (?1)")
                    .and_then(|mut s| s.execute(params![json]))
                    .map_err(fail)?;
                u64::try_from(conn.last_insert_rowid()).map_err(|_| StoreError::Corrupt {
                    key: "audit".into(),
                    message: "negative row id".into(),
                })
            })
            .await
    }

    async fn list_audit(&self, limit: usize, before: Option<u64>) -> Result<Vec<AuditEntry>> {
        let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let path = self.path.clone();
        self.read("listing the audit trail".into(), move |conn| {
            audit(conn, &path, before, limit)
        })
        .await
    }

    async fn put_token(&self, token: &TokenRecord) -> Result<()> {
        self.put_tokens(std::slice::from_ref(token)).await
    }

    async fn put_tokens(&self, tokens: &[TokenRecord]) -> Result<()> {
        let rows = tokens
            .iter()
            .map(|t| Ok((t.id.clone(), encode(&format!("token {}", t.name), t)?)))
            .collect::<Result<Vec<_>>>()?;
        let fail = self.backend("storing tokens");
        self.writer
            .write(move |conn| {
                let mut stmt = conn
                    .prepare_cached(
                        "INSERT INTO tokens (id, json) VALUES (?1, ?2)
                         ON CONFLICT (id) DO UPDATE SET json = excluded.json",
                    )
                    .map_err(&fail)?;
                for (id, json) in &rows {
                    stmt.execute(params![id, json]).map_err(&fail)?;
                }
                Ok(())
            })
            .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let path = self.path.clone();
        self.read("listing tokens".into(), move |conn| tokens(conn, &path))
            .await
    }

    async fn set_active_version(&self, active: &ActiveVersion) -> Result<()> {
        let key = format!("active version of {}", active.service);
        let json = encode(&key, active)?;
        let service = active.service.clone();
        let fail = self.backend(&format!("storing {key}"));
        self.writer
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO active_versions (service, json) VALUES (?1, ?2)
                     ON CONFLICT (service) DO UPDATE SET json = excluded.json",
                    params![service, json],
                )
                .map_err(fail)?;
                Ok(())
            })
            .await
    }

    async fn list_active_versions(&self) -> Result<Vec<ActiveVersion>> {
        let path = self.path.clone();
        self.read("listing active versions".into(), move |conn| {
            active_versions(conn, &path)
        })
        .await
    }

    async fn next_rollout_id(&self) -> Result<u64> {
        let fail = self.backend("allocating a rollout id");
        self.writer
            .write(move |conn| {
                // Also above every stored rollout, so a counter lost to a
                // restored or hand-edited file still cannot hand out an id in use.
                let next: i64 = conn
                    .query_row(
                        "SELECT max(
                            coalesce((SELECT value FROM counters WHERE name = ?1), 0),
                            coalesce((SELECT max(id) FROM rollouts), 0)
                         ) + 1",
                        params![ROLLOUT_ID_COUNTER],
                        |row| row.get(0),
                    )
                    .map_err(&fail)?;
                conn.execute(
                    "INSERT INTO counters (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    params![ROLLOUT_ID_COUNTER, next],
                )
                .map_err(&fail)?;
                u64::try_from(next).map_err(|_| StoreError::Corrupt {
                    key: "counter rollout_id".into(),
                    message: format!("allocated id {next} is negative"),
                })
            })
            .await
    }

    async fn insert_rollouts(&self, new: &[Rollout]) -> Result<Vec<Rollout>> {
        let stored: Vec<Rollout> = new
            .iter()
            .map(|r| Rollout {
                generation: 1,
                ..r.clone()
            })
            .collect();
        let rows = stored
            .iter()
            .map(|r| rollouts::Encoded::new(&RolloutWrite::full(r), 1))
            .collect::<Result<Vec<_>>>()?;
        let path = self.path.display().to_string();
        self.writer
            .write(move |conn| {
                for row in &rows {
                    row.insert(conn, &path)?;
                }
                Ok(())
            })
            .await?;
        Ok(stored)
    }

    async fn write_rollouts(&self, writes: &[RolloutWrite<'_>]) -> Result<Vec<Result<u64>>> {
        let mut out: Vec<Option<Result<u64>>> = Vec::with_capacity(writes.len());
        let mut rows = Vec::with_capacity(writes.len());
        for w in writes {
            let next = w
                .rollout
                .generation
                .checked_add(1)
                .filter(|&n| i64::try_from(n).is_ok());
            let Some(next) = next else {
                out.push(Some(Err(StoreError::Backend(format!(
                    "rollout {}: generation {} cannot be incremented",
                    w.rollout.id, w.rollout.generation
                )))));
                continue;
            };
            match rollouts::Encoded::new(w, next) {
                Ok(row) => {
                    rows.push(row);
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let path = self.path.display().to_string();
        // Each rollout in a savepoint of its own: a lost swap undoes only
        // its own statements.
        let results = self
            .writer
            .write(move |conn| {
                Ok(rows
                    .iter()
                    .map(|row| {
                        conn.execute_batch("SAVEPOINT rollout")
                            .map_err(failed(&path, "opening a savepoint"))?;
                        let result = row.update(conn, &path);
                        let end = if result.is_ok() {
                            "RELEASE rollout"
                        } else {
                            "ROLLBACK TO rollout; RELEASE rollout"
                        };
                        conn.execute_batch(end)
                            .map_err(failed(&path, "closing a savepoint"))?;
                        result
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
        let mut results = results.into_iter();
        Ok(out
            .into_iter()
            .map(|slot| match slot {
                Some(refused) => refused,
                None => results.next().unwrap_or_else(|| {
                    Err(StoreError::Backend("a rollout write went missing".into()))
                }),
            })
            .collect())
    }

    async fn get_rollout(&self, id: u64) -> Result<Option<Rollout>> {
        // Ids this large are never stored, so they cannot be found.
        let Ok(sql_id) = i64::try_from(id) else {
            return Ok(None);
        };
        let path = self.path.display().to_string();
        self.read(format!("reading rollout {id}"), move |conn| {
            rollouts::read(conn, &path, sql_id)
        })
        .await
    }

    async fn list_rollouts(&self) -> Result<Vec<Rollout>> {
        let path = self.path.display().to_string();
        self.read("listing rollouts".into(), move |conn| {
            rollouts::read_where(conn, &path, "1 ORDER BY id DESC")
        })
        .await
    }

    async fn list_active_rollouts(&self) -> Result<Vec<Rollout>> {
        let path = self.path.display().to_string();
        let all = self
            .read("listing active rollouts".into(), move |conn| {
                rollouts::read_where(conn, &path, "active ORDER BY id")
            })
            .await?;
        // Rows migrated from before `active` existed were marked active
        // unless plainly finished: the rollout itself decides.
        Ok(all.into_iter().filter(Rollout::is_active).collect())
    }

    async fn list_rollout_summaries(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<RolloutSummary>> {
        let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let path = self.path.display().to_string();
        self.read("listing rollouts".into(), move |conn| {
            rollouts::summaries(conn, &path, before, limit)
        })
        .await
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let path = self.path.clone();
        self.read("taking a snapshot".into(), move |conn| {
            // One read transaction: every table as of the same commit,
            // whatever the writer commits meanwhile (WAL).
            let tx = conn
                .unchecked_transaction()
                .map_err(at(&path, "starting a read transaction in"))?;
            let display = path.display().to_string();
            let snapshot = Snapshot {
                nodes: nodes(&tx, &path)?,
                tokens: tokens(&tx, &path)?,
                releases: releases(&tx, &path)?,
                active_versions: active_versions(&tx, &path)?,
                rollouts: rollouts::read_where(&tx, &display, "1 ORDER BY id DESC")?,
                audit: {
                    let mut all = audit(&tx, &path, i64::MAX, i64::MAX)?;
                    all.reverse();
                    all
                },
                term: counter(&tx, &path, TERM_BASE_COUNTER)?,
                cluster: None,
            };
            tx.finish()
                .map_err(at(&path, "ending a read transaction in"))?;
            Ok(snapshot)
        })
        .await
    }

    async fn term_base(&self) -> Result<u64> {
        let path = self.path.clone();
        self.read("reading the term".into(), move |conn| {
            counter(conn, &path, TERM_BASE_COUNTER)
        })
        .await
    }

    async fn continue_from(&self, term: u64, _cluster: Option<&str>) -> Result<()> {
        // The lone control plane on SQLite leads in this term for good.
        let term = sql_int("term", term)?;
        let fail = self.backend("raising the term");
        self.writer
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO counters (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                    params![TERM_BASE_COUNTER, term],
                )
                .map_err(fail)?;
                Ok(())
            })
            .await
    }
}

/// Reads a counter, 0 if it was never set.
fn counter(conn: &Connection, path: &Path, name: &str) -> Result<u64> {
    let value: Option<i64> = conn
        .query_row(
            "SELECT value FROM counters WHERE name = ?1",
            params![name],
            |row| row.get(0),
        )
        .optional()
        .map_err(at(path, "reading a counter in"))?;
    Ok(value.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
}

fn nodes(conn: &Connection, path: &Path) -> Result<Vec<NodeView>> {
    let rows = pairs(conn, "SELECT name, json FROM nodes ORDER BY name")
        .map_err(at(path, "listing nodes in"))?;
    rows.into_iter()
        .map(|(name, json)| {
            let mut node: NodeView = decode(format!("node {name}"), &json)?;
            // Whatever an older version stored, liveness is never persisted.
            node.online = false;
            Ok(node)
        })
        .collect()
}

fn releases(conn: &Connection, path: &Path) -> Result<Vec<Release>> {
    let rows = (|| {
        // rowid breaks ties between releases pushed in the same
        // millisecond in the order they were pushed.
        let mut stmt = conn.prepare_cached(
            "SELECT service, version, json FROM releases
             ORDER BY service, created_at, rowid",
        )?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        rows.collect::<rusqlite::Result<Vec<(String, String, String)>>>()
    })()
    .map_err(at(path, "listing releases in"))?;
    rows.iter()
        .map(|(service, version, json)| decode_release(service, version, json))
        .collect()
}

/// Entries below `before`, newest first, at most `limit`.
fn audit(conn: &Connection, path: &Path, before: i64, limit: i64) -> Result<Vec<AuditEntry>> {
    let rows = (|| {
        let mut stmt = conn
            .prepare_cached("SELECT id, json FROM audit WHERE id < ?1 ORDER BY id DESC LIMIT ?2")?;
        let rows = stmt.query_map(params![before, limit], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect::<rusqlite::Result<Vec<(i64, String)>>>()
    })()
    .map_err(at(path, "listing the audit trail in"))?;
    rows.iter()
        .map(|(id, json)| {
            let mut e: AuditEntry = decode(format!("audit entry {id}"), json)?;
            e.id = *id as u64;
            Ok(e)
        })
        .collect()
}

fn tokens(conn: &Connection, path: &Path) -> Result<Vec<TokenRecord>> {
    let rows = pairs(conn, "SELECT id, json FROM tokens ORDER BY rowid")
        .map_err(at(path, "listing tokens in"))?;
    rows.iter()
        .map(|(id, json)| decode(format!("token {id}"), json))
        .collect()
}

fn active_versions(conn: &Connection, path: &Path) -> Result<Vec<ActiveVersion>> {
    let rows = pairs(
        conn,
        "SELECT service, json FROM active_versions ORDER BY service",
    )
    .map_err(at(path, "listing active versions in"))?;
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
