//! `migctl evacuate`: every VM of this host to one destination, a few at a
//! time (the daemon shares its host-wide bandwidth cap among them), then one
//! line per VM, those it could not move included; exit 0 only if every VM
//! that runs here, or will, moved.
//!
//! A daemon that stops answering meanwhile (a restart: the jobs go on in
//! their VM processes, and the next daemon picks them up) is waited for, as
//! `migctl migrate` waits. The first Ctrl-C (or SIGTERM) stops starting
//! migrations and prints what is known, the jobs still running named and
//! left running.

use std::collections::{BTreeSet, VecDeque};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use migd::client::{Client, Error};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use serde_json::{json, Value};

use crate::commands::print_json;
use crate::format;

const POLL: Duration = Duration::from_millis(250);
// How long the daemon may not answer before evacuate gives up on what it
// still has to ask it (the VMs it has not started fail, and the jobs it
// polls are lost track of): `migctl migrate`'s wait.
use crate::migrate::LOST_AFTER;

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

// ---------------------------------------------------------------- the daemon

/// What became of a request.
enum Answer {
    /// Done: the daemon's reply.
    Done(Value),
    /// The daemon answered no.
    Refused(String),
    /// No answer, and the daemon has been silent for less than
    /// [`LOST_AFTER`]: ask again in a while.
    Wait(Error),
    /// No answer, and none for [`LOST_AFTER`].
    Lost(Error),
}

/// The daemon, and when it last answered.
struct Daemon<'a> {
    c: &'a mut Client,
    answered: Instant,
}

impl Daemon<'_> {
    fn call(&mut self, req: &Value) -> Answer {
        match self.c.call(req) {
            Ok(r) => {
                self.answered = Instant::now();
                Answer::Done(r)
            }
            Err(Error::Daemon(e)) => {
                self.answered = Instant::now();
                Answer::Refused(e)
            }
            Err(e) if self.answered.elapsed() < LOST_AFTER => Answer::Wait(e),
            Err(e) => Answer::Lost(e),
        }
    }
}

/// A VM waiting for its migration to be asked for.
struct Queued {
    vm: String,
    /// A `migrate` request for it got no answer, one the daemon may have
    /// acted on (it got the request, or may have): before asking again,
    /// evacuate looks for the job among the daemon's.
    asked: bool,
}

/// A VM whose job runs.
struct Running {
    vm: String,
    id: String,
    /// The job as last polled (null before).
    job: Value,
}

/// What asking for a VM's migration gave.
enum Started {
    Job(String),
    /// The VM's result line: it does not move.
    Failed(Value),
    /// No answer yet; `asked`: the request may have been acted on.
    Wait(Error, bool),
}

/// The hint for a VM whose `migrate` request may have started a job.
const MAY_HAVE_STARTED: &str = "its migration may have started all the same: see `migctl jobs`";

/// Asks for `q`'s migration with `req`, unless a job of it that started
/// since `since` (Unix seconds), and that evacuate does not know of
/// (`known`), shows its earlier request was acted on.
fn start(d: &mut Daemon, q: &Queued, req: &Value, since: u64, known: &BTreeSet<String>) -> Started {
    let lost = |e: Error, asked: bool| {
        let why = if asked {
            format!("{e}; {MAY_HAVE_STARTED}")
        } else {
            e.to_string()
        };
        Started::Failed(unmoved(&q.vm, &Value::Null, "failed", why))
    };
    if q.asked {
        match d.call(&json!({"cmd": "jobs"})) {
            Answer::Done(r) => {
                if let Some(id) = started_since(&r["jobs"], &q.vm, &req["to"], since, known) {
                    return Started::Job(id);
                }
            }
            // No list of jobs: ask again all the same; a daemon that is
            // still migrating the VM refuses, naming the job.
            Answer::Refused(_) => {}
            Answer::Wait(e) => return Started::Wait(e, true),
            Answer::Lost(e) => return lost(e, true),
        }
    }
    match d.call(req) {
        Answer::Done(r) => Started::Job(r["job"].as_str().unwrap_or_default().to_string()),
        Answer::Refused(e) => Started::Failed(unmoved(&q.vm, &Value::Null, "failed", e)),
        Answer::Wait(e) => {
            // One that never connected reached no daemon.
            let asked = q.asked || !matches!(e, Error::Connect { .. });
            Started::Wait(e, asked)
        }
        Answer::Lost(e) => {
            let asked = q.asked || !matches!(e, Error::Connect { .. });
            lost(e, asked)
        }
    }
}

/// The id of the newest of `jobs` (a `jobs` reply's) that migrates `vm` to
/// `to`, started at `since` or later, and is not in `known`.
fn started_since(
    jobs: &Value,
    vm: &str,
    to: &Value,
    since: u64,
    known: &BTreeSet<String>,
) -> Option<String> {
    jobs.as_array()?
        .iter()
        .filter(|j| j["vm"] == vm && j["to"] == *to)
        .filter(|j| j["started"].as_u64().is_some_and(|s| s >= since))
        .filter_map(|j| j["id"].as_str())
        .rfind(|id| !known.contains(*id))
        .map(str::to_string)
}

// ---------------------------------------------------------------- Ctrl-C

/// The signal that interrupted the evacuation (SIGINT or SIGTERM), or 0.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

/// The signals [`CatchInterrupts`] caught (a bit per signal number): an
/// ignored one is left ignored.
static CAUGHT: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    let _ = INTERRUPTED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    // A second one of either kind (Ctrl-C, then a unit's stop) ends migctl.
    let caught = CAUGHT.load(Ordering::SeqCst);
    for s in [libc::SIGINT, libc::SIGTERM] {
        if caught & (1 << s) != 0 {
            // SAFETY: signal() is async-signal-safe.
            unsafe { libc::signal(s, libc::SIG_DFL) };
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst) != 0
}

/// The exit status after an interruption, as a shell reports a command the
/// signal ended: 130 after Ctrl-C, 143 after SIGTERM.
fn interrupted_exit() -> ExitCode {
    let sig = INTERRUPTED.load(Ordering::SeqCst);
    ExitCode::from(128 + u8::try_from(sig).unwrap_or(2))
}

/// The first SIGINT (Ctrl-C) or SIGTERM (`kill`, a service manager's stop),
/// while this lives, sets [`INTERRUPTED`] instead of ending migctl: it
/// starts no more migrations, prints what it knows and leaves the started
/// ones running. The handler then resets both to their default, so that
/// a second such signal, of either kind, ends migctl at once (a daemon that does not reply
/// holds a request up to its timeout). A signal that was ignored (`nohup`,
/// a background job of a non-interactive shell) stays ignored.
struct CatchInterrupts(Vec<(Signal, SigAction)>);

impl CatchInterrupts {
    fn install() -> CatchInterrupts {
        let act = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESETHAND,
            SigSet::empty(),
        );
        let mut caught = Vec::new();
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only touches an atomic, which is
            // async-signal-safe.
            match unsafe { sigaction(sig, &act) } {
                Ok(old) if old.handler() == SigHandler::SigIgn => {
                    // SAFETY: restores the disposition just read.
                    let _ = unsafe { sigaction(sig, &old) };
                }
                Ok(old) => {
                    CAUGHT.fetch_or(1 << sig as i32, Ordering::SeqCst);
                    caught.push((sig, old));
                }
                Err(_) => {}
            }
        }
        CatchInterrupts(caught)
    }
}

impl Drop for CatchInterrupts {
    fn drop(&mut self) {
        CAUGHT.store(0, Ordering::SeqCst);
        for (sig, old) in self.0.drain(..) {
            // SAFETY: restores the disposition read at install.
            let _ = unsafe { sigaction(sig, &old) };
        }
    }
}

// ---------------------------------------------------------------- evacuate

pub fn run(
    c: &mut Client,
    to: &str,
    mode: &str,
    parallel: usize,
    max_downtime: u64,
    as_json: bool,
) -> Result<ExitCode> {
    let first = c.call(&json!({"cmd": "list"}))?;
    let _interrupts = CatchInterrupts::install();
    // Jobs of this evacuation start from now on (the daemon's clock is
    // this host's).
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut d = Daemon {
        c,
        answered: Instant::now(),
    };
    let mut queue: VecDeque<Queued> = VecDeque::new();
    // One line per VM: those that stay on this host unmoved are said so and
    // counted (the exit status then says the host is not empty).
    let mut done: Vec<Value> = Vec::new();
    for (vm, job, ev) in listed(&first) {
        match ev {
            Evacuation::Nothing => {}
            Evacuation::Move => queue.push_back(Queued { vm, asked: false }),
            Evacuation::Skip(why) => done.push(unmoved(&vm, &job, "skipped", why)),
        }
    }
    let total = queue.len() + done.len();
    let mut running: Vec<Running> = Vec::new();
    // The job ids of this evacuation.
    let mut known: BTreeSet<String> = BTreeSet::new();
    let progress = !as_json && std::io::stderr().is_terminal();
    // Why the daemon did not answer, this round.
    let mut silent: Option<Error>;
    loop {
        silent = None;
        while running.len() < parallel && silent.is_none() && !interrupted() {
            let Some(q) = queue.pop_front() else { break };
            let req = json!({"cmd": "migrate", "name": q.vm, "to": to, "mode": mode,
                             "max_downtime_ms": max_downtime, "detach": true});
            match start(&mut d, &q, &req, since, &known) {
                Started::Job(id) => {
                    known.insert(id.clone());
                    running.push(Running {
                        vm: q.vm,
                        id,
                        job: Value::Null,
                    });
                }
                Started::Failed(line) => done.push(line),
                Started::Wait(e, asked) => {
                    queue.push_front(Queued { vm: q.vm, asked });
                    silent = Some(e);
                }
            }
        }
        if interrupted() || running.is_empty() && queue.is_empty() {
            break;
        }
        std::thread::sleep(POLL);
        if interrupted() {
            break;
        }
        let mut still = Vec::new();
        for r in running {
            // The daemon did not answer this round: the others wait with it.
            if silent.is_some() {
                still.push(r);
                continue;
            }
            match d.call(&json!({"cmd": "job", "id": r.id})) {
                Answer::Done(reply) => {
                    let job = reply["job"].clone();
                    if format::is_final(job["status"].as_str().unwrap_or("")) {
                        done.push(summary(&r.vm, &job));
                    } else {
                        still.push(Running { job, ..r });
                    }
                }
                Answer::Refused(e) => {
                    let why = format!("lost track of job {}: {e}", r.id);
                    done.push(unmoved(&r.vm, &json!(r.id), "failed", why));
                }
                Answer::Wait(e) => {
                    silent = Some(e);
                    still.push(r);
                }
                Answer::Lost(e) => {
                    // Its job may still run: the line names it for `migctl job`.
                    let why = format!("lost track of job {}: {e}", r.id);
                    done.push(unmoved(&r.vm, &json!(r.id), "failed", why));
                }
            }
        }
        running = still;
        if progress {
            let waiting = silent
                .as_ref()
                .map(|e| format!("; migd does not answer ({e}), waiting"))
                .unwrap_or_default();
            eprint!(
                "\r\x1b[Kevacuating to {to}: {} of {total} done, {} running, {} waiting{waiting}",
                done.len(),
                running.len(),
                queue.len()
            );
        }
    }
    if progress {
        eprintln!();
    }
    if interrupted() {
        return Ok(stop(
            &mut d,
            done,
            running,
            queue,
            silent.is_none(),
            to,
            as_json,
        ));
    }
    // VMs that appeared meanwhile (created, started, arriving, or adopted
    // by a restarted daemon) run here too.
    let mut relisted = true;
    match list_again(&mut d) {
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
    } else if interrupted() {
        interrupted_exit()
    } else {
        ExitCode::FAILURE
    })
}

/// `list`, waiting for the daemon as the polls do.
fn list_again(d: &mut Daemon) -> Result<Value, String> {
    loop {
        match d.call(&json!({"cmd": "list"})) {
            Answer::Done(r) => return Ok(r),
            Answer::Refused(e) => return Err(e),
            Answer::Lost(e) => return Err(e.to_string()),
            Answer::Wait(_) if interrupted() => return Err("interrupted".into()),
            Answer::Wait(_) => std::thread::sleep(POLL),
        }
    }
}

/// After Ctrl-C: the VMs not started are skipped, the jobs still running
/// are left running (some may be past the point of no return: a post-copy
/// job's guest runs on the destination, its memory split between the hosts)
/// and named, with what to do about them; exit 130. `answering`: the daemon
/// answered last round, and is asked once more about each job.
fn stop(
    d: &mut Daemon,
    mut done: Vec<Value>,
    running: Vec<Running>,
    queue: VecDeque<Queued>,
    answering: bool,
    to: &str,
    as_json: bool,
) -> ExitCode {
    let mut left = Vec::new();
    for r in running {
        let mut job = r.job;
        if answering {
            if let Ok(reply) = d.c.call(&json!({"cmd": "job", "id": r.id})) {
                job = reply["job"].clone();
            }
        }
        if format::is_final(job["status"].as_str().unwrap_or("")) {
            done.push(summary(&r.vm, &job));
            continue;
        }
        let mut line = summary(&r.vm, &job);
        line["job"] = json!(r.id);
        line["outcome"] = json!("running");
        line["error"] = json!(format!(
            "left running ({}): `migctl job {id}` to watch it, `migctl cancel {id}` to stop it",
            job["status"].as_str().unwrap_or("starting"),
            id = r.id
        ));
        done.push(line);
        left.push(format!("{} ({})", r.id, r.vm));
    }
    for q in queue {
        let why = if q.asked {
            format!("not started: evacuate was interrupted; {MAY_HAVE_STARTED}")
        } else {
            "not started: evacuate was interrupted".to_string()
        };
        done.push(unmoved(&q.vm, &Value::Null, "skipped", why));
    }
    print(&done, to, as_json);
    if left.is_empty() {
        eprintln!("migctl: evacuate interrupted; no migration of it is left running");
    } else {
        let n = match left.len() {
            1 => "1 migration".to_string(),
            n => format!("{n} migrations"),
        };
        eprintln!(
            "migctl: evacuate interrupted; {n} left running, not cancelled (one past \
             post-copy's switch cannot go back): {}; `migctl job ID` to watch one, \
             `migctl cancel ID` to stop one",
            left.join(", ")
        );
    }
    interrupted_exit()
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

    #[test]
    fn a_job_started_since_is_found_by_vm_destination_and_time() {
        let job = |id: &str, vm: &str, to: &str, started: u64| json!({"id": id, "vm": vm, "to": to, "started": started});
        let jobs = json!([
            job("job1", "web1", "h:1", 90),
            job("job2", "web1", "h:2", 100),
            job("job3", "web2", "h:1", 100),
            job("job4", "web1", "h:1", 100),
            job("job5", "web1", "h:1", 101),
        ]);
        let to = json!("h:1");
        let mut known = BTreeSet::new();
        assert_eq!(
            started_since(&jobs, "web1", &to, 100, &known).as_deref(),
            Some("job5")
        );
        known.insert("job5".to_string());
        assert_eq!(
            started_since(&jobs, "web1", &to, 100, &known).as_deref(),
            Some("job4")
        );
        known.insert("job4".to_string());
        // job1 started before, job2 goes elsewhere, job3 moves another VM.
        assert_eq!(started_since(&jobs, "web1", &to, 100, &known), None);
        assert_eq!(started_since(&json!(null), "web1", &to, 0, &known), None);
    }
}
