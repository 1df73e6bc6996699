//! The one module with `unsafe` code: listening sockets handed to service
//! processes (systemd socket activation: fds 3, 4, ... in the child) and
//! taken back from a running process after an agent restart.
//!
//! Why unsafe is needed and why it is sound:
//! - [`pass_fds`] installs a `pre_exec` hook, which runs in the forked child
//!   before `exec`. It only calls `dup2`, which is async-signal-safe, on fds
//!   that the parent duplicated above [`HIGH_FD`] beforehand, so no source fd
//!   can be overwritten by an earlier `dup2` to a low target.
//! - [`take_fd`] wraps the fds returned by `pidfd_open`/`pidfd_getfd` in
//!   `OwnedFd`; the kernel hands us fresh descriptors that nothing else owns.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg};

/// Sources are duplicated at or above this number before fork.
const HIGH_FD: RawFd = 64;

/// The first fd of socket activation (after stdin, stdout, stderr).
pub const LISTEN_FDS_START: RawFd = 3;

/// Arranges for `fds` to become fds 3, 4, ... of the process `cmd` spawns,
/// inherited across `exec`. Returns the duplicates the parent must keep
/// alive until the spawn has happened (drop them afterwards).
pub fn pass_fds(cmd: &mut tokio::process::Command, fds: &[&OwnedFd]) -> io::Result<Vec<OwnedFd>> {
    let mut high = Vec::with_capacity(fds.len());
    for fd in fds {
        let raw = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD))?;
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) returned a new descriptor we own.
        high.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    let raws: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the hook only calls dup2 (async-signal-safe) and allocates
    // nothing; `raws` was built before fork. dup2 clears FD_CLOEXEC on the
    // target, so the sockets survive exec while their sources do not.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in raws.iter().enumerate() {
                if libc::dup2(*fd, LISTEN_FDS_START + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(high)
}

/// Duplicates fd `target` of process `pid` into this process (Linux 5.6+,
/// needs permission to ptrace the process: same user, or CAP_SYS_PTRACE).
pub fn take_fd(pid: u32, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls with integer arguments; each success returns a
    // new descriptor that we wrap exactly once.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as RawFd);
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd as RawFd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn child_sees_sockets_at_fd_3_and_up() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, b): (OwnedFd, OwnedFd) = (a.into(), b.into());
        let mut cmd = tokio::process::Command::new("sh");
        // fd 3 and 4 exist in the child; fd 5 does not.
        cmd.args([
            "-c",
            "test -e /proc/self/fd/3 && test -e /proc/self/fd/4 && ! test -e /proc/self/fd/5",
        ]);
        let keep = pass_fds(&mut cmd, &[&a, &b]).unwrap();
        let status = cmd.status().await.unwrap();
        drop(keep);
        assert!(status.success());
    }

    #[test]
    fn takes_a_socket_back_from_a_process() {
        // Our own process stands in for the service.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let fd = take_fd(std::process::id(), l.as_raw_fd()).unwrap();
        let copy = std::net::TcpListener::from(fd);
        assert_eq!(copy.local_addr().unwrap(), addr);
        assert!(take_fd(std::process::id(), 999).is_err());
    }
}
