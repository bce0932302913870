//! A migd daemon under test: private socket, state dir and port, optionally
//! inside a network namespace; migctl against it; cleanup of VM processes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use super::free_port;
use super::{control, migd_bin, repo};

/// The directory of the test guest (`guest_elf()`, not built here): the
/// daemons under test boot from it a kernel that a migration's source or a
/// snapshot file names (`--boot-dir`), as a host's `boot_dirs` holds its
/// VMs' images.
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("MIGD_TESTGUEST") {
        Some(p) => Path::new(&p)
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        None => repo().join("target/guest"),
    }
}

pub fn migctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_migctl"))
}

/// One request on a unix socket; None when the socket does not answer.
pub fn try_request(sock: &Path, req: &Value) -> Option<Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    writeln!(s, "{req}").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

/// Raw lines on the daemon's socket: one connection, each line answered in turn.
pub fn raw_lines(sock: &Path, lines: &[&[u8]]) -> Vec<Value> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    lines
        .iter()
        .map(|l| {
            s.write_all(l).unwrap();
            s.write_all(b"\n").unwrap();
            let mut reply = String::new();
            r.read_line(&mut reply).unwrap();
            serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply '{reply}': {e}"))
        })
        .collect()
}

/// Stops every VM process under a state dir when a test ends (they outlive daemons).
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.0.join("vms")) else {
            return;
        };
        for e in entries.flatten() {
            let sock = e.path().join("control.sock");
            if let Some(st) = try_request(&sock, &json!({"cmd": "status"})) {
                let _ = try_request(&sock, &json!({"cmd": "stop"}));
                if let Some(pid) = st["pid"].as_i64() {
                    std::thread::sleep(Duration::from_millis(200));
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// `--boot-dir` of the test guest's directory, unless `flags` say where
/// kernels come from themselves (their own `--boot-dir`, or a config file).
fn boot_dir_flag(flags: &[&str]) -> Vec<String> {
    if flags
        .iter()
        .any(|f| f.starts_with("--boot-dir") || f.starts_with("--config"))
    {
        return Vec::new();
    }
    vec![format!("--boot-dir={}", guest_dir().display())]
}

/// A migd daemon on a private socket, state dir and port.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path, tag: &str) -> Daemon {
        Daemon::start_with(
            dir.join(format!("{tag}.sock")),
            dir.join(format!("{tag}-state")),
            free_port(),
            &dir.join(format!("{tag}.log")),
        )
    }

    pub fn start_with(socket: PathBuf, state: PathBuf, port: u16, log: &Path) -> Daemon {
        Daemon::spawn(
            socket,
            state,
            None,
            "127.0.0.1",
            port,
            log,
            &["--insecure"],
            &[],
        )
    }

    /// A daemon on loopback whose environment (and its VM processes') has
    /// `env` too (test knobs such as `MIGD_SAVE_PACE_MS`).
    pub fn start_env(dir: &Path, tag: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(
            dir.join(format!("{tag}.sock")),
            dir.join(format!("{tag}-state")),
            None,
            "127.0.0.1",
            free_port(),
            &dir.join(format!("{tag}.log")),
            &["--insecure"],
            env,
        )
    }

    /// A daemon inside network namespace `netns`, listening on `ip:port` there.
    pub fn start_in_netns(dir: &Path, tag: &str, netns: &str, ip: &str, port: u16) -> Daemon {
        Daemon::spawn(
            dir.join(format!("{tag}.sock")),
            dir.join(format!("{tag}-state")),
            Some(netns),
            ip,
            port,
            &dir.join(format!("{tag}.log")),
            &["--insecure"],
            &[],
        )
    }

    /// A daemon on loopback with `flags` instead of `--insecure` (e.g. TLS).
    pub fn start_flags(dir: &Path, tag: &str, port: u16, flags: &[&str]) -> Daemon {
        Daemon::spawn(
            dir.join(format!("{tag}.sock")),
            dir.join(format!("{tag}-state")),
            None,
            "127.0.0.1",
            port,
            &dir.join(format!("{tag}.log")),
            flags,
            &[],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        socket: PathBuf,
        state: PathBuf,
        netns: Option<&str>,
        ip: &str,
        port: u16,
        log: &Path,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let listen = format!("{ip}:{port}");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(migd_bin());
                c
            }
            None => Command::new(migd_bin()),
        };
        let child = cmd
            .args([
                "--socket",
                socket.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
            ])
            .args(["--listen", &listen])
            .args(flags)
            .args(boot_dir_flag(flags))
            .env("MIGD_FAULT_INJECTION", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            ))
            .spawn()
            .expect("starting migd");
        let mut d = Daemon {
            child,
            socket,
            state,
            port,
            log: log.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(20);
        while try_request(&d.socket, &json!({"cmd": "ping"})).is_none() {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("migd exited ({st}) at start:\n{}", d.log_text());
            }
            assert!(
                Instant::now() < end,
                "migd did not answer on {}:\n{}",
                d.socket.display(),
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn request(&self, req: Value) -> Value {
        control(&self.socket, req)
    }

    /// Runs migctl against this daemon: (exit code, stdout, stderr).
    pub fn migctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(migctl_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running migctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs migctl against this daemon on a thread of its own (a request
    /// that waits, watched meanwhile); its output once joined.
    pub fn migctl_in_background(&self, args: &[&str]) -> std::thread::JoinHandle<Output> {
        let socket = self.socket.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        std::thread::spawn(move || {
            Command::new(migctl_bin())
                .arg("--socket")
                .arg(&socket)
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .expect("running migctl")
        })
    }

    /// migctl that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.migctl(args);
        assert_eq!(
            code,
            0,
            "migctl {args:?} failed: {err}\ndaemon log:\n{}",
            self.log_text()
        );
        out
    }

    /// migctl that must fail; returns its one-line error.
    pub fn fails(&self, args: &[&str]) -> String {
        let (code, _, err) = self.migctl(args);
        assert_eq!(code, 1, "migctl {args:?} should fail: {err}");
        let err = err.trim().to_string();
        assert!(
            err.starts_with("migctl: error: ") && !err.contains('\n'),
            "not one error line: {err}"
        );
        err
    }

    /// `migctl create` of the test guest with `cmdline` (e.g. `workload=dirty:16:8`),
    /// write-once memory added as [`super::with_keep`] says; returns its console.
    pub fn create_guest(
        &self,
        name: &str,
        cmdline: &str,
        memory: &str,
        vcpus: u32,
    ) -> super::Console {
        let elf = super::guest_elf();
        let vcpus = vcpus.to_string();
        let cmdline = super::with_keep(cmdline, memory);
        let out = self.ok(&[
            "create",
            name,
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--memory",
            memory,
            "--vcpus",
            &vcpus,
        ]);
        assert!(out.contains(&format!("VM {name} created")), "{out}");
        super::Console(self.vm_dir(name).join("console.log"))
    }

    /// Runs `migctl ARGS` (which print JSON) until `done` holds for what it
    /// prints; returns that. Fails after `timeout`, naming `what`.
    pub fn poll_json(
        &self,
        args: &[&str],
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let end = Instant::now() + timeout;
        loop {
            let v: Value = serde_json::from_str(&self.ok(args)).unwrap();
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "{what} within {timeout:?}: {v}\ndaemon log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `migctl info NAME` says `state`; returns that info.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        let what = format!("VM {name} not {state}");
        self.poll_json(&["info", name, "--json"], &what, timeout, |info| {
            info["state"] == state
        })
    }

    /// Waits until job `id` has ended (completed, failed or cancelled);
    /// returns the job (`migctl job ID --json`).
    pub fn wait_job(&self, id: &str, timeout: Duration) -> Value {
        let what = format!("job {id} not ended");
        self.poll_json(&["job", id, "--json"], &what, timeout, |j| {
            matches!(
                j["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
    }

    /// Kills VM `name`'s process (SIGKILL) and waits until the daemon lists it stopped.
    pub fn kill_vm(&self, name: &str) {
        self.kill_vm_process(name);
        self.wait_state(name, "stopped", Duration::from_secs(10));
    }

    /// Kills VM `name`'s process (SIGKILL), nothing more.
    pub fn kill_vm_process(&self, name: &str) {
        let info: Value = serde_json::from_str(&self.ok(&["info", name, "--json"])).unwrap();
        let pid = info["pid"].as_u64().expect("a VM process") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    /// Kills the daemon (SIGKILL), as a crash would: its VM processes run on.
    pub fn kill(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state.join("vms").join(name)
    }

    pub fn terminate(&mut self) -> i32 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < end, "migd ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
