//! `migctl`: the command-line client of the migd daemon.

#[path = "migctl/commands.rs"]
mod commands;
#[path = "migctl/evacuate.rs"]
mod evacuate;
#[path = "migctl/format.rs"]
mod format;
#[path = "migctl/migrate.rs"]
mod migrate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// migctl: manage VMs and live migrations through the local migd daemon.
#[derive(Parser, Debug)]
#[command(name = "migctl", version)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = migd::client::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create and start a VM.
    Create {
        /// Name of the VM: 1 to 64 of A-Z a-z 0-9 _ . -
        name: String,
        /// Kernel: a PVH ELF or a Linux bzImage.
        #[arg(long)]
        kernel: PathBuf,
        /// Initial ramdisk.
        #[arg(long, alias = "initramfs")]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Guest RAM, e.g. 512M, 1G (a bare number is MiB).
        #[arg(long, value_parser = migd::size::parse_size)]
        memory: u64,
        /// vCPUs (1-8).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Print the new VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List VMs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one VM.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a VM's serial console.
    Console {
        name: String,
        /// Keep printing what the guest writes (Ctrl-C to stop).
        #[arg(long, short)]
        follow: bool,
    },
    /// Boot a stopped VM again from its kernel (after a guest power-off or a
    /// crash), in the same directory.
    Start {
        name: String,
        /// Boot even a VM left unconfirmed by a process that died past its
        /// migration's commit: only once you know the destination does not
        /// run it.
        #[arg(long)]
        force: bool,
        /// Print the started VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause a VM's vCPUs.
    Pause { name: String },
    /// Resume a paused VM.
    Resume {
        name: String,
        /// Resume a VM whose last migration ended unconfirmed (state
        /// `unconfirmed`): only once you know the destination does not run it.
        #[arg(long)]
        force: bool,
    },
    /// Stop a VM and delete its state directory. Refused unless --force
    /// while its pages still arrive by post-copy (its state since the switch
    /// lives only here), while it is unconfirmed (its last migration ended
    /// without the destination's word), and while its process, found at the
    /// daemon's start, does not answer (busy, or stopped).
    Destroy {
        name: String,
        /// Destroy it even then: after a post-copy the operator gave up on,
        /// once the destination is known not to run it, or by SIGKILL to a
        /// process that does not answer.
        #[arg(long)]
        force: bool,
    },
    /// Migrate a VM live to another host's migd.
    Migrate {
        /// The VM to move.
        name: String,
        /// Destination migd, HOST:PORT (its --listen address).
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// Migration mode.
        #[arg(long, value_parser = MODES, default_value = "precopy")]
        mode: String,
        /// Longest acceptable pause of the guest, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 300)]
        max_downtime: u64,
        /// Bandwidth cap in bytes per second, e.g. 128M (a bare number is MiB/s).
        #[arg(long, value_name = "RATE", value_parser = migd::size::parse_size)]
        max_bandwidth: Option<u64>,
        /// Post-copy and hybrid: pages sent along with each page the guest
        /// faulted on (pre-paging window; 0 turns pre-paging off).
        #[arg(long, value_name = "PAGES")]
        prepaging_window: Option<u32>,
        /// Post-copy and hybrid: send fault requests and their answers on the
        /// main connection, behind the background push, instead of their own.
        #[arg(long)]
        no_fault_channel: bool,
        /// Send re-sent pages as deltas against what was sent before (XBZRLE),
        /// with a cache of this size, e.g. 256M.
        #[arg(long, value_name = "SIZE", value_parser = migd::size::parse_size)]
        xbzrle_cache: Option<u64>,
        /// Spread pre-copy page data over N TCP streams (1 to 16; multifd),
        /// so that several cores share zero detection, encryption and stores.
        #[arg(long, value_name = "N")]
        streams: Option<u64>,
        /// Throttle the guest's vCPUs step by step (20 %, +10 % per round, up
        /// to 99 %) while pre-copy does not converge (QEMU's auto-converge).
        #[arg(long)]
        auto_converge: bool,
        /// Compress page batches: none (default), zstd, or zstd:LEVEL with LEVEL 1..=19
        /// (zstd alone is level 1). Pays off on links slower than the CPU.
        #[arg(long, value_name = "ALGO[:LEVEL]", value_parser = parse_compress)]
        compress: Option<String>,
        /// Pre-copy rounds send rarely dirtied pages first and skip hot pages
        /// dirtied again before their turn (dynamic page transfer reordering).
        #[arg(long)]
        reorder: bool,
        /// Pre-copy rounds clear the whole dirty log each time they read it,
        /// instead of each word right before sending its pages (for
        /// comparison; it sends more).
        #[arg(long)]
        no_clear_before_send: bool,
        /// Pre-copy: fail (the VM keeps running here) rather than pause the
        /// guest longer than --max-downtime when the rounds stop without
        /// converging (round limit, byte budget, dirty set not shrinking).
        #[arg(long)]
        strict_downtime: bool,
        /// Pre-copy: compare CRC32 digests of all guest memory on both sides
        /// inside the pause; a mismatch fails the migration and the VM
        /// resumes here. Adds the time to read the memory the guest has
        /// written (pages never written are skipped) to the downtime.
        #[arg(long)]
        verify: bool,
        /// Print the job id and return at once.
        #[arg(long)]
        detach: bool,
        /// Print the final statistics (or, with --detach, the job) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List migration jobs.
    Jobs {
        #[arg(long)]
        json: bool,
    },
    /// Show one migration job.
    Job {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running migration job.
    Cancel { id: String },
    /// End what VM NAME is doing: its migration job (as cancel) or the save
    /// being written, which removes its unfinished file (virsh domjobabort).
    #[command(visible_alias = "domjobabort")]
    Abort { name: String },
    /// Switch a running hybrid job to post-copy at the end of its current round.
    Postcopy { id: String },
    /// Reconnect a post-copy job whose link was lost now, instead of after its
    /// back-off (like QEMU's migrate-recover/migrate -r; run on the source).
    Recover { id: String },
    /// Change a running job's bandwidth cap and/or largest acceptable pause
    /// (QEMU's migrate-set-parameters; virsh migrate-setspeed and
    /// migrate-setmaxdowntime). The cap applies within 50 ms, the downtime
    /// from the end of the current round.
    MigrateSet {
        id: String,
        /// New cap in bytes per second, e.g. 512M (a bare number is MiB/s);
        /// `unlimited` lifts the job's own cap (the host's share stays); 0 is
        /// refused.
        #[arg(long, value_name = "RATE", value_parser = parse_rate)]
        max_bandwidth: Option<u64>,
        /// New largest acceptable pause of the guest, in milliseconds.
        #[arg(long, value_name = "MS")]
        max_downtime: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Predict downtime and total time of a migration with the cost model, from
    /// the VM's measured memory and dirty rate and a probe of the path.
    Estimate {
        name: String,
        #[arg(long)]
        to: String,
        /// Migration mode to predict.
        #[arg(long, value_parser = MODES, default_value = "precopy")]
        mode: String,
        /// Acceptable downtime, ms (pre-copy's stop condition).
        #[arg(long, default_value_t = 300)]
        max_downtime: u64,
        /// Predict under this bandwidth cap, bytes per second (e.g. 128M; a
        /// bare number is MiB/s); the daemon's own cap applies as well.
        #[arg(long, value_name = "RATE", value_parser = migd::size::parse_size)]
        max_bandwidth: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Write a VM's snapshot (memory, vCPUs, devices) to FILE, then stop and
    /// remove the VM, like `virsh save`; with --keep it runs on instead.
    Save {
        name: String,
        /// Snapshot file (written to a temporary name, then renamed; mode 0600).
        file: PathBuf,
        /// Resume the VM once written instead of stopping it (a checkpoint).
        #[arg(long)]
        keep: bool,
        #[arg(long)]
        json: bool,
    },
    /// Start a VM named NAME from a snapshot file, like `virsh restore`.
    Restore {
        name: String,
        file: PathBuf,
        /// Resume at once and fill memory from the file on demand and in the
        /// background, working set first; keep the file until the VM runs elsewhere.
        #[arg(long)]
        lazy: bool,
        #[arg(long)]
        json: bool,
    },
    /// Migrate every VM of this host (running or paused, not migrating) to one
    /// destination, a few at a time, and report each (for host maintenance).
    Evacuate {
        /// Destination migd, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// Migration mode of every job.
        #[arg(long, value_parser = MODES, default_value = "precopy")]
        mode: String,
        /// Migrations running at once (they share the daemon's max_bandwidth).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        parallel: u32,
        /// Longest acceptable pause of each guest, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 300)]
        max_downtime: u64,
        /// Print the per-VM results as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script, e.g. `migctl completions bash > /etc/bash_completion.d/migctl`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// The values of `--mode` (migrate, estimate, evacuate).
const MODES: [&str; 4] = ["precopy", "postcopy", "hybrid", "auto"];

/// A bandwidth, or `unlimited` (sent as 0, which lifts the job's own cap).
/// A rate of 0 is refused, as `migrate` and the config refuse it: an operator
/// who types 0 to stop the traffic would otherwise lift every limit.
fn parse_rate(s: &str) -> Result<u64, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    match migd::size::parse_size(s)? {
        0 => Err(format!(
            "'{s}' is no cap (0 bytes/s would stop the migration); \
             `--max-bandwidth unlimited` lifts the job's own cap, \
             `migctl cancel` stops it"
        )),
        b => Ok(b),
    }
}

/// `--compress`: checked here, so that a bad value never reaches the daemon.
fn parse_compress(s: &str) -> Result<String, String> {
    s.parse::<migration::compress::Compression>()
        .map(|c| c.to_string())
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`migctl jobs --json | head
    // -1`) ends migctl quietly, as it does other command-line tools, instead
    // of a panic in `println!` or clap_complete, or an error line. Rust
    // ignores SIGPIPE by default. The control socket is unaffected: the
    // client writes to it with MSG_NOSIGNAL (`client::send_all`), so a
    // daemon that closed the connection is still an error migctl can act on.
    // SAFETY: at the start of main, before any thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE and no handler code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("migctl: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_names_migctl() {
        let v = <Cli as clap::CommandFactory>::command().render_version();
        assert_eq!(v, format!("migctl {}\n", env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn every_mode_flag_takes_the_same_values() {
        for cmd in ["migrate", "estimate", "evacuate"] {
            let args = |mode: &str| {
                let mut a = vec!["migctl", cmd];
                if cmd != "evacuate" {
                    a.push("vm1");
                }
                a.extend(["--to", "h:1", "--mode", mode]);
                Cli::try_parse_from(a)
            };
            for mode in MODES {
                assert!(args(mode).is_ok(), "{cmd} --mode {mode}");
            }
            let e = args("precopyy").err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("possible values: precopy, postcopy")),
                "{cmd}: {e:?}"
            );
        }
    }
}
