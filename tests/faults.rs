//! The fault-injection matrix (docs/reliability.md): for each phase of a
//! migration between two `migd run` processes over loopback, each fault —
//! connection drop, destination VM process killed (SIGKILL), `cancel` on the
//! source, a stalled destination (SIGSTOP) — must end in a completed
//! migration, or in a failed/cancelled one with the source VM running and
//! intact; after the commit (Go) the documented post-copy outcomes hold. The
//! source is held at each phase by the test-only `fault_hold` of the migrate
//! request (crates/migration/src/faults.rs). Every cell prints a `cell` line:
//!
//! ```sh
//! cargo test -p migd --test faults -- --test-threads=2 2>&1 | grep '^cell '
//! ```

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const WORKLOAD: &str = "workload=dirty:32:8";
/// How long the source is held at the phase (a cancel ends it early).
const HOLD_MS: u64 = 3000;
/// Before Go, how long the source waits for an answer (60 s outside tests).
const ANSWER_MS: u64 = 5000;
/// How long a stalled destination stays stopped after the commit.
const STALL: Duration = Duration::from_secs(8);

const PRE_GO: [&str; 4] = ["handshake", "round0", "round1", "switch"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    Drop,
    Kill,
    Cancel,
    Stall,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Drop => "drop",
            Fault::Kill => "kill",
            Fault::Cancel => "cancel",
            Fault::Stall => "stall",
        }
    }
}

/// A source VM (256 MiB, one vCPU, 32 MiB rewritten at 8 MiB/s), heartbeating.
fn source(dir: &Path, tag: &str) -> VmProcess {
    let src = VmProcess::boot(dir, tag, WORKLOAD, "256M", 1);
    src.console
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    src.console.wait_heartbeats(0, 1, Duration::from_secs(30));
    src
}

/// A fresh `--incoming` destination (sharing the console) and the migration to it.
fn start(src: &VmProcess, dir: &Path, tag: &str, mut req: Value) -> VmProcess {
    let port = free_port();
    let dst = VmProcess::incoming(dir, tag, &src.console, port, "256M", 1);
    req["cmd"] = json!("migrate");
    req["to"] = json!(format!("127.0.0.1:{port}"));
    req["name"] = json!("vm1");
    req["job"] = json!(tag);
    let r = src.request(req);
    assert_eq!(r["ok"], true, "{tag}: {r}");
    dst
}

fn wait_held(src: &VmProcess, phase: &str) {
    let r = src.wait_until(&format!("held at {phase}"), |r| {
        r["held"] == phase
            || matches!(
                r["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
    });
    assert_eq!(r["held"], phase, "the migration ended before the hold: {r}");
}

/// Strikes; for a cancel, returns the source's answer.
fn strike(fault: Fault, src: &VmProcess, dst: &VmProcess) -> Value {
    match fault {
        Fault::Drop => {
            let r = src.request(json!({"cmd": "inject", "fault": "drop-links"}));
            assert!(r["cut"].as_u64().unwrap_or(0) > 0, "nothing to cut: {r}");
            r
        }
        Fault::Kill => {
            dst.signal(Signal::SIGKILL);
            Value::Null
        }
        Fault::Cancel => src.request(json!({"cmd": "cancel"})),
        Fault::Stall => {
            dst.signal(Signal::SIGSTOP);
            Value::Null
        }
    }
}

/// The source VM runs on, intact: running, heartbeats go on, no corruption.
fn assert_source_runs(src: &VmProcess, cell: &str) {
    let st = src.request(json!({"cmd": "status"}));
    assert_eq!(st["state"], "running", "{cell}: {st}");
    src.console.assert_runs_on(2, Duration::from_secs(30));
}

fn report(phase: &str, fault: Fault, outcome: &str, source: &str, ms: u128, r: &Value) {
    eprintln!(
        "cell {phase} {} {outcome} source={source} strike_to_end_ms={ms} error={}",
        fault.name(),
        r["error"].as_str().unwrap_or("-")
    );
}

/// Before Go, on one source VM: every phase ends failed (cancelled for a
/// cancel) and the source runs on.
fn pre_go(fault: Fault) {
    let dir = scratch(&format!("faults-{}", fault.name()));
    let src = source(&dir, "src");
    for phase in PRE_GO {
        let cell = format!("{phase}-{}", fault.name());
        let mut req = json!({
            "mode": "precopy",
            "fault_hold": format!("{phase}:{HOLD_MS}"),
            "answer_timeout_ms": ANSWER_MS,
        });
        if phase == "round1" {
            // Round 0 alone would meet any downtime target above zero.
            req["max_downtime_ms"] = json!(0);
        }
        let dst = start(&src, &dir, &cell, req);
        wait_held(&src, phase);
        let t = Instant::now();
        let answer = strike(fault, &src, &dst);
        if fault == Fault::Cancel {
            assert_eq!(answer["ok"], true, "{cell}: {answer}");
        }
        let r = src.wait_migration();
        let ms = t.elapsed().as_millis();
        if fault == Fault::Stall {
            dst.signal(Signal::SIGCONT);
        }
        let want = if fault == Fault::Cancel {
            "cancelled"
        } else {
            "failed"
        };
        assert_eq!(r["status"], want, "{cell}: {r}");
        if fault == Fault::Stall {
            let e = r["error"].as_str().unwrap_or("");
            assert!(
                e.contains("stopped reading") || e.contains("did not answer"),
                "{cell}: {r}"
            );
        }
        assert!(r["downtime_phases"].is_null(), "{cell}: no commit: {r}");
        assert_source_runs(&src, &cell);
        report(phase, fault, want, "running", ms, &r);
    }
    assert_eq!(src.terminate(), 0);
}

/// After Go (post-copy), each cell on a source of its own.
fn post_go(fault: Fault, phase: &str) {
    let cell = format!("{phase}-{}", fault.name());
    let dir = scratch(&format!("faults-{cell}"));
    let src = source(&dir, "src");
    let mut req = json!({"mode": "postcopy", "fault_hold": format!("{phase}:{HOLD_MS}")});
    if phase == "recovery" {
        // Long enough a post-copy phase to cut its links first.
        req["max_bandwidth"] = json!(8 << 20);
    }
    let mut dst = start(&src, &dir, &cell, req);
    if phase == "recovery" {
        src.wait_until("post-copy", |r| r["status"] == "postcopy-active");
        src.cut_links();
    }
    wait_held(&src, phase);
    let t = Instant::now();
    let answer = strike(fault, &src, &dst);
    if fault == Fault::Stall {
        std::thread::sleep(STALL);
        dst.signal(Signal::SIGCONT);
    }
    if phase == "recovery" {
        src.request(json!({"cmd": "bandwidth"}));
    }
    let lost = fault == Fault::Kill || (fault == Fault::Cancel && phase == "recovery");
    if !lost {
        if fault == Fault::Cancel {
            // After the commit the destination runs the VM: cancel is refused.
            assert_eq!(answer["ok"], false, "{cell}: {answer}");
            assert!(
                answer["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("cannot be cancelled")),
                "{cell}: {answer}"
            );
        }
        let r = src.wait_migration();
        let ms = t.elapsed().as_millis();
        assert_eq!(r["status"], "completed", "{cell}: {r}");
        assert_eq!(src.request(json!({"cmd": "status"}))["state"], "migrated");
        assert_eq!(dst.request(json!({"cmd": "status"}))["state"], "running");
        src.console.assert_runs_on(2, Duration::from_secs(30));
        let outcome = format!("completed(recoveries={})", r["recoveries"]);
        report(phase, fault, &outcome, "migrated", ms, &r);
        assert_eq!(dst.terminate(), 0);
        return;
    }
    if fault == Fault::Kill {
        // The destination's half is gone: the source cannot reconnect and,
        // as designed, does not give up by itself; the operator cancels.
        dst.wait(Duration::from_secs(10));
        src.wait_until("reconnection refused", |r| {
            r["status"] == "postcopy-paused"
                && r["held"].is_null()
                && r["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("attempt") && e.contains("refused"))
        });
        let c = src.request(json!({"cmd": "cancel"}));
        assert_eq!(c["ok"], true, "{cell}: {c}");
    } else {
        assert_eq!(answer["ok"], true, "{cell}: {answer}");
    }
    let r = src.wait_migration();
    let ms = t.elapsed().as_millis();
    assert_eq!(r["status"], "failed", "{cell}: {r}");
    // The job says what each host holds: a killed destination holds nothing.
    let says = if fault == Fault::Kill {
        "refuses reconnection"
    } else {
        "holds the VM's vCPU and device state"
    };
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains(says)),
        "{cell}: {r}"
    );
    // By design the source keeps its copy paused, as unconfirmed: the
    // destination ran the VM.
    let st = src.request(json!({"cmd": "status"}));
    assert_eq!(st["state"], "unconfirmed", "{cell}: {st}");
    src.console.assert_clean();
    if fault == Fault::Cancel {
        // The destination keeps its half, waiting for a recovery.
        assert!(dst.child.try_wait().unwrap().is_none(), "{cell}");
    }
    report(phase, fault, "failed", "unconfirmed", ms, &r);
}

fn matrix(fault: Fault, test: &str) {
    if !kvm_or_skip(test) {
        return;
    }
    pre_go(fault);
    post_go(fault, "postcopy");
    post_go(fault, "recovery");
}

#[test]
fn connection_drop_in_every_phase() {
    matrix(Fault::Drop, "connection_drop_in_every_phase");
}

#[test]
fn destination_killed_in_every_phase() {
    matrix(Fault::Kill, "destination_killed_in_every_phase");
}

#[test]
fn cancel_in_every_phase() {
    matrix(Fault::Cancel, "cancel_in_every_phase");
}

#[test]
fn stalled_destination_in_every_phase() {
    matrix(Fault::Stall, "stalled_destination_in_every_phase");
}

/// A stop for a destination whose VM has not arrived: one still waiting for
/// its source exits at once (0), on SIGTERM or `stop`, its control socket
/// gone; one receiving the VM gives it up (1), and the source keeps the VM
/// running.
#[test]
fn destination_stopped_before_the_vm_arrives() {
    if !kvm_or_skip("destination_stopped_before_the_vm_arrives") {
        return;
    }
    let dir = scratch("faults-term");
    let console = Console(dir.join("waiting.console"));
    for (tag, stop) in [("term", None), ("stop", Some(json!({"cmd": "stop"})))] {
        let mut waiting = VmProcess::incoming(&dir, tag, &console, free_port(), "64M", 1);
        match stop {
            Some(req) => assert_eq!(waiting.request(req)["ok"], true),
            None => waiting.signal(Signal::SIGTERM),
        }
        assert_eq!(waiting.wait(Duration::from_secs(10)), 0, "{tag}");
        assert!(!waiting.control.exists(), "{tag}: control socket left");
    }

    let src = source(&dir, "src");
    let req = json!({
        "mode": "precopy",
        "fault_hold": format!("round1:{HOLD_MS}"),
        "answer_timeout_ms": ANSWER_MS,
        "max_downtime_ms": 0,
    });
    let mut dst = start(&src, &dir, "receiving", req);
    wait_held(&src, "round1");
    dst.signal(Signal::SIGTERM);
    assert_eq!(dst.wait(Duration::from_secs(10)), 1);
    let r = src.wait_migration();
    assert_eq!(r["status"], "failed", "{r}");
    // The source is told why, not only that its sends broke.
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the destination gave up the incoming VM: SIGTERM"),
        "{r}"
    );
    assert_source_runs(&src, "receiving-term");
    assert_eq!(src.terminate(), 0);
}
