//! `migd run`: one VM in the foreground of this process.

use std::io::BufReader;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use migration::bitmap::set_pages;
use migration::precopy::{self, Job, Outcome};
use nix::sys::signal::{SigSet, Signal};
use serde_json::json;
use vmm::snapshot::WriteProgress;
use vmm::{BootSpec, GuestRam, Vm, VmConfig, VmExit, VmState};

use crate::handover::{self, HandoverHeader};
use crate::size::parse_size;
use arrival::Arrival;

mod arrival;

/// Arguments of `migd run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Kernel: an ELF with a PVH note (e.g. the test guest) or a Linux bzImage.
    #[arg(long, required_unless_present_any = ["restore", "takeover", "incoming_fd", "incoming"])]
    pub kernel: Option<PathBuf>,
    /// Initramfs to load with the kernel.
    #[arg(long, alias = "initrd")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest RAM, e.g. 512M, 1G, 4G (a bare number is MiB).
    #[arg(long, value_parser = parse_size, default_value = "512M")]
    pub memory: u64,
    /// Number of vCPUs (1-8).
    #[arg(long, default_value_t = 1)]
    pub cpus: usize,
    /// File the serial console is appended to (follow it with `tail -f`).
    #[arg(long)]
    pub serial: Option<PathBuf>,
    /// On SIGUSR1, write a snapshot to FILE and keep running; on SIGUSR2, write it and stop.
    #[arg(long, value_name = "FILE")]
    pub snapshot_on_signal: Option<PathBuf>,
    /// Start from a snapshot file instead of booting a kernel.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "takeover"])]
    pub restore: Option<PathBuf>,
    /// With --restore: resume the VM at once and fill its memory from the file
    /// on demand (userfaultfd) and in the background, working set first. The
    /// page-data checksum is checked by the background filler: a mismatch
    /// stops the VM (non-zero exit).
    #[arg(long, requires = "restore")]
    pub lazy: bool,
    /// Serve a control socket (JSON lines: status, pause, resume, snapshot, handover, stop).
    #[arg(long, value_name = "SOCKET")]
    pub control: Option<PathBuf>,
    /// Once an outgoing migration has completed (the VM runs elsewhere for
    /// good), write its final statistics here as JSON: the daemon that finds
    /// this VM's directory after the process is gone learns that it left.
    #[arg(long, value_name = "PATH")]
    pub migrated_file: Option<PathBuf>,
    /// Before an outgoing migration's commit (the destination may run the
    /// VM from then on), write why into this file: the daemon that finds
    /// the process gone, even after its own restart, lists the VM
    /// unconfirmed rather than stopped (a start would run it twice). A
    /// forced resume here removes it.
    #[arg(long, value_name = "PATH")]
    pub unconfirmed_file: Option<PathBuf>,
    /// With --incoming or --incoming-fd: once the VM arrived and runs here,
    /// create this file: the daemon that sees the process end learns that
    /// the VM ran here (a VM of this host now), not that it never arrived.
    #[arg(long, value_name = "PATH")]
    pub arrived_file: Option<PathBuf>,
    /// Take over the VM of another `migd run` through its control socket (memory shared, not copied).
    #[arg(long, value_name = "SOCKET", conflicts_with = "kernel")]
    pub takeover: Option<PathBuf>,
    /// Name of the VM (for logs and status).
    #[arg(long)]
    pub name: Option<String>,
    /// Receive the VM from a migration source over this inherited, already
    /// handshaken TCP socket (used by the daemon; needs --memory).
    #[arg(long, value_name = "FD", conflicts_with_all = ["kernel", "restore", "takeover"])]
    pub incoming_fd: Option<i32>,
    /// Wait for one incoming migration on ADDR:PORT (like QEMU's -incoming tcp:),
    /// do the handshake here, and run the VM that arrives (needs --memory and --cpus
    /// matching the source).
    #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["kernel", "restore", "takeover", "incoming_fd"])]
    pub incoming: Option<String>,
    /// With --incoming-fd: the TLS session of that socket, passed by the daemon
    /// through this descriptor (a pipe).
    #[arg(long, value_name = "FD", requires = "incoming_fd")]
    pub incoming_link_fd: Option<i32>,
    /// Nice value (-20 to 0) of the threads that move post-copy's pages, as
    /// source or destination (0 leaves them as they are). See `migd
    /// --postcopy-nice`.
    #[arg(long, value_name = "N", default_value_t = migd::config_file::DEFAULT_POSTCOPY_NICE,
          allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=0))]
    pub postcopy_nice: i32,
    /// Track dirty pages with KVM's dirty ring of N entries per vCPU (a power
    /// of two, 256 to 65536) instead of the bitmap log; 0: the bitmap. See
    /// `migd --dirty-ring`.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub dirty_ring: u32,
    /// Keep guest memory on huge pages (2 MiB, from the host's pool,
    /// `vm.nr_hugepages`): no page fault per 4 KiB page. `--lazy` is
    /// refused, and saves happen in the pause. See `migd --hugepages`.
    #[arg(long)]
    pub hugepages: bool,
    /// Allocate all of guest memory when the VM is made, as QEMU's
    /// `-mem-prealloc` does, so that no write waits for the kernel to
    /// allocate and zero its page. An incoming VM is then ready (its
    /// control socket appears) only once it is all allocated: ~0.1 s per
    /// GiB of huge pages here, ~0.5 s per GiB of 4 KiB pages, spent before
    /// the migration instead of during it. The VM's next migration still
    /// reads only the pages with data (on 4 KiB pages, guest memory's
    /// mappings are locked on fault for that). Not with --lazy.
    #[arg(long, conflicts_with = "lazy")]
    pub prefault: bool,
    #[command(flatten)]
    pub tls: migd::tls_args::TlsArgs,
    /// Leave the VM paused after start or restore.
    #[arg(long)]
    pub paused: bool,
}

enum Event {
    Signal(Signal),
    Exit(VmExit),
    Control(UnixStream, serde_json::Value),
    Migrated(Outcome),
    Saved(SaveDone),
    Linger,
}

/// A save to start: from a control request or a snapshot signal.
struct SaveRequest {
    path: PathBuf,
    /// Stop the VM process once written (`virsh save`), rather than run on.
    stop: bool,
    /// Write the pages while the VM runs (a running VM that runs on).
    background: bool,
    /// How the VM boots, for the file.
    boot: Option<BootSpec>,
}

/// A save, over: what the main loop needs to answer it.
struct SaveDone {
    /// The requester, waiting for the reply (None: a snapshot signal).
    stream: Option<UnixStream>,
    result: Result<Saved>,
    /// Stop the VM process once written (`virsh save`), rather than run on.
    stop: bool,
    /// The VM ran when the save began (it runs again afterwards unless `stop`).
    was_running: bool,
}

/// A snapshot being written by a thread of its own while the main loop goes
/// on answering (status shows its progress).
struct Saving {
    path: PathBuf,
    progress: Arc<WriteProgress>,
    /// End the process with this code once the save is over: the guest
    /// stopped, or the process was told to stop (which cancels the save).
    exit_after: Option<i32>,
}

/// What the main loop knows about a migration (or a save) of this VM.
#[derive(Default)]
struct Migrations {
    /// A snapshot being written (`snapshot` request).
    saving: Option<Saving>,
    /// The answer of the last save that ended with this process running on
    /// (`status`'s `last_save`): how a requester that gave up waiting learns
    /// what became of it.
    last_save: Option<serde_json::Value>,
    job: Option<Arc<Job>>,
    running: bool,
    migrated: bool,
    /// Mode of the latest migration.
    mode: String,
    /// A stop was asked for while a migration ran: stop once it ends.
    stop_when_done: bool,
    /// A stop signal came while post-copy pages still arrived: a thread
    /// repeats it once they are all here (or the arrival failed).
    stop_when_arrived: bool,
    /// An estimate is measuring the dirty rate (it owns the dirty log meanwhile).
    estimating: Arc<AtomicBool>,
    /// The VM left paused by a migration or handover that ended past its
    /// commit without the other side's word that it runs the VM there: why.
    /// The other side may run it, so this copy neither resumes nor moves
    /// again until the operator says so (`resume` with `force`).
    unconfirmed: Option<String>,
    /// `--unconfirmed-file`: where a migration's commit is noted.
    unconfirmed_file: Option<PathBuf>,
}

impl Migrations {
    /// Why nothing may run this VM a second time, or discard the copy that
    /// may be the only one: None unless a move ended unconfirmed.
    fn refusal(&self) -> Option<String> {
        self.unconfirmed.as_ref().map(|why| {
            format!(
                "this VM's last move ended unconfirmed ({why}): the other side may run it. \
                 Check there: if it runs the VM, destroy this copy (migctl destroy --force); \
                 if not, resume it here (migctl resume --force)"
            )
        })
    }

    /// Err([`Migrations::refusal`]) where there is one.
    fn check_confirmed(&self) -> Result<(), String> {
        self.refusal().map_or(Ok(()), Err)
    }
}

/// Progress of a lazy restore (`--restore FILE --lazy`), while it fills memory.
static LAZY: std::sync::OnceLock<Arc<migration::lazy::LazyProgress>> = std::sync::OnceLock::new();

/// TLS for this VM's migration connections (None: plaintext).
static TLS: std::sync::OnceLock<Option<link::TlsSetup>> = std::sync::OnceLock::new();

fn tls() -> Option<&'static link::TlsSetup> {
    TLS.get().and_then(|t| t.as_ref())
}

/// How this VM boots from its kernel, where this process knows it (booted
/// from `--kernel`, restored from a file that carries it): what a snapshot
/// records when its request names none.
static OWN_BOOT: std::sync::OnceLock<BootSpec> = std::sync::OnceLock::new();
/// The post-copy phase of the migration that brought this VM here, if any.
static ARRIVING: std::sync::OnceLock<migration::postcopy::PostcopyWatch> =
    std::sync::OnceLock::new();

/// True while post-copy pages are still arriving: the VM's state since the
/// switch lives only here, and its source lacks it.
fn post_copy_arriving() -> bool {
    ARRIVING
        .get()
        .is_some_and(|w| !matches!(w.status().status.as_str(), "completed" | "failed"))
}

/// True while a lazy restore or an incoming post-copy has not filled every
/// page: the memory must not be read through another mapping (snapshot,
/// migration, handover) until then.
fn lazy_filling() -> bool {
    LAZY.get().is_some_and(|p| !p.is_complete())
        || ARRIVING
            .get()
            .is_some_and(|w| w.status().status != "completed")
}

/// Whether `migd run` honours fault-injection requests (tests only).
fn fault_injection() -> bool {
    migration::faults::enabled()
}

/// How long the dirty log runs before a snapshot to record the working set.
const WORKING_SET_WINDOW: Duration = Duration::from_millis(200);

/// Exit code when the guest reported a fatal error.
pub const EXIT_GUEST_FATAL: i32 = 3;

/// Runs the VM until it ends; returns the process exit code.
pub fn run(args: RunArgs) -> Result<i32> {
    let started = Instant::now();
    // Signals go to one thread; vCPU threads inherit the mask (their kick signal is not in it).
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set.thread_block().context("blocking signals")?;

    // Bind the migration port before the control socket appears, so that anyone
    // who sees the socket can connect.
    let incoming_listener = match &args.incoming {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?,
        ),
        None => None,
    };
    let (tx, rx) = channel::<Event>();
    // A VM handed over arrives too: until this process has the old one's
    // commit, the old one keeps it, and a stop here ends only this process.
    let arrival = Arc::new(Arrival::new(
        args.incoming_fd.is_some() || args.incoming.is_some() || args.takeover.is_some(),
        args.control.clone(),
        (args.memory, args.cpus),
    ));
    // Signals are taken from here on: a stop ends an incoming VM that has
    // not arrived yet (building it may take a while with --prefault).
    spawn_signal_thread(set, tx.clone(), arrival.clone())?;
    let tls_setup = match args.tls.files()? {
        Some(f) => Some(link::TlsSetup::load(&f).context("loading the TLS configuration")?),
        None => None,
    };
    let _ = TLS.set(tls_setup);
    migration::postcopy::set_thread_nice(args.postcopy_nice);
    vmm::dirty_ring::set_entries(args.dirty_ring).context("--dirty-ring")?;
    if args.hugepages && args.lazy {
        bail!("--lazy fills memory through userfaultfd 4 KiB at a time, which huge pages do not take: drop --hugepages or --lazy");
    }
    vmm::memory::set_huge_pages(args.hugepages);
    vmm::memory::set_prefault(args.prefault);
    // An incoming VM is built before the source connects (as QEMU's
    // -incoming does): the source waits for it otherwise, ~10 ms here.
    // Its control socket appears once it is built, so that whoever waits
    // for the socket before starting the migration finds the VM ready.
    // A source handed over by the daemon is connected already: a stop
    // while the VM is built tells it why.
    let handed_over = match args.incoming_fd {
        Some(fd) => {
            let link = import_incoming(fd, args.incoming_link_fd)?;
            let abandon = migration::incoming::Abandon::new(&link)?;
            arrival.receiving(Some(abandon.clone()));
            Some((link, abandon))
        }
        None => None,
    };
    let prepared = if args.incoming.is_some() || args.incoming_fd.is_some() {
        let built = vmm::GuestRam::new(args.memory)
            .context("guest memory")
            .and_then(|ram| {
                vmm::Vm::prepare(ram, args.cpus, args.serial.as_deref()).map_err(Into::into)
            })
            .context("preparing the VM for the incoming migration");
        match (built, &handed_over) {
            (Ok(p), _) => Some(p),
            (Err(e), Some((_, abandon))) => {
                // The source, connected, is told why.
                abandon.abandon(&format!("{e:#}"));
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        }
    } else {
        None
    };
    if let Some(p) = &args.control {
        spawn_control_thread(bind_control(p)?, tx.clone(), arrival.clone())?;
    }
    slow_start_for_tests();
    let incoming = match (&args.incoming, args.incoming_fd) {
        (Some(_), _) => match &incoming_listener {
            Some(l) => {
                let link = accept_incoming(l, &args)?;
                let abandon = migration::incoming::Abandon::new(&link)?;
                arrival.receiving(Some(abandon.clone()));
                Some((link, abandon))
            }
            None => None,
        },
        (None, Some(_)) => handed_over,
        (None, None) => None,
    };
    let (vm, mut takeover) = if let (Some((stream, abandon)), Some(prepared)) = (incoming, prepared)
    {
        // Noted as Go is read, before the vCPUs run: past Go the source
        // has let the VM go, and a process that dies before the receive
        // returns must leave a VM of this host behind, not nothing. No sync:
        // it only has to outlive this process, not the host.
        let note_arrival = || {
            if let Some(path) = &args.arrived_file {
                if let Err(e) = std::fs::write(path, b"") {
                    tracing::warn!("noting the arrival in {}: {e}", path.display());
                }
            }
        };
        let on_running = || {
            note_arrival();
            arrival.running();
        };
        let (vm, stats) =
            migration::incoming::receive(stream, prepared, tls(), &on_running, &abandon)
                .context("incoming migration")?;
        arrival.running();
        if let Some(w) = stats.postcopy.clone() {
            let _ = ARRIVING.set(w);
        }
        tracing::info!(
            pages = stats.pages,
            rounds = stats.rounds,
            resume_us = stats.resume_us,
            "VM arrived and runs here"
        );
        (vm, None)
    } else if let (Some(path), true) = (&args.restore, args.lazy) {
        regular_file(path)?;
        let (vm, progress, boot) =
            migration::lazy::restore(path, args.serial.as_deref(), args.paused)
                .with_context(|| format!("lazy restore of {}", path.display()))?;
        let _ = LAZY.set(progress);
        if let Some(b) = boot {
            let _ = OWN_BOOT.set(b);
        }
        (vm, None)
    } else if let Some(path) = &args.restore {
        regular_file(path)?;
        let restoring = || format!("restoring {}", path.display());
        // Whether this host can run its vCPUs, from the file's front, before
        // all of its memory is read.
        let front = vmm::snapshot::LazySnapshot::open(path).with_context(restoring)?;
        migration::handshake::check_runs_here(&front.state).with_context(restoring)?;
        drop(front);
        let (state, ram, stats) = vmm::snapshot::read(path).with_context(restoring)?;
        let vm = Vm::restore(&state, ram, args.serial.as_deref())?;
        tracing::info!(
            snapshot = %path.display(),
            pages = stats.data_pages,
            bytes = stats.file_bytes,
            ms = stats.elapsed.as_secs_f64() * 1e3,
            "restored from snapshot"
        );
        if let Some(b) = stats.boot {
            let _ = OWN_BOOT.set(b);
        }
        (vm, None)
    } else if let Some(sock) = &args.takeover {
        arrival.receiving(None);
        let (vm, link) = take_over(sock, args.serial.as_deref(), &|| arrival.running())?;
        (vm, Some(link))
    } else {
        let kernel = args.kernel.clone().context("--kernel is required")?;
        let spec = BootSpec {
            kernel,
            initramfs: args.initramfs.clone(),
            cmdline: args.cmdline.clone(),
        };
        let config = VmConfig {
            memory: args.memory,
            vcpus: args.cpus,
            console: args.serial.clone(),
        };
        let vm = Vm::boot(config, &spec)?;
        let _ = OWN_BOOT.set(spec);
        (vm, None)
    };
    let span = tracing::info_span!("vm", name = args.name.as_deref().unwrap_or("-"));
    let _g = span.enter();

    let vm = Arc::new(vm);
    // A VM that arrived by migration is as the receiver left it on Go: running,
    // or paused (GoPaused: it was paused at its source).
    let arrived = args.incoming.is_some() || args.incoming_fd.is_some();
    // A lazy restore resumed the VM itself (its fault thread was ready first).
    // A VM handed over paused stays paused.
    let handed_over_paused = takeover.as_ref().is_some_and(|l| !l.running);
    if !args.paused && !arrived && !args.lazy && !handed_over_paused {
        vm.resume();
    }
    if let Some(link) = takeover.take() {
        finish_takeover(link, &vm);
    }
    tracing::info!(
        memory_mib = vm.config().memory >> 20,
        vcpus = vm.config().vcpus,
        setup_ms = started.elapsed().as_secs_f64() * 1e3,
        pid = std::process::id(),
        "VM running"
    );

    {
        let tx = tx.clone();
        let control = vm.exit_watch();
        std::thread::spawn(move || {
            if let Some(exit) = control.wait_exit(None) {
                let _ = tx.send(Event::Exit(exit));
            }
        });
    }

    let mut mig = Migrations {
        unconfirmed_file: args.unconfirmed_file.clone(),
        ..Migrations::default()
    };
    let code = loop {
        let Ok(ev) = rx.recv() else { break 1 };
        match ev {
            Event::Exit(_) if mig.migrated => {}
            Event::Exit(exit) if mig.saving.is_some() => {
                // The save goes on (memory stays); the process ends after it.
                tracing::info!(?exit, "VM stopped during a save: exiting once it is over");
                if let Some(s) = &mut mig.saving {
                    s.exit_after = Some(exit_code(&exit));
                }
            }
            Event::Exit(exit) => break exit_code(&exit),
            Event::Saved(done) => {
                let exit_after = mig.saving.take().and_then(|s| s.exit_after);
                let (finished, answer) = finish_save(&vm, done);
                mig.last_save = Some(answer);
                // A guest that died during the save outranks the save's own
                // clean stop.
                let failed = exit_after.filter(|&c| c != 0);
                if let Some(code) = failed.or(finished).or(exit_after) {
                    break code;
                }
            }
            Event::Migrated(outcome) => {
                mig.running = false;
                if let Outcome::Unconfirmed(why) = &outcome {
                    mig.unconfirmed = Some(why.clone());
                    if std::mem::take(&mut mig.stop_when_done) {
                        // The paused copy may be the only one: a stop asked
                        // for during the migration does not discard it.
                        tracing::error!(
                            "migration ended unconfirmed: the stop asked for meanwhile is not \
                             carried out, and the VM stays paused here; stop it again to \
                             discard this copy"
                        );
                    }
                }
                if outcome == Outcome::Completed {
                    // The destination runs the VM: ours must never run again.
                    vm.shutdown(VmExit::Stopped);
                    mig.migrated = true;
                    // Noted before anything else, a stop asked for included:
                    // the daemon must never take the VM for stopped here.
                    if let (Some(path), Some(job)) = (&args.migrated_file, &mig.job) {
                        // Whole or not at all (a temporary name, then a rename).
                        if let Err(e) = migd::json_file::write_json_atomic(path, &job.snapshot()) {
                            tracing::warn!("noting the completed migration: {e:#}");
                        }
                    }
                }
                if mig.stop_when_done {
                    tracing::info!(?outcome, "migration over: stopping as asked");
                    break 0;
                }
                if outcome == Outcome::Completed {
                    let tx = tx.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(linger());
                        let _ = tx.send(Event::Linger);
                    });
                }
            }
            Event::Linger => break 0,
            Event::Signal(Signal::SIGUSR1) | Event::Signal(Signal::SIGUSR2) => {
                let stop = matches!(ev, Event::Signal(Signal::SIGUSR2));
                match &args.snapshot_on_signal {
                    _ if mig.saving.is_some() => {
                        tracing::warn!("snapshot signal ignored: a save is running")
                    }
                    _ if mig.running || mig.migrated => {
                        tracing::warn!("snapshot signal ignored: the VM is migrating or migrated")
                    }
                    _ if mig.estimating.load(Ordering::SeqCst) => {
                        tracing::warn!(
                            "snapshot signal ignored: an estimate measures the dirty rate"
                        )
                    }
                    Some(_) if lazy_filling() => {
                        tracing::warn!("snapshot signal ignored: lazy restore still filling memory")
                    }
                    Some(path) => {
                        let save = SaveRequest {
                            path: path.clone(),
                            stop,
                            // Huge pages take no 4 KiB write-protection.
                            background: !stop && vm.is_running() && !vm.ram().is_huge(),
                            boot: OWN_BOOT.get().cloned(),
                        };
                        if let Err(e) = start_save(&vm, &mut mig, &tx, save, None) {
                            tracing::error!("snapshot not started: {e}");
                        }
                    }
                    None => tracing::warn!("snapshot signal ignored: no --snapshot-on-signal"),
                }
            }
            Event::Signal(s) if mig.running => {
                // Stopping now could strand a post-copy destination: cancel (which
                // only takes before the commit) and stop once the migration is over.
                tracing::warn!(signal = %s, "migration running: cancelling it, stopping when it ends");
                if let Some(job) = &mig.job {
                    job.request_cancel();
                }
                mig.stop_when_done = true;
            }
            Event::Signal(s) if post_copy_arriving() => {
                // Stopping now would lose the VM: its state since the switch
                // lives only here. SIGKILL still ends it.
                tracing::warn!(signal = %s, "post-copy pages still arriving: stopping once they are all here");
                if !std::mem::replace(&mut mig.stop_when_arrived, true) {
                    let tx = tx.clone();
                    std::thread::spawn(move || {
                        while post_copy_arriving() {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        let _ = tx.send(Event::Signal(s));
                    });
                }
            }
            Event::Signal(s) if mig.saving.is_some() => {
                tracing::warn!(signal = %s, "save running: cancelling it, stopping when it ends");
                cancel_save(&mut mig);
            }
            Event::Signal(s) => {
                tracing::info!(signal = %s, "stopping VM");
                break 0;
            }
            Event::Control(stream, req) => {
                if let Some(code) =
                    handle_control(&vm, &mut mig, &tx, stream, req, args.name.as_deref())
                {
                    break code;
                }
            }
        }
    };
    if let Some(w) = ARRIVING.get() {
        w.abandon();
    }
    vm.shutdown(VmExit::Stopped);
    if let Some(p) = &args.control {
        let _ = std::fs::remove_file(p);
    }
    Ok(code)
}

/// How long the process lingers after its VM migrated away, answering
/// `migration` for whoever watches: 60 s (tests shorten it with
/// `MIGD_LINGER_MS`, honoured only with fault injection on).
fn linger() -> Duration {
    migration::faults::knob_ms("MIGD_LINGER_MS").unwrap_or(Duration::from_secs(60))
}

/// Test-only stand-in for a long start (a restore of a large snapshot, a
/// large `--prefault`): with fault injection on, `MIGD_SLOW_START=work:MS`
/// keeps the CPU busy for MS milliseconds before the VM is built, and
/// `MIGD_SLOW_START=hang:MS` sleeps that long, as a hung process would. The
/// control socket exists meanwhile, but nothing answers on it.
fn slow_start_for_tests() {
    let Some(v) = migration::faults::knob("MIGD_SLOW_START") else {
        return;
    };
    let Some((how, ms)) = v.split_once(':') else {
        return;
    };
    let Ok(ms) = ms.parse::<u64>() else {
        return;
    };
    let d = Duration::from_millis(ms);
    tracing::warn!(how, ms, "test hook: slow start");
    match how {
        "work" => {
            let t = std::time::Instant::now();
            let mut x = 1u64;
            while t.elapsed() < d {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        "hang" => std::thread::sleep(d),
        _ => {}
    }
}

/// The link the daemon handed over: the socket `fd`, and the TLS session
/// from the pipe `state_fd`, if any.
fn import_incoming(fd: i32, state_fd: Option<i32>) -> Result<link::Link> {
    // SAFETY: the daemon passed this descriptor to us for exactly this use.
    let tcp = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let state = match state_fd {
        Some(sfd) => {
            // SAFETY: as above: the daemon's pipe with the TLS session.
            let mut p = unsafe { std::fs::File::from_raw_fd(sfd) };
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut p, &mut b)
                .context("reading the TLS session from the daemon")?;
            Some(b)
        }
        None => None,
    };
    link::Link::import(tcp, state.as_deref()).context("the incoming link")
}

/// Accepts one migration on `listener` and does the destination's handshake.
/// A client whose handshake fails (a port scanner, a peer that is not a
/// migd source, a TLS failure, a source refused for its size) is logged and
/// dropped, and the next one is awaited: nothing of the VM was touched yet.
fn accept_incoming(listener: &std::net::TcpListener, args: &RunArgs) -> Result<link::Link> {
    tracing::info!(addr = ?listener.local_addr().ok(), "waiting for an incoming migration");
    loop {
        let (tcp, peer) = listener.accept().context("accepting the migration")?;
        match handshake_incoming(tcp, peer, args) {
            Ok(stream) => return Ok(stream),
            Err(e) => tracing::warn!(
                %peer,
                "not a migration this VM can take, waiting for the next: {e:#}"
            ),
        }
    }
}

/// The destination's side of the handshake with one client of `--incoming`.
fn handshake_incoming(
    tcp: std::net::TcpStream,
    peer: std::net::SocketAddr,
    args: &RunArgs,
) -> Result<link::Link> {
    // The handshake has 30 s, however the peer paces its bytes.
    let limit = Duration::from_secs(30);
    tcp.set_read_timeout(Some(limit))?;
    let _deadline = migration::deadline::Deadline::start(tcp.try_clone()?, limit);
    let mut stream = match tls() {
        Some(t) => t.accept(tcp).context("TLS")?,
        None => link::Link::plain(tcp),
    };
    let hello = migration::handshake::receive_hello(&mut stream)?;
    let refusal = if hello.memory != args.memory {
        Some(format!(
            "destination was started for {} bytes of RAM, the VM has {}",
            args.memory, hello.memory
        ))
    } else if hello.vcpus as usize != args.cpus {
        Some(format!(
            "destination was started for {} vCPUs, the VM has {}",
            args.cpus, hello.vcpus
        ))
    } else {
        // As the daemon's destination does: a guest this CPU cannot run.
        migration::handshake::host_cannot_run(&hello.vm)
    };
    if let Some(reason) = refusal {
        migration::handshake::refuse(&mut stream, &reason)?;
        bail!("refused migration from {peer}: {reason}");
    }
    let shared = migration::handshake::accept(&mut stream, &hello)?;
    // A VM run by hand keeps no record: its boot spec is read and left.
    migration::handshake::receive_boot(&mut stream, &shared)?;
    tracing::info!(%peer, name = %hello.name, "migration accepted");
    Ok(stream)
}

/// Refuses a snapshot path that is there but is no regular file: opening a
/// FIFO blocks until something writes to it, and a device reads for ever.
/// (A path that is not there fails as it opens, naming why.)
fn regular_file(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => bail!(
            "snapshot {}: not a regular file (a FIFO, a device or a directory)",
            path.display()
        ),
        _ => Ok(()),
    }
}

fn exit_code(exit: &VmExit) -> i32 {
    match exit {
        VmExit::PowerOff | VmExit::Stopped | VmExit::Reset => {
            tracing::info!(?exit, "guest stopped");
            0
        }
        VmExit::GuestFatal(code) => {
            tracing::error!(code, "guest reported a fatal error");
            EXIT_GUEST_FATAL
        }
        VmExit::Shutdown => {
            tracing::error!("guest triple-faulted");
            EXIT_GUEST_FATAL
        }
        VmExit::Crashed => {
            tracing::error!("guest crashed (KVM system event)");
            EXIT_GUEST_FATAL
        }
        VmExit::Failed(why) => {
            tracing::error!("VM failed: {why}");
            1
        }
    }
}

/// What writing a snapshot took.
struct Saved {
    stats: vmm::snapshot::SnapshotStats,
    /// How long the guest was paused for it.
    paused: Duration,
    /// Background save: pages the guest wrote before they were saved.
    faults: Option<u64>,
}

/// Writes a snapshot (never during a migration: the dirty log would be
/// shared, and the pause and resume must not meet its commit). For a running
/// VM the KVM dirty log runs for [`WORKING_SET_WINDOW`] before the pause, and
/// the pages written in that window are stored as the working set (lazy
/// restore fills them first).
///
/// With `background` (a running VM that goes on running), the guest resumes
/// as soon as its memory is write-protected and the pages are written while
/// it runs (`migration::background_save`); where that cannot start (no
/// userfaultfd write-protection), the pages are written in the pause. Without
/// it the VM is left paused for the caller to resume or stop.
///
/// The file records `boot` (how the VM boots from its kernel) when given.
/// The pages written are counted in `progress`, which can cancel the save.
fn snapshot(
    vm: &Vm,
    path: &Path,
    background: bool,
    boot: Option<&BootSpec>,
    progress: &WriteProgress,
) -> Result<Saved> {
    let ws = if vm.is_running() {
        match record_working_set(vm) {
            Ok(ws) => Some(ws),
            Err(e) => {
                tracing::warn!("no working set recorded: {e:#}");
                None
            }
        }
    } else {
        None
    };
    // Pauses the VM and captures its state; what was written between the end
    // of the window and the pause counts in the working set too.
    let pause_and_capture =
        || -> Result<(vmm::state::VmState, Option<Vec<u64>>), migration::Error> {
            vm.pause();
            let ws = ws.as_ref().and_then(|bits| {
                let last = vm.take_dirty_bitmap();
                let _ = vm.set_dirty_logging(false);
                match last {
                    Ok(last) => Some(bitmap_pages(bits, &last)),
                    Err(e) => {
                        tracing::warn!("no working set recorded: {e}");
                        None
                    }
                }
            });
            Ok((vm.capture()?, ws))
        };
    let paused_at = Instant::now();
    let captured = std::cell::Cell::new(false);
    if background {
        let r = migration::background_save::save(
            vm.ram(),
            path,
            boot,
            || {
                captured.set(true);
                pause_and_capture()
            },
            || vm.resume(),
            progress,
        );
        match r {
            Ok(b) => {
                return Ok(Saved {
                    stats: b.snapshot,
                    paused: b.paused,
                    faults: Some(b.faults),
                })
            }
            // Only missing write-protection is worth a save in the pause:
            // anything else (the file, the disk) would fail that too.
            Err(e) if e.resumed || !e.unsupported => return Err(e.error.into()),
            Err(e) => {
                tracing::warn!(
                    "no background save ({}): writing the pages in the pause",
                    e.error
                )
            }
        }
    }
    let (state, ws) = if captured.get() {
        // A background save that failed in the pause: the VM is paused and
        // the window's bitmap was taken; capture again, without working set.
        vm.pause();
        (vm.capture()?, None)
    } else {
        pause_and_capture()?
    };
    let stats = vmm::snapshot::write_with_working_set(
        path,
        &state,
        vm.ram(),
        ws.as_deref(),
        boot,
        progress,
    )?;
    tracing::info!(
        path = %path.display(),
        pages = stats.data_pages,
        working_set = stats.working_set_pages,
        bytes = stats.file_bytes,
        paused_ms = paused_at.elapsed().as_secs_f64() * 1e3,
        ms = stats.elapsed.as_secs_f64() * 1e3,
        "snapshot written"
    );
    Ok(Saved {
        stats,
        paused: paused_at.elapsed(),
        faults: None,
    })
}

/// Progress of a save asked for by a control request. Tests slow it down
/// with `MIGD_SAVE_PACE_MS` (a pause at each step) to watch it, and with
/// `MIGD_SAVE_COMMIT_HOLD_MS` (a pause past its commit); both are honoured
/// only with fault injection on.
fn save_progress() -> WriteProgress {
    let progress = match migration::faults::knob_ms("MIGD_SAVE_PACE_MS") {
        Some(pace) => WriteProgress::paced(pace),
        None => WriteProgress::default(),
    };
    // Past the point of no return, a while before the file is in place.
    match migration::faults::knob_ms("MIGD_SAVE_COMMIT_HOLD_MS") {
        Some(hold) => progress.holding_after_commit(hold),
        None => progress,
    }
}

/// Cancels the running save; the process stops once it is over.
fn cancel_save(mig: &mut Migrations) {
    if let Some(s) = &mut mig.saving {
        s.progress.cancel();
        // An exit status already due (the guest died meanwhile) stays.
        s.exit_after.get_or_insert(0);
    }
}

/// Starts writing a snapshot of `vm` on a thread of its own, which reports
/// with [`Event::Saved`] (answering `reply_to`, if any, then); `mig.saving`
/// shows its progress meanwhile.
fn start_save(
    vm: &Arc<Vm>,
    mig: &mut Migrations,
    tx: &Sender<Event>,
    save: SaveRequest,
    reply_to: Option<UnixStream>,
) -> std::io::Result<()> {
    let was_running = vm.is_running();
    let progress = Arc::new(save_progress());
    let (vm, tx, watch) = (vm.clone(), tx.clone(), progress.clone());
    let path = save.path.clone();
    std::thread::Builder::new()
        .name("save".into())
        .spawn(move || {
            // A panic is a failed save, answered like any other: the main
            // loop must never wait for ever for its end.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                snapshot(&vm, &save.path, save.background, save.boot.as_ref(), &watch)
            }))
            .unwrap_or_else(|p| {
                let why = migration::panic_message(&*p);
                Err(anyhow::anyhow!(
                    "the save failed: internal error (panic: {why})"
                ))
            });
            let done = SaveDone {
                stream: reply_to,
                result,
                stop: save.stop,
                was_running,
            };
            let _ = tx.send(Event::Saved(done));
        })?;
    mig.saving = Some(Saving {
        path,
        progress,
        exit_after: None,
    });
    Ok(())
}

/// Answers a save's requester; returns the answer, and Some(code) when the
/// process ends now (the save stopped the VM, `virsh save`-like).
fn finish_save(vm: &Vm, done: SaveDone) -> (Option<i32>, serde_json::Value) {
    let SaveDone {
        stream,
        result,
        stop,
        was_running,
    } = done;
    let mut stream = stream;
    let mut answer = |reply: &serde_json::Value| {
        if let Some(s) = stream.as_mut() {
            let _ = handover::send_line(s, reply);
        }
    };
    let reply = match result {
        Ok(Saved {
            stats: s,
            paused,
            faults,
        }) => {
            let written = json!({
                "ok": true, "pages": s.data_pages, "bytes": s.file_bytes,
                "ms": s.elapsed.as_secs_f64() * 1e3,
                "paused_ms": paused.as_secs_f64() * 1e3,
                "background": faults.is_some(), "faults": faults,
            });
            if stop {
                answer(&written);
                return (Some(0), written);
            }
            written
        }
        Err(e) => {
            tracing::error!("snapshot failed: {e:#}");
            json!({"ok": false, "error": format!("{e:#}")})
        }
    };
    if was_running {
        vm.resume();
    }
    answer(&reply);
    (None, reply)
}

/// Page numbers set in either bitmap.
fn bitmap_pages(a: &[u64], b: &[u64]) -> Vec<u64> {
    let either: Vec<u64> = a.iter().zip(b).map(|(x, y)| x | y).collect();
    set_pages(&either).collect()
}

/// Dirty log on for [`WORKING_SET_WINDOW`]: returns what it saw (logging stays
/// on; the caller takes the rest after the pause and turns it off).
fn record_working_set(vm: &Vm) -> Result<Vec<u64>> {
    vm.set_dirty_logging(true)?;
    let r = (|| -> Result<Vec<u64>> {
        vm.take_dirty_bitmap()?;
        std::thread::sleep(WORKING_SET_WINDOW);
        Ok(vm.take_dirty_bitmap()?)
    })();
    if r.is_err() {
        let _ = vm.set_dirty_logging(false);
    }
    r
}

fn bind_control(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "control socket {} is in use by another process",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    migd::process::bind_private(path).with_context(|| format!("binding {}", path.display()))
}

fn spawn_signal_thread(set: SigSet, tx: Sender<Event>, arrival: Arc<Arrival>) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(s) => {
                    let stop = !matches!(s, Signal::SIGUSR1 | Signal::SIGUSR2);
                    if stop && arrival.stop_unless_arrived(s.as_str()) {
                        return;
                    }
                    if tx.send(Event::Signal(s)).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        })?;
    Ok(())
}

fn spawn_control_thread(
    listener: UnixListener,
    tx: Sender<Event>,
    arrival: Arc<Arrival>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let tx = tx.clone();
                let arrival = arrival.clone();
                std::thread::spawn(move || serve_client(stream, tx, arrival));
            }
        })?;
    Ok(())
}

/// Longest a reply on the control socket may wait for its client to read:
/// replies are written by the main loop, which a client that sends requests
/// and never reads must not block (signals, a migration's end).
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads requests from one client and forwards each to the main loop.
fn serve_client(stream: UnixStream, tx: Sender<Event>, arrival: Arc<Arrival>) {
    if stream
        .set_write_timeout(Some(CONTROL_WRITE_TIMEOUT))
        .is_err()
    {
        return;
    }
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    loop {
        let req = match handover::read_line(&mut reader) {
            Ok(v) => v,
            Err(e) => {
                if !e.to_string().contains("connection closed") {
                    let mut s = match stream.try_clone() {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    let _ = handover::send_line(
                        &mut s,
                        &json!({"ok": false, "error": format!("{e:#}")}),
                    );
                }
                return;
            }
        };
        let Ok(mut s) = stream.try_clone() else {
            return;
        };
        if arrival.arriving() {
            let cmd = req.get("cmd").and_then(|c| c.as_str());
            let reply = match cmd {
                Some("status") => json!({
                    "ok": true, "state": "incoming", "pid": std::process::id(),
                    "memory": arrival.size.0, "vcpus": arrival.size.1,
                }),
                Some("stop") => json!({"ok": true}),
                _ => json!({"ok": false, "error": "the VM is still arriving"}),
            };
            let _ = handover::send_line(&mut s, &reply);
            // Why, as the daemon says it ("destroyed by the operator"), for
            // the source of a migration given up.
            let why = match req.get("why").and_then(|w| w.as_str()) {
                Some(w) => format!(
                    "stop requested ({})",
                    w.chars().take(200).collect::<String>()
                ),
                None => "stop requested".to_string(),
            };
            if cmd == Some("stop") && !arrival.stop_unless_arrived(&why) {
                // It arrived in between: the main loop stops it (as it
                // would on SIGTERM, without a second reply).
                let _ = tx.send(Event::Signal(Signal::SIGTERM));
            }
            continue;
        }
        let is_handover = req.get("cmd").and_then(|c| c.as_str()) == Some("handover");
        if tx.send(Event::Control(s, req)).is_err() || is_handover {
            return;
        }
    }
}

/// The `boot` key of a control request (how the VM boots, from the daemon's record).
fn boot_arg(req: &serde_json::Value) -> Result<Option<wire::BootSpec>, String> {
    match req.get("boot") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(b) => serde_json::from_value::<wire::BootSpec>(b.clone())
            .map(Some)
            .map_err(|e| format!("\"boot\" must be {{kernel, initrd, cmdline}}: {e}")),
    }
}

/// `req[key]` as a whole number: None when absent or null; anything else
/// that is not a whole number of at least `min` is refused, naming the key
/// (a string, a negative or a fractional value must never pass for "none").
fn whole(req: &serde_json::Value, key: &str, min: u64) -> Result<Option<u64>, String> {
    match req.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err(format!(
                "\"{key}\" must be a whole number of at least {min}, got {v}"
            )),
        },
    }
}

/// The refusal of what would take the dirty log while `estimate` has it.
const ESTIMATING: &str = "an estimate is measuring this VM's dirty rate; retry in a second";

/// Refuses a request whose daemon migrates over TLS only (`require_tls`)
/// where this process was started without it (its VM created before TLS
/// was configured): its streams would go in plaintext, unauthenticated.
fn check_tls(req: &serde_json::Value) -> Result<(), String> {
    if req.get("require_tls").and_then(|t| t.as_bool()) == Some(true) && tls().is_none() {
        return Err(
            "this VM's process was started without TLS (before it was configured), \
                    and its streams would go in plaintext: give it a process with TLS first \
                    (migctl save NAME FILE, then migctl restore NAME FILE)"
                .into(),
        );
    }
    Ok(())
}

/// Starts a migration of this VM in a background thread.
fn start_migration(
    vm: &Arc<Vm>,
    mig: &mut Migrations,
    tx: &Sender<Event>,
    req: &serde_json::Value,
    name: Option<&str>,
) -> Result<(), String> {
    if mig.running || mig.migrated {
        return Err("a migration of this VM is already running or done".into());
    }
    mig.check_confirmed()?;
    if mig.estimating.load(Ordering::SeqCst) {
        return Err(ESTIMATING.into());
    }
    check_tls(req)?;
    let to = req
        .get("to")
        .and_then(|t| t.as_str())
        .ok_or("migrate needs \"to\": \"HOST:PORT\"")?;
    let mode = req
        .get("mode")
        .and_then(|m| m.as_str())
        .unwrap_or("precopy");
    if !matches!(mode, "precopy" | "postcopy" | "hybrid" | "auto") {
        return Err(format!(
            "unknown migration mode '{}': use precopy, postcopy, hybrid or auto",
            mode.escape_debug()
        ));
    }
    let mode = mode.to_string();
    let vm_name = req
        .get("name")
        .and_then(|n| n.as_str())
        .or(name)
        .ok_or("migrate needs the VM's \"name\"")?;
    let id = req.get("job").and_then(|j| j.as_str()).unwrap_or("1");
    let mut params = precopy::Params::new(id, vm_name, to);
    params.tls = tls().cloned();
    // 0: no pause fits, so the rounds never stop on the estimate (the
    // daemon refuses it; tests use it to keep a migration in its rounds).
    if let Some(ms) = whole(req, "max_downtime_ms", 0)? {
        params.max_downtime = Duration::from_millis(ms);
    }
    params.verify = req.get("verify").and_then(|v| v.as_bool()).unwrap_or(false);
    // 0: no cap, as null.
    params.max_bandwidth = whole(req, "max_bandwidth", 0)?.filter(|b| *b > 0);
    if let Some(w) = whole(req, "prepaging_window", 0)? {
        params.prepaging_window = w.min(migration::model::MAX_PREPAGING_WINDOW as u64) as u32;
    }
    params.auto_converge = req
        .get("auto_converge")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    params.xbzrle_cache = whole(req, "xbzrle_cache", 0)?.unwrap_or(0);
    params.compress = match req.get("compress") {
        None | Some(serde_json::Value::Null) => migration::compress::Compression::None,
        Some(serde_json::Value::String(c)) => c.parse().map_err(|e| format!("{e}"))?,
        Some(other) => {
            return Err(format!(
                "\"compress\" must be a string (none or zstd[:LEVEL]), got {other}"
            ))
        }
    };
    params.reorder = req
        .get("reorder")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    params.clear_before_send = req
        .get("clear_before_send")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    params.strict_downtime = req
        .get("strict_downtime")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if let Some(n) = req.get("streams").filter(|v| !v.is_null()) {
        let n = n
            .as_u64()
            .ok_or_else(|| format!("streams must be a number between 1 and 16, got {n}"))?;
        params.streams = migration::multifd::check_streams(n)?;
    }
    params.fault_channel = req
        .get("fault_channel")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    if let Some(n) = whole(req, "postcopy_after_rounds", 0)? {
        params.postcopy_after_rounds = n.clamp(1, u32::MAX as u64) as u32;
    }
    params.boot = boot_arg(req)?;
    // Test-only: hold the source at a phase; send a wrong digest; fail after
    // Go; wait less for the destination's answers.
    if fault_injection() {
        if let Some(h) = req.get("fault_hold").and_then(|v| v.as_str()) {
            params.hold = Some(migration::faults::Hold::parse(h)?);
        }
        params.corrupt_digest = req
            .get("fault_corrupt_digest")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        params.fail_after_go = req
            .get("fault_fail_after_go")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        params.fault_panic = req["fault_panic"] == true;
        if let Some(ms) = req.get("answer_timeout_ms").and_then(|v| v.as_u64()) {
            params.answer_timeout = Duration::from_millis(ms.max(1));
        }
    }
    let job = Arc::new(Job::default());
    if let Some(path) = &mig.unconfirmed_file {
        job.note_commit_in(
            path.clone(),
            format!(
                "its process ended past the commit of its migration {} to {}: the destination \
                 may run it",
                params.id, params.to
            ),
        );
    }
    mig.job = Some(job.clone());
    mig.running = true;
    mig.mode = mode.clone();
    let vm = vm.clone();
    let tx = tx.clone();
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let span = tracing::info_span!("migration", id = %params.id, to = %params.to);
            let _g = span.enter();
            // Post-copy returns Completed only once the destination has every
            // page: until then this process keeps the (paused) VM's memory.
            let outcome = match mode.as_str() {
                "postcopy" => migration::postcopy::migrate(&vm, &params, &job, false),
                "hybrid" => migration::postcopy::migrate(&vm, &params, &job, true),
                "auto" => {
                    let mut params = params.clone();
                    params.auto = true;
                    migration::postcopy::migrate(&vm, &params, &job, true)
                }
                _ => precopy::migrate(&vm, &params, &job),
            };
            let capped = job.max_bandwidth().is_some();
            job.update(|s| s.model = migration::model::check(s, vm.config().vcpus, capped));
            tracing::info!(?outcome, "migration ended");
            let _ = tx.send(Event::Migrated(outcome));
        })
        .map_err(|e| format!("cannot start the migration thread: {e}"))?;
    Ok(())
}

/// Predicts a migration of this VM to `to` with the cost model, from measured
/// inputs: non-zero memory (data extents of the memfd), the dirty rate and
/// working set over one second of the KVM dirty log, and the path's RTT and
/// bandwidth (a probe).
fn estimate(vm: &Vm, req: &serde_json::Value) -> Result<serde_json::Value, String> {
    use migration::model::{self, Inputs};
    let to = req
        .get("to")
        .and_then(|t| t.as_str())
        .ok_or("estimate needs \"to\": \"HOST:PORT\"")?;
    let mode = req
        .get("mode")
        .and_then(|m| m.as_str())
        .unwrap_or("precopy");
    if !matches!(mode, "precopy" | "postcopy" | "hybrid" | "auto") {
        return Err(format!(
            "unknown mode '{mode}' (precopy, postcopy, hybrid, auto)"
        ));
    }
    // Checked before anything is measured.
    check_tls(req)?;
    let cap = whole(req, "max_bandwidth", 1)?.map(|c| c as f64);
    let max_downtime_ms = whole(req, "max_downtime_ms", 1)?.unwrap_or(300);
    let prepaging_window = whole(req, "prepaging_window", 0)?
        .unwrap_or(16)
        .min(model::MAX_PREPAGING_WINDOW as u64);
    let memory_bytes: u64 = vm
        .ram()
        .data_extents()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|e| e.1)
        .sum();
    let dirtying = if vm.is_running() {
        migration::probe::dirtying(vm, Duration::from_secs(1)).map_err(|e| e.to_string())?
    } else {
        Default::default()
    };
    let path = migration::probe::probe(to, 32 << 20, tls()).map_err(|e| e.to_string())?;
    let inputs = Inputs {
        memory_bytes: memory_bytes as f64,
        state_bytes: model::state_bytes(vm.config().vcpus),
        dirty_rate: dirtying.rate,
        // A cap below the path's rate is the rate.
        bandwidth: cap.map_or(path.bandwidth, |c| c.min(path.bandwidth)),
        rtt: path.rtt,
        max_downtime: max_downtime_ms as f64 / 1e3,
        prepaging_window: prepaging_window as f64,
        vcpus: vm.config().vcpus as u32,
        // Connect, Hello/Accept, Prepared; not the destination's own work.
        setup: 3.0 * path.rtt,
        working_set: dirtying.working_set,
        capped: cap.is_some(),
    };
    // What was measured, too, must be in the model's range.
    inputs.validate().map_err(|e| format!("estimate: {e}"))?;
    let all: serde_json::Map<String, serde_json::Value> = ["precopy", "postcopy", "hybrid"]
        .iter()
        .map(|m| (m.to_string(), json!(model::predict(m, &inputs))))
        .collect();
    // `auto` is predicted as the mode it is expected to end in (`auto_picks`).
    Ok(json!({
        "ok": true,
        "mode": mode,
        "auto_picks": model::auto_mode(&inputs),
        "prediction": model::predict(mode, &inputs),
        "inputs": inputs,
        "all_modes": all,
    }))
}

/// Handles one control request; `Some(code)` ends the process.
fn handle_control(
    vm: &Arc<Vm>,
    mig: &mut Migrations,
    tx: &Sender<Event>,
    mut stream: UnixStream,
    req: serde_json::Value,
    name: Option<&str>,
) -> Option<i32> {
    let cmd = req.get("cmd").and_then(|c| c.as_str()).unwrap_or("");
    // A request naming another VM was meant for migd (`migctl --socket`
    // pointed here): it must not act on this one.
    let named = req.get("name").and_then(|n| n.as_str());
    if let (Some(asked), Some(own)) = (named, name) {
        if asked != own {
            let why = format!(
                "this is the control socket of the process of VM '{}', not migd's: it takes \
                 no request for VM '{}' (point migctl --socket at the daemon's socket)",
                own.escape_debug(),
                asked.escape_debug()
            );
            let _ = handover::send_line(&mut stream, &json!({"ok": false, "error": why}));
            return None;
        }
    }
    if mig.migrated && !matches!(cmd, "status" | "migration" | "stop") {
        let _ = handover::send_line(
            &mut stream,
            &json!({"ok": false, "error": "this VM has migrated away; only status, migration and stop remain"}),
        );
        return None;
    }
    if lazy_filling() && matches!(cmd, "migrate" | "snapshot" | "handover") {
        let _ = handover::send_line(
            &mut stream,
            &json!({"ok": false, "error": "the VM's memory is still arriving (lazy restore or post-copy); try again when it is done"}),
        );
        return None;
    }
    if let Some(s) = mig
        .saving
        .as_ref()
        .filter(|_| !matches!(cmd, "status" | "migration" | "stop" | "cancel"))
    {
        let error = format!(
            "a snapshot is being written to {}; wait for it to end (cancel or stop ends it)",
            s.path.display()
        );
        let _ = handover::send_line(&mut stream, &json!({"ok": false, "error": error}));
        return None;
    }
    let reply = match cmd {
        "migrate" => start_migration(vm, mig, tx, &req, name).map(|_| json!({"ok": true})),
        "estimate" if mig.running => Err("a migration is running".to_string()),
        "estimate" => {
            if mig.estimating.swap(true, Ordering::SeqCst) {
                Err("an estimate is already running".to_string())
            } else {
                let (vm, flag) = (vm.clone(), mig.estimating.clone());
                std::thread::spawn(move || {
                    let reply = estimate(&vm, &req).unwrap_or_else(
                        |e| json!({"ok": false, "error": format!("estimate: {e}")}),
                    );
                    flag.store(false, Ordering::SeqCst);
                    let _ = handover::send_line(&mut stream, &reply);
                });
                return None;
            }
        }
        "migration" => Ok(match &mig.job {
            Some(job) => {
                let mut v = serde_json::to_value(job.snapshot()).unwrap_or_default();
                v["ok"] = json!(true);
                // Final only once this loop has acted on the outcome (e.g. stopped
                // the VM after a completed migration), so status and migration agree.
                let done = matches!(
                    v["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                );
                if done && mig.running {
                    v["status"] = json!("completing");
                }
                v
            }
            None => match ARRIVING.get() {
                Some(w) => {
                    let mut v = json!(w.status());
                    v["ok"] = json!(true);
                    v["direction"] = json!("incoming");
                    v
                }
                None => json!({"ok": true, "status": "none"}),
            },
        }),
        "postcopy" => match &mig.job {
            Some(job) if mig.running && mig.mode == "hybrid" => {
                job.postcopy_now.store(true, Ordering::SeqCst);
                Ok(json!({"ok": true}))
            }
            Some(_) if mig.running && mig.mode == "postcopy" => Ok(json!({"ok": true})),
            _ => Err("no hybrid migration is running (start one with mode \"hybrid\")".to_string()),
        },
        "resume"
            if mig.running
                && mig
                    .job
                    .as_ref()
                    .is_some_and(|j| j.snapshot().status.starts_with("postcopy")) =>
        {
            Err(
                "the destination runs this VM (post-copy in progress): it cannot resume here"
                    .to_string(),
            )
        }
        // The migration pauses the VM for its last pages and, once past its
        // commit, must never see it resumed here; a pause of the operator's
        // would be undone by the destination (or by a failure) anyway.
        "pause" | "resume" if mig.running => Err(format!(
            "a migration of this VM is running: it pauses and resumes the VM itself; \
             cancel it first to {cmd} here"
        )),
        "cancel" if mig.saving.is_some() => {
            // The save fails "cancelled"; the VM goes on as before it. Past
            // its commit (its file synced, being put in place) it completes.
            let cancelled = mig.saving.as_ref().is_some_and(|s| s.progress.cancel());
            Ok(json!({"ok": true, "cancelled": cancelled}))
        }
        "cancel" => match &mig.job {
            Some(job) if mig.running && job.snapshot().status == "postcopy-active" => Err(
                "post-copy cannot be cancelled: the destination runs the VM and this host \
                 holds the pages it still lacks (if the link is lost, cancel gives up recovery)"
                    .to_string(),
            ),
            Some(job) if mig.running => {
                // Before the commit the links are cut too, so that a source
                // blocked on a stalled destination stops at once; after it,
                // only a post-copy waiting for its link can be given up.
                if job.request_cancel() || job.abandon_recovery() {
                    Ok(json!({"ok": true}))
                } else {
                    Err(
                        "the migration has passed its commit point (Go sent): it can no \
                         longer be cancelled"
                            .to_string(),
                    )
                }
            }
            _ => Err("no migration is running".to_string()),
        },
        "bandwidth" => match &mig.job {
            Some(job) if mig.running => whole(&req, "max_bandwidth", 0).map(|cap| {
                // 0: no cap, as null.
                let cap = cap.filter(|b| *b > 0);
                job.set_max_bandwidth(cap);
                tracing::info!(max_bandwidth = ?cap, "bandwidth cap changed");
                json!({"ok": true})
            }),
            _ => Err("no migration is running".to_string()),
        },
        "downtime" => match (
            &mig.job,
            req.get("max_downtime_ms").and_then(|v| v.as_u64()),
        ) {
            (_, None | Some(0)) => {
                Err("\"max_downtime_ms\" must be a whole number of ms, at least 1".to_string())
            }
            (Some(job), Some(ms)) if mig.running => {
                job.set_max_downtime(Duration::from_millis(ms));
                tracing::info!(max_downtime_ms = ms, "max downtime changed");
                Ok(json!({"ok": true}))
            }
            _ => Err("no migration is running".to_string()),
        },
        "recover" => match &mig.job {
            Some(job) if mig.running && job.snapshot().status == "postcopy-paused" => {
                job.recover_now.store(true, Ordering::SeqCst);
                Ok(json!({"ok": true}))
            }
            Some(job) => Err(format!(
                "the migration is not waiting for recovery (status: {})",
                job.snapshot().status
            )),
            None => Err("no migration of this VM to recover".to_string()),
        },
        "inject" if !fault_injection() => {
            Err("fault injection is off (it is for tests: MIGD_FAULT_INJECTION=1)".to_string())
        }
        "inject" => match (req.get("fault").and_then(|f| f.as_str()), &mig.job) {
            (Some("drop-links"), Some(job)) if mig.running => {
                let n = job.cut_links();
                tracing::warn!(sockets = n, "fault injection: migration links cut");
                Ok(json!({"ok": true, "cut": n}))
            }
            (Some("drop-links"), _) => Err("no migration is running".to_string()),
            (f, _) => Err(format!("unknown fault {f:?} (drop-links)")),
        },
        "status" => Ok(json!({
            "ok": true,
            "state": if mig.migrated {
                "migrated"
            } else if vm.is_running() {
                "running"
            } else if mig.unconfirmed.is_some() {
                "unconfirmed"
            } else {
                "paused"
            },
            "unconfirmed": mig.unconfirmed,
            "migrating": mig.running,
            "memory": vm.config().memory,
            "memory_used": vm.ram().used_bytes().ok(),
            "huge_pages": vm.ram().is_huge(),
            "vcpus": vm.config().vcpus,
            "pid": std::process::id(),
            // A lazy restore still filling memory from its snapshot file.
            "filling": LAZY.get().filter(|p| !p.is_complete()).map(|p| json!({
                "filled": p.done(), "pages": p.pages,
            })),
            // A post-copy arrival whose pages are not all here yet.
            "arriving": ARRIVING.get().map(|w| w.status()).filter(|s| s.status != "completed"),
            // A snapshot being written.
            "saving": mig.saving.as_ref().map(|s| json!({
                "path": s.path, "pages": s.progress.pages(), "written": s.progress.written(),
                "committed": s.progress.is_committed(),
            })),
            // The answer of the last save that ended (its process still running).
            "last_save": mig.last_save,
        })),
        // Already so: nothing changes, and the reply says it (as QEMU's
        // stop and cont, it is no error).
        "pause" if !vm.is_running() => Ok(json!({"ok": true, "changed": false})),
        "pause" => {
            Ok(json!({"ok": true, "changed": true, "pause_us": vm.pause().as_micros() as u64}))
        }
        "resume" => {
            let force = req.get("force").and_then(|f| f.as_bool()).unwrap_or(false);
            match mig.check_confirmed() {
                Err(e) if !force => Err(e),
                _ => {
                    if let Some(why) = mig.unconfirmed.take() {
                        tracing::warn!(unconfirmed = %why, "resumed here by force");
                        if let Some(path) = &mig.unconfirmed_file {
                            let _ = std::fs::remove_file(path);
                        }
                    }
                    let changed = !vm.is_running();
                    vm.resume();
                    Ok(json!({"ok": true, "changed": changed}))
                }
            }
        }
        // A save pauses and resumes the VM, and a migration's commit must
        // never be followed by a resume here.
        "snapshot" if mig.running => Err("a migration is running".to_string()),
        // Both would take the dirty log (the save's working set, the estimate's rate).
        "snapshot" if mig.estimating.load(Ordering::SeqCst) => Err(ESTIMATING.to_string()),
        "snapshot" => match (req.get("path").and_then(|p| p.as_str()), boot_arg(&req)) {
            (None, _) => Err("snapshot needs a \"path\"".to_string()),
            (_, Err(e)) => Err(e),
            (Some(p), Ok(boot)) => {
                let was_running = vm.is_running();
                let stop = req.get("stop").and_then(|s| s.as_bool()).unwrap_or(false);
                // Memory on huge pages cannot be write-protected 4 KiB at a
                // time: it is saved in the pause, unless asked otherwise.
                let asked = req.get("background").and_then(|b| b.as_bool());
                if asked == Some(true) && vm.ram().is_huge() {
                    let _ = handover::send_line(
                        &mut stream,
                        &json!({"ok": false, "error": "a background save write-protects memory 4 KiB at a time, which huge pages do not take: save with background false (the VM pauses for the save)"}),
                    );
                    return None;
                }
                let background =
                    !stop && was_running && !vm.ram().is_huge() && asked != Some(false);
                // The daemon's record says how the VM boots; else what this
                // process knows.
                let boot = boot
                    .map(|b| BootSpec {
                        kernel: b.kernel.into(),
                        initramfs: b.initrd.map(Into::into),
                        cmdline: b.cmdline,
                    })
                    .or_else(|| OWN_BOOT.get().cloned());
                let save = SaveRequest {
                    path: PathBuf::from(p),
                    stop,
                    background,
                    boot,
                };
                let started = stream
                    .try_clone()
                    .and_then(|reply_to| start_save(vm, mig, tx, save, Some(reply_to)));
                match started {
                    // The save's thread answers when it is over.
                    Ok(()) => return None,
                    Err(e) => Err(format!("starting the save: {e}")),
                }
            }
        },
        "stop" if mig.saving.is_some() => {
            cancel_save(mig);
            Ok(json!({"ok": true}))
        }
        // The process that stops now would take the only complete copy of
        // the VM with it: an outgoing migration may have committed (SIGTERM
        // cancels it and stops once it ends), and an arrival by post-copy
        // holds the VM's state since the switch.
        "stop" if mig.running => Err(
            "a migration of this VM is running: cancel it first (SIGTERM cancels it and stops \
             once it ends)"
                .to_string(),
        ),
        "stop" if req["force"] != true && post_copy_arriving() => Err(
            "post-copy pages are still arriving: stopping now would lose the VM, whose \
                 state since the switch lives only here; wait for the arrival to complete \
                 (or force it once its source gave up: migctl destroy --force)"
                .to_string(),
        ),
        // This copy may be the only one.
        "stop" if req["force"] != true && mig.unconfirmed.is_some() => {
            Err(mig.refusal().unwrap_or_default())
        }
        "stop" => {
            let _ = handover::send_line(&mut stream, &json!({"ok": true}));
            return Some(0);
        }
        "handover" if mig.running => Err("a migration is running".to_string()),
        // The new process would resume it.
        "handover" if mig.unconfirmed.is_some() => Err(mig.refusal().unwrap_or_default()),
        "handover" => {
            let was_running = vm.is_running();
            return match give_away(vm, stream, was_running) {
                Ok(()) => {
                    tracing::info!("VM handed over to another process");
                    Some(0)
                }
                Err(HandoverFailed::BeforeCommit(e)) => {
                    if was_running {
                        tracing::error!("handover failed, VM resumed here: {e:#}");
                        vm.resume();
                    } else {
                        tracing::error!("handover failed, VM left paused here as it was: {e:#}");
                    }
                    None
                }
                Err(HandoverFailed::Unconfirmed(e)) => {
                    mig.unconfirmed = Some(format!("handover: {e:#}"));
                    tracing::error!(
                        "handover: the new process is gone after the commit without saying \
                         that it ran the VM ({e:#}); the VM is left paused here. It may have \
                         run there for a moment on the shared memory: resume it here only if \
                         the new process's log shows it never resumed the VM"
                    );
                    None
                }
            };
        }
        other => Err(format!("unknown command '{other}'")),
    };
    let line = match reply {
        Ok(v) => v,
        Err(e) => json!({"ok": false, "error": e}),
    };
    let _ = handover::send_line(&mut stream, &line);
    None
}

/// How a handover failed, for the old process.
enum HandoverFailed {
    /// Before the new process could have the commit: the VM is ours, as
    /// it was (resumed if it ran).
    BeforeCommit(anyhow::Error),
    /// The commit went out, but the new process is gone without saying
    /// that it ran the VM: it may have run it for a moment on the shared
    /// memory, so the VM stays paused here for the operator.
    Unconfirmed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for HandoverFailed {
    fn from(e: E) -> Self {
        HandoverFailed::BeforeCommit(e.into())
    }
}

/// Old side of a handover (`was_running`: the VM ran when it was asked).
/// The VM stops here only once the new process has the commit and is alive.
fn give_away(
    vm: &Vm,
    mut stream: UnixStream,
    was_running: bool,
) -> std::result::Result<(), HandoverFailed> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    // A new process that stops reading must not hold this one for ever.
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    // Watched from now on: whether it is gone is asked after the commit.
    let new_process = migd::process::peer_pid(&stream).map(migd::process::Watched::new);
    let memfd = vm.ram().dup_memfd()?;
    // On huge pages, which pages hold data: taken while the VM runs, and
    // checked for completeness once it is paused.
    let data_extents = match vm.ram().extents_from_mappings() {
        true => Some(vm.ram().data_extents()?),
        false => None,
    };
    let header = HandoverHeader {
        ok: true,
        memory: vm.config().memory,
        vcpus: vm.config().vcpus,
        name: None,
        data_extents,
        // Known from this process's mappings (and, on prefaulted 4 KiB
        // pages, what was written elsewhere): sent again after the commit.
        data_after_commit: vm.ram().extents_from_mappings() || vm.ram().written_pages().is_some(),
    };
    handover::send_vm(&mut stream, &header, memfd.as_raw_fd())
        .context("handing the VM's memory to the new process")?;
    let mut reader = BufReader::new(stream.try_clone()?);
    // The new process builds its VM over the shared memory while ours runs on.
    handover::expect_cmd(&mut reader, "prepared")?;
    vm.pause();
    let paused_at_ns = handover::monotonic_ns();
    let extents_complete = match &header.data_extents {
        Some(e) => vm.ram().extents_complete(e)?,
        None => false,
    };
    let paused = handover::PausedState {
        paused_at_ns,
        extents_complete,
        state: vm.capture()?.encode()?,
        running: was_running,
    };
    handover::send_state(&mut stream, &paused)
        .context("sending the paused VM's state to the new process")?;
    handover::expect_cmd(&mut reader, "restored")?;
    let die = die_at_commit();
    if die {
        // Deaf from here on, so that the new process's `running` fails
        // however soon this process is gone.
        stream.shutdown(std::net::Shutdown::Read)?;
    }
    // Commit point: once it is sent the VM belongs to the new process. A
    // send that fails never reached it (its end is closed), and the VM,
    // only paused here, is still ours.
    handover::send_line(&mut stream, &json!({"cmd": "commit"}))?;
    if die {
        tracing::warn!("fault injection: exiting right after the commit");
        std::process::exit(DIED_AT_COMMIT);
    }
    match handover::expect_cmd(&mut reader, "running") {
        Ok(v) => tracing::info!(
            downtime_us = v.get("downtime_us").and_then(|d| d.as_u64()),
            "new process runs the VM"
        ),
        // Its socket may close a moment before it is gone: give it 2 s.
        Err(e)
            if new_process
                .as_ref()
                .is_some_and(|w| w.gone_within(Duration::from_secs(2))) =>
        {
            return Err(HandoverFailed::Unconfirmed(e));
        }
        // Alive: it has the commit, and runs the VM or is about to.
        Err(e) => tracing::warn!("no confirmation from the new process after commit: {e:#}"),
    }
    // The vCPUs here never run again.
    vm.exit_watch().stop(VmExit::Stopped);
    if header.data_after_commit {
        // The vCPUs here are stopped for good: the list is final. The VM is
        // the new process's already, so a failure only costs it the list.
        let sent = vm
            .ram()
            .data_extents()
            .map_err(anyhow::Error::from)
            .and_then(|e| handover::send_data(&mut stream, &e));
        if let Err(e) = sent {
            tracing::warn!("final data extents not sent to the new process: {e:#}");
        }
    }
    Ok(())
}

/// Tests make the old process of a handover die right after `commit`,
/// before it reads `running` (`MIGD_HANDOVER_DIE_AT_COMMIT=1`, honoured
/// only with fault injection on): the new process must run the VM on.
fn die_at_commit() -> bool {
    handover_fault("MIGD_HANDOVER_DIE_AT_COMMIT")
}

/// The exit status of an old process that died at the commit (tests).
const DIED_AT_COMMIT: i32 = 70;

/// Tests make the new process of a handover die right after `restored`,
/// before it reads the commit (`MIGD_HANDOVER_NEW_DIES_BEFORE_COMMIT=1`,
/// honoured only with fault injection on): the old process must keep the VM.
fn new_dies_before_commit() -> bool {
    handover_fault("MIGD_HANDOVER_NEW_DIES_BEFORE_COMMIT")
}

/// Whether the test-only handover fault `var` is set to 1 (honoured only
/// with fault injection on). `MIGD_HANDOVER_NEW_DIES_AFTER_COMMIT`: the new
/// process exits once it has the commit, before it resumes the VM or says
/// `running`: the old process must keep the VM, paused.
fn handover_fault(var: &str) -> bool {
    migration::faults::knob(var).as_deref() == Some("1")
}

/// The exit status of a new process that died before the commit (tests).
const DIED_BEFORE_COMMIT: i32 = 71;
/// The exit status of a new process that died after the commit (tests).
const DIED_AFTER_COMMIT: i32 = 72;

struct TakeoverLink {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    paused_at_ns: u64,
    /// The old process sends its final data extents after `running`.
    data_follows: bool,
    /// The VM ran in the old process (else it stays paused here).
    running: bool,
}

/// New side of a handover: receive and rebuild the VM (paused), then wait for
/// commit; `committed` is called once it is read (the VM is this process's
/// to run from then on).
fn take_over(
    sock: &Path,
    console: Option<&Path>,
    committed: &dyn Fn(),
) -> Result<(Vm, TakeoverLink)> {
    let mut stream =
        UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    handover::send_line(&mut stream, &json!({"cmd": "handover"}))?;
    let (header, fd) =
        handover::recv_vm(&mut stream).context("receiving the VM's memory from the old process")?;
    let ram = GuestRam::from_fd(fd, header.memory)?;
    // The final list comes after the commit: on 4 KiB pages it counts only
    // with what this process's mappings map from before the VM runs here.
    let data_follows = header.data_after_commit && (ram.is_huge() || ram.track_mappings());
    // The pages with data get mapped here while the old process still runs
    // the VM; whether they count is known at the pause.
    let extents = header.data_extents.unwrap_or_default();
    ram.map_extents(&extents)?;
    let prepared = Vm::prepare(ram, header.vcpus, console).context("building the VM")?;
    handover::send_line(&mut stream, &json!({"cmd": "prepared"}))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let paused = handover::recv_state(&mut reader)
        .context("receiving the paused VM's state from the old process")?;
    let paused_at_ns = paused.paused_at_ns;
    let running = paused.running;
    let state = VmState::decode(&paused.state).context("the old process's VM state")?;
    let vm = prepared
        .load(&state)
        .context("loading the old process's VM state")?;
    if paused.extents_complete {
        vm.ram().count_data_from_mappings();
    }
    tracing::debug!(
        extents = extents.len(),
        complete = paused.extents_complete,
        from_mappings = vm.ram().extents_from_mappings(),
        "handed-over memory"
    );
    if new_dies_before_commit() {
        // Deaf first, so that the old process's commit fails for sure.
        stream.shutdown(std::net::Shutdown::Read)?;
        handover::send_line(&mut stream, &json!({"cmd": "restored"}))?;
        tracing::warn!("fault injection: exiting before the commit");
        std::process::exit(DIED_BEFORE_COMMIT);
    }
    handover::send_line(&mut stream, &json!({"cmd": "restored"}))?;
    handover::expect_cmd(&mut reader, "commit").context("old process did not commit")?;
    committed();
    if handover_fault("MIGD_HANDOVER_NEW_DIES_AFTER_COMMIT") {
        tracing::warn!("fault injection: exiting after the commit, the VM never resumed");
        std::process::exit(DIED_AFTER_COMMIT);
    }
    Ok((
        vm,
        TakeoverLink {
            stream,
            reader,
            paused_at_ns,
            data_follows,
            running,
        },
    ))
}

/// New side of a handover, once the VM runs here: tells the old process,
/// and waits for its list of pages with data in the background. Failures
/// are logged only: the VM is this process's.
fn finish_takeover(mut link: TakeoverLink, vm: &Arc<Vm>) {
    let downtime_us = handover::monotonic_ns().saturating_sub(link.paused_at_ns) / 1000;
    tracing::info!(downtime_us, "took over the VM");
    // The VM runs here already: nothing that fails now may stop it (the
    // old process first, then stdout, which may be a closed pipe).
    let told = handover::send_line(
        &mut link.stream,
        &json!({"cmd": "running", "downtime_us": downtime_us}),
    );
    if let Err(e) = told {
        tracing::warn!("the old process was not told that the VM runs here: {e:#}");
    }
    let event = json!({"event": "takeover", "downtime_us": downtime_us});
    let _ = std::io::Write::write_all(
        &mut std::io::stdout().lock(),
        format!("{event}\n").as_bytes(),
    );
    if link.data_follows {
        // Until the list comes (or if it never does), all of memory counts.
        let vm = vm.clone();
        let spawned = std::thread::Builder::new()
            .name("handover-data".into())
            .spawn(move || {
                let adopted = handover::recv_data(&mut link.reader)
                    .and_then(|e| Ok(vm.ram().adopt_data_extents(&e).map(|()| e.len())?));
                match adopted {
                    Ok(n) => tracing::info!(extents = n, "pages with data known from the old process"),
                    Err(e) => tracing::warn!("no list of pages with data from the old process ({e:#}): all of memory counts"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot wait for the old process's list of pages with data ({e}): all of memory counts");
        }
    }
}
