//! One function per migctl command: build the request, call the daemon, print.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use migd::client::Client;
use serde_json::{json, Value};

use crate::format;
use crate::{Cli, Cmd};

/// Replies to quick commands come within this.
const TIMEOUT: Duration = Duration::from_secs(90);
/// `create`, `start` and `restore` wait for the VM process to answer, which
/// takes minutes for a large snapshot or `prefault`; the daemon gives up
/// after 10 minutes.
const START_TIMEOUT: Duration = Duration::from_secs(660);
/// `save` waits for the whole snapshot to be written.
const SAVE_TIMEOUT: Duration = Duration::from_secs(900);

pub fn run(cli: Cli) -> Result<ExitCode> {
    let connect = || Client::connect(&cli.socket, TIMEOUT).map_err(anyhow::Error::from);
    let connect_to_start =
        || Client::connect(&cli.socket, START_TIMEOUT).map_err(anyhow::Error::from);
    match cli.command {
        Cmd::Evacuate {
            to,
            mode,
            parallel,
            max_downtime,
            json,
        } => {
            return crate::evacuate::run(
                &mut connect()?,
                &to,
                &mode,
                parallel as usize,
                max_downtime,
                json,
            )
        }
        Cmd::Create {
            name,
            kernel,
            initrd,
            cmdline,
            memory,
            vcpus,
            json,
        } => {
            let kernel = absolute(&kernel)?;
            let initrd = initrd.as_deref().map(absolute).transpose()?;
            // Preparing a large guest's memory (huge pages, prefault) takes a while.
            let r = with_spinner(format!("creating {name}"), || {
                Ok(connect_to_start()?.call(&json!({
                    "cmd": "create", "name": name, "kernel": kernel, "initramfs": initrd,
                    "cmdline": cmdline, "memory": memory, "vcpus": vcpus,
                }))?)
            })?;
            if json {
                print_json(&r["vm"]);
            } else {
                println!("VM {name} created (pid {})", format::opt(&r["vm"]["pid"]));
            }
        }
        Cmd::List { json } => {
            let r = connect()?.call(&json!({"cmd": "list"}))?;
            // VMs found at the daemon's start whose processes have not
            // answered yet are listed too, as `adopting` (all that is known
            // of them is their name), so that a count of this host's VMs
            // counts them.
            let mut vms = r["vms"].as_array().cloned().unwrap_or_default();
            for name in r["adopting"].as_array().into_iter().flatten() {
                // (Listed already in the moment it is taken on.)
                if !vms.iter().any(|v| v["name"] == *name) {
                    vms.push(json!({"name": name, "state": "adopting"}));
                }
            }
            if json {
                print_json(&Value::Array(vms));
            } else {
                print!("{}", format::vm_table(&vms));
            }
            for name in r["adopting"].as_array().into_iter().flatten() {
                eprintln!(
                    "{}: its VM process does not answer yet (busy, or stopped); nothing but \
                     its name is known until it does",
                    name.as_str().unwrap_or("?")
                );
            }
        }
        Cmd::Info { name, json } => {
            let r = connect()?.call(&json!({"cmd": "info", "name": name}))?;
            if json {
                print_json(&r["vm"]);
            } else {
                print!("{}", format::vm_info(&r["vm"]));
            }
        }
        Cmd::Console { name, follow } => {
            if follow {
                let r =
                    connect()?.call(&json!({"cmd": "console", "name": name, "follow": true}))?;
                let path = r["path"].as_str().context("daemon gave no console path")?;
                follow_file(path)?;
            } else {
                let r = connect()?.call(&json!({"cmd": "console", "name": name}))?;
                if r["truncated"] == true {
                    eprintln!(
                        "(the console's last part only; the whole log is {})",
                        format::opt(&r["path"])
                    );
                }
                let mut out = std::io::stdout().lock();
                out.write_all(r["text"].as_str().unwrap_or("").as_bytes())?;
                out.flush()?;
            }
        }
        Cmd::Pause { name } => {
            let r = connect()?.call(&json!({"cmd": "pause", "name": name}))?;
            match r["pause_us"].as_u64() {
                _ if r["changed"] == false => println!("VM {name} was already paused"),
                Some(us) => println!("VM {name} paused ({us} µs)"),
                None => println!("VM {name} paused"),
            }
        }
        Cmd::Start { name, force, json } => {
            let r = with_spinner(format!("starting {name}"), || {
                Ok(connect_to_start()?
                    .call(&json!({"cmd": "start", "name": name, "force": force}))?)
            })?;
            if json {
                print_json(&r["vm"]);
            } else {
                println!("VM {name} started (pid {})", format::opt(&r["vm"]["pid"]));
            }
        }
        Cmd::Resume { name, force } => {
            let r = connect()?.call(&json!({"cmd": "resume", "name": name, "force": force}))?;
            if r["changed"] == false {
                println!("VM {name} was already running");
            } else {
                println!("VM {name} resumed");
            }
        }
        Cmd::Destroy { name, force } => {
            connect()?.call(&json!({"cmd": "destroy", "name": name, "force": force}))?;
            println!("VM {name} destroyed");
        }
        Cmd::Migrate {
            name,
            to,
            mode,
            max_downtime,
            max_bandwidth,
            prepaging_window,
            no_fault_channel,
            xbzrle_cache,
            streams,
            auto_converge,
            compress,
            reorder,
            no_clear_before_send,
            strict_downtime,
            verify,
            detach,
            json,
        } => {
            let mut c = connect()?;
            let vm = c.call(&json!({"cmd": "info", "name": name}))?["vm"].take();
            // Round 0 sends the pages that hold data: the memory the guest
            // RAM takes on the host (`memory_used`), where the daemon knows
            // it, not all of it. It sizes the progress bar until the job
            // says what is left.
            let data = format::vm_data(&vm).unwrap_or(0);
            let r = c.call(&json!({
                "cmd": "migrate", "name": name, "to": to, "mode": mode,
                "max_downtime_ms": max_downtime, "max_bandwidth": max_bandwidth, "detach": true,
                "prepaging_window": prepaging_window, "no_fault_channel": no_fault_channel,
                "xbzrle_cache": xbzrle_cache, "streams": streams,
                "auto_converge": auto_converge,
                "compress": compress, "reorder": reorder,
                "no_clear_before_send": no_clear_before_send,
                "strict_downtime": strict_downtime, "verify": verify,
            }))?;
            let id = r["job"]
                .as_str()
                .context("daemon gave no job id")?
                .to_string();
            if detach {
                if json {
                    print_json(&json!({"job": id}));
                } else {
                    println!("{id}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            return crate::migrate::wait(&cli.socket, &id, data, json);
        }
        Cmd::Jobs { json } => {
            let r = connect()?.call(&json!({"cmd": "jobs"}))?;
            if json {
                print_json(&r["jobs"]);
            } else {
                print!(
                    "{}",
                    format::job_table(r["jobs"].as_array().map(Vec::as_slice).unwrap_or(&[]))
                );
            }
        }
        Cmd::Job { id, json } => {
            let mut c = connect()?;
            let mut r = c.call(&json!({"cmd": "job", "id": id}))?;
            if json {
                print_json(&r["job"]);
            } else {
                let job = r["job"].take();
                // A running job's VM: its memory is the data total, and
                // what round 0 sends (as for `migrate`'s bar). Without it
                // (the VM just left), those figures are unknown.
                let vm = match job["status"].as_str() {
                    Some(status) if !format::is_final(status) => c
                        .call(&json!({"cmd": "info", "name": job["vm"]}))
                        .map_or(Value::Null, |mut r| r["vm"].take()),
                    _ => Value::Null,
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                print!("{}", format::job_info(&job, &vm, now));
            }
        }
        Cmd::Cancel { id } => {
            connect()?.call(&json!({"cmd": "cancel", "id": id}))?;
            println!("cancelling {id}");
        }
        Cmd::Abort { name } => {
            let r = connect()?.call(&json!({"cmd": "abort", "name": name}))?;
            match r["job"].as_str() {
                Some(job) => println!("cancelling {name}'s migration {job}"),
                None => println!("aborting {name}'s save"),
            }
        }
        Cmd::Estimate {
            name,
            to,
            mode,
            max_downtime,
            max_bandwidth,
            json,
        } => {
            let r = with_spinner(
                format!("measuring {name}'s dirty rate and the path to {to}"),
                || {
                    let req = json!({
                        "cmd": "estimate", "name": name, "to": to, "mode": mode,
                        "max_downtime_ms": max_downtime, "max_bandwidth": max_bandwidth,
                    });
                    match connect()?.call(&req) {
                        // The probe of the path to the destination failed.
                        Err(migd::client::Error::Daemon(e)) => {
                            Err(anyhow::anyhow!(format::with_hint(&e)))
                        }
                        r => Ok(r?),
                    }
                },
            )?;
            if json {
                print_json(&r);
            } else {
                print!("{}", format::estimate(&r));
            }
        }
        Cmd::Save {
            name,
            file,
            keep,
            json,
        } => {
            let file = absolute(&file)?;
            let mut client = Client::connect(&cli.socket, SAVE_TIMEOUT)?;
            let req = json!({"cmd": "save", "name": name, "path": file, "keep": keep});
            let r = with_save_progress(&cli.socket, &name, &file, move || client.call(&req))?;
            if json {
                print_json(&r);
            } else {
                let ms = |v: &Value| v.as_f64().map_or("?".into(), |ms| format!("{ms:.1}"));
                println!(
                    "VM {name} saved to {} ({}, {} ms, guest paused {} ms){}",
                    file.display(),
                    format::bytes(r["bytes"].as_u64().unwrap_or(0)),
                    ms(&r["ms"]),
                    ms(&r["paused_ms"]),
                    if keep {
                        "; it runs on"
                    } else {
                        "; stopped and removed"
                    }
                );
            }
        }
        Cmd::Restore {
            name,
            file,
            lazy,
            json,
        } => {
            let file = absolute(&file)?;
            let r = with_spinner(format!("restoring {name} from {}", file.display()), || {
                Ok(connect_to_start()?.call(&json!({
                    "cmd": "restore", "name": name, "path": file, "lazy": lazy,
                }))?)
            })?;
            if json {
                print_json(&r["vm"]);
            } else {
                // Lazy: the VM runs while its memory comes from the file,
                // which must stay until all of it is in.
                let filling = if lazy {
                    format!(
                        "; its memory is filled from the file in the background: keep the file \
                         in place until `migctl info {name}` shows no Filling line"
                    )
                } else {
                    String::new()
                };
                println!(
                    "VM {name} restored from {} (pid {}){filling}",
                    file.display(),
                    format::opt(&r["vm"]["pid"])
                );
            }
        }
        Cmd::Postcopy { id } => {
            connect()?.call(&json!({"cmd": "postcopy", "id": id}))?;
            println!("switching {id} to post-copy");
        }
        Cmd::Recover { id } => {
            connect()?.call(&json!({"cmd": "recover", "id": id}))?;
            println!("reconnecting {id}");
        }
        Cmd::MigrateSet {
            id,
            max_bandwidth,
            max_downtime,
            json,
        } => {
            if max_bandwidth.is_none() && max_downtime.is_none() {
                anyhow::bail!("nothing to set: give --max-bandwidth and/or --max-downtime");
            }
            let r = connect()?.call(&json!({
                "cmd": "migrate_set", "id": id,
                "max_bandwidth": max_bandwidth, "max_downtime_ms": max_downtime,
            }))?;
            if json {
                print_json(&r);
            } else {
                let cap = match r["max_bandwidth"].as_u64() {
                    Some(b) => format::rate(b as f64),
                    None => "unlimited".into(),
                };
                println!(
                    "{id}: max-bandwidth {cap}, max-downtime {} ms",
                    r["max_downtime_ms"]
                );
            }
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "migctl", &mut std::io::stdout());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon resolves paths in its own working directory: send absolute ones.
/// Runs `save` (the daemon's `save` call) while a bar on stderr shows the
/// pages written, from the VM's `saving` progress (drawn only on a terminal).
fn with_save_progress<T: Send>(
    socket: &std::path::Path,
    name: &str,
    file: &std::path::Path,
    save: impl FnOnce() -> T + Send,
) -> T {
    let bar = spinner(format!("saving {name} to {}", file.display()));
    if bar.is_hidden() {
        return save();
    }
    // A spinner until the file's size is known, then a bar.
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} {wide_msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    let done = std::sync::atomic::AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            let Ok(mut watch) = Client::connect(socket, TIMEOUT) else {
                return;
            };
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(r) = watch.call(&json!({"cmd": "info", "name": name})) {
                    let p = &r["vm"]["saving"];
                    if let (Some(w), Some(n)) = (p["written"].as_u64(), p["pages"].as_u64()) {
                        if n > 0 && bar.length().is_none() {
                            bar.set_style(style.clone());
                        }
                        if n > 0 {
                            bar.set_length(n * 4096);
                            bar.set_position(w * 4096);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let r = save();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    bar.finish_and_clear();
    r
}

/// Runs `call` with a spinner saying `msg` on stderr (drawn only on a terminal).
fn with_spinner<T>(msg: String, call: impl FnOnce() -> Result<T>) -> Result<T> {
    let bar = spinner(msg);
    let r = call();
    bar.finish_and_clear();
    r
}

/// A spinner on stderr while a long request runs (drawn only on a terminal).
fn spinner(msg: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_message(msg);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn absolute(p: &std::path::Path) -> Result<std::path::PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

pub fn print_json(v: &Value) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(_) => println!("{v}"),
    }
}

/// Prints a file and then what is appended to it, like `tail -f`, until interrupted.
fn follow_file(path: &str) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            pos += n as u64;
            out.write_all(&buf[..n])?;
            out.flush()?;
            continue;
        }
        std::thread::sleep(Duration::from_millis(200));
        match std::fs::metadata(path) {
            // The VM was destroyed.
            Err(_) => return Ok(()),
            // Truncated, or replaced (rotated): start over, once what the
            // old file still had is shown.
            Ok(m) if m.len() < pos || m.ino() != f.metadata()?.ino() => {
                let mut rest = Vec::new();
                f.read_to_end(&mut rest)?;
                out.write_all(&rest)?;
                f = std::fs::File::open(path)?;
                f.seek(SeekFrom::Start(0))?;
                pos = 0;
            }
            Ok(_) => {}
        }
    }
}
