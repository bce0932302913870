//! End-to-end tests of `migd run` with the test guest under /dev/kvm: boot,
//! heartbeats, pause/resume, handover of a running VM to a new process, and
//! snapshot files. Every test ends by checking the guest's own verdict.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const READY: Duration = Duration::from_secs(60);

#[test]
fn boots_with_one_and_two_vcpus_and_heartbeats() {
    if !kvm_or_skip("boots_with_one_and_two_vcpus_and_heartbeats") {
        return;
    }
    let dir = scratch("boot");
    for cpus in [1, 2] {
        let vm = VmProcess::boot(
            &dir,
            &format!("vm{cpus}"),
            "workload=dirty:16:8",
            "128M",
            cpus,
        );
        vm.console.wait_for("WORKLOAD READY", READY);
        let (_, bytes, guest_cpus) = vm.console.workset();
        assert_eq!(guest_cpus, cpus as u64, "guest brought up every vCPU");
        assert_eq!(bytes, 16 << 20);
        vm.console.wait_heartbeats(0, 3, Duration::from_secs(20));
        let status = vm.request(json!({"cmd": "status"}));
        assert_eq!(status["state"], "running");
        assert_eq!(status["vcpus"], cpus);
        let console = vm.console.clone();
        assert_eq!(vm.terminate(), 0, "SIGTERM is a clean stop");
        console.assert_clean();
    }
}

#[test]
fn pause_and_resume_keep_the_guest_intact() {
    if !kvm_or_skip("pause_and_resume_keep_the_guest_intact") {
        return;
    }
    let dir = scratch("pause");
    let vm = VmProcess::boot(&dir, "vm", "workload=dirty:16:16", "128M", 2);
    vm.console.wait_for("WORKLOAD READY", READY);
    let n = vm.console.wait_heartbeats(0, 2, Duration::from_secs(20));
    let r = vm.request(json!({"cmd": "pause"}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        r["pause_us"].as_u64().unwrap() < 1_000_000,
        "pause took {r}"
    );
    let paused_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let frozen = vm.console.last_heartbeat();
    assert_eq!(vm.request(json!({"cmd": "status"}))["state"], "paused");
    vm.request(json!({"cmd": "resume"}));
    let pause_ms = paused_at.elapsed().as_millis() as u64;
    assert!(
        frozen.unwrap_or(0) <= n + 1,
        "heartbeats went on while paused"
    );
    vm.console
        .wait_heartbeats(frozen.unwrap_or(n), 3, Duration::from_secs(20));
    let steps = vm.console.clock_steps();
    assert!(
        !steps.is_empty(),
        "the guest saw no clock step across a {pause_ms} ms pause"
    );
    for s in &steps {
        assert!(
            *s <= pause_ms + 300,
            "clock stepped {s} ms for a {pause_ms} ms pause"
        );
    }
    vm.console.assert_clean();
    let console = vm.console.clone();
    assert_eq!(vm.terminate(), 0);
    console.assert_clean();
}

#[test]
fn handover_to_a_new_process_keeps_the_guest_running() {
    if !kvm_or_skip("handover_to_a_new_process_keeps_the_guest_running") {
        return;
    }
    let dir = scratch("handover");
    let mut old = VmProcess::boot(&dir, "old", "workload=dirty:32:64", "256M", 2);
    old.console.wait_for("WORKLOAD READY", READY);
    let n = old.console.wait_heartbeats(0, 2, Duration::from_secs(20));
    let sock = old.control.to_str().unwrap().to_string();
    let before = old.console.text().len();
    let mut new = VmProcess::start(&dir, "new", &old.console, &["--takeover", &sock]);
    assert_eq!(
        old.wait(Duration::from_secs(30)),
        0,
        "old process hands over and exits"
    );
    // The new process reports the gap it measured, pause to resume, on one clock.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(new.child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    let gap_ms = event["downtime_us"].as_u64().unwrap() / 1000;
    assert!(gap_ms < 1000, "handover paused the guest for {gap_ms} ms");
    let status = new.request(json!({"cmd": "status"}));
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["vcpus"], 2);
    new.console.wait_heartbeats(n, 4, Duration::from_secs(30));
    new.console.assert_clean();
    for step in new.console.clock_steps_since(before) {
        assert!(
            step <= gap_ms + 100,
            "clock stepped {step} ms across a {gap_ms} ms handover"
        );
    }
    let console = new.console.clone();
    assert_eq!(new.terminate(), 0);
    console.assert_clean();
}

/// Boots the test guest (`workload`, `memory`, 1 vCPU) on memory allocated
/// up front, as process "old" with `env` added, and hands it to a new
/// process ("new", returned) once it runs; the old process must exit with
/// `status`. Also returns the guest's last heartbeat before the handover.
fn hand_over_prefaulted(
    dir: &std::path::Path,
    (workload, memory): (&str, &str),
    env: &[(&str, &str)],
    status: i32,
) -> (VmProcess, u64) {
    let mut old = VmProcess::boot_env(dir, "old", workload, memory, 1, &["--prefault"], env);
    let console = old.console.clone();
    console.wait_for("WORKLOAD READY", READY);
    let n = console.wait_heartbeats(0, 2, Duration::from_secs(20));
    let sock = old.control.to_str().unwrap().to_string();
    let new = VmProcess::start(dir, "new", &console, &["--takeover", &sock]);
    assert_eq!(
        old.wait(Duration::from_secs(30)),
        status,
        "the old process's exit status"
    );
    (new, n)
}

#[test]
fn handover_of_prefaulted_memory_keeps_its_pages_with_data_known() {
    if !kvm_or_skip("handover_of_prefaulted_memory_keeps_its_pages_with_data_known") {
        return;
    }
    // All of memory is allocated (`--prefault`), so the memfd cannot say
    // which pages hold data; after the handover the old process sends its
    // final list, and the VM's next migration still reads only those.
    let dir = scratch("handover-prefault");
    let (new, n) = hand_over_prefaulted(&dir, ("workload=dirty:16:8", "256M"), &[], 0);
    let console = new.console.clone();
    console.wait_heartbeats(n, 2, Duration::from_secs(30));
    let next = onward_from_prefaulted(&dir, new, &console, 1);
    assert_eq!(next.terminate(), 0);
    console.assert_clean();
}

/// The old process of a handover dies right after `commit` (fault
/// injection), before it hears that the VM runs in the new one and before
/// it sends its list of pages with data: the new process runs the VM on.
#[test]
fn handover_survives_the_old_process_dying_at_the_commit() {
    if !kvm_or_skip("handover_survives_the_old_process_dying_at_the_commit") {
        return;
    }
    let dir = scratch("handover-die");
    let die = [("MIGD_HANDOVER_DIE_AT_COMMIT", "1")];
    // The old process exits with 70 when it dies at the commit.
    let (new, n) = hand_over_prefaulted(&dir, ("workload=dirty:8:8", "128M"), &die, 70);
    let console = new.console.clone();
    console.wait_heartbeats(n, 3, Duration::from_secs(30));
    let st = new.request(json!({"cmd": "status"}));
    assert_eq!(st["state"], "running", "{st}");
    let log = std::fs::read_to_string(dir.join("new.log")).unwrap();
    for told in [
        "the old process was not told that the VM runs here",
        "no list of pages with data from the old process",
    ] {
        assert!(log.contains(told), "{told}: {log}");
    }
    // All of its memory counts as data now; it still migrates onward.
    let port = free_port();
    let next = VmProcess::incoming(&dir, "next", &console, port, "128M", 1);
    let before = console.last_heartbeat().unwrap_or(0);
    let r = new.request(json!({
        "cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1", "verify": true,
    }));
    assert_eq!(r["ok"], true, "{r}");
    let stats = new.wait_migration();
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(stats["verified"], true, "{stats}");
    let next = new.hand_over(next, &console, before);
    assert_eq!(next.terminate(), 0);
    console.assert_clean();
}

/// The new process of a handover is gone before it reads the commit
/// (fault injection: it stops reading and exits right after `restored`):
/// the old process's commit cannot reach it, and the old process keeps the
/// VM as it was, running or paused. One that dies after the commit, before
/// it says `running`, leaves the VM paused in the old process. A paused VM
/// handed over stays paused.
#[test]
fn a_handover_whose_new_process_dies_before_the_commit_keeps_the_vm() {
    if !kvm_or_skip("a_handover_whose_new_process_dies_before_the_commit_keeps_the_vm") {
        return;
    }
    let dir = scratch("handover-new-dies");
    let old = VmProcess::boot(&dir, "old", "workload=dirty:8:8", "128M", 1);
    let console = old.console.clone();
    console.wait_for("WORKLOAD READY", READY);
    let sock = old.control.to_str().unwrap().to_string();
    let takeover = ["--takeover", sock.as_str()];
    // A new process with handover fault `var`, run bare (it may die before
    // its control socket answers); its exit status.
    let new_that_dies = |var: &str, log: &str| {
        std::process::Command::new(migd_bin())
            .arg("run")
            .args(takeover)
            .env("MIGD_FAULT_INJECTION", "1")
            .env(var, "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(log)).unwrap())
            .status()
            .unwrap()
            .code()
    };
    for state in ["running", "paused"] {
        if state == "paused" {
            assert_eq!(old.request(json!({"cmd": "pause"}))["ok"], true);
        }
        let n = console.last_heartbeat().unwrap_or(0);
        let code = new_that_dies(
            "MIGD_HANDOVER_NEW_DIES_BEFORE_COMMIT",
            &format!("new-{state}.log"),
        );
        assert_eq!(code, Some(71), "the new process's exit status");
        let st = old.request(json!({"cmd": "status"}));
        assert_eq!(st["state"], state, "{st}");
        // The old process's log names the step that failed.
        let log = std::fs::read_to_string(dir.join("old.log")).unwrap();
        assert!(
            log.contains("sending \"commit\" to the other process"),
            "{log}"
        );
        if state == "running" {
            console.wait_heartbeats(n, 2, Duration::from_secs(30));
        }
    }
    // The new process gets the commit and dies before it says `running`:
    // it may have run the VM for a moment, so the old process keeps it,
    // paused, for the operator (here it never did: resuming is safe).
    assert_eq!(old.request(json!({"cmd": "resume"}))["ok"], true);
    let code = new_that_dies("MIGD_HANDOVER_NEW_DIES_AFTER_COMMIT", "new-after.log");
    assert_eq!(code, Some(72), "the new process's exit status");
    let st = old.request(json!({"cmd": "status"}));
    assert_eq!(st["state"], "unconfirmed", "{st}");
    let log = std::fs::read_to_string(dir.join("old.log")).unwrap();
    assert!(log.contains("the VM is left paused here"), "{log}");
    // Resumed only by force (the operator checked the new process's log).
    let r = old.request(json!({"cmd": "resume"}));
    assert_eq!(r["ok"], false, "{r}");
    let n = console.last_heartbeat().unwrap_or(0);
    assert_eq!(
        old.request(json!({"cmd": "resume", "force": true}))["ok"],
        true
    );
    console.wait_heartbeats(n, 2, Duration::from_secs(30));
    assert_eq!(old.request(json!({"cmd": "pause"}))["ok"], true);

    // A paused VM handed over stays paused in the new process.
    let n = console.last_heartbeat().unwrap_or(0);
    let new = VmProcess::start(&dir, "new", &console, &takeover);
    let mut old = old;
    assert_eq!(old.wait(Duration::from_secs(30)), 0);
    let st = new.request(json!({"cmd": "status"}));
    assert_eq!(st["state"], "paused", "{st}");
    assert_eq!(new.request(json!({"cmd": "resume"}))["ok"], true);
    console.wait_heartbeats(n, 2, Duration::from_secs(30));
    console.assert_clean();
    assert_eq!(new.terminate(), 0);
}

/// A stop (SIGTERM) that reaches the new process of a handover before it
/// has the old one's commit ends the new process only: the old one keeps
/// running the VM. (It used to be queued for the new process's main loop,
/// which carried it out once the VM had moved: gone from both processes.)
#[test]
fn a_stop_during_a_handover_leaves_the_vm_with_the_old_process() {
    if !kvm_or_skip("a_stop_during_a_handover_leaves_the_vm_with_the_old_process") {
        return;
    }
    let dir = scratch("handover-stopped");
    let old = VmProcess::boot(&dir, "old", "workload=dirty:8:8", "128M", 1);
    let console = old.console.clone();
    console.wait_for("WORKLOAD READY", READY);
    let sock = old.control.to_str().unwrap().to_string();
    // The new process hangs for 3 s before it connects to the old one.
    let mut new = std::process::Command::new(migd_bin())
        .args(["run", "--takeover", &sock])
        .env("MIGD_FAULT_INJECTION", "1")
        .env("MIGD_SLOW_START", "hang:3000")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("new.log")).unwrap())
        .spawn()
        .unwrap();
    let hung = Instant::now();
    let log = dir.join("new.log");
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("test hook: slow start")
    {
        assert!(hung.elapsed() < Duration::from_secs(30), "no slow start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a signal to our own child, still running.
    assert_eq!(unsafe { libc::kill(new.id() as i32, libc::SIGTERM) }, 0);
    let code = new.wait().unwrap().code();
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&log).unwrap());
    let st = old.request(json!({"cmd": "status"}));
    assert_eq!(st["state"], "running", "{st}");
    let n = console.last_heartbeat().unwrap_or(0);
    console.wait_heartbeats(n, 2, Duration::from_secs(30));
    console.assert_clean();
    assert_eq!(old.terminate(), 0);
}

/// A guest that writes to its serial port without pause (`chatty=1`: two
/// port I/O exits per byte) is handed from process to process 8 times, and
/// every byte of its console comes out exactly once. A vCPU paused right
/// after a port I/O exit has KVM finish that instruction first (KVM does it
/// only on the next KVM_RUN): a state captured before it would have the
/// guest execute the `out` again in the next process.
#[test]
fn a_chatty_guest_handed_over_again_and_again_writes_each_byte_once() {
    if !kvm_or_skip("a_chatty_guest_handed_over_again_and_again_writes_each_byte_once") {
        return;
    }
    const TEXT: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let dir = scratch("handover-chatty");
    let mut vm = VmProcess::boot(&dir, "h0", "workload=idle chatty=1", "128M", 1);
    let console = vm.console.clone();
    console.wait_for("CHATTY n=100 ", READY);
    for i in 1..=8 {
        let sock = vm.control.to_str().unwrap().to_string();
        let next = VmProcess::start(&dir, &format!("h{i}"), &console, &["--takeover", &sock]);
        assert_eq!(vm.wait(Duration::from_secs(30)), 0, "handover {i}");
        vm = next;
        std::thread::sleep(Duration::from_millis(150));
    }
    let text = console.text();
    let last = text.lines().filter(|l| l.starts_with("CHATTY")).count();
    console.wait_for(&format!("CHATTY n={} ", last + 50), Duration::from_secs(30));
    assert_eq!(vm.terminate(), 0);
    let text = console.text();
    // The last line may be cut by the stop.
    let lines: Vec<&str> = text.lines().collect();
    let mut want = 1u64;
    for l in &lines[..lines.len() - 1] {
        let Some(rest) = l.trim_end_matches('\r').strip_prefix("CHATTY n=") else {
            continue;
        };
        assert_eq!(
            rest,
            format!("{want} {TEXT}"),
            "a console byte twice or lost"
        );
        want += 1;
    }
    assert!(want > 150, "{want} lines");
    console.assert_clean();
}

#[test]
fn snapshot_file_round_trip() {
    if !kvm_or_skip("snapshot_file_round_trip") {
        return;
    }
    let dir = scratch("snapfile");
    let snap = dir.join("vm.snap");
    let snap_arg = snap.to_str().unwrap();
    let mut a = VmProcess::boot_with(
        &dir,
        "a",
        "workload=dirty:16:16",
        "256M",
        2,
        &["--snapshot-on-signal", snap_arg],
    );
    let console = a.console.clone();
    console.wait_for("WORKLOAD READY", READY);
    let n = console.wait_heartbeats(0, 2, Duration::from_secs(20));
    a.signal(nix::sys::signal::Signal::SIGUSR2);
    let saved_at = Instant::now();
    assert_eq!(a.wait(Duration::from_secs(60)), 0);
    let size = std::fs::metadata(&snap).expect("snapshot written").len();
    assert!(
        size < 64 << 20,
        "snapshot of a 256 MiB guest using ~17 MiB is {size} bytes"
    );
    assert!(
        size > 16 << 20,
        "snapshot lacks the 16 MiB working set ({size} bytes)"
    );
    let leftovers = names_in(&dir, ".tmp.");
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let b = VmProcess::start(&dir, "b", &console, &["--restore", snap.to_str().unwrap()]);
    let stopped_ms = saved_at.elapsed().as_millis() as u64;
    console.wait_heartbeats(n, 3, Duration::from_secs(30));
    console.assert_clean();
    for step in console.clock_steps() {
        assert!(
            step <= stopped_ms + 300,
            "clock stepped {step} ms; the VM was stopped ~{stopped_ms} ms"
        );
    }
    assert_eq!(b.terminate(), 0);
    console.assert_clean();
}

/// A snapshot of a running VM that keeps running (a checkpoint) is written in
/// the background: the guest, rewriting 64 MiB flat out, runs on while the
/// file is written, its writes to pages not yet saved are caught first, and
/// the file restores to a guest whose memory checks hold.
#[test]
fn background_snapshot_keeps_the_guest_running_and_the_file_consistent() {
    if !kvm_or_skip("background_snapshot_keeps_the_guest_running_and_the_file_consistent") {
        return;
    }
    let dir = scratch("bgsnap");
    let snap = dir.join("ckpt.snap");
    let a = VmProcess::boot(&dir, "a", "workload=dirty:64:0", "256M", 1);
    let console = a.console.clone();
    console.wait_for("WORKLOAD READY", READY);
    let n = console.wait_heartbeats(0, 1, Duration::from_secs(20));
    let r = a.request(serde_json::json!({"cmd": "snapshot", "path": snap}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["background"], true, "{r}");
    assert!(
        r["faults"].as_u64().unwrap() > 0,
        "the guest wrote nothing during the save: {r}"
    );
    assert!(r["paused_ms"].as_f64().is_some(), "{r}");
    let status = a.request(serde_json::json!({"cmd": "status"}));
    assert_eq!(status["state"], "running", "{status}");
    let n = console.wait_heartbeats(n, 2, Duration::from_secs(30));
    console.assert_clean();

    // A disk that fills up while the pages are written (a 4 MiB tmpfs): the
    // save fails after the guest resumed, its protection is lifted (the guest
    // does not hang on a fault), and nothing is left on the disk.
    if let Some(full) = Tmpfs::mount(&dir.join("full"), "4m") {
        let r = a.request(serde_json::json!({"cmd": "snapshot", "path": full.0.join("x.snap")}));
        assert_eq!(r["ok"], false, "{r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains("No space left on device"), "{e}");
        assert_eq!(
            std::fs::read_dir(&full.0).unwrap().count(),
            0,
            "a file was left"
        );
        let status = a.request(serde_json::json!({"cmd": "status"}));
        assert_eq!(status["state"], "running", "{status}");
        console.wait_heartbeats(n, 2, Duration::from_secs(30));
        console.assert_clean();
    }
    // A disk too full for the file's front part (state and layout, written
    // in the pause): the save fails there and then, with no second try in
    // the pause (which would fail the same way, after writing pages).
    if let Some(tiny) = Tmpfs::mount(&dir.join("tiny"), "4k") {
        let r = a.request(serde_json::json!({"cmd": "snapshot", "path": tiny.0.join("x.snap")}));
        assert_eq!(r["ok"], false, "{r}");
        let log = std::fs::read_to_string(dir.join("a.log")).unwrap();
        assert!(!log.contains("writing the pages in the pause"), "{log}");
        assert_eq!(std::fs::read_dir(&tiny.0).unwrap().count(), 0);
        let status = a.request(serde_json::json!({"cmd": "status"}));
        assert_eq!(status["state"], "running", "{status}");
    }
    let n = console.last_heartbeat().unwrap();
    assert_eq!(a.terminate(), 0);

    // The file holds memory as it was at the pause: the restored guest's
    // checks of every page it wrote hold, and it carries on from there.
    let b = VmProcess::start(&dir, "b", &console, &["--restore", snap.to_str().unwrap()]);
    console.wait_heartbeats(n, 3, Duration::from_secs(30));
    console.assert_clean();
    assert_eq!(b.terminate(), 0);
    console.assert_clean();
}

/// While a save runs the VM process answers status with its progress and
/// refuses other work; SIGTERM cancels the save (no file, no temporary) and
/// then ends the process cleanly. Each step of the save is paced (25 ms,
/// `MIGD_SAVE_PACE_MS`) so that it can be caught half-way.
#[test]
fn sigterm_during_a_save_cancels_it_and_stops() {
    if !kvm_or_skip("sigterm_during_a_save_cancels_it_and_stops") {
        return;
    }
    let dir = scratch("savesig");
    let snap = dir.join("x.snap");
    let mut a = VmProcess::boot_env(
        &dir,
        "a",
        "workload=dirty:64:0",
        "256M",
        1,
        &[],
        &[("MIGD_SAVE_PACE_MS", "25")],
    );
    a.console.wait_for("WORKLOAD READY", READY);
    let r = std::thread::scope(|s| {
        let save = s.spawn(|| a.request(json!({"cmd": "snapshot", "path": snap})));
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let st = a.request(json!({"cmd": "status"}));
            let p = &st["saving"];
            if p["written"].as_u64().unwrap_or(0) > 0 {
                assert_eq!(p["path"], snap.to_str().unwrap(), "{st}");
                assert!(p["written"].as_u64() < p["pages"].as_u64(), "{st}");
                break;
            }
            assert!(Instant::now() < end, "no save under way: {st}");
            std::thread::sleep(Duration::from_millis(5));
        }
        let m = a.request(json!({"cmd": "migrate", "to": "127.0.0.1:1", "name": "x"}));
        let e = m["error"].as_str().unwrap_or("");
        assert!(e.contains("a snapshot is being written to"), "{m}");
        a.signal(nix::sys::signal::Signal::SIGTERM);
        save.join().unwrap()
    });
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("cancelled"), "{r}");
    assert_eq!(a.wait(Duration::from_secs(20)), 0, "a clean stop");
    let left = names_in(&dir, "snap");
    assert!(left.is_empty(), "files left: {left:?}");
    a.console.assert_clean();
}

/// A small tmpfs, unmounted on drop; None (SKIP) where it cannot be mounted
/// (not root), except under CI=true.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cannot mount a tmpfs under CI=true"
            );
            eprintln!("SKIP: cannot mount a tmpfs at {}", at.display());
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
