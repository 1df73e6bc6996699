//! Content-addressed artifact files: `blobs/<sha256>`, written through a
//! temporary file of its own (uniquely named, so concurrent uploads never
//! share one), fsynced, hashed again from disk and renamed, so a crash never
//! leaves a partial blob under a valid name. A blob already there is
//! re-hashed before a push relies on it and before it is first served: one
//! whose content does not match its name is replaced by the next push of
//! the right bytes and never served.
//!
//! A blob is deleted only when no release names it, and that is decided
//! under the blob's lock ([`Blobs::lock`]), which a push holds from
//! committing the blob to storing the release: a blob is never deleted
//! under a release that names it, nor between a push's commit and its
//! release.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

pub struct Blobs {
    dir: PathBuf,
    /// Blobs whose content was hashed and found to match their name since
    /// the server started: each is checked once, not on every download.
    verified: std::sync::Mutex<HashMap<String, Arc<tokio::sync::OnceCell<()>>>>,
    /// One lock per blob in use (held or awaited); see [`Blobs::lock`].
    locks: std::sync::Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
}

/// The lock of one blob, held until dropped.
pub type BlobGuard = tokio::sync::OwnedMutexGuard<()>;

/// A received upload, hashed and on disk, not yet under its final name.
pub struct Upload {
    pub tmp: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub head: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("artifact is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("artifact is empty")]
    Empty,
    #[error("reading upload: {0}")]
    Read(String),
    #[error("writing upload: {0}")]
    Io(#[from] std::io::Error),
}

pub const MAX_ARTIFACT_BYTES: u64 = 4 << 30;

impl Blobs {
    pub fn open(dir: PathBuf) -> anyhow::Result<Blobs> {
        let tmp = dir.join("tmp");
        // Leftovers of uploads cut short by a crash.
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Blobs {
            dir,
            verified: Default::default(),
            locks: Default::default(),
        })
    }

    /// Locks the blob `sha256` against the other writers of the same
    /// bytes: a push holds it from committing the blob to storing its
    /// release, a delete or a sweep from deciding that no release names
    /// the blob to removing it. Pushes of other bytes do not wait.
    pub async fn lock(&self, sha256: &str) -> BlobGuard {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            // Entries no one holds or awaits any more: the map stays the
            // size of the pushes and deletes in progress.
            locks.retain(|_, l| l.strong_count() > 0);
            match locks.get(sha256).and_then(std::sync::Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(sha256.to_string(), Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }

    /// Removes the blob `sha256`; whether it was there. The caller holds
    /// its lock and has checked that no release names it.
    pub async fn remove(&self, sha256: &str, _held: &BlobGuard) -> std::io::Result<bool> {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sha256);
        match tokio::fs::remove_file(self.path(sha256)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The sha256 of every blob on disk (not the uploads in progress,
    /// which are not blobs until committed).
    pub async fn list(&self) -> std::io::Result<Vec<String>> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || list_blobs(&dir))
            .await
            .map_err(std::io::Error::other)?
    }
}

impl Blobs {
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    pub async fn receive<S, E>(&self, mut body: S) -> Result<Upload, UploadError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        // Created exclusively under a random name: two uploads never write
        // to one file, whatever the moment they start.
        let (file, tmp) = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(self.dir.join("tmp"))?
            .keep()
            .map_err(|e| e.error)?;
        let result = async {
            let mut file = tokio::fs::File::from_std(file);
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut head = Vec::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| UploadError::Read(e.to_string()))?;
                size += chunk.len() as u64;
                if size > MAX_ARTIFACT_BYTES {
                    return Err(UploadError::TooLarge(MAX_ARTIFACT_BYTES));
                }
                if head.len() < 512 {
                    head.extend_from_slice(&chunk[..chunk.len().min(512 - head.len())]);
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await?;
            }
            if size == 0 {
                return Err(UploadError::Empty);
            }
            file.sync_all().await?;
            Ok(Upload {
                tmp: tmp.clone(),
                sha256: hex::encode(hasher.finalize()),
                size,
                head,
            })
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Moves an upload under its content address. A blob already there is
    /// kept if its content matches its name, and replaced if not (a write
    /// cut short, a disk that lost it); the upload itself is hashed again
    /// from disk first, so what goes under the name is what the name says.
    pub async fn commit(&self, upload: &Upload) -> std::io::Result<()> {
        let dest = self.path(&upload.sha256);
        if tokio::fs::try_exists(&dest).await? && hash_file(&dest).await? == upload.sha256 {
            self.mark_verified(&upload.sha256);
            return discard(&upload.tmp).await;
        }
        let on_disk = hash_file(&upload.tmp).await?;
        if on_disk != upload.sha256 {
            discard(&upload.tmp).await?;
            return Err(std::io::Error::other(format!(
                "the upload hashed to sha256 {} as received and {on_disk} as written to disk",
                upload.sha256
            )));
        }
        // Atomic: a reader sees the old file or the new one, never a mix.
        tokio::fs::rename(&upload.tmp, &dest).await?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.mark_verified(&upload.sha256);
        Ok(())
    }

    /// Checks, once per blob and server run, that the blob's content hashes
    /// to its name, before it is served. Concurrent callers share one check;
    /// a failed check is not remembered, so a repaired blob is served.
    pub async fn verify(&self, sha256: &str) -> Result<(), String> {
        let cell = self.cell(sha256);
        let path = self.path(sha256);
        cell.get_or_try_init(|| async {
            match hash_file(&path).await {
                Ok(h) if h == sha256 => Ok(()),
                Ok(h) => Err(format!(
                    "artifact {} is corrupt: its content hashes to sha256 {h}; push the release again to repair it",
                    path.display()
                )),
                Err(e) => Err(format!("reading artifact {}: {e}", path.display())),
            }
        })
        .await
        .map(|_| ())
    }

    fn cell(&self, sha256: &str) -> Arc<tokio::sync::OnceCell<()>> {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified.entry(sha256.to_string()).or_default().clone()
    }

    fn mark_verified(&self, sha256: &str) {
        let _ = self.cell(sha256).set(());
    }
}

fn list_blobs(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_sha256(name) {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// Whether `s` is a sha256 in hex, as blobs are named.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Removes every blob no release names, each under its lock, checked
/// again under it; returns how many were removed. Run by the leader at
/// start and with each retention pass: it catches blobs whose release was
/// refused or deleted while a removal failed.
pub async fn sweep(
    store: &dyn rollwave_store::Store,
    blobs: &Blobs,
) -> Result<Vec<String>, String> {
    let named =
        |releases: &[rollwave_core::Release], sha: &str| releases.iter().any(|r| r.sha256 == sha);
    let on_disk = blobs
        .list()
        .await
        .map_err(|e| format!("listing {}: {e}", blobs.dir.display()))?;
    let releases = store.list_releases().await.map_err(|e| e.to_string())?;
    let mut removed = Vec::new();
    for sha in on_disk.iter().filter(|sha| !named(&releases, sha)) {
        let held = blobs.lock(sha).await;
        // A push of these bytes may have stored its release meanwhile.
        let releases = store.list_releases().await.map_err(|e| e.to_string())?;
        if named(&releases, sha) {
            continue;
        }
        match blobs.remove(sha, &held).await {
            Ok(true) => removed.push(sha.clone()),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(sha256 = %sha, error = %e, "removing an artifact no release names")
            }
        }
    }
    Ok(removed)
}

/// The sha256 of a file, read on the blocking pool.
async fn hash_file(path: &Path) -> std::io::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(std::io::Error::other)?
}

pub async fn discard(tmp: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_file(tmp).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

use rollwave_core::{
    MANIFEST_SCAN_BYTES, MANIFEST_SCAN_ENTRIES, MAX_MANIFEST_BYTES, RELEASE_MANIFEST,
};

/// What the push-time scan found in a `.tar.gz`.
#[derive(Debug, PartialEq, Eq)]
pub enum ManifestScan {
    /// The text of `rollwave.toml` at the archive's root.
    Found(String),
    /// The archive was read to its end and has no `rollwave.toml`.
    Absent,
    /// The scan stopped at its bound ([`MANIFEST_SCAN_ENTRIES`] entries,
    /// [`MANIFEST_SCAN_BYTES`] inflated) without finding one. The release
    /// has no manifest: agents refuse a `rollwave.toml` found past the bound.
    Beyond,
}

/// Slack past [`MANIFEST_SCAN_BYTES`] for reading a manifest whose header
/// starts just before the bound: its extended headers and its text.
const SCAN_SLACK: u64 = (1 << 20) + MAX_MANIFEST_BYTES;

/// Looks for `rollwave.toml` at the root of a `.tar.gz`, inflating at most
/// [`MANIFEST_SCAN_BYTES`] (and a little slack), so that a small upload that
/// inflates to gigabytes costs the control plane a bounded amount of work.
/// Errors say why the archive is unreadable; such an upload is refused, as
/// no agent could install it.
pub fn read_manifest(archive: &Path) -> Result<ManifestScan, String> {
    let file = std::fs::File::open(archive).map_err(|e| e.to_string())?;
    let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(file));
    let mut tar = tar::Archive::new(gz.take(MANIFEST_SCAN_BYTES + SCAN_SLACK));
    let scan = scan_entries(&mut tar);
    // An error because the bound cut the stream short is the bound, not a
    // corrupt archive: what lies past it is the agents' to judge.
    match scan {
        Err(_) if tar.into_inner().limit() == 0 => Ok(ManifestScan::Beyond),
        scan => scan,
    }
}

fn scan_entries<R: Read>(tar: &mut tar::Archive<R>) -> Result<ManifestScan, String> {
    let entries = tar.entries().map_err(|e| e.to_string())?;
    for (i, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| format!("entry {}: {e}", i + 1))?;
        if i as u64 >= MANIFEST_SCAN_ENTRIES || entry.raw_header_position() >= MANIFEST_SCAN_BYTES {
            return Ok(ManifestScan::Beyond);
        }
        let path = entry.path().map_err(|e| format!("entry {}: {e}", i + 1))?;
        let at_root = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .map(|c| c.as_os_str().to_owned())
            .collect::<Vec<_>>();
        if at_root.len() != 1 || at_root[0] != RELEASE_MANIFEST {
            continue;
        }
        if !entry.header().entry_type().is_file() {
            return Err(format!("{RELEASE_MANIFEST} is not a regular file"));
        }
        if entry.size() > MAX_MANIFEST_BYTES {
            return Err(format!(
                "{RELEASE_MANIFEST} is {} bytes, more than {MAX_MANIFEST_BYTES}",
                entry.size()
            ));
        }
        let mut text = String::new();
        entry
            .read_to_string(&mut text)
            .map_err(|e| format!("{RELEASE_MANIFEST}: {e}"))?;
        return Ok(ManifestScan::Found(text));
    }
    Ok(ManifestScan::Absent)
}
