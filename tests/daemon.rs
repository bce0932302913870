//! End-to-end tests of the migd daemon and migctl: config errors, bad input on the
//! control socket, re-attachment after a restart, the VM lifecycle through migctl,
//! and a migration between two daemons on this host.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;
use serde_json::{json, Value};

const READY: Duration = Duration::from_secs(60);

/// The cmdline of the test guest [`create_guest`] makes: a 16 MiB working set.
const CMDLINE: &str = "workload=dirty:16:8";
/// That guest's memory.
const MEMORY: &str = "128M";

fn create_guest(d: &Daemon, name: &str) {
    d.create_guest(name, CMDLINE, MEMORY, 1);
}

fn console_of(d: &Daemon, name: &str) -> Console {
    Console(d.vm_dir(name).join("console.log"))
}

/// `migd --config` with a bad file: exit 1, one line, naming the key.
fn config_error(dir: &Path, text: &str) -> String {
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, text).unwrap();
    let sock = dir.join("never.sock");
    let state = dir.join("never-state");
    let (code, err) = migd_output(&[
        "--config",
        cfg.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "bad config accepted: {err}");
    let line = err.trim().to_string();
    assert!(!line.contains('\n'), "error is not one line: {line}");
    assert!(line.starts_with("migd: error: config "), "{line}");
    assert!(!sock.exists(), "daemon started on a bad config");
    line
}

#[test]
fn daemon_config_errors_name_the_key_and_flags_win() {
    let dir = scratch("daemon-config");
    let e = config_error(&dir, "listen = \"127.0.0.1:1\"\nlisen = \"x\"\n");
    assert!(
        e.contains("key 'lisen' (line 2)") && e.contains("unknown field"),
        "{e}"
    );
    let e = config_error(&dir, "insecure = \"yes\"\n");
    assert!(
        e.contains("key 'insecure' (line 1)") && e.contains("invalid type"),
        "{e}"
    );
    let e = config_error(&dir, "state_dir = 7\n");
    assert!(e.contains("key 'state_dir'"), "{e}");
    let e = config_error(&dir, "socket = \n");
    assert!(e.contains("line 1"), "{e}");
    let e = config_error(&dir, "boot_dirs = [\"images\"]\n");
    assert!(
        e.contains("key 'boot_dirs' (line 1): 'images' is not an absolute path"),
        "{e}"
    );
    let (code, err) = migd_output(&[
        "--socket",
        dir.join("never.sock").to_str().unwrap(),
        "--state-dir",
        dir.join("never-state").to_str().unwrap(),
        "--boot-dir",
        "images",
    ]);
    assert_eq!(code, 1, "a relative --boot-dir accepted: {err}");
    assert_eq!(
        err.trim(),
        "migd: error: --boot-dir images: not an absolute path"
    );

    // Every key set in the file; --socket on the command line wins over it.
    let file_sock = dir.join("file.sock");
    let flag_sock = dir.join("flag.sock");
    let state = dir.join("state");
    let port = free_port();
    let cfg = dir.join("good.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nsocket = \"{}\"\nstate_dir = \"{}\"\ninsecure = true\n",
            file_sock.display(),
            state.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(migd_bin())
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--socket",
            flag_sock.to_str().unwrap(),
        ])
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("good.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while try_request(&flag_sock, &json!({"cmd": "ping"})).is_none() {
        assert!(
            Instant::now() < end,
            "daemon never answered on the flag's socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !file_sock.exists(),
        "the config file's socket was used despite --socket"
    );
    assert!(
        state.join("vms").is_dir(),
        "state_dir from the config file not used"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "listen from the config file not used"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn daemon_api_rejects_bad_input_with_clear_errors() {
    let dir = scratch("daemon-bad");
    let d = Daemon::start(&dir, "a");
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be root-only");

    let long = vec![b'x'; 100_000];
    let replies = raw_lines(
        &d.socket,
        &[
            b"this is not json",
            b"[1,2]",
            b"{\"name\":\"x\"}",
            b"{\"cmd\":42}",
            b"{\"cmd\":\"explode\"}",
            b"{\"cmd\":\"info\"}",
            b"{\"cmd\":\"create\",\"name\":\"x\",\"memory\":\"128M\",\"vcpus\":1}",
            b"{\"cmd\":\"create\",\"name\":\"x\",\"kernel\":\"/k\",\"memory\":\"lots\",\"vcpus\":1}",
            b"{\"cmd\":\"create\",\"name\":\"../evil\",\"kernel\":\"/etc/hostname\",\"memory\":\"128M\",\"vcpus\":1}",
            b"{\"cmd\":\"create\",\"name\":\"-x\",\"kernel\":\"/etc/hostname\",\"memory\":\"128M\",\"vcpus\":1}",
            b"{\"cmd\":\"create\",\"name\":\"x\",\"kernel\":\"/no/such/kernel\",\"memory\":\"128M\",\"vcpus\":1}",
            b"{\"cmd\":\"create\",\"name\":\"x\",\"kernel\":\"/etc/hostname\",\"memory\":\"128M\",\"vcpus\":99}",
            b"{\"cmd\":\"create\",\"name\":\"x\",\"kernel\":\"/etc/hostname\",\"memory\":\"8M\",\"vcpus\":1}",
            b"{\"cmd\":\"create\",\"name\":\"x\",\"kernel\":\"/etc/hostname\",\"memory\":\"129M\",\"vcpus\":1}",
            b"{\"cmd\":\"info\",\"name\":\"ghost\"}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"127.0.0.1:1\"}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"nowhere\"}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"h:1\",\"mode\":\"teleport\"}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"h:1\",\"max_bandwidth\":0}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"h:1\",\"max_downtime_ms\":0}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"h:1\",\"xbzrle_cache\":1125899906842624}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"h:1\",\"prepaging_window\":100000}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"h:1\",\"compress\":\"zstd:0\"}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"h:1\",\"compress\":\"lz5\"}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"h:1\",\"streams\":0}",
            b"{\"cmd\":\"migrate\",\"name\":\"ghost\",\"to\":\"h:1\",\"streams\":17}",
            b"{\"cmd\":\"job\",\"id\":\"job999\"}",
            b"{\"cmd\":\"cancel\",\"id\":\"job999\"}",
            b"{\"cmd\":\"list\"}",
        ],
    );
    let expect = [
        "not JSON",
        "JSON object",
        "missing \"cmd\"",
        "\"cmd\" must be a string",
        "unknown command 'explode'",
        "missing field `name`",
        "missing field `kernel`",
        "not a size",
        "invalid VM name",
        "invalid VM name '-x': it must not start with '-'",
        "does not exist",
        "vcpus must be 1 to 8",
        "at least 16 MiB",
        "must be a multiple of 2 MiB",
        "no VM named 'ghost'",
        "no VM named 'ghost'",
        "HOST:PORT",
        "unknown mode 'teleport'",
        "max-bandwidth must be positive",
        "max-downtime must be at least 1 ms",
        "larger than this host's memory",
        "prepaging-window must be at most 255 pages",
        "bad compress value 'zstd:0'",
        "bad compress value 'lz5'",
        "streams must be between 1 and 16, got 0",
        "streams must be between 1 and 16, got 17",
        "no job 'job999'",
        "no job 'job999'",
    ];
    for (i, want) in expect.iter().enumerate() {
        let r = &replies[i];
        assert_eq!(r["ok"], false, "request {i} accepted: {r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains(want), "request {i}: error '{e}' lacks '{want}'");
    }
    assert_eq!(replies.last().unwrap()["vms"], json!([]));

    // An overlong line is refused and the connection closed; the daemon lives on.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&long);
    let _ = s.write_all(b"\n");
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    assert!(reply.contains("longer than"), "{reply}");

    // Garbage on the migration port is dropped without leaving anything behind.
    let mut t = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    let _ = t.write_all(b"GET / HTTP/1.0\r\n\r\ngarbage garbage garbage\n");
    drop(t);
    std::thread::sleep(Duration::from_millis(300));

    assert_eq!(d.request(json!({"cmd": "ping"}))["ok"], true);
    let vms: Vec<_> = std::fs::read_dir(d.state.join("vms")).unwrap().collect();
    assert!(vms.is_empty(), "state dir not clean: {vms:?}");

    // migctl: one error line, exit 1.
    let e = d.fails(&["info", "ghost"]);
    assert!(e.contains("no VM named 'ghost'"), "{e}");
    let e = d.fails(&["create", "x", "--kernel", "/no/such", "--memory", "128M"]);
    assert!(e.contains("does not exist"), "{e}");
    let (code, _, err) = Command::new(migctl_bin())
        .args([
            "--socket",
            dir.join("nothing.sock").to_str().unwrap(),
            "list",
        ])
        .output()
        .map(|o| {
            (
                o.status.code(),
                o.stdout,
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("migctl: error: cannot connect to migd"),
        "{err}"
    );
    let (code, _, err) = d.migctl(&["migrate", "x", "--to", "h:1", "--max-bandwidth", "fast"]);
    assert_eq!(code, 2, "clap rejects a bad RATE: {err}");

    // A second daemon on the same state dir is refused.
    let other = dir.join("b.sock");
    let (code, err) = migd_output(&[
        "--socket",
        other.to_str().unwrap(),
        "--state-dir",
        d.state.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("in use by another migd"), "{err}");
}

#[test]
fn daemon_restart_lists_stopped_vms_and_cleans_leftovers() {
    let dir = scratch("daemon-leftovers");
    let state = dir.join("state");
    let old = state.join("vms/old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(
        old.join("vm.json"),
        r#"{"name":"old","kernel":"/k","initramfs":null,"cmdline":"","memory":134217728,"vcpus":1,"created":1700000000}"#,
    )
    .unwrap();
    std::fs::write(old.join("console.log"), "hello from before\n").unwrap();
    let junk = state.join("vms/junk");
    std::fs::create_dir_all(&junk).unwrap();
    let d = Daemon::start_with(
        dir.join("d.sock"),
        state.clone(),
        free_port(),
        &dir.join("d.log"),
    );
    let list: Value = serde_json::from_str(&d.ok(&["list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "old");
    assert_eq!(list[0]["state"], "stopped");
    assert!(
        !junk.exists(),
        "a directory without record or process was kept"
    );
    let table = d.ok(&["list"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("old") && l.contains("stopped") && l.contains("128 MiB")),
        "{table}"
    );
    assert_eq!(d.ok(&["console", "old"]), "hello from before\n");
    let info = d.ok(&["info", "old"]);
    assert!(info.contains("2023-11-14 22:13:20 UTC"), "{info}");
    // Its kernel is gone: start fails with the VM process's reason, and the
    // VM stays listed as stopped with its console.
    let e = d.fails(&["start", "old"]);
    assert!(e.contains("VM process exited") && e.contains("/k"), "{e}");
    let info: Value = serde_json::from_str(&d.ok(&["info", "old", "--json"])).unwrap();
    assert_eq!(info["state"], "stopped", "{info}");
    assert!(d.ok(&["console", "old"]).starts_with("hello from before\n"));
    d.ok(&["destroy", "old"]);
    assert!(!old.exists(), "destroy left the directory");
    assert_eq!(d.ok(&["list", "--json"]).trim(), "[]");
}

#[test]
fn daemon_create_reports_the_vm_process_error() {
    let dir = scratch("daemon-create-error");
    let d = Daemon::start(&dir, "a");
    let not_a_kernel = dir.join("notakernel");
    std::fs::write(&not_a_kernel, vec![0x55u8; 8192]).unwrap();
    let e = d.fails(&[
        "create",
        "bad",
        "--kernel",
        not_a_kernel.to_str().unwrap(),
        "--memory",
        "64M",
    ]);
    assert!(e.contains("VM process exited"), "{e}");
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        assert!(
            e.contains("not bootable"),
            "the VM process's own error is the reply: {e}"
        );
    }
    assert!(
        !d.vm_dir("bad").exists(),
        "failed create left its directory"
    );
    assert_eq!(d.ok(&["list", "--json"]).trim(), "[]");
}

#[test]
fn daemon_vm_lifecycle_survives_a_daemon_restart() {
    if !kvm_or_skip("daemon_vm_lifecycle_survives_a_daemon_restart") {
        return;
    }
    let dir = scratch("daemon-life");
    let socket = dir.join("d.sock");
    let state = dir.join("state");
    let _reaper = Reaper(state.clone());
    let mut d = Daemon::start_with(
        socket.clone(),
        state.clone(),
        free_port(),
        &dir.join("d.log"),
    );
    create_guest(&d, "web1");
    let console = console_of(&d, "web1");
    console.wait_for("WORKLOAD READY", READY);

    let table = d.ok(&["list"]);
    assert!(table.lines().next().unwrap().contains("Name"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("web1") && l.contains("running") && l.contains("128 MiB")),
        "{table}"
    );
    let list: Value = serde_json::from_str(&d.ok(&["list", "--json"])).unwrap();
    assert_eq!(list[0]["name"], "web1");
    assert_eq!(list[0]["vcpus"], 1);
    assert_eq!(list[0]["memory"], 128u64 << 20);
    let pid = list[0]["pid"].as_u64().unwrap();
    let info: Value = serde_json::from_str(&d.ok(&["info", "web1", "--json"])).unwrap();
    assert_eq!(info["state"], "running");
    // The cmdline create passed, write-once memory included.
    let cmdline = with_keep(CMDLINE, MEMORY);
    assert!(cmdline.contains(" keep="), "{cmdline}");
    assert_eq!(info["cmdline"], cmdline.as_str());
    // The guest RAM it takes: its 16 MiB working set, 4 MiB written once
    // and a little more, never the 128 MiB it was given.
    let used = info["memory_used"].as_u64().expect("memory_used");
    assert!(((16 + KEEP_MIB) << 20..64 << 20).contains(&used), "{info}");
    let text = d.ok(&["info", "web1"]);
    assert!(text.contains("State:          running"), "{text}");
    assert!(text.contains("Memory used:"), "{text}");
    assert!(d.ok(&["console", "web1"]).contains("WORKLOAD READY"));
    let e = d.fails(&[
        "create",
        "web1",
        "--kernel",
        guest_elf().to_str().unwrap(),
        "--memory",
        "64M",
    ]);
    assert!(e.contains("already exists"), "{e}");
    let rec: Value =
        serde_json::from_slice(&std::fs::read(d.vm_dir("web1").join("vm.json")).unwrap()).unwrap();
    assert_eq!(rec["name"], "web1");

    // migctl pointed at the VM's own control socket, not the daemon's, for
    // another VM: refused, naming the mistake, and web1 runs on.
    let vm_socket = d.vm_dir("web1").join("control.sock");
    let out = std::process::Command::new(migctl_bin())
        .arg("--socket")
        .arg(&vm_socket)
        .args(["pause", "web9"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("not migd's"), "{e}");
    let info: Value = serde_json::from_str(&d.ok(&["info", "web1", "--json"])).unwrap();
    assert_eq!(info["state"], "running", "{info}");

    // Pause stops the heartbeats; resume brings them back.
    let n = console.wait_heartbeats(0, 1, Duration::from_secs(20));
    let out = d.ok(&["pause", "web1"]);
    assert!(
        out.contains("paused (") && !out.contains("already"),
        "{out}"
    );
    let info: Value = serde_json::from_str(&d.ok(&["info", "web1", "--json"])).unwrap();
    assert_eq!(info["state"], "paused");
    // Pausing a paused VM changes nothing, and says so (no error: as QEMU).
    let out = d.ok(&["pause", "web1"]);
    assert!(out.contains("VM web1 was already paused"), "{out}");
    std::thread::sleep(Duration::from_millis(1500));
    let frozen = console.last_heartbeat().unwrap_or(n);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        console.last_heartbeat().unwrap_or(n),
        frozen,
        "heartbeats while paused"
    );
    let out = d.ok(&["resume", "web1"]);
    assert_eq!(out.trim(), "VM web1 resumed");
    let n = console.wait_heartbeats(frozen, 1, Duration::from_secs(20));
    let r = d.request(json!({"cmd": "resume", "name": "web1"}));
    assert_eq!(r["changed"], false, "{r}");
    assert_eq!(r["state"], "running", "{r}");

    // The daemon goes; the VM stays; a new daemon adopts it.
    assert_eq!(d.terminate(), 0);
    assert!(!socket.exists(), "socket left behind");
    let n2 = console.wait_heartbeats(n, 2, Duration::from_secs(20));
    let d = Daemon::start_with(socket, state, free_port(), &dir.join("d2.log"));
    let list: Value = serde_json::from_str(&d.ok(&["list", "--json"])).unwrap();
    assert_eq!(list[0]["name"], "web1", "{list}");
    assert_eq!(list[0]["state"], "running");
    assert_eq!(list[0]["pid"].as_u64(), Some(pid), "same VM process");
    console.wait_heartbeats(n2, 2, Duration::from_secs(20));
    d.ok(&["pause", "web1"]);
    d.ok(&["resume", "web1"]);
    console.assert_clean();

    // The VM process dies: the VM is stopped, and `start` boots it again.
    let e = d.fails(&["start", "web1"]);
    assert!(
        e.contains("is running; only a stopped VM can be started"),
        "{e}"
    );
    d.kill_vm("web1");
    let out = d.ok(&["start", "web1"]);
    assert!(out.contains("VM web1 started"), "{out}");
    let boots = || console.text().matches("WORKLOAD READY").count();
    let booted = |n: usize| {
        let end = Instant::now() + READY;
        while boots() < n {
            assert!(Instant::now() < end, "no boot {n}:\n{}", console.text());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    booted(2);
    // The reply's VM carries its first status, not the nulls of a VM not
    // asked yet (and of one that had no process a moment before).
    d.kill_vm("web1");
    let started: Value = serde_json::from_str(&d.ok(&["start", "web1", "--json"])).unwrap();
    assert!(started["memory_used"].is_u64(), "{started}");
    booted(3);
    let list: Value = serde_json::from_str(&d.ok(&["list", "--json"])).unwrap();
    assert_eq!(list[0]["state"], "running", "{list}");
    let pid = list[0]["pid"].as_u64().unwrap();
    console.assert_runs_on(1, Duration::from_secs(20));

    d.ok(&["destroy", "web1"]);
    assert!(!d.vm_dir("web1").exists(), "destroy left the directory");
    assert!(d.ok(&["list", "--json"]).trim() == "[]");
    let end = Instant::now() + Duration::from_secs(10);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok() {
        assert!(Instant::now() < end, "VM process {pid} survived destroy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Needs the migration engine in the VM process; skips while it answers `migration`
/// with "unknown command".
#[test]
fn daemon_migrates_a_vm_to_another_daemon() {
    if !kvm_or_skip("daemon_migrates_a_vm_to_another_daemon") {
        return;
    }
    let dir = scratch("daemon-migrate");
    let a = Daemon::start(&dir, "a");
    // B allocates its VMs' memory up front (`prefault`).
    let b = Daemon::start_flags(&dir, "b", free_port(), &["--insecure", "--prefault"]);
    let _ra = Reaper(a.state.clone());
    let _rb = Reaper(b.state.clone());
    create_guest(&a, "mig1");
    let console_a = console_of(&a, "mig1");
    console_a.wait_for("WORKLOAD READY", READY);
    let n = console_a.wait_heartbeats(0, 1, Duration::from_secs(20));

    // The cost model's estimate: measured inputs, a prediction per mode.
    let to_b = format!("127.0.0.1:{}", b.port);
    let est: Value = serde_json::from_str(&a.ok(&[
        "estimate", "mig1", "--to", &to_b, "--mode", "postcopy", "--json",
    ]))
    .unwrap();
    let inputs = &est["inputs"];
    assert!(
        inputs["memory_bytes"].as_f64().unwrap() >= (16 << 20) as f64,
        "{est}"
    );
    assert!(
        inputs["dirty_rate"].as_f64().unwrap() > 0.0,
        "the guest dirties 8 MiB/s: {est}"
    );
    assert!(inputs["bandwidth"].as_f64().unwrap() > 1e6, "{est}");
    assert!(inputs["rtt"].as_f64().unwrap() > 0.0, "{est}");
    for m in ["precopy", "postcopy", "hybrid"] {
        assert!(
            est["all_modes"][m]["total_ms"].as_f64().unwrap() > 0.0,
            "{est}"
        );
    }
    assert_eq!(est["prediction"], est["all_modes"]["postcopy"]);
    let table = a.ok(&["estimate", "mig1", "--to", &to_b]);
    assert!(
        table.contains("downtime ms") && table.contains("hybrid"),
        "{table}"
    );
    // A guest writing 8 MiB/s over loopback: auto is expected to stay
    // pre-copy, where the probe found loopback's usual GB/s (a host loaded
    // by other work measured 55 MB/s once, where hybrid's shorter pause won).
    let est: Value = serde_json::from_str(&a.ok(&[
        "estimate", "mig1", "--to", &to_b, "--mode", "auto", "--json",
    ]))
    .unwrap();
    let inputs = &est["inputs"];
    let ratio = inputs["bandwidth"].as_f64().unwrap() / inputs["dirty_rate"].as_f64().unwrap();
    if ratio > 50.0 {
        assert_eq!(est["auto_picks"], "precopy", "{est}");
        // Pre-copy's, after auto's 10 ms watch-only first step (no cap).
        let (auto, pre) = (&est["prediction"], &est["all_modes"]["precopy"]);
        assert_eq!(auto["downtime_ms"], pre["downtime_ms"], "{est}");
        let extra = auto["total_ms"].as_f64().unwrap() - pre["total_ms"].as_f64().unwrap();
        assert!((extra - 10.0).abs() < 1e-6, "{est}");
    } else {
        eprintln!("loopback measured at {ratio:.0} × the dirty rate: auto's pick not checked");
    }
    assert!(
        table.contains("--mode auto is expected to end in "),
        "{table}"
    );
    // Under a 16 MiB/s cap the cap is the bandwidth.
    let est: Value = serde_json::from_str(&a.ok(&[
        "estimate",
        "mig1",
        "--to",
        &to_b,
        "--mode",
        "auto",
        "--max-bandwidth",
        "16M",
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        est["inputs"]["bandwidth"],
        json!((16u64 << 20) as f64),
        "{est}"
    );
    assert_eq!(est["inputs"]["capped"], true, "{est}");
    let e = a.fails(&["estimate", "mig1", "--to", &to_b, "--max-bandwidth", "0"]);
    assert!(e.contains("max-bandwidth must be positive"), "{e}");
    // A mode clap does not know is a usage error (exit 2), as for migrate.
    let (code, _, e) = a.migctl(&["estimate", "mig1", "--to", &to_b, "--mode", "teleport"]);
    assert_eq!(code, 2, "{e}");
    assert!(
        e.contains("possible values: precopy, postcopy, hybrid, auto"),
        "{e}"
    );
    assert_eq!(
        b.ok(&["list", "--json"]).trim(),
        "[]",
        "a probe leaves nothing behind"
    );

    // To itself: refused, naming why (not "a VM named mig1 exists").
    for to in [
        format!("127.0.0.1:{}", a.port),
        format!("localhost:{}", a.port),
    ] {
        let e = a.fails(&["migrate", "mig1", "--to", &to]);
        assert!(e.contains("this daemon's own migration listener"), "{e}");
    }

    // Nobody listens there: the job fails and the VM keeps running here.
    let dead = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = a.migctl(&["migrate", "mig1", "--to", &dead]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("failed"), "{err}");
    let info: Value = serde_json::from_str(&a.ok(&["info", "mig1", "--json"])).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    assert!(info["job"].is_null());
    let jobs: Value = serde_json::from_str(&a.ok(&["jobs", "--json"])).unwrap();
    assert_eq!(jobs[0]["status"], "failed", "{jobs}");
    let n = console_a.wait_heartbeats(n, 1, Duration::from_secs(20));

    // A slow migration, aborted: the VM stays here, the destination is left clean.
    let to = format!("127.0.0.1:{}", b.port);
    let job = a.ok(&[
        "migrate",
        "mig1",
        "--to",
        &to,
        "--max-bandwidth",
        "4K",
        "--detach",
    ]);
    let job = job.trim();
    let e = a.fails(&["migrate", "mig1", "--to", &to, "--detach"]);
    assert!(e.contains("already being migrated"), "{e}");
    let e = a.fails(&["destroy", "mig1"]);
    assert!(e.contains("cancel the job first"), "{e}");
    std::thread::sleep(Duration::from_millis(500));
    // By the VM's name, as virsh domjobabort (`cancel JOB` does the same).
    let out = a.ok(&["abort", "mig1"]);
    assert!(
        out.contains(&format!("cancelling mig1's migration {job}")),
        "{out}"
    );
    let j = a.wait_job(job, Duration::from_secs(20));
    assert_eq!(j["status"], "cancelled", "{j}");
    assert_eq!(j["stats"]["outcome"], "cancelled", "{j}");
    let info: Value = serde_json::from_str(&a.ok(&["info", "mig1", "--json"])).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    let end = Instant::now() + Duration::from_secs(20);
    while b.vm_dir("mig1").exists() {
        assert!(
            Instant::now() < end,
            "destination kept the cancelled VM:\n{}",
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(b.ok(&["list", "--json"]).trim(), "[]");
    let n = console_a.wait_heartbeats(n, 1, Duration::from_secs(20));

    // A slow migration whose incoming VM is destroyed on the destination:
    // the source says why (not "broken pipe"), and the VM stays here.
    let job = a.ok(&[
        "migrate",
        "mig1",
        "--to",
        &to,
        "--max-bandwidth",
        "1M",
        "--detach",
    ]);
    let job = job.trim();
    // Once pages flow (the VM process on B answers on its control socket).
    a.poll_json(
        &["job", job, "--json"],
        "no page sent",
        Duration::from_secs(20),
        |j| j["stats"]["bytes"].as_u64().unwrap_or(0) > 0,
    );
    b.ok(&["destroy", "mig1"]);
    let j = a.wait_job(job, Duration::from_secs(20));
    assert_eq!(j["status"], "failed", "{j}");
    let error = j["stats"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(
            "the destination gave up the incoming VM: stop requested (destroyed by the operator)"
        ),
        "{j}"
    );
    let info: Value = serde_json::from_str(&a.ok(&["info", "mig1", "--json"])).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(b.ok(&["list", "--json"]).trim(), "[]");
    let n = console_a.wait_heartbeats(n, 1, Duration::from_secs(20));

    let e = a.fails(&["migrate", "mig1", "--to", &to, "--streams", "0"]);
    assert!(e.contains("streams must be between 1 and 16, got 0"), "{e}");
    // A crowd of silent connections on B's migration port, more than the
    // daemon has threads for handshakes (tokio's 512), from 17 other
    // addresses (31 each: one address gets at most 32 waiting): they hold up
    // neither B's API nor the migration (each would otherwise keep a thread
    // for the 30 s a peer has to say Hello).
    let silent: Vec<std::net::TcpStream> = (0..527u32)
        .map(|i| {
            let from = std::net::Ipv4Addr::new(127, 0, 1, 1 + (i / 31) as u8);
            connect_from(from, b.port)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    // With the options plumbed through migctl, the daemon and the VM process;
    // two page streams: the destination daemon's VM process connects back for the second.
    let (code, out, err) = a.migctl(&[
        "migrate",
        "mig1",
        "--to",
        &to,
        "--compress",
        "zstd:2",
        "--reorder",
        "--streams",
        "2",
        "--verify",
        "--json",
    ]);
    assert_eq!(
        code,
        0,
        "migration failed: {err}\n{out}\nA:\n{}\nB:\n{}",
        a.log_text(),
        b.log_text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the migration waited behind silent connections: {:?}\nA:\n{}\nB:\n{}",
        started.elapsed(),
        a.log_text(),
        b.log_text()
    );
    drop(silent);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["outcome"], "completed", "{stats}");
    assert_eq!(stats["streams"], 2, "{stats}");
    assert!(stats["bytes"].as_u64().unwrap() > 16 << 20, "{stats}");
    assert_eq!(stats["compression"]["algorithm"], "zstd", "{stats}");
    assert_eq!(stats["compression"]["level"], 2, "{stats}");
    assert_eq!(stats["reorder"], true, "{stats}");
    assert_eq!(stats["verified"], true, "memory digests compared: {stats}");
    let job = stats["id"].as_str().unwrap().to_string();
    let shown = a.ok(&["job", &job]);
    assert!(shown.contains("completed"), "{shown}");
    assert!(shown.contains("zstd:2"), "{shown}");
    // The source forgets the VM; the destination runs it.
    let end = Instant::now() + Duration::from_secs(15);
    while a.vm_dir("mig1").exists() {
        assert!(Instant::now() < end, "source kept the VM directory");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(a.ok(&["list", "--json"]).trim(), "[]");
    let info = b.wait_state("mig1", "running", Duration::from_secs(15));
    let console_b = console_of(&b, "mig1");
    console_b.wait_heartbeats(n, 2, Duration::from_secs(30));
    console_b.assert_clean();
    assert!(
        b.vm_dir("mig1").join("vm.json").exists(),
        "destination wrote no record"
    );
    // Its process noted that it runs here: had it died before the daemon
    // saw it run, the VM is kept (stopped), not removed as one that never
    // arrived (docs/reliability.md).
    assert!(
        b.vm_dir("mig1").join("arrived").exists(),
        "the VM process did not note its arrival"
    );
    // The boot spec came along (capability boot-spec; the kernel is on this
    // host too): once the VM stops on B, B can boot it again (virsh start).
    let elf = common::guest_elf().canonicalize().unwrap();
    assert_eq!(info["kernel"], elf.to_str().unwrap(), "{info}");
    assert_eq!(info["origin"], "incoming", "{info}");
    // The host it came from, not its connection's ephemeral port.
    assert_eq!(info["source"], "127.0.0.1", "{info}");
    // All of its memory is the VM's, though the guest uses ~20 MiB of it.
    let end = Instant::now() + Duration::from_secs(10);
    let used = loop {
        let info: Value = serde_json::from_str(&b.ok(&["info", "mig1", "--json"])).unwrap();
        if let Some(u) = info["memory_used"].as_u64() {
            break u;
        }
        assert!(Instant::now() < end, "no memory_used: {info}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(used, 128 << 20, "prefaulted memory");
    b.kill_vm("mig1");
    // No process, no memory of its own.
    let info: Value = serde_json::from_str(&b.ok(&["info", "mig1", "--json"])).unwrap();
    assert!(info["memory_used"].is_null(), "{info}");
    let boots = || console_b.text().matches("WORKLOAD READY").count();
    let before = boots();
    let out = b.ok(&["start", "mig1"]);
    assert!(out.contains("VM mig1 started"), "{out}");
    let end = Instant::now() + READY;
    while boots() == before {
        assert!(Instant::now() < end, "no boot on B:\n{}", console_b.text());
        std::thread::sleep(Duration::from_millis(50));
    }
    b.wait_state("mig1", "running", Duration::from_secs(10));
    console_b.assert_runs_on(1, Duration::from_secs(20));

    // Back to A while B's name is free again there, but A refuses a duplicate first.
    create_guest(&a, "mig1");
    let back = format!("127.0.0.1:{}", a.port);
    let (code, _, err) = b.migctl(&["migrate", "mig1", "--to", &back]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    assert!(b.ok(&["list", "--json"]).contains("running"));
    a.ok(&["destroy", "mig1"]);

    // Back to A at 4 KiB/s, a crawl that a guest dirtying 8 MiB/s never lets
    // end, until migrate-set lifts the cap (QEMU's migrate-set-parameters):
    // at once, though a page batch alone takes four minutes at that rate.
    let job = b.ok(&[
        "migrate",
        "mig1",
        "--to",
        &back,
        "--max-bandwidth",
        "4K",
        "--detach",
    ]);
    let job = job.trim();
    let e = b.fails(&["migrate-set", job]);
    assert!(e.contains("nothing to set"), "{e}");
    let e = b.fails(&["migrate-set", job, "--max-downtime", "0"]);
    assert!(e.contains("at least 1 ms"), "{e}");
    let (code, _, e) = b.migctl(&["migrate-set", job, "--max-bandwidth", "0"]);
    assert!(code == 2 && e.contains("unlimited"), "0 lifts no cap: {e}");
    let e = b.fails(&["migrate-set", "job999", "--max-downtime", "5"]);
    assert!(e.contains("no job 'job999'"), "{e}");
    std::thread::sleep(Duration::from_millis(1500));
    let slow: Value = serde_json::from_str(&b.ok(&["job", job, "--json"])).unwrap();
    assert_eq!(slow["status"], "active", "still crawling: {slow}");
    let set: Value = serde_json::from_str(&b.ok(&[
        "migrate-set",
        job,
        "--max-bandwidth",
        "unlimited",
        "--max-downtime",
        "450",
        "--json",
    ]))
    .unwrap();
    assert_eq!(set["max_bandwidth"], Value::Null, "{set}");
    assert_eq!(set["max_downtime_ms"], 450, "{set}");
    let done = b.wait_job(job, Duration::from_secs(30));
    assert_eq!(
        done["status"], "completed",
        "once the cap was lifted: {done}"
    );
    assert_eq!(done["max_bandwidth"], Value::Null, "{done}");
    assert_eq!(done["max_downtime_ms"], 450, "{done}");
    assert_eq!(done["stats"]["max_downtime_ms"], 450.0, "{done}");
    // Round 0 (over an hour at 4 KiB/s for the guest's 16 MiB) went faster
    // than the cap once it was lifted 1.5 s in: pacing never lets a capped
    // round exceed its cap.
    let round0 = &done["stats"]["rounds"][0];
    let rate = round0["bytes"].as_f64().unwrap() / (round0["ms"].as_f64().unwrap() / 1e3);
    assert!(
        rate > 3.0 * (1 << 20) as f64,
        "round 0 at {rate} B/s: {done}"
    );
    a.wait_state("mig1", "running", Duration::from_secs(15));
    console_of(&a, "mig1").wait_heartbeats(0, 2, Duration::from_secs(30));
    a.ok(&["destroy", "mig1"]);
}

/// A save runs beside the VM process's other work: `migctl info` shows how
/// far it has got (`saving`) while other changes to the VM are refused;
/// `abort` ends a save and the VM runs on, `destroy` ends both, and neither
/// leaves a file behind. The daemon's VM
/// processes pause 25 ms at each step of a save (`MIGD_SAVE_PACE_MS`, a test
/// knob) so that it lasts long enough to be watched.
/// SIGTERM reaches the source's VM process during post-copy (a host shutting
/// down): the process stops once the migration is over, and the daemon takes
/// the VM for gone to B, never for stopped here, where a `start` would boot a
/// second copy of a VM that runs on B.
#[test]
fn a_source_told_to_stop_during_post_copy_is_not_taken_for_stopped() {
    if !kvm_or_skip("a_source_told_to_stop_during_post_copy_is_not_taken_for_stopped") {
        return;
    }
    let dir = scratch("daemon-term-postcopy");
    let a = Daemon::start(&dir, "a");
    let b = Daemon::start(&dir, "b");
    let _ra = Reaper(a.state.clone());
    let _rb = Reaper(b.state.clone());
    create_guest(&a, "pc1");
    let console = console_of(&a, "pc1");
    console.wait_for("WORKLOAD READY", READY);
    let info: Value = serde_json::from_str(&a.ok(&["info", "pc1", "--json"])).unwrap();
    let pid = info["pid"].as_u64().expect("a VM process") as i32;
    let n = console.wait_heartbeats(0, 1, Duration::from_secs(20));
    // At 4 MiB/s the ~20 MiB the destination lacks take seconds to push.
    let to = format!("127.0.0.1:{}", b.port);
    let job = a.ok(&[
        "migrate",
        "pc1",
        "--to",
        &to,
        "--mode",
        "postcopy",
        "--max-bandwidth",
        "4M",
        "--detach",
    ]);
    let job = job.trim();
    a.poll_json(
        &["job", job, "--json"],
        "post-copy",
        Duration::from_secs(30),
        |j| j["status"] == "postcopy-active",
    );
    // Post-copy cannot be cancelled: destroy says to wait, not to cancel.
    let e = a.fails(&["destroy", "pc1"]);
    assert!(e.contains("wait for the job to complete"), "{e}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let j = a.wait_job(job, Duration::from_secs(60));
    assert_eq!(j["status"], "completed", "{j}");
    let end = Instant::now() + Duration::from_secs(15);
    while a.vm_dir("pc1").exists() {
        assert!(
            Instant::now() < end,
            "source kept the VM:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(a.ok(&["list", "--json"]).trim(), "[]");
    b.wait_state("pc1", "running", Duration::from_secs(15));
    let on_b = console_of(&b, "pc1");
    on_b.wait_heartbeats(n, 2, Duration::from_secs(30));
    on_b.assert_clean();
}

#[test]
fn daemon_shows_a_save_in_progress_and_destroy_cancels_it() {
    if !kvm_or_skip("daemon_shows_a_save_in_progress_and_destroy_cancels_it") {
        return;
    }
    let dir = scratch("daemon-saving");
    let d = Daemon::start_env(&dir, "a", &[("MIGD_SAVE_PACE_MS", "25")]);
    let _reaper = Reaper(d.state.clone());
    create_guest(&d, "web1");
    let console = console_of(&d, "web1");
    console.wait_for("WORKLOAD READY", READY);
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let info = || -> Value { serde_json::from_str(&d.ok(&["info", "web1", "--json"])).unwrap() };

    // A checkpoint, watched: progress only grows, up to what the file holds.
    let ckpt = path("ckpt.snap");
    let (saved, seen) = std::thread::scope(|s| {
        let save = s.spawn(|| d.ok(&["save", "web1", &ckpt, "--keep", "--json"]));
        let mut seen: Vec<(u64, u64)> = Vec::new();
        let mut text = String::new();
        while !save.is_finished() {
            let v = info();
            let p = &v["saving"];
            if let (Some(w), Some(n)) = (p["written"].as_u64(), p["pages"].as_u64()) {
                assert_eq!(v["state"], "saving", "{v}");
                assert_eq!(p["path"], ckpt.as_str(), "{v}");
                assert!(w <= n, "{v}");
                if let Some(&(last, _)) = seen.last() {
                    assert!(w >= last, "progress went back: {w} after {last}");
                }
                seen.push((w, n));
                if text.is_empty() && w > 0 && w < n {
                    text = d.ok(&["info", "web1"]);
                    let e = d.fails(&["pause", "web1"]);
                    assert!(e.contains("is saving"), "{e}");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(text.contains("Saving:") && text.contains(&ckpt), "{text}");
        let r: Value = serde_json::from_str(&save.join().unwrap()).unwrap();
        (r, seen)
    });
    let pages = saved["pages"].as_u64().unwrap();
    assert!(
        seen.iter().any(|&(w, n)| w > 0 && w < n && n == pages),
        "no save seen half-way through {pages} pages: {seen:?}"
    );
    let after = info();
    assert!(after["saving"].is_null(), "{after}");
    assert_eq!(after["state"], "running", "{after}");
    console.assert_runs_on(2, Duration::from_secs(20));
    let e = d.fails(&["abort", "web1"]);
    assert!(e.contains("no migration or save to abort"), "{e}");

    // Saves web1 (stopping it) to `file`, runs `end` once the save is under
    // way: (its output, the save's error).
    let end_save_half_way = |file: &str, end: &[&str]| -> (String, String) {
        std::thread::scope(|s| {
            let save = s.spawn(|| d.fails(&["save", "web1", file]));
            let until = Instant::now() + Duration::from_secs(30);
            while info()["saving"]["written"].as_u64().unwrap_or(0) == 0 {
                assert!(Instant::now() < until, "the save did not start: {}", info());
                std::thread::sleep(Duration::from_millis(10));
            }
            (d.ok(end), save.join().unwrap())
        })
    };

    // A save aborted half-way (virsh domjobabort): the request fails
    // "cancelled", no file is left, and the VM runs on.
    let dropped = path("dropped.snap");
    let (out, e) = end_save_half_way(&dropped, &["domjobabort", "web1"]);
    assert!(out.contains("aborting web1's save"), "{out}");
    assert!(e.contains("cancelled"), "{e}");
    let after = info();
    assert_eq!(after["state"], "running", "{after}");
    assert!(!std::path::Path::new(&dropped).exists());
    console.assert_runs_on(2, Duration::from_secs(20));

    // A save that would stop the VM, destroyed half-way: cancelled, and
    // neither the file nor a temporary one is left.
    let (_, e) = end_save_half_way(&path("gone.snap"), &["destroy", "web1"]);
    assert!(e.contains("cancelled"), "{e}");
    let list: Value = serde_json::from_str(&d.ok(&["list", "--json"])).unwrap();
    assert_eq!(list, json!([]));
    assert_eq!(
        names_in(&dir, "snap"),
        ["ckpt.snap"],
        "a cancelled save left files"
    );
}

/// `create` waits for a VM process that takes long to start for as long as
/// it works (a large restore or prefault; a process that burns CPU for
/// 7 s here), and stops one that hangs before it answers, after a while
/// without work (30 s; 4.5 s here, longer than the daemon's 2 s polls of
/// its socket, which do not count as its work), naming why and leaving
/// nothing behind.
#[test]
fn create_waits_for_a_working_vm_process_and_not_for_a_hung_one() {
    if !kvm_or_skip("create_waits_for_a_working_vm_process_and_not_for_a_hung_one") {
        return;
    }
    let dir = scratch("daemon-slow-start");
    // Longer than the daemon's polls of the socket (2 s each), which must
    // not count as the process's work.
    let stall = ("MIGD_CREATE_STALL_MS", "4500");
    let d = Daemon::start_env(&dir, "a", &[stall, ("MIGD_SLOW_START", "work:7000")]);
    let _reaper = Reaper(d.state.clone());
    let t = Instant::now();
    create_guest(&d, "web1");
    assert!(
        t.elapsed() >= Duration::from_millis(3500),
        "{:?}",
        t.elapsed()
    );
    console_of(&d, "web1").wait_for("WORKLOAD READY", READY);
    d.ok(&["destroy", "web1"]);
    drop(d);

    let d = Daemon::start_env(&dir, "b", &[stall, ("MIGD_SLOW_START", "hang:20000")]);
    let _reaper_b = Reaper(d.state.clone());
    let t = Instant::now();
    let e = d.fails(&[
        "create",
        "web2",
        "--kernel",
        guest_elf().to_str().unwrap(),
        "--memory",
        "64M",
    ]);
    assert!(e.contains("did no work for 4.5s"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(d.ok(&["list", "--json"]).trim(), "[]");
    assert!(
        !d.vm_dir("web2").exists(),
        "the failed create left its directory"
    );
    // Its command line names its directory, which no other test's does.
    let stray = std::process::Command::new("pgrep")
        .args(["-f", "--", d.vm_dir("web2").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(stray.stdout.is_empty(), "the hung VM process runs on");
}

/// A descriptor the daemon inherited (a pipe its starter left open) reaches
/// no VM process: the VM would hold it for its whole life, and whoever waits
/// for the pipe's end would wait as long.
#[test]
fn a_descriptor_the_daemon_inherits_reaches_no_vm_process() {
    if !kvm_or_skip("a_descriptor_the_daemon_inherits_reaches_no_vm_process") {
        return;
    }
    use std::os::fd::AsRawFd;
    let dir = scratch("daemon-inherited-fd");
    // Not close-on-exec: the daemon (and any child the test runner starts
    // meanwhile) inherits it.
    let (r, w) = nix::unistd::pipe().unwrap();
    let ino = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
    let pipe = ino(r.as_raw_fd());
    let d = Daemon::start(&dir, "a");
    drop((r, w));
    d.create_guest("fd1", "workload=idle", "32M", 1);
    let info: Value = serde_json::from_str(&d.ok(&["info", "fd1", "--json"])).unwrap();
    let pid = info["pid"].as_u64().unwrap();
    let held: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect();
    assert!(!held.is_empty());
    assert!(
        !held.contains(&pipe),
        "the VM process holds the daemon's inherited {pipe:?}: {held:?}"
    );
    d.ok(&["destroy", "fd1"]);
}

/// Silent connections cost a descriptor each: at most 32 from one address
/// wait for their first bytes, and one beyond them is closed at once (a
/// crowd of them took all of the daemon's descriptors, and an adopted VM
/// whose /proc entry could not be read then was taken for gone).
#[test]
fn silent_connections_from_one_address_are_capped() {
    use std::io::Read;
    let dir = scratch("daemon-silent-crowd");
    let d = Daemon::start(&dir, "a");
    let crowd: Vec<std::net::TcpStream> = (0..32)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap())
        .collect();
    // Taken in: the daemon counts each as it accepts it.
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let t = Instant::now();
    let n = extra.read(&mut [0u8; 1]);
    assert!(
        matches!(n, Ok(0))
            || matches!(&n, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the 33rd was not closed: {n:?}"
    );
    assert!(t.elapsed() < Duration::from_millis(1400), "closed at once");
    drop(crowd);
    std::thread::sleep(Duration::from_millis(500));
    // Room again once the daemon has seen the crowd go (on a loaded host,
    // not within any fixed time): a new connection waits for its first
    // bytes.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let mut next = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        next.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let n = next.read(&mut [0u8; 1]);
        if matches!(&n, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "no connection after the crowd left was kept waiting: {n:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = d.log_text();
    assert!(log.contains("connections not yet handshaking"), "{log}");
}

/// Peers that trickle their handshake in, a byte at a time under every read
/// timeout, are cut off at the handshake's deadline (30 s; 3 s here), and
/// one address gets at most 8 handshakes at once: the 9th connection waits
/// for a slot, and its own deadline starts only then.
#[test]
fn a_peer_that_trickles_its_handshake_is_cut_off() {
    use std::io::{Read, Write};
    let dir = scratch("daemon-trickle");
    let d = Daemon::start_env(&dir, "a", &[("MIGD_HANDSHAKE_DEADLINE_MS", "3000")]);
    let t0 = Instant::now();
    let mut conns: Vec<(std::net::TcpStream, Option<Duration>)> = (0..9)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
            // A control frame that claims a 1000-byte body.
            s.write_all(&[0xe9, 0x03, 0, 0, 1]).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            (s, None)
        })
        .collect();
    while conns.iter().any(|c| c.1.is_none()) && t0.elapsed() < Duration::from_secs(20) {
        for (s, closed) in conns.iter_mut().filter(|c| c.1.is_none()) {
            let gone = match s.read(&mut [0u8; 64]) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            };
            if gone || s.write_all(&[0]).is_err() {
                *closed = Some(t0.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut when: Vec<Duration> = conns.iter().map(|c| c.1.expect("never cut off")).collect();
    when.sort();
    assert!(
        when[0] >= Duration::from_millis(2500),
        "cut before the deadline: {when:?}"
    );
    assert!(
        when[7] < Duration::from_millis(5500),
        "not cut at the deadline: {when:?}"
    );
    assert!(
        when[8] >= Duration::from_millis(5500),
        "the 9th had no wait: {when:?}"
    );
    let log = d.log_text();
    assert!(log.contains("did not complete its handshake"), "{log}");
}

/// A cost-model probe that stops sending after its Hello (or trickles its
/// pages in) is cut off at the probe's deadline (5 minutes; 2 s here),
/// where it held its handshake slot for as long as each read came in under
/// the read timeout.
#[test]
fn a_probe_that_stalls_is_cut_off() {
    use std::io::Read;
    let dir = scratch("daemon-probe-stall");
    let d = Daemon::start_env(&dir, "a", &[("MIGD_PROBE_DEADLINE_MS", "2000")]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    let vm = wire::VmDescriptor {
        name: String::new(),
        memory: 0,
        vcpus: 0,
        cpu_vendor: String::new(),
        cpu_features: Vec::new(),
    };
    migration::handshake::hello(&mut s, migration::probe::PROBE_MODE, vm).unwrap();
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // Nothing more from here: the daemon hangs up at the deadline.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(10), "cut after {took:?}");
    let end = Instant::now() + Duration::from_secs(10);
    while !d.log_text().contains("the probe not done within 2s") {
        assert!(Instant::now() < end, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A VM admitted by a migration's handshake still under way (its source
/// stalls after its Hello) cannot be destroyed meanwhile: its process is
/// about to start under that name. Once the handshake's deadline cuts the
/// source off, the name is free again.
#[test]
fn a_vm_whose_handshake_is_under_way_is_not_destroyed() {
    let dir = scratch("daemon-arriving");
    let d = Daemon::start_env(&dir, "a", &[("MIGD_HANDSHAKE_DEADLINE_MS", "3000")]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    let vm = wire::VmDescriptor {
        name: "web9".into(),
        memory: 128 << 20,
        vcpus: 1,
        cpu_vendor: String::new(),
        cpu_features: Vec::new(),
    };
    // A Hello that offers the boot spec, which then never comes: admitted,
    // the handshake waits for it.
    wire::write_control(
        &mut s,
        &wire::Message::Hello {
            magic: wire::MAGIC,
            version: wire::PROTOCOL_VERSION,
            capabilities: vec!["boot-spec".into()],
            mode: "precopy".into(),
            vm,
        },
    )
    .unwrap();
    // Listed once the daemon has read the Hello.
    let end = Instant::now() + Duration::from_secs(10);
    let info: Value = loop {
        let (code, out, _) = d.migctl(&["info", "web9", "--json"]);
        if code == 0 {
            break serde_json::from_str(&out).unwrap();
        }
        assert!(Instant::now() < end, "web9 never listed: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info["state"], "incoming", "{info}");
    assert!(info["pid"].is_null(), "{info}");
    let e = d.fails(&["destroy", "web9"]);
    assert!(e.contains("arriving"), "{e}");
    let end = Instant::now() + Duration::from_secs(15);
    while d.migctl(&["info", "web9"]).0 == 0 {
        assert!(Instant::now() < end, "still listed after the deadline");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!d.vm_dir("web9").exists());
    drop(s);
}

/// A Hello from another protocol version, or one that is not migd's, is
/// answered with a `Refuse` naming why (before, the daemon closed the
/// connection and the source saw only a closed stream), and admits nothing.
#[test]
fn a_hello_this_daemon_cannot_take_is_refused_with_the_reason() {
    let dir = scratch("daemon-bad-hello");
    let d = Daemon::start(&dir, "a");
    for (magic, version, why) in [
        (wire::MAGIC, 99, "protocol version 99 is not supported"),
        (*b"NOTMIGD!", wire::PROTOCOL_VERSION, "bad magic"),
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let vm = wire::VmDescriptor {
            name: "web9".into(),
            memory: 128 << 20,
            vcpus: 1,
            cpu_vendor: String::new(),
            cpu_features: Vec::new(),
        };
        let hello = wire::Message::Hello {
            magic,
            version,
            capabilities: vec!["precopy".into()],
            mode: "precopy".into(),
            vm,
        };
        wire::write_control(&mut s, &hello).unwrap();
        match wire::expect_control(&mut s, "Refuse") {
            Ok(wire::Message::Refuse { reason }) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{why}: {other:?}\n{}", d.log_text()),
        }
        assert_ne!(d.migctl(&["info", "web9"]).0, 0, "admitted: {why}");
    }
}

/// A save that outlasts the daemon's wait (10 minutes; 300 ms here, with the
/// save slowed down) is cancelled, not left running behind a failed reply:
/// the VM runs on, as the reply says, and no file is left.
#[test]
fn a_save_that_outlasts_the_daemons_wait_is_cancelled() {
    if !kvm_or_skip("a_save_that_outlasts_the_daemons_wait_is_cancelled") {
        return;
    }
    let dir = scratch("daemon-save-timeout");
    let env = [("MIGD_SAVE_PACE_MS", "25"), ("MIGD_SAVE_TIMEOUT_MS", "300")];
    let d = Daemon::start_env(&dir, "a", &env);
    let _reaper = Reaper(d.state.clone());
    create_guest(&d, "web1");
    let console = console_of(&d, "web1");
    console.wait_for("WORKLOAD READY", READY);
    let file = dir.join("slow.snap");
    let e = d.fails(&["save", "web1", file.to_str().unwrap()]);
    assert!(e.contains("did not answer"), "{e}");
    let info: Value = serde_json::from_str(&d.ok(&["info", "web1", "--json"])).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    // Had the save gone on, it would have stopped the VM a moment later.
    console.assert_runs_on(3, Duration::from_secs(20));
    let info: Value = serde_json::from_str(&d.ok(&["info", "web1", "--json"])).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    assert!(info["saving"].is_null(), "{info}");
    assert!(
        names_in(&dir, "snap").is_empty(),
        "the cancelled save left files"
    );
    d.ok(&["destroy", "web1"]);
}

/// A save whose wait runs out once it is past its commit (its file synced,
/// being put in place: here held there 8 s, the wait 4 s) completes: the daemon's cancel
/// is refused, and the reply says saved, the VM stopped and removed, its
/// file complete and restorable. Before, the daemon put the VM back as
/// running and said the save failed while the save went on, stopped the VM
/// and left the only copy of it in a file said not to exist. An abort in
/// that window is refused, naming why.
#[test]
fn a_save_whose_wait_runs_out_past_its_commit_completes() {
    if !kvm_or_skip("a_save_whose_wait_runs_out_past_its_commit_completes") {
        return;
    }
    let dir = scratch("daemon-save-late");
    let env = [
        ("MIGD_SAVE_COMMIT_HOLD_MS", "8000"),
        ("MIGD_SAVE_TIMEOUT_MS", "4000"),
    ];
    let d = Daemon::start_env(&dir, "a", &env);
    let _reaper = Reaper(d.state.clone());
    create_guest(&d, "web1");
    console_of(&d, "web1").wait_for("WORKLOAD READY", READY);
    let file = dir.join("late.snap");
    let f = file.to_str().unwrap().to_string();
    let save = d.migctl_in_background(&["save", "web1", &f, "--json"]);
    // Past its commit (`info` says so), the save can no longer be aborted.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let info: Value = serde_json::from_str(&d.ok(&["info", "web1", "--json"])).unwrap();
        if info["saving"]["committed"] == true {
            break;
        }
        assert!(Instant::now() < end, "never committed: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = d.fails(&["abort", "web1"]);
    assert!(e.contains("too late"), "{e}");
    let out = save.join().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["state"], "saved", "{r}");
    assert_ne!(d.migctl(&["info", "web1"]).0, 0, "web1 still listed");
    d.ok(&["restore", "web2", &f]);
    console_of(&d, "web2").assert_runs_on(2, Duration::from_secs(30));
    d.ok(&["destroy", "web2"]);
}

/// Two saves to one file at once are refused: both would be renamed into
/// place, both replies would say saved, and the first VM would be gone.
/// The same file named through another path counts as the same.
#[test]
fn two_saves_to_one_file_at_once_are_refused() {
    if !kvm_or_skip("two_saves_to_one_file_at_once_are_refused") {
        return;
    }
    let dir = scratch("daemon-save-same-file");
    let d = Daemon::start_env(&dir, "a", &[("MIGD_SAVE_PACE_MS", "200")]);
    let _reaper = Reaper(d.state.clone());
    create_guest(&d, "web1");
    create_guest(&d, "web2");
    std::fs::create_dir_all(dir.join("snaps/sub")).unwrap();
    let file = dir.join("snaps/one.snap");
    let f = file.to_str().unwrap().to_string();
    let first = d.migctl_in_background(&["save", "web1", &f]);
    let end = Instant::now() + Duration::from_secs(30);
    let state = |name: &str| {
        let info: Value = serde_json::from_str(&d.ok(&["info", name, "--json"])).unwrap();
        info["state"].as_str().unwrap_or_default().to_string()
    };
    while state("web1") != "saving" {
        assert!(Instant::now() < end, "web1 never saving");
        std::thread::sleep(Duration::from_millis(20));
    }
    let other_name = dir.join("snaps/sub/../one.snap");
    for path in [f.as_str(), other_name.to_str().unwrap()] {
        let e = d.fails(&["save", "web2", path, "--keep"]);
        assert!(e.contains("VM 'web1' is being saved to it"), "{path}: {e}");
    }
    d.ok(&["abort", "web1"]);
    let out = first.join().unwrap();
    assert!(!out.status.success(), "the first save was aborted");
    // Once it is over, the file is free again.
    d.ok(&["save", "web2", &f, "--keep"]);
    d.ok(&["destroy", "web1"]);
    d.ok(&["destroy", "web2"]);
}

/// A kernel that a migration's source or a snapshot file names is booted
/// on this host (`start`, once the VM stops) only from `boot_dirs`, with
/// symlinks resolved, and never from the state dir, whatever `boot_dirs`
/// says: elsewhere the VM still arrives or is restored and runs, keeps the
/// spec for its next hop, `info` and the log say why it cannot be booted
/// here, naming the file and the setting, and `start` refuses it, naming
/// both. Before, `start` loaded whatever host file the peer or the file
/// named (another VM's console log, /etc/shadow) into a guest.
#[test]
fn boot_files_named_by_a_peer_or_a_snapshot_come_only_from_boot_dirs() {
    if !kvm_or_skip("boot_files_named_by_a_peer_or_a_snapshot_come_only_from_boot_dirs") {
        return;
    }
    let dir = scratch("daemon-boot-dirs");
    let images = dir.join("images");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    // A bootable kernel outside B's boot_dirs (on another host: any file).
    let kernel = elsewhere.join("guest.elf");
    std::fs::copy(guest_elf(), &kernel).unwrap();
    let kernel = kernel.canonicalize().unwrap();
    let k = kernel.to_str().unwrap();
    let a = Daemon::start(&dir, "a");
    let b_state = dir.join("b-state");
    // B lists its own state dir too: refused all the same.
    let b = Daemon::start_flags(
        &dir,
        "b",
        free_port(),
        &[
            "--insecure",
            "--boot-dir",
            images.to_str().unwrap(),
            &format!("--boot-dir={}", b_state.display()),
        ],
    );
    let _ra = Reaper(a.state.clone());
    let _rb = Reaper(b.state.clone());
    a.ok(&[
        "create",
        "web1",
        "--kernel",
        k,
        "--cmdline",
        "workload=idle",
        "--memory",
        "64M",
    ]);
    console_of(&a, "web1").wait_for("WORKLOAD READY", READY);
    let snap = dir.join("web1.snap");
    a.ok(&["save", "web1", snap.to_str().unwrap(), "--keep"]);
    a.ok(&["migrate", "web1", "--to", &format!("127.0.0.1:{}", b.port)]);

    // Arrived: it runs, its spec kept for its next hop, not bootable here.
    let info = b.wait_state("web1", "running", Duration::from_secs(30));
    assert_eq!(info["kernel"], k, "{info}");
    assert_eq!(info["cmdline"], "workload=idle", "{info}");
    let why = info["boot_refused"].as_str().unwrap_or_default();
    assert!(why.contains(k) && why.contains("boot_dirs"), "{info}");
    let text = b.ok(&["info", "web1"]);
    assert!(text.contains("Boot refused:") && text.contains(k), "{text}");
    assert!(
        b.log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains(k) && l.contains("boot_dirs")),
        "no warning naming {k} and boot_dirs:\n{}",
        b.log_text()
    );
    let refused = |name: &str, path: &str, whys: &[&str]| {
        b.kill_vm(name);
        let e = b.fails(&["start", name]);
        assert!(
            e.contains(path) && whys.iter().all(|w| e.contains(w)) && e.contains("boot_dirs"),
            "{e}"
        );
        let info: Value = serde_json::from_str(&b.ok(&["info", name, "--json"])).unwrap();
        assert_eq!(info["state"], "stopped", "{info}");
    };
    refused(
        "web1",
        k,
        &["the kernel that its source named", "lies outside boot_dirs"],
    );

    // Restored from a file that names it: the same.
    b.ok(&["restore", "web2", snap.to_str().unwrap()]);
    let info = b.wait_state("web2", "running", Duration::from_secs(30));
    assert_eq!(info["kernel"], k, "{info}");
    refused(
        "web2",
        k,
        &["that its snapshot file named", "outside boot_dirs"],
    );

    // A file naming a file of the state dir (web1's console log): refused
    // though B lists its state dir.
    let console_log = b.vm_dir("web1").join("console.log").canonicalize().unwrap();
    let console_log = console_log.to_str().unwrap();
    let (state, ram, _) = vmm::snapshot::read(&snap).unwrap();
    let evil = dir.join("evil.snap");
    let boot = vmm::BootSpec {
        kernel: console_log.into(),
        initramfs: None,
        cmdline: "console=ttyS0".into(),
    };
    let progress = Default::default();
    vmm::snapshot::write_with_working_set(&evil, &state, &ram, None, Some(&boot), &progress)
        .unwrap();
    b.ok(&["restore", "web3", evil.to_str().unwrap()]);
    b.wait_state("web3", "running", Duration::from_secs(30));
    refused("web3", console_log, &["lies in migd's state dir"]);
    for vm in ["web1", "web2", "web3"] {
        b.ok(&["destroy", vm]);
    }
}

/// `migctl save` and `restore` (virsh save/restore): a checkpoint that runs
/// on, a save that stops and removes the VM, a restore that carries on where
/// the guest was (eager and lazy), and bad files and names refused with
/// nothing left behind.
#[test]
fn daemon_saves_a_vm_to_a_file_and_restores_it() {
    if !kvm_or_skip("daemon_saves_a_vm_to_a_file_and_restores_it") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = scratch("daemon-save");
    let d = Daemon::start(&dir, "a");
    let _reaper = Reaper(d.state.clone());
    create_guest(&d, "web1");
    let console = console_of(&d, "web1");
    console.wait_for("WORKLOAD READY", READY);
    console.wait_heartbeats(0, 1, Duration::from_secs(20));
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();

    // A checkpoint: the file holds the written memory, the VM runs on.
    let ckpt = path("ckpt.snap");
    let r: Value =
        serde_json::from_str(&d.ok(&["save", "web1", &ckpt, "--keep", "--json"])).unwrap();
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(
        r["background"], true,
        "a checkpoint is written while the VM runs: {r}"
    );
    // The 16 MiB working set and the 4 MiB written once at least, and not
    // the 128 MiB of RAM.
    let bytes = r["bytes"].as_u64().unwrap();
    assert!(((16 + KEEP_MIB) << 20..64 << 20).contains(&bytes), "{r}");
    let meta = std::fs::metadata(&ckpt).unwrap();
    assert_eq!(meta.len(), bytes);
    assert_eq!(meta.mode() & 0o777, 0o600, "a snapshot holds guest memory");
    console.assert_runs_on(2, Duration::from_secs(20));
    let info: Value = serde_json::from_str(&d.ok(&["info", "web1", "--json"])).unwrap();
    assert_eq!(info["state"], "running");

    // Save: written, then the VM is stopped and gone from this host.
    let saved = path("web1.snap");
    let before = console.last_heartbeat().unwrap();
    let r: Value = serde_json::from_str(&d.ok(&["save", "web1", &saved, "--json"])).unwrap();
    assert_eq!(r["state"], "saved", "{r}");
    assert!(r["ms"].as_f64().is_some_and(|ms| ms > 0.0), "{r}");
    let list: Value = serde_json::from_str(&d.ok(&["list", "--json"])).unwrap();
    assert_eq!(list, json!([]));
    assert!(!d.vm_dir("web1").exists(), "save left the VM directory");
    let stray = names_in(&dir, "tmp");
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
    console.assert_clean();

    // Restore: the guest carries on where it was saved.
    let out = d.ok(&["restore", "web1", &saved]);
    assert!(out.contains("VM web1 restored"), "{out}");
    let info: Value = serde_json::from_str(&d.ok(&["info", "web1", "--json"])).unwrap();
    assert_eq!(info["origin"], "restored", "{info}");
    assert_eq!(info["source"], saved.as_str());
    assert_eq!(
        (info["memory"].as_u64(), info["vcpus"].as_u64()),
        (Some(128 << 20), Some(1))
    );
    let restored = console_of(&d, "web1");
    restored.wait_heartbeats(0, 1, Duration::from_secs(30));
    let first = restored
        .text()
        .lines()
        .find_map(|l| {
            l.strip_prefix("HEARTBEAT n=")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap();
    assert!(
        first > before,
        "the counter went back: {first} after {before}"
    );
    restored.assert_runs_on(2, Duration::from_secs(30));
    // The file carried how the VM boots (as virsh's save image keeps the
    // domain): once it stops, the restored VM can be started again.
    let elf = common::guest_elf().canonicalize().unwrap();
    assert_eq!(info["kernel"], elf.to_str().unwrap(), "{info}");
    assert_eq!(
        info["cmdline"],
        with_keep(CMDLINE, MEMORY).as_str(),
        "{info}"
    );

    // Lazy restore of the checkpoint, beside it: `filling` shows the fill
    // until every stored page is in.
    // Its reply carries the VM's first status, not the nulls of one not
    // asked yet.
    let reply: Value =
        serde_json::from_str(&d.ok(&["restore", "web2", &ckpt, "--lazy", "--json"])).unwrap();
    assert!(reply["memory_used"].is_u64(), "{reply}");
    console_of(&d, "web2").assert_runs_on(2, Duration::from_secs(30));
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let info: Value = serde_json::from_str(&d.ok(&["info", "web2", "--json"])).unwrap();
        let f = &info["filling"];
        if f.is_null() {
            break;
        }
        assert!(
            f["filled"].as_u64().unwrap() <= f["pages"].as_u64().unwrap(),
            "{info}"
        );
        assert!(Instant::now() < end, "still filling after 30 s: {info}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Bad input: named, and nothing is left of the VM that could not start.
    let e = d.fails(&["restore", "web1", &saved]);
    assert!(e.contains("already exists"), "{e}");
    let e = d.fails(&["restore", "web3", &path("missing.snap")]);
    assert!(e.contains("does not exist"), "{e}");
    let cut = path("cut.snap");
    let whole = std::fs::read(&saved).unwrap();
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let e = d.fails(&["restore", "web3", &cut]);
    assert!(e.contains("cut.snap"), "{e}");
    let garbage = path("garbage.snap");
    std::fs::write(&garbage, b"not a snapshot at all, just some bytes").unwrap();
    let e = d.fails(&["restore", "web3", &garbage]);
    assert!(e.contains("garbage.snap"), "{e}");
    assert!(
        !d.vm_dir("web3").exists(),
        "a failed restore left a directory"
    );
    let e = d.fails(&["save", "nosuch", &path("x.snap")]);
    assert!(e.contains("no VM named 'nosuch'"), "{e}");
    let e = d.fails(&["save", "web1", &path("no/such/dir/x.snap")]);
    assert!(e.contains("is not a directory"), "{e}");
    // Inside the state directory (where a save would remove the VM's
    // directory, the snapshot with it, or overwrite another VM's record).
    for inside in [
        d.vm_dir("web1").join("web1.snap"),
        d.vm_dir("web2").join("vm.json"),
    ] {
        let e = d.fails(&["save", "web1", inside.to_str().unwrap()]);
        assert!(e.contains("inside migd's state directory"), "{e}");
    }
    // A write that fails (no files can be made in /proc): the VM runs on.
    let e = d.fails(&["save", "web1", "/proc/web1.snap"]);
    assert!(e.contains("saving 'web1' to /proc/web1.snap"), "{e}");
    let info: Value = serde_json::from_str(&d.ok(&["info", "web1", "--json"])).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    let list: Value = serde_json::from_str(&d.ok(&["list", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web1", "web2"]);
    restored.assert_runs_on(1, Duration::from_secs(30));
    // The lazily restored checkpoint (written in the background) has its
    // kernel too: stopped, it boots again.
    let info: Value = serde_json::from_str(&d.ok(&["info", "web2", "--json"])).unwrap();
    assert_eq!(info["kernel"], elf.to_str().unwrap(), "{info}");
    d.kill_vm("web2");
    let web2 = console_of(&d, "web2");
    let boots = || web2.text().matches("WORKLOAD READY").count();
    let before = boots();
    d.ok(&["start", "web2"]);
    let end = Instant::now() + READY;
    while boots() == before {
        assert!(Instant::now() < end, "web2 did not boot:\n{}", web2.text());
        std::thread::sleep(Duration::from_millis(50));
    }
    d.ok(&["destroy", "web1"]);
    d.ok(&["destroy", "web2"]);
}

/// A VM paused when its migration begins arrives paused (`GoPaused`, where
/// both hosts share the `go-paused` capability), by pre-copy and by
/// post-copy, as libvirt and QEMU keep a paused guest paused; before, it ran
/// on the destination. Resumed there, it runs on from where it was.
#[test]
fn a_paused_vm_arrives_paused() {
    if !kvm_or_skip("a_paused_vm_arrives_paused") {
        return;
    }
    let dir = scratch("daemon-paused-arrival");
    let a = Daemon::start(&dir, "a");
    let b = Daemon::start(&dir, "b");
    let _reapers = (Reaper(a.state.clone()), Reaper(b.state.clone()));
    create_guest(&a, "web1");
    console_of(&a, "web1").wait_for("WORKLOAD READY", READY);
    let (mut from, mut to) = (&a, &b);
    for mode in ["precopy", "postcopy"] {
        let console = console_of(from, "web1");
        console.wait_heartbeats(0, 1, Duration::from_secs(30));
        from.ok(&["pause", "web1"]);
        let target = format!("127.0.0.1:{}", to.port);
        from.ok(&["migrate", "web1", "--to", &target, "--mode", mode]);
        let info = to.wait_state("web1", "paused", Duration::from_secs(15));
        assert_eq!(info["state"], "paused", "{mode}: {info}");
        // Still paused a while later: no heartbeat beyond the last one.
        let moved = console_of(to, "web1");
        let last = moved.last_heartbeat().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(moved.last_heartbeat().unwrap_or(0), last, "{mode}: it ran");
        to.ok(&["resume", "web1"]);
        moved.wait_heartbeats(last, 2, Duration::from_secs(30));
        moved.assert_clean();
        (from, to) = (to, from);
    }
    from.ok(&["destroy", "web1"]);
}

/// A daemon whose migration port is taken exits naming it, and leaves no
/// control socket behind (one nobody answers, where migctl would say
/// "connection refused" instead of "is migd running?").
#[test]
fn a_daemon_whose_port_is_taken_leaves_no_socket() {
    let dir = scratch("daemon-port-taken");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let socket = dir.join("a.sock");
    let out = std::process::Command::new(migd_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("a-state"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--insecure"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("in use"), "{err}");
    assert!(!socket.exists(), "the control socket was left behind");
}

/// Under systemd (`Type=notify`, `NOTIFY_SOCKET`), the daemon says
/// `READY=1` once it serves its control socket: `systemctl start` returns
/// only then, so a `migctl` right after it finds the daemon.
#[test]
fn the_daemon_tells_systemd_when_it_is_ready() {
    let dir = scratch("daemon-notify");
    let path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let d = Daemon::start_env(&dir, "a", &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("no READY=1 from the daemon");
    assert_eq!(&buf[..n], b"READY=1\n");
    assert_eq!(d.ok(&["list", "--json"]).trim(), "[]");
}
