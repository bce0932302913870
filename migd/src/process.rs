//! Other processes, as the daemon and a VM process see them.

/// True while a process with this pid exists and is not a zombie (an adopted VM
/// process is not our child, and its reaper may be slow or absent). A
/// zombie main thread whose other threads still exit counts as alive: they
/// still hold its descriptors (the VM's `process.lock` among them).
///
/// Only an answer that the process is not there counts as gone: a `/proc`
/// read that fails otherwise (this process out of descriptors, say, which
/// a flood of connections can cause) leaves it alive. Taken for gone, a
/// running VM was listed stopped and its socket removed.
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']));
            !zombie || other_threads_remain(pid)
        }
        Err(e) => !is_gone(&e),
    }
}

/// Whether a `/proc/PID` access failed because the process is not there.
fn is_gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// Whether process `pid` has threads besides its main one (exiting ones
/// included: a thread is listed until it has let go of what it held).
fn other_threads_remain(pid: u32) -> bool {
    let main = pid.to_string();
    match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks
            .flatten()
            .any(|t| t.file_name().to_str() != Some(main.as_str())),
        Err(e) => !is_gone(&e),
    }
}

/// The pid of the process at the other end of a unix socket (`SO_PEERCRED`:
/// the process that connected, or bound the listening end).
pub fn peer_pid(s: &std::os::unix::net::UnixStream) -> Option<u32> {
    nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .and_then(|c| u32::try_from(c.pid()).ok())
}

/// A process watched for its exit: through a pidfd where the kernel has
/// them (5.3 on), which also outlives a reuse of the pid; else its pid,
/// polled.
pub struct Watched {
    pid: u32,
    fd: Option<std::os::fd::OwnedFd>,
}

impl Watched {
    /// Starts watching `pid` (before anything it does could end it).
    pub fn new(pid: u32) -> Watched {
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; nothing else is touched.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        let fd = (fd >= 0).then(|| {
            // SAFETY: the descriptor was just created and is owned by nothing else.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
        });
        Watched { pid, fd }
    }

    /// Whether the process has exited, or does within `timeout` (a process
    /// whose socket just closed may take a moment to be gone).
    pub fn gone_within(&self, timeout: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd;
        if let Some(fd) = &self.fd {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, for the duration of the call.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            return n > 0;
        }
        let end = std::time::Instant::now() + timeout;
        while alive(self.pid) {
            if std::time::Instant::now() >= end {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    }
}

/// Binds a unix socket at `path` that only this user can connect to: it is
/// created with mode 0600 (under umask 0177), so no one else can connect
/// even for the instant before a chmod.
pub fn bind_private(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let l = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process is gone only where /proc says it is not there: running out
    /// of descriptors (a flood of connections) is no death.
    #[test]
    fn only_a_missing_process_counts_as_gone() {
        use std::io::{Error, ErrorKind};
        assert!(is_gone(&Error::from(ErrorKind::NotFound)));
        assert!(is_gone(&Error::from_raw_os_error(libc::ENOENT)));
        assert!(is_gone(&Error::from_raw_os_error(libc::ESRCH)));
        for busy in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::EACCES] {
            assert!(!is_gone(&Error::from_raw_os_error(busy)), "{busy}");
        }
    }

    #[test]
    fn a_reaped_or_zombie_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while alive(pid) {
            assert!(std::time::Instant::now() < end, "true never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!alive(pid));
        assert!(alive(std::process::id()));
        let dir = std::env::temp_dir().join(format!("migd-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let _l = bind_private(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
        // Watched: alive while it runs, gone once it exits (a zombie too).
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let w = Watched::new(child.id());
        assert!(!w.gone_within(std::time::Duration::from_millis(50)));
        assert!(w.gone_within(std::time::Duration::from_secs(10)));
        child.wait().unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(peer_pid(&a), Some(std::process::id()));
        drop(b);
    }
}
