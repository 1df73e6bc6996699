//! Fetching, verifying and staging release artifacts.
//!
//! An artifact travels from the control plane to a release directory in two
//! steps, and both are careful because both handle bytes from outside:
//!
//! - [`crate::download::download_verified`] streams the artifact into a
//!   temporary file while hashing it, through retries and resumed transfers,
//!   and deletes the file unless its size and sha256 are exactly what the
//!   control plane published. Nothing downstream ever sees an unverified file.
//! - [`stage`] turns a verified file into a release directory. A correct
//!   checksum only proves the file is the one that was pushed, not that whoever
//!   pushed it is benign, so unpacking is a security boundary: entries are
//!   written one by one and anything that could land outside the release
//!   directory (absolute paths, `..`, escaping symbolic links, writes through
//!   symbolic links, hard links to foreign files, device nodes) is refused, as
//!   are archives that unpack to more than the agent's `max_release_size` or
//!   would leave less than its margin of free disk space ([`crate::disk`]),
//!   and a `rollwave.toml` placed past where the control plane looks for it
//!   ([`rollwave_core::MANIFEST_SCAN_ENTRIES`]). Staging happens in a temporary
//!   sibling directory that is fsynced and renamed into place, so a crash
//!   never leaves a half-unpacked release under its final name.
//!
//! An agent with trusted keys puts a third step between the two:
//! [`verify_signature`] checks that the release's minisign signature was made
//! by one of them, over these bytes, for this `service@version`
//! (`rollwave_core::signing`). The checksum proves the bytes are the ones the
//! control plane holds; the signature proves the release owner made them, so
//! a compromised control plane cannot have anything installed.
//!
//! Temporary files and directories are named `.<name>.tmp-<pid>-<nanos>`;
//! [`clean_stale_tmp`] removes those left behind by an earlier process.
//! The leading dot keeps them apart from releases: neither versions nor
//! service names may start with a dot.
//!
//! [`stage`] and [`sha256_file`] do blocking I/O: call them from
//! `tokio::task::spawn_blocking`.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use flate2::read::GzDecoder;
use rollwave_core::{
    ArtifactFormat, SignatureError, TrustedKeys, MANIFEST_SCAN_BYTES, MANIFEST_SCAN_ENTRIES,
    RELEASE_MANIFEST,
};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::disk::DiskLimits;

/// Largest number of entries in one archive.
pub const MAX_ENTRIES: u64 = 200_000;

/// Why an artifact could not be downloaded or staged.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The request failed, the server answered with an error status, or the
    /// connection broke during the transfer.
    #[error("download failed: {url}: {reason}")]
    Download { url: String, reason: String },
    /// The server sent fewer or more bytes than the release's size.
    #[error("download failed: {url}: {}", size_problem(*.expected, *.got))]
    SizeMismatch {
        url: String,
        expected: u64,
        got: u64,
    },
    /// The bytes are not the ones that were pushed.
    #[error("download failed: {url}: checksum mismatch: expected sha256 {expected}, got {got}")]
    ChecksumMismatch {
        url: String,
        expected: String,
        got: String,
    },
    /// An archive entry (or an executable name) that could write outside the
    /// release directory, or that breaks a limit.
    #[error("refusing archive entry {path}: {why}")]
    UnsafeEntry { path: String, why: String },
    /// The release would be larger than `max_release_size`, or would leave
    /// too little free disk space: the message says which.
    #[error("{0}")]
    TooLarge(String),
    /// The archive is corrupt: bad gzip stream, bad tar header, truncated entry.
    #[error("unpacking {archive}: {source}")]
    Unpack {
        archive: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The release directory is already there; staging never overwrites.
    #[error("release directory {0} already exists")]
    AlreadyExists(PathBuf),
    /// The signature does not vouch for the artifact as this release.
    #[error("{0}")]
    Signature(#[from] SignatureError),
    /// A local file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub(crate) fn size_problem(expected: u64, got: u64) -> String {
    if got < expected {
        format!("truncated download: got {got} of {expected} bytes")
    } else {
        format!("download longer than the expected {expected} bytes")
    }
}

pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl Fn(io::Error) -> ArtifactError + 'a {
    move |source| ArtifactError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that one of `signatures` (texts of `.minisig` files; none: the
/// release is unsigned) was made by one of `keys` over the file at `path`,
/// for `service@version`. Returns that signature's key id; when none
/// verifies, the first failure says why. Reads the whole file once per
/// signature by a trusted key: call it from `tokio::task::spawn_blocking`.
/// The file is left in place either way.
pub fn verify_signature(
    path: &Path,
    signatures: &[&str],
    keys: &TrustedKeys,
    service: &str,
    version: &str,
) -> Result<String, ArtifactError> {
    // Before reading a byte: untrusted keys need no hashing to refuse.
    let candidates = keys.candidates(signatures)?;
    let mut first_error = None;
    for signature in &candidates {
        let mut check = keys.start(signature)?;
        let mut file = File::open(path).map_err(io_err("opening", path))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => check.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("reading", path)(e)),
            }
        }
        match check.finish(service, version) {
            Ok(id) => return Ok(id),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error
        .expect("candidates returns at least one signature")
        .into())
}

/// Installs a verified artifact as the release directory `dest`.
///
/// A [`ArtifactFormat::TarGz`] file is unpacked, refusing entries that could
/// write outside `dest`; an [`ArtifactFormat::Executable`] is copied to
/// `<dest>/<exec_name>` with mode 0755. `dest` must not exist yet. The work
/// happens in a temporary sibling of `dest` whose files and directories are
/// fsynced before it is renamed to `dest`, and the parent is fsynced after
/// the rename; on any error the temporary directory is removed and `dest`
/// does not exist.
///
/// The release may not unpack to more than `disk.max_release_size`, and
/// each file is written only if the file system keeps `disk`'s margin free
/// after it.
///
/// Two concurrent calls for the same `dest` are not supported: the caller
/// serialises staging per service.
pub fn stage(
    file: &Path,
    format: ArtifactFormat,
    exec_name: &str,
    dest: &Path,
    disk: DiskLimits,
) -> Result<(), ArtifactError> {
    let limits = Limits {
        max_bytes: disk.max_release_size,
        max_entries: MAX_ENTRIES,
        disk: Some(disk),
    };
    stage_with_limits(file, format, exec_name, dest, limits)
}

/// [`stage`] of a tar.gz with smaller limits, for the fuzz targets in
/// `fuzz/`: at the real limits one input can make a run write gigabytes.
#[doc(hidden)]
pub fn stage_tar_gz_with_limits(
    file: &Path,
    dest: &Path,
    max_bytes: u64,
    max_entries: u64,
) -> Result<(), ArtifactError> {
    let limits = Limits {
        max_bytes,
        max_entries,
        disk: None,
    };
    stage_with_limits(file, ArtifactFormat::TarGz, "", dest, limits)
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_bytes: u64,
    max_entries: u64,
    /// The agent's settings, for the error's wording and the free space
    /// checks; `None` (the fuzz targets): no free space check.
    disk: Option<DiskLimits>,
}

impl Limits {
    fn too_large(&self) -> ArtifactError {
        let disk = self.disk.unwrap_or(DiskLimits {
            max_release_size: self.max_bytes,
            ..DiskLimits::default()
        });
        ArtifactError::TooLarge(disk.too_large())
    }

    /// Refuses `bytes` more under `dir` if they would leave less than the
    /// margin free.
    fn check_space(&self, dir: &Path, bytes: u64) -> Result<(), ArtifactError> {
        match &self.disk {
            Some(disk) => disk
                .check_space(dir, bytes)
                .map_err(ArtifactError::TooLarge),
            None => Ok(()),
        }
    }
}

fn stage_with_limits(
    file: &Path,
    format: ArtifactFormat,
    exec_name: &str,
    dest: &Path,
    limits: Limits,
) -> Result<(), ArtifactError> {
    let name = dest
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or_else(|| ArtifactError::Io {
            action: "staging into",
            path: dest.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a valid release directory name",
            ),
        })?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if exists(dest)? {
        return Err(ArtifactError::AlreadyExists(dest.to_path_buf()));
    }
    fs::create_dir_all(parent).map_err(io_err("creating", parent))?;

    let tmp = parent.join(tmp_name(name));
    fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
    let mut cleanup = Cleanup::dir(tmp.clone());
    set_mode(&tmp, 0o755)?;

    match format {
        ArtifactFormat::TarGz => {
            let mut unpacker = Unpacker {
                root: &tmp,
                archive: file,
                limits,
                entries: 0,
                bytes: 0,
                files: HashSet::new(),
                dirs: vec![tmp.clone()],
            };
            unpacker.unpack()?;
            unpacker.sync_dirs()?;
        }
        ArtifactFormat::Executable => {
            let size = fs::metadata(file)
                .map_err(io_err("inspecting", file))?
                .len();
            if size > limits.max_bytes {
                return Err(limits.too_large());
            }
            limits.check_space(&tmp, size)?;
            install_executable(file, exec_name, &tmp)?;
            sync_dir(&tmp)?;
        }
    }

    if exists(dest)? {
        return Err(ArtifactError::AlreadyExists(dest.to_path_buf()));
    }
    fs::rename(&tmp, dest).map_err(io_err("renaming into place", dest))?;
    cleanup.disarm();
    // Makes the rename itself durable.
    sync_dir(parent)?;
    info!(release = %dest.display(), "staged");
    Ok(())
}

/// Removes temporary files and directories left in `releases_dir` by an
/// earlier process (a crash during a download or a staging).
///
/// Entries belonging to the current process are kept, so this is safe to
/// call while this process is staging. A missing directory is not an error.
/// Every stale entry is attempted; the first failure is returned.
pub fn clean_stale_tmp(releases_dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(releases_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let me = std::process::id();
    let mut first_err = None;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        match name.to_str().and_then(stale_tmp_pid) {
            Some(pid) if pid != me => {}
            _ => continue,
        }
        let path = entry.path();
        // file_type does not follow symbolic links: a link is removed, never
        // what it points to.
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
            Err(e) => Err(e),
        };
        match removed {
            Ok(()) => info!(path = %path.display(), "removed leftover temporary file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot remove leftover temporary file");
                first_err.get_or_insert_with(|| {
                    io::Error::new(e.kind(), format!("removing {}: {e}", path.display()))
                });
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// sha256 of a file, hex lowercase.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A unique name for a temporary sibling of `base`.
pub(crate) fn tmp_name(base: &str) -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    // Strictly increasing within the process, even if the clock is coarse or
    // steps back.
    let next = |last: u64| now.max(last.saturating_add(1));
    let prev = match LAST.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(next(l))) {
        Ok(prev) | Err(prev) => prev,
    };
    format!(".{base}.tmp-{}-{}", std::process::id(), next(prev))
}

/// The process id in a name made by [`tmp_name`], if it is one.
fn stale_tmp_pid(name: &str) -> Option<u32> {
    let (_, suffix) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    let (pid, nanos) = suffix.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(nanos) {
        return None;
    }
    pid.parse().ok()
}

/// Removes a temporary file or directory when dropped, unless disarmed.
pub(crate) struct Cleanup {
    path: PathBuf,
    is_dir: bool,
    armed: bool,
}

impl Cleanup {
    pub(crate) fn file(path: PathBuf) -> Cleanup {
        Cleanup {
            path,
            is_dir: false,
            armed: true,
        }
    }

    fn dir(path: PathBuf) -> Cleanup {
        Cleanup {
            path,
            is_dir: true,
            armed: true,
        }
    }

    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // remove_dir_all does not follow symbolic links.
        let removed = if self.is_dir {
            fs::remove_dir_all(&self.path)
        } else {
            fs::remove_file(&self.path)
        };
        if let Err(e) = removed {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(path = %self.path.display(), error = %e, "cannot remove temporary file");
            }
        }
    }
}

fn exists(path: &Path) -> Result<bool, ArtifactError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("inspecting", path)(e)),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ArtifactError> {
    fs::set_permissions(path, Permissions::from_mode(mode)).map_err(io_err("setting mode of", path))
}

fn sync_dir(dir: &Path) -> Result<(), ArtifactError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))
}

/// Copies `src` to `dst` (which must not exist) with `mode`, and fsyncs it.
/// Read errors are reported with `read_err`, write errors as [`ArtifactError::Io`].
fn write_new_file(
    src: &mut impl Read,
    dst: &Path,
    mode: u32,
    read_err: impl Fn(io::Error) -> ArtifactError,
) -> Result<u64, ArtifactError> {
    // create_new (O_EXCL) never follows a symbolic link at `dst`.
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(io_err("creating", dst))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut written: u64 = 0;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        out.write_all(&buf[..n]).map_err(io_err("writing", dst))?;
        written += n as u64;
    }
    // Explicit, so the umask does not decide.
    out.set_permissions(Permissions::from_mode(mode))
        .map_err(io_err("setting mode of", dst))?;
    out.sync_all().map_err(io_err("syncing", dst))?;
    Ok(written)
}

fn install_executable(file: &Path, exec_name: &str, root: &Path) -> Result<(), ArtifactError> {
    let mut components = Path::new(exec_name).components();
    let plain = matches!(
        (components.next(), components.next()),
        (Some(Component::Normal(n)), None) if n == OsStr::new(exec_name)
    );
    if !plain {
        return Err(ArtifactError::UnsafeEntry {
            path: exec_name.to_owned(),
            why: "an executable name must be a plain file name".to_owned(),
        });
    }
    let mut src = File::open(file).map_err(io_err("opening", file))?;
    let dst = root.join(exec_name);
    write_new_file(&mut src, &dst, 0o755, io_err("reading", file))?;
    Ok(())
}

/// What a path inside the archive is allowed to be, after normalisation:
/// relative, no `..`, `.` dropped.
fn normalise(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    let mut depth: usize = 0;
    let mut parent_dir = false;
    let mut escapes = false;
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => return Err("it is an absolute path"),
            Component::ParentDir => {
                parent_dir = true;
                match depth.checked_sub(1) {
                    Some(d) => depth = d,
                    None => escapes = true,
                }
            }
            Component::CurDir => {}
            Component::Normal(n) => {
                depth += 1;
                out.push(n);
            }
        }
    }
    if escapes {
        Err("it escapes the release directory")
    } else if parent_dir {
        // Even when it stays inside lexically, `..` after a name is resolved
        // from wherever that name points.
        Err("its path contains a .. component")
    } else {
        Ok(out)
    }
}

/// Checks the target of a symbolic link at `link` (normalised, relative to
/// the release root) and returns it normalised.
///
/// Only leading `..` components are allowed, and no more of them than the
/// link's depth. This is stricter than "resolves inside" on purpose: a `..`
/// after a name is resolved from wherever that name points, which may itself
/// be a symbolic link (`l -> .` then `m -> l/..` escapes). With `..` only in
/// front, the walk up goes through real directories (entries are never
/// written through links), and every link walked down through obeys the
/// same rule, so every link resolves inside the release.
fn symlink_target(link: &Path, target: &Path) -> Result<PathBuf, String> {
    let shown = target.display();
    let depth = link.components().count().saturating_sub(1);
    let mut out = PathBuf::new();
    let mut ups = 0;
    let mut named = false;
    for c in target.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => {
                return Err(format!("its link target {shown} is an absolute path"))
            }
            Component::CurDir => {}
            Component::ParentDir if named => {
                return Err(format!(
                    "its link target {shown} has a .. after a name (only leading .. are allowed)"
                ))
            }
            Component::ParentDir => {
                ups += 1;
                if ups > depth {
                    return Err(format!(
                        "its link target {shown} escapes the release directory"
                    ));
                }
                out.push("..");
            }
            Component::Normal(n) => {
                named = true;
                out.push(n);
            }
        }
    }
    if target.as_os_str().is_empty() {
        return Err("it is a symbolic link without a target".to_owned());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Ok(out)
}

struct Unpacker<'a> {
    /// The temporary release directory.
    root: &'a Path,
    archive: &'a Path,
    limits: Limits,
    entries: u64,
    bytes: u64,
    /// Regular files unpacked so far (relative): the only allowed hard link targets.
    files: HashSet<PathBuf>,
    /// Directories created so far (absolute), to fsync at the end.
    dirs: Vec<PathBuf>,
}

impl Unpacker<'_> {
    fn corrupt(&self) -> impl Fn(io::Error) -> ArtifactError + '_ {
        |source| ArtifactError::Unpack {
            archive: self.archive.to_path_buf(),
            source,
        }
    }

    fn unpack(&mut self) -> Result<(), ArtifactError> {
        let file = File::open(self.archive).map_err(io_err("opening", self.archive))?;
        let mut archive = tar::Archive::new(GzDecoder::new(io::BufReader::new(file)));
        let entries = archive.entries().map_err(self.corrupt())?;
        for (i, entry) in entries.enumerate() {
            let mut entry = entry.map_err(self.corrupt())?;
            self.entry(i as u64, &mut entry)?;
        }
        Ok(())
    }

    /// Unpacks the `index`th entry of the archive (counting every header
    /// the tar reader yields, as the control plane's manifest scan does).
    fn entry<R: Read>(
        &mut self,
        index: u64,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ArtifactError> {
        use tar::EntryType as T;

        let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |why: &str| ArtifactError::UnsafeEntry {
            path: shown.clone(),
            why: why.to_owned(),
        };
        let kind = entry.header().entry_type();
        // Metadata the tar reader did not fold into the next entry (global
        // pax headers, e.g. from `git archive`): ignoring it is safe, since
        // whatever entry comes next is checked on its own.
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(refuse(&format!(
                "the archive has more than {} entries",
                self.limits.max_entries
            )));
        }

        let raw_path = entry.path().map_err(self.corrupt())?;
        let rel = normalise(&raw_path).map_err(refuse)?;
        if rel.as_os_str().is_empty() {
            // `./`, as written by `tar -C dir .`: the release root itself.
            return if kind.is_dir() {
                Ok(())
            } else {
                Err(refuse("its path is empty"))
            };
        }
        if rel == Path::new(RELEASE_MANIFEST)
            && (index >= MANIFEST_SCAN_ENTRIES
                || entry.raw_header_position() >= MANIFEST_SCAN_BYTES)
        {
            return Err(refuse(&format!(
                "{RELEASE_MANIFEST} must be among the archive's first {MANIFEST_SCAN_ENTRIES} entries and {}, where the control plane reads it when the release is pushed; put it first",
                rollwave_core::format_bytes(MANIFEST_SCAN_BYTES)
            )));
        }
        let (dest, existing_dir) = self.prepare(&rel, kind.is_dir(), &refuse)?;
        let mode = entry.header().mode().map_err(self.corrupt())?;

        match kind {
            T::Regular | T::Continuous => {
                // The header's size, before a byte of the file is written;
                // what is written is held to it below.
                let size = entry.size();
                if self.bytes.saturating_add(size) > self.limits.max_bytes {
                    return Err(self.limits.too_large());
                }
                if size > 0 {
                    self.limits.check_space(self.root, size)?;
                }
                // Only permission bits, no setuid/setgid/sticky, never
                // writable by others; the owner can always write.
                let mode = (mode & 0o755) | 0o200;
                let archive = self.archive;
                let written =
                    write_new_file(&mut entry.by_ref().take(size), &dest, mode, |source| {
                        ArtifactError::Unpack {
                            archive: archive.to_path_buf(),
                            source,
                        }
                    })?;
                if written != size {
                    return Err(self.corrupt()(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("entry {shown} is truncated: {written} of {size} bytes"),
                    )));
                }
                self.bytes += written;
                self.files.insert(rel);
            }
            T::Directory => {
                if !existing_dir {
                    fs::create_dir(&dest).map_err(io_err("creating", &dest))?;
                    self.dirs.push(dest.clone());
                }
                // The owner keeps full access so later entries can be written.
                set_mode(&dest, (mode & 0o755) | 0o700)?;
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(self.corrupt())?
                    .ok_or_else(|| refuse("it is a symbolic link without a target"))?;
                let target = symlink_target(&rel, &target).map_err(|why| refuse(&why))?;
                std::os::unix::fs::symlink(&target, &dest).map_err(io_err("creating", &dest))?;
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(self.corrupt())?
                    .ok_or_else(|| refuse("it is a hard link without a target"))?;
                let target_rel = normalise(&target).map_err(|why| {
                    refuse(&format!("its hard link target {}: {why}", target.display()))
                })?;
                if !self.files.contains(&target_rel) {
                    return Err(refuse(&format!(
                        "its hard link target {} is not a regular file unpacked earlier from this archive",
                        target.display()
                    )));
                }
                // The target's parents were checked to be real directories
                // when it was written, and nothing is ever replaced.
                fs::hard_link(self.root.join(&target_rel), &dest)
                    .map_err(io_err("creating", &dest))?;
                self.files.insert(rel);
            }
            T::Char | T::Block => return Err(refuse("device files are not allowed")),
            T::Fifo => return Err(refuse("named pipes are not allowed")),
            T::GNUSparse => return Err(refuse("sparse files are not supported")),
            other => {
                return Err(refuse(&format!(
                    "entry type {:?} is not supported",
                    other.as_byte() as char
                )))
            }
        }
        Ok(())
    }

    /// Makes sure every parent of `rel` is a real directory inside the root
    /// (creating missing ones) and that `rel` itself does not exist yet, and
    /// returns its absolute path and whether it is an existing directory (only
    /// allowed when `is_dir`).
    ///
    /// Refusing to go through symbolic links is what keeps `a -> /tmp` then
    /// `a/x`, or `a -> .` then `a/../../x`, from writing outside.
    fn prepare(
        &mut self,
        rel: &Path,
        is_dir: bool,
        refuse: &dyn Fn(&str) -> ArtifactError,
    ) -> Result<(PathBuf, bool), ArtifactError> {
        let mut components: Vec<&OsStr> = rel.iter().collect();
        let leaf = components
            .pop()
            .ok_or_else(|| refuse("its path is empty"))?;
        let mut cur = self.root.to_path_buf();
        for c in components {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    let inside = cur.strip_prefix(self.root).unwrap_or(&cur);
                    return Err(refuse(&format!(
                        "it would be written through the symbolic link {}",
                        inside.display()
                    )));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    let inside = cur.strip_prefix(self.root).unwrap_or(&cur);
                    return Err(refuse(&format!("{} is not a directory", inside.display())));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&cur).map_err(io_err("creating", &cur))?;
                    set_mode(&cur, 0o755)?;
                    self.dirs.push(cur.clone());
                }
                Err(e) => return Err(io_err("inspecting", &cur)(e)),
            }
        }
        cur.push(leaf);
        match fs::symlink_metadata(&cur) {
            Ok(m) if is_dir && m.is_dir() => Ok((cur, true)),
            Ok(_) => Err(refuse("it appears twice in the archive")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((cur, false)),
            Err(e) => Err(io_err("inspecting", &cur)(e)),
        }
    }

    fn sync_dirs(&self) -> Result<(), ArtifactError> {
        for dir in &self.dirs {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use flate2::write::GzEncoder;
    use tar::{EntryType, Header};

    // ---- archives ----

    fn tgz(entries: &[Entry]) -> Vec<u8> {
        let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Default::default()));
        for e in entries {
            let mut h = Header::new_gnu();
            let name = e.name.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            let link = e.link.as_bytes();
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            h.set_entry_type(e.kind);
            h.set_mode(e.mode);
            h.set_size(e.data.len() as u64);
            h.set_cksum();
            builder.append(&h, e.data.as_slice()).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    /// One archive entry, with its name written raw so hostile names survive.
    struct Entry {
        name: &'static str,
        kind: EntryType,
        mode: u32,
        link: &'static str,
        data: Vec<u8>,
    }

    fn file(name: &'static str, mode: u32, data: &[u8]) -> Entry {
        Entry {
            name,
            kind: EntryType::Regular,
            mode,
            link: "",
            data: data.to_vec(),
        }
    }

    fn dir(name: &'static str) -> Entry {
        Entry {
            name,
            kind: EntryType::Directory,
            mode: 0o755,
            link: "",
            data: Vec::new(),
        }
    }

    fn symlink(name: &'static str, target: &'static str) -> Entry {
        Entry {
            name,
            kind: EntryType::Symlink,
            mode: 0o777,
            link: target,
            data: Vec::new(),
        }
    }

    fn hardlink(name: &'static str, target: &'static str) -> Entry {
        Entry {
            name,
            kind: EntryType::Link,
            mode: 0o644,
            link: target,
            data: Vec::new(),
        }
    }

    fn special(name: &'static str, kind: EntryType) -> Entry {
        Entry {
            name,
            kind,
            mode: 0o644,
            link: "",
            data: Vec::new(),
        }
    }

    struct Staged {
        tmp: tempfile::TempDir,
        dest: PathBuf,
        result: Result<(), ArtifactError>,
    }

    impl Staged {
        /// Names in the releases directory, which should hold nothing but
        /// the release (if staged): no temporary leftovers.
        fn releases(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(self.tmp.path().join("releases"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        }
    }

    /// The defaults, without a margin of free space: tests do not depend on
    /// the disk they run on.
    const DISK: DiskLimits = DiskLimits {
        max_release_size: crate::disk::DEFAULT_MAX_RELEASE_SIZE,
        min_free: Some(0),
        keep_releases: crate::disk::DEFAULT_KEEP_RELEASES,
    };

    impl Limits {
        const DEFAULT: Limits = Limits {
            max_bytes: crate::disk::DEFAULT_MAX_RELEASE_SIZE,
            max_entries: MAX_ENTRIES,
            disk: Some(DISK),
        };
    }

    fn stage_archive(entries: &[Entry], limits: Limits) -> Staged {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("artifact.tar.gz");
        fs::write(&archive, tgz(entries)).unwrap();
        let dest = tmp.path().join("releases").join("1.2.3");
        let result = stage_with_limits(&archive, ArtifactFormat::TarGz, "app", &dest, limits);
        Staged { tmp, dest, result }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn stage_unpacks_nested_dirs_links_and_exec_bits() {
        let staged = stage_archive(
            &[
                dir("./"),
                dir("./bin/"),
                file("./bin/app", 0o755, b"#!/bin/sh\necho hi\n"),
                file("bin/setuid", 0o4777, b"x"),
                file("etc/conf/app.toml", 0o600, b"port = 80\n"),
                file("lib/libx.so.1", 0o644, b"elf"),
                symlink("lib/libx.so", "libx.so.1"),
                symlink("share/conf", "../etc/./conf"),
                symlink("root", "."),
                hardlink("bin/app2", "bin/app"),
            ],
            Limits::DEFAULT,
        );
        if let Err(e) = &staged.result {
            panic!("{e}");
        }
        let d = &staged.dest;
        assert_eq!(
            fs::read(d.join("bin/app")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(mode_of(&d.join("bin/app")), 0o755);
        assert_eq!(mode_of(&d.join("bin/setuid")), 0o755);
        assert_eq!(mode_of(&d.join("etc/conf/app.toml")), 0o600);
        assert_eq!(mode_of(&d.join("etc/conf")), 0o755);
        assert_eq!(mode_of(d), 0o755);
        assert_eq!(fs::read(d.join("lib/libx.so")).unwrap(), b"elf");
        assert_eq!(
            fs::read_link(d.join("share/conf")).unwrap(),
            Path::new("../etc/conf")
        );
        assert_eq!(
            fs::read(d.join("share/conf/app.toml")).unwrap(),
            b"port = 80\n"
        );
        assert_eq!(fs::read_link(d.join("root")).unwrap(), Path::new("."));
        assert_eq!(
            fs::read(d.join("bin/app2")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(staged.releases(), ["1.2.3"]);
    }

    #[test]
    fn stage_skips_pax_global_headers() {
        let mut global = special("pax_global_header", EntryType::XGlobalHeader);
        global.data = b"52 comment=0123456789abcdef0123456789abcdef01234567\n".to_vec();
        let staged = stage_archive(&[global, file("a", 0o644, b"a")], Limits::DEFAULT);
        staged.result.unwrap();
        assert_eq!(fs::read(staged.dest.join("a")).unwrap(), b"a");
        assert!(!staged.dest.join("pax_global_header").exists());
    }

    #[test]
    fn stage_installs_executable() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("download");
        fs::write(&bin, b"\x7fELF...").unwrap();
        let dest = tmp.path().join("releases/2.0.0");
        stage(&bin, ArtifactFormat::Executable, "api", &dest, DISK).unwrap();
        assert_eq!(fs::read(dest.join("api")).unwrap(), b"\x7fELF...");
        assert_eq!(mode_of(&dest.join("api")), 0o755);
        assert_eq!(fs::read_dir(&dest).unwrap().count(), 1);
    }

    #[test]
    fn stage_refuses_executable_names_that_are_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("download");
        fs::write(&bin, b"bin").unwrap();
        for name in ["../api", "bin/api", "/api", ".", "..", ""] {
            let dest = tmp.path().join("releases/2.0.0");
            let err = stage(&bin, ArtifactFormat::Executable, name, &dest, DISK).unwrap_err();
            assert!(
                matches!(err, ArtifactError::UnsafeEntry { .. }),
                "{name:?}: {err}"
            );
            assert!(!dest.exists(), "{name:?}");
        }
        assert_eq!(
            fs::read_dir(tmp.path().join("releases")).unwrap().count(),
            0
        );
    }

    #[test]
    fn stage_refuses_existing_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("download");
        fs::write(&bin, b"bin").unwrap();
        let dest = tmp.path().join("releases/2.0.0");
        fs::create_dir_all(&dest).unwrap();
        let err = stage(&bin, ArtifactFormat::Executable, "api", &dest, DISK).unwrap_err();
        assert!(matches!(err, ArtifactError::AlreadyExists(_)), "{err}");
        assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
    }

    #[test]
    fn stage_refuses_hostile_archives() {
        let cases: Vec<(&str, Vec<Entry>, &str)> = vec![
            (
                "parent dir",
                vec![file("../x", 0o644, b"x")],
                "refusing archive entry ../x: it escapes the release directory",
            ),
            (
                "absolute path",
                vec![file("/tmp/rollwave-abs", 0o644, b"x")],
                "it is an absolute path",
            ),
            (
                "parent dir in the middle",
                vec![file("a/../../x", 0o644, b"x")],
                "refusing archive entry a/../../x: it escapes the release directory",
            ),
            (
                "harmless-looking parent dir",
                vec![file("a/../b", 0o644, b"x")],
                "contains a .. component",
            ),
            (
                "empty path",
                vec![file("./", 0o644, b"x")],
                "its path is empty",
            ),
            (
                "absolute symlink",
                vec![symlink("etc", "/etc")],
                "link target /etc is an absolute path",
            ),
            (
                "escaping symlink",
                vec![symlink("up", "..")],
                "escapes the release directory",
            ),
            (
                "deep escaping symlink",
                vec![dir("a/"), dir("a/b/"), symlink("a/b/up", "../../../x")],
                "escapes the release directory",
            ),
            (
                "symlink with .. after a name",
                vec![symlink("l", "."), symlink("m", "l/..")],
                "only leading .. are allowed",
            ),
            (
                "escape through symlink to the root",
                vec![symlink("a", "."), file("a/../../x", 0o644, b"x")],
                "refusing archive entry a/../../x: it escapes the release directory",
            ),
            (
                "write through symlink to the root",
                vec![symlink("a", "."), file("a/x", 0o644, b"x")],
                "it would be written through the symbolic link a",
            ),
            (
                "directory over a symlink",
                vec![dir("real/"), symlink("d", "real"), dir("d/")],
                "appears twice",
            ),
            (
                "write through symlink to a directory",
                vec![
                    dir("real/"),
                    symlink("d", "real"),
                    file("d/file", 0o644, b"x"),
                ],
                "written through the symbolic link d",
            ),
            (
                "write through symlink to an absolute dir",
                vec![symlink("d", "/tmp"), file("d/file", 0o644, b"x")],
                "is an absolute path",
            ),
            (
                "overwrite a symlink",
                vec![symlink("s", "t"), file("s", 0o644, b"x")],
                "appears twice",
            ),
            (
                "duplicate file",
                vec![file("f", 0o644, b"1"), file("f", 0o644, b"2")],
                "appears twice",
            ),
            (
                "file under a file",
                vec![file("f", 0o644, b"1"), file("f/g", 0o644, b"2")],
                "f is not a directory",
            ),
            (
                "absolute hard link",
                vec![hardlink("h", "/etc/passwd")],
                "hard link target /etc/passwd: it is an absolute path",
            ),
            (
                "escaping hard link",
                vec![hardlink("h", "../artifact.tar.gz")],
                "escapes the release directory",
            ),
            (
                "hard link to a later entry",
                vec![hardlink("h", "later"), file("later", 0o644, b"x")],
                "not a regular file unpacked earlier",
            ),
            (
                "hard link to a symlink",
                vec![symlink("s", "x"), hardlink("h", "s")],
                "not a regular file unpacked earlier",
            ),
            (
                "hard link to a directory",
                vec![dir("d/"), hardlink("h", "d")],
                "not a regular file unpacked earlier",
            ),
            (
                "character device",
                vec![special("tty", EntryType::Char)],
                "device files are not allowed",
            ),
            (
                "block device",
                vec![special("sda", EntryType::Block)],
                "device files are not allowed",
            ),
            (
                "fifo",
                vec![special("pipe", EntryType::Fifo)],
                "named pipes are not allowed",
            ),
        ];
        for (what, entries, expected) in cases {
            let staged = stage_archive(&entries, Limits::DEFAULT);
            let err = match staged.result {
                Ok(()) => panic!("{what}: staged"),
                Err(ref err) => err,
            };
            assert!(
                matches!(err, ArtifactError::UnsafeEntry { .. }),
                "{what}: {err}"
            );
            assert!(err.to_string().contains(expected), "{what}: {err}");
            assert!(!staged.dest.exists(), "{what}");
            assert!(
                staged.releases().is_empty(),
                "{what}: {:?}",
                staged.releases()
            );
            // Nothing landed beside the archive either.
            let outside: Vec<_> = fs::read_dir(staged.tmp.path()).unwrap().collect();
            assert_eq!(outside.len(), 2, "{what}");
        }
        assert!(!Path::new("/tmp/rollwave-abs").exists());
    }

    #[test]
    fn stage_refuses_archives_over_the_limits() {
        let small = Limits {
            max_bytes: 1000,
            max_entries: 3,
            disk: Some(DiskLimits {
                max_release_size: 1000,
                ..DISK
            }),
        };
        // Exactly the limit is within it; one byte more is not.
        let staged = stage_archive(
            &[file("a", 0o644, &[0; 600]), file("b", 0o644, &[0; 400])],
            small,
        );
        staged.result.as_ref().unwrap();
        let staged = stage_archive(
            &[file("a", 0o644, &[0; 600]), file("b", 0o644, &[0; 401])],
            small,
        );
        let err = staged.result.as_ref().unwrap_err();
        assert_eq!(
            err.to_string(),
            "release unpacks to more than max_release_size (1000 bytes)"
        );
        assert!(!staged.dest.exists());
        assert!(staged.releases().is_empty());

        // Hard links add no bytes, but the files they name count once.
        let staged = stage_archive(&[file("a", 0o644, &[0; 1000]), hardlink("b", "a")], small);
        staged.result.as_ref().unwrap();

        let staged = stage_archive(
            &[
                dir("d/"),
                file("d/a", 0o644, b""),
                file("d/b", 0o644, b""),
                file("d/c", 0o644, b""),
            ],
            small,
        );
        let err = staged.result.as_ref().unwrap_err();
        assert!(err.to_string().contains("more than 3 entries"), "{err}");
        assert!(!staged.dest.exists());
        assert!(staged.releases().is_empty());
    }

    #[test]
    fn stage_refuses_what_would_leave_too_little_free_space() {
        let greedy = Limits {
            disk: Some(DiskLimits {
                max_release_size: 1 << 20,
                min_free: Some(u64::MAX / 2),
                ..DISK
            }),
            ..Limits::DEFAULT
        };
        // Empty files take no room.
        stage_archive(&[dir("d/"), file("d/empty", 0o644, b"")], greedy)
            .result
            .unwrap();
        let staged = stage_archive(&[file("a", 0o644, b"data")], greedy);
        let err = staged.result.as_ref().unwrap_err().to_string();
        assert!(err.starts_with("not enough free disk space on "), "{err}");
        assert!(err.contains("releases/.1.2.3.tmp-"), "{err}");
        assert!(!staged.dest.exists());
        assert!(staged.releases().is_empty());

        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        fs::write(&bin, b"#!/bin/sh\n").unwrap();
        let dest = tmp.path().join("releases").join("1.0.0");
        let err = stage(
            &bin,
            ArtifactFormat::Executable,
            "api",
            &dest,
            greedy.disk.unwrap(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("not enough free disk space on "),
            "{err}"
        );
        let small = DiskLimits {
            max_release_size: 4,
            ..DISK
        };
        let err = stage(&bin, ArtifactFormat::Executable, "api", &dest, small).unwrap_err();
        assert_eq!(
            err.to_string(),
            "release unpacks to more than max_release_size (4 bytes)"
        );
        assert!(!dest.exists());
    }

    #[test]
    fn a_manifest_past_the_control_planes_scan_is_refused() {
        let many: Vec<String> = (0..MANIFEST_SCAN_ENTRIES)
            .map(|i| format!("f{i}"))
            .collect();
        let mut entries: Vec<Entry> = many
            .iter()
            .map(|n| file(Box::leak(n.clone().into_boxed_str()), 0o644, b""))
            .collect();
        entries.push(file(RELEASE_MANIFEST, 0o644, b"[migrate]\n"));
        let staged = stage_archive(&entries, Limits::DEFAULT);
        let err = staged.result.as_ref().unwrap_err().to_string();
        assert!(
            err.starts_with("refusing archive entry rollwave.toml: rollwave.toml must be among the archive's first 10000 entries"),
            "{err}"
        );
        assert!(staged.releases().is_empty());

        // Within the scan, it is a file like any other.
        entries.remove(0);
        entries.rotate_right(1);
        stage_archive(&entries, Limits::DEFAULT).result.unwrap();
    }

    #[test]
    fn stage_reports_corrupt_archives() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("artifact.tar.gz");
        let mut bytes = tgz(&[file("a", 0o644, &[7; 10_000])]);
        bytes.truncate(bytes.len() / 2);
        fs::write(&archive, bytes).unwrap();
        let dest = tmp.path().join("releases/1.0.0");
        let err = stage(&archive, ArtifactFormat::TarGz, "app", &dest, DISK).unwrap_err();
        assert!(matches!(err, ArtifactError::Unpack { .. }), "{err}");
        assert!(!dest.exists());
        assert_eq!(
            fs::read_dir(tmp.path().join("releases")).unwrap().count(),
            0
        );

        fs::write(&archive, b"not gzip at all").unwrap();
        let err = stage(&archive, ArtifactFormat::TarGz, "app", &dest, DISK).unwrap_err();
        assert!(matches!(err, ArtifactError::Unpack { .. }), "{err}");
        assert!(!dest.exists());
    }

    #[test]
    fn clean_stale_tmp_removes_only_other_processes_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let me = std::process::id();
        fs::create_dir_all(root.join(".1.2.3.tmp-4294967295-17/bin")).unwrap();
        fs::write(root.join(".download.tmp-4294967295-18"), b"partial").unwrap();
        fs::create_dir(root.join(format!(".1.2.4.tmp-{me}-19"))).unwrap();
        fs::create_dir(root.join("1.2.3")).unwrap();
        fs::create_dir(root.join("1.0.0-a.tmp-1-2")).unwrap();
        fs::create_dir(root.join(".hidden")).unwrap();
        clean_stale_tmp(root).unwrap();
        let mut left: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                format!(".1.2.4.tmp-{me}-19"),
                ".hidden".to_owned(),
                "1.0.0-a.tmp-1-2".to_owned(),
                "1.2.3".to_owned()
            ]
        );
        clean_stale_tmp(&root.join("missing")).unwrap();
    }

    #[test]
    fn tmp_names_are_unique_and_recognised() {
        let a = tmp_name("1.2.3");
        let b = tmp_name("1.2.3");
        assert_ne!(a, b);
        assert_eq!(stale_tmp_pid(&a), Some(std::process::id()));
        assert_eq!(stale_tmp_pid("1.2.3"), None);
        assert_eq!(stale_tmp_pid(".x.tmp-+1-2"), None);
    }

    #[test]
    fn sha256_file_is_lowercase_hex() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    // ---- signatures ----

    #[test]
    fn verify_signature_reads_the_whole_file_and_leaves_it() {
        let minisign::KeyPair { pk, sk } =
            minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let keys = TrustedKeys::new(vec![rollwave_core::TrustedKey::from_base64(
            &pk.to_base64(),
        )
        .unwrap()])
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("artifact");
        // Over several read buffers, so that every chunk counts.
        let mut bytes: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
        fs::write(&path, &bytes).unwrap();
        let comment = rollwave_core::signing::trusted_comment("api", "2.0.0", &sha(&bytes));
        let sig = minisign::sign(Some(&pk), &sk, &bytes[..], Some(&comment), None)
            .unwrap()
            .into_string();
        let id = keys.keys()[0].id().to_string();
        assert_eq!(
            verify_signature(&path, &[&sig], &keys, "api", "2.0.0").unwrap(),
            id
        );
        let err = verify_signature(&path, &[], &keys, "api", "2.0.0").unwrap_err();
        assert_eq!(err.to_string(), format!("unsigned (trusted: {id})"));
        let err = verify_signature(&path, &[&sig], &keys, "api", "2.0.1").unwrap_err();
        assert_eq!(err.to_string(), "signed for api@2.0.0, not api@2.0.1");

        // One byte changed, far into the file.
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let err = verify_signature(&path, &[&sig], &keys, "api", "2.0.0").unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactError::Signature(SignatureError::Mismatch { .. })
            ),
            "{err}"
        );
        assert!(path.exists(), "the caller removes the file");

        let err =
            verify_signature(&tmp.path().join("gone"), &[&sig], &keys, "api", "2.0.0").unwrap_err();
        assert!(err.to_string().starts_with("opening "), "{err}");
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }
}
