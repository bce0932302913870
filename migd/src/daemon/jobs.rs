//! Migration jobs: one per outgoing migration, tracked by polling the VM process's
//! `migration` command, kept in memory and in `<state>/jobs/ID.json`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::Instrument;

use super::state::{self, st, write_json_atomic};
use super::vmproc::{self, vm_call, vm_request};
use super::Daemon;

/// Migration modes the VM process knows.
pub const MODES: [&str; 4] = ["precopy", "postcopy", "hybrid", "auto"];
/// Default `max_downtime_ms` (as QEMU's).
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;

const POLL: Duration = Duration::from_millis(200);

/// One migration job.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Job {
    pub id: String,
    pub vm: String,
    pub to: String,
    /// What the job was started with (flattened: the fields of `migrate`).
    #[serde(flatten)]
    pub opts: MigrateOptions,
    /// setup, active, postcopy-active, postcopy-paused, completed, failed or cancelled.
    pub status: String,
    /// Unix seconds.
    pub started: u64,
    pub ended: Option<u64>,
    pub error: Option<String>,
    /// The statistics object of the VM process's `migration` reply.
    pub stats: Value,
}

/// The options of a migration, as `migrate` takes them and a job keeps them.
/// A new option is a field here, a flag in migctl and a key the VM process
/// reads (migd/src/run.rs); the daemon passes them all on.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MigrateOptions {
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    /// Bandwidth cap, bytes/s (None: only the host-wide share, if any).
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// Post-copy: pages sent with each demanded one (the VM process's default if unset).
    #[serde(default)]
    pub prepaging_window: Option<u32>,
    /// Post-copy: fault requests share the main connection (for comparison).
    #[serde(default)]
    pub no_fault_channel: bool,
    /// Delta compression cache, bytes (None: off).
    #[serde(default)]
    pub xbzrle_cache: Option<u64>,
    /// TCP streams for pre-copy pages, 1..=16 (None: 1).
    #[serde(default)]
    pub streams: Option<u64>,
    /// Throttle the vCPUs while pre-copy does not converge.
    #[serde(default)]
    pub auto_converge: bool,
    /// Compression of page batches: none or zstd[:LEVEL] (None: none).
    #[serde(default)]
    pub compress: Option<String>,
    /// Dynamic page transfer reordering in the pre-copy rounds.
    #[serde(default)]
    pub reorder: bool,
    /// The rounds clear the dirty log at each read, not right before sending.
    #[serde(default)]
    pub no_clear_before_send: bool,
    /// Pre-copy fails rather than pause longer than max-downtime.
    #[serde(default)]
    pub strict_downtime: bool,
    /// Compare CRC32 digests of guest memory on both sides at the switch-over.
    #[serde(default)]
    pub verify: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        // The defaults of `migrate` with no options.
        serde_json::from_value(json!({}))
            .unwrap_or_else(|_| unreachable!("every field has a default"))
    }
}

impl MigrateOptions {
    /// The VM process's `migrate` request for job `id` to `to`, with the
    /// bandwidth cap `cap` (the job's own or its share of the host's) and the
    /// VM's `boot` spec for the destination's record.
    fn vm_request(
        &self,
        id: &str,
        to: &str,
        cap: Option<u64>,
        boot: Option<&wire::BootSpec>,
    ) -> Value {
        let mut req = serde_json::to_value(self).unwrap_or_else(|_| json!({}));
        req["cmd"] = json!("migrate");
        req["to"] = json!(to);
        req["job"] = json!(id);
        req["max_bandwidth"] = json!(cap);
        req["fault_channel"] = json!(!self.no_fault_channel);
        req["clear_before_send"] = json!(!self.no_clear_before_send);
        req["boot"] = json!(boot);
        req
    }
}

#[cfg(test)]
impl Job {
    /// A job `id` of VM `vm` to `h:1` with default options, started at 0,
    /// in `status`, not ended, without statistics (tests set the rest).
    pub fn for_tests(id: &str, vm: &str, status: &str) -> Job {
        Job {
            id: id.into(),
            vm: vm.into(),
            to: "h:1".into(),
            opts: MigrateOptions::default(),
            status: status.into(),
            started: 0,
            ended: None,
            error: None,
            stats: json!({}),
        }
    }
}

impl Job {
    pub fn is_final(&self) -> bool {
        is_final(&self.status)
    }
}

fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// What `migrate` asks for.
#[derive(Deserialize, Serialize, Debug)]
pub struct MigrateRequest {
    pub name: String,
    pub to: String,
    #[serde(flatten)]
    pub opts: MigrateOptions,
    #[serde(default)]
    pub detach: bool,
}

fn default_mode() -> String {
    "precopy".into()
}
fn default_downtime() -> u64 {
    DEFAULT_MAX_DOWNTIME_MS
}

/// Checks `HOST:PORT`.
fn check_target(to: &str) -> Result<()> {
    let ok = match to.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && port.parse::<u16>().is_ok_and(|p| p != 0)
                && !host.contains(char::is_whitespace)
        }
        None => false,
    };
    if !ok {
        bail!("'to' must be HOST:PORT, got '{}'", to.escape_debug());
    }
    Ok(())
}

/// Whether `to` reaches this daemon's own listener `listen`: the same port
/// at the address it listens on, or at any address of this host where it
/// listens on all of them. A name that does not resolve is left to the
/// migration to report.
async fn is_own_listener(listen: &str, to: &str) -> bool {
    let Ok(ours) = listen.parse::<std::net::SocketAddr>() else {
        return false;
    };
    let Ok(targets) = tokio::net::lookup_host(to).await else {
        return false;
    };
    let local = |ip: std::net::IpAddr| std::net::UdpSocket::bind((ip, 0)).is_ok();
    targets.into_iter().any(|t| {
        t.port() == ours.port()
            && (t.ip() == ours.ip() || ours.ip().is_unspecified() && local(t.ip()))
    })
}

/// Refuses unknown and absurd parameters before anything moves.
fn check_limits(req: &MigrateOptions) -> Result<()> {
    if !MODES.contains(&req.mode.as_str()) {
        bail!(
            "unknown mode '{}': use precopy, postcopy, hybrid or auto",
            req.mode.escape_debug()
        );
    }
    if let Some(c) = &req.compress {
        c.parse::<migration::compress::Compression>()?;
    }
    if let Some(n) = req.streams {
        migration::multifd::check_streams(n).map_err(anyhow::Error::msg)?;
    }
    if req.max_downtime_ms == 0 {
        bail!("max-downtime must be at least 1 ms: no migration can pause a VM for 0 ms");
    }
    if req.max_bandwidth == Some(0) {
        bail!("max-bandwidth must be positive (a cap of 0 would never finish); omit it for no cap");
    }
    if let Some(w) = req.prepaging_window {
        let most = migration::model::MAX_PREPAGING_WINDOW;
        if w > most {
            bail!("prepaging-window must be at most {most} pages, got {w}");
        }
    }
    if let Some(cache) = req.xbzrle_cache {
        if cache < 4096 {
            bail!("xbzrle-cache must hold at least one 4 KiB page, got {cache} bytes");
        }
        if let Some(total) = host_memory() {
            if cache >= total {
                bail!(
                    "xbzrle-cache of {} MiB is larger than this host's memory ({} MiB)",
                    cache >> 20,
                    total >> 20
                );
            }
        }
    }
    Ok(())
}

/// This host's memory in bytes (`MemTotal` of /proc/meminfo).
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}

/// Writes job `id` to its file as the registry has it now. Writers take
/// turns, and each reads the job only once it is its turn, so the file never
/// ends up older than the last change followed by a write (writers that each
/// wrote their own copy could land the older one last).
/// Taken by whoever writes or removes job files, one at a time.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Ended jobs kept, records and files: the most recently ended. Older ones
/// go as newer ones end, so that a daemon that runs for years keeps a
/// bounded history, in memory, on disk and in `jobs` replies (each took
/// 8-30 KiB of its memory, without end).
pub const KEPT_ENDED_JOBS: usize = 256;

/// Removes the ended jobs beyond the [`KEPT_ENDED_JOBS`] that ended last,
/// and their files. Never `ending` (the job that ends now: a clock set back
/// would make it look oldest, and a `migrate` waits for it), nor the
/// highest-numbered job, which keeps the numbering going after a restart.
/// Unfinished jobs always stay.
fn prune(d: &Daemon, ending: Option<&str>) {
    super::blocking(|| {
        let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<String> = {
            let mut reg = d.reg();
            let number = |id: &str| id.strip_prefix("job").and_then(|n| n.parse::<u64>().ok());
            let highest = reg.jobs.keys().filter_map(|id| number(id)).max();
            let ended_count = reg.jobs.values().filter(|j| j.is_final()).count();
            let Some(extra) = ended_count.checked_sub(KEPT_ENDED_JOBS) else {
                return;
            };
            let mut ended: Vec<(u64, Option<u64>, String)> = reg
                .jobs
                .values()
                .filter(|j| j.is_final() && Some(j.id.as_str()) != ending)
                .filter(|j| highest.is_none() || number(&j.id) != highest)
                .map(|j| (j.ended.unwrap_or(0), number(&j.id), j.id.clone()))
                .collect();
            ended.sort();
            let gone: Vec<String> = ended.into_iter().take(extra).map(|e| e.2).collect();
            for id in &gone {
                reg.jobs.remove(id);
            }
            gone
        };
        for id in &gone {
            let path = d.jobs_dir().join(format!("{id}.json"));
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", path.display());
                }
            }
        }
        if !gone.is_empty() {
            tracing::debug!(removed = gone.len(), "old jobs pruned");
        }
    })
}

fn persist(d: &Daemon, id: &str) {
    super::blocking(|| {
        let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        let Some(job) = d.reg().jobs.get(id).cloned() else {
            return;
        };
        let path = d.jobs_dir().join(format!("{id}.json"));
        if let Err(e) = write_json_atomic(&path, &job) {
            tracing::warn!("{e:#}");
        }
    })
}

/// Loads the jobs of earlier runs from `<state>/jobs`.
pub fn load(d: &Daemon) {
    let Ok(entries) = std::fs::read_dir(d.jobs_dir()) else {
        return;
    };
    let mut reg = d.reg();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&p).map(|b| serde_json::from_slice::<Job>(&b)) {
            Ok(Ok(job)) => {
                reserve_job_id(&mut reg, &job.id);
                reg.jobs.insert(job.id.clone(), job);
            }
            _ => tracing::warn!(path = %p.display(), "ignoring an unreadable job file"),
        }
    }
    drop(reg);
    prune(d, None);
}

/// At start: VM `vm` migrated away for good while no daemon watched (its
/// process noted the completed migration, `stats`, and exited): its job,
/// the one `stats` names or else the VM's unfinished one, ends `completed`.
pub fn completed_while_away(d: &Daemon, vm: &str, stats: &Value) {
    let job = {
        let mut reg = d.reg();
        let Some(id) = open_job(&reg, vm, stats["id"].as_str()) else {
            return;
        };
        let Some(j) = reg.jobs.get_mut(&id) else {
            return;
        };
        mark_completed(j, stats);
        j.id.clone()
    };
    persist(d, &job);
}

/// Ends `j` completed, with the statistics its VM process noted.
fn mark_completed(j: &mut Job, stats: &Value) {
    j.status = "completed".into();
    j.ended = Some(state::now());
    j.error = None;
    if stats.is_object() {
        j.stats = stats.clone();
    }
    j.stats["outcome"] = json!("completed");
}

/// VM `vm`'s process noted a completed migration, `stats`, as it exited,
/// while no tracker followed it (one that gave up on a process that did not
/// answer for minutes failed the job): the job it names, if it ended
/// otherwise, completed after all.
pub fn completed_after_all(d: &Daemon, vm: &str, stats: &Value) {
    let Some(id) = stats["id"].as_str() else {
        return;
    };
    {
        let mut reg = d.reg();
        let Some(j) = reg
            .jobs
            .get_mut(id)
            .filter(|j| j.vm == vm && j.is_final() && j.status != "completed")
        else {
            return;
        };
        tracing::warn!(job = %id, was = %j.status, "the migration completed after all");
        mark_completed(j, stats);
    }
    persist(d, id);
}

/// After re-attaching: jobs left unfinished by an earlier daemon whose VM no longer
/// reports them are marked failed; with `vm`, only that VM's (a VM adopted
/// in the background calls this once it is; until then its jobs wait).
pub fn finish_orphans(d: &Daemon, vm: Option<&str>) {
    let orphans: Vec<String> = {
        let mut reg = d.reg();
        let tracked: Vec<String> = reg.vms.values().filter_map(|v| v.job.clone()).collect();
        let adopting = reg.adopting.clone();
        reg.jobs
            .values_mut()
            .filter(|j| vm.is_none_or(|v| j.vm == v))
            .filter(|j| !j.is_final() && !tracked.contains(&j.id) && !adopting.contains(&j.vm))
            .map(|j| {
                j.status = "failed".into();
                j.ended = Some(state::now());
                j.error = Some(
                    "migd restarted and the VM process no longer reports this migration".into(),
                );
                j.stats["outcome"] = json!("failed");
                j.id.clone()
            })
            .collect()
    };
    for id in orphans {
        persist(d, &id);
    }
}

/// The lower of two caps (bytes/s), where either is set.
pub fn lower_cap(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The cap of each unfinished job (id, VM, bytes/s): its own, or an equal share
/// of the host-wide cap where that is lower.
fn shares(d: &Daemon) -> Vec<(String, String, Option<u64>)> {
    let reg = d.reg();
    let active: Vec<&Job> = reg.jobs.values().filter(|j| !j.is_final()).collect();
    let share = d
        .cfg
        .max_bandwidth
        .map(|c| (c / active.len().max(1) as u64).max(1));
    active
        .iter()
        .map(|j| {
            (
                j.id.clone(),
                j.vm.clone(),
                lower_cap(j.opts.max_bandwidth, share),
            )
        })
        .collect()
}

/// After a job started or ended: every running job gets its share of the
/// host-wide cap again (the VM processes apply it within 50 ms).
async fn rebalance(d: &Daemon) {
    if d.cfg.max_bandwidth.is_none() {
        return;
    }
    // One at a time: two computed at different moments (a job starting,
    // another ending) and sent interleaved could leave the older shares in
    // force, together over the host's cap.
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = TURN.lock().await;
    for (id, vm, cap) in shares(d) {
        let sock = state::control_path(&d.vm_dir(&vm));
        let req = json!({"cmd": "bandwidth", "max_bandwidth": cap});
        match vm_call(&sock, &req, Duration::from_secs(5)).await {
            Ok(_) => tracing::debug!(job = %id, max_bandwidth = ?cap, "bandwidth share"),
            Err(e) => tracing::debug!(job = %id, "bandwidth share not applied: {e:#}"),
        }
    }
}

/// Refuses to send anything to a peer without TLS unless plaintext was
/// allowed (`insecure`): a migration, and a cost-model probe, which carries
/// the VM's name and CPU.
pub fn check_transport(d: &Daemon) -> Result<()> {
    if !d.cfg.insecure && d.tls.is_none() {
        bail!(
            "migrations are disabled: configure TLS (tls_ca, tls_cert, tls_key, tls_peers) \
             or allow plaintext streams with --insecure"
        );
    }
    Ok(())
}

/// Starts a migration job; with `detach: false` the reply waits for its end.
pub async fn start(d: &Arc<Daemon>, req: MigrateRequest) -> Result<Value> {
    state::check_name(&req.name).map_err(anyhow::Error::msg)?;
    check_target(&req.to)?;
    check_limits(&req.opts)?;
    check_transport(d)?;
    if is_own_listener(&d.cfg.listen, &req.to).await {
        bail!(
            "{} is this daemon's own migration listener ({}): migrate to another host's migd",
            req.to,
            d.cfg.listen
        );
    }
    let (job, boot) = {
        let mut reg = d.reg();
        let reg = &mut *reg;
        let Some(vm) = reg.vms.get_mut(&req.name) else {
            bail!(reg.no_vm(&req.name));
        };
        if let Some(j) = &vm.job {
            bail!("VM '{}' is already being migrated (job {j})", req.name);
        }
        if vm.state != st::RUNNING && vm.state != st::PAUSED || vm.pid.is_none() {
            bail!(
                "VM '{}' is {}; only a running or paused VM can be migrated",
                req.name,
                vm.state
            );
        }
        reg.next_job += 1;
        let id = format!("job{}", reg.next_job);
        vm.job = Some(id.clone());
        let job = Job {
            id: id.clone(),
            vm: req.name.clone(),
            to: req.to.clone(),
            opts: req.opts.clone(),
            status: "setup".into(),
            started: state::now(),
            ended: None,
            error: None,
            stats: json!({"id": id, "vm": req.name, "mode": req.opts.mode, "outcome": null, "error": null}),
        };
        reg.starting.insert(id.clone());
        reg.jobs.insert(id, job.clone());
        (job, vm.record.boot_spec())
    };
    let sock = state::control_path(&d.vm_dir(&job.vm));
    let cap = shares(d)
        .into_iter()
        .find(|(id, _, _)| *id == job.id)
        .and_then(|(_, _, cap)| cap);
    let mut migrate = job.opts.vm_request(&job.id, &job.to, cap, boot.as_ref());
    // Over TLS only where this daemon has it: a VM process started before
    // it was configured has none, and refuses.
    migrate["require_tls"] = json!(d.tls.is_some());
    let sent = vm_request(&sock, &migrate, Duration::from_secs(10)).await;
    d.reg().starting.remove(&job.id);
    match sent {
        Ok(r) if r["ok"] == true => {}
        Ok(r) => {
            let mut reg = d.reg();
            reg.jobs.remove(&job.id);
            if let Some(vm) = reg.vms.get_mut(&job.vm) {
                vm.job = None;
            }
            bail!(
                "VM '{}' refused the migration: {}",
                job.vm,
                r["error"].as_str().unwrap_or("no reason given")
            );
        }
        // No answer: the VM process may have started it all the same (it
        // migrates on a thread of its own), so the job and the VM's claim
        // on it stay; the tracker finds out, and fails the job only if the
        // process never reports it.
        Err(e) => {
            tracing::warn!(job = %job.id, "no answer to the migrate request ({e:#}); tracking the job all the same")
        }
    }
    persist(d, &job.id);
    tracing::info!(job = %job.id, vm = %job.vm, to = %job.to, mode = %job.opts.mode, max_bandwidth = ?cap, "migration started");
    rebalance(d).await;
    spawn_tracker(d.clone(), job.id.clone(), job.vm.clone());
    if req.detach {
        return Ok(json!({"ok": true, "job": job.id}));
    }
    loop {
        tokio::time::sleep(POLL).await;
        let Some(done) = d
            .reg()
            .jobs
            .get(&job.id)
            .map(|j| j.is_final().then(|| j.clone()))
        else {
            bail!("job {} ended and is no longer kept (jobs beyond the last {KEPT_ENDED_JOBS} that ended are pruned)", job.id);
        };
        if let Some(j) = done {
            return Ok(
                json!({"ok": true, "job": j.id, "status": j.status, "error": j.error, "stats": j.stats}),
            );
        }
    }
}

fn spawn_tracker(d: Arc<Daemon>, id: String, vm: String) {
    let span = tracing::info_span!("job", id = %id, vm = %vm);
    tokio::spawn(track(d, id, vm).instrument(span));
}

/// Polls the VM process until the migration ends, then finishes the job.
async fn track(d: Arc<Daemon>, id: String, vm: String) {
    let sock = state::control_path(&d.vm_dir(&vm));
    let (mut failures, mut nones) = (0u32, 0u32);
    let (status, error) = loop {
        tokio::time::sleep(POLL).await;
        let pid = d.reg().vms.get(&vm).and_then(|v| v.pid);
        let Some(pid) = pid.filter(|p| vmproc::alive(*p)) else {
            // Gone: the migration completed if the process noted it so
            // (it may have been told to stop once the migration was over).
            let noted = state::read_migrated(&d.vm_dir(&vm))
                .filter(|s| s["id"].as_str().is_none_or(|other| other == id));
            if let Some(stats) = noted {
                if let Some(j) = d.reg().jobs.get_mut(&id) {
                    j.stats = stats;
                }
                break ("completed".to_string(), None);
            }
            let last = d.reg().jobs.get(&id).map(|j| j.status.clone());
            let past = last.and_then(|s| state::exited_past_commit(&s).map(|why| (s, why)));
            if let Some((s, why)) = past {
                // The destination may run the VM: not to be booted here again.
                state::mark_unconfirmed(&d, &vm, &why);
                break (
                    "failed".to_string(),
                    Some(format!(
                        "the VM process exited during the migration, past its commit ({s}): \
                         the destination may run the VM; it is listed unconfirmed here"
                    )),
                );
            }
            // A pre-copy reports no status of its own past its commit, but
            // its process noted the commit before it sent Go.
            if let Some(note) = state::read_unconfirmed(&d.vm_dir(&vm)) {
                break (
                    "failed".to_string(),
                    Some(format!(
                        "the VM process exited during the migration, past its commit ({}): \
                         the destination may run the VM; it is listed unconfirmed here",
                        note.trim()
                    )),
                );
            }
            break (
                "failed".to_string(),
                Some("the VM process exited during the migration".to_string()),
            );
        };
        match vm_request(&sock, &json!({"cmd": "migration"}), Duration::from_secs(5)).await {
            Ok(r) if r["ok"] == true => {
                failures = 0;
                let mut status = r["status"].as_str().unwrap_or("none").to_string();
                if r["id"].as_str().is_some_and(|other| other != id) {
                    // Still the report of an earlier migration of this VM.
                    status = "none".into();
                }
                if status == "none" {
                    nones += 1;
                    if nones > 50 {
                        break (
                            "failed".into(),
                            Some("the VM process reports no migration".into()),
                        );
                    }
                    continue;
                }
                let stats = stats_of(&r);
                let error = stats["error"].as_str().map(str::to_string);
                if let Some(j) = d.reg().jobs.get_mut(&id) {
                    j.stats = stats;
                    // The final status is set by `finish`, after the clean-up.
                    if !is_final(&status) {
                        j.status = status.clone();
                    }
                }
                if is_final(&status) {
                    break (status, error);
                }
            }
            other => {
                failures += 1;
                if failures > 25 {
                    let why = match other {
                        Ok(r) => r["error"].as_str().unwrap_or("error reply").to_string(),
                        Err(e) => format!("{e:#}"),
                    };
                    tracing::warn!(pid, "VM process stopped answering: {why}");
                    break (
                        "failed".into(),
                        Some(format!("the VM process stopped answering: {why}")),
                    );
                }
            }
        }
    };
    finish(&d, &id, &vm, status, error).await;
}

/// The statistics in a `migration` reply: its `stats` object, or the reply itself.
fn stats_of(r: &Value) -> Value {
    if let Some(s) = r.get("stats").filter(|s| s.is_object()) {
        return s.clone();
    }
    let mut s = r.clone();
    if let Some(o) = s.as_object_mut() {
        o.remove("ok");
    }
    s
}

/// Ends a job. After `completed` the source VM process is stopped and the VM forgotten
/// here first, so that whoever sees the job completed also sees the VM gone.
///
/// A completed job stays on its VM (`migrated`) until that clean-up is
/// done: `process_exited` leaves a migrated VM with a job to this function.
/// Exactly one side removes it, and never a VM of the same name that
/// arrived here the moment the name was free (the job is what tells them
/// apart).
async fn finish(d: &Daemon, id: &str, vm: &str, mut status: String, mut error: Option<String>) {
    let completed = status == "completed";
    // `gone`: it left for good (completed, or its process noted so as it
    // exited), and is removed here.
    let (pid, to, gone) = {
        let mut reg = d.reg();
        let to = reg.jobs.get(id).map(|j| j.to.clone()).unwrap_or_default();
        let (pid, gone) = match reg.vms.get_mut(vm) {
            Some(v) if v.job.as_deref() == Some(id) => {
                if completed {
                    v.state = st::MIGRATED.into();
                }
                let gone = v.state == st::MIGRATED;
                if !gone {
                    v.job = None;
                }
                (v.pid, gone)
            }
            _ => (None, false),
        };
        (pid, to, gone)
    };
    if gone {
        let dir = d.vm_dir(vm);
        // Gone for good, its process having noted this migration completed
        // (the tracker, which saw the process silent, then failed it): it
        // completed.
        if !completed {
            let noted = state::read_migrated(&dir)
                .filter(|s| s["id"].as_str().is_none_or(|other| other == id));
            if let Some(stats) = noted {
                tracing::warn!(was = %status, "the migration completed after all");
                status = "completed".into();
                error = None;
                if let Some(j) = d.reg().jobs.get_mut(id) {
                    j.stats = stats;
                    j.error = None;
                }
            }
        }
        let stopped = match pid {
            Some(pid) => vmproc::stop(&state::control_path(&dir), pid, false, "migrated").await,
            None => Ok(()),
        };
        if let Err(e) = &stopped {
            tracing::warn!("VM now lives on {to}, but its process here: {e:#}");
        }
        // Ours while it still carries this job, which it keeps until it is
        // removed (`process_exited` leaves it to us meanwhile). Its process
        // runs on after a failed stop: its directory and record stay, and
        // its exit removes them (unless it is gone already).
        let remove = {
            let mut reg = d.reg();
            match reg.vms.get_mut(vm) {
                Some(v) if v.job.as_deref() == Some(id) => {
                    let remove = stopped.is_ok() || v.pid.is_none();
                    if !remove {
                        v.job = None;
                    }
                    remove
                }
                _ => false,
            }
        };
        if remove {
            // The record, job and all, keeps the name taken until the
            // directory is gone.
            if let Err(e) = state::remove_dir(&dir) {
                tracing::warn!("{e:#}");
            }
            let mut reg = d.reg();
            if reg
                .vms
                .get(vm)
                .is_some_and(|v| v.job.as_deref() == Some(id))
            {
                reg.vms.remove(vm);
            }
            drop(reg);
            tracing::info!("VM now lives on {to}; removed here");
        }
    }
    let job = {
        let mut reg = d.reg();
        let Some(j) = reg.jobs.get_mut(id) else {
            return;
        };
        j.status = status.clone();
        j.ended = Some(state::now());
        if j.error.is_none() {
            j.error = error.clone();
        }
        if let Some(o) = j.stats.as_object_mut() {
            o.insert("outcome".into(), json!(status));
            o.insert("status".into(), json!(status));
            if o.get("error").is_none_or(Value::is_null) {
                o.insert("error".into(), json!(error));
            }
        }
        // Counted as the job turns final: whoever sees it ended (a waiting
        // `migrate`) finds it in the metrics too.
        d.metrics.migration_ended(j);
        j.clone()
    };
    persist(d, &job.id);
    prune(d, Some(&job.id));
    match &job.error {
        Some(e) => tracing::warn!(status = %job.status, "migration ended: {e}"),
        None => tracing::info!(status = %job.status, "migration ended"),
    }
    rebalance(d).await;
}

/// The highest job number that moves the numbering on: one above (a job
/// file edited, or corrupted, to job18446744073709551615) would have the
/// next numbers wrap to job0 and overwrite older jobs. Such a job keeps its
/// id, which new ones never reach.
const MAX_JOB_NUMBER: u64 = 1 << 53;

/// Makes sure no new job gets `id` (`jobN`) or an earlier one.
fn reserve_job_id(reg: &mut super::Registry, id: &str) {
    if let Some(n) = id.strip_prefix("job").and_then(|n| n.parse::<u64>().ok()) {
        if n > MAX_JOB_NUMBER {
            tracing::warn!(
                id,
                "job number out of range: the numbering does not follow it"
            );
            return;
        }
        reg.next_job = reg.next_job.max(n);
    }
}

/// The unfinished job of VM `vm` (the one `named`, where given), by id.
fn open_job(reg: &super::Registry, vm: &str, named: Option<&str>) -> Option<String> {
    reg.jobs
        .values()
        .find(|j| j.vm == vm && !j.is_final() && named.is_none_or(|id| id == j.id))
        .map(|j| j.id.clone())
}

/// At start, for an adopted VM: picks up a migration that is still going (or one that
/// completed while no daemon was watching).
pub async fn reattach(d: &Arc<Daemon>, vm: &str) {
    let sock = state::control_path(&d.vm_dir(vm));
    let r = match vm_request(&sock, &json!({"cmd": "migration"}), Duration::from_secs(2)).await {
        Ok(r) => r,
        Err(e) => {
            // No word now is no word for good: an unfinished job of this VM
            // is tracked on (the tracker gives up on a process that never
            // answers), not failed as one the process no longer reports.
            let unfinished = open_job(&d.reg(), vm, None);
            if let Some(id) = unfinished {
                tracing::warn!(job = %id, "the VM process does not say how its migration goes ({e:#}): tracking it on");
                if let Some(v) = d.reg().vms.get_mut(vm) {
                    v.job = Some(id.clone());
                }
                spawn_tracker(d.clone(), id, vm.to_string());
            }
            return;
        }
    };
    let status = r["status"].as_str().unwrap_or("none").to_string();
    // A VM still arriving by post-copy runs here already and reports its
    // arrival: that is no migration of ours (ending it as one would remove
    // the VM once its last page came).
    if r["ok"] != true || status == "none" || r["direction"] == "incoming" {
        return;
    }
    let vm_state = d.reg().vms.get(vm).map(|v| v.state.clone());
    let stats = stats_of(&r);
    if is_final(&status) && !(status == "completed" && vm_state.as_deref() == Some(st::MIGRATED)) {
        // It ended while no daemon watched: the job it names ends as the
        // VM process says (a cancel, or a failure whose error may say the
        // destination runs the VM), not as one it no longer reports.
        let open = stats["id"]
            .as_str()
            .and_then(|id| open_job(&d.reg(), vm, Some(id)));
        if let (Some(id), "failed" | "cancelled") = (open, status.as_str()) {
            let error = stats["error"].as_str().map(str::to_string);
            if let Some(j) = d.reg().jobs.get_mut(&id) {
                j.stats = stats;
            }
            tracing::info!(job = %id, %status, "the migration ended while migd was down");
            finish(d, &id, vm, status, error).await;
        }
        return;
    }
    let id = {
        let mut reg = d.reg();
        let id = match stats["id"].as_str() {
            // Reserved: a job file the daemon died before writing is no
            // reason to give the id out again.
            Some(id) => {
                reserve_job_id(&mut reg, id);
                id.to_string()
            }
            None => {
                reg.next_job += 1;
                format!("job{}", reg.next_job)
            }
        };
        let job = reg.jobs.entry(id.clone()).or_insert_with(|| Job {
            id: id.clone(),
            vm: vm.to_string(),
            to: stats["to"].as_str().unwrap_or("?").to_string(),
            opts: MigrateOptions {
                mode: stats["mode"].as_str().unwrap_or("?").to_string(),
                ..MigrateOptions::default()
            },
            status: status.clone(),
            started: state::now(),
            ended: None,
            error: None,
            stats: stats.clone(),
        });
        // A migration that completed is `completing` until its tracker's
        // `finish` has removed the VM here: whoever sees the job completed
        // sees the VM gone.
        job.status = if is_final(&status) {
            "completing".into()
        } else {
            status.clone()
        };
        job.ended = None;
        job.stats = stats;
        if let Some(v) = reg.vms.get_mut(vm) {
            v.job = Some(id.clone());
        }
        id
    };
    tracing::info!(job = %id, status = %status, "re-attached to a migration in progress");
    spawn_tracker(d.clone(), id, vm.to_string());
}

/// Passes `cmd` (cancel, postcopy) to the VM process of an unfinished job,
/// once the VM process has answered the job's `migrate` request.
pub async fn job_command(d: &Daemon, id: &str, cmd: &str) -> Result<Value> {
    let vm = loop {
        {
            let reg = d.reg();
            let Some(j) = reg.jobs.get(id) else {
                bail!("no job '{id}'")
            };
            if j.is_final() {
                bail!("job {id} already ended ({})", j.status);
            }
            if !reg.starting.contains(id) {
                break j.vm.clone();
            }
        }
        // The start's wait for that answer is bounded (10 s).
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let sock = state::control_path(&d.vm_dir(&vm));
    vm_call(&sock, &json!({ "cmd": cmd }), Duration::from_secs(10)).await?;
    Ok(json!({"ok": true, "job": id}))
}

/// Changes a running job's own bandwidth cap (`max_bandwidth`, bytes/s; 0
/// lifts it, leaving only the host's share) and/or its largest acceptable
/// pause, in the job's record and in the VM process, which applies them
/// within 50 ms and at the end of its round.
pub async fn set_parameters(
    d: &Daemon,
    id: &str,
    max_bandwidth: Option<u64>,
    max_downtime_ms: Option<u64>,
) -> Result<Value> {
    if max_bandwidth.is_none() && max_downtime_ms.is_none() {
        bail!("nothing to set: give max_bandwidth and/or max_downtime_ms");
    }
    if max_downtime_ms == Some(0) {
        bail!("max-downtime must be at least 1 ms: no migration can pause a VM for 0 ms");
    }
    let (job, before) = {
        let mut reg = d.reg();
        let Some(j) = reg.jobs.get_mut(id) else {
            bail!("no job '{id}'")
        };
        if j.is_final() {
            bail!("job {id} already ended ({})", j.status);
        }
        let before = j.opts.clone();
        if let Some(b) = max_bandwidth {
            j.opts.max_bandwidth = Some(b).filter(|&b| b > 0);
        }
        if let Some(ms) = max_downtime_ms {
            j.opts.max_downtime_ms = ms;
        }
        (j.clone(), before)
    };
    let sock = state::control_path(&d.vm_dir(&job.vm));
    let mut took_downtime = false;
    let applied = async {
        if let Some(ms) = max_downtime_ms {
            let req = json!({"cmd": "downtime", "max_downtime_ms": ms});
            vm_call(&sock, &req, Duration::from_secs(10)).await?;
            took_downtime = true;
        }
        if max_bandwidth.is_some() {
            // Its own cap within its share of the host's, as at the start.
            let cap = shares(d)
                .into_iter()
                .find(|(j, _, _)| j == id)
                .and_then(|(_, _, cap)| cap);
            let req = json!({"cmd": "bandwidth", "max_bandwidth": cap});
            vm_call(&sock, &req, Duration::from_secs(10)).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = applied {
        // The VM process did not take them (its migration just ended): the
        // job keeps what it runs with, the pause limit if only that was taken.
        if let Some(j) = d.reg().jobs.get_mut(id) {
            j.opts.max_bandwidth = before.max_bandwidth;
            if !took_downtime {
                j.opts.max_downtime_ms = before.max_downtime_ms;
            }
        }
        // Unchanged where nothing was taken.
        if took_downtime {
            persist(d, id);
        }
        return Err(e.context(format!("job {id} did not take the new parameters")));
    }
    persist(d, id);
    tracing::info!(job = %id, max_bandwidth = ?job.opts.max_bandwidth, max_downtime_ms = job.opts.max_downtime_ms, "migration parameters changed");
    Ok(json!({
        "ok": true,
        "job": id,
        "max_bandwidth": job.opts.max_bandwidth,
        "max_downtime_ms": job.opts.max_downtime_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::Registry;
    use super::*;
    use std::sync::Mutex;

    /// Only the jobs that ended last are kept, records and files, and the
    /// highest-numbered one; an unfinished one always is, however old.
    #[test]
    fn old_ended_jobs_are_pruned_beyond_the_kept_ones() {
        let state_dir = std::env::temp_dir().join(format!("migd-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let d = Daemon::for_tests(&state_dir, Registry::default());
        std::fs::create_dir_all(d.jobs_dir()).unwrap();
        let n = KEPT_ENDED_JOBS as u64 + 4;
        for i in 0..=n {
            let id = format!("job{i}");
            // job0 started first and never ended; the others ended in the
            // reverse of their order (the last started failed at once, say).
            let mut job = Job::for_tests(&id, "vm1", if i == 0 { "active" } else { "completed" });
            job.ended = (i > 0).then_some(10_000 - i);
            d.reg().jobs.insert(id.clone(), job);
            persist(&d, &id);
        }
        prune(&d, None);
        {
            let reg = d.reg();
            assert_eq!(reg.jobs.len(), KEPT_ENDED_JOBS + 1);
            assert!(reg.jobs.contains_key("job0"), "the unfinished one");
            // job260 ended first, but keeps the numbering after a restart.
            assert!(reg.jobs.contains_key(&format!("job{n}")), "the highest");
            for i in n - 4..n {
                assert!(!reg.jobs.contains_key(&format!("job{i}")), "job{i}");
                assert!(!d.jobs_dir().join(format!("job{i}.json")).exists());
            }
            assert!(reg.jobs.contains_key("job1"), "the last to end");
            assert!(d.jobs_dir().join("job1.json").exists());
        }
        let files = std::fs::read_dir(d.jobs_dir()).unwrap().count();
        assert_eq!(files, KEPT_ENDED_JOBS + 1);
        // A job that ends as the clock was set back looks oldest: it stays
        // (a `migrate` waits for it); the oldest other goes (job260, no
        // longer the highest).
        let late = format!("job{}", n + 1);
        let mut job = d.reg().jobs["job1"].clone();
        job.id = late.clone();
        job.ended = Some(1);
        d.reg().jobs.insert(late.clone(), job);
        persist(&d, &late);
        prune(&d, Some(&late));
        let reg = d.reg();
        assert!(reg.jobs.contains_key(&late), "the job that just ended");
        assert!(!reg.jobs.contains_key(&format!("job{n}")));
        assert_eq!(reg.jobs.len(), KEPT_ENDED_JOBS + 1);
        drop(reg);
        let _ = std::fs::remove_dir_all(&state_dir);
    }

    /// A job given up as failed whose VM process then noted the migration
    /// completed ends completed, with the noted statistics; another VM's
    /// job of that id is left alone.
    #[test]
    fn a_job_given_up_that_completed_after_all_says_so() {
        let state_dir = std::env::temp_dir().join(format!("migd-after-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let d = Daemon::for_tests(&state_dir, Registry::default());
        std::fs::create_dir_all(d.jobs_dir()).unwrap();
        let mut given_up = Job::for_tests("job3", "vm1", "failed");
        given_up.ended = Some(2);
        given_up.error = Some("the VM process stopped answering".into());
        d.reg().jobs.insert("job3".into(), given_up);
        let noted = json!({"id": "job3", "bytes": 7, "status": "completed"});
        completed_after_all(&d, "vm2", &noted);
        assert_eq!(d.reg().jobs["job3"].status, "failed", "another VM's");
        completed_after_all(&d, "vm1", &noted);
        let j = d.reg().jobs["job3"].clone();
        assert_eq!((j.status.as_str(), j.error), ("completed", None));
        assert_eq!(j.stats["bytes"], 7);
        let file: Value =
            serde_json::from_slice(&std::fs::read(d.jobs_dir().join("job3.json")).unwrap())
                .unwrap();
        assert_eq!(file["status"], "completed");
        let _ = std::fs::remove_dir_all(&state_dir);
    }

    #[test]
    fn reattached_and_loaded_job_ids_are_never_given_out_again() {
        let mut reg = Registry::default();
        reserve_job_id(&mut reg, "job7");
        reserve_job_id(&mut reg, "job3");
        reserve_job_id(&mut reg, "jobx");
        reserve_job_id(&mut reg, "other12");
        assert_eq!(reg.next_job, 7);
        // One near the top of u64 does not move it (the next ids would wrap).
        reserve_job_id(&mut reg, "job18446744073709551615");
        assert_eq!(reg.next_job, 7);
    }

    #[test]
    fn targets() {
        for ok in ["10.0.0.2:7070", "host.example:1", "[::1]:7070"] {
            assert!(check_target(ok).is_ok(), "{ok}");
        }
        for bad in ["10.0.0.2", ":7070", "h:0", "h:99999", "h: 1", "a b:1"] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stats_flattened_or_nested() {
        let r = json!({"ok": true, "status": "active", "id": "job1", "bytes": 5});
        assert_eq!(
            stats_of(&r),
            json!({"status": "active", "id": "job1", "bytes": 5})
        );
        let r = json!({"ok": true, "status": "active", "stats": {"bytes": 7}});
        assert_eq!(stats_of(&r), json!({"bytes": 7}));
    }

    #[test]
    fn options_are_flat_in_requests_jobs_and_the_vm_request() {
        let d = MigrateOptions::default();
        assert_eq!((d.mode.as_str(), d.max_downtime_ms), ("precopy", 300));
        let req: MigrateRequest = serde_json::from_value(json!({
            "name": "vm1", "to": "h:1", "mode": "hybrid", "streams": 2,
            "no_fault_channel": true, "compress": "zstd:3", "detach": true
        }))
        .expect("request");
        assert_eq!(req.opts.mode, "hybrid");
        assert_eq!(req.opts.streams, Some(2));
        assert!(req.detach && req.opts.no_fault_channel);
        let job = Job {
            id: "job1".into(),
            vm: "vm1".into(),
            to: "h:1".into(),
            opts: req.opts.clone(),
            status: "setup".into(),
            started: 0,
            ended: None,
            error: None,
            stats: json!({}),
        };
        // Job files and `migctl job --json` keep the options at the top level.
        let v = serde_json::to_value(&job).expect("job");
        assert_eq!(v["mode"], "hybrid");
        assert_eq!(v["compress"], "zstd:3");
        let back: Job = serde_json::from_value(v).expect("job back");
        assert_eq!(back.opts.streams, Some(2));
        // The VM process gets the cap it is given and a fault_channel flag.
        let boot = wire::BootSpec {
            kernel: "/images/vmlinux".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        };
        let r = job.opts.vm_request("job1", "h:1", Some(7), Some(&boot));
        assert_eq!(r["boot"]["kernel"], "/images/vmlinux");
        assert_eq!(r["boot"]["cmdline"], "console=ttyS0");
        assert_eq!(r["cmd"], "migrate");
        assert_eq!(r["job"], "job1");
        assert_eq!(r["max_bandwidth"], 7);
        assert_eq!(r["fault_channel"], false);
        assert_eq!(r["clear_before_send"], true, "on unless asked off");
        assert_eq!(r["streams"], 2);
        assert_eq!(r["max_downtime_ms"], 300);
    }

    /// A daemon with one running job `job1` of VM `vm1` (cap 2 MiB/s, pause
    /// 300 ms) whose VM process is a fake on the control socket, answering
    /// each command as `answer` says; returns the daemon and the commands
    /// the fake received.
    async fn daemon_with_fake_vm(
        tag: &str,
        answer: fn(&str) -> Value,
    ) -> (Daemon, Arc<Mutex<Vec<Value>>>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let state_dir =
            std::env::temp_dir().join(format!("migd-jobs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let mut reg = Registry::default();
        let opts = MigrateOptions {
            max_bandwidth: Some(2 << 20),
            ..Default::default()
        };
        let mut job = Job::for_tests("job1", "vm1", "active");
        job.opts = opts;
        reg.jobs.insert("job1".into(), job);
        let d = Daemon::for_tests(&state_dir, reg);
        std::fs::create_dir_all(d.vm_dir("vm1")).unwrap();
        std::fs::create_dir_all(d.jobs_dir()).unwrap();
        let listener =
            tokio::net::UnixListener::bind(state::control_path(&d.vm_dir("vm1"))).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                let _ = tokio::io::BufReader::new(r).read_line(&mut line).await;
                let req: Value = serde_json::from_str(&line).unwrap_or_default();
                let reply = answer(req["cmd"].as_str().unwrap_or(""));
                log.lock().unwrap().push(req);
                let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
            }
        });
        (d, seen)
    }

    fn job_file(d: &Daemon) -> Option<Value> {
        let text = std::fs::read(d.jobs_dir().join("job1.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    #[tokio::test]
    async fn migrate_set_records_what_the_vm_process_took() {
        // Refused outright: the job keeps both, nothing is persisted.
        let (d, _) = daemon_with_fake_vm(
            "refuse",
            |_| json!({"ok": false, "error": "no migration running"}),
        )
        .await;
        let e = set_parameters(&d, "job1", Some(0), Some(450))
            .await
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("did not take") && msg.contains("no migration running"),
            "{msg}"
        );
        let opts = d.reg().jobs["job1"].opts.clone();
        assert_eq!(
            (opts.max_bandwidth, opts.max_downtime_ms),
            (Some(2 << 20), 300)
        );
        assert!(job_file(&d).is_none(), "nothing to persist");
        std::fs::remove_dir_all(&d.cfg.state_dir).unwrap();

        // The pause limit taken, the cap refused: the record says just that.
        let (d, _) = daemon_with_fake_vm("half", |cmd| match cmd {
            "downtime" => json!({"ok": true}),
            _ => json!({"ok": false, "error": "migration ended"}),
        })
        .await;
        assert!(set_parameters(&d, "job1", Some(0), Some(450))
            .await
            .is_err());
        let opts = d.reg().jobs["job1"].opts.clone();
        assert_eq!(
            (opts.max_bandwidth, opts.max_downtime_ms),
            (Some(2 << 20), 450)
        );
        let file = job_file(&d).expect("the pause limit taken is persisted");
        assert_eq!(file["max_downtime_ms"], 450);
        assert_eq!(file["max_bandwidth"], 2 << 20);
        std::fs::remove_dir_all(&d.cfg.state_dir).unwrap();

        // Both taken: recorded, persisted, and the process got them.
        let (d, seen) = daemon_with_fake_vm("ok", |_| json!({"ok": true})).await;
        set_parameters(&d, "job1", Some(0), Some(450))
            .await
            .unwrap();
        let opts = d.reg().jobs["job1"].opts.clone();
        assert_eq!((opts.max_bandwidth, opts.max_downtime_ms), (None, 450));
        let file = job_file(&d).expect("persisted");
        assert_eq!(file["max_downtime_ms"], 450);
        assert!(file["max_bandwidth"].is_null(), "{file}");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                json!({"cmd": "downtime", "max_downtime_ms": 450}),
                json!({"cmd": "bandwidth", "max_bandwidth": null}),
            ]
        );
        std::fs::remove_dir_all(&d.cfg.state_dir).unwrap();
    }
}

/// `finish` against the VM process's exit and an arrival of the same name.
#[cfg(test)]
mod finish_race_tests {
    use super::super::Registry;
    use super::*;
    use crate::daemon::state::{Origin, VmEntry, VmRecord};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    /// A completed job's `finish` stops the source's VM process; the exit is
    /// reaped meanwhile. An incoming migration of the same name, admitted
    /// the moment the name is free (as `incoming::admit` does), keeps its
    /// entry and its directory: only the VM that left is removed. (It was
    /// removed by `finish` as well, by name, 7 runs in 8.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finish_leaves_a_vm_of_the_same_name_admitted_meanwhile() {
        let state_dir = std::env::temp_dir().join(format!("migd-finish-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let mut reg = Registry::default();
        reg.jobs
            .insert("job1".into(), Job::for_tests("job1", "vm1", "active"));
        let d = Arc::new(Daemon::for_tests(&state_dir, reg));
        std::fs::create_dir_all(d.vm_dir("vm1")).unwrap();
        std::fs::create_dir_all(d.jobs_dir()).unwrap();
        let child = tokio::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let mut vm = VmEntry::new(
            VmRecord::for_tests("vm1", Origin::Created),
            st::RUNNING,
            Some(pid),
        );
        vm.job = Some("job1".into());
        d.reg().vms.insert("vm1".into(), vm);
        state::watch_child(d.clone(), "vm1".into(), child);
        // The VM process: answers the stop, then exits.
        let listener =
            tokio::net::UnixListener::bind(state::control_path(&d.vm_dir("vm1"))).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                let _ = tokio::io::BufReader::new(r).read_line(&mut line).await;
                let _ = w.write_all(b"{\"ok\":true}\n").await;
                drop(w);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        let d2 = d.clone();
        let admitted = tokio::spawn(async move {
            loop {
                {
                    let mut reg = d2.reg();
                    let dir = d2.vm_dir("vm1");
                    if !reg.vms.contains_key("vm1") && !dir.exists() {
                        std::fs::create_dir(&dir).unwrap();
                        reg.vms.insert(
                            "vm1".into(),
                            VmEntry::new(
                                VmRecord::for_tests("vm1", Origin::Incoming),
                                st::INCOMING,
                                None,
                            ),
                        );
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        finish(&d, "job1", "vm1", "completed".into(), None).await;
        tokio::time::timeout(Duration::from_secs(10), admitted)
            .await
            .expect("the name is free once the VM that left is removed")
            .unwrap();
        let entry = d.reg().vms.get("vm1").map(|v| v.state.clone());
        let dir = d.vm_dir("vm1").exists();
        let job = d.reg().jobs.get("job1").map(|j| j.status.clone());
        let _ = std::fs::remove_dir_all(&state_dir);
        assert_eq!(
            entry.as_deref(),
            Some(st::INCOMING),
            "the arriving VM's entry"
        );
        assert!(dir, "the arriving VM's directory");
        assert_eq!(job.as_deref(), Some("completed"));
    }
}
