//! Content-addressed artifact files: `blobs/<sha256>`, written through a
//! temporary file, fsynced and renamed, so a crash never leaves a partial
//! blob under a valid name.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

pub struct Blobs {
    dir: PathBuf,
}

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
        Ok(Blobs { dir })
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    pub async fn receive<S, E>(&self, mut body: S) -> Result<Upload, UploadError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp =
            self.dir
                .join("tmp")
                .join(format!("upload-{}-{}", std::process::id(), crate::now_ms()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
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

    /// Moves an upload under its content address (a no-op if already there).
    pub async fn commit(&self, upload: &Upload) -> std::io::Result<()> {
        let dest = self.path(&upload.sha256);
        if tokio::fs::try_exists(&dest).await? {
            return discard(&upload.tmp).await;
        }
        tokio::fs::rename(&upload.tmp, &dest).await?;
        std::fs::File::open(&self.dir)?.sync_all()
    }
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
