//! The on-disk layout of a service on a node, and the few filesystem
//! operations that must be atomic or crash-safe:
//!
//! ```text
//! state_dir/services/<name>/releases/<version>/   unpacked, verified releases
//! state_dir/services/<name>/releases/<version>.sha256   marker: staged and verified
//!                                       (its sha256, then the id of the key whose signature was verified)
//! state_dir/services/<name>/current -> releases/<version>   switched atomically
//! state_dir/services/<name>/backups/<task id>/    copies of the backup paths
//! state_dir/services/<name>/process.json          the running process, for re-adoption
//! state_dir/services/<name>/history.log           one line per switch of `current`
//! state_dir/services/<name>/active_version        the fleet-wide active version, one line
//! state_dir/tasks/<task id>.json                  task journal
//! state_dir/agent.sock                            the agent's local HTTP endpoint
//! ```

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ServiceDirs {
    pub root: PathBuf,
}

impl ServiceDirs {
    pub fn new(state_dir: &Path, service: &str) -> Self {
        ServiceDirs {
            root: state_dir.join("services").join(service),
        }
    }
    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }
    pub fn release(&self, version: &str) -> PathBuf {
        self.releases().join(version)
    }
    fn marker(&self, version: &str) -> PathBuf {
        self.releases().join(format!("{version}.sha256"))
    }
    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }
    pub fn backups(&self) -> PathBuf {
        self.root.join("backups")
    }
    /// Throwaway copies of the data, one per dry run task.
    pub fn dry_runs(&self) -> PathBuf {
        self.root.join("dry-runs")
    }
    pub fn process_file(&self) -> PathBuf {
        self.root.join("process.json")
    }
    pub fn history(&self) -> PathBuf {
        self.root.join("history.log")
    }
    /// Where the service reads its active version (the version gate).
    pub fn active_version_file(&self) -> PathBuf {
        self.root.join("active_version")
    }

    /// The active version last delivered to this node, if any.
    pub fn active_version(&self) -> io::Result<Option<String>> {
        match fs::read_to_string(self.active_version_file()) {
            Ok(text) => {
                let v = text.trim();
                Ok((!v.is_empty()).then(|| v.to_string()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces the active version file atomically, so a service reading it
    /// at any moment sees the old version or the new one, never a mix.
    pub fn write_active_version(&self, version: &str) -> io::Result<()> {
        write_atomic(
            &self.active_version_file(),
            format!("{version}\n").as_bytes(),
        )
    }

    /// Appends `<unix ms> <task> <from> -> <to>` to the switch history.
    pub fn record_switch(
        &self,
        task: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> io::Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.history())?;
        writeln!(
            f,
            "{now} {task} {} -> {}",
            from.unwrap_or("none"),
            to.unwrap_or("none")
        )?;
        f.sync_all()
    }

    pub fn create(&self) -> io::Result<()> {
        fs::create_dir_all(self.releases())?;
        fs::create_dir_all(self.backups())
    }

    /// The version `current` points at, if any.
    pub fn current_version(&self) -> Option<String> {
        let target = fs::read_link(self.current_link()).ok()?;
        target.file_name()?.to_str().map(str::to_string)
    }

    /// Whether `version` is unpacked and was verified against `sha256`.
    pub fn is_staged(&self, version: &str, sha256: &str) -> bool {
        self.release(version).is_dir()
            && fs::read_to_string(self.marker(version))
                .is_ok_and(|m| m.lines().next().map(str::trim) == Some(sha256))
    }

    /// The id of the key whose signature was verified over the artifact
    /// `version` was staged from; `None` if none was (the agent trusted no
    /// key then).
    pub fn staged_signer(&self, version: &str) -> Option<String> {
        let marker = fs::read_to_string(self.marker(version)).ok()?;
        let id = marker.lines().nth(1)?.trim();
        (!id.is_empty()).then(|| id.to_string())
    }

    pub fn mark_staged(&self, version: &str, sha256: &str, signer: Option<&str>) -> io::Result<()> {
        let mut marker = format!("{sha256}\n");
        if let Some(id) = signer {
            marker.push_str(id);
            marker.push('\n');
        }
        write_atomic(&self.marker(version), marker.as_bytes())
    }

    /// Verified versions present on disk, oldest name first.
    pub fn staged(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.releases()) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".sha256")
                    .map(str::to_string)
            })
            .filter(|v| self.release(v).is_dir())
            .collect();
        out.sort_by(
            |a, b| match (semver::Version::parse(a), semver::Version::parse(b)) {
                (Ok(a), Ok(b)) => a.cmp(&b),
                _ => a.cmp(b),
            },
        );
        out
    }

    /// The version `current` pointed at before its last switch to the
    /// version it points at now, from the switch history.
    pub fn previous_version(&self) -> Option<String> {
        let current = self.current_version()?;
        let history = fs::read_to_string(self.history()).ok()?;
        history.lines().rev().find_map(|line| {
            // `<unix ms> <task> <from> -> <to>`
            let mut words = line.split_whitespace().skip(2);
            let (from, arrow, to) = (words.next()?, words.next()?, words.next()?);
            (arrow == "->" && to == current && from != "none" && from != current)
                .then(|| from.to_string())
        })
    }

    /// Removes the oldest staged releases (by version) but `keep` and the
    /// newest `others` of the rest. Returns the versions removed.
    pub fn prune_releases(&self, keep: &[&str], others: usize) -> io::Result<Vec<String>> {
        let rest: Vec<String> = self
            .staged()
            .into_iter()
            .filter(|v| !keep.contains(&v.as_str()))
            .collect();
        let surplus = rest.len().saturating_sub(others);
        let mut removed = Vec::new();
        for v in rest.into_iter().take(surplus) {
            self.remove_release(&v)?;
            removed.push(v);
        }
        Ok(removed)
    }

    /// Removes a release that is present but not verified (a crash mid-stage).
    pub fn discard_unverified(&self, version: &str) -> io::Result<()> {
        self.remove_release(version).map(drop)
    }

    /// Removes a release, its marker first so that a removal cut short
    /// leaves an unverified directory, never a release that looks staged.
    /// Returns whether there was anything to remove. The caller makes sure
    /// `current` does not point at it.
    pub fn remove_release(&self, version: &str) -> io::Result<bool> {
        let marker = match fs::remove_file(self.marker(version)) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        match fs::remove_dir_all(self.release(version)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(marker),
            Err(e) => Err(e),
        }
    }

    /// Points `current` at `version` (or removes it for `None`) atomically:
    /// a new link is created beside it and renamed over it.
    pub fn switch_current(&self, version: Option<&str>) -> io::Result<()> {
        let link = self.current_link();
        match version {
            Some(v) => {
                let tmp = self
                    .root
                    .join(format!(".current.tmp-{}", std::process::id()));
                let _ = fs::remove_file(&tmp);
                symlink(Path::new("releases").join(v), &tmp)?;
                fs::rename(&tmp, &link)?;
            }
            None => match fs::remove_file(&link) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            },
        }
        fsync_dir(&self.root)
    }
}

/// The Unix socket on which the agent serves its local HTTP endpoint.
pub fn agent_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.sock")
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes a file through a temporary sibling and a rename, fsyncing both.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(parent)
}

/// Copies a file or directory tree; symlinks are copied as links.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<u64> {
    let meta = fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        symlink(fs::read_link(from)?, to)?;
        Ok(1)
    } else if meta.is_dir() {
        fs::create_dir_all(to)?;
        fs::set_permissions(to, meta.permissions())?;
        let mut n = 0;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            n += copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(n)
    } else {
        fs::copy(from, to)?;
        Ok(1)
    }
}

/// Removes a file or tree if present.
pub fn remove_path(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    }
}

/// The newest leader term this agent has had a session with, kept in the
/// state dir so that it survives a restart; 0 if none.
pub fn read_term(state_dir: &Path) -> u64 {
    std::fs::read_to_string(state_dir.join("term"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Records a newer leader term (fsynced, replaced atomically).
pub fn write_term(state_dir: &Path, term: u64) -> std::io::Result<()> {
    rollwave_tls::write_atomic(
        &state_dir.join("term"),
        format!("{term}\n").as_bytes(),
        0o644,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_current_atomically_and_lists_staged() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = ServiceDirs::new(tmp.path(), "api");
        dirs.create().unwrap();
        assert_eq!(dirs.current_version(), None);
        for v in ["1.10.0", "1.2.0"] {
            fs::create_dir_all(dirs.release(v)).unwrap();
            dirs.mark_staged(v, "abc", None).unwrap();
        }
        fs::create_dir_all(dirs.release("3.0.0")).unwrap(); // not verified
        assert_eq!(dirs.staged(), vec!["1.2.0", "1.10.0"]);
        assert!(dirs.is_staged("1.2.0", "abc"));
        assert!(!dirs.is_staged("1.2.0", "abd"));
        assert!(!dirs.is_staged("3.0.0", "abc"));
        assert_eq!(dirs.staged_signer("1.2.0"), None);
        dirs.mark_staged("1.2.0", "abc", Some("0123456789ABCDEF"))
            .unwrap();
        assert!(dirs.is_staged("1.2.0", "abc"));
        assert_eq!(
            dirs.staged_signer("1.2.0").as_deref(),
            Some("0123456789ABCDEF")
        );
        // A marker written before signatures: its sha256 alone, unterminated.
        fs::write(dirs.marker("1.2.0"), "abc").unwrap();
        assert!(dirs.is_staged("1.2.0", "abc"));
        assert_eq!(dirs.staged_signer("1.2.0"), None);
        dirs.switch_current(Some("1.2.0")).unwrap();
        assert_eq!(dirs.current_version().as_deref(), Some("1.2.0"));
        dirs.switch_current(Some("1.10.0")).unwrap();
        assert_eq!(dirs.current_version().as_deref(), Some("1.10.0"));
        dirs.switch_current(None).unwrap();
        assert_eq!(dirs.current_version(), None);
    }

    #[test]
    fn prunes_the_oldest_releases_but_those_it_must_keep() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = ServiceDirs::new(tmp.path(), "api");
        dirs.create().unwrap();
        for v in ["1.0.0", "2.0.0", "3.0.0", "4.0.0", "5.0.0", "10.0.0"] {
            fs::create_dir_all(dirs.release(v)).unwrap();
            dirs.mark_staged(v, "abc", None).unwrap();
        }
        dirs.switch_current(Some("4.0.0")).unwrap();
        dirs.record_switch("t1", None, Some("1.0.0")).unwrap();
        dirs.record_switch("t2", Some("1.0.0"), Some("4.0.0"))
            .unwrap();
        assert_eq!(dirs.previous_version().as_deref(), Some("1.0.0"));
        let removed = dirs.prune_releases(&["4.0.0", "1.0.0"], 2).unwrap();
        assert_eq!(removed, ["2.0.0", "3.0.0"]);
        assert_eq!(dirs.staged(), ["1.0.0", "4.0.0", "5.0.0", "10.0.0"]);
        assert!(!dirs.release("2.0.0").exists());
        assert!(!dirs.marker("2.0.0").exists());
        // Nothing more to remove.
        assert!(dirs
            .prune_releases(&["4.0.0", "1.0.0"], 2)
            .unwrap()
            .is_empty());
        assert!(!dirs.remove_release("2.0.0").unwrap());
    }

    #[test]
    fn writes_and_reads_the_active_version() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = ServiceDirs::new(tmp.path(), "api");
        dirs.create().unwrap();
        assert_eq!(dirs.active_version().unwrap(), None);
        dirs.write_active_version("1.0.0").unwrap();
        assert_eq!(
            fs::read_to_string(dirs.active_version_file()).unwrap(),
            "1.0.0\n"
        );
        assert_eq!(dirs.active_version().unwrap().as_deref(), Some("1.0.0"));
        dirs.write_active_version("2.0.0").unwrap();
        assert_eq!(dirs.active_version().unwrap().as_deref(), Some("2.0.0"));
        // No temporary file is left beside it.
        let names: Vec<_> = fs::read_dir(&dirs.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("active_version"))
            .collect();
        assert_eq!(names, ["active_version"]);
        // A file emptied by hand reads as no version rather than "".
        fs::write(dirs.active_version_file(), "\n").unwrap();
        assert_eq!(dirs.active_version().unwrap(), None);
    }

    #[test]
    fn copies_and_removes_trees() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/f"), "data").unwrap();
        symlink("b/f", src.join("a/link")).unwrap();
        let n = copy_tree(&src, &tmp.path().join("dst")).unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            fs::read_to_string(tmp.path().join("dst/a/link")).unwrap(),
            "data"
        );
        remove_path(&tmp.path().join("dst")).unwrap();
        assert!(!tmp.path().join("dst").exists());
        remove_path(&tmp.path().join("dst")).unwrap();
    }
}
