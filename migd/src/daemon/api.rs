//! The control socket: JSON lines, one reply per request, never a crash on bad input.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::Instrument;

use migd::client::MAX_REQUEST_BYTES;

use super::jobs::{self, MigrateRequest};
use super::state::{self, st, Origin, VmEntry, VmRecord};
use super::vmproc::{self, vm_call, vm_request};
use super::Daemon;

/// Commands of the API, in the order `unknown command` lists them.
const COMMANDS: [&str; 20] = [
    "create",
    "list",
    "info",
    "start",
    "pause",
    "resume",
    "destroy",
    "console",
    "migrate",
    "jobs",
    "job",
    "cancel",
    "abort",
    "postcopy",
    "recover",
    "migrate_set",
    "estimate",
    "save",
    "restore",
    "ping",
];

/// How long `create`, `start` and `restore` wait for a new VM process to
/// answer on its control socket while it does no work: a process that
/// reads a snapshot or prefaults memory for minutes is waited for, one that
/// hangs is not.
const CREATE_STALL: Duration = Duration::from_secs(30);
/// The longest they wait for it, working or not.
const CREATE_LIMIT: Duration = Duration::from_secs(600);
/// How long `save` waits for the VM process to write its snapshot, before
/// it cancels the save.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default and largest amount of console text `console` returns.
const CONSOLE_DEFAULT: u64 = 1 << 20;
const CONSOLE_MAX: u64 = 16 << 20;

/// [`CREATE_STALL`], which tests shorten with `MIGD_CREATE_STALL_MS`
/// (honoured only with fault injection on).
fn create_stall() -> Duration {
    migration::faults::knob_ms("MIGD_CREATE_STALL_MS").unwrap_or(CREATE_STALL)
}

/// [`SAVE_TIMEOUT`], which tests shorten with `MIGD_SAVE_TIMEOUT_MS`
/// (honoured only with fault injection on).
fn save_timeout() -> Duration {
    migration::faults::knob_ms("MIGD_SAVE_TIMEOUT_MS").unwrap_or(SAVE_TIMEOUT)
}

#[derive(Deserialize, Serialize, Debug)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Request {
    Create(CreateRequest),
    List,
    Info {
        name: String,
    },
    Start {
        name: String,
        /// Boot again even a VM left unconfirmed by a process that died
        /// past its migration's commit.
        #[serde(default)]
        force: bool,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
        /// Resume even a VM whose last migration ended unconfirmed.
        #[serde(default)]
        force: bool,
    },
    Destroy {
        name: String,
        /// Stop its process even while its VM still arrives by post-copy.
        #[serde(default)]
        force: bool,
    },
    Console {
        name: String,
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        max_bytes: Option<u64>,
    },
    Migrate(MigrateRequest),
    Jobs,
    Job {
        id: String,
    },
    Cancel {
        id: String,
    },
    Postcopy {
        id: String,
    },
    Recover {
        id: String,
    },
    /// Ends what a VM is doing, by its name (virsh domjobabort): its
    /// migration job (as `cancel`) or the save being written.
    Abort {
        name: String,
    },
    /// Changes a running job's bandwidth cap (0: none of its own) and/or its
    /// largest acceptable pause (QEMU's migrate-set-parameters).
    MigrateSet {
        id: String,
        #[serde(default)]
        max_bandwidth: Option<u64>,
        #[serde(default)]
        max_downtime_ms: Option<u64>,
    },
    Estimate {
        name: String,
        to: String,
        mode: Option<String>,
        max_downtime_ms: Option<u64>,
        /// Bytes/s; the daemon's own cap applies as well.
        #[serde(default)]
        max_bandwidth: Option<u64>,
    },
    Save {
        name: String,
        path: PathBuf,
        /// Resume the VM once written, instead of stopping it (`virsh save` stops it).
        #[serde(default)]
        keep: bool,
    },
    Restore {
        name: String,
        path: PathBuf,
        /// Resume at once and fill memory from the file on demand.
        #[serde(default)]
        lazy: bool,
    },
    Ping,
}

#[derive(Deserialize, Serialize, Debug)]
struct CreateRequest {
    name: String,
    kernel: PathBuf,
    #[serde(default)]
    initramfs: Option<PathBuf>,
    #[serde(default)]
    cmdline: String,
    /// Bytes, or a size string such as "128M".
    #[serde(deserialize_with = "size")]
    memory: u64,
    vcpus: u32,
}

fn size<'de, D: Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    match Value::deserialize(de)? {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| serde::de::Error::custom("memory must be a positive number of bytes")),
        Value::String(s) => migd::size::parse_size(&s).map_err(serde::de::Error::custom),
        other => Err(serde::de::Error::custom(format!(
            "memory must be bytes or a size like \"1G\", got {other}"
        ))),
    }
}

/// Accepts clients until the daemon exits.
pub async fn serve(d: Arc<Daemon>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let d = d.clone();
                tokio::spawn(async move {
                    if let Err(e) = client(d, stream).await {
                        tracing::debug!("control client: {e:#}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("accepting on the control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn client(d: Arc<Daemon>, stream: UnixStream) -> Result<()> {
    let (read, mut write) = stream.into_split();
    // The socket is 0600, but check the peer too: root or the daemon's own user only.
    let uid = read.as_ref().peer_cred()?.uid();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if uid != 0 && uid != me {
        let reply = json!({"ok": false, "error": format!("permission denied for uid {uid}")});
        write.write_all(format!("{reply}\n").as_bytes()).await?;
        return Ok(());
    }
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST_BYTES {
            let reply = json!({"ok": false, "error": format!("request line longer than {MAX_REQUEST_BYTES} bytes")});
            write.write_all(format!("{reply}\n").as_bytes()).await?;
            return Ok(());
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = handle(&d, &line).await;
        write.write_all(format!("{reply}\n").as_bytes()).await?;
    }
}

/// One request line → one reply object.
async fn handle(d: &Arc<Daemon>, line: &[u8]) -> Value {
    let req = match parse(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": e}),
    };
    tracing::debug!(?req, "request");
    match dispatch(d, req).await {
        Ok(v) => v,
        Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
    }
}

fn parse(line: &[u8]) -> Result<Request, String> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| format!("bad request: not JSON ({e})"))?;
    let Some(obj) = v.as_object() else {
        return Err("bad request: expected a JSON object with a \"cmd\"".into());
    };
    let cmd = match obj.get("cmd") {
        Some(Value::String(c)) => c.clone(),
        Some(_) => return Err("bad request: \"cmd\" must be a string".into()),
        None => return Err("bad request: missing \"cmd\"".into()),
    };
    if !COMMANDS.contains(&cmd.as_str()) {
        return Err(format!(
            "unknown command '{}' (known: {})",
            cmd.escape_debug(),
            COMMANDS.join(", ")
        ));
    }
    let req: Request =
        serde_json::from_value(v.clone()).map_err(|e| format!("bad '{cmd}' request: {e}"))?;
    // A key the request does not know is refused, not ignored: a typo
    // (`"kep": true` in a save) would otherwise do what the caller did not
    // ask for. What the request knows is what it serializes back to.
    if let Ok(Value::Object(known)) = serde_json::to_value(&req) {
        let unknown: Vec<&str> = obj
            .keys()
            .filter(|k| !known.contains_key(*k))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            let mut fields: Vec<&str> = known
                .keys()
                .map(String::as_str)
                .filter(|k| *k != "cmd")
                .collect();
            fields.sort_unstable();
            return Err(format!(
                "bad '{cmd}' request: unknown field `{}` (known: {})",
                unknown.join("`, `"),
                fields.join(", ")
            ));
        }
    }
    Ok(req)
}

async fn dispatch(d: &Arc<Daemon>, req: Request) -> Result<Value> {
    match req {
        Request::Ping => Ok(json!({"ok": true, "pid": std::process::id()})),
        Request::Create(c) => {
            let span = tracing::info_span!("vm", name = %c.name);
            create(d, c).instrument(span).await
        }
        Request::List => {
            let names: Vec<String> = d.reg().vms.keys().cloned().collect();
            for n in &names {
                state::refresh(d, n).await;
            }
            let reg = d.reg();
            let vms: Vec<Value> = reg
                .vms
                .iter()
                .map(|(n, v)| v.to_json(&d.vm_dir(n)))
                .collect();
            // Found at start, their processes not answering yet.
            Ok(json!({"ok": true, "vms": vms, "adopting": reg.adopting}))
        }
        Request::Info { name } => {
            state::refresh(d, &name).await;
            let vm = entry(d, &name)?;
            Ok(json!({"ok": true, "vm": vm.to_json(&d.vm_dir(&name))}))
        }
        Request::Start { name, force } => {
            let span = tracing::info_span!("vm", name = %name);
            start(d, &name, force).instrument(span).await
        }
        Request::Pause { name } => pause_resume(d, &name, "pause", false).await,
        Request::Resume { name, force } => pause_resume(d, &name, "resume", force).await,
        Request::Destroy { name, force } => {
            let span = tracing::info_span!("vm", name = %name);
            destroy(d, &name, force).instrument(span).await
        }
        Request::Console {
            name,
            follow,
            max_bytes,
        } => {
            entry(d, &name)?;
            let path = state::console_path(&d.vm_dir(&name));
            if follow {
                return Ok(json!({"ok": true, "name": name, "path": path}));
            }
            let max = max_bytes.unwrap_or(CONSOLE_DEFAULT).min(CONSOLE_MAX);
            let (text, truncated) = tail(&path, max)?;
            Ok(
                json!({"ok": true, "name": name, "path": path, "text": text, "truncated": truncated}),
            )
        }
        Request::Migrate(m) => {
            let span = tracing::info_span!("vm", name = %m.name);
            jobs::start(d, m).instrument(span).await
        }
        Request::Jobs => {
            let reg = d.reg();
            let mut list: Vec<&jobs::Job> = reg.jobs.values().collect();
            list.sort_by_key(|j| (j.started, j.id.len(), j.id.clone()));
            Ok(json!({"ok": true, "jobs": list}))
        }
        Request::Job { id } => match d.reg().jobs.get(&id) {
            Some(j) => Ok(json!({"ok": true, "job": j})),
            None => bail!("no job '{id}'"),
        },
        Request::Cancel { id } => jobs::job_command(d, &id, "cancel").await,
        Request::Postcopy { id } => jobs::job_command(d, &id, "postcopy").await,
        Request::Recover { id } => jobs::job_command(d, &id, "recover").await,
        Request::Abort { name } => abort(d, &name).await,
        Request::MigrateSet {
            id,
            max_bandwidth,
            max_downtime_ms,
        } => jobs::set_parameters(d, &id, max_bandwidth, max_downtime_ms).await,
        Request::Estimate {
            name,
            to,
            mode,
            max_downtime_ms,
            max_bandwidth,
        } => {
            entry(d, &name)?;
            jobs::check_transport(d)?;
            if max_bandwidth == Some(0) {
                bail!("max-bandwidth must be positive; omit it for no cap");
            }
            // As a migration started now would be capped (alone on the host).
            let cap = jobs::lower_cap(max_bandwidth, d.cfg.max_bandwidth);
            let sock = state::control_path(&d.vm_dir(&name));
            let req = json!({
                "cmd": "estimate", "to": to, "mode": mode.unwrap_or_else(|| "precopy".into()),
                "max_downtime_ms": max_downtime_ms.unwrap_or(300),
                "max_bandwidth": cap, "require_tls": d.tls.is_some(),
            });
            let mut r = vm_call(&sock, &req, Duration::from_secs(60)).await?;
            r["name"] = json!(name);
            Ok(r)
        }
        Request::Save { name, path, keep } => {
            let span = tracing::info_span!("vm", name = %name);
            save(d, &name, &path, keep).instrument(span).await
        }
        Request::Restore { name, path, lazy } => {
            let span = tracing::info_span!("vm", name = %name);
            restore(d, name, &path, lazy).instrument(span).await
        }
    }
}

fn entry(d: &Daemon, name: &str) -> Result<VmEntry> {
    let reg = d.reg();
    match reg.vms.get(name) {
        Some(v) => Ok(v.clone()),
        None => bail!(reg.no_vm(name)),
    }
}

/// The last `max` bytes of a file, as text.
fn tail(path: &Path, max: u64) -> Result<(String, bool)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), false)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf).into_owned(), start > 0))
}

/// Pauses or resumes a VM. An unconfirmed one (its last migration ended
/// past the commit without the destination's word) is left to its VM
/// process, which resumes it only with `force`.
async fn pause_resume(d: &Daemon, name: &str, cmd: &str, force: bool) -> Result<Value> {
    let vm = entry(d, name)?;
    let unconfirmed = cmd == "resume" && vm.state == st::UNCONFIRMED;
    if vm.pid.is_none() || (![st::RUNNING, st::PAUSED].contains(&vm.state.as_str()) && !unconfirmed)
    {
        bail!(
            "VM '{name}' is {}; only a running or paused VM can {cmd}",
            vm.state
        );
    }
    let sock = state::control_path(&d.vm_dir(name));
    let r = vm_call(
        &sock,
        &json!({"cmd": cmd, "force": force}),
        Duration::from_secs(10),
    )
    .await?;
    let new = if cmd == "pause" {
        st::PAUSED
    } else {
        st::RUNNING
    };
    if let Some(v) = d.reg().vms.get_mut(name) {
        if [st::RUNNING, st::PAUSED].contains(&v.state.as_str()) || unconfirmed {
            v.state = new.into();
        }
    }
    tracing::info!(vm = name, "{cmd}d");
    let mut reply = json!({"ok": true, "name": name, "state": new, "changed": r["changed"]});
    if let Some(us) = r.get("pause_us") {
        reply["pause_us"] = us.clone();
    }
    Ok(reply)
}

async fn create(d: &Arc<Daemon>, c: CreateRequest) -> Result<Value> {
    state::check_name(&c.name).map_err(anyhow::Error::msg)?;
    if !(1..=8).contains(&c.vcpus) {
        bail!("vcpus must be 1 to 8, got {}", c.vcpus);
    }
    // The VM library's bounds, before a process is spawned.
    vmm::memory::check_memory_bounds(c.memory).map_err(|e| anyhow::anyhow!("memory: {e}"))?;
    let kernel = existing_file(&c.kernel, "kernel")?;
    let initramfs = match &c.initramfs {
        Some(p) => Some(existing_file(p, "initramfs")?),
        None => None,
    };
    let record = VmRecord {
        name: c.name,
        kernel: Some(kernel),
        initramfs,
        cmdline: c.cmdline,
        memory: c.memory,
        vcpus: c.vcpus,
        created: state::now(),
        origin: Origin::Created,
        source: None,
        boot_refused: None,
    };
    let boot = boot_args(&record)?;
    start_vm(d, record, boot).await
}

/// The `migd run` flags that boot a VM's kernel as its record describes it.
fn boot_args(r: &VmRecord) -> Result<Vec<String>> {
    let mut boot = vec![
        "--kernel".to_string(),
        path_arg(r.kernel.as_deref())?,
        "--cmdline".into(),
        r.cmdline.clone(),
        "--memory".into(),
        memory_arg(r.memory),
        "--cpus".into(),
        r.vcpus.to_string(),
    ];
    if let Some(i) = &r.initramfs {
        boot.push("--initramfs".into());
        boot.push(path_arg(Some(i))?);
    }
    Ok(boot)
}

/// Boots a stopped VM again from the kernel of its record (`virsh start`),
/// in its directory (the console goes on in the same file).
async fn start(d: &Arc<Daemon>, name: &str, force: bool) -> Result<Value> {
    let dir = d.vm_dir(name);
    let (record, before) = {
        let mut reg = d.reg();
        let Some(vm) = reg.vms.get_mut(name) else {
            bail!(reg.no_vm(name));
        };
        // Unconfirmed without a process: started only when forced, and it
        // stays unconfirmed until it has started.
        let unconfirmed = vm.state == st::UNCONFIRMED && vm.pid.is_none();
        if unconfirmed && !force {
            let why = vm.unconfirmed.clone().unwrap_or_default();
            bail!(
                "VM '{name}' is unconfirmed ({why}); booting it here could run it twice: \
                 check the destination, then `migctl destroy --force {name}` if it runs \
                 there, or `migctl start --force {name}` if it does not"
            );
        }
        if (vm.state != st::STOPPED && !unconfirmed) || vm.pid.is_some() {
            bail!(
                "VM '{name}' is {}; only a stopped VM can be started",
                vm.state
            );
        }
        if vm.record.kernel.is_none() {
            let why = match &vm.record.boot_refused {
                Some(why) => format!(": {why}."),
                None => format!(" (its origin is {:?}).", vm.record.origin),
            };
            bail!("VM '{name}' has no kernel on this host{why} Restore it from a snapshot, or destroy it");
        }
        // A kernel that a peer or a snapshot file named is checked again
        // (a record of an earlier migd, or the setting changed since).
        if let Err(why) = vm.record.check_boot_files(&d.boot_dirs) {
            bail!("VM '{name}' cannot be booted here: {why}");
        }
        if unconfirmed {
            tracing::warn!(why = ?vm.unconfirmed, "starting an unconfirmed VM, as forced");
        }
        let before = std::mem::replace(&mut vm.state, st::CREATING.into());
        (vm.record.clone(), before)
    };
    let started = match boot_args(&record) {
        Ok(boot) => spawn_vm(d, &record, boot, &dir).await,
        Err(e) => Err(e),
    };
    let (child, pid, v) = {
        let mut reg = d.reg();
        let vm = reg.vms.get_mut(name).context("VM vanished while started")?;
        match started {
            Ok((child, state, pid)) => {
                vm.state = state;
                vm.pid = Some(pid);
                vm.unconfirmed = None;
                (child, pid, vm.clone())
            }
            Err(e) => {
                // As it was: stopped, or unconfirmed.
                vm.state = before;
                return Err(e);
            }
        }
    };
    let _ = std::fs::remove_file(state::unconfirmed_path(&dir));
    state::watch_child(d.clone(), name.to_string(), child);
    tracing::info!(pid, "VM started again");
    Ok(json!({"ok": true, "vm": first_status(d, name, v, &dir).await}))
}

/// Starts a VM process for a new VM (`boot`: the `migd run` flags that say
/// what it runs) and lists it once its control socket answers; on failure
/// nothing of it is left.
async fn start_vm(d: &Arc<Daemon>, record: VmRecord, boot: Vec<String>) -> Result<Value> {
    let name = record.name.clone();
    let dir = d.vm_dir(&name);
    let control = state::control_path(&dir);
    if control.as_os_str().len() > 100 {
        bail!(
            "state dir path too long: {} exceeds the unix socket path limit",
            control.display()
        );
    }
    {
        let mut reg = d.reg();
        if reg.vms.contains_key(&name) {
            bail!("a VM named '{name}' already exists");
        }
        if reg.adopting.contains(&name) {
            bail!("a VM named '{name}' already exists: {}", reg.no_vm(&name));
        }
        if dir.exists() {
            bail!(
                "{} exists but is no VM of this daemon; remove it first",
                dir.display()
            );
        }
        reg.vms.insert(
            name.clone(),
            VmEntry::new(record.clone(), st::CREATING, None),
        );
    }
    match spawn_vm(d, &record, boot, &dir).await {
        Ok((child, state, pid)) => {
            let vm = {
                let mut reg = d.reg();
                let vm = reg
                    .vms
                    .get_mut(&name)
                    .context("VM vanished while created")?;
                vm.state = state;
                vm.pid = Some(pid);
                vm.clone()
            };
            state::watch_child(d.clone(), name.clone(), child);
            tracing::info!(pid, origin = ?record.origin, "VM started");
            Ok(json!({"ok": true, "vm": first_status(d, &name, vm, &dir).await}))
        }
        Err(e) => {
            // The directory goes, so keep the VM process's last words in our log.
            if let Ok((log, _)) = tail(&state::log_path(&dir), 4096) {
                tracing::warn!(vm_log = %log.trim_end(), "start failed: {e:#}");
            } else {
                tracing::warn!("start failed: {e:#}");
            }
            d.reg().vms.remove(&name);
            let _ = state::remove_dir(&dir);
            Err(e)
        }
    }
}

/// Writes a VM's snapshot to `path` (temporary name, then renamed: an
/// existing file is replaced only by a complete snapshot), then stops and
/// removes the VM, or with `keep` resumes it as it was. A failed save leaves
/// the VM as it was.
async fn save(d: &Daemon, name: &str, path: &Path, keep: bool) -> Result<Value> {
    if !path.is_absolute() {
        bail!("the snapshot path must be absolute, got {}", path.display());
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    if !parent.is_dir() {
        bail!(
            "cannot save to {}: {} is not a directory",
            path.display(),
            parent.display()
        );
    }
    if path.is_dir() {
        bail!("cannot save to {}: it is a directory", path.display());
    }
    // The daemon's own files: a VM's directory is removed after a save (the
    // snapshot with it), and a file there may be a VM's record.
    let state_dir = d
        .cfg
        .state_dir
        .canonicalize()
        .unwrap_or(d.cfg.state_dir.clone());
    if parent
        .canonicalize()
        .is_ok_and(|p| p.starts_with(&state_dir))
    {
        bail!(
            "cannot save to {}: it is inside migd's state directory {}, whose VM directories \
             migd removes; save outside it",
            path.display(),
            state_dir.display()
        );
    }
    // The file as the directory resolves: two names for one file are one.
    let target = match (parent.canonicalize(), path.file_name()) {
        (Ok(p), Some(f)) => p.join(f),
        _ => path.to_path_buf(),
    };
    let (pid, was) = {
        let mut reg = d.reg();
        // Two saves renamed into one file: the first VM would be gone, behind
        // two replies that say saved.
        if let Some((other, _)) = reg
            .vms
            .iter()
            .find(|(_, v)| v.save_target.as_ref() == Some(&target))
        {
            bail!(
                "cannot save to {}: VM '{other}' is being saved to it",
                path.display()
            );
        }
        if let Some(why) = reg.job_in_the_way(name) {
            bail!(why);
        }
        let Some(vm) = reg.vms.get_mut(name) else {
            bail!(reg.no_vm(name));
        };
        let Some(pid) = vm
            .pid
            .filter(|_| [st::RUNNING, st::PAUSED].contains(&vm.state.as_str()))
        else {
            bail!(
                "VM '{name}' is {}; only a running or paused VM can be saved",
                vm.state
            );
        };
        let was = std::mem::replace(&mut vm.state, st::SAVING.into());
        vm.save_requested = true;
        vm.save_target = Some(target);
        (pid, was)
    };
    let dir = d.vm_dir(name);
    let boot = d.reg().vms.get(name).and_then(|v| v.record.boot_spec());
    let req = json!({"cmd": "snapshot", "path": path, "stop": !keep, "boot": boot});
    let r = vm_request(&state::control_path(&dir), &req, save_timeout()).await;
    // As it was; stopped if its process is gone (it exited in the save:
    // `process_exited` left it to this request).
    // Returns the state it is in now.
    let back = |state: &str| -> String {
        let mut reg = d.reg();
        let Some(v) = reg.vms.get_mut(name) else {
            return st::STOPPED.into();
        };
        v.save_requested = false;
        v.save_target = None;
        if v.state == st::SAVING {
            v.saving = None;
            v.state = match v.pid {
                Some(_) => state.into(),
                None => {
                    // Gone in the save: stopped, as `process_exited` leaves one.
                    let _ = std::fs::remove_file(state::control_path(&dir));
                    st::STOPPED.into()
                }
            };
        }
        v.state.clone()
    };
    let r = match r {
        Ok(r) if r["ok"] == true => r,
        // The save failed, and said why: the VM is as it was.
        Ok(r) => {
            back(&was);
            bail!(
                "saving '{name}' to {}: {}",
                path.display(),
                r["error"]
                    .as_str()
                    .unwrap_or("the VM process refused (no message)")
            );
        }
        // No answer (in time): the save may go on.
        Err(e) => match timed_out_save(&state::control_path(&dir), pid, keep).await {
            // Past its commit as the wait ran out: it completed.
            Some(late) => late,
            None => {
                back(&was);
                return Err(e.context(format!("saving '{name}' to {}", path.display())));
            }
        },
    };
    if r["late"] == true {
        tracing::warn!("the save completed after the daemon's wait for its answer ran out");
    }
    let now = if keep { back(&was) } else { "saved".into() };
    let mut reply = json!({
        "ok": true, "name": name, "path": path, "pages": r["pages"], "bytes": r["bytes"],
        "ms": r["ms"], "paused_ms": r["paused_ms"], "background": r["background"],
        "faults": r["faults"], "state": now,
    });
    if keep {
        tracing::info!(path = %path.display(), state = %now, "VM saved, and kept");
        return Ok(reply);
    }
    // Written: the VM process has stopped, or stops now.
    if !vmproc::wait_gone(pid, Duration::from_secs(10)).await {
        if let Err(e) = vmproc::stop(&state::control_path(&dir), pid, false, "saved").await {
            tracing::warn!("after the save: {e:#}");
        }
    }
    // Still this save's VM (a `destroy` may have ended it meanwhile, and the
    // name been given to another): its record keeps the name taken until
    // the directory is gone.
    let ours = d.reg().vms.get(name).is_some_and(|v| {
        v.state == st::SAVING && v.save_requested && v.pid.is_none_or(|p| p == pid)
    });
    if ours {
        let removed = state::remove_dir(&dir);
        d.reg().vms.remove(name);
        if let Err(e) = removed {
            reply["warning"] = json!(format!("{e:#}"));
        }
    }
    tracing::info!(path = %path.display(), "VM saved and stopped");
    Ok(reply)
}

/// A save whose answer did not come in time would go on after this reply,
/// and stop the VM: cancels it, which removes its unfinished file and leaves
/// the VM as it was (the VM process resumes a VM it paused for a snapshot
/// that failed). None then, or where the process cannot say. A save past
/// its commit (its file synced, being put in place) refuses the cancel and
/// completes: waited for, however long that takes; its answer then, where it
/// succeeded.
async fn timed_out_save(sock: &Path, pid: u32, keep: bool) -> Option<Value> {
    let cancel = vm_request(sock, &json!({"cmd": "cancel"}), Duration::from_secs(3)).await;
    let completing = cancel.ok()?["cancelled"] == false;
    tracing::warn!(
        completing,
        "save not answered in time: cancelling it (refused where it completes)"
    );
    // Until the process has removed the file and put the VM back, or has
    // put the file in place.
    let (until, status) = (
        Instant::now() + Duration::from_secs(10),
        json!({"cmd": "status"}),
    );
    loop {
        if !vmproc::alive(pid) {
            // A save that stops the VM ends its process once it succeeded;
            // one that keeps it, never.
            return (completing && !keep).then(|| json!({"ok": true, "late": true}));
        }
        match vm_request(sock, &status, Duration::from_secs(3)).await {
            Ok(s) if s["saving"].is_null() => {
                // Still running after its save: stopping the VM, it failed;
                // keeping it, its last answer says.
                let last = &s["last_save"];
                return (completing && keep && last["ok"] == true).then(|| last.clone());
            }
            Err(_) if !completing => return None,
            _ => {}
        }
        if !completing && Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Aborts the migration job of VM `name` (as `cancel` would) or its save (the
/// VM process stops writing, removes the unfinished file and goes on as
/// before the save; the `save` request fails "cancelled").
async fn abort(d: &Daemon, name: &str) -> Result<Value> {
    let (job, saving) = {
        let reg = d.reg();
        let Some(vm) = reg.vms.get(name) else {
            bail!(reg.no_vm(name));
        };
        (vm.job.clone(), vm.state == st::SAVING)
    };
    if let Some(id) = job {
        let mut r = jobs::job_command(d, &id, "cancel").await?;
        r["aborted"] = json!("migration");
        return Ok(r);
    }
    if !saving {
        bail!("VM '{name}' has no migration or save to abort");
    }
    let sock = state::control_path(&d.vm_dir(name));
    let r = vm_call(&sock, &json!({"cmd": "cancel"}), Duration::from_secs(10)).await?;
    if r["cancelled"] == false {
        bail!("too late: the save of '{name}' is past its commit (its file is complete)");
    }
    tracing::info!(vm = name, "save aborted");
    Ok(json!({"ok": true, "name": name, "aborted": "save"}))
}

/// Starts a VM named `name` from the snapshot file `path`, checked (all but
/// the page data) before any process starts; with `lazy` it runs at once and
/// its memory is filled from the file, which must stay in place until then.
async fn restore(d: &Arc<Daemon>, name: String, path: &Path, lazy: bool) -> Result<Value> {
    state::check_name(&name).map_err(anyhow::Error::msg)?;
    if lazy && d.cfg.hugepages {
        bail!(
            "this daemon gives its VMs huge pages (hugepages), which a lazy restore cannot \
             fill page by page: restore without --lazy"
        );
    }
    let path = existing_file(path, "snapshot")?;
    let p = path.clone();
    let snap = tokio::task::spawn_blocking(move || vmm::snapshot::LazySnapshot::open(&p))
        .await
        .context("checking the snapshot")??;
    // Before a process reads gigabytes of memory only to find that it cannot.
    migration::handshake::check_runs_here(&snap.state)
        .with_context(|| format!("restoring {}", path.display()))?;
    // Its stored pages take host memory at once (or, lazily, within
    // seconds), all of its memory where this daemon prefaults: refused
    // where that cannot fit beside what VMs still arriving will take, as an
    // arrival is, rather than left to the OOM killer, which may take another
    // VM. On huge pages the VM's memory is reserved whole when made, or
    // refused then.
    if !d.cfg.hugepages {
        let (needed, what) = if d.cfg.prefault && !lazy {
            (snap.memory, "its memory (this daemon prefaults)")
        } else {
            (snap.data_pages.saturating_mul(4096), "its stored pages")
        };
        let arriving: u64 = d
            .reg()
            .vms
            .values()
            .filter(|v| v.state == st::INCOMING)
            .map(|v| v.record.memory)
            .sum();
        let available = vmm::memory::mem_available()
            .unwrap_or(u64::MAX)
            .saturating_sub(arriving);
        if needed > available {
            bail!(
                "restoring {} needs {} MiB for {what}; this host has {} MiB available{}",
                path.display(),
                needed >> 20,
                available >> 20,
                if arriving > 0 {
                    format!(" besides {} MiB for VMs still arriving", arriving >> 20)
                } else {
                    String::new()
                }
            );
        }
    }
    // Its boot section passes the checks of a migration's Boot message, or
    // the file is refused, before the VM exists.
    let boot_spec = snap.boot.as_ref().and_then(state::wire_boot);
    if let Some(spec) = &boot_spec {
        spec.check().map_err(|e| {
            let why = match e {
                wire::WireError::Malformed(why) => why,
                other => other.to_string(),
            };
            anyhow::anyhow!(
                "restoring {}: its boot section is refused: {why}",
                path.display()
            )
        })?;
    }
    let mut boot = vec!["--restore".to_string(), path_arg(Some(&path))?];
    if lazy {
        boot.push("--lazy".into());
    }
    let mut record = VmRecord {
        name,
        kernel: None,
        initramfs: None,
        cmdline: String::new(),
        memory: snap.memory,
        vcpus: snap.state.vcpus.len() as u32,
        created: state::now(),
        origin: Origin::Restored,
        source: Some(path.display().to_string()),
        boot_refused: None,
    };
    // The file says how the VM boots (as virsh's save image keeps the
    // domain); its files are taken only from `boot_dirs`.
    if let Some(spec) = boot_spec {
        record.adopt_boot_spec(spec, &d.boot_dirs, "its snapshot file");
    }
    start_vm(d, record, boot).await
}

/// VM `name` as a reply to its start shows it: with its first status
/// (memory used, a lazy restore's filling), not the nulls of a VM not asked
/// yet; `started` if it is gone meanwhile.
async fn first_status(d: &Daemon, name: &str, started: VmEntry, dir: &Path) -> Value {
    state::refresh(d, name).await;
    let vm = d.reg().vms.get(name).cloned().unwrap_or(started);
    vm.to_json(dir)
}

fn existing_file(p: &Path, what: &str) -> Result<PathBuf> {
    let abs = std::fs::canonicalize(p)
        .map_err(|e| anyhow::anyhow!("{what} {} does not exist ({e})", p.display()))?;
    if !abs.is_file() {
        bail!("{what} {} is not a file", p.display());
    }
    Ok(abs)
}

/// Memory as `migd run --memory` reads it (a bare number there means MiB).
pub fn memory_arg(bytes: u64) -> String {
    format!("{}K", bytes.div_ceil(1024))
}

/// Creates the VM directory and process; waits until its control socket answers.
/// The `migd run` flags for the kind of guest memory this daemon gives its
/// VMs; `lazy`: a lazy restore, which fills absent pages and so is never
/// prefaulted.
pub(super) fn memory_flags(cfg: &super::config::Config, lazy: bool) -> Vec<String> {
    let mut flags = Vec::new();
    if cfg.hugepages {
        flags.push("--hugepages".to_string());
    }
    if cfg.prefault && !lazy {
        flags.push("--prefault".to_string());
    }
    flags
}

async fn spawn_vm(
    d: &Daemon,
    r: &VmRecord,
    boot: Vec<String>,
    dir: &Path,
) -> Result<(tokio::process::Child, String, u32)> {
    use std::os::unix::fs::DirBuilderExt;
    // `start` reuses the directory of a stopped VM.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    state::write_json_atomic(&state::record_path(dir), r)?;
    let control = state::control_path(dir);
    // One argument: a name can never be read as a flag of its own.
    let mut args = vec![format!("--name={}", r.name)];
    args.extend(boot);
    args.extend([
        "--serial".into(),
        path_arg(Some(&state::console_path(dir)))?,
        "--control".into(),
        path_arg(Some(&control))?,
        "--migrated-file".into(),
        path_arg(Some(&state::migrated_path(dir)))?,
        "--unconfirmed-file".into(),
        path_arg(Some(&state::unconfirmed_path(dir)))?,
        format!("--postcopy-nice={}", d.cfg.postcopy_nice),
        format!("--dirty-ring={}", d.cfg.dirty_ring),
    ]);
    let lazy = args.iter().any(|a| a == "--lazy");
    args.extend(memory_flags(&d.cfg, lazy));
    if let Some(t) = &d.tls {
        // The VM process opens migration connections of its own (fault
        // channel, recovery) and needs the same credentials.
        args.extend(migd::tls_args::TlsArgs::to_args(&t.files));
    }
    let log = state::log_path(dir);
    let mut child = vmproc::spawn(&d.exe, &args, &log, &vmproc::lock_path(dir), None, None)?;
    let pid = child.id().context("VM process has no pid")?;
    let started = Instant::now();
    let stall = create_stall();
    let mut work = vmproc::work_done(pid);
    let mut worked_at = started;
    loop {
        if let Some(status) = child.try_wait()? {
            let why = vmproc::last_error_line(&log).unwrap_or_else(|| "no message".into());
            bail!("VM process exited ({status}): {why}");
        }
        if control.exists() {
            if let Ok(s) =
                vm_request(&control, &json!({"cmd": "status"}), Duration::from_secs(2)).await
            {
                if s["ok"] == true {
                    let state = s["state"].as_str().unwrap_or(st::RUNNING).to_string();
                    return Ok((child, state, pid));
                }
            }
        }
        let now = Instant::now();
        let w = vmproc::work_done(pid);
        if w != work {
            work = w;
            worked_at = now;
        }
        let why = if now.duration_since(worked_at) > stall {
            format!("did no work for {stall:?} and did not answer")
        } else if now.duration_since(started) > CREATE_LIMIT {
            format!("did not answer within {CREATE_LIMIT:?}")
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = child.start_kill();
        let _ = child.wait().await;
        // A failed create removes the directory, log and all: quote it.
        let last = vmproc::last_error_line(&log).unwrap_or_else(|| "nothing".into());
        bail!("VM process {why} on its control socket; stopped it (its log ends: {last})");
    }
}

/// Ends the process of VM `name`, found at this daemon's start and not
/// answering since (stopped, or hung): with `force`, by SIGKILL, found by
/// the lock it holds, and waits until the VM is adopted as the process left
/// it (stopped, or unconfirmed if it died past a migration's commit), so
/// that the destroy goes on as for any VM without a process.
async fn kill_silent(d: &Daemon, name: &str, force: bool) -> Result<()> {
    let dir = d.vm_dir(name);
    let Some(pid) = vmproc::lock_holder(&dir) else {
        // Its process may just have ended, the adoption not seen it yet.
        if wait_adopted(d, name, Duration::from_secs(5)).await {
            return Ok(());
        }
        bail!(
            "{}; no process holds {} (one started by an older migd holds none): find \
             it (`pgrep -af -- 'migd run.*--name[= ]{name}( |$)'`) and stop it by hand",
            d.reg().no_vm(name),
            vmproc::lock_path(&dir).display()
        );
    };
    let what = format!("process {pid}");
    if !force {
        bail!(
            "{}; `destroy --force` kills {what} (if its VM is arriving or has just \
             migrated away, that process may hold its only copy)",
            d.reg().no_vm(name)
        );
    }
    tracing::warn!(pid, "killing a VM process that does not answer");
    // SAFETY: a signal to the process holding this VM's lock.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    if !wait_adopted(d, name, Duration::from_secs(10)).await {
        bail!("VM '{name}': {what} does not go (killed; still adopting it)");
    }
    Ok(())
}

/// Waits up to `limit` for VM `name` to be adopted (or found gone); whether it was.
async fn wait_adopted(d: &Daemon, name: &str, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while d.reg().adopting.contains(name) {
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

fn path_arg(p: Option<&Path>) -> Result<String> {
    let p = p.context("missing path")?;
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

async fn destroy(d: &Daemon, name: &str, force: bool) -> Result<Value> {
    let silent = d.reg().adopting.contains(name);
    if silent {
        kill_silent(d, name, force).await?;
        // Adopted as gone (an arrival that never ran here, a VM that had
        // migrated away): the daemon removed what was left of it.
        if !d.reg().vms.contains_key(name) {
            tracing::info!("VM destroyed (its process killed; nothing of it was left)");
            return Ok(json!({"ok": true, "name": name}));
        }
    }
    let (pid, before) = {
        let mut reg = d.reg();
        if let Some(why) = reg.job_in_the_way(name) {
            bail!(why);
        }
        let Some(vm) = reg.vms.get_mut(name) else {
            bail!(reg.no_vm(name));
        };
        // A save in progress is cancelled: its VM process stops once the
        // save has removed its unfinished file (or, past its commit, once
        // the file is complete and in place).
        if [st::CREATING, st::DESTROYING].contains(&vm.state.as_str()) {
            bail!("VM '{name}' is {}; try again", vm.state);
        }
        // Admitted by a handshake still under way (30 s at most): its
        // process is about to start under this name.
        if vm.state == st::INCOMING && vm.pid.is_none() {
            bail!("VM '{name}' is arriving (its migration's handshake is under way); try again in a moment");
        }
        // (With a process, that process refuses the same way.)
        if vm.state == st::UNCONFIRMED && vm.pid.is_none() && !force {
            let why = vm.unconfirmed.clone().unwrap_or_default();
            bail!(
                "VM '{name}' is unconfirmed ({why}); its memory here may be what the \
                 destination still needs: destroy it with --force once you know"
            );
        }
        let before = std::mem::replace(&mut vm.state, st::DESTROYING.into());
        (vm.pid, before)
    };
    let dir = d.vm_dir(name);
    if let Some(pid) = pid {
        let stopped = match vmproc::stop(
            &state::control_path(&dir),
            pid,
            force,
            "destroyed by the operator",
        )
        .await
        {
            Err(e) => Err(anyhow::anyhow!("VM '{name}' not destroyed: {e:#}")),
            Ok(()) if vmproc::alive(pid) => Err(anyhow::anyhow!(
                "VM process {pid} of '{name}' does not stop"
            )),
            Ok(()) => Ok(()),
        };
        if stopped.is_err() {
            // Back to the state it had (paused, migrated, saving...). If its
            // process ended meanwhile, what process_exited left alone while
            // the VM was destroying is done now.
            let exited = match d.reg().vms.get_mut(name) {
                Some(v) if v.state == st::DESTROYING => {
                    v.state = before;
                    let exited = v.pid.is_none();
                    if exited {
                        v.pid = Some(pid);
                    }
                    exited
                }
                _ => false,
            };
            if exited {
                state::process_exited(d, name, pid, None);
            }
        }
        stopped?;
    }
    let removed = state::remove_dir(&dir);
    d.reg().vms.remove(name);
    removed?;
    tracing::info!("VM destroyed");
    Ok(json!({"ok": true, "name": name}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_problem() {
        let e = parse(b"{not json").unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        let e = parse(b"[1]").unwrap_err();
        assert!(e.contains("JSON object"), "{e}");
        let e = parse(b"{\"name\":\"a\"}").unwrap_err();
        assert!(e.contains("missing \"cmd\""), "{e}");
        let e = parse(b"{\"cmd\":\"fly\"}").unwrap_err();
        assert!(e.starts_with("unknown command 'fly'"), "{e}");
        let e = parse(b"{\"cmd\":\"info\"}").unwrap_err();
        assert!(e.contains("missing field `name`"), "{e}");
        let e = parse(
            b"{\"cmd\":\"create\",\"name\":\"a\",\"kernel\":\"k\",\"memory\":\"lots\",\"vcpus\":1}",
        )
        .unwrap_err();
        assert!(e.contains("not a size"), "{e}");
        let e = parse(b"{\"cmd\":\"save\",\"name\":\"a\"}").unwrap_err();
        assert!(
            e.contains("bad 'save' request: missing field `path`"),
            "{e}"
        );
        assert!(matches!(
            parse(b"{\"cmd\":\"restore\",\"name\":\"a\",\"path\":\"/s\"}"),
            Ok(Request::Restore { lazy: false, .. })
        ));
        assert!(parse(b"{\"cmd\":\"list\"}").is_ok());
        assert!(matches!(
            parse(b"{\"cmd\":\"create\",\"name\":\"a\",\"kernel\":\"k\",\"memory\":\"128M\",\"vcpus\":1}"),
            Ok(Request::Create(CreateRequest { memory: 134217728, .. }))
        ));
        // A key the command does not know: refused, naming it, where a
        // typo'd `keep` used to stop and remove the VM.
        let e =
            parse(b"{\"cmd\":\"save\",\"name\":\"a\",\"path\":\"/s\",\"kep\":true}").unwrap_err();
        assert!(
            e.contains("bad 'save' request: unknown field `kep` (known: keep, name, path)"),
            "{e}"
        );
        let e = parse(b"{\"cmd\":\"list\",\"all\":1}").unwrap_err();
        assert!(e.contains("unknown field `all`"), "{e}");
        // Every key migctl and evacuate send is known, flattened options included.
        let migrate = json!({"cmd": "migrate", "name": "a", "to": "h:1", "mode": "auto",
            "max_downtime_ms": 300, "max_bandwidth": null, "detach": true,
            "prepaging_window": null, "no_fault_channel": false, "xbzrle_cache": null,
            "streams": null, "auto_converge": false, "compress": null, "reorder": false,
            "no_clear_before_send": false, "strict_downtime": false, "verify": false});
        let r = parse(migrate.to_string().as_bytes());
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn memory_flags_leave_prefault_out_of_lazy_restores() {
        let cfg = |hugepages, prefault| super::super::config::Config {
            hugepages,
            prefault,
            ..super::super::config::Config::for_tests(std::path::Path::new("/nonexistent"))
        };
        assert!(memory_flags(&cfg(false, false), false).is_empty());
        assert_eq!(memory_flags(&cfg(false, true), false), ["--prefault"]);
        assert!(memory_flags(&cfg(false, true), true).is_empty());
        assert_eq!(
            memory_flags(&cfg(true, true), false),
            ["--hugepages", "--prefault"]
        );
    }

    #[tokio::test]
    async fn a_failed_destroy_gives_the_vm_its_state_back() {
        let state_dir =
            std::env::temp_dir().join(format!("migd-api-destroy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let d = Arc::new(Daemon::for_tests(&state_dir, Default::default()));
        // The VM processes: one that lives through the test (were it ever
        // signalled, no harm done), faked on each VM's control socket, where
        // it refuses to stop; with `exits`, it is found gone meanwhile.
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = sleeper.id();
        let fake_vm = |name: &str, exits: bool| {
            std::fs::create_dir_all(d.vm_dir(name)).unwrap();
            let listener = UnixListener::bind(state::control_path(&d.vm_dir(name))).unwrap();
            let (d, name) = (d.clone(), name.to_string());
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    let (r, mut w) = s.into_split();
                    let mut line = String::new();
                    let _ = BufReader::new(r).read_line(&mut line).await;
                    if exits {
                        if let Some(vm) = d.reg().vms.get_mut(&name) {
                            vm.pid = None;
                        }
                    }
                    let reply = json!({"ok": false, "error": "busy"});
                    let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
                }
            });
        };
        let record = |name: &str| VmRecord::for_tests(name, Origin::default());
        for (i, (before, exits, after)) in [
            (st::MIGRATED, false, Some(st::MIGRATED)),
            (st::PAUSED, false, Some(st::PAUSED)),
            (st::RUNNING, false, Some(st::RUNNING)),
            (st::SAVING, false, Some(st::SAVING)),
            // Its process gone meanwhile: as process_exited has it.
            (st::PAUSED, true, Some(st::STOPPED)),
            (st::MIGRATED, true, None),
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("vm{i}");
            fake_vm(&name, exits);
            let vm = VmEntry::new(record(&name), before, Some(pid));
            d.reg().vms.insert(name.clone(), vm);
            let e = destroy(&d, &name, false).await.unwrap_err();
            assert!(format!("{e:#}").contains("refuses to stop: busy"), "{e:#}");
            let state = d.reg().vms.get(&name).map(|v| v.state.clone());
            assert_eq!(state.as_deref(), after, "{before}, exits {exits}");
        }
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        let _ = std::fs::remove_dir_all(&state_dir);
    }

    #[test]
    fn memory_argument_is_not_read_as_mib() {
        assert_eq!(memory_arg(128 << 20), "131072K");
        assert_eq!(
            migd::size::parse_size(&memory_arg(128 << 20)),
            Ok(128 << 20)
        );
    }
}
