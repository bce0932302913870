//! `migctl migrate` without `--detach`: a progress bar while the job runs, then the
//! final statistics; exit 0 only on `completed`.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use migd::client::Client;
use serde_json::{json, Value};

use crate::commands::print_json;
use crate::format;

const POLL: Duration = Duration::from_millis(250);
/// How long the daemon may not answer before `migrate` (and `evacuate`)
/// gives up waiting.
pub(crate) const LOST_AFTER: Duration = Duration::from_secs(60);

/// Polls `job` until the job ends, drawing progress on stderr when it is a terminal.
/// `memory` (what round 0 is expected to send: the VM's RAM that holds data)
/// sizes the bar until the first round has measured the rest.
pub fn wait(socket: &Path, id: &str, memory: u64, as_json: bool) -> Result<ExitCode> {
    let mut client = Client::connect(socket, Duration::from_secs(30))?;
    let bar = ProgressBar::with_draw_target(Some(memory.max(1)), ProgressDrawTarget::hidden());
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut rate = Rate::default();
    // Since the daemon last answered: a restart of it (the job goes on in
    // the VM process, and the next daemon picks it up) is waited out.
    let mut answered = Instant::now();
    let job = loop {
        let r = match client.call(&json!({"cmd": "job", "id": id})) {
            Ok(r) => r,
            Err(e @ migd::client::Error::Daemon(_)) => bail!("migration {id}: {e}"),
            Err(e) if answered.elapsed() < LOST_AFTER => {
                bar.set_message(format!("{e}; trying again"));
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => {
                bail!("lost track of migration {id} ({e}); it may still run: see `migctl job {id}`")
            }
        };
        answered = Instant::now();
        let job = r["job"].clone();
        let status = job["status"].as_str().unwrap_or("");
        if format::is_final(status) {
            break job;
        }
        update(&bar, &job, memory, &mut rate);
        std::thread::sleep(POLL);
    };
    bar.finish_and_clear();
    let status = job["status"].as_str().unwrap_or("failed");
    // Failed or cancelled before any page moved: its statistics are all
    // zeros, and the error line says all there is.
    let nothing_moved = status != "completed" && job["stats"]["bytes"].as_u64().unwrap_or(0) == 0;
    if as_json {
        print_json(&job["stats"]);
    } else if !nothing_moved {
        println!(
            "Migration {} of {} to {}: {status}",
            format::opt(&job["id"]),
            format::opt(&job["vm"]),
            format::opt(&job["to"])
        );
        print!("{}", format::job_stats(&job));
    }
    if status == "completed" {
        // The rounds may stop without converging (round limit, byte budget,
        // dirty set not shrinking): the pause then outlasts --max-downtime.
        let (down, max) = (
            job["stats"]["downtime_ms"].as_f64().unwrap_or(0.0),
            job["max_downtime_ms"].as_f64().unwrap_or(f64::INFINITY),
        );
        if down > max {
            eprintln!(
                "warning: the guest was paused {down:.0} ms, over --max-downtime {max:.0} ms \
                 (pre-copy stopped: {}); --strict-downtime fails such a migration instead",
                format::opt(&job["stats"]["stop_reason"])
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let what = format!(
        "migration {id} of {} to {}",
        format::opt(&job["vm"]),
        format::opt(&job["to"])
    );
    match job["error"].as_str().or(job["stats"]["error"].as_str()) {
        Some(e) => bail!("{what} {status}: {}", format::with_hint(e)),
        None => bail!("{what} {status}"),
    }
}

/// Transfer rate measured here from successive `bytes` samples (bytes/s, smoothed).
#[derive(Default)]
struct Rate {
    last: Option<(Instant, u64)>,
    bytes_per_s: f64,
}

impl Rate {
    fn sample(&mut self, bytes: u64) -> f64 {
        let now = Instant::now();
        if let Some((t, b)) = self.last {
            let dt = now.duration_since(t).as_secs_f64();
            if dt >= 0.2 && bytes >= b {
                let r = (bytes - b) as f64 / dt;
                self.bytes_per_s = if self.bytes_per_s == 0.0 {
                    r
                } else {
                    0.7 * self.bytes_per_s + 0.3 * r
                };
                self.last = Some((now, bytes));
            }
        } else {
            self.last = Some((now, bytes));
        }
        self.bytes_per_s
    }
}

/// What is left to send, from the job's statistics `st`: what the job
/// measured ([`format::remaining`]); before that, in round 0, `memory` less
/// what was sent.
fn left(st: &Value, memory: u64) -> u64 {
    format::remaining(st)
        .unwrap_or_else(|| memory.saturating_sub(st["bytes"].as_u64().unwrap_or(0)))
}

/// Round, transferred/remaining, dirty rate, bandwidth, ETA.
fn update(bar: &ProgressBar, job: &Value, memory: u64, rate: &mut Rate) {
    let st = &job["stats"];
    let sent = st["bytes"].as_u64().unwrap_or(0);
    let measured = rate.sample(sent);
    let reported = st["bandwidth_mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0;
    let bandwidth = if reported > 0.0 { reported } else { measured };
    let left = left(st, memory);
    bar.update(|s| {
        s.set_len((sent + left).max(1));
        s.set_pos(sent);
    });
    let eta = if bandwidth > 0.0 && left > 0 {
        format::duration(left as f64 / bandwidth)
    } else {
        "-".into()
    };
    bar.set_message(format!(
        "{} round {} | sent {} | left {} | dirty {} | {:.0} Mbit/s | ETA {eta}",
        job["status"].as_str().unwrap_or("-"),
        format::opt(&st["round"]),
        format::bytes(sent),
        format::bytes(left),
        format::rate(st["dirty_rate"].as_f64().unwrap_or(0.0)),
        bandwidth * 8.0 / 1e6,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_is_the_jobs_own_figure_once_a_round_has_read_the_dirty_log() {
        let mib = 1u64 << 20;
        // Round 0: the rest of memory.
        let st = json!({"round": 0, "bytes": 10 * mib, "remaining_bytes": 0});
        assert_eq!(left(&st, 128 * mib), 118 * mib);
        // Later rounds: what the dirty log said, nothing included.
        let st = json!({"round": 1, "bytes": 18 * mib, "remaining_bytes": 2 * mib});
        assert_eq!(left(&st, 128 * mib), 2 * mib);
        let st = json!({"round": 2, "bytes": 18 * mib, "remaining_bytes": 0});
        assert_eq!(left(&st, 128 * mib), 0);
        // Post-copy counts its pages at the switch (round 0 in mode postcopy).
        let st = json!({"round": 0, "bytes": mib, "remaining_bytes": 5 * mib,
                        "pages": {"expected": 1280}});
        assert_eq!(left(&st, 128 * mib), 5 * mib);
        let st = json!({"round": 0, "bytes": mib, "remaining_bytes": 0,
                        "pages": {"expected": 1280}});
        assert_eq!(left(&st, 128 * mib), 0);
    }
}
