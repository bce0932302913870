//! Human output: tables in the style of `virsh list`, key/value blocks, statistics.

use std::fmt::Write;

use serde_json::Value;

/// A JSON value as a table cell: strings bare, null as `-`.
pub fn opt(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Bytes with a binary unit: `128 MiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn bytes_of(v: &Value) -> String {
    v.as_u64().map(bytes).unwrap_or_else(|| "-".into())
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn time(v: &Value) -> String {
    let Some(secs) = v.as_u64() else {
        return "-".into();
    };
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Left-aligned columns separated by three spaces, a dashed rule under the header.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = String>| -> String {
        let mut s = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                let _ = write!(s, " {c}");
            } else {
                let _ = write!(s, " {c:<w$}  ");
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut header.iter().map(|h| h.to_string()));
    let total: usize = widths.iter().sum::<usize>() + 3 * widths.len();
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for r in rows {
        out.push_str(&line(&mut r.iter().cloned()));
    }
    out
}

/// `migctl list`.
pub fn vm_table(vms: &[Value]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                opt(&v["pid"]),
                opt(&v["name"]),
                opt(&v["state"]),
                bytes_of(&v["memory"]),
                opt(&v["vcpus"]),
            ]
        })
        .collect();
    table(&["Id", "Name", "State", "Memory", "vCPUs"], &rows)
}

/// `part` as a percentage of `all` (0 when `all` is 0).
fn percent(part: u64, all: u64) -> f64 {
    part as f64 * 100.0 / all.max(1) as f64
}

fn kv(out: &mut String, key: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{:<16}{value}", format!("{key}:"));
}

/// `migctl info`.
pub fn vm_info(v: &Value) -> String {
    let mut s = String::new();
    kv(&mut s, "Name", opt(&v["name"]));
    kv(&mut s, "State", opt(&v["state"]));
    if let Some(why) = v["unconfirmed"].as_str() {
        kv(&mut s, "Unconfirmed", why.to_string());
    }
    kv(&mut s, "Pid", opt(&v["pid"]));
    kv(&mut s, "Memory", bytes_of(&v["memory"]));
    let huge = v["huge_pages"].as_bool() == Some(true);
    if let (Some(used), Some(all)) = (v["memory_used"].as_u64(), v["memory"].as_u64()) {
        let rest = if huge {
            "the rest is reserved in the host's huge page pool"
        } else {
            "memory the guest never wrote takes none"
        };
        kv(
            &mut s,
            "Memory used",
            format!("{} ({:.0} %; {rest})", bytes(used), percent(used, all)),
        );
    }
    if let Some(h) = v["huge_pages"].as_bool() {
        let pages = if h {
            "huge pages (2 MiB)"
        } else {
            "4 KiB pages (shmem)"
        };
        kv(&mut s, "Memory pages", pages.to_string());
    }
    kv(&mut s, "vCPUs", opt(&v["vcpus"]));
    kv(&mut s, "Kernel", opt(&v["kernel"]));
    kv(&mut s, "Initramfs", opt(&v["initramfs"]));
    if let Some(why) = v["boot_refused"].as_str() {
        kv(&mut s, "Boot refused", why.to_string());
    }
    kv(&mut s, "Cmdline", opt(&v["cmdline"]));
    kv(&mut s, "Created", time(&v["created"]));
    kv(&mut s, "Origin", opt(&v["origin"]));
    if !v["source"].is_null() {
        kv(&mut s, "Source", opt(&v["source"]));
    }
    if let (Some(done), Some(all)) = (
        v["filling"]["filled"].as_u64(),
        v["filling"]["pages"].as_u64(),
    ) {
        kv(
            &mut s,
            "Filling",
            format!(
                "{:.0} % of {} from the snapshot (keep the file until done)",
                percent(done, all),
                bytes(all * 4096)
            ),
        );
    }
    let a = &v["arriving"];
    if let (Some(got), Some(all)) = (a["pages_received"].as_u64(), a["pages_total"].as_u64()) {
        kv(
            &mut s,
            "Arriving",
            format!(
                "{:.0} % of {} from {} ({}, {} fault(s) waiting; post-copy: the source keeps the rest until all is here)",
                percent(got, all),
                bytes(all * 4096),
                opt(&a["source"]),
                opt(&a["status"]),
                a["faults_waiting"].as_u64().unwrap_or(0)
            ),
        );
    }
    let w = &v["saving"];
    if let (Some(done), Some(all)) = (w["written"].as_u64(), w["pages"].as_u64()) {
        kv(
            &mut s,
            "Saving",
            format!(
                "{:.0} % of {} to {} (destroy cancels it)",
                percent(done, all),
                bytes(all * 4096),
                opt(&w["path"])
            ),
        );
    }
    if !v["dir"].is_null() {
        kv(&mut s, "Dir", opt(&v["dir"]));
    }
    kv(&mut s, "Console", opt(&v["console"]));
    kv(&mut s, "Migration job", opt(&v["job"]));
    s
}

/// `migctl jobs`.
pub fn job_table(jobs: &[Value]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                opt(&j["id"]),
                opt(&j["vm"]),
                opt(&j["to"]),
                opt(&j["mode"]),
                opt(&j["status"]),
                time(&j["started"]),
                bytes_of(&j["stats"]["bytes"]),
                left(j),
            ]
        })
        .collect();
    table(
        &[
            "Id", "VM", "To", "Mode", "Status", "Started", "Sent", "Left",
        ],
        &rows,
    )
}

/// A job's data still to send, as the listing shows it: `-` once it ended
/// or while not measured yet (round 0 of pre-copy, post-copy's start).
fn left(j: &Value) -> String {
    match j["status"].as_str() {
        Some(st) if !is_final(st) => remaining(&j["stats"]).map_or("-".into(), bytes),
        _ => "-".into(),
    }
}

/// Whether a job's `status` is one it ends in (`completed`, `failed`, `cancelled`).
pub fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// `migctl job`: the job, then its statistics. A job still running (its
/// `status` not final) gets its progress first, as `virsh domjobinfo` has
/// it, from `vm` (the VM object of `info`, or null) for the guest's memory
/// and `now` (unix seconds) for the time elapsed.
pub fn job_info(j: &Value, vm: &Value, now: u64) -> String {
    let mut s = String::new();
    kv(&mut s, "Job", opt(&j["id"]));
    kv(&mut s, "VM", opt(&j["vm"]));
    kv(&mut s, "To", opt(&j["to"]));
    kv(&mut s, "Mode", opt(&j["mode"]));
    kv(&mut s, "Status", opt(&j["status"]));
    kv(&mut s, "Started", time(&j["started"]));
    kv(&mut s, "Ended", time(&j["ended"]));
    if !j["error"].is_null() {
        kv(&mut s, "Error", opt(&j["error"]));
    }
    if j["status"].as_str().is_some_and(|st| !is_final(st)) {
        s.push_str(&progress(j, vm, now));
        s.push_str(&stats_with_cap(
            &j["stats"],
            j["max_bandwidth"].as_u64(),
            true,
        ));
    } else {
        s.push_str(&job_stats(j));
    }
    s
}

/// A running job's progress: elapsed time, round, data processed,
/// remaining and total, transfer and dirty rates, expected downtime, ETA.
/// A figure the job has not measured yet is `unknown`, never a guess shown
/// as a measurement: the ETA only from a measured remainder and rate.
fn progress(j: &Value, vm: &Value, now: u64) -> String {
    const UNKNOWN: &str = "unknown (no round has measured it yet)";
    let mut s = String::new();
    let st = &j["stats"];
    let status = j["status"].as_str().unwrap_or("");
    let postcopy = status.starts_with("postcopy");
    let round = st["round"].as_u64().unwrap_or(0);
    let sent = st["bytes"].as_u64().unwrap_or(0);
    let link_rate = st["link_rate"].as_f64().filter(|r| *r > 0.0);
    let remaining = remaining(st);
    let elapsed = j["started"]
        .as_u64()
        .map_or("-".into(), |t| duration(now.saturating_sub(t) as f64));
    kv(&mut s, "Elapsed", elapsed);
    if postcopy {
        kv(
            &mut s,
            "Round",
            format!("{round} pre-copy round(s), then post-copy"),
        );
    } else {
        kv(&mut s, "Round", round);
    }
    kv(&mut s, "Data processed", bytes(sent));
    let remaining_text = match remaining {
        Some(r) => bytes(r),
        // Round 0 sends the memory that holds data (as `migrate`'s bar
        // counts): an estimate, said so, and none once it is overrun.
        None => match vm_data(vm).map(|data| data.saturating_sub(sent)) {
            Some(rest) if rest > 0 => format!(
                "about {} (round 0: the guest memory that holds data, less what was sent)",
                bytes(rest)
            ),
            _ => "unknown (measured at the end of round 0)".into(),
        },
    };
    kv(&mut s, "Data remaining", remaining_text);
    let total = vm["memory"]
        .as_u64()
        .map_or("unknown".into(), |m| format!("{} (guest memory)", bytes(m)));
    kv(&mut s, "Data total", total);
    let speed = link_rate.map_or(UNKNOWN.into(), |r| {
        format!("{} (the link, as the rounds measured it)", rate(r))
    });
    kv(&mut s, "Transfer rate", speed);
    let dirty = match st["dirty_rate"].as_f64() {
        Some(r) if round > 0 || r > 0.0 => rate(r),
        _ => UNKNOWN.into(),
    };
    // Post-copy has moved the guest already: it dirties nothing here any
    // more, and its downtime is measured (the statistics below have it).
    if !postcopy {
        kv(&mut s, "Dirty rate", dirty);
        let expected = match st["expected_downtime_ms"].as_f64() {
            Some(e) if e > 0.0 => format!(
                "{} (max {} ms)",
                ms(&st["expected_downtime_ms"]),
                opt(&j["max_downtime_ms"])
            ),
            _ => UNKNOWN.into(),
        };
        kv(&mut s, "Exp. downtime", expected);
    }
    let eta = match (remaining, link_rate) {
        _ if status == "postcopy-paused" => "unknown (the link is lost; reconnecting)".into(),
        (Some(r), Some(speed)) => format!(
            "{} (remaining at the transfer rate)",
            duration(r as f64 / speed)
        ),
        (None, _) => "unknown (nothing remaining measured yet)".into(),
        (Some(_), None) => "unknown (no transfer rate measured yet)".into(),
    };
    kv(&mut s, "ETA", eta);
    s
}

/// What a job has left to send by its statistics `st`: `remaining_bytes`
/// once a round has read the dirty log or the post-copy phase has counted
/// its pages (`pages.expected`), 0 included; None before that, in round 0,
/// whose rest the job does not measure.
pub fn remaining(st: &Value) -> Option<u64> {
    let remaining = st["remaining_bytes"].as_u64().unwrap_or(0);
    let known =
        st["round"].as_u64().unwrap_or(0) > 0 || st["pages"]["expected"].as_u64().unwrap_or(0) > 0;
    (remaining > 0 || known).then_some(remaining)
}

/// What round 0 of a migration of VM `vm` (the object of `info`) sends:
/// the host memory its guest RAM takes (`memory_used`), where the daemon
/// knows it, else all of its memory; None without `memory`.
pub fn vm_data(vm: &Value) -> Option<u64> {
    let memory = vm["memory"].as_u64()?;
    Some(
        vm["memory_used"]
            .as_u64()
            .filter(|&u| u > 0)
            .map_or(memory, |u| u.min(memory)),
    )
}

/// A span of time: `0.4 s`, `12 s`, `3 min 05 s`, `2 h 07 min`.
pub fn duration(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 59.95 {
        if secs.fract() == 0.0 {
            format!("{secs:.0} s")
        } else {
            format!("{secs:.1} s")
        }
    } else if secs < 3599.5 {
        let s = secs.round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        let m = (secs / 60.0).round() as u64;
        format!("{} h {:02} min", m / 60, m % 60)
    }
}

/// A job's statistics, with the bandwidth cap it ran under (the job's own:
/// `migrate --max-bandwidth`, or what `migrate-set` changed it to), which
/// the job object has beside them.
pub fn job_stats(j: &Value) -> String {
    stats_with_cap(&j["stats"], j["max_bandwidth"].as_u64(), false)
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.1} ms"))
        .unwrap_or_else(|| "-".into())
}

/// Bytes per second with a binary unit.
pub fn rate(bytes_per_s: f64) -> String {
    format!("{}/s", bytes(bytes_per_s.max(0.0) as u64))
}

/// The statistics object of a migration, as a block of lines.
#[cfg(test)]
pub fn stats(st: &Value) -> String {
    stats_with_cap(st, None, false)
}

/// [`stats`], with the bandwidth cap `cap` (bytes/s) after the bandwidth.
/// For a job still `running`, without what is set only at its end (total
/// time, average bandwidth: [`progress`] has the elapsed time and the
/// transfer rate instead), the bytes [`progress`] shows already, and the
/// setup time and downtime until they are measured.
fn stats_with_cap(st: &Value, cap: Option<u64>, running: bool) -> String {
    let mut s = String::new();
    if !st.is_object() {
        return s;
    }
    let unmeasured = |v: &Value| running && v.as_f64().unwrap_or(0.0) <= 0.0;
    if !running {
        kv(&mut s, "Total time", ms(&st["total_ms"]));
    }
    if !unmeasured(&st["setup_ms"]) {
        kv(&mut s, "Setup time", ms(&st["setup_ms"]));
    }
    if !unmeasured(&st["downtime_ms"]) {
        kv(&mut s, "Downtime", ms(&st["downtime_ms"]));
    }
    if !running {
        kv(&mut s, "Transferred", bytes_of(&st["bytes"]));
    }
    let p = &st["pages"];
    kv(
        &mut s,
        "Pages",
        format!(
            "{} sent, {} zero, {} resent",
            opt(&p["sent"]),
            opt(&p["zero"]),
            opt(&p["resent"])
        ),
    );
    if p["expected"].as_u64().is_some_and(|n| n > 0) {
        kv(
            &mut s,
            "Post-copy",
            format!(
                "{} pages: {} pushed, {} on demand, {} pre-paged, {} duplicate(s); last page {} after the resume",
                opt(&p["expected"]),
                opt(&p["pushed"]),
                opt(&p["demand"]),
                opt(&p["prepaged"]),
                opt(&p["duplicate"]),
                ms(&st["resume_ms"])
            ),
        );
        let f = &st["faults"];
        kv(
            &mut s,
            "Faults",
            format!(
                "{} from the source (p50 {} us, p99 {} us, max {} us; vCPUs blocked {}), {} zero-filled",
                opt(&f["count"]),
                opt(&f["p50_us"]),
                opt(&f["p99_us"]),
                opt(&f["max_us"]),
                f["blocked_us"]
                    .as_f64()
                    .map_or("-".into(), |us| format!("{:.1} ms", us / 1e3)),
                opt(&f["zero"])
            ),
        );
    }
    let sm = &st["sampling"];
    if let Some(ended) = sm["ended"].as_str() {
        kv(
            &mut s,
            "Sampling",
            format!(
                "{} hot pages found in {}, ended: {ended}; {} pages left to post-copy",
                opt(&sm["hot_pages"]),
                ms(&sm["ms"]),
                opt(&p["deferred"])
            ),
        );
    }
    let r = &st["dirty_ring"];
    if r.is_object() {
        kv(
            &mut s,
            "Dirty ring",
            format!(
                "{} entries per vCPU: {} read, {} full-ring stop(s), {} overflow(s)",
                opt(&r["entries"]),
                opt(&r["harvested"]),
                opt(&r["full_exits"]),
                opt(&r["overflows"])
            ),
        );
    }
    if st["reorder"] == true {
        kv(
            &mut s,
            "Reorder",
            format!(
                "{} hot pages skipped (dirtied again before their turn)",
                opt(&st["pages"]["skipped_redirtied"])
            ),
        );
    }
    let c = &st["compression"];
    if c["algorithm"] == "zstd" {
        kv(
            &mut s,
            "Compression",
            format!(
                "zstd:{}, {} of pages in {} ({:.1}x)",
                opt(&c["level"]),
                bytes_of(&c["raw_bytes"]),
                bytes_of(&c["wire_bytes"]),
                c["ratio"].as_f64().unwrap_or(0.0)
            ),
        );
    }
    if let Some(b) = st["bandwidth_mbps"].as_f64().filter(|_| !running) {
        kv(&mut s, "Bandwidth", format!("{b:.1} Mbit/s"));
    }
    if let Some(cap) = cap {
        kv(&mut s, "Bandwidth cap", rate(cap as f64));
    }
    // Post-copy's push has no streams of its own: the count is pre-copy's.
    if let Some(n) = st["streams"].as_u64().filter(|&n| n > 0) {
        if st["mode"] != "postcopy" {
            kv(&mut s, "Streams", n);
        }
    }
    if let Some(p) = st["policy"].as_str().filter(|p| !p.is_empty()) {
        kv(&mut s, "Auto chose", p);
    }
    if let Some(r) = st["stop_reason"].as_str().filter(|r| !r.is_empty()) {
        kv(&mut s, "Stop reason", r);
    }
    match st["verified"].as_bool() {
        Some(true) => kv(&mut s, "Verified", "yes (memory digests matched)"),
        Some(false) => kv(&mut s, "Verified", "no (memory digests differed)"),
        None => {}
    }
    let m = &st["model"];
    if let (Some(down), Some(total)) = (
        m["prediction"]["downtime_ms"].as_f64(),
        m["prediction"]["total_ms"].as_f64(),
    ) {
        let pct = |v: &Value| v.as_f64().map_or("?".into(), |p| format!("{p:+.0} %"));
        kv(
            &mut s,
            "Model",
            format!(
                "downtime {down:.1} ms ({}), total {total:.1} ms ({})",
                pct(&m["downtime_error_pct"]),
                pct(&m["total_error_pct"])
            ),
        );
    }
    let f = &m["final_copy"];
    if let (Some(want), Some(got)) = (f["bytes_predicted"].as_f64(), f["bytes_measured"].as_f64()) {
        let speed = |v: &Value| v.as_f64().map_or("?".into(), rate);
        kv(
            &mut s,
            "Stop-and-copy",
            format!(
                "{} predicted, {} sent at {} (rounds: {})",
                bytes(want as u64),
                bytes(got as u64),
                speed(&f["final_rate"]),
                speed(&f["round_rate"])
            ),
        );
    }
    if let Some(rounds) = st["rounds"].as_array().filter(|r| !r.is_empty()) {
        kv(&mut s, "Rounds", rounds.len());
        let rows: Vec<Vec<String>> = rounds
            .iter()
            .enumerate()
            .map(|(i, r)| {
                vec![
                    i.to_string(),
                    opt(&r["pages"]),
                    bytes_of(&r["bytes"]),
                    ms(&r["ms"]),
                    r["dirty_rate"]
                        .as_f64()
                        .map(rate)
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        for l in table(&["Round", "Pages", "Bytes", "Time", "Dirty rate"], &rows).lines() {
            let _ = writeln!(s, "  {l}");
        }
    }
    s
}

/// A migration's error (from the destination's side of it), with a hint
/// where the destination refused the connection.
pub fn with_hint(cause: &str) -> String {
    if cause.contains("Connection refused") {
        format!("{cause}; is migd listening there (--listen), with TLS or --insecure?")
    } else {
        cause.to_string()
    }
}

/// `migctl estimate`: the measured inputs, then one line per mode.
pub fn estimate(r: &Value) -> String {
    let i = &r["inputs"];
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let working_set = match f(&i["working_set"]) {
        w if w > 0.0 => format!(" over a working set of {:.0} MiB", w / 1048576.0),
        _ => String::new(),
    };
    let mut out = format!(
        "VM {}: {:.0} MiB to move, dirty rate {:.1} MiB/s{working_set}; path: {:.2} Gbit/s, RTT {:.0} us\n",
        r["name"].as_str().unwrap_or("?"),
        f(&i["memory_bytes"]) / 1048576.0,
        f(&i["dirty_rate"]) / 1048576.0,
        f(&i["bandwidth"]) * 8.0 / 1e9,
        f(&i["rtt"]) * 1e6,
    );
    out.push_str(&format!(
        "{:<10} {:>14} {:>14} {:>8} {:>10}\n",
        "mode", "downtime ms", "total ms", "rounds", "faults"
    ));
    // The mode asked for; for `auto`, the one it is expected to end in.
    let asked = match r["mode"].as_str() {
        Some("auto") => &r["auto_picks"],
        _ => &r["mode"],
    };
    for m in ["precopy", "postcopy", "hybrid"] {
        let p = &r["all_modes"][m];
        let mark = if asked == m { "*" } else { " " };
        out.push_str(&format!(
            "{:<10} {:>14.1} {:>14.1} {:>8} {:>10.0}{}\n",
            m,
            f(&p["downtime_ms"]),
            f(&p["total_ms"]),
            p["rounds"].as_u64().unwrap_or(0),
            f(&p["faults"]),
            if p["converges"] == false {
                "  (does not converge)"
            } else {
                mark
            },
        ));
    }
    if let Some(pick) = r["auto_picks"].as_str() {
        out.push_str(&format!("--mode auto is expected to end in {pick}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `jobs` shows what each job sent, and what a running one has left.
    #[test]
    fn the_job_listing_shows_sent_and_left() {
        let running = json!({"id": "job1", "vm": "a", "to": "h:1", "mode": "precopy",
            "status": "active", "started": 0,
            "stats": {"bytes": 3u64 << 30, "round": 2, "remaining_bytes": 5u64 << 20}});
        let done = json!({"id": "job2", "vm": "b", "to": "h:1", "mode": "precopy",
            "status": "completed", "started": 0,
            "stats": {"bytes": 1u64 << 20, "round": 3, "remaining_bytes": 0}});
        let t = job_table(&[running, done]);
        let lines: Vec<&str> = t.lines().filter(|l| !l.starts_with("--")).collect();
        assert!(
            lines[0].contains("Sent") && lines[0].contains("Left"),
            "{t}"
        );
        assert!(
            lines[1].contains("3 GiB") && lines[1].contains("5 MiB"),
            "{t}"
        );
        assert!(
            lines[2].contains("1 MiB") && lines[2].trim_end().ends_with('-'),
            "{t}"
        );
    }

    #[test]
    fn units_and_dates() {
        assert_eq!(bytes(128 << 20), "128 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(bytes(12), "12 B");
        assert_eq!(time(&json!(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(&json!(1_700_000_000u64)), "2023-11-14 22:13:20 UTC");
        assert_eq!(time(&Value::Null), "-");
    }

    #[test]
    fn stats_show_the_model_and_the_stop_and_copy() {
        let st = json!({"total_ms": 437.3, "downtime_ms": 71.3, "model": {
            "prediction": {"downtime_ms": 164.0, "total_ms": 497.0},
            "downtime_error_pct": 130.2, "total_error_pct": 13.6,
            "final_copy": {"bytes_predicted": 132.0 * 1048576.0, "bytes_measured": 134.5 * 1048576.0,
                           "round_rate": 809e6, "final_rate": 2024e6}}});
        let t = stats(&st);
        assert!(
            t.contains("Model:          downtime 164.0 ms (+130 %), total 497.0 ms (+14 %)"),
            "{t}"
        );
        assert!(
            t.contains("132 MiB predicted, 134.5 MiB sent at 1.9 GiB/s (rounds: 771.5 MiB/s)"),
            "{t}"
        );
        // Without a check (a failed migration), neither line.
        assert!(!stats(&json!({"total_ms": 1.0})).contains("Model"));
    }

    #[test]
    fn stats_show_the_sampling_and_the_dirty_ring() {
        let st = json!({"total_ms": 352.0, "pages": {"sent": 69000, "deferred": 5120},
            "sampling": {"ms": 151.2, "hot_pages": 5000, "ended": "all sent"},
            "dirty_ring": {"entries": 4096, "harvested": 81907, "full_exits": 7, "overflows": 0}});
        let t = stats(&st);
        assert!(
            t.contains("Sampling:       5000 hot pages found in 151.2 ms, ended: all sent; 5120 pages left to post-copy"),
            "{t}"
        );
        assert!(
            t.contains("Dirty ring:     4096 entries per vCPU: 81907 read, 7 full-ring stop(s), 0 overflow(s)"),
            "{t}"
        );
        // Pre-copy with the bitmap log has neither.
        let t = stats(&json!({"total_ms": 1.0, "pages": {"sent": 1}}));
        assert!(!t.contains("Sampling") && !t.contains("Dirty ring"), "{t}");
    }

    #[test]
    fn estimate_names_the_working_set_where_one_was_found() {
        let mut r = json!({"name": "web1", "mode": "hybrid", "auto_picks": "precopy",
            "inputs": {"memory_bytes": 272629760.0, "dirty_rate": 1073741824.0,
                       "working_set": 268435456.0, "bandwidth": 3e9, "rtt": 20e-6},
            "all_modes": {"hybrid": {"downtime_ms": 1.2, "total_ms": 110.0, "rounds": 1}}});
        let t = estimate(&r);
        assert!(
            t.contains("dirty rate 1024.0 MiB/s over a working set of 256 MiB;"),
            "{t}"
        );
        assert!(t.contains("hybrid") && t.contains("110.0"), "{t}");
        r["inputs"]["working_set"] = json!(0.0);
        assert!(estimate(&r).contains("dirty rate 1024.0 MiB/s; path"));
    }

    #[test]
    fn stats_show_the_post_copy_phase() {
        let st = json!({"total_ms": 307.5, "resume_ms": 281.5,
            "pages": {"sent": 65813, "expected": 65660, "pushed": 62542, "demand": 191,
                      "prepaged": 2927, "duplicate": 184},
            "faults": {"count": 191, "p50_us": 104, "p99_us": 1663, "max_us": 4187,
                       "blocked_us": 52300, "zero": 12}});
        let t = stats(&st);
        assert!(
            t.contains("65660 pages: 62542 pushed, 191 on demand, 2927 pre-paged, 184 duplicate(s); last page 281.5 ms after the resume"),
            "{t}"
        );
        assert!(
            t.contains("191 from the source (p50 104 us, p99 1663 us, max 4187 us; vCPUs blocked 52.3 ms), 12 zero-filled"),
            "{t}"
        );
        // Pre-copy has no such lines.
        let pre = stats(&json!({"total_ms": 1.0, "pages": {"sent": 5, "expected": 0}}));
        assert!(
            !pre.contains("Post-copy") && !pre.contains("Faults"),
            "{pre}"
        );
    }

    #[test]
    fn info_says_which_pages_hold_the_memory() {
        let mut v = json!({"name": "web1", "memory": 134217728u64, "memory_used": 33554432u64,
                           "huge_pages": true});
        let t = vm_info(&v);
        assert!(t.contains("huge pages (2 MiB)"), "{t}");
        assert!(
            t.contains("25 %; the rest is reserved in the host's huge page pool"),
            "{t}"
        );
        v["huge_pages"] = json!(false);
        let t = vm_info(&v);
        assert!(
            t.contains("4 KiB pages (shmem)") && t.contains("never wrote takes none"),
            "{t}"
        );
        // A daemon that has not heard from the VM yet says nothing of it.
        v["huge_pages"] = json!(null);
        assert!(!vm_info(&v).contains("Memory pages"));
    }

    #[test]
    fn stats_show_what_the_json_has_where_it_has_it() {
        let j = json!({"max_bandwidth": 8u64 << 20, "stats": {"mode": "hybrid",
            "bandwidth_mbps": 70.0, "streams": 2, "verified": true,
            "policy": "pre-copy: after 2 round(s) the guest dirtied 8 MB/s"}});
        let t = job_stats(&j);
        assert!(t.contains("Bandwidth cap:  8 MiB/s\n"), "{t}");
        assert!(t.contains("Streams:        2\n"), "{t}");
        assert!(
            t.contains("Auto chose:     pre-copy: after 2 round(s) the guest dirtied 8 MB/s\n"),
            "{t}"
        );
        assert!(
            t.contains("Verified:       yes (memory digests matched)\n"),
            "{t}"
        );
        let t = stats(&json!({"verified": false}));
        assert!(
            t.contains("Verified:       no (memory digests differed)"),
            "{t}"
        );
        // Absent (not asked, unknown, or post-copy's): no line.
        let t = job_stats(&json!({"max_bandwidth": null, "stats": {"mode": "postcopy",
            "streams": 1, "verified": null, "policy": ""}}));
        for key in ["Bandwidth cap", "Streams", "Auto chose", "Verified"] {
            assert!(!t.contains(key), "{key}: {t}");
        }
    }

    #[test]
    fn info_names_the_vms_directory() {
        let t = vm_info(&json!({"name": "web1", "dir": "/var/lib/migd/vms/web1"}));
        assert!(
            t.contains("Dir:            /var/lib/migd/vms/web1\n"),
            "{t}"
        );
        assert!(!vm_info(&json!({"name": "web1"})).contains("Dir:"));
    }

    #[test]
    fn a_refused_connection_gets_a_hint() {
        let e = "connecting to 10.0.0.2:7070: Connection refused (os error 111)";
        assert_eq!(
            with_hint(e),
            format!("{e}; is migd listening there (--listen), with TLS or --insecure?")
        );
        assert_eq!(
            with_hint("a VM named web1 already exists"),
            "a VM named web1 already exists"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0.0), "0 s");
        assert_eq!(duration(0.2), "0.2 s");
        assert_eq!(duration(12.0), "12 s");
        assert_eq!(duration(59.96), "1 min 00 s");
        assert_eq!(duration(75.0), "1 min 15 s");
        assert_eq!(duration(3599.4), "59 min 59 s");
        assert_eq!(duration(3599.6), "1 h 00 min");
        assert_eq!(duration(7620.0), "2 h 07 min");
        assert_eq!(duration(-1.0), "0 s");
    }

    #[test]
    fn a_post_copy_job_has_no_pre_copy_figures_and_no_eta_while_its_link_is_lost() {
        let mib = 1u64 << 20;
        let mut j = json!({"id": "job2", "status": "postcopy-active", "started": 100,
            "max_downtime_ms": 300, "stats": {"round": 2, "bytes": 300 * mib,
            "remaining_bytes": 64 * mib, "pages": {"expected": 16384},
            "link_rate": 128.0 * mib as f64, "dirty_rate": 8.0 * mib as f64,
            "expected_downtime_ms": 40.0, "downtime_ms": 12.5}});
        let t = job_info(&j, &Value::Null, 110);
        assert!(t.contains("Elapsed:        10 s\n"), "{t}");
        assert!(
            t.contains("Round:          2 pre-copy round(s), then post-copy\n"),
            "{t}"
        );
        assert!(t.contains("Data total:     unknown\n"), "{t}");
        assert!(t.contains("ETA:            0.5 s (remaining at"), "{t}");
        assert!(t.contains("Downtime:       12.5 ms\n"), "{t}");
        assert!(
            !t.contains("Exp. downtime") && !t.contains("Dirty rate"),
            "{t}"
        );
        j["status"] = json!("postcopy-paused");
        let t = job_info(&j, &Value::Null, 110);
        assert!(
            t.contains("ETA:            unknown (the link is lost; reconnecting)\n"),
            "{t}"
        );
        // Set up, nothing sent: all unknown, no zeros shown as measured.
        let j = json!({"id": "job3", "status": "setup", "started": 100,
            "stats": {"round": 0, "bytes": 0, "remaining_bytes": 0, "setup_ms": 0.0,
                      "downtime_ms": 0.0, "total_ms": 0.0, "bandwidth_mbps": 0.0}});
        let t = job_info(&j, &Value::Null, 100);
        assert!(
            t.contains("Data remaining: unknown (measured at the end of round 0)\n"),
            "{t}"
        );
        assert!(t.contains("ETA:            unknown"), "{t}");
        for zero in ["Setup time", "Downtime:", "Total time", "Bandwidth:"] {
            assert!(!t.contains(zero), "{zero}: {t}");
        }
    }

    #[test]
    fn list_table() {
        let t = vm_table(&[
            json!({"pid": 42, "name": "web1", "state": "running", "memory": 134217728u64, "vcpus": 1}),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with(" Id"), "{t}");
        assert!(lines[0].contains("vCPUs"));
        assert!(
            lines[2].contains("web1") && lines[2].contains("128 MiB"),
            "{t}"
        );
    }
}
