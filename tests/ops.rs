//! Operations: the CI smoke run of the fuzz targets, config errors at start, the
//! Prometheus endpoint, logs under journald, and migctl's shell completions.

mod common;

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod fuzz_bodies;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;
use serde_json::json;

// ---------------------------------------------------------------- fuzz smoke

/// xorshift64*: reproducible pseudo-random numbers without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const INTERESTING: [u64; 8] = [0, 1, 0x7f, 0x80, 0xff, 0xffff_ffff, 1 << 63, u64::MAX];

/// One to four of: bit flip, interesting byte or u64, truncation, random insert,
/// chunk duplication; half the time aimed at the first 128 bytes (headers).
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let span = if rng.below(2) == 0 {
            b.len().min(128)
        } else {
            b.len()
        };
        let at = rng.below(span);
        match rng.below(6) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at] = INTERESTING[rng.below(INTERESTING.len())] as u8,
            2 if b.len() >= 8 => {
                let at = at.min(b.len() - 8);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            3 => b.truncate(rng.below(b.len() + 1)),
            4 => {
                let n = 1 + rng.below(16);
                let ins = rng.bytes(n);
                let at = at.min(b.len());
                b.splice(at..at, ins);
            }
            _ if !b.is_empty() => {
                let len = 1 + rng.below(64.min(b.len()));
                let from = rng.below(b.len() - len + 1);
                let chunk = b[from..from + len].to_vec();
                let at = at.min(b.len());
                b.splice(at..at, chunk);
            }
            _ => b.extend(rng.bytes(8)),
        }
    }
    b
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = repo().join("fuzz/seeds").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Every seed, then `mutated` mutations of seeds and `random` random inputs.
fn smoke(target: &str, mutated: usize, random: usize, mut body: impl FnMut(&[u8])) -> usize {
    let seeds = seeds(target);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    for s in &seeds {
        body(s);
    }
    for _ in 0..mutated {
        let i = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[i]);
        body(&input);
    }
    for _ in 0..random {
        let n = rng.below(512);
        body(&rng.bytes(n));
    }
    seeds.len() + mutated + random
}

/// The CI stand-in for the cargo-fuzz targets (no nightly, no cargo-fuzz there):
/// the same bodies (fuzz/src/lib.rs) over the seeds and a few thousand inputs.
#[test]
fn fuzz_smoke_every_target_on_seeds_and_mutations() {
    let start = Instant::now();
    let mut n = 0;
    n += smoke("wire_decode", 2000, 1000, fuzz_bodies::wire_decode);
    n += smoke("state_decode", 1000, 500, fuzz_bodies::state_decode);
    n += smoke("config_parse", 3000, 1000, fuzz_bodies::config_parse);
    n += smoke("link_records", 2000, 1000, fuzz_bodies::link_records);
    n += smoke("xbzrle_decode", 2000, 1000, fuzz_bodies::xbzrle_decode);
    let scratch = fuzz_bodies::scratch_file("smoke");
    // Snapshot seeds are large (a real 16 MiB guest): fewer, truncation-heavy inputs.
    n += smoke("snapshot_read", 300, 200, |d| {
        fuzz_bodies::snapshot_read(d, &scratch)
    });
    let _ = std::fs::remove_file(&scratch);
    eprintln!("fuzz smoke: {n} inputs in {:?}", start.elapsed());
}

#[test]
fn fixed_checksums_make_the_snapshot_seed_valid_again() {
    let seeds_dir = repo().join("fuzz/seeds/snapshot_read");
    // An earlier build's layout, and this build's (page data aligned, a boot section).
    for seed in ["valid-idle-16m", "valid-aligned-boot-idle-16m"] {
        let good = std::fs::read(seeds_dir.join(seed)).unwrap();
        assert_eq!(fuzz_bodies::fix_checksums(&good), good, "{seed}");
        let (_, _, stats) =
            vmm::snapshot::read(&seeds_dir.join(seed)).unwrap_or_else(|e| panic!("{seed}: {e}"));
        assert!(stats.data_pages > 0, "{seed}");
    }
    let corrupt = std::fs::read(seeds_dir.join("corrupt-state")).unwrap();
    let fixed = fuzz_bodies::fix_checksums(&corrupt);
    assert_ne!(fixed, corrupt, "the state checksum is rewritten");
}

// ---------------------------------------------------------------- config errors

/// `migd` with `args` must exit 1 at start, on one line naming every needle.
fn start_refused(dir: &Path, args: &[&str], needles: &[&str]) {
    let sock = dir.join("never.sock");
    let state = dir.join("never-state");
    let mut all = vec![
        "--socket",
        sock.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let (code, err) = migd_output(&all);
    assert_eq!(code, 1, "{args:?} accepted: {err}");
    let line = err.trim();
    assert!(!line.contains('\n'), "not one line: {line}");
    assert!(!line.contains("panicked"), "{line}");
    assert!(line.starts_with("migd: error: "), "{line}");
    for n in needles {
        assert!(line.contains(n), "{args:?}: '{line}' does not name '{n}'");
    }
    assert!(!sock.exists(), "daemon started despite {args:?}");
}

#[test]
fn config_errors_stop_the_daemon_naming_file_and_key() {
    let dir = scratch("ops-config");
    let cases: [(&str, &[&str]); 7] = [
        (
            "listen = \"127.0.0.1:1\"\nlisen = \"x\"\n",
            &["key 'lisen' (line 2)", "unknown field"],
        ),
        (
            "insecure = 1\n",
            &["key 'insecure' (line 1)", "invalid type"],
        ),
        (
            "metrics_listen = 9100\n",
            &["key 'metrics_listen' (line 1)", "invalid type"],
        ),
        (
            "metrics_listen = \"9100\"\n",
            &["key 'metrics_listen' (line 1)", "not ADDR:PORT"],
        ),
        (
            "listen = \"no port\"\n",
            &["key 'listen' (line 1)", "not ADDR:PORT"],
        ),
        (
            "socket = \"\"\n",
            &["key 'socket' (line 1)", "must not be empty"],
        ),
        (
            "[metrics]\nlisten = \"a:1\"\n",
            &["line 1", "unknown field"],
        ),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let cfg = dir.join(format!("bad{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let mut want = vec![cfg.to_str().unwrap()];
        want.extend_from_slice(needles);
        start_refused(&dir, &["--config", cfg.to_str().unwrap()], &want);
    }
    let missing = dir.join("missing.toml");
    start_refused(
        &dir,
        &["--config", missing.to_str().unwrap()],
        &["reading config", missing.to_str().unwrap()],
    );
    start_refused(
        &dir,
        &["--metrics-listen", "localhost"],
        &["metrics listen address 'localhost'"],
    );
    // The metrics port is taken: refused at start, not later.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    start_refused(
        &dir,
        &["--metrics-listen", &addr, "--listen", "127.0.0.1:0"],
        &["binding the metrics listener", &addr],
    );
}

// ---------------------------------------------------------------- metrics

/// A daemon like `Daemon::start`, with extra flags and environment.
fn start_daemon(dir: &Path, tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
    let socket = dir.join(format!("{tag}.sock"));
    let state = dir.join(format!("{tag}-state"));
    let log = dir.join(format!("{tag}.log"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(migd_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .args(["--listen", &listen, "--insecure"])
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .expect("starting migd");
    let mut d = Daemon {
        child,
        socket,
        state,
        port,
        log,
    };
    let end = Instant::now() + Duration::from_secs(20);
    while try_request(&d.socket, &json!({"cmd": "ping"})).is_none() {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("migd exited ({st}) at start:\n{}", d.log_text());
        }
        assert!(
            Instant::now() < end,
            "migd did not answer:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

/// Raw bytes to the metrics port; the whole answer (the server closes).
fn http(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn scrape(port: u16) -> String {
    let r = http(
        port,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
    r.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of the sample `series` (name and labels, exactly as exported).
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_endpoint_serves_the_families_and_refuses_the_rest() {
    let dir = scratch("ops-metrics");
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let a = start_daemon(&dir, "a", &["--metrics-listen", &maddr], &[]);
    let _ra = Reaper(a.state.clone());

    let body = scrape(mport);
    for family in [
        "# TYPE migd_vms gauge",
        "# TYPE migd_migrations_total counter",
        "# TYPE migd_migration_bytes_total counter",
        "# TYPE migd_migration_downtime_seconds histogram",
        "# TYPE migd_build_info gauge",
        "migd_migration_downtime_seconds_bucket{le=\"0.001\"} 0",
        "migd_migration_downtime_seconds_bucket{le=\"+Inf\"} 0",
    ] {
        assert!(body.contains(family), "no '{family}' in:\n{body}");
    }
    assert_eq!(sample(&body, "migd_vms{state=\"running\"}"), 0.0);
    assert_eq!(
        sample(
            &body,
            &format!(
                "migd_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            "migd_migrations_total{outcome=\"completed\",mode=\"precopy\"}"
        ),
        0.0
    );
    assert!(body
        .lines()
        .all(|l| l.starts_with('#') || l.starts_with("migd_")));

    // Other paths, other methods, garbage: an HTTP error, and the daemon lives on.
    let head = http(mport, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    assert!(http(mport, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    let post = http(
        mport,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(
        post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET"),
        "{post}"
    );
    let bad = http(mport, b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
    assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
    let long = http(mport, &vec![b'A'; 20_000]);
    assert!(
        long.starts_with("HTTP/1.1 400 ") && long.contains("longer than"),
        "{long}"
    );
    drop(TcpStream::connect(("127.0.0.1", mport)).unwrap());
    assert!(http(mport, b"GET /metrics HTTP/9.9\r\n\r\n").starts_with("HTTP/1.1 400 "));
    assert_eq!(a.request(json!({"cmd": "ping"}))["ok"], true);
    scrape(mport);
    let log = a.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        log.lines().filter(|l| l.contains("garbage")).count(),
        1,
        "the bad request is logged once:\n{log}"
    );

    if !kvm_or_skip("metrics_endpoint (VMs and migrations)") {
        return;
    }
    // The vms gauge follows create; migrations are counted by outcome, with bytes
    // and downtime.
    let b = start_daemon(&dir, "b", &[], &[]);
    let _rb = Reaper(b.state.clone());
    let elf = guest_elf();
    a.ok(&[
        "create",
        "m1",
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "workload=idle",
        "--memory",
        "64M",
    ]);
    let body = scrape(mport);
    assert_eq!(sample(&body, "migd_vms{state=\"running\"}"), 1.0, "{body}");
    Console(a.vm_dir("m1").join("console.log")).wait_for("WORKLOAD READY", Duration::from_secs(60));
    // Its 64 MiB are given; a little of it is used (the idle guest writes
    // 16 pages, its image, tables and stacks), once the daemon has asked
    // (every second).
    std::thread::sleep(Duration::from_millis(1500));
    let body = scrape(mport);
    assert_eq!(
        sample(&body, "migd_guest_memory_bytes"),
        (64 << 20) as f64,
        "{body}"
    );
    let used = sample(&body, "migd_guest_memory_used_bytes");
    assert!(used > 0.0 && used < (16 << 20) as f64, "{body}");

    let dead = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = a.migctl(&["migrate", "m1", "--to", &dead]);
    assert_eq!(code, 1, "{err}");
    let to_b = format!("127.0.0.1:{}", b.port);
    a.ok(&["migrate", "m1", "--to", &to_b]);
    let body = scrape(mport);
    assert_eq!(sample(&body, "migd_vms{state=\"running\"}"), 0.0, "{body}");
    assert_eq!(
        sample(
            &body,
            "migd_migrations_total{outcome=\"failed\",mode=\"precopy\"}"
        ),
        1.0,
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "migd_migrations_total{outcome=\"completed\",mode=\"precopy\"}"
        ),
        1.0,
        "{body}"
    );
    assert!(sample(&body, "migd_migration_bytes_total") > 1e4, "{body}");
    assert_eq!(sample(&body, "migd_migration_downtime_seconds_count"), 1.0);
    assert_eq!(
        sample(&body, "migd_migration_downtime_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert!(sample(&body, "migd_migration_downtime_seconds_sum") > 0.0);
    b.ok(&["destroy", "m1"]);
}

// ---------------------------------------------------------------- logs

/// The daemon's "migd ready" line, ANSI escapes removed, written to a file; with
/// `Some(d)`, `JOURNAL_STREAM` names that file (as systemd names the journal's
/// socket), its inode off by `d`.
fn ready_line(dir: &Path, tag: &str, journal: Option<u64>) -> (String, bool) {
    let socket = dir.join(format!("{tag}.sock"));
    let log = dir.join(format!("{tag}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(migd_bin());
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join(format!("{tag}-state")))
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("JOURNAL_STREAM")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null());
    if let Some(delta) = journal {
        let m = file.metadata().unwrap();
        cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino() + delta));
    }
    let mut child = cmd.stderr(Stdio::from(file)).spawn().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("migd ready")) {
            break l.to_string();
        }
        assert!(Instant::now() < end, "no ready line:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    (strip_ansi(&line), line.contains('\x1b'))
}

/// Removes `ESC [ ... letter` sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn starts_with_timestamp(l: &str) -> bool {
    let b = l.trim_start().as_bytes();
    b.len() > 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T'
}

#[test]
fn logs_under_journald_have_priorities_and_no_colours_nor_timestamps() {
    let dir = scratch("ops-journal");
    let (journal, escapes) = ready_line(&dir, "j", Some(0));
    assert!(!escapes, "ANSI escapes for the journal: {journal:?}");
    // Its syslog priority first, which journald reads (info: 6), and no
    // timestamp (journald keeps its own).
    let rest = journal.strip_prefix("<6>");
    assert!(
        rest.is_some_and(|r| r.trim_start().starts_with("INFO")),
        "no priority, or a timestamp, for the journal: {journal:?}"
    );
    // A stale JOURNAL_STREAM (stderr redirected elsewhere) changes nothing;
    // a file is no terminal: no colours either.
    for (tag, journal) in [("s", Some(1)), ("p", None)] {
        let (line, escapes) = ready_line(&dir, tag, journal);
        assert!(starts_with_timestamp(&line), "no timestamp: {line:?}");
        assert!(!escapes, "ANSI escapes in a file: {line:?}");
    }
}

// ---------------------------------------------------------------- completions

#[test]
fn migctl_prints_completions_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef migctl"),
        ("fish", "complete -c migctl"),
    ] {
        let out = Command::new(migctl_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: no '{marker}'");
        for sub in ["migrate", "estimate", "completions"] {
            assert!(text.contains(sub), "{shell}: no '{sub}'");
        }
    }
    let out = Command::new(migctl_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcsh"));
}

/// Output piped into a reader that has stopped reading (`migctl completions
/// bash | head -1`) ends migctl quietly by SIGPIPE, as other command-line
/// tools, not with a panic (clap_complete's, or `println!`'s) or an error.
#[test]
fn migctl_output_into_a_closed_pipe_ends_it_quietly() {
    use std::os::unix::process::ExitStatusExt;
    // The reading end is gone before migctl starts: its first write fails,
    // whatever the size of the script and of the pipe's buffer.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(migctl_bin())
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.is_empty(), "{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

/// A fake migd on `dir`/fake.sock for `migctl migrate` and `migctl job`:
/// `info` (web1: 1 GiB, 768 MiB of it in use) and `migrate` answered, then
/// each `job` poll with the next of `jobs` (the last again and again); with
/// `close_after_first`, the connection of the first poll is closed after
/// its reply.
fn fake_migd(dir: &Path, jobs: Vec<serde_json::Value>, close_after_first: bool) -> PathBuf {
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let sock = dir.join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let jobs = Arc::new(jobs);
    std::thread::spawn(move || {
        // The job polls answered so far, on every connection.
        let polls = Arc::new(AtomicUsize::new(0));
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let (polls, jobs) = (polls.clone(), jobs.clone());
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in std::io::BufReader::new(s).lines() {
                    let Ok(line) = line else { return };
                    let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let mut first = false;
                    let reply = match req["cmd"].as_str() {
                        Some("info") => json!({"ok": true, "vm": {"name": "web1",
                            "memory": 1u64 << 30, "memory_used": 768u64 << 20}}),
                        Some("migrate") => json!({"ok": true, "job": "job1"}),
                        Some("job") => {
                            let n = polls.fetch_add(1, Ordering::SeqCst);
                            first = n == 0;
                            json!({"ok": true, "job": jobs[n.min(jobs.len() - 1)]})
                        }
                        _ => json!({"ok": false, "error": "unknown"}),
                    };
                    if writeln!(w, "{reply}").is_err() || (first && close_after_first) {
                        return;
                    }
                }
            });
        }
    });
    sock
}

/// A job as the fake migd reports it.
fn fake_job(status: &str, error: Option<&str>, bytes: u64) -> serde_json::Value {
    json!({"id": "job1", "vm": "web1", "to": "10.0.0.2:7070", "status": status,
        "error": error, "stats": {"status": status, "bytes": bytes, "total_ms": 3.5,
        "downtime_ms": 0.0, "pages": {"sent": bytes / 4096, "zero": 0, "resent": 0},
        "bandwidth_mbps": 0.0}})
}

/// `migctl --socket SOCK ARGS... EXTRA...`: status, stdout, stderr.
fn migctl_on(sock: &Path, args: &[&str], extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(migctl_bin())
        .arg("--socket")
        .arg(sock)
        .args(args)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `migctl --socket SOCK migrate web1 --to 10.0.0.2:7070 EXTRA...`.
fn migctl_migrate(sock: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    migctl_on(sock, &["migrate", "web1", "--to", "10.0.0.2:7070"], extra)
}

/// A daemon that closed the connection between two polls of `migctl
/// migrate` (it restarted) is a failed write that migctl tries again on a
/// new connection, not a SIGPIPE that ends it: its socket writes ask for
/// none, whatever migctl does with SIGPIPE for its output.
#[test]
fn migctl_migrate_survives_a_daemon_that_closed_the_connection() {
    let dir = scratch("migctl-closed-conn");
    let jobs = vec![
        fake_job("active", None, 4096),
        fake_job("completed", None, 4096),
    ];
    let sock = fake_migd(&dir, jobs, true);
    let (code, stdout, stderr) = migctl_migrate(&sock, &["--json"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(stats["status"], "completed", "{stats}");
}

/// A migration that failed before any page moved prints its failure, with
/// the cause, on stderr alone (no table of zeros); one refused by the
/// destination says what to check there. Where pages moved, the table stays;
/// `--json` prints the statistics either way.
#[test]
fn migctl_migrate_that_moved_nothing_prints_only_its_failure() {
    let dir = scratch("migctl-failed-early");
    let refused = "connecting to 10.0.0.2:7070: Connection refused (os error 111)";
    let sock = fake_migd(&dir, vec![fake_job("failed", Some(refused), 0)], false);
    let (code, stdout, stderr) = migctl_migrate(&sock, &[]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert_eq!(stdout, "", "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "migctl: error: migration job1 of web1 to 10.0.0.2:7070 failed: {refused}; \
             is migd listening there (--listen), with TLS or --insecure?\n"
        )
    );
    let (code, stdout, _) = migctl_migrate(&sock, &["--json"]);
    assert_eq!(code, Some(1));
    let stats: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(stats["bytes"], 0, "{stats}");

    let dir = scratch("migctl-failed-late");
    let lost = "connection reset by the destination";
    let sock = fake_migd(&dir, vec![fake_job("failed", Some(lost), 8 << 20)], false);
    let (code, stdout, stderr) = migctl_migrate(&sock, &[]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("Transferred:    8 MiB"), "{stdout}");
    assert!(stderr.ends_with(&format!("failed: {lost}\n")), "{stderr}");
}

/// A pre-copy job of web1 (1 GiB, 768 MiB of it in use: the fake's `info`)
/// in round `round` as the daemon reports it while it runs:
/// the VM process's live statistics (total time and average bandwidth are
/// set only at the end), `started` 75 s ago; `link_rate` as given (null:
/// a VM process that does not report it).
fn running_job(round: u64, remaining: u64, link_rate: serde_json::Value) -> serde_json::Value {
    let mib = 1u64 << 20;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rounds: Vec<_> = (0..round)
        .map(|_| json!({"pages": 65536, "bytes": 256 * mib, "ms": 533.3, "dirty_rate": 40.0 * mib as f64}))
        .collect();
    // Round 0 sends the guest's memory once; the later ones what it dirtied.
    let sent = if round == 0 { 300 * mib } else { 1126 * mib };
    json!({"id": "job1", "vm": "web1", "to": "10.0.0.2:7070", "mode": "precopy",
        "max_downtime_ms": 300, "max_bandwidth": null, "status": "active",
        "started": now - 75, "ended": null, "error": null,
        "stats": {"id": "job1", "vm": "web1", "mode": "precopy", "status": "active",
            "outcome": "", "error": null, "total_ms": 0.0, "setup_ms": 3.2, "downtime_ms": 0.0,
            "bytes": sent, "pages": {"sent": sent / 4096, "zero": 10240, "resent": 0},
            "rounds": rounds, "bandwidth_mbps": 0.0, "round": round,
            "remaining_bytes": remaining,
            "dirty_rate": if round > 0 { 40.0 * mib as f64 } else { 0.0 },
            "link_rate": link_rate,
            "expected_downtime_ms": if round > 0 { 210.3 } else { 0.0 },
            "max_downtime_ms": 300.0, "stop_reason": "", "streams": 1}})
}

/// `migctl --socket SOCK job job1 EXTRA...`.
fn migctl_job(sock: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    migctl_on(sock, &["job", "job1"], extra)
}

/// The line of `out` that starts with `key`.
fn line_of<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} line in:\n{out}"))
}

/// `migctl job` for a running job shows its progress as `virsh domjobinfo`
/// does: elapsed time, round, data processed, remaining and total, transfer
/// and dirty rates, expected downtime, and an ETA from the remaining bytes
/// and the measured rate, which is `unknown` where the job has measured no
/// rate (0, or not reported) or nothing remaining yet (round 0): never
/// invented. Figures set only at the end (total time, average bandwidth:
/// zeros while it runs) are left out; `--json` is the daemon's job as is;
/// an ended job keeps its statistics.
#[test]
fn migctl_job_shows_a_running_jobs_progress_and_an_honest_eta() {
    let mib = 1u64 << 20;
    let dir = scratch("migctl-job-running");
    let rate = json!(480.0 * mib as f64);
    let job = running_job(3, 96 * mib, rate.clone());
    let sock = fake_migd(&dir, vec![job.clone()], false);
    let (code, out, err) = migctl_job(&sock, &[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(line_of(&out, "Status:").ends_with(" active"), "{out}");
    assert!(
        line_of(&out, "Elapsed:").starts_with("Elapsed:        1 min 1"),
        "{out}"
    );
    assert_eq!(line_of(&out, "Round:"), "Round:          3");
    assert_eq!(line_of(&out, "Data processed:"), "Data processed: 1.1 GiB");
    assert_eq!(line_of(&out, "Data remaining:"), "Data remaining: 96 MiB");
    assert_eq!(
        line_of(&out, "Data total:"),
        "Data total:     1 GiB (guest memory)"
    );
    assert!(
        line_of(&out, "Transfer rate:").starts_with("Transfer rate:  480 MiB/s"),
        "{out}"
    );
    assert_eq!(line_of(&out, "Dirty rate:"), "Dirty rate:     40 MiB/s");
    assert_eq!(
        line_of(&out, "Exp. downtime:"),
        "Exp. downtime:  210.3 ms (max 300 ms)"
    );
    // 96 MiB at 480 MiB/s.
    assert!(
        line_of(&out, "ETA:").starts_with("ETA:            0.2 s"),
        "{out}"
    );
    for end_only in ["Total time:", "Bandwidth:", "Downtime:"] {
        assert!(!out.contains(end_only), "{end_only}\n{out}");
    }
    assert!(out.contains("Rounds:         3"), "{out}");
    // --json: the daemon's job, unchanged.
    let (code, out, err) = migctl_job(&sock, &["--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        job
    );

    // No rate measured (0), or none reported: no ETA, whatever remains.
    for (tag, rate) in [("zero", json!(0.0)), ("absent", serde_json::Value::Null)] {
        let dir = scratch(&format!("migctl-job-rate-{tag}"));
        let sock = fake_migd(&dir, vec![running_job(3, 96 * mib, rate)], false);
        let (code, out, err) = migctl_job(&sock, &[]);
        assert_eq!(code, Some(0), "{out}\n{err}");
        assert_eq!(line_of(&out, "Data remaining:"), "Data remaining: 96 MiB");
        assert!(
            line_of(&out, "Transfer rate:").starts_with("Transfer rate:  unknown"),
            "{tag}: {out}"
        );
        assert_eq!(
            line_of(&out, "ETA:"),
            "ETA:            unknown (no transfer rate measured yet)",
            "{tag}"
        );
    }

    // Round 0: nothing remaining measured yet (remaining_bytes 0 is no
    // "done"): the rest is an estimate from the guest memory, said so, and
    // there is no ETA.
    let dir = scratch("migctl-job-round0");
    let sock = fake_migd(&dir, vec![running_job(0, 0, json!(0.0))], false);
    let (code, out, err) = migctl_job(&sock, &[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(line_of(&out, "Round:"), "Round:          0");
    // 768 MiB in use, 300 MiB sent.
    assert!(
        line_of(&out, "Data remaining:").starts_with("Data remaining: about 468 MiB (round 0"),
        "{out}"
    );
    assert!(
        line_of(&out, "ETA:").starts_with("ETA:            unknown"),
        "{out}"
    );
    assert!(
        line_of(&out, "Exp. downtime:").starts_with("Exp. downtime:  unknown"),
        "{out}"
    );

    // Ended: the statistics as before, no progress.
    let dir = scratch("migctl-job-ended");
    let sock = fake_migd(&dir, vec![fake_job("completed", None, 8 << 20)], false);
    let (code, out, err) = migctl_job(&sock, &[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("Total time:     3.5 ms"), "{out}");
    assert!(out.contains("Transferred:    8 MiB"), "{out}");
    for progress in ["Elapsed:", "Round:", "ETA:", "Transfer rate:"] {
        assert!(!out.contains(progress), "{progress}\n{out}");
    }
}

// ---------------------------------------------------------------- evacuate

/// What the fake daemon of the evacuate tests does.
#[derive(Clone, Default)]
struct EvacScript {
    /// The `list` replies' `vms` and `adopting`, in turn (the last again
    /// and again).
    lists: Vec<serde_json::Value>,
    /// Each job's status at its polls, in turn (the last again and again).
    statuses: Vec<&'static str>,
    /// After its reply to the first job poll, the daemon restarts: it
    /// closes that connection, and its socket is gone this long.
    restart: Option<Duration>,
    /// The first `migrate` starts its job, but its connection is closed
    /// without a reply (a daemon that restarted while it answered).
    lose_first_migrate_reply: bool,
}

/// A job of the fake evacuate daemon: id, VM, destination, polls so far.
struct EvacJob {
    id: String,
    vm: String,
    to: serde_json::Value,
    polls: usize,
}

/// A fake migd on `dir`/evac.sock for `migctl evacuate`, as `script` says:
/// `list`; `migrate`, which starts job1, job2... (refused, as migd does,
/// while the VM's job has not ended); `job` and `jobs`. Returns its socket
/// and every request it got, in order.
fn fake_evac_migd(
    dir: &Path,
    script: EvacScript,
) -> (
    PathBuf,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};
    struct State {
        lists: usize,
        polls: usize,
        jobs: Vec<EvacJob>,
        migrates: usize,
        down_until: Option<Instant>,
    }
    let sock = dir.join("evac.sock");
    let state = Arc::new(Mutex::new(State {
        lists: 0,
        polls: 0,
        jobs: Vec::new(),
        migrates: 0,
        down_until: None,
    }));
    let script = Arc::new(script);
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (state2, requests2, sock2) = (state.clone(), requests.clone(), sock.clone());
    let status_of =
        |script: &EvacScript, polls: usize| script.statuses[polls.min(script.statuses.len() - 1)];
    let bind = |sock: &Path| {
        let l = UnixListener::bind(sock).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    };
    let mut listener = Some(bind(&sock));
    std::thread::spawn(move || loop {
        let down = state2.lock().unwrap().down_until;
        match (down, &listener) {
            (Some(t), Some(_)) if Instant::now() < t => {
                listener = None;
                let _ = std::fs::remove_file(&sock2);
            }
            (Some(t), None) if Instant::now() >= t => {
                state2.lock().unwrap().down_until = None;
                listener = Some(bind(&sock2));
            }
            _ => {}
        }
        let Some(l) = &listener else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let s = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => return,
        };
        s.set_nonblocking(false).unwrap();
        let (state, script, requests) = (state2.clone(), script.clone(), requests2.clone());
        std::thread::spawn(move || {
            let mut w = s.try_clone().unwrap();
            for line in std::io::BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                requests.lock().unwrap().push(req.clone());
                let mut st = state.lock().unwrap();
                let mut close = false;
                let reply = match req["cmd"].as_str() {
                    Some("list") => {
                        let n = st.lists.min(script.lists.len() - 1);
                        st.lists += 1;
                        let mut r = script.lists[n].clone();
                        r["ok"] = json!(true);
                        r
                    }
                    Some("migrate") => {
                        let vm = req["name"].as_str().unwrap().to_string();
                        let busy = st.jobs.iter().find(|j| {
                            j.vm == vm
                                && !matches!(
                                    status_of(&script, j.polls.saturating_sub(1)),
                                    "completed" | "failed" | "cancelled"
                                )
                        });
                        if let Some(j) = busy {
                            let e = format!("VM '{vm}' is already being migrated (job {})", j.id);
                            json!({"ok": false, "error": e})
                        } else {
                            let id = format!("job{}", st.jobs.len() + 1);
                            st.jobs.push(EvacJob {
                                id: id.clone(),
                                vm,
                                to: req["to"].clone(),
                                polls: 0,
                            });
                            st.migrates += 1;
                            close = st.migrates == 1 && script.lose_first_migrate_reply;
                            json!({"ok": true, "job": id})
                        }
                    }
                    Some("job") => match st.jobs.iter_mut().find(|j| j.id == req["id"]) {
                        Some(j) => {
                            let status = status_of(&script, j.polls);
                            j.polls += 1;
                            let mut job = fake_job(status, None, 4096);
                            job["id"] = json!(j.id);
                            job["vm"] = json!(j.vm);
                            st.polls += 1;
                            if st.polls == 1 {
                                if let Some(d) = script.restart {
                                    st.down_until = Some(Instant::now() + d);
                                    close = true;
                                }
                            }
                            json!({"ok": true, "job": job})
                        }
                        None => json!({"ok": false, "error": format!("no job '{}'", req["id"])}),
                    },
                    Some("jobs") => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_secs();
                        let jobs: Vec<_> = st
                            .jobs
                            .iter()
                            .map(|j| {
                                json!({"id": j.id, "vm": j.vm, "to": j.to, "started": now,
                                       "status": status_of(&script, j.polls.saturating_sub(1))})
                            })
                            .collect();
                        json!({"ok": true, "jobs": jobs})
                    }
                    _ => json!({"ok": false, "error": "unknown"}),
                };
                drop(st);
                // A reply lost: the connection closes before it.
                if close && req["cmd"] == "migrate" {
                    return;
                }
                if writeln!(w, "{reply}").is_err() || close {
                    return;
                }
            }
        });
    });
    (sock, requests)
}

/// A VM of the fake's `list`.
fn evac_vm(name: &str, state: &str) -> serde_json::Value {
    json!({"name": name, "state": state, "job": null})
}

/// `migctl --socket SOCK evacuate --to 10.0.0.2:7070 EXTRA...`.
fn migctl_evacuate(sock: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    migctl_on(sock, &["evacuate", "--to", "10.0.0.2:7070"], extra)
}

/// The requests of `cmd` the fake got.
fn requests_of(
    requests: &std::sync::Mutex<Vec<serde_json::Value>>,
    cmd: &str,
) -> Vec<serde_json::Value> {
    let all = requests.lock().unwrap();
    all.iter().filter(|r| r["cmd"] == cmd).cloned().collect()
}

/// A VM whose process runs but has not answered the daemon since it started
/// (`list`'s `adopting`) runs here unmoved: evacuate names it as skipped
/// and does not exit 0, with other VMs moved or with none.
#[test]
fn evacuate_names_a_vm_whose_process_does_not_answer_and_fails() {
    let dir = scratch("evac-adopting");
    let (sock, requests) = fake_evac_migd(
        &dir,
        EvacScript {
            lists: vec![json!({"vms": [evac_vm("web1", "running")], "adopting": ["db2"]})],
            statuses: vec!["completed"],
            ..Default::default()
        },
    );
    let (code, out, err) = migctl_evacuate(&sock, &[]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    let db2 = line_of(&out, "db2");
    assert!(
        db2.contains("skipped") && db2.contains("does not answer"),
        "{out}"
    );
    assert!(line_of(&out, "web1").contains("completed"), "{out}");
    assert!(out.contains("1 of 2 VMs moved"), "{out}");
    let migrates = requests_of(&requests, "migrate");
    assert_eq!(migrates.len(), 1, "{migrates:?}");
    assert_eq!(migrates[0]["name"], "web1");
    let (code, out, err) = migctl_evacuate(&sock, &["--json"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    let lines: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(lines.len(), 2, "{out}");
    let db2 = lines.iter().find(|l| l["vm"] == "db2").unwrap();
    assert_eq!(db2["outcome"], "skipped", "{out}");

    // Only such a VM: the host is not empty.
    let dir = scratch("evac-adopting-only");
    let (sock, _) = fake_evac_migd(
        &dir,
        EvacScript {
            lists: vec![json!({"vms": [], "adopting": ["db2"]})],
            statuses: vec!["completed"],
            ..Default::default()
        },
    );
    let (code, out, err) = migctl_evacuate(&sock, &[]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(!out.contains("no VM to evacuate"), "{out}");
    assert!(out.contains("0 of 1 VMs moved"), "{out}");
}

/// A VM that appeared while the others moved (created, started, arriving)
/// runs here too: the list taken again at the end names it, and evacuate
/// does not exit 0.
#[test]
fn evacuate_names_a_vm_that_appeared_meanwhile() {
    let dir = scratch("evac-appeared");
    let (sock, _) = fake_evac_migd(
        &dir,
        EvacScript {
            lists: vec![
                json!({"vms": [evac_vm("web1", "running")], "adopting": []}),
                json!({"vms": [evac_vm("web1", "migrated"), evac_vm("web3", "running")],
                       "adopting": []}),
            ],
            statuses: vec!["completed"],
            ..Default::default()
        },
    );
    let (code, out, err) = migctl_evacuate(&sock, &[]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(line_of(&out, "web1").contains("completed"), "{out}");
    let web3 = line_of(&out, "web3");
    assert!(
        web3.contains("skipped") && web3.contains("appeared during the evacuation"),
        "{out}"
    );
}

/// A daemon that restarts during evacuate (the connection of the first poll
/// closed after its reply; then, but in the first case, no socket for
/// 1.5 s) is waited for, as `migctl migrate` waits: the job polled, and the
/// VM still queued, move, each once, and evacuate reports them completed.
/// The restart comes while web1's job runs (its next poll fails), or as it
/// ends (web2's `migrate` fails).
#[test]
fn evacuate_waits_for_a_restarted_daemon_and_reports_the_real_outcome() {
    let secs = Duration::from_millis(1500);
    for (tag, down, statuses) in [
        ("closed", Duration::ZERO, vec!["active", "completed"]),
        ("down-polling", secs, vec!["active", "completed"]),
        ("down-starting", secs, vec!["completed"]),
    ] {
        let dir = scratch(&format!("evac-restart-{tag}"));
        let (sock, requests) = fake_evac_migd(
            &dir,
            EvacScript {
                lists: vec![json!({"vms": [evac_vm("web1", "running"),
                                           evac_vm("web2", "running")], "adopting": []})],
                statuses,
                restart: Some(down),
                ..Default::default()
            },
        );
        let (code, out, err) = migctl_evacuate(&sock, &["--parallel", "1", "--json"]);
        assert_eq!(code, Some(0), "{tag}: {out}\n{err}");
        let lines: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        assert_eq!(lines.len(), 2, "{tag}: {out}");
        for l in &lines {
            assert_eq!(l["outcome"], "completed", "{tag}: {out}");
        }
        assert_eq!(requests_of(&requests, "migrate").len(), 2, "{tag}");
    }
}

/// A `migrate` request whose reply was lost (the daemon restarted as it
/// answered) may have started its job: evacuate finds that job among the
/// daemon's and follows it, instead of asking again (refused: the VM is
/// migrating) and failing a VM that moves.
#[test]
fn evacuate_follows_the_job_of_a_migrate_request_whose_reply_was_lost() {
    let dir = scratch("evac-lost-reply");
    let (sock, requests) = fake_evac_migd(
        &dir,
        EvacScript {
            lists: vec![json!({"vms": [evac_vm("web1", "running")], "adopting": []})],
            statuses: vec!["active", "completed"],
            lose_first_migrate_reply: true,
            ..Default::default()
        },
    );
    let (code, out, err) = migctl_evacuate(&sock, &["--json"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let lines: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["outcome"], "completed", "{out}");
    assert_eq!(lines[0]["job"], "job1", "{out}");
    assert_eq!(requests_of(&requests, "migrate").len(), 1);
}

/// Ctrl-C during evacuate starts no more migrations, prints what it knows
/// (the job still running named, with how to watch or cancel it; the VMs
/// not started as skipped) and exits 130; the running job is left running
/// (no cancel: it may be past post-copy's switch).
#[test]
fn evacuate_interrupted_names_the_jobs_left_running() {
    evacuate_interrupted_by(libc::SIGINT, "evac-sigint");
}

/// SIGTERM (a `kill`, or the stop of a unit that ran evacuate) as Ctrl-C,
/// exit 143: before, it ended migctl silently.
#[test]
fn evacuate_terminated_names_the_jobs_left_running() {
    evacuate_interrupted_by(libc::SIGTERM, "evac-sigterm");
}

fn evacuate_interrupted_by(sig: libc::c_int, tag: &str) {
    let dir = scratch(tag);
    let (sock, requests) = fake_evac_migd(
        &dir,
        EvacScript {
            lists: vec![json!({"vms": [evac_vm("web1", "running"),
                                       evac_vm("web2", "running")], "adopting": []})],
            statuses: vec!["active"],
            ..Default::default()
        },
    );
    let mut child = Command::new(migctl_bin())
        .arg("--socket")
        .arg(&sock)
        .args(["evacuate", "--to", "10.0.0.2:7070", "--parallel", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once web1's job has been polled: migctl is in its loop.
    let end = Instant::now() + Duration::from_secs(20);
    while requests_of(&requests, "job").is_empty() {
        assert!(Instant::now() < end, "no job poll");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a signal to the child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("migctl did not end after signal {sig}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(128 + sig), "{status:?}\n{out}\n{err}");
    let web1 = line_of(&out, "web1");
    assert!(
        web1.contains("job1") && web1.contains("running") && web1.contains("migctl cancel job1"),
        "{out}"
    );
    let web2 = line_of(&out, "web2");
    assert!(
        web2.contains("skipped") && web2.contains("interrupted"),
        "{out}"
    );
    assert!(out.contains("0 of 2 VMs moved"), "{out}");
    assert!(
        err.contains("job1 (web1)") && err.contains("not cancelled"),
        "{err}"
    );
    let migrates = requests_of(&requests, "migrate");
    assert_eq!(migrates.len(), 1, "{migrates:?}");
    assert_eq!(migrates[0]["name"], "web1");
    assert!(requests_of(&requests, "cancel").is_empty());
}
