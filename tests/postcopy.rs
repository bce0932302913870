//! Post-copy and hybrid live migration between two `migd run` processes over
//! loopback TCP. Memory is not all there when the destination resumes, so there
//! is no digest to compare: the test guest checks every page it owns
//! continuously (a wrong or missing page prints CORRUPT), heartbeats must go on
//! on the destination, and the page counters must add up.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Boots a source with the dirtying workload, migrates it with `req` (mode and
/// options) to a fresh `--incoming` destination, checks the guest on the
/// destination, and returns the source's statistics.
fn migrate_once(tag: &str, cpus: usize, req: Value, during: impl FnOnce(&VmProcess)) -> Value {
    let dir = scratch(tag);
    let src = VmProcess::boot(&dir, "src", "workload=dirty:32:64", "256M", cpus);
    let console = src.console.clone();
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    console.wait_heartbeats(0, 2, Duration::from_secs(30));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dst = VmProcess::incoming(&dir, "dst", &console, port, "256M", cpus);
    let before = console.last_heartbeat().unwrap_or(0);
    let mut req = req;
    req["cmd"] = json!("migrate");
    req["to"] = json!(addr);
    req["name"] = json!("vm1");
    let r = src.request(req);
    assert_eq!(r["ok"], true, "{r}");
    during(&src);
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
    assert!(stats["downtime_ms"].as_f64().unwrap() > 0.0, "{stats}");
    src.request(json!({"cmd": "stop"}));
    console.wait_heartbeats(before, 3, Duration::from_secs(20));
    console.assert_clean();
    assert_eq!(dst.terminate(), 0);
    console.assert_clean();
    eprintln!(
        "{tag}: expected={expected} demand={demand} pushed={pushed} prepaged={prepaged} duplicate={} faults={} p50={}us p99={}us max={}us zero_faults={} resume_ms={:.1} downtime_ms={:.1} total_ms={:.1}",
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
    let stats = migrate_once("postcopy1", 1, json!({"mode": "postcopy"}), |_| {});
    assert_eq!(stats["mode"], "postcopy");
    assert!(stats["rounds"].as_array().unwrap().is_empty(), "{stats}");
    // The workload's 32 MiB are non-zero: they all travel after the switch.
    assert!(stats["pages"]["expected"].as_u64().unwrap() >= (32 << 20) / 4096);
    assert!(stats["faults"]["count"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["prepaging_window"], 16);
}

#[test]
fn postcopy_two_vcpus() {
    if !kvm_or_skip("postcopy_two_vcpus") {
        return;
    }
    let stats = migrate_once(
        "postcopy2",
        2,
        json!({"mode": "postcopy", "prepaging_window": 32}),
        |_| {},
    );
    assert!(stats["faults"]["count"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["prepaging_window"], 32);
}

#[test]
fn hybrid_two_vcpus() {
    if !kvm_or_skip("hybrid_two_vcpus") {
        return;
    }
    // A downtime target no round can meet: exactly `postcopy_after_rounds`
    // rounds run, so the destination holds stale copies of pages dirtied since
    // (they must fault again, not be read stale).
    let stats = migrate_once(
        "hybrid2",
        2,
        json!({"mode": "hybrid", "max_downtime_ms": 1, "postcopy_after_rounds": 3,
               "max_bandwidth": 48 << 20}),
        |_| {},
    );
    assert_eq!(stats["mode"], "hybrid");
    assert_eq!(stats["rounds"].as_array().unwrap().len(), 3, "{stats}");
    assert_eq!(stats["stop_reason"], "round limit", "{stats}");
    // Only what was dirty at the switch travels after it.
    assert!(
        stats["pages"]["expected"].as_u64().unwrap() < (32 << 20) / 4096 + 1024,
        "{stats}"
    );
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
        json!({"mode": "hybrid", "max_bandwidth": 32 << 20, "max_downtime_ms": 1,
               "postcopy_after_rounds": 1000}),
        |src| {
            std::thread::sleep(Duration::from_millis(300));
            let r = src.request(json!({"cmd": "postcopy"}));
            assert_eq!(r["ok"], true, "{r}");
        },
    );
    assert_eq!(stats["stop_reason"], "post-copy requested", "{stats}");
}

#[test]
fn postcopy_push_respects_the_bandwidth_cap() {
    if !kvm_or_skip("postcopy_push_respects_the_bandwidth_cap") {
        return;
    }
    let cap: u64 = 16 << 20;
    let stats = migrate_once(
        "postcopy-cap",
        1,
        json!({"mode": "postcopy", "max_bandwidth": cap}),
        |_| {},
    );
    let pushed = stats["pages"]["pushed"].as_u64().unwrap() * 4096;
    let secs = stats["resume_ms"].as_f64().unwrap() / 1e3;
    // With the push slowed down, faults and their pre-paging windows bring most
    // pages (demand answers are never held back). The push itself is paced: all
    // but its last batch (64 pages) went out no faster than the cap allows.
    assert!(pushed > 0, "the push moved pages: {stats}");
    let paced = pushed.saturating_sub(64 * 4096) as f64;
    assert!(
        secs >= paced / cap as f64 * 0.95,
        "pushed {pushed} bytes in {secs} s against a cap of {cap} B/s: {stats}"
    );
}
