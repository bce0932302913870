//! Multifd: pre-copy page data spread over several TCP streams (`streams`),
//! between two `migd run` processes with the test guest checking itself:
//! plaintext with 4 streams (with and without XBZRLE), TLS with 2, bad
//! counts refused, and links cut mid-round leaving the source running.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Migrates `src`'s VM to a new `--incoming` process with `extra` in the
/// request and `flags` on both; checks the run and returns the destination.
fn hop(dir: &Path, src: &VmProcess, tag: &str, flags: &[&str], extra: Value) -> (VmProcess, Value) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dst = VmProcess::incoming_with(dir, tag, &src.console, (port, "256M", 2), flags);
    let before = src.console.last_heartbeat().unwrap_or(0);
    let mut req = json!({
        "cmd": "migrate", "to": addr, "name": "vm1", "verify": true, "job": tag,
    });
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    let r = src.request(req);
    assert_eq!(r["ok"], true, "{r}");
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "completed", "{tag}: {stats}");
    eprintln!(
        "{tag}: {} streams, {} rounds ({}), {} pages, {} bytes, xbzrle {}",
        stats["streams"],
        stats["rounds"].as_array().map_or(0, Vec::len),
        stats["stop_reason"],
        stats["pages"]["sent"],
        stats["bytes"],
        stats["xbzrle"]
    );
    if stats["mode"] == "precopy" {
        assert_eq!(stats["verified"], true, "memory digests compared: {stats}");
    }
    assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "running");
    src.console
        .wait_heartbeats(before, 3, Duration::from_secs(30));
    src.console.assert_clean();
    (dst, stats)
}

/// The destination's log says how many page streams it opened.
fn dst_opened(dir: &Path, tag: &str, n: u32) {
    let raw = std::fs::read_to_string(dir.join(format!("{tag}.log"))).unwrap();
    // Without the colour escapes.
    let mut log = String::new();
    let mut esc = false;
    for c in raw.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (false, c) => log.push(c),
            (true, 'm') => esc = false,
            (true, _) => {}
        }
    }
    assert!(
        log.lines()
            .any(|l| l.contains("page streams open") && l.contains(&format!("streams={n}"))),
        "{tag} opened no {n} page streams:\n{log}"
    );
}

fn stop(mut vm: VmProcess) {
    vm.request(json!({"cmd": "stop"}));
    assert_eq!(vm.wait(Duration::from_secs(20)), 0);
}

#[test]
fn four_streams_with_and_without_xbzrle() {
    if !kvm_or_skip("four_streams_with_and_without_xbzrle") {
        return;
    }
    let dir = scratch("multifd");
    let src = VmProcess::boot(&dir, "src", "workload=dirty:64:0", "256M", 2);
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    src.console.wait_heartbeats(0, 2, Duration::from_secs(30));
    let (b, stats) = hop(&dir, &src, "b", &[], json!({"streams": 4}));
    assert_eq!(stats["streams"], 4, "{stats}");
    assert!(
        stats["pages"]["sent"].as_u64().unwrap() >= (64 << 20) / 4096,
        "every stream's pages are counted: {stats}"
    );
    // The bytes on the wire are at least the pages' data, summed over streams.
    assert!(
        stats["bytes"].as_u64().unwrap() >= stats["pages"]["sent"].as_u64().unwrap() * 4096,
        "{stats}"
    );
    dst_opened(&dir, "b", 4);
    stop(src);

    // Back, with each stream's share of an XBZRLE cache.
    let (c, stats) = hop(
        &dir,
        &b,
        "c",
        &[],
        json!({"streams": 4, "xbzrle_cache": 128 << 20}),
    );
    assert_eq!(stats["streams"], 4, "{stats}");
    // Each stream has a quarter of the cache: 8192 pages, twice its share
    // of the working set, so the pages re-sent go as deltas.
    let x = &stats["xbzrle"];
    assert_eq!(x["cache_size"], 128 << 20, "{stats}");
    if stats["rounds"].as_array().unwrap().len() > 1 {
        // Re-sent pages were all in their stream's cache (whole-page rewrites
        // of the dirty workload mostly overflow into full pages).
        assert_eq!(x["cache_miss"], 0, "{stats}");
        assert!(
            x["pages"].as_u64().unwrap() + x["overflow"].as_u64().unwrap() > 0,
            "{stats}"
        );
    }
    dst_opened(&dir, "c", 4);
    stop(b);

    // Hybrid: the rounds on 2 streams, then post-copy on the main connection.
    let (d, stats) = hop(
        &dir,
        &c,
        "d",
        &[],
        json!({"streams": 2, "mode": "hybrid", "postcopy_after_rounds": 1}),
    );
    assert_eq!(stats["streams"], 2, "{stats}");
    assert_eq!(stats["mode"], "hybrid", "{stats}");
    dst_opened(&dir, "d", 2);
    stop(c);
    assert_eq!(d.terminate(), 0);
}

#[test]
fn two_streams_over_tls() {
    if !kvm_or_skip("two_streams_over_tls") {
        return;
    }
    let dir = scratch("multifd-tls");
    let certs = dir.join("certs");
    make_certs(&certs, &["host-a=127.0.0.1", "host-b=127.0.0.1"]);
    let a = tls_flags(&certs, "host-a", &["host-b"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let b = tls_flags(&certs, "host-b", &["host-a"]);
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    let src = VmProcess::boot_with(&dir, "src", "workload=dirty:32:0", "256M", 2, &a);
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    let (dst, stats) = hop(&dir, &src, "dst", &b, json!({"streams": 2}));
    assert_eq!(stats["streams"], 2, "{stats}");
    dst_opened(&dir, "dst", 2);
    stop(src);
    assert_eq!(dst.terminate(), 0);
}

#[test]
fn bad_counts_refused_and_cut_links_leave_the_source_running() {
    if !kvm_or_skip("bad_counts_refused_and_cut_links_leave_the_source_running") {
        return;
    }
    let dir = scratch("multifd-cut");
    let src = VmProcess::boot(&dir, "src", "workload=dirty:64:32", "256M", 2);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    let port = free_port();
    for bad in [json!(0), json!(17), json!("4")] {
        let r = src.request(json!({
            "cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1", "streams": bad
        }));
        assert_eq!(r["ok"], false, "{bad}: {r}");
        assert!(
            r["error"].as_str().unwrap().contains("between 1 and 16"),
            "{bad}: {r}"
        );
    }
    let r =
        src.request(json!({"cmd": "migrate", "to": "127.0.0.1:1", "name": "vm1", "streams": 0}));
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("streams must be between 1 and 16, got 0"),
        "{r}"
    );
    // Numbers that are not whole numbers never pass for "none" (no cap, the
    // default pause): refused, naming the key.
    for key in [
        "max_bandwidth",
        "max_downtime_ms",
        "xbzrle_cache",
        "prepaging_window",
    ] {
        for bad in [json!("50M"), json!(-1), json!(1.5)] {
            let r = src.request(json!({
                "cmd": "migrate", "to": "127.0.0.1:1", "name": "vm1", key: bad
            }));
            let e = r["error"].as_str().unwrap_or_default();
            assert!(
                e.contains(key) && e.contains("whole number"),
                "{key}={bad}: {r}"
            );
        }
    }
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "running");
    // A save while an estimate measures the dirty rate (both would take the
    // dirty log) is refused.
    let estimating = {
        let sock = src.control.clone();
        std::thread::spawn(move || control(&sock, json!({"cmd": "estimate", "to": "127.0.0.1:1"})))
    };
    std::thread::sleep(Duration::from_millis(300));
    let path = dir.join("never.snap");
    let r = src.request(json!({"cmd": "snapshot", "path": path}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("estimate"), "{r}");
    assert_eq!(
        estimating.join().unwrap()["ok"],
        false,
        "nothing listens there"
    );
    assert!(!path.exists());
    // A migration thread that panics (test-only fault) fails its job, and
    // the VM runs on, free to migrate again.
    let r = src.request(json!({
        "cmd": "migrate", "to": "127.0.0.1:1", "name": "vm1", "fault_panic": true
    }));
    assert_eq!(r["ok"], true, "{r}");
    let stats = src.wait_migration();
    assert_eq!(stats["status"], "failed", "{stats}");
    let e = stats["error"].as_str().unwrap_or_default();
    assert!(e.contains("internal error (panic"), "{stats}");
    assert_eq!(src.request(json!({"cmd": "status"}))["state"], "running");

    for (i, how) in ["drop-links", "cancel"].iter().enumerate() {
        let port = free_port();
        let dst_console = Console(dir.join(format!("dst{i}.console")));
        let mut dst = VmProcess::incoming(&dir, &format!("dst{i}"), &dst_console, port, "256M", 2);
        // 8 MiB/s in all: the 64 MiB working set takes seconds, so the cut lands mid-round.
        let r = src.request(json!({
            "cmd": "migrate", "to": format!("127.0.0.1:{port}"), "name": "vm1",
            "streams": 4, "max_bandwidth": 8 << 20
        }));
        assert_eq!(r["ok"], true, "{r}");
        std::thread::sleep(Duration::from_millis(1500));
        let st = src.request(json!({"cmd": "migration"}));
        assert_eq!(st["status"], "active", "{st}");
        assert_eq!(st["streams"], 4, "{st}");
        // The cap is a total: 1.5 s at 8 MiB/s is well under 24 MiB whatever the streams.
        assert!(st["bytes"].as_u64().unwrap() < 24 << 20, "{st}");
        // A cap that is not a number is refused, and the cap stays.
        let r = src.request(json!({"cmd": "bandwidth", "max_bandwidth": "50M"}));
        assert_eq!(r["ok"], false, "{r}");
        if *how == "drop-links" {
            let r = src.request(json!({"cmd": "inject", "fault": "drop-links"}));
            assert_eq!(r["cut"], 4, "the main connection and 3 page streams: {r}");
        } else {
            assert_eq!(src.request(json!({"cmd": "cancel"}))["ok"], true);
        }
        let stats = src.wait_migration();
        let want = if *how == "cancel" {
            "cancelled"
        } else {
            "failed"
        };
        assert_eq!(stats["status"], want, "{how}: {stats}");
        assert_ne!(
            dst.wait(Duration::from_secs(30)),
            0,
            "{how}: the destination gives up and removes its VM"
        );
        assert!(
            !dst_console.text().contains("HEARTBEAT"),
            "{how}: destination never ran"
        );
        assert_eq!(src.request(json!({"cmd": "status"}))["state"], "running");
        console.assert_runs_on(2, Duration::from_secs(20));
    }
}
