//! Guest memory on huge pages (`migd run --hugepages`, the daemon's
//! `hugepages`): a VM moves by pre-copy onto huge pages, to a new process on
//! the same memory (`--takeover`), off huge pages and onto them again
//! (XBZRLE deltas, then two page streams), with memory digests compared and
//! the guest checking itself throughout, then is saved (in the pause: a
//! background save is refused), restored onto huge pages and moved off them
//! once more. It moves onto huge pages by post-copy, hybrid and auto too,
//! the guest rewriting its memory flat out, and recovers from a link cut
//! during post-copy. A daemon on huge pages takes a VM by post-copy and
//! refuses one larger than its pool can hold; lazy restore onto huge pages
//! and a pool too small for the guest are refused, naming the cause.
//!
//! Two of these tests take 64 huge pages (128 MiB) each from the pool
//! (`vm.nr_hugepages`), and may run at once: `scripts/setup.sh` reserves
//! 256 MiB (`scripts/hugepages.sh`).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const HUGE: &str = "--hugepages";

/// The number on /proc/meminfo's line that starts with `key`.
fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Free huge pages in the host's pool.
fn free_huge_pages() -> u64 {
    meminfo("HugePages_Free:")
}

/// Whether `test` can run here: KVM, and 64 free huge pages (128 MiB) in
/// the host's pool; says why not otherwise.
fn kvm_and_pool_or_skip(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    let free = free_huge_pages();
    if free < 64 {
        eprintln!("skipped: {free} free huge pages, 64 needed (scripts/hugepages.sh 128)");
        return false;
    }
    true
}

/// A destination for a 128 MiB, 1-vCPU guest, and its address.
fn destination(
    dir: &std::path::Path,
    tag: &str,
    console: &Console,
    huge: bool,
) -> (VmProcess, String) {
    destination_with(dir, tag, console, if huge { &[HUGE] } else { &[] })
}

/// [`destination`] with these `flags`.
fn destination_with(
    dir: &std::path::Path,
    tag: &str,
    console: &Console,
    flags: &[&str],
) -> (VmProcess, String) {
    let port = free_port();
    let dst = VmProcess::incoming_with(dir, tag, console, (port, "128M", 1), flags);
    (dst, format!("127.0.0.1:{port}"))
}

/// Hands the VM of `old` to a new `migd run --takeover` process and
/// returns that one, running.
fn take_over(dir: &std::path::Path, mut old: VmProcess, console: &Console) -> VmProcess {
    let before = console.last_heartbeat().unwrap_or(0);
    let sock = old.control.to_str().unwrap().to_string();
    let new = VmProcess::start(dir, "taken", console, &["--takeover", &sock]);
    assert_eq!(
        old.wait(Duration::from_secs(30)),
        0,
        "old process hands over and exits"
    );
    console.wait_heartbeats(before, 2, Duration::from_secs(30));
    new
}

#[test]
fn a_vm_moves_onto_huge_pages_and_back_by_pre_copy() {
    if !kvm_and_pool_or_skip("a_vm_moves_onto_huge_pages_and_back_by_pre_copy") {
        return;
    }
    let dir = scratch("hugepages");
    // 64 MiB rewritten at 32 MiB/s, 8 bytes a page: under the cap below,
    // round 0 takes about a second, and the pages rewritten meanwhile go
    // again as deltas.
    let mut src = VmProcess::boot_with(&dir, "src", "workload=sparse:64:32", "128M", 1, &[]);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    console.wait_heartbeats(0, 2, Duration::from_secs(30));
    let hops = [
        (
            true,
            json!({"xbzrle_cache": 128 << 20, "max_bandwidth": 64 << 20}),
        ),
        (false, json!({})),
        (true, json!({"streams": 2})),
    ];
    for (hop, (huge, extra)) in hops.into_iter().enumerate() {
        let (dst, addr) = destination(&dir, &format!("hop{hop}"), &console, huge);
        let before = console.last_heartbeat().unwrap_or(0);
        let mut req = json!({
            "cmd": "migrate", "to": addr, "name": "vm1", "mode": "precopy",
            "verify": true, "job": format!("hop{hop}"),
        });
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        let r = src.request(req);
        assert_eq!(r["ok"], true, "{r}");
        let stats = src.wait_migration();
        assert_eq!(stats["status"], "completed", "hop {hop}: {stats}");
        assert_eq!(stats["verified"], true, "hop {hop}: {stats}");
        if hop == 0 {
            assert!(
                stats["xbzrle"]["pages"].as_u64().unwrap() > 0,
                "deltas were stored through the mapping: {stats}"
            );
            eprintln!("hop 0: xbzrle {}", stats["xbzrle"]);
        }
        if hop == 1 {
            // Leaving huge pages: the huge pages the guest never touched
            // (about half of its 128 MiB) are skipped unread, not read and
            // found zero; `verify` above checks that nothing else was.
            let zero = stats["pages"]["zero"].as_u64().unwrap();
            assert!(zero < 4096, "{zero} zero pages read: {stats}");
        }
        if hop == 2 {
            assert_eq!(stats["streams"], 2, "{stats}");
        }
        let status = dst.request(json!({"cmd": "status"}));
        assert_eq!(status["ok"], true, "{status}");
        src = src.hand_over(dst, &console, before);
        if hop == 0 {
            // The VM on huge pages moves to a new process on the same
            // memory (`--takeover`), which learns from the old one which
            // huge pages hold data: hop 1 still skips the others.
            src = take_over(&dir, src, &console);
        }
    }
    // Saved from huge pages, in the pause (a background save write-protects
    // 4 KiB at a time, which huge pages do not take: asked for, it is
    // refused), and restored onto huge pages again: the guest's checks of
    // its pages hold, and it carries on.
    let snap = dir.join("huge.snap");
    let r = src.request(json!({"cmd": "snapshot", "path": snap, "background": true}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("huge pages"), "{r}");
    assert!(!snap.exists());
    let r = src.request(json!({"cmd": "snapshot", "path": snap}));
    assert_eq!(
        (&r["ok"], &r["background"]),
        (&json!(true), &json!(false)),
        "{r}"
    );
    let n = console.last_heartbeat().unwrap_or(0);
    assert_eq!(src.terminate(), 0);
    let restored = VmProcess::start(
        &dir,
        "restored",
        &console,
        &["--restore", snap.to_str().unwrap(), HUGE, "--paused"],
    );
    // Restored paused, it leaves its huge pages again before the guest has
    // touched any: the pages the restore wrote are data, though it wrote
    // them through a mapping of its own (were they skipped, the guest would
    // find its pages gone).
    let (dst, addr) = destination(&dir, "from-restored", &console, false);
    let r = restored.request(json!({"cmd": "migrate", "to": addr, "name": "vm1"}));
    assert_eq!(r["ok"], true, "{r}");
    let stats = restored.wait_migration();
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(restored.terminate(), 0);
    let r = dst.request(json!({"cmd": "resume"}));
    assert_eq!(r["ok"], true, "{r}");
    console.wait_heartbeats(n, 3, Duration::from_secs(30));
    console.assert_clean();
    assert_eq!(dst.terminate(), 0);
}

#[test]
fn post_copy_hybrid_and_auto_move_a_vm_onto_huge_pages() {
    if !kvm_and_pool_or_skip("post_copy_hybrid_and_auto_move_a_vm_onto_huge_pages") {
        return;
    }
    // A guest rewriting 64 MiB flat out: it faults on pages still missing,
    // and hybrid leaves its hot pages to post-copy, which places them in
    // huge pages that also hold pre-copy's pages. Every other hop goes back
    // to 4 KiB pages, so that one huge-page VM lives at a time.
    let dir = scratch("hugepages-postcopy");
    let mut src = VmProcess::boot_with(&dir, "src", "workload=dirty:64:0", "128M", 1, &[]);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    // Hybrid and auto arrive on huge pages allocated up front (`--prefault`):
    // the hop after each still sends only the pages with data.
    let prefault: &[&str] = &[HUGE, "--prefault"];
    let hops = [
        ("postcopy", &[HUGE][..]),
        ("precopy", &[]),
        ("hybrid", prefault),
        ("precopy", &[]),
        ("auto", prefault),
    ];
    for (hop, (mode, flags)) in hops.into_iter().enumerate() {
        let huge = !flags.is_empty();
        let (dst, addr) = destination_with(&dir, &format!("hop{hop}"), &console, flags);
        let before = console.last_heartbeat().unwrap_or(0);
        let r = src.request(json!({
            "cmd": "migrate", "to": addr, "name": "vm1", "mode": mode,
            "job": format!("hop{hop}"),
        }));
        assert_eq!(r["ok"], true, "{r}");
        let stats = src.wait_migration();
        assert_eq!(stats["status"], "completed", "hop {hop} ({mode}): {stats}");
        // Auto may finish in pre-copy where the guest, slowed by a busy
        // host, writes little; post-copy and hybrid always end in post-copy.
        if huge && mode != "auto" {
            assert!(
                stats["pages"]["expected"].as_u64().unwrap() > 0,
                "hop {hop}: pages came by post-copy: {stats}"
            );
        }
        if mode == "precopy" {
            // From huge pages (prefaulted for hop 3): only those the guest
            // wrote are read, not the ~16,000 zero pages of the rest.
            let zero = stats["pages"]["zero"].as_u64().unwrap();
            assert!(zero < 4096, "hop {hop}: {zero} zero pages read: {stats}");
        }
        eprintln!(
            "hop {hop} ({mode}, huge {huge}): total {} ms, downtime {} ms, faults {}, pages {}",
            stats["total_ms"], stats["downtime_ms"], stats["faults"]["count"], stats["pages"]
        );
        src = src.hand_over(dst, &console, before);
    }
    src.request(json!({"cmd": "stop"}));
    assert_eq!(src.wait(Duration::from_secs(20)), 0);
    console.assert_clean();
}

#[test]
fn post_copy_onto_huge_pages_recovers_from_a_cut_link() {
    if !kvm_and_pool_or_skip("post_copy_onto_huge_pages_recovers_from_a_cut_link") {
        return;
    }
    // A slow push and a slowly swept working set keep the phase going while
    // the links are cut. The source then re-sends what the destination's
    // received-bitmap lacks, and huge pages are mapped only once whole: a
    // page missed, or booked without its bytes, is garbage the guest finds.
    // (A read cut in the middle of a run is the unit test
    // `staged_reads_skip_duplicates_and_give_back_on_failure`.)
    let dir = scratch("hugepages-cut");
    let src = VmProcess::boot_with(&dir, "src", "workload=dirty:48:6", "128M", 1, &[]);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    let (dst, addr) = destination(&dir, "dst", &console, true);
    let before = console.last_heartbeat().unwrap_or(0);
    let r = src.request(json!({
        "cmd": "migrate", "to": addr, "name": "vm1", "mode": "postcopy",
        "max_bandwidth": 4 << 20, "prepaging_window": 4,
    }));
    assert_eq!(r["ok"], true, "{r}");
    src.wait_until("post-copy", |r| r["status"] == "postcopy-active");
    src.cut_links();
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(stats["recoveries"], 1, "{stats}");
    let mut src = src.hand_over(dst, &console, before);
    src.request(json!({"cmd": "stop"}));
    assert_eq!(src.wait(Duration::from_secs(20)), 0);
    console.assert_clean();
}

#[test]
fn lazy_restore_onto_huge_pages_is_refused() {
    let (code, err) = migd_output(&["run", "--restore", "/nonexistent", "--lazy", HUGE]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("--lazy") && err.contains("huge pages"),
        "{err}"
    );
}

#[test]
fn a_daemon_on_huge_pages_takes_a_vm_and_refuses_one_its_pool_cannot_hold() {
    if !kvm_and_pool_or_skip(
        "a_daemon_on_huge_pages_takes_a_vm_and_refuses_one_its_pool_cannot_hold",
    ) {
        return;
    }
    use common::daemon::{Daemon, Reaper};
    let dir = scratch("hugepages-daemon");
    let a = Daemon::start(&dir, "a");
    let b = Daemon::start_flags(&dir, "b", free_port(), &["--insecure", HUGE]);
    let _ra = Reaper(a.state.clone());
    let _rb = Reaper(b.state.clone());
    let console = a.create_guest("h1", "workload=dirty:16:8", "128M", 1);
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    let to = format!("127.0.0.1:{}", b.port);
    let n = console.wait_heartbeats(0, 1, Duration::from_secs(20));
    let out = a.ok(&["migrate", "h1", "--to", &to, "--mode", "postcopy"]);
    assert!(out.contains("completed"), "{out}");
    b.wait_state("h1", "running", Duration::from_secs(10));
    let info = b.ok(&["info", "h1"]);
    assert!(info.contains("huge pages (2 MiB)"), "{info}");
    let moved = Console(b.vm_dir("h1").join("console.log"));
    moved.wait_heartbeats(n, 2, Duration::from_secs(30));
    moved.assert_clean();
    // A VM larger than the whole pool is refused at the handshake, the pool
    // named, whatever memory the host has besides (larger than the whole
    // pool, not only than what is free now: a test beside this one may
    // free huge pages meanwhile).
    let pool_mib = meminfo("HugePages_Total:") * 2;
    let big = format!("{}M", pool_mib + 64);
    let console_big = a.create_guest("big", "workload=idle", &big, 1);
    console_big.wait_for("WORKLOAD READY", Duration::from_secs(60));
    let e = a.fails(&["migrate", "big", "--to", &to]);
    assert!(
        e.contains("not enough memory") && e.contains("huge page pool"),
        "{e}"
    );
    a.wait_state("big", "running", Duration::from_secs(10));
    // A lazy restore cannot fill huge pages page by page: refused by the
    // daemon, which names what to do (the VM process named a flag the
    // operator never gave).
    let e = b.fails(&["restore", "h2", "/nonexistent.snap", "--lazy"]);
    assert!(e.contains("restore without --lazy"), "{e}");
    b.ok(&["destroy", "h1"]);
}

#[test]
fn a_pool_too_small_for_the_guest_is_named() {
    if !kvm_or_skip("a_pool_too_small_for_the_guest_is_named") {
        return;
    }
    // More than the whole pool: refused before boot, whatever a test
    // beside this one frees meanwhile.
    let mib = (meminfo("HugePages_Total:") * 2 + 64).to_string() + "M";
    let elf = guest_elf();
    let (code, err) = migd_output(&[
        "run",
        "--kernel",
        elf.to_str().unwrap(),
        "--memory",
        &mib,
        HUGE,
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("cannot reserve") && err.contains("vm.nr_hugepages"),
        "{err}"
    );
}
