//! How much a release may take on disk: the unpacked size limit and the free
//! space kept on the file system that holds the releases.
//!
//! Both are checked before anything is written and again as each file is
//! unpacked, against the sizes the archive's headers declare and the bytes
//! actually written, so a small archive that inflates to gigabytes is
//! refused before it fills the disk.

use std::io;
use std::path::Path;

use rollwave_core::format_bytes;

/// Default `max_release_size`: larger than any service binary or bundle a
/// node should unpack, small enough that a mistaken or hostile push cannot
/// take a node's disk.
pub const DEFAULT_MAX_RELEASE_SIZE: u64 = 1 << 30;

/// The default margin kept free: a node whose disk fills up stops logging,
/// its database stops writing, and a rollback that needs room fails too.
/// A fixed size rather than a share of the file system, so that a large
/// disk does not refuse releases while it has plenty of room.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 1 << 30;
/// Default `keep_releases`: releases kept besides the current and the
/// previous one, for a quick switch back further than one step.
pub const DEFAULT_KEEP_RELEASES: usize = 2;

/// What staging a release needs from the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    /// The largest total size of the regular files of one release: a release
    /// is refused when it would exceed it (equal is fine).
    pub max_release_size: u64,
    /// Bytes left free on the file system after staging; `None`:
    /// [`DEFAULT_MIN_FREE_BYTES`].
    pub min_free: Option<u64>,
    /// Releases kept on disk besides the current one, the previous one and
    /// the one a task is staging; older ones are removed.
    pub keep_releases: usize,
}

impl Default for DiskLimits {
    fn default() -> Self {
        DiskLimits {
            max_release_size: DEFAULT_MAX_RELEASE_SIZE,
            min_free: None,
            keep_releases: DEFAULT_KEEP_RELEASES,
        }
    }
}

impl DiskLimits {
    /// The bytes to keep free on a file system of `total` bytes.
    pub fn margin(&self, _total: u64) -> u64 {
        self.min_free.unwrap_or(DEFAULT_MIN_FREE_BYTES)
    }

    /// Refuses when writing `need` more bytes under `dir` would leave less
    /// than the margin free. The error is the task's reason, as is.
    pub fn check_space(&self, dir: &Path, need: u64) -> Result<(), String> {
        let space =
            space(dir).map_err(|e| format!("reading free space of {}: {e}", dir.display()))?;
        let margin = self.margin(space.total);
        let wanted = need.saturating_add(margin);
        if space.available < wanted {
            return Err(format!(
                "not enough free disk space on {}: need {} ({} for the release and {} kept free), have {}",
                dir.display(),
                format_bytes(wanted),
                format_bytes(need),
                format_bytes(margin),
                format_bytes(space.available)
            ));
        }
        Ok(())
    }

    /// The failure reason of a release over `max_release_size`.
    pub fn too_large(&self) -> String {
        format!(
            "release unpacks to more than max_release_size ({})",
            exact_bytes(self.max_release_size)
        )
    }
}

/// A file system's size and the bytes an unprivileged process may still
/// write to it.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    pub available: u64,
    pub total: u64,
}

pub fn space(path: &Path) -> io::Result<Space> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let block = st.fragment_size() as u64;
    Ok(Space {
        available: (st.blocks_available() as u64).saturating_mul(block),
        total: (st.blocks() as u64).saturating_mul(block),
    })
}

/// `1 GiB`, `512 MiB`, or bytes: a configured size as its owner wrote it,
/// never rounded (`format_bytes` rounds).
pub fn exact_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (size, unit) in UNITS {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} bytes")
}

/// Parses a size as `agent.toml` writes it: bytes (`1048576`) or a number
/// with a binary unit (`512MiB`, `1 GiB`; `KiB`, `MiB`, `GiB`, `TiB`).
pub fn parse_size(field: &str, text: &str) -> Result<u64, String> {
    let bad = || {
        format!("{field}: {text:?} is not a size like 512MiB or 1GiB (units: KiB, MiB, GiB, TiB)")
    };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("f", "1048576"), Ok(1 << 20));
        assert_eq!(parse_size("f", "512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("f", "1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("f", "4KiB"), Ok(4096));
        for bad in ["", "GiB", "1.5GiB", "1GB", "-1", "99999999999TiB"] {
            let e = parse_size("max_release_size", bad).unwrap_err();
            assert!(e.starts_with("max_release_size: "), "{e}");
        }
    }

    #[test]
    fn exact_sizes_are_not_rounded() {
        assert_eq!(exact_bytes(1 << 30), "1 GiB");
        assert_eq!(exact_bytes(3 << 20), "3 MiB");
        assert_eq!(exact_bytes((1 << 20) + 1), "1048577 bytes");
    }

    #[test]
    fn the_default_margin_is_1_gib() {
        let d = DiskLimits::default();
        assert_eq!(d.margin(10 << 30), 1 << 30);
        assert_eq!(d.margin(100 << 30), 1 << 30);
        let set = DiskLimits {
            min_free: Some(7),
            ..d
        };
        assert_eq!(set.margin(100 << 30), 7);
    }

    #[test]
    fn space_is_refused_naming_the_directory_and_both_figures() {
        let dir = tempfile::tempdir().unwrap();
        let d = DiskLimits {
            min_free: Some(0),
            ..DiskLimits::default()
        };
        d.check_space(dir.path(), 1).unwrap();
        let e = d.check_space(dir.path(), u64::MAX / 2).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "not enough free disk space on {}: need ",
                dir.path().display()
            )),
            "{e}"
        );
        assert!(e.contains(", have "), "{e}");
    }
}
