//! Live pre-copy migration between two `migd run` processes over loopback TCP,
//! with the test guest checking itself throughout; the same VM goes back and
//! forth, with memory digests compared at every switch-over.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// Heartbeat counters in console order.
fn heartbeats(c: &Console) -> Vec<u64> {
    c.text()
        .lines()
        .filter_map(|l| l.strip_prefix("HEARTBEAT n="))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

fn back_and_forth(cpus: usize, hops: usize) {
    let dir = scratch(&format!("migrate{cpus}"));
    // The guest also keeps 8 MiB of zeros, which every hop must carry as zeros.
    let mut src = VmProcess::boot(&dir, "hop0", "workload=dirty:32:64 zeros=8", "256M", cpus);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    console.wait_heartbeats(0, 2, Duration::from_secs(30));
    // Memory the guest zeroed takes none on the destinations.
    const ZEROED: u64 = 16 << 20;
    zero_fill_unused(src.child.id(), ZEROED);
    let src_held = guest_ram_bytes(src.child.id());
    for hop in 1..=hops {
        let port = free_port();
        // With two vCPUs, hop 2 arrives onto memory allocated up front
        // (`--prefault`) and hop 3 leaves it: the digests then count only
        // the pages known to hold data, on either side.
        let prefault = cpus == 2 && hop == 2;
        let flags: &[&str] = if prefault { &["--prefault"] } else { &[] };
        let dst = VmProcess::incoming_with(
            &dir,
            &format!("hop{hop}"),
            &console,
            (port, "256M", cpus),
            flags,
        );
        assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "incoming");
        let before = console.last_heartbeat().unwrap_or(0);
        // Every other hop clears the dirty log the old way, at each read.
        let clear = hop % 2 == 1;
        let r = src.request(json!({
            "cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1",
            "verify": true, "job": format!("hop{hop}"), "clear_before_send": clear
        }));
        assert_eq!(r["ok"], true, "{r}");
        let stats = src.wait_migration();
        assert_eq!(stats["status"], "completed", "hop {hop}: {stats}");
        assert_eq!(stats["verified"], true, "memory digests compared: {stats}");
        // The rounds cleared the dirty log word by word before sending (KVM
        // has manual protection since Linux 5.4), or at each read, and
        // memory matched either way.
        assert_eq!(stats["clear_before_send"], clear, "{stats}");
        assert!(
            stats["pages"]["sent"].as_u64().unwrap() >= (32 << 20) / 4096,
            "{stats}"
        );
        assert!(!stats["rounds"].as_array().unwrap().is_empty());
        assert!(stats["downtime_ms"].as_f64().unwrap() > 0.0);
        let model = &stats["model"];
        assert!(
            model["prediction"]["total_ms"].as_f64().unwrap() > 0.0,
            "{stats}"
        );
        assert!(model["total_error_pct"].is_number(), "{stats}");
        assert_eq!(src.request(json!({"cmd": "status"}))["state"], "migrated");
        assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "running");
        let dst_held = guest_ram_bytes(dst.child.id());
        assert!(
            prefault || dst_held + ZEROED <= src_held + (1 << 20),
            "hop {hop}: the destination holds {dst_held} bytes of guest RAM, the first source {src_held} with {ZEROED} of zeros"
        );
        src = src.hand_over(dst, &console, before);
    }
    let hb = heartbeats(&console);
    assert!(
        hb.windows(2).all(|w| w[1] > w[0]),
        "heartbeat counter went back: {hb:?}"
    );
    assert_eq!(src.terminate(), 0);
    console.assert_clean();
}

#[test]
fn precopy_one_vcpu_back_and_forth() {
    if !kvm_or_skip("precopy_one_vcpu_back_and_forth") {
        return;
    }
    back_and_forth(1, 2);
}

#[test]
fn precopy_two_vcpus_back_and_forth() {
    if !kvm_or_skip("precopy_two_vcpus_back_and_forth") {
        return;
    }
    back_and_forth(2, 3);
}

#[test]
fn refused_and_unreachable_destinations_leave_the_source_running() {
    if !kvm_or_skip("refused_and_unreachable_destinations_leave_the_source_running") {
        return;
    }
    let dir = scratch("migrate-refused");
    let src = VmProcess::boot(&dir, "src", "workload=dirty:8:8", "128M", 1);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    // Nobody listens.
    let port = free_port();
    src.request(json!({"cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1"}));
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "failed");
    assert!(
        stats["error"].as_str().unwrap().contains("connecting"),
        "{stats}"
    );
    // A VM paused before a migration cancelled in its final pause stays
    // paused.
    assert_eq!(src.request(json!({"cmd": "pause"}))["ok"], true);
    let dst_console = Console(dir.join("dst.console"));
    let dst = VmProcess::incoming(&dir, "dst0", &dst_console, port, "128M", 1);
    let req = json!({"cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1",
                     "fault_hold": "switch:20000"});
    assert_eq!(src.request(req)["ok"], true);
    src.wait_until("held at the switch", |r| r["held"] == "switch");
    assert_eq!(src.request(json!({"cmd": "cancel"}))["ok"], true);
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "cancelled", "{stats}");
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "paused");
    assert_eq!(src.request(json!({"cmd": "resume"}))["ok"], true);
    drop(dst);
    let port = free_port();
    // A destination sized for another VM refuses before any memory moves.
    let dst = VmProcess::incoming(&dir, "dst", &dst_console, port, "256M", 1);
    src.request(json!({"cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1"}));
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "failed");
    assert!(
        stats["error"].as_str().unwrap().contains("refused"),
        "{stats}"
    );
    assert_eq!(stats["bytes"], 0, "no memory moved: {stats}");
    // The source runs on, intact.
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "running");
    console.assert_runs_on(2, Duration::from_secs(20));
    // The refusing destination waits on for a VM of its size; nobody came.
    assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "incoming");
    assert_eq!(dst.terminate(), 0);

    // A destination of the right size first meets clients that are not
    // sources (a scanner's junk, a connection closed at once, a peer that
    // sends half a frame and leaves), then the source: the VM arrives.
    let port = free_port();
    let dst = VmProcess::incoming(&dir, "dst2", &dst_console, port, "128M", 1);
    let addr = format!("127.0.0.1:{port}");
    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], b"", &[0, 0, 0, 64, 1, 2]] {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.write_all(junk).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        // The destination closes the connection (maybe after a refusal).
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    }
    assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "incoming");
    src.request(json!({"cmd": "migrate", "to": addr, "name": "vm1"}));
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "completed", "{stats}");
    dst_console.wait_heartbeats(0, 2, Duration::from_secs(30));
    dst_console.assert_clean();
    assert_eq!(dst.terminate(), 0);
}

#[test]
fn cancel_and_killed_destination_leave_the_source_running() {
    if !kvm_or_skip("cancel_and_killed_destination_leave_the_source_running") {
        return;
    }
    let dir = scratch("migrate-cancel");
    let src = VmProcess::boot(&dir, "src", "workload=dirty:64:32", "256M", 2);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    // 8 MiB/s: the 64 MiB working set takes seconds, so the fault lands
    // mid-transfer. At 4 KiB/s a page batch (1 MiB) alone would hold its
    // sender for four minutes: the cancel must not wait for that.
    let cases = [("cancel", 8 << 20), ("kill", 8 << 20), ("cancel", 4 << 10)];
    for (i, (how, cap)) in cases.into_iter().enumerate() {
        let port = free_port();
        let dst_console = Console(dir.join(format!("dst{i}.console")));
        let mut dst = VmProcess::incoming(&dir, &format!("dst{i}"), &dst_console, port, "256M", 2);
        src.request(json!({
            "cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1",
            "max_bandwidth": cap
        }));
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(src.request(json!({"cmd": "migration"}))["status"], "active");
        // A save's pause and resume must not meet a migration's commit.
        let snap = dir.join("during.snap");
        let r = src.request(json!({"cmd": "snapshot", "path": snap}));
        assert_eq!(r["error"], "a migration is running", "{r}");
        assert!(!snap.exists());
        let t = std::time::Instant::now();
        if how == "cancel" {
            assert_eq!(src.request(json!({"cmd": "cancel"}))["ok"], true);
        } else {
            let _ = dst.child.kill();
        }
        let stats = src.wait_migration();
        let want = if how == "cancel" {
            "cancelled"
        } else {
            "failed"
        };
        assert_eq!(stats["status"], want, "{how}: {stats}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{how} at {cap} bytes/s took {:?}",
            t.elapsed()
        );
        assert_ne!(
            dst.wait(Duration::from_secs(20)),
            0,
            "{how}: destination gives up"
        );
        assert_eq!(src.request(json!({"cmd": "status"}))["state"], "running");
        console.assert_runs_on(2, Duration::from_secs(20));
    }
}

/// Migrates `src` to a fresh incoming VM process `tag`, at the address `via`
/// makes of its port, with the request keys `extra`; returns the source's
/// final statistics and the destination.
fn migrate_to_new(
    dir: &std::path::Path,
    src: &VmProcess,
    tag: &str,
    via: impl FnOnce(u16) -> String,
    extra: serde_json::Value,
) -> (serde_json::Value, VmProcess) {
    let port = free_port();
    let dst_console = Console(dir.join(format!("{tag}.console")));
    let dst = VmProcess::incoming(dir, tag, &dst_console, port, "256M", 1);
    let mut req = json!({"cmd": "migrate", "to": via(port), "name": "vm1", "job": tag});
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    let r = src.request(req);
    assert_eq!(r["ok"], true, "{r}");
    (src.wait_migration(), dst)
}

/// The migration failed with an error that says `why`, before any pause; the
/// destination gave up and the source VM runs on.
fn assert_failed_and_source_runs_on(
    stats: &serde_json::Value,
    why: &str,
    src: &VmProcess,
    dst: &mut VmProcess,
) {
    assert_eq!(stats["status"], "failed", "{stats}");
    let e = stats["error"].as_str().unwrap();
    assert!(e.contains(why), "{e}");
    assert_ne!(dst.wait(Duration::from_secs(20)), 0, "destination gives up");
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "running");
    src.console.assert_runs_on(2, Duration::from_secs(20));
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Boots a guest running `workload`, migrates it over loopback with the
/// request keys `extra`, and checks that the migration failed saying `why`
/// and the source runs on, its console clean; returns the statistics.
fn fails_on_loopback(
    test: &str,
    workload: &str,
    extra: serde_json::Value,
    why: &str,
) -> serde_json::Value {
    let dir = scratch(test);
    let src = VmProcess::boot(&dir, "src", workload, "256M", 1);
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    let (stats, mut dst) = migrate_to_new(&dir, &src, "dst", loopback, extra);
    assert_failed_and_source_runs_on(&stats, why, &src, &mut dst);
    src.console.assert_clean();
    stats
}

#[test]
fn strict_downtime_fails_a_migration_that_cannot_converge() {
    if !kvm_or_skip("strict_downtime_fails_a_migration_that_cannot_converge") {
        return;
    }
    // 16 MiB rewritten flat out, 16 MiB/s: every round leaves ~1 s of pause.
    let stats = fails_on_loopback(
        "migrate-strict",
        "workload=dirty:16:0",
        json!({"max_bandwidth": 16 << 20, "strict_downtime": true}),
        "over --max-downtime 300 ms",
    );
    assert!(
        stats["error"]
            .as_str()
            .unwrap()
            .contains("pre-copy did not converge"),
        "{stats}"
    );
    assert_ne!(
        stats["stop_reason"], "expected downtime within max-downtime",
        "{stats}"
    );
    assert!(stats["downtime_phases"].is_null(), "never paused: {stats}");
}

#[test]
fn sigterm_during_a_migration_cancels_it_before_stopping() {
    if !kvm_or_skip("sigterm_during_a_migration_cancels_it_before_stopping") {
        return;
    }
    let dir = scratch("migrate-sigterm");
    let mut src = VmProcess::boot(&dir, "src", "workload=dirty:64:32", "256M", 1);
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    let port = free_port();
    let dst_console = Console(dir.join("dst.console"));
    let mut dst = VmProcess::incoming(&dir, "dst", &dst_console, port, "256M", 1);
    src.request(json!({
        "cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1",
        "max_bandwidth": 8 << 20
    }));
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(src.request(json!({"cmd": "migration"}))["status"], "active");
    src.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        src.wait(Duration::from_secs(30)),
        0,
        "source stops once the migration is cancelled"
    );
    assert_ne!(
        dst.wait(Duration::from_secs(30)),
        0,
        "destination gives up and cleans up"
    );
    assert!(
        !dst_console.text().contains("HEARTBEAT"),
        "the destination never ran the VM"
    );
    src.console.assert_clean();
}

/// One verified pre-copy of `src` to a fresh destination with `extra` options;
/// returns the statistics and the destination (now the VM's home).
fn hop(
    dir: &std::path::Path,
    src: &VmProcess,
    tag: &str,
    extra: serde_json::Value,
) -> (serde_json::Value, VmProcess) {
    let port = free_port();
    let dst = VmProcess::incoming(dir, tag, &src.console, port, "256M", 1);
    let mut req = json!({"cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1",
                         "verify": true, "job": tag, "max_bandwidth": 16 << 20});
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    let r = src.request(req);
    assert_eq!(r["ok"], true, "{r}");
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "completed", "{tag}: {stats}");
    assert_eq!(stats["verified"], true, "memory digests compared: {stats}");
    // The switch-over's phases add up to (nearly all of) the downtime.
    let phases = stats["downtime_phases"]
        .as_object()
        .expect("downtime phases");
    let sum_us: u64 = phases.values().filter_map(|v| v.as_u64()).sum();
    let downtime_us = stats["downtime_ms"].as_f64().unwrap() * 1e3;
    assert!(phases["go_confirm_us"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        sum_us as f64 <= downtime_us + 1.0 && sum_us as f64 >= 0.5 * downtime_us,
        "phases {sum_us} µs against a downtime of {downtime_us} µs: {stats}"
    );
    (stats, dst)
}

#[test]
fn xbzrle_sends_deltas_of_sparsely_rewritten_pages() {
    if !kvm_or_skip("xbzrle_sends_deltas_of_sparsely_rewritten_pages") {
        return;
    }
    // The guest rewrites one word per page of a 16 MiB set, 64 MiB/s of pages;
    // capped at 16 MiB/s, every round finds the whole set dirty again.
    let dir = scratch("xbzrle");
    let src = VmProcess::boot(&dir, "a", "workload=sparse:16:64", "256M", 1);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    console.wait_heartbeats(0, 1, Duration::from_secs(30));
    let (plain, b) = hop(&dir, &src, "plain", json!({}));
    src.request(json!({"cmd": "stop"}));
    let (delta, c) = hop(&dir, &b, "delta", json!({"xbzrle_cache": 64 << 20}));
    b.request(json!({"cmd": "stop"}));
    let x = &delta["xbzrle"];
    assert_eq!(x["cache_size"], 64 << 20, "{delta}");
    assert!(x["pages"].as_u64().unwrap() > 1000, "{delta}");
    assert!(x["hit_rate"].as_f64().unwrap() > 0.9, "{delta}");
    let (pb, db) = (
        plain["bytes"].as_u64().unwrap(),
        delta["bytes"].as_u64().unwrap(),
    );
    eprintln!(
        "plain {pb} bytes in {} rounds, xbzrle {db} bytes in {} rounds ({x})",
        plain["rounds"].as_array().unwrap().len(),
        delta["rounds"].as_array().unwrap().len()
    );
    assert!(
        db * 2 <= pb,
        "delta compression sent {db} bytes against {pb} without: {delta}"
    );
    console.assert_runs_on(2, Duration::from_secs(30));
    assert_eq!(c.terminate(), 0);
}

#[test]
fn xbzrle_deltas_count_in_the_pause_the_rounds_expect() {
    if !kvm_or_skip("xbzrle_deltas_count_in_the_pause_the_rounds_expect") {
        return;
    }
    // One word rewritten per page of a 1 MiB set, 8 MiB/s of pages, over a
    // 512 KiB/s link: round 1 sends the set as deltas of a few bytes, which
    // take ~0.3 ms a page here (the work, in a debug build), and what the
    // guest dirtied meanwhile goes the same way, a pause well under 300 ms.
    // Counted as whole pages (8 ms each at the cap) those were over it, and
    // the rounds went on chasing them.
    let dir = scratch("xbzrle-stop");
    let src = VmProcess::boot(&dir, "a", "workload=sparse:1:8", "256M", 1);
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    src.console.wait_heartbeats(0, 1, Duration::from_secs(30));
    let (stats, b) = hop(
        &dir,
        &src,
        "delta",
        json!({"xbzrle_cache": 16 << 20, "max_bandwidth": 512 << 10}),
    );
    src.request(json!({"cmd": "stop"}));
    eprintln!(
        "rounds {}, expected {} ms, downtime {} ms, xbzrle {}",
        stats["rounds"], stats["expected_downtime_ms"], stats["downtime_ms"], stats["xbzrle"]
    );
    assert!(
        stats["xbzrle"]["hit_rate"].as_f64().unwrap() > 0.9,
        "{stats}"
    );
    assert_eq!(
        stats["stop_reason"], "expected downtime within max-downtime",
        "{stats}"
    );
    assert_eq!(
        stats["rounds"].as_array().unwrap().len(),
        2,
        "round 0, then one round of deltas: {stats}"
    );
    b.console.assert_runs_on(2, Duration::from_secs(30));
    assert_eq!(b.terminate(), 0);
}

#[test]
fn auto_mode_stays_pre_copy_when_it_converges() {
    if !kvm_or_skip("auto_mode_stays_pre_copy_when_it_converges") {
        return;
    }
    // 1 MiB/s of pages rewritten a few bytes each, against a 16 MiB/s link:
    // pre-copy converges. With XBZRLE the pages dirtied since they were sent
    // go as deltas in the stop-and-copy, so the destination must still hold
    // what was sent (digests compared at the switch).
    let dir = scratch("auto-pre");
    let src = VmProcess::boot(&dir, "a", "workload=sparse:8:1", "256M", 1);
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    let (stats, b) = hop(
        &dir,
        &src,
        "auto",
        json!({"mode": "auto", "xbzrle_cache": 16 << 20}),
    );
    src.request(json!({"cmd": "stop"}));
    assert_eq!(stats["mode"], "auto", "{stats}");
    let policy = stats["policy"].as_str().unwrap();
    assert!(policy.starts_with("pre-copy"), "{stats}");
    assert_eq!(stats["pages"]["expected"], 0, "no post-copy phase: {stats}");
    b.console.assert_runs_on(2, Duration::from_secs(30));
    assert_eq!(b.terminate(), 0);
}

#[test]
fn auto_converge_throttles_until_pre_copy_converges() {
    if !kvm_or_skip("auto_converge_throttles_until_pre_copy_converges") {
        return;
    }
    // 128 MiB/s of dirtying against a 64 MiB/s link: without help the rounds
    // never catch up; throttled, the guest dirties less and they do. The
    // guest makes up for the time it was paused (up to 100 ms of writes at
    // once), so the throttle bites only where its run share of a period,
    // written flat out, is less than the rate: near the top (at 99 %, flat
    // out is ~15 MB/s here), which must leave the rounds well below the link
    // (against a 16 MiB/s link it did not always: "dirty set not shrinking").
    let dir = scratch("autoconv");
    let src = VmProcess::boot(&dir, "a", "workload=dirty:16:128", "256M", 1);
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    let (stats, b) = hop(
        &dir,
        &src,
        "throttled",
        json!({"auto_converge": true, "max_downtime_ms": 100, "max_bandwidth": 64 << 20}),
    );
    src.request(json!({"cmd": "stop"}));
    assert!(stats["throttle_pct"].as_u64().unwrap() >= 20, "{stats}");
    assert_eq!(
        stats["stop_reason"], "expected downtime within max-downtime",
        "{stats}"
    );
    // Throttling ends with the migration: the guest runs at full speed on B.
    b.console.assert_runs_on(3, Duration::from_secs(30));
    assert_eq!(b.terminate(), 0);
}

#[test]
fn zstd_compresses_compressible_pages_and_bad_values_are_refused() {
    if !kvm_or_skip("zstd_compresses_compressible_pages_and_bad_values_are_refused") {
        return;
    }
    // migctl refuses a bad value before it talks to any daemon.
    for bad in ["zstd:0", "zstd:30", "lz5"] {
        let out = std::process::Command::new(common::daemon::migctl_bin())
            .args(["--socket", "/nonexistent/migd.sock", "migrate", "vm1"])
            .args(["--to", "127.0.0.1:1", "--compress", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: {err}");
        assert!(err.contains("1..=19"), "{bad}: {err}");
    }
    // The working set's pages come from a four-word alphabet: zstd shrinks them.
    let dir = scratch("zstd");
    let src = VmProcess::boot(
        &dir,
        "a",
        "workload=dirty:32:8 pattern=compressible",
        "256M",
        1,
    );
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    console.wait_heartbeats(0, 1, Duration::from_secs(30));
    // The VM process refuses bad values before anything moves.
    for bad in [json!("zstd:0"), json!("zstd:30"), json!("lz5"), json!(3)] {
        let r = src.request(json!({"cmd": "migrate", "to": "127.0.0.1:1", "name": "vm1",
                                   "compress": bad}));
        assert_eq!(r["ok"], false, "{bad}: {r}");
        assert!(r["error"].as_str().unwrap().contains("zstd"), "{r}");
    }
    // A destination whose Accept lacks the zstd capability (an older build):
    // the migration fails before any page moves, saying why; the VM runs on.
    let old = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = old.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = old.accept().unwrap();
        assert!(matches!(
            wire::read_frame(&mut s),
            Ok(wire::Frame::Control(wire::Message::Hello { .. }))
        ));
        let caps = vec!["zero-ranges".to_string(), "precopy".to_string()];
        wire::write_control(
            &mut s,
            &wire::Message::Accept {
                version: wire::PROTOCOL_VERSION,
                capabilities: caps,
            },
        )
        .unwrap();
        // Nothing else arrives: the source hangs up.
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut rest);
        rest.len()
    });
    let r = src.request(json!({"cmd": "migrate", "to": format!("127.0.0.1:{port}"),
                               "name": "vm1", "compress": "zstd"}));
    assert_eq!(r["ok"], true, "{r}");
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "failed", "{stats}");
    let e = stats["error"].as_str().unwrap();
    assert!(e.contains("does not support zstd"), "{stats}");
    assert_eq!(fake.join().unwrap(), 0, "no page after the Accept");
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "running");

    let (stats, b) = hop(&dir, &src, "zstd", json!({"compress": "zstd:3"}));
    src.request(json!({"cmd": "stop"}));
    let c = &stats["compression"];
    eprintln!("zstd:3: {} bytes on the wire, {c}", stats["bytes"]);
    assert_eq!(c["algorithm"], "zstd", "{stats}");
    assert_eq!(c["level"], 3, "{stats}");
    let (raw, wire) = (
        c["raw_bytes"].as_u64().unwrap(),
        c["wire_bytes"].as_u64().unwrap(),
    );
    let sent = stats["pages"]["sent"].as_u64().unwrap();
    assert_eq!(
        raw,
        sent * 4096,
        "every page went through the compressor: {stats}"
    );
    assert!(
        wire * 3 < raw,
        "zstd shrank {raw} bytes only to {wire}: {stats}"
    );
    assert!(c["ratio"].as_f64().unwrap() > 3.0, "{stats}");
    assert!(
        stats["bytes"].as_u64().unwrap() * 3 < raw,
        "bytes on the wire: {stats}"
    );
    b.console.assert_runs_on(2, Duration::from_secs(30));
    assert_eq!(b.terminate(), 0);
}

#[test]
fn reorder_skips_hot_pages_dirtied_again_before_their_turn() {
    if !kvm_or_skip("reorder_skips_hot_pages_dirtied_again_before_their_turn") {
        return;
    }
    // Half of the rewrites hit 10 % of the working set, the rest sweep the
    // other 90 %: the hot pages are dirtied again within every round.
    let dir = scratch("reorder");
    let src = VmProcess::boot(&dir, "a", "workload=dirty:16:32 hot=10", "256M", 1);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    console.wait_heartbeats(0, 1, Duration::from_secs(30));
    let (stats, b) = hop(
        &dir,
        &src,
        "reorder",
        json!({"reorder": true, "max_downtime_ms": 50, "max_bandwidth": 32 << 20}),
    );
    src.request(json!({"cmd": "stop"}));
    eprintln!(
        "reorder: {} bytes, {} rounds, pages {}",
        stats["bytes"],
        stats["rounds"].as_array().unwrap().len(),
        stats["pages"]
    );
    assert_eq!(stats["reorder"], true, "{stats}");
    // Reorder reads the log inside a round: it needs the log cleared at each read.
    assert_eq!(stats["clear_before_send"], false, "{stats}");
    assert!(
        stats["pages"]["skipped_redirtied"].as_u64().unwrap() > 0,
        "{stats}"
    );
    b.console.assert_runs_on(2, Duration::from_secs(30));
    assert_eq!(b.terminate(), 0);
}

#[test]
fn the_pause_estimate_counts_the_links_round_trips() {
    if !kvm_or_skip("the_pause_estimate_counts_the_links_round_trips") {
        return;
    }
    // A link of 50 ms round trip or more (25 ms each way through a relay):
    // the pause exchanges State/Ready and Go/Confirm over it, 100 ms at least.
    // (No `verify`: its memory digests would lengthen the pause.)
    let dir = scratch("migrate-rtt");
    let src = VmProcess::boot(&dir, "src", "workload=dirty:8:4", "256M", 1);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    let relay = |port: u16| {
        let relay = common::delay::DelayRelay::start(
            loopback(port).parse().unwrap(),
            Duration::from_millis(25),
        );
        loopback(relay.port)
    };
    let migrate_through_relay = |tag: &str, max_downtime_ms: u64| {
        migrate_to_new(
            &dir,
            &src,
            tag,
            relay,
            json!({"max_downtime_ms": max_downtime_ms, "strict_downtime": true}),
        )
    };
    // 80 ms allowed: the pages would fit, the round trips do not. Refused,
    // not overshot; the VM runs on here.
    let (stats, mut dst) = migrate_through_relay("tight", 80);
    assert_failed_and_source_runs_on(&stats, "over --max-downtime 80 ms", &src, &mut dst);
    let rtt = stats["rtt_ms"].as_f64().expect("round trip measured");
    assert!((50.0..200.0).contains(&rtt), "{stats}");
    assert!(
        stats["expected_downtime_ms"].as_f64().unwrap() >= 2.0 * rtt,
        "{stats}"
    );
    assert!(stats["downtime_phases"].is_null(), "never paused: {stats}");
    // 300 ms allowed: it converges, and the pause, two round trips and more,
    // stays within it.
    let (stats, dst) = migrate_through_relay("roomy", 300);
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(
        stats["stop_reason"], "expected downtime within max-downtime",
        "{stats}"
    );
    let rtt = stats["rtt_ms"].as_f64().unwrap();
    let expected = stats["expected_downtime_ms"].as_f64().unwrap();
    let downtime = stats["downtime_ms"].as_f64().unwrap();
    assert!(rtt >= 50.0 && expected >= 2.0 * rtt, "{stats}");
    assert!((100.0..=300.0).contains(&downtime), "{stats}");
    src.request(json!({"cmd": "stop"}));
    dst.console.assert_runs_on(2, Duration::from_secs(30));
    console.assert_clean();
    assert_eq!(dst.terminate(), 0);
}

#[test]
fn a_memory_digest_mismatch_fails_the_migration_and_the_source_runs_on() {
    if !kvm_or_skip("a_memory_digest_mismatch_fails_the_migration_and_the_source_runs_on") {
        return;
    }
    // The source sends a wrong digest (test-only fault): the destination
    // finds it does not match its memory and cancels before resuming.
    let stats = fails_on_loopback(
        "migrate-digest",
        "workload=dirty:8:4",
        json!({"verify": true, "fault_corrupt_digest": true}),
        "memory digest mismatch",
    );
    assert_eq!(stats["verified"], false, "{stats}");
}

/// Pages the guest writes for the first time while the destination
/// prepares (held 1.5 s here, while the guest fills its working set at
/// 8 MiB/s, for 8 s) were holes when the source found its pages with data: round 0
/// sends them all the same, whichever way the dirty log is read.
#[test]
fn pages_first_written_while_the_destination_prepares_arrive() {
    if !kvm_or_skip("pages_first_written_while_the_destination_prepares_arrive") {
        return;
    }
    for (tag, how) in [
        ("reorder", json!({"reorder": true})),
        ("take", json!({"clear_before_send": false})),
        ("clear", json!({})),
    ] {
        let dir = scratch(&format!("migrate-fill-{tag}"));
        let src = VmProcess::boot(&dir, "src", "workload=dirty:64:4 fill=8", "256M", 1);
        src.console
            .wait_for("TESTGUEST layout", Duration::from_secs(60));
        let mut extra = how.clone();
        extra["fault_hold"] = json!("prepared:1500");
        let (stats, dst) = migrate_to_new(&dir, &src, "dst", loopback, extra);
        assert_eq!(stats["status"], "completed", "{tag}: {stats}");
        let on_dst = Console(dir.join("dst.console"));
        assert!(
            !src.console.text().contains("WORKLOAD READY"),
            "{tag}: the guest had filled its working set before it left"
        );
        on_dst.wait_for("WORKLOAD READY", Duration::from_secs(60));
        on_dst.wait_heartbeats(0, 2, Duration::from_secs(30));
        on_dst.assert_clean();
        assert_eq!(dst.terminate(), 0);
    }
}

/// While a migration runs, the VM process refuses `pause` and `resume`: the
/// migration pauses the VM for its last pages (a resume then would lose the
/// guest's writes, or after the commit run it twice), and a pause would be
/// undone by the destination.
#[test]
fn pause_and_resume_are_refused_while_a_migration_runs() {
    if !kvm_or_skip("pause_and_resume_are_refused_while_a_migration_runs") {
        return;
    }
    let dir = scratch("migrate-no-resume");
    let src = VmProcess::boot(&dir, "src", "workload=dirty:8:4", "256M", 1);
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    let port = free_port();
    let on_dst = Console(dir.join("dst.console"));
    let dst = VmProcess::incoming(&dir, "dst", &on_dst, port, "256M", 1);
    let r = src.request(json!({
        "cmd": "migrate", "to": loopback(port), "name": "vm1", "job": "j",
        "fault_hold": "switch:3000",
    }));
    assert_eq!(r["ok"], true, "{r}");
    src.wait_until("held at the switch", |m| m["held"] == "switch");
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "paused");
    for cmd in ["resume", "pause"] {
        let r = src.request(json!({ "cmd": cmd }));
        assert_eq!(r["ok"], false, "{cmd}: {r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains("migration of this VM is running"), "{e}");
    }
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "paused");
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "completed", "{stats}");
    on_dst.wait_heartbeats(0, 2, Duration::from_secs(30));
    on_dst.assert_clean();
    assert_eq!(dst.terminate(), 0);
}

/// The destination could not send its `Confirm` after `Go` (test-only fault;
/// a source that died or reset its link at that moment does this): the VM
/// it has resumed runs on, and the source, never told, stays paused.
#[test]
fn a_destination_that_cannot_confirm_runs_the_vm_on() {
    if !kvm_or_skip("a_destination_that_cannot_confirm_runs_the_vm_on") {
        return;
    }
    let dir = scratch("migrate-no-confirm");
    let src = VmProcess::boot(&dir, "src", "workload=dirty:8:4", "256M", 1);
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    let port = free_port();
    let on_dst = Console(dir.join("dst.console"));
    let addr = format!("127.0.0.1:{port}");
    let args = ["--incoming", &addr, "--memory", "256M", "--cpus", "1"];
    let dst = VmProcess::start_env(
        &dir,
        "dst",
        &on_dst,
        &args,
        &[("MIGD_FAULT_CONFIRM", "lost")],
    );
    let r = src.request(json!({"cmd": "migrate", "to": addr, "name": "vm1", "job": "j"}));
    assert_eq!(r["ok"], true, "{r}");
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "failed", "{stats}");
    let e = stats["error"].as_str().unwrap();
    assert!(e.contains("after the commit"), "{e}");
    assert_eq!(
        src.request(json!({"cmd": "status"}))["state"],
        "unconfirmed"
    );
    on_dst.wait_heartbeats(0, 3, Duration::from_secs(30));
    assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "running");
    on_dst.assert_clean();
    assert_eq!(dst.terminate(), 0);
    assert_eq!(src.terminate(), 0);
}

/// A commit that cannot be noted (`--unconfirmed-file` in a directory that
/// does not exist) fails the migration before `Go`: the source VM resumes,
/// the destination gives up.
#[test]
fn a_commit_that_cannot_be_noted_fails_before_go_and_the_source_resumes() {
    if !kvm_or_skip("a_commit_that_cannot_be_noted_fails_before_go_and_the_source_resumes") {
        return;
    }
    let dir = scratch("migrate-no-note");
    let note = dir.join("missing-dir").join("unconfirmed");
    let src = VmProcess::boot_with(
        &dir,
        "src",
        "workload=dirty:8:4",
        "256M",
        1,
        &["--unconfirmed-file", note.to_str().unwrap()],
    );
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    let (stats, mut dst) = migrate_to_new(&dir, &src, "dst", loopback, json!({}));
    assert_failed_and_source_runs_on(&stats, "noting the commit in", &src, &mut dst);
    assert!(!note.exists());
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "running");
}

/// The send of `Go` reports an error although `Go` went out (test-only
/// fault; the send watchdog can do this): the destination runs the VM, so
/// the source must stay paused, never resume on its own.
#[test]
fn a_failure_after_the_commit_leaves_the_source_paused() {
    if !kvm_or_skip("a_failure_after_the_commit_leaves_the_source_paused") {
        return;
    }
    let dir = scratch("migrate-after-go");
    // The commit is noted in this file (a daemon reads it if the process dies).
    let note = dir.join("src.unconfirmed");
    let src = VmProcess::boot_with(
        &dir,
        "src",
        "workload=dirty:8:4",
        "256M",
        1,
        &["--unconfirmed-file", note.to_str().unwrap()],
    );
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    let (stats, dst) = migrate_to_new(
        &dir,
        &src,
        "dst",
        loopback,
        json!({"fault_fail_after_go": true}),
    );
    assert_eq!(stats["status"], "failed", "{stats}");
    let e = stats["error"].as_str().unwrap();
    assert!(e.contains("after the commit"), "{e}");
    let status = src.request(json!({"cmd": "status"}));
    assert_eq!(status["state"], "unconfirmed", "{status}");
    assert!(status["unconfirmed"]
        .as_str()
        .unwrap()
        .contains("after the commit"));
    let noted = std::fs::read_to_string(&note).unwrap();
    assert!(noted.contains("the destination may run it"), "{noted}");
    assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "running");
    // Nothing runs the paused copy again, or discards it, but the operator's
    // word: not a resume, not a second migration, not a stop.
    for req in [
        json!({"cmd": "resume"}),
        json!({"cmd": "migrate", "to": "127.0.0.1:9", "name": "again"}),
        json!({"cmd": "stop"}),
    ] {
        let r = src.request(req.clone());
        assert_eq!(r["ok"], false, "{req} was taken: {r}");
        let e = r["error"].as_str().unwrap();
        assert!(
            e.contains("ended unconfirmed") && e.contains("--force"),
            "{e}"
        );
    }
    // Nor a handover to a new process, which would take the paused copy
    // from under the operator: `migd run --takeover` exits naming why, and
    // the old process keeps the VM, paused and unconfirmed.
    let pid = src.request(json!({"cmd": "status"}))["pid"].clone();
    let (code, err) = migd_output(&["run", "--takeover", src.control.to_str().unwrap()]);
    assert_ne!(code, 0, "the handover was taken: {err}");
    assert!(
        err.contains("refused the handover") && err.contains("ended unconfirmed"),
        "{err}"
    );
    let status = src.request(json!({"cmd": "status"}));
    assert_eq!(status["state"], "unconfirmed", "{status}");
    assert_eq!(status["pid"], pid, "{status}");
    let held = src.console.last_heartbeat();
    // The guest runs on at the destination, and only there.
    let on_dst = Console(dir.join("dst.console"));
    on_dst.wait_heartbeats(0, 3, Duration::from_secs(30));
    assert_eq!(
        src.request(json!({"cmd": "status"}))["state"],
        "unconfirmed"
    );
    assert_eq!(src.console.last_heartbeat(), held, "the source ran");
    on_dst.assert_clean();
    // The operator finds the destination gone, and resumes the source.
    assert_eq!(dst.terminate(), 0);
    let r = src.request(json!({"cmd": "resume", "force": true}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "running");
    // It runs here by the operator's word: the note is gone with it.
    assert!(!note.exists(), "the commit's note outlived a forced resume");
    src.console.assert_runs_on(2, Duration::from_secs(30));
    assert_eq!(src.terminate(), 0);
}

/// A VM process started by hand for a migration (`migd run --incoming`)
/// refuses a guest whose CPU features this host lacks, naming them, as the
/// daemon does (it took any CPU before), and waits for the next source.
#[test]
fn incoming_by_hand_refuses_a_cpu_this_host_lacks() {
    if !kvm_or_skip("incoming_by_hand_refuses_a_cpu_this_host_lacks") {
        return;
    }
    let dir = scratch("incoming-alien-cpu");
    let console = Console(dir.join("console.log"));
    let port = free_port();
    let dst = VmProcess::incoming(&dir, "dst", &console, port, "64M", 1);
    let leaf0 = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    let vm = wire::VmDescriptor {
        name: "alien".into(),
        memory: 64 << 20,
        vcpus: 1,
        cpu_vendor: String::from_utf8(vendor).unwrap(),
        // Every bit of leaf 1 ECX/EDX and leaf 7.0 EBX/ECX/EDX.
        cpu_features: vec![u32::MAX; 5],
    };
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let hello = wire::Message::Hello {
        magic: wire::MAGIC,
        version: wire::PROTOCOL_VERSION,
        capabilities: vec!["precopy".into()],
        mode: "precopy".into(),
        vm,
    };
    wire::write_control(&mut s, &hello).unwrap();
    match wire::expect_control(&mut s, "Refuse") {
        Ok(wire::Message::Refuse { reason }) => {
            assert!(reason.contains("lacks features the guest uses"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "incoming");
    dst.request(json!({"cmd": "stop"}));
}
