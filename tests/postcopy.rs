//! Post-copy and hybrid live migration between two `migd run` processes over
//! loopback TCP. Memory is not all there when the destination resumes, so there
//! is no digest to compare: the test guest checks every page it owns
//! continuously (a wrong or missing page prints CORRUPT), heartbeats must go on
//! on the destination, and the page counters must add up.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Bytes of unused guest memory the tests zero on the source before migrating.
const ZEROED: u64 = 16 << 20;

/// Boots a source with the dirtying workload, migrates it with `req` (mode and
/// options) to a fresh `--incoming` destination, checks the guest on the
/// destination, and returns the source's statistics.
fn migrate_once(
    tag: &str,
    cpus: usize,
    workload: &str,
    req: Value,
    during: impl FnOnce(&VmProcess, &VmProcess),
) -> Value {
    migrate_once_onto(tag, cpus, workload, req, &[], during)
}

/// [`migrate_once`] to a destination started with `dst_flags` more.
fn migrate_once_onto(
    tag: &str,
    cpus: usize,
    workload: &str,
    req: Value,
    dst_flags: &[&str],
    during: impl FnOnce(&VmProcess, &VmProcess),
) -> Value {
    migrate_once_env(tag, cpus, workload, req, (dst_flags, &[]), during)
}

/// [`migrate_once_onto`] to a destination with `dst_env` in its environment too.
fn migrate_once_env(
    tag: &str,
    cpus: usize,
    workload: &str,
    req: Value,
    (dst_flags, dst_env): (&[&str], &[(&str, &str)]),
    during: impl FnOnce(&VmProcess, &VmProcess),
) -> Value {
    let dir = scratch(tag);
    // The PageMap goes in parts of 3 runs, as a very fragmented one would.
    let env = [("MIGD_PAGE_MAP_PART_RUNS", "3")];
    let src = VmProcess::boot_env(&dir, "src", workload, "256M", cpus, &[], &env);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    console.wait_heartbeats(0, 2, Duration::from_secs(30));
    // Memory the guest zeroed: it must travel as zero ranges, and take no
    // memory on the destination.
    zero_fill_unused(src.child.id(), ZEROED);
    let src_held = guest_ram_bytes(src.child.id());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dst = VmProcess::incoming_env(
        &dir,
        "dst",
        &console,
        (port, "256M", cpus),
        dst_flags,
        dst_env,
    );
    let before = console.last_heartbeat().unwrap_or(0);
    let mut req = req;
    req["cmd"] = json!("migrate");
    req["to"] = json!(addr);
    req["name"] = json!("vm1");
    let r = src.request(req);
    assert_eq!(r["ok"], true, "{r}");
    during(&src, &dst);
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "migrated");
    assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "running");
    // Every page the destination had to get arrived exactly once.
    let p = &stats["pages"];
    let expected = p["expected"].as_u64().unwrap();
    let (demand, pushed, prepaged) = (
        p["demand"].as_u64().unwrap(),
        p["pushed"].as_u64().unwrap(),
        p["prepaged"].as_u64().unwrap(),
    );
    assert!(expected > 0, "{stats}");
    assert_eq!(demand + pushed + prepaged, expected, "{stats}");
    assert!(
        stats["faults"]["count"].as_u64().unwrap() >= demand,
        "{stats}"
    );
    // The latency histogram holds the latencies behind p50/p99/max: one per
    // page asked for (a fault whose page arrives while it is being asked for
    // counts, but waits for nothing), and its last bucket holds the worst.
    let buckets: Vec<u64> = stats["faults"]["histogram_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    let (sampled, count) = (
        buckets.iter().sum::<u64>(),
        stats["faults"]["count"].as_u64().unwrap(),
    );
    assert!(sampled <= count && sampled * 2 >= count, "{stats}");
    if let Some(last) = buckets.len().checked_sub(1) {
        let max = stats["faults"]["max_us"].as_u64().unwrap().max(1);
        assert_eq!(max.ilog2() as usize, last, "{stats}");
    }
    assert!(stats["downtime_ms"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(p["zero"].as_u64().unwrap() >= ZEROED / 4096, "{stats}");
    // Pages the guest has not touched since the switch: the zeroed ones stay
    // holes (and, wherever the guest goes on writing, what it held before).
    // Memory allocated up front is all held, less the zeros pre-copy punched.
    let dst_held = guest_ram_bytes(dst.child.id());
    if dst_flags.contains(&"--prefault") {
        assert!(dst_held > (128 << 20), "{dst_held} bytes held: {stats}");
    } else {
        assert!(
            dst_held + ZEROED <= src_held + (1 << 20),
            "the destination holds {dst_held} bytes of guest RAM, the source {src_held} with {ZEROED} of zeros: {stats}"
        );
    }
    src.request(json!({"cmd": "stop"}));
    console.wait_heartbeats(before, 3, Duration::from_secs(20));
    console.assert_clean();
    let dst = match dst_flags.contains(&"--prefault") {
        true => onward_from_prefaulted(&dir, dst, &console, cpus),
        false => dst,
    };
    assert_eq!(dst.terminate(), 0);
    console.assert_clean();
    eprintln!(
        "{tag}: src_held={src_held} dst_held={dst_held} expected={expected} demand={demand} pushed={pushed} prepaged={prepaged} duplicate={} faults={} p50={}us p99={}us max={}us zero_faults={} resume_ms={:.1} downtime_ms={:.1} total_ms={:.1}",
        p["duplicate"], stats["faults"]["count"], stats["faults"]["p50_us"], stats["faults"]["p99_us"],
        stats["faults"]["max_us"], stats["faults"]["zero"], stats["resume_ms"].as_f64().unwrap(),
        stats["downtime_ms"].as_f64().unwrap(), stats["total_ms"].as_f64().unwrap()
    );
    stats
}

#[test]
fn postcopy_one_vcpu() {
    if !kvm_or_skip("postcopy_one_vcpu") {
        return;
    }
    let stats = migrate_once(
        "postcopy1",
        1,
        "workload=dirty:32:64",
        json!({"mode": "postcopy"}),
        |_, _| {},
    );
    assert_eq!(stats["mode"], "postcopy");
    assert!(stats["rounds"].as_array().unwrap().is_empty(), "{stats}");
    // The workload's 32 MiB are non-zero: they all travel after the switch.
    assert!(stats["pages"]["expected"].as_u64().unwrap() >= (32 << 20) / 4096);
    assert!(stats["faults"]["count"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["prepaging_window"], 16);
    // Each fault's neighbourhood came with it, ahead of the push.
    assert!(stats["pages"]["prepaged"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn postcopy_zero_pages_the_guest_reads_come_as_zeros() {
    if !kvm_or_skip("postcopy_zero_pages_the_guest_reads_come_as_zeros") {
        return;
    }
    // The guest wrote zeros over 16 MiB and verifies them all the time: on
    // the destination it reads them while they are held as holes, or before
    // their `Zero` came (then answered as zeros); both fill them with zeros
    // there, and a page that did not read as zeros would be CORRUPT.
    let stats = migrate_once(
        "postcopy-zeros",
        1,
        "workload=dirty:32:64 zeros=16",
        json!({"mode": "postcopy", "prepaging_window": 0}),
        |_, _| {},
    );
    // No window: a fault brings its own page only.
    assert_eq!(stats["prepaging_window"], 0, "{stats}");
    assert_eq!(stats["pages"]["prepaged"], 0, "{stats}");
    assert!(
        stats["pages"]["zero"].as_u64().unwrap() >= 2 * ZEROED / 4096,
        "the guest's zeros and the unused memory zeroed: {stats}"
    );
    assert!(stats["faults"]["zero"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn postcopy_two_vcpus() {
    if !kvm_or_skip("postcopy_two_vcpus") {
        return;
    }
    let stats = migrate_once(
        "postcopy2",
        2,
        "workload=dirty:32:64",
        json!({"mode": "postcopy", "prepaging_window": 32}),
        |_, _| {},
    );
    assert!(stats["faults"]["count"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["prepaging_window"], 32);
}

#[test]
fn hybrid_two_vcpus() {
    if !kvm_or_skip("hybrid_two_vcpus") {
        return;
    }
    // At most `postcopy_after_rounds` rounds run, and the destination holds
    // stale copies of pages dirtied since (they must fault again, not be read
    // stale). The guest sweeps its working set slowly, so the hot-page sampling
    // at the start of round 0 (at most 1 s) finds only part of it: the rest is
    // pre-copied, and rewritten (re-sent) later. The link is slow enough for
    // round 0 to outlast the sampling.
    let stats = migrate_once(
        "hybrid2",
        2,
        "workload=dirty:32:8",
        json!({"mode": "hybrid", "max_downtime_ms": 1, "postcopy_after_rounds": 3,
               "max_bandwidth": 16 << 20}),
        |_, _| {},
    );
    assert_eq!(stats["mode"], "hybrid");
    let rounds = stats["rounds"].as_array().unwrap().len();
    assert!((2..=3).contains(&rounds), "{stats}");
    let deferred = stats["pages"]["deferred"].as_u64().unwrap();
    assert!(deferred > 0 && deferred < (32 << 20) / 4096, "{stats}");
    assert!(stats["pages"]["resent"].as_u64().unwrap() > 0, "{stats}");
    // Only what was dirty at the switch travels after it.
    assert!(
        stats["pages"]["expected"].as_u64().unwrap() < (32 << 20) / 4096 + 1024,
        "{stats}"
    );
}

#[test]
fn hybrid_onto_prefaulted_memory() {
    if !kvm_or_skip("hybrid_onto_prefaulted_memory") {
        return;
    }
    // The destination's memory is allocated up front (`--prefault`), so
    // userfaultfd cannot fill its pages: they are written through a second
    // mapping and mapped into the guest (minor faults). Pre-copy's stale
    // copies of pages rewritten since must fault again, not be read, and
    // the guest's zeros (punched out by pre-copy) must read as zeros.
    let stats = migrate_once_onto(
        "hybrid-prefault",
        2,
        "workload=dirty:32:8 zeros=8",
        json!({"mode": "hybrid", "max_downtime_ms": 1, "postcopy_after_rounds": 3,
               "max_bandwidth": 16 << 20}),
        &["--prefault"],
        |_, _| {},
    );
    assert_eq!(stats["mode"], "hybrid");
    assert!(stats["pages"]["resent"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["pages"]["expected"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn postcopy_onto_prefaulted_memory_recovers_from_a_cut_link() {
    if !kvm_or_skip("postcopy_onto_prefaulted_memory_recovers_from_a_cut_link") {
        return;
    }
    // Pages being written through the second mapping when the link drops
    // are given back, and come again after the source reconnects.
    let stats = migrate_once_onto(
        "postcopy-prefault-cut",
        1,
        "workload=dirty:48:6",
        json!({"mode": "postcopy", "max_bandwidth": 4 << 20, "prepaging_window": 4}),
        &["--prefault"],
        |src, _| {
            src.wait_until("post-copy", |r| r["status"] == "postcopy-active");
            src.cut_links();
        },
    );
    assert_eq!(stats["recoveries"], 1, "{stats}");
    assert!(stats["faults"]["count"].as_u64().unwrap() > 0, "{stats}");
}

/// The send of `Go` reports an error although `Go` went out (test-only
/// fault; the send watchdog can do this): the destination runs the VM and
/// needs its pages, so the source recovers the link, as after any lost
/// link, instead of giving up with the VM stuck at the destination.
#[test]
fn postcopy_recovers_when_the_commit_is_not_confirmed() {
    if !kvm_or_skip("postcopy_recovers_when_the_commit_is_not_confirmed") {
        return;
    }
    let stats = migrate_once(
        "postcopy-unconfirmed",
        1,
        "workload=dirty:16:8",
        json!({"mode": "postcopy", "fault_fail_after_go": true}),
        |_, _| {},
    );
    assert!(stats["recoveries"].as_u64().unwrap() >= 1, "{stats}");
}

/// The destination's `PostcopyDone` is lost with its links once every page
/// is there (test-only fault): the source, which cannot tell this from a
/// link lost mid-phase, reconnects, and the destination repeats the report
/// instead of a received-bitmap. The job completes after one recovery, and
/// the guest runs on at the destination.
#[test]
fn a_lost_postcopy_done_is_repeated_when_the_source_reconnects() {
    if !kvm_or_skip("a_lost_postcopy_done_is_repeated_when_the_source_reconnects") {
        return;
    }
    let stats = migrate_once_env(
        "postcopy-done-lost",
        1,
        "workload=dirty:16:8",
        json!({"mode": "postcopy"}),
        (&[], &[("MIGD_FAULT_POSTCOPY_DONE", "lost")]),
        |_, _| {},
    );
    assert!(stats["recoveries"].as_u64().unwrap() >= 1, "{stats}");
}

/// During post-copy neither half may stop on request: the source holds
/// pages the destination lacks, and the destination the VM's state since the
/// switch. Both refuse `stop`, saying why, and the migration completes.
#[test]
fn postcopy_halves_refuse_to_stop_until_it_completes() {
    if !kvm_or_skip("postcopy_halves_refuse_to_stop_until_it_completes") {
        return;
    }
    migrate_once(
        "postcopy-stop",
        1,
        "workload=dirty:32:6",
        json!({"mode": "postcopy", "max_bandwidth": 8 << 20}),
        |src, dst| {
            src.wait_until("post-copy", |r| r["status"] == "postcopy-active");
            let r = src.request(json!({"cmd": "stop"}));
            assert_eq!(r["ok"], false, "{r}");
            let e = r["error"].as_str().unwrap();
            assert!(e.contains("a migration of this VM is running"), "{e}");
            let r = dst.request(json!({"cmd": "stop"}));
            assert_eq!(r["ok"], false, "{r}");
            let e = r["error"].as_str().unwrap();
            assert!(e.contains("post-copy pages are still arriving"), "{e}");
        },
    );
}

/// SIGTERM to a destination whose post-copy pages still arrive (a host
/// shutting down, or the daemon's escalation): it stops once they are all
/// here, not at once, which would lose the VM.
#[test]
fn a_postcopy_destination_told_to_stop_finishes_the_arrival_first() {
    if !kvm_or_skip("a_postcopy_destination_told_to_stop_finishes_the_arrival_first") {
        return;
    }
    let dir = scratch("postcopy-term");
    let src = VmProcess::boot(&dir, "src", "workload=dirty:32:6", "256M", 1);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    let port = free_port();
    let mut dst = VmProcess::incoming(&dir, "dst", &console, port, "256M", 1);
    let req = json!({"cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1",
                     "mode": "postcopy", "max_bandwidth": 8 << 20});
    assert_eq!(src.request(req)["ok"], true);
    src.wait_until("post-copy", |r| r["status"] == "postcopy-active");
    dst.signal(nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let r = dst.request(json!({"cmd": "status"}));
    assert_eq!(r["state"], "running", "{r}");
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(dst.wait(Duration::from_secs(20)), 0);
    console.assert_clean();
}

#[test]
fn hybrid_switch_on_command() {
    if !kvm_or_skip("hybrid_switch_on_command") {
        return;
    }
    // Throttled, with a downtime target it cannot meet and no round limit to
    // speak of: only the operator's `postcopy` command ends the rounds.
    let stats = migrate_once(
        "hybrid-cmd",
        1,
        "workload=dirty:32:8",
        json!({"mode": "hybrid", "max_bandwidth": 32 << 20, "max_downtime_ms": 1,
               "postcopy_after_rounds": 1000}),
        |src, _| {
            std::thread::sleep(Duration::from_millis(300));
            let r = src.request(json!({"cmd": "postcopy"}));
            assert_eq!(r["ok"], true, "{r}");
        },
    );
    assert_eq!(stats["stop_reason"], "post-copy requested", "{stats}");
}

#[test]
fn postcopy_respects_the_bandwidth_cap_with_fault_answers_first() {
    if !kvm_or_skip("postcopy_respects_the_bandwidth_cap_with_fault_answers_first") {
        return;
    }
    let cap: u64 = 16 << 20;
    let stats = migrate_once(
        "postcopy-cap",
        1,
        "workload=dirty:32:64",
        json!({"mode": "postcopy", "max_bandwidth": cap}),
        |_, _| {},
    );
    let pages = &stats["pages"];
    let answered = pages["demand"].as_u64().unwrap() + pages["prepaged"].as_u64().unwrap();
    let bytes = stats["bytes"].as_u64().unwrap();
    let secs = stats["resume_ms"].as_f64().unwrap() / 1e3;
    // The guest faults on pages faster than the cap carries them: answers go
    // first and bring most pages, and the push waits for what they sent.
    // Together they keep to the cap (every byte on the wire counts, from
    // the switch-over on), but for the answers' 10 ms of lead and the push's
    // last batch (64 pages); answers alone used to run several times over.
    assert!(answered > 0, "{stats}");
    let allowed = cap as f64 * (secs + 0.010) + (64 * 4096) as f64;
    assert!(
        bytes as f64 <= allowed * 1.05,
        "sent {bytes} bytes in {secs} s against a cap of {cap} B/s: {stats}"
    );
}

/// The nice value of `vm`'s thread named `name`, if it has one.
fn thread_nice(vm: &VmProcess, name: &str) -> Option<i64> {
    let tasks = format!("/proc/{}/task", vm.child.id());
    std::fs::read_dir(&tasks).unwrap().flatten().find_map(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // "tid (comm) state ppid ...": nice is the 19th field, the 17th after ")".
        let (head, rest) = stat.rsplit_once(") ")?;
        head.ends_with(&format!("({name}"))
            .then(|| rest.split(' ').nth(16)?.parse().ok())?
    })
}

/// The nice value of thread `name` once it equals `want`, or as it stands
/// after two seconds.
fn settled_nice(vm: &VmProcess, name: &str, want: i64) -> Option<i64> {
    let end = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let nice = thread_nice(vm, name);
        if nice == Some(want) || std::time::Instant::now() >= end {
            return nice;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the destination's recovery port answers to `hello` sent from `from`.
fn recovery_answer(port: u64, from: &str, hello: Option<wire::Message>) -> String {
    use std::io::{Read, Write};
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    let bind: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    nix::sys::socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        &nix::sys::socket::SockaddrIn::from(match bind {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        }),
    )
    .unwrap();
    let mut s = std::net::TcpStream::from(sock);
    let to: std::net::SocketAddrV4 = format!("127.0.0.1:{port}").parse().unwrap();
    nix::sys::socket::connect(
        std::os::fd::AsRawFd::as_raw_fd(&s),
        &nix::sys::socket::SockaddrIn::from(to),
    )
    .unwrap();
    if let Some(m) = hello {
        s.write_all(&wire::encode_control(&m).unwrap()).unwrap();
    }
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    match wire::decode_frame(&buf) {
        Ok(wire::Frame::Control(wire::Message::Refuse { reason })) => reason,
        other => format!("{other:?}"),
    }
}

/// SIGTERM to a source in post-copy (a host shutting down) stops it once
/// the migration is over, and only then: a link lost after the signal is
/// still recovered. Before, the signal armed the operator's "give up
/// recovery", and the next lost link stranded the destination's guest
/// without its pages.
#[test]
fn a_source_told_to_stop_during_post_copy_still_recovers_a_lost_link() {
    if !kvm_or_skip("a_source_told_to_stop_during_post_copy_still_recovers_a_lost_link") {
        return;
    }
    let dir = scratch("postcopy-src-term");
    let mut src = VmProcess::boot(&dir, "src", "workload=dirty:32:6", "256M", 1);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    let port = free_port();
    let dst = VmProcess::incoming(&dir, "dst", &console, port, "256M", 1);
    // Held in its recovery (connected again, before the destination's
    // bitmap) for up to 3 s: the signal comes while it waits there.
    let req = json!({"cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1",
                     "mode": "postcopy", "max_bandwidth": 4 << 20,
                     "fault_hold": "recovery:3000"});
    assert_eq!(src.request(req)["ok"], true);
    src.wait_until("post-copy", |r| r["status"] == "postcopy-active");
    src.cut_links();
    src.wait_until("held in recovery", |r| r["held"] == "recovery");
    src.signal(nix::sys::signal::Signal::SIGTERM);
    let r = src.wait_until("recovered", |r| {
        r["recoveries"].as_u64() == Some(1) || r["status"] == "failed"
    });
    assert_eq!(r["status"], "postcopy-active", "{r}");
    dst.wait_until("arrived", |r| r["status"] == "completed");
    assert_eq!(
        src.wait(Duration::from_secs(30)),
        0,
        "the source stops once done"
    );
    assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "running");
    console.assert_runs_on(2, Duration::from_secs(30));
    assert_eq!(dst.terminate(), 0);
}

/// The same signal, and then the operator gives the recovery up: the
/// source's paused copy (it holds the pages the destination lacks) is kept,
/// as "unconfirmed", and nothing but a forced command runs or discards it.
/// Before, the process exited at once, as the signal had asked.
#[test]
fn a_post_copy_given_up_after_a_stop_signal_keeps_the_source_copy() {
    if !kvm_or_skip("a_post_copy_given_up_after_a_stop_signal_keeps_the_source_copy") {
        return;
    }
    let dir = scratch("postcopy-src-give-up");
    let src = VmProcess::boot(&dir, "src", "workload=dirty:32:6", "256M", 1);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    let port = free_port();
    let _dst = VmProcess::incoming(&dir, "dst", &console, port, "256M", 1);
    let req = json!({"cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1",
                     "mode": "postcopy", "max_bandwidth": 4 << 20,
                     "fault_hold": "recovery:10000"});
    assert_eq!(src.request(req)["ok"], true);
    src.wait_until("post-copy", |r| r["status"] == "postcopy-active");
    src.signal(nix::sys::signal::Signal::SIGTERM);
    src.cut_links();
    src.wait_until("held in recovery", |r| r["held"] == "recovery");
    let r = src.request(json!({"cmd": "cancel"}));
    assert_eq!(r["ok"], true, "{r}");
    let r = src.wait_until("given up", |r| r["status"] == "failed");
    assert!(r["error"].as_str().unwrap().contains("abandoned"), "{r}");
    // Still there (it exited at once before) and saying why.
    std::thread::sleep(Duration::from_millis(500));
    let status = src.request(json!({"cmd": "status"}));
    assert_eq!(status["state"], "unconfirmed", "{status}");
    let r = src.request(json!({"cmd": "stop"}));
    assert_eq!(r["ok"], false, "{r}");
}

#[test]
fn postcopy_recovers_when_the_links_are_cut() {
    if !kvm_or_skip("postcopy_recovers_when_the_links_are_cut") {
        return;
    }
    // A slow push and a slowly swept working set keep the post-copy phase
    // going for seconds; the links are cut twice in the middle of it.
    let stats = migrate_once(
        "postcopy-cut",
        2,
        "workload=dirty:48:6",
        json!({"mode": "postcopy", "max_bandwidth": 4 << 20, "prepaging_window": 4}),
        |src, dst| {
            src.wait_until("post-copy", |r| r["status"] == "postcopy-active");
            // The threads that bring the pages run at the default nice value
            // of `--postcopy-nice`, ahead of the vCPUs, and those on a
            // fault's path 5 lower still, ahead of the push.
            // A thread is named as it starts and sets its priority a moment
            // later; on a busy machine the test may look in between.
            assert_eq!(
                settled_nice(dst, "uffd-faults", -15),
                Some(-15),
                "fault thread"
            );
            assert_eq!(
                settled_nice(dst, "fault-pages", -15),
                Some(-15),
                "fault answer reader"
            );
            assert_eq!(
                settled_nice(dst, "push-pages", -10),
                Some(-10),
                "push reader"
            );
            assert_eq!(thread_nice(dst, "vcpu0"), Some(0), "the guest's vCPU");
            // After the switch the source cannot take the VM back: cancel is refused.
            let r = src.request(json!({"cmd": "cancel"}));
            assert_eq!(r["ok"], false, "{r}");
            assert!(
                r["error"].as_str().unwrap().contains("cannot be cancelled"),
                "{r}"
            );
            // Nobody but the source may resume the migration.
            let inc = dst.request(json!({"cmd": "migration"}));
            assert_eq!(inc["direction"], "incoming", "{inc}");
            let port = inc["recover_port"].as_u64().unwrap();
            let stranger = recovery_answer(port, "127.0.0.2", None);
            assert!(
                stranger.contains("is not this migration's source"),
                "{stranger}"
            );
            let forged = recovery_answer(
                port,
                "127.0.0.1",
                Some(wire::Message::RecoverHello {
                    job: 1,
                    urgent: false,
                }),
            );
            assert!(forged.contains("awaits recovery here"), "{forged}");
            for cut in 1..=2u64 {
                let before = dst.request(json!({"cmd": "migration"}))["pages_received"]
                    .as_u64()
                    .unwrap();
                // Connections from the source's own address that say nothing
                // delay no recovery (served one at a time, each would hold it
                // for a 5 s read timeout: 20 s for these four).
                let _silent: Vec<_> = (0..4)
                    .map(|_| std::net::TcpStream::connect(("127.0.0.1", port as u16)).unwrap())
                    .collect();
                let cut_at = Instant::now();
                src.cut_links();
                let r = src.wait_until("recovered", |r| {
                    r["recoveries"].as_u64() == Some(cut) && r["status"] == "postcopy-active"
                        || r["status"] == "completed"
                });
                assert_eq!(
                    r["recoveries"], cut,
                    "the phase ended before cut {cut}: {r}"
                );
                assert!(
                    cut_at.elapsed() < Duration::from_secs(10),
                    "recovery {cut} waited on silent connections: {:?}",
                    cut_at.elapsed()
                );
                // The destination takes up the new session and pages flow again.
                dst.wait_until("pages flowing again", |inc| {
                    inc["status"] == "completed"
                        || inc["status"] == "postcopy-active"
                            && inc["pages_received"].as_u64().unwrap() > before
                });
            }
            let inc = dst.request(json!({"cmd": "migration"}));
            assert!(inc["recoveries"].as_u64().unwrap() >= 1, "{inc}");
            // The readers of the recovered session run ahead too.
            if inc["status"] == "postcopy-active" {
                assert_eq!(
                    thread_nice(dst, "push-pages"),
                    Some(-10),
                    "after recoveries"
                );
            }
        },
    );
    assert_eq!(stats["recoveries"], 2, "{stats}");
}

#[test]
fn postcopy_without_fault_channel_recovers_too() {
    if !kvm_or_skip("postcopy_without_fault_channel_recovers_too") {
        return;
    }
    // Fault requests and answers share the main connection with the push (the
    // comparison case of the benchmark); a cut link recovers on one connection.
    let stats = migrate_once(
        "postcopy-onechan",
        1,
        "workload=dirty:48:6",
        json!({"mode": "postcopy", "max_bandwidth": 4 << 20, "fault_channel": false}),
        |src, _| {
            src.wait_until("post-copy", |r| r["status"] == "postcopy-active");
            src.cut_links();
        },
    );
    assert_eq!(stats["fault_channel"], false, "{stats}");
    assert_eq!(stats["recoveries"], 1, "{stats}");
    assert!(stats["faults"]["count"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn hybrid_leaves_the_hot_working_set_to_post_copy() {
    if !kvm_or_skip("hybrid_leaves_the_hot_working_set_to_post_copy") {
        return;
    }
    // A working set rewritten faster than the capped link could ever catch
    // up with: the sampling before round 0 finds it hot, the rounds send
    // only the rest, and each hot page crosses the wire once, after the switch.
    let stats = migrate_once(
        "hybrid-hot",
        1,
        "workload=dirty:32:256",
        json!({"mode": "hybrid", "max_bandwidth": 16 << 20}),
        |_, _| {},
    );
    let deferred = stats["pages"]["deferred"].as_u64().unwrap();
    assert!(deferred >= (30 << 20) / 4096, "{stats}");
    // The sampling ends because the set stopped growing, or because the
    // guest had gone round it before the step that sent the rest ended (a
    // vCPU held up while dirty logging starts catches up in a burst); never
    // at the time limit.
    assert!(
        matches!(
            stats["sampling"]["ended"].as_str(),
            Some("quiet" | "all sent")
        ),
        "{stats}"
    );
    // Round 0's dirty rate counts the hot pages the guest wrote in it, though
    // the round did not send them.
    let r0 = &stats["rounds"][0];
    let written = r0["dirty_rate"].as_f64().unwrap() * r0["ms"].as_f64().unwrap() / 1e3;
    assert!(
        written >= (deferred * 4096) as f64 * 0.99,
        "round 0's dirty rate leaves out its hot pages: {stats}"
    );
    // Round 0 sends the rest, the guest's other data (4 to 5 MiB, which
    // varies from run to run), not the hot set's 8000 pages again.
    let round0 = stats["rounds"][0]["pages"].as_u64().unwrap();
    assert!(
        round0 * 4 < deferred,
        "round 0 re-sent the hot set: {stats}"
    );
    // A fault can bring a page twice only where the push's copy may be
    // queued behind bulk data; under the cap the push's next page, often
    // the one the guest faults on, is not sent again (up to ~500 pages
    // were, 2 MiB, before that). Each page crosses the wire once.
    let sent = stats["bytes"].as_u64().unwrap();
    let twice = stats["pages"]["duplicate"].as_u64().unwrap();
    let faults = stats["faults"]["count"].as_u64().unwrap();
    assert!(twice <= faults, "more pages twice than faults: {stats}");
    // Round 0's pages (more when the host is busy and the round slow) and
    // the 32 MiB hot set, with 1 MiB for headers: ~500 pages twice exceed it.
    assert!(
        sent < round0 * 4096 + (33 << 20),
        "{sent} bytes ({twice} pages twice) for a 32 MiB working set and {round0} pages in round 0: {stats}"
    );
}

#[test]
fn hybrid_stops_sampling_once_the_link_has_nothing_left_to_send() {
    if !kvm_or_skip("hybrid_stops_sampling_once_the_link_has_nothing_left_to_send") {
        return;
    }
    // 64 MiB swept at 16 MiB/s take the guest 4 s to go round, the link
    // (uncapped) a fraction of a second to send: the sampling ends when
    // every page not seen rewritten has gone, instead of idling the link
    // for up to 1 s; what the guest rewrites later goes again.
    let stats = migrate_once(
        "hybrid-all-sent",
        1,
        "workload=dirty:64:16",
        json!({"mode": "hybrid"}),
        |_, _| {},
    );
    let sampling = &stats["sampling"];
    assert_eq!(sampling["ended"], "all sent", "{stats}");
    assert!(sampling["ms"].as_f64().unwrap() < 1000.0, "{stats}");
    let hot = sampling["hot_pages"].as_u64().unwrap();
    assert!(hot > 0 && hot < (64 << 20) / 4096, "{stats}");
    assert!(
        stats["pages"]["deferred"].as_u64().unwrap() >= hot,
        "{stats}"
    );
}

#[test]
fn hybrid_rounds_report_what_the_guest_wrote_in_each() {
    if !kvm_or_skip("hybrid_rounds_report_what_the_guest_wrote_in_each") {
        return;
    }
    // 64 MiB/s of rewrites: half to a hot 5 % (found hot by the sampling and
    // left to post-copy), half sweeping the rest, which the capped rounds
    // chase. A max-downtime no pause can meet runs every round.
    let stats = migrate_once(
        "hybrid-rates",
        1,
        "workload=dirty:64:64 hot=5",
        json!({"mode": "hybrid", "max_bandwidth": 16 << 20, "max_downtime_ms": 1}),
        |_, _| {},
    );
    assert!(stats["pages"]["deferred"].as_u64().unwrap() > 0, "{stats}");
    let rounds = stats["rounds"].as_array().unwrap();
    let ms = |r: &serde_json::Value| r["ms"].as_f64().unwrap();
    assert!(rounds[1..].iter().any(|r| ms(r) >= 20.0), "{stats}");
    // Each later round counts the pages written in it, hot ones included:
    // no more than the guest's rate allows (16,384 pages/s, plus the 100 ms
    // of credit it may catch up in a burst), with a margin for its clock. Not
    // the hot pages written since the sampling, which the rounds never send.
    for r in &rounds[1..] {
        let pages = r["dirty_rate"].as_f64().unwrap() * ms(r) / 1e3 / 4096.0;
        let most = 64.0 + 1.5 * 16384.0 * (ms(r) / 1e3 + 0.1);
        assert!(
            pages <= most,
            "a round of {} ms reports {pages:.0} pages written: {stats}",
            ms(r)
        );
    }
}

#[test]
fn hybrid_with_zstd_and_reorder_compresses_the_rounds_only() {
    if !kvm_or_skip("hybrid_with_zstd_and_reorder_compresses_the_rounds_only") {
        return;
    }
    // The rounds send compressed batches in reordered rounds; after the
    // switch the pages travel raw, and every expected page arrives once. The
    // link is slow enough (for pages that shrink tenfold) for round 0 to
    // outlast the hot-page sampling, so that later rounds have pages to send.
    let stats = migrate_once(
        "hybrid-zstd",
        1,
        "workload=dirty:32:8 pattern=compressible hot=10",
        json!({"mode": "hybrid", "max_downtime_ms": 1, "postcopy_after_rounds": 3,
               "max_bandwidth": 1 << 20, "compress": "zstd", "reorder": true}),
        |_, _| {},
    );
    let c = &stats["compression"];
    assert_eq!(c["algorithm"], "zstd", "{stats}");
    assert_eq!(c["level"], 1, "{stats}");
    assert!(c["ratio"].as_f64().unwrap() > 3.0, "{stats}");
    assert_eq!(stats["reorder"], true, "{stats}");
    let rounds = stats["rounds"].as_array().unwrap().len();
    assert!((2..=3).contains(&rounds), "{stats}");
    // Only the rounds' pages went through the compressor.
    let round_pages: u64 = stats["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pages"].as_u64().unwrap())
        .sum();
    assert_eq!(
        c["raw_bytes"].as_u64().unwrap(),
        round_pages * 4096,
        "{stats}"
    );
}

#[test]
fn auto_mode_switches_to_post_copy_when_pre_copy_cannot_converge() {
    if !kvm_or_skip("auto_mode_switches_to_post_copy_when_pre_copy_cannot_converge") {
        return;
    }
    // 64 MiB/s of dirtying against a 16 MiB/s link: the rounds cannot catch up.
    let stats = migrate_once(
        "auto-post",
        1,
        "workload=dirty:32:64",
        json!({"mode": "auto", "max_bandwidth": 16 << 20}),
        |_, _| {},
    );
    assert_eq!(stats["mode"], "auto", "{stats}");
    let policy = stats["policy"].as_str().unwrap();
    assert!(policy.starts_with("post-copy after"), "{stats}");
    assert_eq!(stats["rounds"].as_array().unwrap().len(), 1, "{stats}");
}

#[test]
fn auto_mode_leaves_a_working_set_still_growing_to_post_copy() {
    if !kvm_or_skip("auto_mode_leaves_a_working_set_still_growing_to_post_copy") {
        return;
    }
    // 64 MiB swept at 16 MiB/s over a 16 MiB/s link: the sampling at the start
    // of round 0 (which sends meanwhile) still finds new pages when a tenth of
    // memory has gone, so round 0 ends there and post-copy moves the rest once,
    // even where a pause long enough to send it all (~4 s) is allowed.
    let stats = migrate_once(
        "auto-cut",
        1,
        "workload=dirty:64:16",
        json!({"mode": "auto", "max_bandwidth": 16 << 20, "max_downtime_ms": 20_000}),
        |_, _| {},
    );
    let policy = stats["policy"].as_str().unwrap();
    assert!(policy.contains("still growing"), "{stats}");
    assert_eq!(stats["status"], "completed", "{stats}");
    // The link's rate as round 0 measured it: the cap, not the cap diluted
    // by the sampling's first step, which only watched.
    let rate = stats["link_rate"].as_f64().unwrap() / f64::from(16 << 20);
    assert!(
        (0.93..1.3).contains(&rate),
        "link_rate {rate:.2} × the cap: {stats}"
    );
    assert_eq!(stats["sampling"]["ended"], "budget", "{stats}");
    assert_eq!(stats["rounds"].as_array().unwrap().len(), 1, "{stats}");
    // A tenth of the allocated memory (~65 MiB with data and the zeroed
    // pages), plus the batch that crossed the budget.
    let round0 = stats["rounds"][0]["bytes"].as_u64().unwrap();
    assert!(
        round0 <= (8 << 20) + ZEROED / 10,
        "round 0 went past its budget: {stats}"
    );
    let deferred = stats["pages"]["deferred"].as_u64().unwrap();
    assert!(deferred >= (56 << 20) / 4096, "{stats}");
    // Each page about once: at most 1.2 × the ~65 MiB that hold data.
    let sent = stats["bytes"].as_u64().unwrap();
    assert!(
        sent < 78 << 20,
        "{sent} bytes for a 64 MiB working set: {stats}"
    );
}
