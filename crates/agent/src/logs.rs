//! Each service's output in its own log, `state_dir/logs/<service>.log`,
//! rotated by size, never in the agent's own log.
//!
//! A service's stdout and stderr are a named pipe, `logs/<service>.pipe`,
//! which the agent drains into the log file, stamping each line with the
//! time it read it (`2026-01-02T03:04:05.123456Z <line>`). A pipe rather
//! than the file itself: only a writer of its own can rotate a file that
//! running processes write to (a renamed file keeps receiving their writes,
//! and copying then truncating loses what is written in between), and a
//! named pipe rather than an anonymous one, because services outlive the
//! agent: a new agent opens the same pipe again and goes on reading what
//! the services it re-adopts write, including what they wrote meanwhile.
//!
//! Both ends open the pipe read-write. A reader of its own means a service
//! never gets `EPIPE` (or `SIGPIPE`) while no agent runs; what it writes
//! then waits in the pipe (1 MiB, where the kernel allows it), and a
//! service that fills it blocks in its write until an agent reads again.
//! The agent never sees end-of-file either, so one reader serves every
//! process of the service, one after the other or side by side (a handoff
//! candidate beside the current process).
//!
//! Only the agent writes the files, so rotation is a rename under a lock
//! that readers take to open the files: `api.log` becomes `api.log.1`
//! (`.1` becomes `.2`, and so on up to `keep`), and a new `api.log` is
//! started, before a line that would take it past `max_size`. A reader
//! follows the log by a cursor, the inode of a file and an offset in it,
//! which a rename does not change.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rollwave_api::{LogChunk, LogsOutcome, LogsRequest};
use tokio::sync::watch;

/// `max_size` unless `agent.toml` says otherwise.
pub const DEFAULT_MAX_SIZE: u64 = 10 << 20;
/// `keep` unless `agent.toml` says otherwise.
pub const DEFAULT_KEEP: usize = 5;
/// Below this a file would hold a handful of lines.
pub const MIN_MAX_SIZE: u64 = 1 << 10;
pub const MAX_KEEP: usize = 1000;
/// A line longer than this is cut into lines of this length, so that one
/// endless line cannot hold the agent's memory.
const MAX_LINE: usize = 16 << 10;
/// What the pipe holds while no agent reads it: a minute of an etcd
/// member's output many times over. The kernel may allow less
/// (`/proc/sys/fs/pipe-max-size`); then the default 64 KiB.
const PIPE_SIZE: i32 = 1 << 20;
/// A line without its newline is written after this long without more
/// output (a prompt, or a process that died mid-line).
const PARTIAL_AFTER: Duration = Duration::from_secs(1);
/// An answer holds at most this much text: it travels as one message of
/// the session, whose limit is 8 MiB once JSON has escaped it.
pub const MAX_REPLY_BYTES: u64 = 1 << 20;
/// The longest a request for lines after a cursor is held open.
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// `[logs]` in `agent.toml`, or a service's own `logs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    /// A file is rotated before a line would take it past this size.
    pub max_size: u64,
    /// Rotated files kept (`api.log.1` to `api.log.<keep>`) besides the
    /// current one.
    pub keep: usize,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            max_size: DEFAULT_MAX_SIZE,
            keep: DEFAULT_KEEP,
        }
    }
}

pub fn logs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("logs")
}

/// One service's log: the pipe its processes write to, the thread that
/// drains it into rotated files, and reads of those files.
pub struct ServiceLog {
    name: String,
    dir: PathBuf,
    pipe: PathBuf,
    /// The pipe as the agent holds it: a service is given it only while
    /// the path still leads to this same pipe.
    pipe_ino: u64,
    /// Held by the writer while it renames files and by readers while they
    /// open them, so that a reader sees each file once.
    rotation: Mutex<()>,
    /// Bumped after each write, for readers waiting for new lines.
    written: watch::Sender<u64>,
}

impl ServiceLog {
    /// Opens (creating them if needed) the service's pipe and log, and
    /// starts draining the pipe, including what it holds from before.
    pub fn start(state_dir: &Path, name: &str, settings: LogSettings) -> io::Result<Arc<Self>> {
        let dir = logs_dir(state_dir);
        std::fs::create_dir_all(&dir)?;
        let pipe = dir.join(format!("{name}.pipe"));
        make_pipe(&pipe)?;
        // Read-write: opening does not wait for a writer, and no read ever
        // returns end-of-file when the last service process is gone.
        let reader = OpenOptions::new().read(true).write(true).open(&pipe)?;
        if let Err(e) = nix::fcntl::fcntl(
            reader.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE),
        ) {
            tracing::debug!(service = %name, error = %e, "the pipe keeps its default size");
        }
        let pipe_ino = reader.metadata()?.ino();
        let writer = Rotating::open(&dir, name, settings)?;
        let (written, _) = watch::channel(0);
        let log = Arc::new(ServiceLog {
            name: name.to_string(),
            dir,
            pipe,
            pipe_ino,
            rotation: Mutex::new(()),
            written,
        });
        let weak = Arc::downgrade(&log);
        // A thread, not a task: it blocks on the pipe and on the disk.
        std::thread::Builder::new()
            .name(format!("log-{name}"))
            .spawn(move || drain(weak, reader, writer))?;
        Ok(log)
    }

    /// The current file, `logs/<service>.log`.
    pub fn path(&self) -> PathBuf {
        current_path(&self.dir, &self.name)
    }

    /// A service process's stdout and stderr: the pipe, read-write (see
    /// the module's docs).
    pub fn stdio(&self) -> io::Result<(Stdio, Stdio)> {
        let f = OpenOptions::new().read(true).write(true).open(&self.pipe)?;
        let meta = f.metadata()?;
        if !meta.file_type().is_fifo() || meta.ino() != self.pipe_ino {
            return Err(io::Error::other(format!(
                "{} is no longer the pipe this agent reads; restart the agent",
                self.pipe.display()
            )));
        }
        Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
    }

    /// Answers a request of the control plane; a request for lines after a
    /// cursor with nothing there yet waits up to its `wait_ms` for some.
    pub async fn answer(self: Arc<Self>, req: LogsRequest) -> LogsOutcome {
        // Subscribed before reading: a write after the read wakes the wait.
        let mut written = self.written.subscribe();
        let wait = Duration::from_millis(req.wait_ms).min(LONGEST_WAIT);
        let mut chunk = self.clone().read_in_background(req.clone()).await;
        if let Ok(c) = &chunk {
            if c.text.is_empty() && req.after.is_some() && !wait.is_zero() {
                let _ = tokio::time::timeout(wait, written.changed()).await;
                chunk = self.read_in_background(req).await;
            }
        }
        match chunk {
            Ok(c) => LogsOutcome::Lines(c),
            Err(e) => LogsOutcome::Failed {
                reason: e.to_string(),
            },
        }
    }

    async fn read_in_background(self: Arc<Self>, req: LogsRequest) -> io::Result<LogChunk> {
        tokio::task::spawn_blocking(move || self.read(&req))
            .await
            .map_err(io::Error::other)?
    }

    /// The newest lines (at or after `since_ms`), or those after the
    /// request's cursor, at most `max_bytes` of them (and never more than
    /// [`MAX_REPLY_BYTES`]).
    pub fn read(&self, req: &LogsRequest) -> io::Result<LogChunk> {
        let max = req.max_bytes.min(MAX_REPLY_BYTES);
        let files = self.open_files()?;
        match &req.after {
            Some(cursor) => {
                let at = Cursor::parse(cursor).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{cursor:?} is not a log cursor"),
                    )
                })?;
                read_after(&files, at, max)
            }
            None => {
                let since = req
                    .since_ms
                    .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
                read_tail(&files, since, max)
            }
        }
    }

    /// The log's files, the current one first, then `.1`, `.2`, ...
    fn open_files(&self) -> io::Result<Vec<Opened>> {
        let _held = self.rotation.lock().unwrap_or_else(|e| e.into_inner());
        let mut paths = vec![self.path()];
        paths.extend(numbered(&self.dir, &self.name)?.into_iter().map(|(_, p)| p));
        let mut out = Vec::new();
        for path in paths {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let meta = file.metadata()?;
            let head = read_range(&file, 0, 64)?;
            let first = head
                .iter()
                .position(|&b| b == b' ')
                .map(|end| String::from_utf8_lossy(&head[..end]).into_owned())
                .unwrap_or_default();
            out.push(Opened {
                file,
                ino: meta.ino(),
                first,
                len: meta.len(),
            });
        }
        Ok(out)
    }
}

/// Creates the named pipe, replacing anything else found at its path.
fn make_pipe(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => return Ok(()),
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(io::Error::from)
}

fn current_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

/// The rotated files, `.1` first.
fn numbered(dir: &Path, name: &str) -> io::Result<Vec<(usize, PathBuf)>> {
    let prefix = format!("{name}.log.");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(n) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// Copies the pipe into the log until the log is dropped.
fn drain(log: Weak<ServiceLog>, mut pipe: File, mut out: Rotating) {
    let mut buf = vec![0u8; 64 << 10];
    let mut partial: Vec<u8> = Vec::new();
    let mut failing = false;
    loop {
        let ready = {
            let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
            let timeout = PollTimeout::try_from(PARTIAL_AFTER).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, timeout) {
                Ok(n) => n > 0,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(pipe = %out.name, error = %e, "waiting on a service's output; its log stops here");
                    return;
                }
            }
        };
        let Some(log) = log.upgrade() else { return };
        let stamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        let mut lines: Vec<Vec<u8>> = Vec::new();
        if ready {
            let n = match pipe.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(service = %out.name, error = %e, "reading a service's output; its log stops here");
                    return;
                }
            };
            split_lines(&buf[..n], &mut partial, |line| {
                lines.push(stamped(&stamp, line))
            });
        } else if !partial.is_empty() {
            lines.push(stamped(&stamp, &partial));
            partial.clear();
        }
        if lines.is_empty() {
            continue;
        }
        // On failure (a full disk) the lines are dropped: the pipe must
        // still be drained, or the services would block on their writes.
        match out.write_lines(&lines, &log.rotation) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(service = %out.name, error = %e, "writing the service's log; its output is lost until a write succeeds");
            }
            Err(_) => {}
        }
        log.written.send_modify(|n| *n += 1);
    }
}

/// Hands each complete line of `data` (after what `partial` held) to
/// `line`, without its newline; keeps the rest in `partial`, cut at
/// [`MAX_LINE`].
fn split_lines(data: &[u8], partial: &mut Vec<u8>, mut line: impl FnMut(&[u8])) {
    let mut rest = data;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        if partial.is_empty() {
            line(&rest[..i]);
        } else {
            partial.extend_from_slice(&rest[..i]);
            line(partial);
            partial.clear();
        }
        rest = &rest[i + 1..];
    }
    partial.extend_from_slice(rest);
    while partial.len() >= MAX_LINE {
        line(&partial[..MAX_LINE]);
        partial.drain(..MAX_LINE);
    }
}

fn stamped(stamp: &str, line: &[u8]) -> Vec<u8> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut out = Vec::with_capacity(stamp.len() + line.len() + 2);
    out.extend_from_slice(stamp.as_bytes());
    out.push(b' ');
    out.extend_from_slice(line);
    out.push(b'\n');
    out
}

/// The current file, and how to rotate it.
struct Rotating {
    dir: PathBuf,
    name: String,
    settings: LogSettings,
    file: File,
    size: u64,
}

impl Rotating {
    fn open(dir: &Path, name: &str, settings: LogSettings) -> io::Result<Rotating> {
        let file = open_append(&current_path(dir, name))?;
        let size = file.metadata()?.len();
        Ok(Rotating {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            settings,
            file,
            size,
        })
    }

    /// Writes whole lines, each batch in one write, rotating before a line
    /// that would take the file past `max_size` (a file holds at least one
    /// line, however long).
    fn write_lines(&mut self, lines: &[Vec<u8>], rotation: &Mutex<()>) -> io::Result<()> {
        let mut batch = Vec::new();
        for line in lines {
            let size = self.size + batch.len() as u64;
            if size > 0 && size + line.len() as u64 > self.settings.max_size {
                self.flush(&mut batch)?;
                self.rotate(rotation)?;
            }
            batch.extend_from_slice(line);
        }
        self.flush(&mut batch)
    }

    fn flush(&mut self, batch: &mut Vec<u8>) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.file.write_all(batch)?;
        self.size += batch.len() as u64;
        batch.clear();
        Ok(())
    }

    /// `.N` to `.N+1` from the oldest kept, the current file to `.1`, and a
    /// new current file; what would go past `keep` is removed.
    fn rotate(&mut self, rotation: &Mutex<()>) -> io::Result<()> {
        let _held = rotation.lock().unwrap_or_else(|e| e.into_inner());
        let keep = self.settings.keep;
        let path = |n: usize| self.dir.join(format!("{}.log.{n}", self.name));
        // Beyond `keep` (also those left by a larger `keep` before).
        for (n, p) in numbered(&self.dir, &self.name)? {
            if n >= keep {
                remove_if_there(&p)?;
            }
        }
        for n in (1..keep).rev() {
            match std::fs::rename(path(n), path(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let current = current_path(&self.dir, &self.name);
        if keep > 0 {
            std::fs::rename(&current, path(1))?;
        } else {
            remove_if_there(&current)?;
        }
        self.file = open_append(&current)?;
        self.size = 0;
        Ok(())
    }
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// A file of the log as opened for one read: its length then is where the
/// read stops, whatever is written meanwhile.
struct Opened {
    file: File,
    ino: u64,
    /// The stamp of its first line (empty for an empty file).
    first: String,
    len: u64,
}

impl Opened {
    fn cursor(&self, offset: u64) -> Cursor {
        Cursor {
            ino: self.ino,
            first: self.first.clone(),
            offset,
        }
    }

    /// Whether `at` points into this file. An inode number alone could
    /// be a removed file's, reused: the first line's stamp tells them
    /// apart. A cursor at the start of a file that was empty then is
    /// before anything the file holds now, whichever file it is.
    fn holds(&self, at: &Cursor) -> bool {
        self.ino == at.ino && (self.first == at.first || (at.offset == 0 && at.first.is_empty()))
    }
}

/// A position in the log: a file (by inode, which rotation keeps, and its
/// first line's stamp) and an offset in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    ino: u64,
    first: String,
    offset: u64,
}

impl Cursor {
    fn parse(text: &str) -> Option<Cursor> {
        let mut parts = text.splitn(3, ':');
        Some(Cursor {
            ino: parts.next()?.parse().ok()?,
            offset: parts.next()?.parse().ok()?,
            first: parts.next()?.to_string(),
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.ino, self.offset, self.first)
    }
}

fn read_range(file: &File, from: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut f = file;
    f.seek(SeekFrom::Start(from))?;
    let mut out = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut out)?;
    Ok(out)
}

/// Where the last whole line of `bytes` ends.
fn whole_lines(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1)
}

/// When a line was written, from its stamp; none for a line without one.
fn stamp_of(line: &[u8]) -> Option<SystemTime> {
    let end = line.iter().position(|&b| b == b' ')?;
    let text = std::str::from_utf8(&line[..end]).ok()?;
    humantime::parse_rfc3339(text).ok()
}

/// The newest lines, from the current file back through the rotated ones,
/// until `max` bytes or a line older than `since`.
fn read_tail(files: &[Opened], since: Option<SystemTime>, max: u64) -> io::Result<LogChunk> {
    let mut cursor = files.first().map(|f| f.cursor(f.len));
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut budget = max;
    let mut truncated = false;
    for (i, f) in files.iter().enumerate() {
        if budget == 0 {
            truncated = true;
            break;
        }
        let take = f.len.min(budget);
        let start = f.len - take;
        let mut bytes = read_range(&f.file, start, take)?;
        bytes.truncate(whole_lines(&bytes));
        if i == 0 {
            cursor = Some(f.cursor(start + bytes.len() as u64));
        }
        // A read that starts inside the file starts mid-line.
        let mut from = 0;
        if start > 0 {
            from = bytes
                .iter()
                .position(|&b| b == b'\n')
                .map_or(bytes.len(), |p| p + 1);
        }
        let mut older = false;
        if let Some(since) = since {
            while from < bytes.len() {
                let end = bytes[from..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |p| from + p + 1);
                if stamp_of(&bytes[from..end]).is_some_and(|t| t >= since) {
                    break;
                }
                older = true;
                from = end;
            }
        }
        budget -= (bytes.len() - from) as u64;
        parts.push(bytes.split_off(from));
        if older {
            break;
        }
        if start > 0 {
            truncated = true;
            break;
        }
    }
    parts.reverse();
    Ok(LogChunk {
        text: String::from_utf8_lossy(&parts.concat()).into_owned(),
        cursor: cursor.map(|c| c.to_string()).unwrap_or_default(),
        truncated,
        skipped: false,
    })
}

/// The lines after `at`, oldest first, through the newer files, up to `max`
/// bytes. A cursor whose file was rotated away resumes at the oldest line
/// kept, and says so.
fn read_after(files: &[Opened], at: Cursor, max: u64) -> io::Result<LogChunk> {
    let Some(oldest) = files.len().checked_sub(1) else {
        return Ok(LogChunk {
            cursor: at.to_string(),
            ..Default::default()
        });
    };
    let (mut i, mut offset, skipped) = match files.iter().position(|f| f.holds(&at)) {
        Some(i) => (i, at.offset.min(files[i].len), false),
        None => (oldest, 0, true),
    };
    let mut out = Vec::new();
    let mut budget = max;
    let cursor = loop {
        let f = &files[i];
        let rest = f.len - offset;
        let take = rest.min(budget);
        let bytes = read_range(&f.file, offset, take)?;
        // A rotated file is complete: its last line is whole even without
        // a newline (which only a failed write would leave).
        let end = if i > 0 && take == rest {
            bytes.len()
        } else {
            whole_lines(&bytes)
        };
        out.extend_from_slice(&bytes[..end]);
        budget -= end as u64;
        offset += end as u64;
        if offset < f.len || i == 0 {
            break f.cursor(offset);
        }
        i -= 1;
        offset = 0;
    };
    Ok(LogChunk {
        text: String::from_utf8_lossy(&out).into_owned(),
        cursor: cursor.to_string(),
        truncated: false,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(after: Option<String>, since_ms: Option<u64>, max_bytes: u64) -> LogsRequest {
        LogsRequest {
            id: 1,
            service: "api".into(),
            since_ms,
            after,
            max_bytes,
            wait_ms: 0,
        }
    }

    /// The output lines of a log's text, without their stamps.
    fn bodies(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| {
                let (stamp, body) = l.split_once(' ').unwrap();
                assert!(humantime::parse_rfc3339(stamp).is_ok(), "{l}");
                body.to_string()
            })
            .collect()
    }

    fn lines(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("line {i:04}")).collect()
    }

    #[test]
    fn splits_lines_across_reads_and_cuts_endless_ones() {
        let mut partial = Vec::new();
        let mut got: Vec<Vec<u8>> = Vec::new();
        split_lines(b"a\nb", &mut partial, |l| got.push(l.to_vec()));
        split_lines(b"c\n\nd", &mut partial, |l| got.push(l.to_vec()));
        assert_eq!(got, [b"a".to_vec(), b"bc".to_vec(), Vec::new()]);
        assert_eq!(partial, b"d");
        let long = vec![b'x'; MAX_LINE + 10];
        split_lines(&long, &mut partial, |l| got.push(l.to_vec()));
        assert_eq!(got.last().unwrap().len(), MAX_LINE);
        assert_eq!(partial.len(), 11);
        assert_eq!(stamped("T", b"crlf\r"), b"T crlf\n");
    }

    #[test]
    fn rotation_keeps_every_line_but_those_past_keep() {
        let tmp = tempfile::tempdir().unwrap();
        let settings = LogSettings {
            max_size: 1024,
            keep: 2,
        };
        let dir = tmp.path();
        let mut w = Rotating::open(dir, "api", settings).unwrap();
        let lock = Mutex::new(());
        let written = lines(0..200);
        for l in &written {
            w.write_lines(
                &[stamped("2026-01-02T03:04:05.000000Z", l.as_bytes())],
                &lock,
            )
            .unwrap();
        }
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap();
        assert!(!dir.join("api.log.3").exists());
        let mut all = String::new();
        for p in ["api.log.2", "api.log.1", "api.log"] {
            let text = read(p);
            assert!(
                text.len() as u64 <= settings.max_size,
                "{p}: {}",
                text.len()
            );
            all.push_str(&text);
        }
        // What is kept is an unbroken run of the newest lines.
        let kept = bodies(&all);
        assert!(kept.len() > 60, "{}", kept.len());
        assert_eq!(kept, written[written.len() - kept.len()..]);
        // A smaller keep later removes what it no longer keeps.
        let mut w = Rotating::open(
            dir,
            "api",
            LogSettings {
                keep: 1,
                ..settings
            },
        )
        .unwrap();
        for l in &written[..40] {
            w.write_lines(
                &[stamped("2026-01-02T03:04:05.000000Z", l.as_bytes())],
                &lock,
            )
            .unwrap();
        }
        assert!(dir.join("api.log.1").exists());
        assert!(!dir.join("api.log.2").exists());
    }

    #[tokio::test]
    async fn captures_a_process_and_serves_tail_since_and_after_across_rotations() {
        let tmp = tempfile::tempdir().unwrap();
        // Lines of 38 bytes: 100 of them fill four files of 1 KiB.
        let settings = LogSettings {
            max_size: 1024,
            keep: 3,
        };
        let log = ServiceLog::start(tmp.path(), "api", settings).unwrap();
        let run = |script: String| {
            let (out, err) = log.stdio().unwrap();
            std::process::Command::new("sh")
                .args(["-c", &script])
                .stdout(out)
                .stderr(err)
                .status()
                .unwrap()
        };
        let wait_for = |want: usize| {
            let log = log.clone();
            async move {
                let deadline = tokio::time::Instant::now() + crate::supervisor::testing::PATIENCE;
                loop {
                    let c = log.read(&request(None, None, MAX_REPLY_BYTES)).unwrap();
                    if bodies(&c.text).last().map(String::as_str)
                        == Some(&format!("line {:04}", want - 1))
                    {
                        return c;
                    }
                    assert!(tokio::time::Instant::now() < deadline, "{}", c.text);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        // stdout and stderr both land in the log.
        run("i=0; while [ $i -lt 10 ]; do printf 'line %04d\\n' $i >&$((i % 2 + 1)); i=$((i+1)); done".into());
        let first = wait_for(10).await;
        assert_eq!(bodies(&first.text), lines(0..10));
        assert!(!first.truncated);

        // Lines after the cursor, through several rotations.
        run("i=10; while [ $i -lt 100 ]; do printf 'line %04d\\n' $i; i=$((i+1)); done".into());
        wait_for(100).await;
        assert!(tmp.path().join("logs/api.log.3").exists());
        let next = log
            .read(&request(Some(first.cursor.clone()), None, MAX_REPLY_BYTES))
            .unwrap();
        assert!(!next.skipped);
        assert_eq!(bodies(&next.text), lines(10..100));
        // ... and in pieces, which end on whole lines.
        let mut cursor = first.cursor.clone();
        let mut pieces = Vec::new();
        loop {
            let c = log.read(&request(Some(cursor.clone()), None, 300)).unwrap();
            if c.text.is_empty() {
                break;
            }
            assert!(c.text.len() <= 300 && c.text.ends_with('\n'));
            pieces.extend(bodies(&c.text));
            cursor = c.cursor;
        }
        assert_eq!(pieces, lines(10..100));

        // The tail is bounded and ends with the newest line.
        let tail = log.read(&request(None, None, 500)).unwrap();
        assert!(tail.truncated && tail.text.len() <= 500);
        let got = bodies(&tail.text);
        assert_eq!(got, lines(100 - got.len()..100));

        // `since`: only the lines stamped at or after it.
        let all = log.read(&request(None, None, MAX_REPLY_BYTES)).unwrap();
        let stamps: Vec<SystemTime> = all
            .text
            .lines()
            .map(|l| stamp_of(l.as_bytes()).unwrap())
            .collect();
        let newest = *stamps.last().unwrap();
        let ms = newest
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let since = log.read(&request(None, Some(ms), MAX_REPLY_BYTES)).unwrap();
        let want = stamps
            .iter()
            .filter(|t| **t >= SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
            .count();
        assert!(want >= 1);
        assert_eq!(bodies(&since.text), lines(100 - want..100));
        let future = log
            .read(&request(None, Some(ms + 60_000), MAX_REPLY_BYTES))
            .unwrap();
        assert_eq!(future.text, "");

        // A cursor whose file was rotated away starts at the oldest kept.
        run("i=100; while [ $i -lt 300 ]; do printf 'line %04d\\n' $i; i=$((i+1)); done".into());
        wait_for(300).await;
        let late = log
            .read(&request(Some(first.cursor.clone()), None, MAX_REPLY_BYTES))
            .unwrap();
        assert!(late.skipped);
        let got = bodies(&late.text);
        assert_eq!(got, lines(300 - got.len()..300));
    }

    #[tokio::test]
    async fn a_wait_for_lines_after_the_cursor_ends_when_one_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let log = ServiceLog::start(tmp.path(), "api", LogSettings::default()).unwrap();
        let empty = log.read(&request(None, None, MAX_REPLY_BYTES)).unwrap();
        let mut req = request(Some(empty.cursor), None, MAX_REPLY_BYTES);
        req.wait_ms = 30_000;
        let waiting = tokio::spawn(log.clone().answer(req));
        let (out, err) = log.stdio().unwrap();
        std::process::Command::new("sh")
            .args(["-c", "echo hello"])
            .stdout(out)
            .stderr(err)
            .status()
            .unwrap();
        match waiting.await.unwrap() {
            LogsOutcome::Lines(c) => assert_eq!(bodies(&c.text), ["hello"]),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn output_written_while_no_agent_reads_waits_in_the_pipe() {
        let tmp = tempfile::tempdir().unwrap();
        let first = ServiceLog::start(tmp.path(), "api", LogSettings::default()).unwrap();
        let (out, err) = first.stdio().unwrap();
        // Gone, as a killed agent's reader is; the service lives on and
        // keeps the pipe open.
        drop(first);
        let mut service = std::process::Command::new("sh")
            .args(["-c", "echo while away; exec sleep 30"])
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        let again = ServiceLog::start(tmp.path(), "api", LogSettings::default()).unwrap();
        let deadline = tokio::time::Instant::now() + crate::supervisor::testing::PATIENCE;
        loop {
            let c = again.read(&request(None, None, MAX_REPLY_BYTES)).unwrap();
            if !c.text.is_empty() {
                assert_eq!(bodies(&c.text), ["while away"]);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "nothing read");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        service.kill().unwrap();
        service.wait().unwrap();
    }
}
