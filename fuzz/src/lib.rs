//! What the unpack targets share: staging one archive into a fresh scratch
//! tree and checking everything the agent promises about the result.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use rollwave_agent::artifact::stage_tar_gz_with_limits;

/// Small enough that inputs of a few KiB can reach them (the gzip of many
/// repeated headers is small), large enough for any file such an input holds.
pub const MAX_BYTES: u64 = 1 << 20;
pub const MAX_ENTRIES: u64 = 256;

/// Directories between the scratch root and the releases directory: an
/// entry that climbs out of the release by up to four levels lands in one of
/// them or in the root, where the checks below see it.
const NESTING: [&str; 3] = ["l1", "l2", "l3"];
const ARCHIVE: &str = "artifact.tar.gz";
const RELEASE: &str = "1.0.0";

/// Every fsync the unpacker makes is cheap on tmpfs, and the fuzzer makes
/// millions of them.
fn scratch_base() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Stages `gz` as a tar.gz release and checks that it did not panic (the
/// fuzzer sees that), wrote nothing outside the release directory, left no
/// temporary directory behind on error, and, on success, unpacked exactly
/// what the archive holds with safe modes and links that stay inside.
pub fn stage_and_check(gz: &[u8]) {
    let scratch = tempfile::Builder::new()
        .prefix("rollwave-fuzz-")
        .tempdir_in(scratch_base())
        .expect("creating the scratch directory");
    let root = scratch.path();
    fs::write(root.join(ARCHIVE), gz).expect("writing the archive");
    let mut releases = root.to_path_buf();
    for level in NESTING {
        releases.push(level);
    }
    fs::create_dir_all(&releases).expect("creating the releases directory");
    let dest = releases.join(RELEASE);

    let result = stage_tar_gz_with_limits(&root.join(ARCHIVE), &dest, MAX_BYTES, MAX_ENTRIES);

    assert_eq!(
        names(root),
        [ARCHIVE, NESTING[0]],
        "something was written beside the archive"
    );
    let mut dir = root.join(NESTING[0]);
    for next in &NESTING[1..] {
        assert_eq!(
            names(&dir),
            [*next],
            "something was written in {}",
            dir.display()
        );
        dir.push(next);
    }
    match result {
        Ok(()) => {
            assert_eq!(names(&releases), [RELEASE], "a temporary directory is left");
            check_tree(&dest);
            check_contents(gz, &dest);
        }
        Err(e) => assert!(
            names(&releases).is_empty(),
            "after an error ({e}) the releases directory holds {:?}",
            names(&releases)
        ),
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("listing a scratch directory")
        .map(|e| {
            e.expect("listing a scratch directory")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Modes, file types, symbolic links and hard links of the staged release.
fn check_tree(dest: &Path) {
    let dest = fs::canonicalize(dest).expect("resolving the release directory");
    let mut links: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut bytes = 0;
    let mut stack = vec![dest.clone()];
    while let Some(dir) = stack.pop() {
        let meta = fs::symlink_metadata(&dir).expect("inspecting a directory");
        let mode = meta.permissions().mode();
        assert_eq!(mode & 0o7022, 0, "{} has mode {mode:o}", dir.display());
        assert_eq!(mode & 0o700, 0o700, "{} has mode {mode:o}", dir.display());
        for entry in fs::read_dir(&dir).expect("listing the release") {
            let path = entry.expect("listing the release").path();
            let meta = fs::symlink_metadata(&path).expect("inspecting an entry");
            let kind = meta.file_type();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_symlink() {
                let target = fs::read_link(&path).expect("reading a link");
                assert!(
                    target.is_relative(),
                    "{} -> {}",
                    path.display(),
                    target.display()
                );
                // The link's own directory is real (nothing is written
                // through a link), so resolving from it lexically is what
                // the kernel does for the link's leading `..`.
                let resolved = lexical(&dir.join(&target));
                assert!(
                    resolved.starts_with(&dest),
                    "{} -> {} leaves the release",
                    path.display(),
                    target.display()
                );
            } else if kind.is_file() {
                let mode = meta.permissions().mode();
                assert_eq!(mode & 0o7022, 0, "{} has mode {mode:o}", path.display());
                assert_ne!(mode & 0o200, 0, "{} has mode {mode:o}", path.display());
                let seen = links.entry(meta.ino()).or_insert((meta.nlink(), 0));
                if seen.1 == 0 {
                    bytes += meta.len();
                }
                seen.1 += 1;
            } else {
                panic!("{} is a {kind:?}", path.display());
            }
        }
    }
    for (inode, (nlink, seen)) in links {
        assert_eq!(nlink, seen, "inode {inode} has links outside the release");
    }
    assert!(bytes <= MAX_BYTES, "{bytes} bytes unpacked");
}

fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// A successful staging wrote every entry of the archive where it belongs:
/// read the archive again and compare.
fn check_contents(gz: &[u8], dest: &Path) {
    let mut archive = tar::Archive::new(GzDecoder::new(gz));
    let entries = archive
        .entries()
        .expect("the archive was read once already");
    for entry in entries {
        let mut entry = entry.expect("the archive was read once already");
        let path = entry
            .path()
            .expect("the archive was read once already")
            .into_owned();
        let rel: PathBuf = path
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect();
        let at = dest.join(&rel);
        let shown = path.display();
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut want = Vec::new();
                entry
                    .read_to_end(&mut want)
                    .expect("the archive was read once already");
                let got = fs::read(&at).unwrap_or_else(|e| panic!("entry {shown}: {e}"));
                assert!(got == want, "entry {shown} was unpacked with other content");
            }
            tar::EntryType::Directory => {
                assert!(at.is_dir(), "entry {shown} is not a directory");
            }
            tar::EntryType::Symlink => {
                let meta =
                    fs::symlink_metadata(&at).unwrap_or_else(|e| panic!("entry {shown}: {e}"));
                assert!(meta.file_type().is_symlink(), "entry {shown} is not a link");
            }
            tar::EntryType::Link => {
                let meta =
                    fs::symlink_metadata(&at).unwrap_or_else(|e| panic!("entry {shown}: {e}"));
                assert!(meta.is_file(), "entry {shown} is not a file");
            }
            _ => {}
        }
    }
}
