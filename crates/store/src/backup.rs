//! `rollwave store backup` and `store restore`: the control plane's state
//! as one file, from either engine and into either engine.
//!
//! A backup is a SQLite database in the embedded engine's schema, taken
//! from one instant of the source ([`Store::snapshot`]: one SQLite read
//! transaction, one etcd revision), so it can be taken while the control
//! plane runs. It is written beside its destination and renamed into place
//! once synced: a backup cut short leaves no file that looks whole. The
//! file's SQLite `application_id` marks it as a backup, so that restoring
//! some other database is refused rather than read as an empty store.
//!
//! Release artifacts are not in it: they are files named by their sha256
//! in each control plane's data dir (`blobs/`), never changed once written,
//! and are backed up as files.

use std::path::{Path, PathBuf};

use crate::copy::{check_empty, import, Copied, CopyError};
use crate::{Snapshot, SqliteStore, Store, StoreError};

/// `PRAGMA application_id` of a backup file: "rwbk".
const APPLICATION_ID: i32 = 0x7277_626b;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} exists: choose another file, or pass --force to replace it")]
    Exists(PathBuf),
    #[error("{0}: no such file")]
    Missing(PathBuf),
    #[error("{0} is not a rollwave store backup ({1})")]
    NotABackup(PathBuf, String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(transparent)]
    Copy(#[from] CopyError),
}

impl From<StoreError> for BackupError {
    fn from(e: StoreError) -> BackupError {
        BackupError::Copy(CopyError::Store(e))
    }
}

/// Writes everything `from` holds, as of one instant, to `file`.
pub async fn backup(from: &dyn Store, file: &Path, force: bool) -> Result<Copied, BackupError> {
    if !force && file.exists() {
        return Err(BackupError::Exists(file.to_path_buf()));
    }
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |e| BackupError::Io(dir.clone(), e);
    // The store is built in a directory of its own (it has -wal and -shm
    // files beside it), then saved as one file beside the destination.
    let work = tempfile::Builder::new()
        .prefix(".rollwave-backup-")
        .tempdir_in(&dir)
        .map_err(io)?;
    let snapshot = from.snapshot().await?;
    let copy = SqliteStore::open(&work.path().join("store.db"))?;
    let done = import(&snapshot, &copy, snapshot.term, true).await?;
    let partial = work.path().join("backup.db");
    copy.save_to(&partial, APPLICATION_ID).await?;
    drop(copy);
    if let Some(cluster) = &snapshot.cluster {
        // Not a record of the embedded engine's schema: the cluster id of
        // a replicated store, which a restore gives back.
        rusqlite::Connection::open(&partial)
            .and_then(|c| {
                c.execute_batch("CREATE TABLE backup_cluster (id TEXT NOT NULL)")?;
                c.execute("INSERT INTO backup_cluster (id) VALUES (?1)", [cluster])
            })
            .map_err(|e| BackupError::Io(partial.clone(), std::io::Error::other(e)))?;
    }
    let synced = std::fs::File::open(&partial).and_then(|f| f.sync_all());
    synced.map_err(|e| BackupError::Io(partial.clone(), e))?;
    std::fs::rename(&partial, file).map_err(|e| BackupError::Io(file.to_path_buf(), e))?;
    // The rename is durable once the directory is.
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(done)
}

/// Loads the backup `file` into `to`, which must be empty unless `force`.
/// The backup file is read, never changed. The target hands out terms above
/// every term the backup's cluster could have used, even after the backup
/// was taken: above the backup's, and above the current time in
/// milliseconds (a term is an etcd revision, which grows far slower).
pub async fn restore(file: &Path, to: &dyn Store, force: bool) -> Result<Copied, BackupError> {
    if !file.exists() {
        return Err(BackupError::Missing(file.to_path_buf()));
    }
    let work = tempfile::Builder::new()
        .prefix(".rollwave-restore-")
        .tempdir()
        .map_err(|e| BackupError::Io(std::env::temp_dir(), e))?;
    // A copy is opened, not the file: opening migrates an older schema.
    let copy = work.path().join("store.db");
    std::fs::copy(file, &copy).map_err(|e| BackupError::Io(file.to_path_buf(), e))?;
    let cluster = check_backup(file, &copy)?;
    let empty = check_empty(to, force).await?;
    let source = SqliteStore::open(&copy)?;
    let snapshot = Snapshot {
        cluster,
        ..source.snapshot().await?
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok(import(&snapshot, to, snapshot.term.max(now), empty).await?)
}

/// Checks that `copy` (of `file`) is a backup; returns the cluster id it
/// keeps, if it was taken of a replicated store.
fn check_backup(file: &Path, copy: &Path) -> Result<Option<String>, BackupError> {
    let not = |why: String| BackupError::NotABackup(file.to_path_buf(), why);
    let conn = rusqlite::Connection::open_with_flags(
        copy,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| not(e.to_string()))?;
    let id: i32 = conn
        .query_row("PRAGMA application_id", [], |row| row.get(0))
        .map_err(|e| not(e.to_string()))?;
    if id != APPLICATION_ID {
        return Err(not(format!(
            "its SQLite application id is {id:#x}, not {APPLICATION_ID:#x}"
        )));
    }
    let cluster = conn.query_row("SELECT id FROM backup_cluster", [], |row| row.get(0));
    match cluster {
        Ok(id) => Ok(Some(id)),
        Err(rusqlite::Error::SqliteFailure(..)) => Ok(None),
        Err(e) => Err(not(e.to_string())),
    }
}
