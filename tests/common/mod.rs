//! Shared helpers for the end-to-end tests: the test guest, /dev/kvm checks,
//! `migd run` processes, their consoles and control sockets.
#![allow(dead_code)]

pub mod daemon;
pub mod delay;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The test guest ELF, built once per test binary if needed.
pub fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        if let Ok(p) = std::env::var("MIGD_TESTGUEST") {
            return PathBuf::from(p);
        }
        let out = repo().join("target/guest");
        let st = Command::new("bash")
            .arg(repo().join("scripts/build-guest.sh"))
            .arg(&out)
            .status()
            .expect("running scripts/build-guest.sh");
        assert!(st.success(), "building the test guest failed");
        out.join("testguest.elf")
    })
    .clone()
}

/// True when /dev/kvm is usable. Without it tests skip, except under CI=true.
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: /dev/kvm is not usable, and CI=true requires it");
        }
        eprintln!("SKIP {test}: /dev/kvm is not usable on this host");
    }
    ok
}

/// Names of the files in `dir` whose name contains `part`, sorted (what a
/// save or a test left behind).
pub fn names_in(dir: &Path, part: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect();
    names.sort();
    names
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("migd-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// A test's scratch directory: removed when the test passes, kept (logs,
/// consoles, sockets) when it fails.
pub struct Scratch(pub PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The longest a test leaves a VM stopped (paused, saved, held in a
/// migration), with room to spare: a longer jump of the guest's clock is a
/// bug of the clock's migration.
pub const MAX_CLOCK_STEP_MS: u64 = 300_000;

/// The guest's serial console file.
#[derive(Clone)]
pub struct Console(pub PathBuf);

impl Console {
    /// Every complete line written so far.
    pub fn text(&self) -> String {
        let mut t = std::fs::read_to_string(&self.0).unwrap_or_default();
        t.truncate(t.rfind('\n').map_or(0, |i| i + 1));
        t
    }

    /// Waits until a line containing `needle` appears; returns that line.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.text().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            if Instant::now() > end {
                panic!(
                    "no '{needle}' on the console within {timeout:?}; console:\n{}",
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The counter of the last heartbeat, if any.
    pub fn last_heartbeat(&self) -> Option<u64> {
        self.text()
            .lines()
            .rev()
            .filter_map(|l| l.strip_prefix("HEARTBEAT n="))
            .find_map(|r| r.split_whitespace().next()?.parse().ok())
    }

    /// Waits until `more` heartbeats beyond `after` have been printed.
    pub fn wait_heartbeats(&self, after: u64, more: u64, timeout: Duration) -> u64 {
        let end = Instant::now() + timeout;
        loop {
            if let Some(n) = self.last_heartbeat() {
                if n >= after + more {
                    return n;
                }
            }
            if Instant::now() > end {
                panic!(
                    "heartbeats stalled (wanted {} after {after}); console:\n{}",
                    more,
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics if the guest reported lost or corrupted state, or saw its
    /// clock jump ahead by more than any test leaves a VM stopped
    /// ([`MAX_CLOCK_STEP_MS`]: a TSC restored hours ahead is a bug the guest
    /// reports only as a `CLOCK STEP`).
    pub fn assert_clean(&self) {
        let t = self.text();
        let bad: Vec<&str> = t
            .lines()
            .filter(|l| l.contains("CORRUPT") || l.contains("GUEST FATAL"))
            .collect();
        assert!(
            bad.is_empty(),
            "guest reported problems: {bad:#?}\nconsole:\n{t}"
        );
        let worst = self.clock_steps().into_iter().max().unwrap_or(0);
        assert!(
            worst <= MAX_CLOCK_STEP_MS,
            "the guest's clock jumped {worst} ms ahead\nconsole:\n{t}"
        );
    }

    /// The guest runs on here: `more` heartbeats after the last one seen so
    /// far, within `timeout`, and no corruption line.
    pub fn assert_runs_on(&self, more: u64, timeout: Duration) {
        let last = self.last_heartbeat().unwrap_or(0);
        self.wait_heartbeats(last, more, timeout);
        self.assert_clean();
    }

    /// The `CLOCK STEP ms=` values reported so far (each a jump ahead of
    /// more than 100 ms between two looks at the clock, as across a pause).
    pub fn clock_steps(&self) -> Vec<u64> {
        self.clock_steps_since(0)
    }

    /// [`Console::clock_steps`] printed after the first `len` bytes (a
    /// length of [`Console::text`] taken earlier): a step the host's
    /// scheduling caused before then says nothing of what came after.
    pub fn clock_steps_since(&self, len: usize) -> Vec<u64> {
        let text = self.text();
        text.get(len..)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("CLOCK STEP ms="))
            .filter_map(|r| r.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// The WORKSET line: (base, bytes, cpus).
    pub fn workset(&self) -> (u64, u64, u64) {
        let l = self.wait_for("WORKSET ", Duration::from_secs(30));
        let field = |k: &str| -> u64 {
            let v = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in '{l}'"));
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).unwrap(),
                None => v.parse().unwrap(),
            }
        };
        (field("base="), field("bytes="), field("cpus="))
    }
}

/// The migd binary under test.
pub fn migd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_migd"))
}

/// A `migd run` child process.
pub struct VmProcess {
    pub child: Child,
    pub console: Console,
    pub control: PathBuf,
}

impl VmProcess {
    /// Starts `migd run` with the given extra arguments, a console and a control socket.
    pub fn start(dir: &Path, tag: &str, console: &Console, extra: &[&str]) -> VmProcess {
        VmProcess::start_env(dir, tag, console, extra, &[])
    }

    /// [`VmProcess::start`], with `env` added to the process's environment
    /// (test knobs such as `MIGD_SAVE_PACE_MS`).
    pub fn start_env(
        dir: &Path,
        tag: &str,
        console: &Console,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> VmProcess {
        let control = dir.join(format!("{tag}.sock"));
        let child = Command::new(migd_bin())
            .arg("run")
            .args(extra)
            .env("MIGD_FAULT_INJECTION", "1")
            .envs(env.iter().copied())
            .arg("--serial")
            .arg(&console.0)
            .arg("--control")
            .arg(&control)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join(format!("{tag}.log"))).unwrap(),
            ))
            .spawn()
            .expect("starting migd run");
        // The socket file appears at bind(), a moment before listen(): wait
        // until a connection is accepted, not just for the file.
        let end = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&control).is_err() {
            if Instant::now() > end {
                panic!("control socket {} never answered", control.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        VmProcess {
            child,
            console: console.clone(),
            control,
        }
    }

    /// Boots the test guest.
    pub fn boot(dir: &Path, tag: &str, cmdline: &str, memory: &str, cpus: usize) -> VmProcess {
        VmProcess::boot_with(dir, tag, cmdline, memory, cpus, &[])
    }

    /// Boots the test guest with extra `migd run` flags; the console is `<tag>.console`.
    pub fn boot_with(
        dir: &Path,
        tag: &str,
        cmdline: &str,
        memory: &str,
        cpus: usize,
        extra: &[&str],
    ) -> VmProcess {
        VmProcess::boot_env(dir, tag, cmdline, memory, cpus, extra, &[])
    }

    /// [`VmProcess::boot_with`], with `env` added to the process's environment.
    /// A dirty or sparse workload also gets write-once memory ([`with_keep`]).
    pub fn boot_env(
        dir: &Path,
        tag: &str,
        cmdline: &str,
        memory: &str,
        cpus: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> VmProcess {
        let console = Console(dir.join(format!("{tag}.console")));
        let elf = guest_elf();
        let cpus = cpus.to_string();
        let cmdline = with_keep(cmdline, memory);
        let mut args = vec![
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--memory",
            memory,
            "--cpus",
            &cpus,
        ];
        args.extend_from_slice(extra);
        VmProcess::start_env(dir, tag, &console, &args, env)
    }

    /// After a completed migration to `dst`: stops this (the old source)
    /// cleanly, checks that the guest runs on at `dst` (three heartbeats
    /// after `before`, no corruption on `console`), and returns `dst`, the
    /// next hop's source.
    pub fn hand_over(mut self, dst: VmProcess, console: &Console, before: u64) -> VmProcess {
        self.request(serde_json::json!({"cmd": "stop"}));
        assert_eq!(self.wait(Duration::from_secs(20)), 0);
        console.wait_heartbeats(before, 3, Duration::from_secs(30));
        console.assert_clean();
        dst
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// A destination: `migd run --incoming 127.0.0.1:PORT` sized for the VM.
    pub fn incoming(
        dir: &Path,
        tag: &str,
        console: &Console,
        port: u16,
        memory: &str,
        cpus: usize,
    ) -> VmProcess {
        VmProcess::incoming_with(dir, tag, console, (port, memory, cpus), &[])
    }

    /// [`VmProcess::incoming`] with `flags` more (e.g. `--hugepages`).
    pub fn incoming_with(
        dir: &Path,
        tag: &str,
        console: &Console,
        (port, memory, cpus): (u16, &str, usize),
        flags: &[&str],
    ) -> VmProcess {
        VmProcess::incoming_env(dir, tag, console, (port, memory, cpus), flags, &[])
    }

    /// [`VmProcess::incoming_with`] with `env` added to the process's
    /// environment (test knobs such as `MIGD_FAULT_POSTCOPY_DONE`).
    pub fn incoming_env(
        dir: &Path,
        tag: &str,
        console: &Console,
        (port, memory, cpus): (u16, &str, usize),
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> VmProcess {
        let addr = format!("127.0.0.1:{port}");
        let cpus = cpus.to_string();
        let mut args = vec!["--incoming", &addr, "--memory", memory, "--cpus", &cpus];
        args.extend_from_slice(flags);
        VmProcess::start_env(dir, tag, console, &args, env)
    }

    /// Polls the migration until it ends (completed, failed or cancelled).
    pub fn wait_migration(&self) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let r = self.request(serde_json::json!({"cmd": "migration"}));
            if matches!(
                r["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                return r;
            }
            assert!(Instant::now() < end, "migration did not finish: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls the migration until `pred` holds of it (60 s at most; `what`
    /// names the wait in the failure).
    pub fn wait_until(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.request(serde_json::json!({"cmd": "migration"}));
            if pred(&r) {
                return r;
            }
            assert!(Instant::now() < end, "never {what}: {r}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Cuts the migration's links (`inject drop-links`), trying again while
    /// there is nothing to cut (between two sessions).
    pub fn cut_links(&self) {
        self.wait_until("links cut", |_| {
            self.request(serde_json::json!({"cmd": "inject", "fault": "drop-links"}))["cut"]
                .as_u64()
                .unwrap_or(0)
                > 0
        });
    }

    /// Sends one control request and returns the reply.
    pub fn request(&self, req: serde_json::Value) -> serde_json::Value {
        control(&self.control, req)
    }

    /// Waits for the process to exit (with a timeout); returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> i32 {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("migd run did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> i32 {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait(Duration::from_secs(20))
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// MiB of write-once memory ([`with_keep`]).
pub const KEEP_MIB: u64 = 4;

/// `cmdline` with `keep=KEEP_MIB` added (the guest writes that memory once
/// before READY and verifies it for ever) where it is cheap. The working
/// set is rewritten all the time, which hides a page that pre-copy round 0
/// dropped; these pages go only in round 0, so a dropped one shows. Added
/// to a `workload=dirty:`/`sparse:` line only, unless it already has
/// `keep=`, or `pattern=` or `hot=` (compression ratios and hot/cold page
/// counts that incompressible cold pages would skew), or rewrites its set 8
/// times a second or more (hot-set tests that count the pages round 0
/// sends), and only where `memory` holds the set, `zeros=` and the keep
/// region with 32 MiB to spare (image, tables, memory a test zero-fills).
pub fn with_keep(cmdline: &str, memory: &str) -> String {
    let value = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    };
    let mib = |s: &str| migd::size::parse_size(s).ok().map(|b| b >> 20);
    let workload = value("workload").and_then(|w| {
        let mut parts = w.split(':');
        match parts.next()? {
            "dirty" | "sparse" => {}
            _ => return None,
        }
        let set: u64 = parts.next()?.parse().ok()?;
        let rate: u64 = parts.next().map_or(Some(0), |r| r.parse().ok())?;
        Some((set, rate))
    });
    let zeros: u64 = value("zeros").and_then(|z| z.parse().ok()).unwrap_or(0);
    let fits = |set: u64| mib(memory).is_some_and(|m| set + zeros + KEEP_MIB + 32 <= m);
    match workload {
        Some((set, rate))
            if ["keep", "pattern", "hot"]
                .iter()
                .all(|k| value(k).is_none())
                && (rate == 0 || rate < 8 * set)
                && fits(set) =>
        {
            format!("{cmdline} keep={KEEP_MIB}")
        }
        _ => cmdline.to_string(),
    }
}

/// Migrates the VM (256 MiB) on `dst`, whose 4 KiB memory was allocated
/// whole when made (`--prefault`), on by pre-copy to a new process, and
/// returns that one: only the pages with data are read (those its mappings
/// map and those written there otherwise), not the zero pages of the rest.
pub fn onward_from_prefaulted(
    dir: &Path,
    dst: VmProcess,
    console: &Console,
    cpus: usize,
) -> VmProcess {
    let port = free_port();
    let next = VmProcess::incoming_with(dir, "onward", console, (port, "256M", cpus), &[]);
    let before = console.last_heartbeat().unwrap_or(0);
    let r = dst.request(serde_json::json!({
        "cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1", "mode": "precopy",
    }));
    assert_eq!(r["ok"], true, "{r}");
    let stats = dst.wait_migration();
    assert_eq!(stats["status"], "completed", "{stats}");
    // All of memory read would be ~40,000 zero pages of 65,536.
    let zero = stats["pages"]["zero"].as_u64().unwrap();
    assert!(zero < 16384, "{zero} zero pages read: {stats}");
    eprintln!(
        "onward from prefaulted memory: {zero} zero pages read, {}",
        stats["pages"]
    );
    dst.hand_over(next, console, before)
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One JSON request on a control socket.
pub fn control(sock: &Path, req: serde_json::Value) -> serde_json::Value {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut line = serde_json::to_vec(&req).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply '{reply}': {e}"))
}

/// Runs `migd` to completion with arguments; returns (exit code, stderr).
pub fn migd_output(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(migd_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running migd");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    // A command expected to end (bad input): one that runs on, a VM
    // perhaps, fails the test instead of hanging it.
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("migd {args:?} still ran after 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code().unwrap_or(-1), reader.join().unwrap())
}

/// Runs scripts/make-certs.sh: a CA in `dir` and a certificate for each
/// `NAME=IP` of `hosts`.
pub fn make_certs(dir: &Path, hosts: &[&str]) {
    let out = Command::new("bash")
        .arg(repo().join("scripts/make-certs.sh"))
        .arg(dir)
        .args(hosts)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `--tls-*` flags of `host`, whose CA and certificates are in `ca_dir`,
/// accepting `peers`.
pub fn tls_flags(ca_dir: &Path, host: &str, peers: &[&str]) -> Vec<String> {
    let mut f = vec![
        "--tls-ca".to_string(),
        ca_dir.join("ca.pem").to_string_lossy().into_owned(),
        "--tls-cert".into(),
        ca_dir
            .join(format!("{host}.pem"))
            .to_string_lossy()
            .into_owned(),
        "--tls-key".into(),
        ca_dir
            .join(format!("{host}.key"))
            .to_string_lossy()
            .into_owned(),
    ];
    for p in peers {
        f.push("--tls-peer".into());
        f.push(p.to_string());
    }
    f
}

/// `/proc/PID/fd/N` of the guest RAM memfd of VM process `pid`.
pub fn guest_ram_fd(pid: u32) -> PathBuf {
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if target.to_string_lossy().contains("migd-guest-ram") {
            return fd.path();
        }
    }
    panic!("no guest RAM memfd in /proc/{pid}/fd");
}

/// Bytes of memory the guest RAM memfd of VM process `pid` holds.
pub fn guest_ram_bytes(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(guest_ram_fd(pid)).unwrap().blocks() * 512
}

/// Writes zeros over `bytes` of the guest RAM of VM process `pid` that hold
/// no memory yet (a hole of its memfd, which the guest does not use), as a
/// guest that zeroed memory it freed leaves it: allocated, but zeros.
/// Returns the memfd offset.
pub fn zero_fill_unused(pid: u32, bytes: u64) -> u64 {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(guest_ram_fd(pid))
        .unwrap();
    let size = f.metadata().unwrap().len();
    let seek = |off: u64, whence| unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    // The last hole of at least `bytes`, from the top down.
    let mut hole = None;
    let mut off = 0u64;
    while off < size {
        let h = seek(off, libc::SEEK_HOLE);
        if h < 0 || h as u64 >= size {
            break;
        }
        let d = seek(h as u64, libc::SEEK_DATA);
        let end = if d < 0 { size } else { d as u64 };
        if end - h as u64 >= bytes {
            hole = Some(end - bytes);
        }
        off = end;
    }
    let at = hole.unwrap_or_else(|| panic!("no hole of {bytes} bytes in guest RAM"));
    f.write_all_at(&vec![0u8; bytes as usize], at).unwrap();
    at
}

/// A TCP connection to `127.0.0.1:port` from loopback address `from` (say
/// 127.0.1.1): another peer, to the daemon, than 127.0.0.1.
pub fn connect_from(from: std::net::Ipv4Addr, port: u16) -> std::net::TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
    )
    .unwrap();
    connect(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::LOCALHOST,
            port,
        )),
    )
    .unwrap();
    std::net::TcpStream::from(fd)
}
