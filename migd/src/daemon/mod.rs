//! The per-host daemon: a JSON-lines API on a root-only unix socket, one process per
//! VM (spawned detached, so VMs outlive the daemon), re-attachment on restart,
//! migration jobs, and the TCP listener for incoming migrations.

mod api;
mod config;
mod incoming;
mod jobs;
mod metrics;
mod state;
mod vmproc;

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use tokio::net::UnixListener;

pub use config::Config;
use jobs::Job;
use state::VmEntry;

/// Flags of the daemon (`migd` with no subcommand); each is also a config-file key.
#[derive(clap::Args, Debug, Default)]
pub struct DaemonArgs {
    /// TOML config file; every key has a flag of the same name, and flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the TCP listener for incoming migrations [default: 0.0.0.0:7070].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Control socket for migctl [default: /run/migd/migd.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// State directory: VM records, consoles, logs, jobs [default: /var/lib/migd].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Allow plaintext, unauthenticated migration streams when no TLS is configured.
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub tls: migd::tls_args::TlsArgs,
    /// Host-wide bandwidth cap of outgoing migrations, shared fairly by the jobs
    /// running at once, e.g. 1G (bytes/s; a bare number is MiB/s); 0 is refused,
    /// leave it out for no cap [default: none].
    #[arg(long, value_name = "RATE", value_parser = migd::size::parse_size)]
    pub max_bandwidth: Option<u64>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address [default: off].
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    /// Nice value (-20 to 0) of the threads that move post-copy's pages, in
    /// every VM process (source and destination): on a host whose cores are all
    /// busy they run before vCPUs, and the phase ends sooner; 0 leaves them as
    /// they are [default: -10].
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-20..=0))]
    pub postcopy_nice: Option<i32>,
    /// Track the VMs' dirty pages with KVM's dirty ring of N entries per vCPU
    /// (a power of two, 256 to 65536, checked at start) instead of the bitmap
    /// log; 0: the bitmap [default: 0]. Turn it on only where
    /// `tests/dirty_ring.rs` passes on the host.
    #[arg(long, value_name = "N")]
    pub dirty_ring: Option<u32>,
    /// Keep the VMs' memory on huge pages (2 MiB, from the host's pool,
    /// `vm.nr_hugepages`, which must hold every VM's memory): no page fault
    /// per 4 KiB page, so an arriving VM's pages are stored faster. Post-copy
    /// then places 2 MiB at a time (a fault waits for its whole huge page),
    /// saves happen in the pause, and lazy restore is refused.
    #[arg(long)]
    pub hugepages: bool,
    /// Allocate all of a VM's memory when its process starts (booted,
    /// restored or arriving; not a lazy restore), as QEMU's `-mem-prealloc`
    /// does: the memory is the VM's from the start, and an arriving VM's
    /// pages are stored without the kernel allocating each. An arriving
    /// VM's migration starts once it is all allocated (~0.1 s per GiB of
    /// huge pages here, ~0.5 s per GiB of 4 KiB pages).
    #[arg(long)]
    pub prefault: bool,
    /// A directory from which a kernel or initramfs that a migration's
    /// source or a snapshot file names may be booted (`start` of an arrived
    /// or restored VM), checked with symlinks resolved; never the state
    /// dir. Repeat the flag for several; given, it replaces the config's
    /// `boot_dirs` [default: /var/lib/migd-images]. Paths given to `create`
    /// are not limited.
    #[arg(long = "boot-dir", value_name = "DIR")]
    pub boot_dirs: Vec<PathBuf>,
}

/// VMs and jobs known to this daemon.
#[derive(Default)]
pub struct Registry {
    pub vms: BTreeMap<String, VmEntry>,
    pub jobs: BTreeMap<String, Job>,
    pub next_job: u64,
    /// VMs found at start whose process is too busy to answer yet: adopted
    /// in the background, their jobs left alone until then.
    pub adopting: std::collections::BTreeSet<String>,
    /// Jobs whose `migrate` request the VM process has not answered yet: a
    /// cancel for one waits for that answer (sent earlier, the VM process
    /// would find no migration to cancel, and then start it).
    pub starting: std::collections::BTreeSet<String>,
}

impl Registry {
    /// The error for a request naming `name`, which is no VM here: unless
    /// its process, found at this daemon's start, does not answer yet.
    pub fn no_vm(&self, name: &str) -> String {
        if self.adopting.contains(name) {
            format!(
                "VM '{}' has a VM process that does not answer (busy, or stopped): this \
                 daemon takes it on once it answers; until then it cannot act on it",
                name.escape_debug()
            )
        } else {
            format!("no VM named '{}'", name.escape_debug())
        }
    }

    /// Why VM `name`'s migration job stands in the way of a change to it,
    /// and what to do: cancel it, or, in post-copy (which cannot be
    /// cancelled: the destination runs the VM), wait for it to complete, or
    /// for its recovery where its link was lost (a cancel then gives the
    /// recovery up).
    pub fn job_in_the_way(&self, name: &str) -> Option<String> {
        let vm = self.vms.get(name)?;
        let j = vm.job.as_ref()?;
        let status = self.jobs.get(j).map_or("", |job| job.status.as_str());
        Some(if vm.state == state::st::MIGRATED {
            format!("VM '{name}' has migrated (job {j}) and is being removed here")
        } else if status == "postcopy-paused" {
            format!(
                "VM '{name}' is being migrated (job {j}) in post-copy and its link was lost: \
                 the destination runs it and needs this host's pages; the source reconnects by \
                 itself (`migctl recover {j}` retries now once the link is back): wait for the \
                 job to complete (cancelling it gives the recovery up)"
            )
        } else if status.starts_with("postcopy-") {
            format!(
                "VM '{name}' is being migrated (job {j}) in post-copy: the destination runs it \
                 and needs this host's pages; wait for the job to complete"
            )
        } else {
            format!("VM '{name}' is being migrated (job {j}); cancel the job first")
        })
    }
}

/// Shared state of the running daemon.
pub struct Daemon {
    pub cfg: Config,
    /// This binary, resolved at start (an upgrade may replace the file later).
    pub exe: PathBuf,
    reg: Mutex<Registry>,
    /// Counters for the Prometheus endpoint.
    pub metrics: metrics::Metrics,
    /// TLS for migration streams (None: plaintext with --insecure, or none at all).
    pub tls: Option<link::TlsSetup>,
    /// Where a kernel or initramfs named by a peer or a snapshot file may be
    /// taken from (`boot_dirs`).
    pub boot_dirs: state::BootDirs,
}

impl Daemon {
    /// A daemon for unit tests: state under `state_dir`, the registry `reg`,
    /// no TLS, no VM process binary.
    #[cfg(test)]
    pub fn for_tests(state_dir: &std::path::Path, reg: Registry) -> Daemon {
        Daemon {
            cfg: config::Config::for_tests(state_dir),
            exe: "/bin/false".into(),
            reg: Mutex::new(reg),
            metrics: Default::default(),
            tls: None,
            boot_dirs: state::BootDirs {
                dirs: Vec::new(),
                state_dir: state_dir.to_path_buf(),
            },
        }
    }

    /// Locks the registry (never held across an await).
    pub fn reg(&self) -> MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("vms")
    }

    pub fn jobs_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("jobs")
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir().join(name)
    }
}

/// Tells systemd (a `Type=notify` unit: `NOTIFY_SOCKET`) that the daemon
/// serves its socket, as sd_notify(3) `READY=1` does: `systemctl start` and
/// what is ordered after the unit wait for it. Nothing without the variable.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    let sent = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| addr.and_then(|a| s.send_to_addr(b"READY=1\n", &a)));
    if let Err(e) = sent {
        tracing::warn!("telling systemd the daemon is ready ({path}): {e}");
    }
}

/// Runs `f`, blocking file work (an fsync), so that the runtime's other
/// tasks move to another worker meanwhile: the daemon has two, and a slow
/// disk must not stall its API, its accepts and its job trackers.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Marks every descriptor this process inherited, beyond stdin, stdout and
/// stderr, close-on-exec: a pipe its starter left open reached every VM
/// process (which live for months), and whoever waited for that pipe's end
/// waited as long.
fn close_inherited_on_exec() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC (Linux 5.11) only sets
    // a flag on descriptors; it closes nothing.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if rc == 0 {
        return;
    }
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl on a descriptor number of this process: F_GETFD and
        // F_SETFD only change its close-on-exec flag (a number that closed
        // meanwhile, the directory's own, fails harmlessly).
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Raises this process's soft limit on descriptors to its hard limit (a
/// daemon started by hand often has 1024, where each migration, VM and
/// connection takes some); its VM processes inherit it.
fn raise_descriptor_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit that we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT; returns the exit code.
pub fn main(args: DaemonArgs) -> Result<i32> {
    close_inherited_on_exec();
    raise_descriptor_limit();
    let cfg = Config::load(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Held until the runtime's last tasks (job trackers, a `finish`) are
    // gone, not only until `serve` returns: a second daemon must not act on
    // the state dir beside them.
    let lock = prepare_state_dir(&cfg.state_dir)?;
    let code = rt.block_on(serve(cfg));
    // Do not wait for a handshake still blocked on a slow peer.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    drop(lock);
    code
}

/// Creates the state dir and its `vms` and `jobs` (0700) and locks it.
fn prepare_state_dir(state_dir: &Path) -> Result<std::fs::File> {
    for d in [state_dir, &state_dir.join("vms"), &state_dir.join("jobs")] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .with_context(|| format!("creating {}", d.display()))?;
    }
    lock_state_dir(state_dir)
}

/// Logs the `boot_dirs` setting, with a warning for a directory that can
/// never allow a file (missing, or in the state dir).
fn log_boot_dirs(b: &state::BootDirs) {
    let state = std::fs::canonicalize(&b.state_dir).unwrap_or_else(|_| b.state_dir.clone());
    for d in &b.dirs {
        match std::fs::canonicalize(d) {
            Ok(real) if real.starts_with(&state) => tracing::warn!(
                dir = %d.display(),
                "boot_dirs: this directory is in the state dir, whose files are never booted from"
            ),
            Ok(real) if real.is_dir() => {}
            Ok(_) => tracing::warn!(dir = %d.display(), "boot_dirs: not a directory"),
            Err(e) => tracing::info!(
                dir = %d.display(),
                "boot_dirs: this directory is not there ({e}); arriving or restored VMs keep no \
                 kernel from it until it is"
            ),
        }
    }
    let dirs: Vec<String> = b.dirs.iter().map(|d| d.display().to_string()).collect();
    tracing::info!(
        boot_dirs = %dirs.join(", "),
        "kernels and initramfs named by a migration's source or a snapshot file are taken only from these"
    );
}

async fn serve(cfg: Config) -> Result<i32> {
    let exe = std::env::current_exe().context("finding the migd binary")?;
    let metrics_listener = match &cfg.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let tls = match &cfg.tls {
        Some(files) => Some(link::TlsSetup::load(files).context("loading the TLS configuration")?),
        None => None,
    };
    let listener = bind_control(&cfg.socket)?;
    // Removed however this function ends (a migration port in use, say), so
    // that no socket is left that nobody answers.
    let _socket_file = RemovedOnDrop(cfg.socket.clone());
    let boot_dirs = state::BootDirs {
        dirs: cfg.boot_dirs.clone(),
        state_dir: cfg.state_dir.clone(),
    };
    log_boot_dirs(&boot_dirs);
    let daemon = Arc::new(Daemon {
        tls,
        boot_dirs,
        cfg,
        exe,
        reg: Mutex::new(Registry::default()),
        metrics: metrics::Metrics::default(),
    });
    if let Some(l) = metrics_listener {
        metrics::serve(daemon.clone(), l);
    }
    jobs::load(&daemon);
    state::adopt_all(&daemon).await;
    jobs::finish_orphans(&daemon, None);
    if daemon.tls.is_some() {
        if daemon.cfg.insecure {
            tracing::warn!("insecure is ignored: TLS is configured, every stream uses it (a VM process started without TLS is not migrated)");
        }
        incoming::start(daemon.clone()).await?;
    } else if daemon.cfg.insecure {
        tracing::warn!(
            "migration streams are PLAINTEXT and unauthenticated (--insecure): anyone who \
             reaches the listener can send VMs, and guest memory crosses the network readable"
        );
        incoming::start(daemon.clone()).await?;
    } else {
        tracing::warn!(
            "incoming and outgoing migrations are disabled: configure TLS (tls_ca, tls_cert, \
             tls_key, tls_peers) or allow plaintext streams with --insecure"
        );
    }
    {
        let vms = daemon.reg().vms.len();
        tracing::info!(
            socket = %daemon.cfg.socket.display(),
            state_dir = %daemon.cfg.state_dir.display(),
            listen = %daemon.cfg.listen,
            insecure = daemon.cfg.insecure,
            tls = daemon.tls.is_some(),
            metrics = daemon.cfg.metrics_listen.as_deref().unwrap_or("off"),
            vms,
            pid = std::process::id(),
            "migd ready"
        );
    }
    tokio::spawn(state::supervise(daemon.clone()));
    tokio::spawn(api::serve(daemon.clone(), listener));
    notify_ready();

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: exiting, VMs keep running"),
        _ = int.recv() => tracing::info!("SIGINT: exiting, VMs keep running"),
    }
    Ok(0)
}

/// A file removed when this is dropped.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Holds an exclusive lock on `<state>/migd.lock` so two daemons never share a state dir.
fn lock_state_dir(dir: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("migd.lock");
    let Some(mut f) = vmproc::lock_exclusive(&path)? else {
        let mut holder = String::new();
        let _ = std::fs::File::open(&path).and_then(|mut h| h.read_to_string(&mut holder));
        bail!(
            "state dir {} is in use by another migd (pid {}); give each daemon its own --state-dir",
            dir.display(),
            holder.trim()
        );
    };
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// Binds the control socket with mode 0600, replacing a stale one.
fn bind_control(path: &Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "control socket {} is in use by another migd; stop it or use --socket",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = migd::process::bind_private(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    l.set_nonblocking(true)?;
    Ok(UnixListener::from_std(l)?)
}
