//! VM processes: spawning `migd run` detached, talking to its control socket,
//! and stopping it.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest reply line accepted from a VM process.
const MAX_REPLY: u64 = 4 << 20;

/// One request on a VM process's control socket; the whole exchange is bounded by `timeout`.
pub async fn vm_request(sock: &Path, req: &Value, timeout: Duration) -> Result<Value> {
    let exchange = async {
        let mut s = UnixStream::connect(sock)
            .await
            .with_context(|| format!("connecting to {}", sock.display()))?;
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        s.write_all(&line).await?;
        let mut reply = Vec::new();
        BufReader::new(s)
            .take(MAX_REPLY)
            .read_until(b'\n', &mut reply)
            .await?;
        if reply.is_empty() {
            bail!("the VM process closed its control socket without a reply");
        }
        let v: Value = serde_json::from_slice(&reply).with_context(|| {
            format!(
                "bad reply from the VM process: {}",
                String::from_utf8_lossy(&reply).trim_end()
            )
        })?;
        Ok(v)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => bail!("the VM process did not answer within {timeout:?}"),
    }
}

/// Like [`vm_request`], but an `{"ok":false}` reply is an error carrying its message.
pub async fn vm_call(sock: &Path, req: &Value, timeout: Duration) -> Result<Value> {
    let reply = vm_request(sock, req, timeout).await?;
    if reply["ok"] == true {
        Ok(reply)
    } else {
        bail!(
            "{}",
            reply["error"]
                .as_str()
                .unwrap_or("the VM process refused (no message)")
        )
    }
}

/// Descriptor under which a VM process holds its [`lock_path`] lock.
const LOCK_FD: RawFd = 5;

/// Spawns `migd run ARGS` in its own session, stdout and stderr appended to `log`.
/// `fd3` is handed to the child as descriptor 3 (an incoming migration's socket),
/// `fd4` as 4 (its TLS session), whatever numbers they have here.
///
/// The child holds an exclusive lock on `lock` for its whole life, taken here
/// before the fork, so that the process never runs without it: [`lock_held`]
/// tells a live process that has no control socket yet (an incoming VM built
/// with `--prefault`) from a dead one. A lock still held means a process of
/// this VM still runs: refused.
pub fn spawn(
    exe: &Path,
    args: &[String],
    log: &Path,
    lock: &Path,
    fd3: Option<RawFd>,
    fd4: Option<RawFd>,
) -> Result<tokio::process::Child> {
    let Some(lock_file) = lock_exclusive(lock)? else {
        bail!(
            "a process of this VM still runs (it holds {}): stop it first",
            lock.display()
        );
    };
    let lock_fd = lock_file.as_raw_fd();
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .env("NO_COLOR", "1")
        // Only the daemon tells systemd it is ready.
        .env_remove("NOTIFY_SOCKET")
        .kill_on_drop(false);
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Copies above every target first, so that no source is
            // overwritten before it is moved, whatever numbers they have.
            let lock = high_copy(lock_fd)?;
            let fd3 = fd3.map(high_copy).transpose()?;
            let fd4 = fd4.map(high_copy).transpose()?;
            for (fd, target) in [(Some(lock), LOCK_FD), (fd3, 3), (fd4, 4)] {
                if let Some(fd) = fd {
                    // dup2 leaves the new descriptor open across exec.
                    if libc::dup2(fd, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} run", exe.display()));
    // The child's copy of the descriptor holds the lock from here on.
    drop(lock_file);
    child
}

/// In the child, between fork and exec: a copy of `fd` numbered above the
/// descriptors handed over, closed at exec. Async-signal-safe.
fn high_copy(fd: RawFd) -> std::io::Result<RawFd> {
    // SAFETY: fcntl on a descriptor of this process.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, LOCK_FD + 1) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(copy)
}

/// The lock a VM process holds for its whole life, in its directory.
pub fn lock_path(dir: &Path) -> std::path::PathBuf {
    dir.join("process.lock")
}

/// Whether a process holds `dir`'s [`lock_path`] (a VM process of this
/// directory lives, answering or not). Processes started before the lock
/// existed hold none.
pub fn lock_held(dir: &Path) -> bool {
    let Ok(f) = std::fs::File::open(lock_path(dir)) else {
        return false;
    };
    // A shared lock taken here goes when `f` closes.
    matches!(try_flock(&f, libc::LOCK_SH), Ok(false))
}

/// The pid of the process that holds `dir`'s [`lock_path`] as its lock
/// descriptor: the VM process of `dir`, found without its answer (a process
/// stopped or too busy to answer cannot tell its pid). Read from `/proc`:
/// the file is matched by device and inode (whatever path reaches it), and
/// the descriptor must hold a flock (`/proc/PID/fdinfo`); this process is
/// never one.
pub fn lock_holder(dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let lock = std::fs::metadata(lock_path(dir)).ok()?;
    let fd = LOCK_FD.to_string();
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let held = std::fs::metadata(e.path().join("fd").join(&fd)).ok()?;
        if pid == me || (held.dev(), held.ino()) != (lock.dev(), lock.ino()) {
            return None;
        }
        let info = std::fs::read_to_string(e.path().join("fdinfo").join(&fd)).ok()?;
        info.lines()
            .any(|l| l.starts_with("lock:") && l.contains("FLOCK"))
            .then_some(pid)
    })
}

/// Opens `path` for reading and writing (made 0600 if missing, never
/// truncated) and takes an exclusive lock on it without waiting: `None`
/// while another open file holds a lock on it. The lock lasts while the
/// file, or a copy of its descriptor, stays open.
pub fn lock_exclusive(path: &Path) -> Result<Option<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let locked =
        try_flock(&f, libc::LOCK_EX).with_context(|| format!("locking {}", path.display()))?;
    Ok(locked.then_some(f))
}

/// `flock(op | LOCK_NB)` on `f`: false if another open file holds a lock
/// that conflicts with it.
fn try_flock(f: &std::fs::File, op: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor `f` owns.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(e)
}

/// The last error line of a VM process's log (or its last line), without colours.
pub fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let text = strip_ansi(&String::from_utf8_lossy(&text));
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if let Some(l) = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("migd run: error: "))
    {
        return Some(l.to_string());
    }
    lines
        .iter()
        .rev()
        .find(|l| l.contains("ERROR") || l.to_ascii_lowercase().contains("error"))
        .or(lines.last())
        .map(|l| without_timestamp(l).to_string())
}

/// Drops a leading `2024-01-02T03:04:05.678Z` of a tracing line.
fn without_timestamp(line: &str) -> &str {
    match line.split_once(' ') {
        Some((first, rest))
            if first.len() >= 20
                && first.starts_with(|c: char| c.is_ascii_digit())
                && first.contains('T')
                && first.ends_with('Z') =>
        {
            rest.trim_start()
        }
        _ => line,
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for n in chars.by_ref() {
                if n.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub use migd::process::alive;

/// A number that grows while the process works: its CPU time and major
/// faults (`/proc/PID/stat`) plus the bytes it read from and wrote to
/// storage (`/proc/PID/io`). It stands still while the process sleeps or
/// hangs, whoever talks to its control socket meanwhile (a reply blocked
/// there costs the process a thread's minor faults and a few bytes through
/// the socket: neither counts); `None` once the process is gone.
pub fn work_done(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name, from the state (field 3)
    // on: majflt is field 12, utime 14 and stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let mut sum = 0u64;
    for n in [12, 14, 15] {
        sum = sum.wrapping_add(field(n)?);
    }
    // Unreadable without the right to trace the process: CPU time and faults
    // then stand for its work alone.
    if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
        for line in io.lines() {
            if let Some(v) = line
                .strip_prefix("read_bytes:")
                .or_else(|| line.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                sum = sum.wrapping_add(v);
            }
        }
    }
    Some(sum)
}

/// Waits until the process is gone; false on timeout.
pub async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Stops a VM process: `stop` on its socket, then SIGTERM, then SIGKILL.
/// A process that refuses (it is migrating, or its VM is still arriving by
/// post-copy: stopping it would lose the VM) is left running, and its
/// reason returned as the error; `force` tells an arriving one to stop even
/// so. A process still there after SIGTERM that answers is finishing such
/// work (SIGTERM stops it once that ends): it is left running too, and only
/// one that does not answer any more is killed (or any, with `force`).
pub async fn stop(sock: &Path, pid: u32, force: bool, why: &str) -> Result<()> {
    let req = json!({"cmd": "stop", "force": force, "why": why});
    match vm_request(sock, &req, Duration::from_secs(3)).await {
        Ok(r) if r["ok"] == false => {
            bail!(
                "the VM process refuses to stop: {}",
                r["error"].as_str().unwrap_or("no reason given")
            )
        }
        Ok(_) if wait_gone(pid, Duration::from_secs(10)).await => return Ok(()),
        _ => {}
    }
    for (sig, wait) in [(libc::SIGTERM, 10), (libc::SIGKILL, 5)] {
        if !alive(pid) {
            return Ok(());
        }
        if sig == libc::SIGKILL && !force {
            let status = json!({"cmd": "status"});
            if let Ok(r) = vm_request(sock, &status, Duration::from_secs(3)).await {
                bail!(
                    "the VM process ({}) is finishing a migration or a save, and stops once that ends",
                    r["state"].as_str().unwrap_or("state unknown")
                );
            }
        }
        tracing::warn!(pid, sig, "VM process did not stop; signalling it");
        // SAFETY: sending a signal to a pid we started or adopted.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
        if wait_gone(pid, Duration::from_secs(wait)).await {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_done_grows_with_work_and_not_with_sleep() {
        let me = std::process::id();
        let before = work_done(me).expect("own /proc entry");
        // Burn CPU for longer than a clock tick.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(work_done(me).expect("own /proc entry") > before);
        let mut sleeper = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = sleeper.id();
        std::thread::sleep(Duration::from_millis(500));
        let a = work_done(pid).expect("sleep's /proc entry");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(work_done(pid), Some(a), "a sleeping process does no work");
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        assert_eq!(work_done(pid), None, "a reaped process has no entry");
        assert_eq!(work_done(u32::MAX), None);
    }

    #[test]
    fn error_line_from_log() {
        let dir = std::env::temp_dir().join(format!("migd-vmproc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("vm.log");
        std::fs::write(
            &log,
            "\u{1b}[2m2024\u{1b}[0m INFO booting\nmigd run: error: loading kernel: bad ELF\n",
        )
        .unwrap();
        assert_eq!(last_error_line(&log).unwrap(), "loading kernel: bad ELF");
        std::fs::write(&log, "\u{1b}[31mERROR\u{1b}[0m vm: boom\nINFO bye\n").unwrap();
        assert_eq!(last_error_line(&log).unwrap(), "ERROR vm: boom");
        std::fs::write(&log, "2026-11-22T19:14:57.509546Z ERROR vm: guest fatal\n").unwrap();
        assert_eq!(last_error_line(&log).unwrap(), "ERROR vm: guest fatal");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// One exclusive lock at a time, seen by [`lock_held`], gone with its file.
    #[test]
    fn lock_exclusive_takes_the_lock_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("migd-vmproc-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = lock_path(&dir);
        assert!(!lock_held(&dir), "no file, no lock");
        let held = lock_exclusive(&path)
            .unwrap()
            .expect("a free lock is taken");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(lock_held(&dir));
        assert!(
            lock_exclusive(&path).unwrap().is_none(),
            "a held lock is not"
        );
        drop(held);
        assert!(!lock_held(&dir), "the lock goes with its file");
        assert!(lock_exclusive(&path).unwrap().is_some());
        let err = lock_exclusive(&dir.join("no/such")).unwrap_err();
        assert!(format!("{err:#}").contains("opening"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
