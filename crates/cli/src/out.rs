//! Standard output for commands, which may be a pipe its reader closes
//! early (`rollwave nodes | head -1`, `rollout start --wait | grep -q ...`).
//!
//! `println!` panics when stdout is closed (Rust ignores SIGPIPE, so the
//! write fails with EPIPE). Here the first such failure marks stdout closed
//! and later output is dropped: a command goes on to its real end and exit
//! code (`--wait` still waits, and says how the rollout ended), and one
//! whose only job is printing (`--watch`, `--follow`) stops, as `head`'s
//! writer would.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);
/// Output was lost for another reason than a reader gone (a full disk):
/// the command must not exit as if all was well.
static FAILED: AtomicBool = AtomicBool::new(false);

/// Writes to stdout, unless its reader is gone.
pub fn write(args: std::fmt::Arguments) {
    if closed() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            CLOSED.store(true, Ordering::Relaxed);
        } else {
            // Another failure (a full disk under a redirect) is not
            // something a reader can ignore: said once, and the exit code
            // says it too (see `failed`).
            FAILED.store(true, Ordering::Relaxed);
            if !CLOSED.swap(true, Ordering::Relaxed) {
                eprintln!("error: writing to standard output: {e}");
            }
        }
    }
}

/// Whether stdout's reader has gone away.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Whether output was lost for another reason than its reader leaving.
pub fn failed() -> bool {
    FAILED.load(Ordering::Relaxed)
}

/// `print!` that survives a closed stdout.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}

/// `println!` that survives a closed stdout.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
