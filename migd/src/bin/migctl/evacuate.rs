//! `migctl evacuate`: every VM of this host to one destination, a few at a
//! time (the daemon shares its host-wide bandwidth cap among them), then one
//! line per VM, those it could not move included; exit 0 only if every VM
//! that runs here, or will, moved.

use std::collections::{BTreeSet, VecDeque};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use migd::client::Client;
use serde_json::{json, Value};

use crate::commands::print_json;
use crate::format;

const POLL: Duration = Duration::from_millis(250);

/// A VM of `list`'s `adopting`.
const NOT_ANSWERING: &str = "its VM process does not answer yet (busy, or stopped)";

/// What evacuating a VM means.
#[derive(Debug, PartialEq)]
enum Evacuation {
    /// Nothing of it runs or will run here (stopped, gone, being destroyed).
    Nothing,
    /// It moves.
    Move,
    /// It stays here unmoved, for this reason (a host with such a VM is not
    /// empty: an unconfirmed VM may hold the only copy of its guest's memory).
    Skip(String),
}

/// What evacuating `vm` (a `list` entry) means.
fn evacuation(vm: &Value) -> Evacuation {
    let state = vm["state"].as_str().unwrap_or("unknown");
    if matches!(state, "stopped" | "migrated" | "destroying") {
        return Evacuation::Nothing;
    }
    if let Some(job) = vm["job"].as_str() {
        return Evacuation::Skip(format!("{state}, with migration job {job} under way"));
    }
    match state {
        "running" | "paused" => Evacuation::Move,
        "unconfirmed" => Evacuation::Skip(format!(
            "unconfirmed: {}",
            vm["unconfirmed"]
                .as_str()
                .unwrap_or("its last migration ended without the destination's word")
        )),
        other => Evacuation::Skip(format!("{other}: not movable now")),
    }
}

/// The VMs of a `list` reply, each with its job (if any) and what
/// evacuating it means: those of `vms`, then those of `adopting` (found at
/// the daemon's start, their processes silent so far: they run here, and
/// nothing can move them until they answer).
fn listed(reply: &Value) -> Vec<(String, Value, Evacuation)> {
    let mut out = Vec::new();
    for v in reply["vms"].as_array().into_iter().flatten() {
        if let Some(name) = v["name"].as_str() {
            out.push((name.to_string(), v["job"].clone(), evacuation(v)));
        }
    }
    for name in reply["adopting"].as_array().into_iter().flatten() {
        if let Some(name) = name.as_str() {
            out.push((
                name.to_string(),
                Value::Null,
                Evacuation::Skip(NOT_ANSWERING.into()),
            ));
        }
    }
    out
}

/// One VM's result.
fn summary(vm: &str, job: &Value) -> Value {
    let st = &job["stats"];
    json!({
        "vm": vm,
        "job": job["id"],
        "outcome": job["status"],
        "error": job["error"].as_str().or(st["error"].as_str()),
        "total_ms": st["total_ms"],
        "downtime_ms": st["downtime_ms"],
        "bytes": st["bytes"],
        "bandwidth_mbps": st["bandwidth_mbps"],
    })
}

/// A VM that did not move (and no job of it that evacuate knows of runs).
fn unmoved(vm: &str, job: &Value, outcome: &str, why: String) -> Value {
    json!({"vm": vm, "job": job, "outcome": outcome, "error": why})
}

pub fn run(
    c: &mut Client,
    to: &str,
    mode: &str,
    parallel: usize,
    max_downtime: u64,
    as_json: bool,
) -> Result<ExitCode> {
    let first = c.call(&json!({"cmd": "list"}))?;
    let mut queue: VecDeque<String> = VecDeque::new();
    // One line per VM: those that stay on this host unmoved are said so and
    // counted (the exit status then says the host is not empty).
    let mut done: Vec<Value> = Vec::new();
    for (vm, job, ev) in listed(&first) {
        match ev {
            Evacuation::Nothing => {}
            Evacuation::Move => queue.push_back(vm),
            Evacuation::Skip(why) => done.push(unmoved(&vm, &job, "skipped", why)),
        }
    }
    let total = queue.len() + done.len();
    let mut running: Vec<(String, String)> = Vec::new();
    let progress = !as_json && std::io::stderr().is_terminal();
    loop {
        while running.len() < parallel {
            let Some(vm) = queue.pop_front() else { break };
            let req = json!({"cmd": "migrate", "name": vm, "to": to, "mode": mode,
                             "max_downtime_ms": max_downtime, "detach": true});
            // A failed request (refused, or no reply in time) fails this VM
            // only; the client takes a fresh connection for the next.
            match c.call(&req) {
                Ok(r) => running.push((vm, r["job"].as_str().unwrap_or_default().to_string())),
                Err(e) => done.push(json!({"vm": vm, "outcome": "failed", "error": e.to_string()})),
            }
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(POLL);
        let mut still = Vec::new();
        for (vm, id) in running {
            let job = match c.call(&json!({"cmd": "job", "id": id})) {
                Ok(r) => r["job"].clone(),
                Err(e) => {
                    // Its job may still run: the line names it for `migctl job`.
                    let error = format!("lost track of job {id}: {e}");
                    done.push(json!({"vm": vm, "job": id, "outcome": "failed", "error": error}));
                    continue;
                }
            };
            if matches!(
                job["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                done.push(summary(&vm, &job));
            } else {
                still.push((vm, id));
            }
        }
        running = still;
        if progress {
            eprint!(
                "\revacuating to {to}: {} of {total} done, {} running, {} waiting   ",
                done.len(),
                running.len(),
                queue.len()
            );
        }
    }
    if progress {
        eprintln!();
    }
    // VMs that appeared meanwhile (created, started, arriving, or adopted
    // by a restarted daemon) run here too.
    let mut relisted = true;
    match c.call(&json!({"cmd": "list"})) {
        Ok(r) => {
            let named: BTreeSet<String> = done
                .iter()
                .filter_map(|l| l["vm"].as_str().map(str::to_string))
                .collect();
            for (vm, job, ev) in listed(&r) {
                let why = match ev {
                    _ if named.contains(&vm) => continue,
                    Evacuation::Nothing => continue,
                    Evacuation::Move => "running here: evacuate again to move it".to_string(),
                    Evacuation::Skip(why) => why,
                };
                let why = format!("appeared during the evacuation; {why}");
                done.push(unmoved(&vm, &job, "skipped", why));
            }
        }
        Err(e) => {
            eprintln!(
                "migctl: could not list this host's VMs again once the migrations ended ({e}): \
                 any VM created, started or arriving meanwhile is not accounted for"
            );
            relisted = false;
        }
    }
    let moved = print(&done, to, as_json);
    Ok(if moved == done.len() && relisted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints the lines (a table, or a JSON array); returns how many VMs moved.
fn print(done: &[Value], to: &str, as_json: bool) -> usize {
    let moved = done.iter().filter(|d| d["outcome"] == "completed").count();
    if as_json {
        print_json(&json!(done));
    } else if done.is_empty() {
        println!("no VM to evacuate");
    } else {
        println!(
            "{:<16} {:<8} {:<10} {:>9} {:>11} {:>10} {:>9}",
            "VM", "Job", "Outcome", "Total ms", "Downtime ms", "Sent", "Mbit/s"
        );
        for d in done {
            println!(
                "{:<16} {:<8} {:<10} {:>9.0} {:>11.1} {:>10} {:>9.0}{}",
                format::opt(&d["vm"]),
                format::opt(&d["job"]),
                format::opt(&d["outcome"]),
                d["total_ms"].as_f64().unwrap_or(0.0),
                d["downtime_ms"].as_f64().unwrap_or(0.0),
                format::bytes(d["bytes"].as_u64().unwrap_or(0)),
                d["bandwidth_mbps"].as_f64().unwrap_or(0.0),
                d["error"]
                    .as_str()
                    .map(|e| format!("  {e}"))
                    .unwrap_or_default()
            );
        }
        println!("{moved} of {} VMs moved to {to}", done.len());
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adopting_vm_is_listed_as_skipped() {
        let reply = json!({"ok": true,
            "vms": [{"name": "web1", "state": "running", "job": null},
                    {"name": "old", "state": "stopped", "job": null}],
            "adopting": ["db2"]});
        let l = listed(&reply);
        let names: Vec<&str> = l.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["web1", "old", "db2"]);
        assert_eq!(l[0].2, Evacuation::Move);
        assert_eq!(l[1].2, Evacuation::Nothing);
        assert_eq!(l[2].2, Evacuation::Skip(NOT_ANSWERING.into()));
        // A daemon without the field: none.
        assert_eq!(listed(&json!({"ok": true, "vms": []})).len(), 0);
    }
}
