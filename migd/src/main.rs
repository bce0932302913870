//! `migd`: the per-host migration daemon and its one-VM command.

mod daemon;
mod handover;
mod run;
use migd::size;

use clap::{Parser, Subcommand};

/// migd: runs KVM virtual machines and moves them live between hosts.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    /// With no subcommand, migd runs as the per-host daemon.
    #[command(flatten)]
    daemon: daemon::DaemonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one VM in the foreground until it powers off or gets SIGTERM.
    Run(run::RunArgs),
}

fn main() {
    migd::logging::init();
    let cli = Cli::parse();
    let code = match cli.command {
        None => match daemon::main(cli.daemon) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{}migd: error: {e:#}", migd::logging::error_prefix());
                1
            }
        },
        Some(Command::Run(args)) => match run::run(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{}migd run: error: {e:#}", migd::logging::error_prefix());
                1
            }
        },
    };
    std::process::exit(code);
}
