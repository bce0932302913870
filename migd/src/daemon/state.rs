//! VM bookkeeping: records in `<state>/vms/NAME/vm.json`, the in-memory entry of each
//! VM, re-attachment at start, and the supervisor that notices state changes and exits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::Instrument;

use super::vmproc::{self, vm_request};
use super::{jobs, Daemon};

/// States the daemon itself assigns; the others come from the VM process's `status`.
pub mod st {
    pub const CREATING: &str = "creating";
    pub const RUNNING: &str = "running";
    pub const PAUSED: &str = "paused";
    pub const INCOMING: &str = "incoming";
    pub const MIGRATED: &str = "migrated";
    pub const STOPPED: &str = "stopped";
    pub const DESTROYING: &str = "destroying";
    pub const SAVING: &str = "saving";
    /// Paused by a migration that ended past its commit without the
    /// destination's word: it may run there (see `migctl resume --force`).
    pub const UNCONFIRMED: &str = "unconfirmed";
}

/// How a VM came to this host.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    #[default]
    Created,
    Incoming,
    /// Started from a snapshot file (`restore`).
    Restored,
}

/// The persistent record of a VM (`vm.json`).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct VmRecord {
    pub name: String,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub vcpus: u32,
    /// Unix time in seconds.
    pub created: u64,
    #[serde(default)]
    pub origin: Origin,
    /// Peer address of an incoming migration, or the snapshot file of a restored VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Why the kernel or initramfs that its source or its snapshot file
    /// named cannot be booted here (a file not on this host, or outside
    /// `boot_dirs`), as found when it arrived: `start` refuses it (checking
    /// again). The spec is kept all the same, and goes on with the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_refused: Option<String>,
}

#[cfg(test)]
impl VmRecord {
    /// The record of a 64 MiB, 1-vCPU VM `name` come by `origin` (an
    /// incoming one from 10.0.0.1), without boot files.
    pub fn for_tests(name: &str, origin: Origin) -> VmRecord {
        VmRecord {
            name: name.into(),
            kernel: None,
            initramfs: None,
            cmdline: String::new(),
            memory: 64 << 20,
            vcpus: 1,
            created: 0,
            origin,
            source: (origin == Origin::Incoming).then(|| "10.0.0.1:7070".into()),
            boot_refused: None,
        }
    }
}

impl VmRecord {
    /// How the VM boots from its kernel, for a destination's record; None
    /// without a kernel here (or with a path that is not UTF-8).
    pub fn boot_spec(&self) -> Option<wire::BootSpec> {
        Some(wire::BootSpec {
            kernel: self.kernel.as_deref()?.to_str()?.to_string(),
            initrd: match &self.initramfs {
                Some(p) => Some(p.to_str()?.to_string()),
                None => None,
            },
            cmdline: self.cmdline.clone(),
        })
    }

    /// Takes a boot spec that `whence` names ("its source": a migration's
    /// source; "its snapshot file") into the record, so that the VM's next
    /// migration or snapshot carries it on. Where its files are not on this
    /// host, or `dirs` do not allow them, `start` cannot boot the VM here:
    /// the record says why (`boot_refused`) and so does the log, a warning
    /// for a file refused, which is the host's to protect.
    pub fn adopt_boot_spec(&mut self, spec: wire::BootSpec, dirs: &BootDirs, whence: &str) {
        let kernel = PathBuf::from(&spec.kernel);
        let initrd = spec.initrd.map(PathBuf::from);
        self.boot_refused = self.refused_boot_files(&kernel, initrd.as_ref(), dirs, whence);
        self.kernel = Some(kernel);
        self.initramfs = initrd;
        self.cmdline = spec.cmdline;
    }

    /// Why `kernel` and `initrd`, named by `whence`, cannot be booted here
    /// (logged); None where they can.
    fn refused_boot_files(
        &self,
        kernel: &Path,
        initrd: Option<&PathBuf>,
        dirs: &BootDirs,
        whence: &str,
    ) -> Option<String> {
        let files =
            std::iter::once(("kernel", kernel)).chain(initrd.map(|i| ("initramfs", i.as_path())));
        for (what, path) in files {
            let (refused, why) = match dirs.check(path) {
                Ok(()) => continue,
                Err(BootFileRefused::Missing(why)) => (false, why),
                Err(BootFileRefused::Outside(why)) => (true, why),
            };
            let note = format!("the {what} that {whence} names, {why}");
            if refused {
                tracing::warn!(
                    vm = %self.name,
                    path = %path.display(),
                    "{note}: refused; the VM runs, but cannot be started here again once it stops"
                );
            } else {
                tracing::info!(
                    vm = %self.name,
                    path = %path.display(),
                    "{note}: the VM cannot be started here again once it stops"
                );
            }
            return Some(note);
        }
        None
    }

    /// Whether `start` may boot this VM from its record's kernel and
    /// initramfs: those of a VM the local operator created are theirs;
    /// those that came from a migration's source or a snapshot file are
    /// checked against `dirs` again (a record written before the setting
    /// existed, or the setting changed since). The error names the file,
    /// why, and the setting.
    pub fn check_boot_files(&self, dirs: &BootDirs) -> Result<(), String> {
        let whence = match self.origin {
            Origin::Created => return Ok(()),
            Origin::Incoming => "its source",
            Origin::Restored => "its snapshot file",
        };
        let files = [
            ("kernel", self.kernel.as_ref()),
            ("initramfs", self.initramfs.as_ref()),
        ];
        for (what, path) in files {
            let Some(path) = path else { continue };
            if let Err(BootFileRefused::Missing(why) | BootFileRefused::Outside(why)) =
                dirs.check(path)
            {
                return Err(format!("the {what} that {whence} named, {why}"));
            }
        }
        Ok(())
    }
}

/// Where the daemon takes a kernel or an initramfs that a migration's
/// source or a snapshot file names (setting `boot_dirs`, flag
/// `--boot-dir`): a file whose canonical path (symlinks resolved) lies in
/// one of `dirs` (canonical too), and never one in the state dir, whose
/// files (other VMs' consoles and logs, records, jobs) no guest may read.
/// Paths of the local operator's own `create` are not checked.
#[derive(Debug, Clone)]
pub struct BootDirs {
    pub dirs: Vec<PathBuf>,
    pub state_dir: PathBuf,
}

/// Why a boot file named by a peer or a snapshot file is not taken: each
/// message names the path (and what it resolves to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootFileRefused {
    /// Not on this host (or not a file): nothing to protect, the same
    /// image is just not installed here.
    Missing(String),
    /// A file of this host outside `boot_dirs`, or in the state dir.
    Outside(String),
}

impl BootDirs {
    /// The directories as the messages name them.
    fn listed(&self) -> String {
        if self.dirs.is_empty() {
            return "none".into();
        }
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        dirs.join(", ")
    }

    /// Whether `path` may be booted from (resolved now: a link changed
    /// since is followed where it leads now).
    pub fn check(&self, path: &Path) -> Result<(), BootFileRefused> {
        let shown = path.display();
        if !path.is_absolute() {
            return Err(BootFileRefused::Outside(format!(
                "{shown}, is not an absolute path (setting boot_dirs: {})",
                self.listed()
            )));
        }
        let real = std::fs::canonicalize(path)
            .map_err(|e| BootFileRefused::Missing(format!("{shown}, is not on this host ({e})")))?;
        if !real.is_file() {
            return Err(BootFileRefused::Missing(format!(
                "{shown}, is not a file on this host"
            )));
        }
        let resolved = if real != path {
            format!(" (resolved: {})", real.display())
        } else {
            String::new()
        };
        let state =
            std::fs::canonicalize(&self.state_dir).unwrap_or_else(|_| self.state_dir.clone());
        if real.starts_with(&state) {
            return Err(BootFileRefused::Outside(format!(
                "{shown}{resolved}, lies in migd's state dir {}, whose files are never booted from \
                 whatever boot_dirs says",
                self.state_dir.display()
            )));
        }
        let allowed = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .any(|d| real.starts_with(d));
        if !allowed {
            return Err(BootFileRefused::Outside(format!(
                "{shown}{resolved}, lies outside boot_dirs ({}), the directories (config key \
                 boot_dirs, flag --boot-dir) from which a kernel or initramfs named by a \
                 migration's source or a snapshot file is taken",
                self.listed()
            )));
        }
        Ok(())
    }
}

/// A snapshot file's boot spec as the wire and the records carry it (None
/// where a path is not UTF-8).
pub fn wire_boot(b: &vmm::BootSpec) -> Option<wire::BootSpec> {
    Some(wire::BootSpec {
        kernel: b.kernel.to_str()?.to_string(),
        initrd: match &b.initramfs {
            Some(p) => Some(p.to_str()?.to_string()),
            None => None,
        },
        cmdline: b.cmdline.clone(),
    })
}

/// A VM as the daemon tracks it.
#[derive(Debug, Clone)]
pub struct VmEntry {
    pub record: VmRecord,
    pub state: String,
    pub pid: Option<u32>,
    /// The migration job running for it, if any.
    pub job: Option<String>,
    /// A lazy restore's progress (`{filled, pages}`) while it fills memory.
    pub filling: Option<Value>,
    /// Host memory its guest RAM took at the last status, bytes.
    pub memory_used: Option<u64>,
    /// Whether its guest RAM is on huge pages (known from its first status).
    pub huge_pages: Option<bool>,
    /// A post-copy arrival's progress while pages are still missing here.
    pub arriving: Option<Value>,
    /// A save's progress (`{path, pages, written}`) while it writes.
    pub saving: Option<Value>,
    /// This daemon's `save` request waits for the VM process (it owns the
    /// `saving` state until then); false for a save found running after a
    /// restart, whose end the status shows.
    pub save_requested: bool,
    /// Where this daemon's save of it writes (the directory resolved): a
    /// second save to the same file is refused while this one runs.
    pub save_target: Option<PathBuf>,
    /// Why it is `unconfirmed` (its process's word, or the daemon's where
    /// the process died past a commit).
    pub unconfirmed: Option<String>,
}

impl VmEntry {
    /// Unconfirmed, for `why` (the destination may run the VM).
    pub fn set_unconfirmed(&mut self, why: &str) {
        self.state = st::UNCONFIRMED.into();
        self.unconfirmed = Some(why.to_string());
    }

    /// A VM with no job running.
    pub fn new(record: VmRecord, state: &str, pid: Option<u32>) -> VmEntry {
        VmEntry {
            record,
            state: state.into(),
            pid,
            job: None,
            filling: None,
            memory_used: None,
            huge_pages: None,
            arriving: None,
            saving: None,
            save_requested: false,
            save_target: None,
            unconfirmed: None,
        }
    }

    /// The API view of this VM.
    pub fn to_json(&self, dir: &Path) -> Value {
        json!({
            "name": self.record.name,
            "state": self.state,
            "pid": self.pid,
            "memory": self.record.memory,
            "memory_used": self.memory_used,
            "huge_pages": self.huge_pages,
            "vcpus": self.record.vcpus,
            "kernel": self.record.kernel,
            "initramfs": self.record.initramfs,
            "boot_refused": self.record.boot_refused,
            "cmdline": self.record.cmdline,
            "created": self.record.created,
            "origin": self.record.origin,
            "source": self.record.source,
            "dir": dir,
            "console": dir.join("console.log"),
            "job": self.job,
            "filling": self.filling,
            "arriving": self.arriving,
            "saving": self.saving,
            "unconfirmed": self.unconfirmed,
        })
    }
}

/// Paths inside a VM's directory.
pub fn control_path(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}
pub fn console_path(dir: &Path) -> PathBuf {
    dir.join("console.log")
}
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("vm.log")
}
/// An arriving VM's boot spec as its source sent it, kept until its record
/// is written (so that a daemon restarted meanwhile takes it as the first
/// did, `boot_dirs` checked again); no record: still a leftover.
pub fn boot_path(dir: &Path) -> PathBuf {
    dir.join("boot.json")
}

/// Writes `record` as the VM's `vm.json`; an arriving VM's `boot.json` then goes.
fn write_record(dir: &Path, record: &VmRecord) {
    if let Err(e) = super::blocking(|| write_json_atomic(&record_path(dir), record)) {
        tracing::warn!("{e:#}");
        return;
    }
    let _ = std::fs::remove_file(boot_path(dir));
}
pub fn record_path(dir: &Path) -> PathBuf {
    dir.join("vm.json")
}
/// Written by the VM process once its VM left for good (`--migrated-file`).
pub fn migrated_path(dir: &Path) -> PathBuf {
    dir.join("migrated.json")
}

/// Created by an incoming VM's process once the VM runs here (`--arrived-file`).
pub fn arrived_path(dir: &Path) -> PathBuf {
    dir.join("arrived")
}

/// The statistics of the completed migration the VM process in `dir` noted
/// ([`migrated_path`]), if it did.
pub fn read_migrated(dir: &Path) -> Option<Value> {
    let b = std::fs::read(migrated_path(dir)).ok()?;
    Some(serde_json::from_slice::<Value>(&b).unwrap_or_default())
}

/// Written by a VM's process at its migration's commit, before `Go`
/// (`--unconfirmed-file`), and by the daemon where a process died past the
/// commit: the destination may run the VM. A VM whose process is gone
/// stays `unconfirmed`, across restarts of the daemon, until `start
/// --force` or `destroy --force`. It holds why.
pub fn unconfirmed_path(dir: &Path) -> PathBuf {
    dir.join("unconfirmed")
}

/// Why the VM in `dir` is unconfirmed without a process ([`unconfirmed_path`]).
pub fn read_unconfirmed(dir: &Path) -> Option<String> {
    std::fs::read_to_string(unconfirmed_path(dir)).ok()
}

/// Notes why the VM in `dir` is unconfirmed without a process.
/// The first note stays: the VM process's own, written at the commit
/// (`--unconfirmed-file`), where there is one; else the first of the job's
/// tracker and the process's exit to note it.
pub fn write_unconfirmed(dir: &Path, why: &str) {
    let path = unconfirmed_path(dir);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, why.as_bytes())?;
            // Durable, as the process's own note: a host that loses power
            // must not come back taking the VM for stopped.
            crate::daemon::blocking(|| {
                f.sync_all()?;
                std::fs::File::open(dir)?.sync_all()
            })
        });
    let written = match written {
        // The process's own note, which it may not have synced yet (it died
        // past its commit): made durable here.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => crate::daemon::blocking(|| {
            std::fs::File::open(&path)?.sync_all()?;
            std::fs::File::open(dir)?.sync_all()
        }),
        other => other,
    };
    if let Err(e) = written {
        tracing::warn!("noting {}: {e}", path.display())
    }
}

/// A VM whose process died past its migration's commit (the job's tracker
/// saw it first): unconfirmed, as [`process_exited`] lists it.
pub fn mark_unconfirmed(d: &Daemon, name: &str, why: &str) {
    {
        let mut reg = d.reg();
        let Some(vm) = reg.vms.get_mut(name) else {
            return;
        };
        if [st::DESTROYING, st::MIGRATED].contains(&vm.state.as_str()) {
            return;
        }
        vm.set_unconfirmed(why);
    }
    write_unconfirmed(&d.vm_dir(name), why);
}

/// Why a VM whose process exited while its migration was in `status` (as
/// the VM process reported it) is unconfirmed, if past the commit: from the
/// switch to post-copy on, the destination runs the VM.
pub fn exited_past_commit(status: &str) -> Option<String> {
    status.starts_with("postcopy-").then(|| {
        format!(
            "its process exited during a migration past the commit ({status}): the destination may run it"
        )
    })
}

/// Unix time in seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `[A-Za-z0-9_.-]{1,64}`, not `.` or `..`, and not starting with `-`
/// (the name is an argument of `migd run`, and of commands operators type).
pub fn check_name(name: &str) -> Result<(), String> {
    check_name_chars(name)?;
    if name.starts_with('-') {
        return Err(format!(
            "invalid VM name '{}': it must not start with '-' (it would read as an option)",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// The characters and length of a VM name, as builds before 2026-11-25
/// checked them (a leading '-' allowed): the directories found at the
/// daemon's start, which may hold such a VM, still running.
fn check_name_chars(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if name.is_empty() || name.len() > 64 || !ok_chars || name == "." || name == ".." {
        return Err(format!(
            "invalid VM name '{}': use 1 to 64 of A-Z a-z 0-9 _ . -",
            name.escape_debug()
        ));
    }
    Ok(())
}

pub use migd::json_file::write_json_atomic;

fn read_record(dir: &Path) -> Option<VmRecord> {
    let text = std::fs::read(record_path(dir)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// At start: adopts every VM whose control socket answers, lists records without a
/// process as stopped, and removes directories that hold neither (e.g. an incoming
/// migration that died before its VM ran here).
pub async fn adopt_all(d: &Arc<Daemon>) {
    let entries = match std::fs::read_dir(d.vms_dir()) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("reading {}: {e}", d.vms_dir().display());
            return;
        }
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dir = e.path();
        if check_name_chars(&name).is_err() || !dir.is_dir() {
            tracing::warn!(path = %dir.display(), "ignoring a foreign entry in the state dir");
            continue;
        }
        adopt_one(d, name, dir).await;
    }
}

async fn adopt_one(d: &Arc<Daemon>, name: String, dir: PathBuf) {
    let span = tracing::info_span!("vm", name = %name);
    adopt_inner(d, name, dir).instrument(span).await
}

/// A VM process's `status`, or None if it does not answer within 2 s.
async fn ask_status(dir: &Path) -> Option<Value> {
    let reply = vm_request(
        &control_path(dir),
        &json!({"cmd": "status"}),
        Duration::from_secs(2),
    )
    .await;
    reply.ok().filter(|r| r["ok"] == true)
}

/// Whether a VM process of `dir` lives though it may not answer: it listens
/// on the control socket (too busy to answer yet: booting, or restoring a
/// large snapshot), or holds its lock (no socket yet: an incoming VM built
/// with `--prefault`).
///
/// The connection attempt does not block: a process stopped (SIGSTOP) never
/// accepts, and once the attempts of every second have filled its listen
/// queue a blocking connect would hang this daemon's worker for good.
async fn alive_in(dir: &Path) -> bool {
    let listening = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::UnixStream::connect(control_path(dir)),
    )
    .await;
    matches!(listening, Ok(Ok(_))) || vmproc::lock_held(dir)
}

async fn adopt_inner(d: &Arc<Daemon>, name: String, dir: PathBuf) {
    let status = match ask_status(&dir).await {
        None if alive_in(&dir).await => {
            // Alive but busy: adopted once it answers (a process taken for
            // gone would be orphaned, its socket removed, its directory
            // reused by a second process).
            tracing::info!("VM process busy: adopting it once it answers");
            d.reg().adopting.insert(name.clone());
            let d = d.clone();
            tokio::spawn(
                async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let status = ask_status(&dir).await;
                        if status.is_some() || !alive_in(&dir).await {
                            let record = read_record(&dir);
                            adopt_answer(&d, name.clone(), dir, status, record).await;
                            d.reg().adopting.remove(&name);
                            jobs::finish_orphans(&d, Some(&name));
                            return;
                        }
                    }
                }
                .in_current_span(),
            );
            return;
        }
        status => status,
    };
    let record = read_record(&dir);
    adopt_answer(d, name, dir, status, record).await
}

/// [`adopt_inner`] once the VM process answered (`status`) or is known gone (None).
async fn adopt_answer(
    d: &Arc<Daemon>,
    name: String,
    dir: PathBuf,
    status: Option<Value>,
    record: Option<VmRecord>,
) {
    match (status, record) {
        (Some(s), record) => {
            let pid = s["pid"].as_u64().map(|p| p as u32);
            let state = s["state"].as_str().unwrap_or(st::RUNNING).to_string();
            let record = match record {
                Some(r) => r,
                None => {
                    // An incoming VM: its record is written once it runs here.
                    // Its boot spec as the source sent it, taken as then.
                    let boot = std::fs::read(boot_path(&dir))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<wire::BootSpec>(&b).ok())
                        .filter(|b| b.check().is_ok());
                    let mut r = VmRecord {
                        name: name.clone(),
                        kernel: None,
                        initramfs: None,
                        cmdline: String::new(),
                        memory: s["memory"].as_u64().unwrap_or(0),
                        vcpus: s["vcpus"].as_u64().unwrap_or(0) as u32,
                        created: now(),
                        origin: Origin::Incoming,
                        source: None,
                        boot_refused: None,
                    };
                    if let Some(spec) = boot {
                        r.adopt_boot_spec(spec, &d.boot_dirs, "its source");
                    }
                    if state != st::INCOMING {
                        write_record(&dir, &r);
                    }
                    r
                }
            };
            tracing::info!(?pid, state = %state, "re-attached to a running VM process");
            d.reg()
                .vms
                .insert(name.clone(), VmEntry::new(record, &state, pid));
            if let Some(pid) = pid {
                watch_pid(d.clone(), name.clone(), pid);
            }
            jobs::reattach(d, &name).await;
        }
        (None, Some(_)) if migrated_path(&dir).exists() => {
            // It left for good while no daemon watched: its process noted
            // the completed migration before it exited.
            let stats = read_migrated(&dir).unwrap_or_default();
            tracing::info!(to = %stats["to"], "VM migrated away while migd was down; removed here");
            jobs::completed_while_away(d, &name, &stats);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!("removing {}: {e}", dir.display());
            }
        }
        (None, Some(record)) => {
            let why = read_unconfirmed(&dir);
            let state = match &why {
                Some(why) => {
                    tracing::warn!("VM process is gone; listed as unconfirmed: {why}");
                    st::UNCONFIRMED
                }
                None => {
                    tracing::info!("VM process is gone; listed as stopped");
                    st::STOPPED
                }
            };
            let _ = std::fs::remove_file(control_path(&dir));
            let mut vm = VmEntry::new(record, state, None);
            vm.unconfirmed = why;
            d.reg().vms.insert(name, vm);
        }
        (None, None) => {
            tracing::info!(dir = %dir.display(), "no record and no process: removing");
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!("removing {}: {e}", dir.display());
            }
        }
    }
}

/// Watches a process that is not our child (adopted at start) until it is gone.
pub fn watch_pid(d: Arc<Daemon>, name: String, pid: u32) {
    let span = tracing::info_span!("vm", name = %name);
    tokio::spawn(
        async move {
            while vmproc::alive(pid) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            process_exited(&d, &name, pid, None);
        }
        .instrument(span),
    );
}

/// Reaps a child process and records its exit.
pub fn watch_child(d: Arc<Daemon>, name: String, mut child: tokio::process::Child) {
    let Some(pid) = child.id() else { return };
    let span = tracing::info_span!("vm", name = %name);
    tokio::spawn(
        async move {
            let code = match child.wait().await {
                Ok(st) => st.code().or(Some(-1)),
                Err(_) => None,
            };
            process_exited(&d, &name, pid, code);
        }
        .instrument(span),
    );
}

/// A VM process ended (`code` is None when it was not our child).
pub fn process_exited(d: &Daemon, name: &str, pid: u32, code: Option<i32>) {
    let dir = d.vm_dir(name);
    // Read before the lock: a VM that left for good, or that arrived here,
    // noted it first.
    let left = read_migrated(&dir);
    let arrived = arrived_path(&dir).exists();
    // Its process notes a migration's commit before it sends Go.
    let noted = read_unconfirmed(&dir);
    let mut reg = d.reg();
    // The status its migration job last reported, if one runs.
    let job_status = reg
        .vms
        .get(name)
        .and_then(|v| v.job.as_ref())
        .and_then(|id| reg.jobs.get(id))
        .map(|j| j.status.clone());
    let Some(vm) = reg.vms.get_mut(name) else {
        return;
    };
    if vm.pid != Some(pid) {
        return;
    }
    vm.pid = None;
    // No process: no memory of its own (as documented: null then).
    vm.memory_used = None;
    // Destroy cleans up itself, and so does a save this daemon asked for
    // (its process exits once the file is written: until the save's reply
    // has removed the VM, a `start` must not boot it again).
    if vm.state == st::DESTROYING || (vm.state == st::SAVING && vm.save_requested) {
        return;
    }
    if vm.state == st::MIGRATED || left.is_some() {
        // It lives on another host now, never here again: its job's tracker
        // finishes the job (`finish` keeps the job on it until it has
        // cleaned up) and cleans up; with none tracking it (it gave up, or
        // could not stop the process), the clean-up is done here.
        if vm.job.is_some() {
            vm.state = st::MIGRATED.into();
            return;
        }
        reg.vms.remove(name);
        drop(reg);
        tracing::info!("VM process of a VM that migrated away exited; removed here");
        if let Some(stats) = &left {
            super::jobs::completed_after_all(d, name, stats);
        }
        if let Err(e) = remove_dir(&dir) {
            tracing::warn!("{e:#}");
        }
        return;
    }
    // An incoming VM that never ran here leaves nothing behind, however its
    // process ended (a stop while it waited for its pages exits 0, and its
    // source runs the VM on); once it ran (its process noted it: the state
    // here may lag), it is a VM of this host like any other: stopped.
    let incoming_failed =
        vm.record.origin == Origin::Incoming && vm.state == st::INCOMING && !arrived;
    // Ran here, but exited before this daemon saw it run: its record, as
    // `refresh` would have written it.
    let record = (vm.state == st::INCOMING && arrived).then(|| vm.record.clone());
    if incoming_failed {
        tracing::warn!(?code, "incoming VM process failed: removing its directory");
        reg.vms.remove(name);
        drop(reg);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!("removing {}: {e}", dir.display());
        }
        return;
    }
    // Past the commit (or left unconfirmed by an earlier migration), the
    // destination may run the VM: booting it here again would run it twice.
    let unconfirmed = job_status
        .as_deref()
        .and_then(exited_past_commit)
        .or(noted)
        .or_else(|| {
            (vm.state == st::UNCONFIRMED).then(|| {
                "its process exited with its last migration unconfirmed: the destination may run it"
                    .to_string()
            })
        });
    if let Some(why) = unconfirmed {
        tracing::warn!(?code, "VM process exited; VM is unconfirmed: {why}");
        vm.set_unconfirmed(&why);
        drop(reg);
        if let Some(r) = record {
            write_record(&dir, &r);
        }
        write_unconfirmed(&dir, &why);
        let _ = std::fs::remove_file(control_path(&dir));
        return;
    }
    tracing::info!(?code, "VM process exited; VM is stopped");
    vm.state = st::STOPPED.into();
    drop(reg);
    if let Some(r) = record {
        write_record(&dir, &r);
    }
    let _ = std::fs::remove_file(control_path(&dir));
}

/// Asks a VM process for its state and updates the entry. Errors leave it
/// as it was. Returns whether the VM process migrates the VM while no job
/// here tracks it (a tracker that gave up on a process that did not answer
/// for a while, or a restart that found none): the caller re-attaches one.
pub async fn refresh(d: &Daemon, name: &str) -> bool {
    let (state, has_pid) = match d.reg().vms.get(name) {
        Some(v) => (v.state.clone(), v.pid.is_some()),
        None => return false,
    };
    if !has_pid || [st::CREATING, st::DESTROYING, st::MIGRATED].contains(&state.as_str()) {
        return false;
    }
    let dir = d.vm_dir(name);
    let reply = vm_request(
        &control_path(&dir),
        &json!({"cmd": "status"}),
        Duration::from_secs(1),
    )
    .await;
    let Ok(reply) = reply else { return false };
    let Some(new) = reply["state"].as_str().filter(|_| reply["ok"] == true) else {
        return false;
    };
    let mut record_to_write = None;
    let untracked;
    {
        let mut reg = d.reg();
        // One being adopted is re-attached by its adoption.
        let adopting = reg.adopting.contains(name);
        let Some(vm) = reg.vms.get_mut(name) else {
            return false;
        };
        if vm.state == st::DESTROYING || vm.state == st::MIGRATED || vm.pid.is_none() {
            return false;
        }
        // Migrating, or migrated already (its tracker gave up before the
        // migration completed), with no job here following it.
        untracked =
            (reply["migrating"] == true || new == st::MIGRATED) && vm.job.is_none() && !adopting;
        vm.memory_used = reply["memory_used"].as_u64();
        vm.huge_pages = reply["huge_pages"].as_bool();
        let saving = Some(reply["saving"].clone()).filter(|s| !s.is_null());
        if saving.is_some() || (vm.state == st::SAVING && vm.save_requested) {
            // The state is the save's until it ends (a save found running
            // after a restart included); its progress is news.
            vm.state = st::SAVING.into();
            vm.saving = saving;
            return false;
        }
        vm.saving = None;
        if vm.state == st::INCOMING && new != st::INCOMING {
            // The incoming VM runs here now: from here on it has a record like any
            // other (sized from the VM itself if this daemon adopted it mid-way).
            tracing::info!(state = new, "incoming VM is running here");
            if vm.record.memory == 0 {
                vm.record.memory = reply["memory"].as_u64().unwrap_or(0);
                vm.record.vcpus = reply["vcpus"].as_u64().unwrap_or(0) as u32;
            }
            record_to_write = Some(vm.record.clone());
        }
        vm.state = new.to_string();
        vm.filling = Some(reply["filling"].clone()).filter(|f| !f.is_null());
        vm.unconfirmed = reply["unconfirmed"].as_str().map(str::to_string);
        vm.arriving = Some(reply["arriving"].clone()).filter(|a| !a.is_null());
    }
    if let Some(r) = record_to_write {
        write_record(&dir, &r);
    }
    untracked
}

/// Every second: refreshes the state of each live VM (an incoming VM becomes running).
pub async fn supervise(d: Arc<Daemon>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let names: Vec<String> = d
            .reg()
            .vms
            .iter()
            .filter(|(_, v)| v.pid.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            if refresh(&d, &n).await {
                tracing::warn!(vm = %n, "its VM process migrates it, untracked here: re-attaching");
                super::jobs::reattach(&d, &n).await;
            }
        }
    }
}

/// Removes a VM directory, with context.
pub fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon for a unit test, in a fresh state directory named for `tag`.
    fn daemon(tag: &str) -> (PathBuf, Daemon) {
        let state_dir =
            std::env::temp_dir().join(format!("migd-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let d = Daemon::for_tests(&state_dir, Default::default());
        (state_dir, d)
    }

    fn record(name: &str, origin: Origin) -> VmRecord {
        VmRecord::for_tests(name, origin)
    }

    /// An incoming VM's process ends while the daemon still lists it
    /// incoming: with the arrival noted, the VM ran here and is kept,
    /// stopped, with its record; without, it never ran here and leaves
    /// nothing, even for an exit 0 (a stop before its pages came).
    #[test]
    fn an_incoming_vm_is_kept_only_if_it_arrived() {
        let (state_dir, d) = daemon("exited");
        for (name, arrived) in [("came", true), ("never", false)] {
            std::fs::create_dir_all(d.vm_dir(name)).unwrap();
            if arrived {
                std::fs::write(arrived_path(&d.vm_dir(name)), b"").unwrap();
            }
            d.reg().vms.insert(
                name.into(),
                VmEntry::new(record(name, Origin::Incoming), st::INCOMING, Some(4242)),
            );
            process_exited(&d, name, 4242, Some(0));
        }
        assert_eq!(d.reg().vms["came"].state, st::STOPPED);
        assert!(record_path(&d.vm_dir("came")).exists());
        assert!(!d.reg().vms.contains_key("never"));
        assert!(!d.vm_dir("never").exists());
        let _ = std::fs::remove_dir_all(&state_dir);
    }

    /// A VM whose process exits during a save this daemon asked for (it
    /// stops once the file is written) stays `saving` for the save's reply
    /// to finish: listed `stopped` meanwhile, `start` could boot it again
    /// just before the reply removed its directory.
    #[test]
    fn a_vm_whose_process_exits_in_its_save_is_left_to_the_save() {
        let (state_dir, d) = daemon("saving");
        std::fs::create_dir_all(d.vm_dir("web1")).unwrap();
        let mut vm = VmEntry::new(record("web1", Origin::Created), st::SAVING, Some(4242));
        vm.save_requested = true;
        d.reg().vms.insert("web1".into(), vm);
        process_exited(&d, "web1", 4242, Some(0));
        assert_eq!(d.reg().vms["web1"].state, st::SAVING);
        assert_eq!(d.reg().vms["web1"].pid, None);
        let _ = std::fs::remove_dir_all(&state_dir);
    }

    /// A daemon restarted while a VM process has no control socket yet (an
    /// incoming VM built with `--prefault`) keeps its directory for as long
    /// as the process lives (it holds its lock from the fork on), removes it
    /// once the process is gone, and never starts a second process there.
    #[tokio::test]
    async fn a_vm_process_without_a_socket_yet_keeps_its_directory() {
        use std::os::unix::fs::PermissionsExt;
        let (state_dir, d) = daemon("lock");
        let d = Arc::new(d);
        let dir = d.vm_dir("arriving");
        std::fs::create_dir_all(&dir).unwrap();
        // Stands for `migd run`: lives 3 s, never opens a control socket.
        let exe = state_dir.join("fake-migd");
        std::fs::write(&exe, "#!/bin/sh\nexec sleep 3\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let lock = vmproc::lock_path(&dir);
        let mut child = vmproc::spawn(&exe, &[], &log_path(&dir), &lock, None, None).unwrap();
        assert!(vmproc::lock_held(&dir), "the child holds the lock");
        let again = vmproc::spawn(&exe, &[], &log_path(&dir), &lock, None, None);
        let err = format!("{:#}", again.expect_err("a second process is refused"));
        assert!(err.contains("still runs"), "{err}");

        adopt_all(&d).await;
        assert!(dir.exists(), "a live process's directory is kept");
        assert!(d.reg().adopting.contains("arriving"));

        child.wait().await.unwrap();
        assert!(!vmproc::lock_held(&dir), "the lock goes with the process");
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while dir.exists() && std::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!dir.exists(), "removed once its process is gone");
        assert!(!d.reg().adopting.contains("arriving"));
        let _ = std::fs::remove_dir_all(&state_dir);
    }

    #[test]
    fn names() {
        assert!(check_name("web-1.prod_a").is_ok());
        assert!(check_name(&"a".repeat(64)).is_ok());
        assert!(check_name("a-").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            &"a".repeat(65),
            "-",
            "-x",
            "--help",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let e = check_name("-x").unwrap_err();
        assert!(e.contains("must not start with '-'"), "{e}");
        // A directory of an earlier build's VM so named is still taken on
        // at the daemon's start (its process may run).
        assert!(check_name_chars("-x").is_ok());
        assert!(check_name_chars("a/b").is_err());
    }
}
