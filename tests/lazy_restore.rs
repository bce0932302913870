//! End-to-end tests of `migd run --restore FILE --lazy` with the test guest:
//! a snapshot with a working set (taken while the guest writes), restored
//! lazily with 1 and 2 vCPUs; the eager restore of the same file; a file
//! with corrupted page data, which the background filler must catch; and a
//! file truncated or written to while a slow fill still reads it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const READY: Duration = Duration::from_secs(60);

/// The log without ANSI colour sequences.
fn log_text(p: &Path) -> String {
    let raw = std::fs::read_to_string(p).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// Waits for a log line containing `needle`.
fn wait_log(p: &Path, needle: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        if let Some(l) = log_text(p).lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        if Instant::now() > end {
            panic!(
                "no '{needle}' in {} within {timeout:?}:\n{}",
                p.display(),
                log_text(p)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Boots the guest with `workload`, lets it run, snapshots it with SIGUSR2.
/// Returns (snapshot path, console, last heartbeat before the snapshot).
fn take_snapshot(
    dir: &Path,
    tag: &str,
    workload: &str,
    memory: &str,
    cpus: usize,
) -> (PathBuf, Console, u64) {
    let snap = dir.join(format!("{tag}.snap"));
    let mut a = VmProcess::boot_with(
        dir,
        tag,
        workload,
        memory,
        cpus,
        &["--snapshot-on-signal", snap.to_str().unwrap()],
    );
    let console = a.console.clone();
    console.wait_for("WORKLOAD READY", READY);
    let n = console.wait_heartbeats(0, 2, Duration::from_secs(30));
    a.signal(Signal::SIGUSR2);
    assert_eq!(a.wait(Duration::from_secs(60)), 0);
    let line = wait_log(
        &dir.join(format!("{tag}.log")),
        "snapshot written",
        Duration::from_secs(1),
    );
    let ws = field(&line, "working_set").unwrap_or(0.0);
    assert!(ws > 0.0, "no working set recorded: {line}");
    console.assert_clean();
    (snap, console, n)
}

#[test]
fn lazy_restore_keeps_the_guest_intact_and_fills_every_page() {
    if !kvm_or_skip("lazy_restore_keeps_the_guest_intact_and_fills_every_page") {
        return;
    }
    let dir = scratch("lazy");
    for cpus in [1, 2] {
        let (snap, console, n) = take_snapshot(
            &dir,
            &format!("a{cpus}"),
            "workload=dirty:32:16 zeros=8",
            "256M",
            cpus,
        );
        let tag = format!("lazy{cpus}");
        let again = dir.join(format!("again{cpus}.snap"));
        let b = VmProcess::start(
            &dir,
            &tag,
            &console,
            &[
                "--restore",
                snap.to_str().unwrap(),
                "--lazy",
                "--snapshot-on-signal",
                again.to_str().unwrap(),
            ],
        );
        let log = dir.join(format!("{tag}.log"));
        let m = console.wait_heartbeats(n, 3, Duration::from_secs(30));
        let done = wait_log(&log, "all pages filled", Duration::from_secs(60));
        let pages = field(&done, "pages").expect("pages in the report");
        assert!(pages > (32 << 20) as f64 / 4096.0, "{done}");
        // Every stored page is filled exactly once, or left a hole if zeros.
        let part = |k: &str| field(&done, k).unwrap_or_else(|| panic!("no {k} in {done}"));
        let filled = part("filled");
        assert_eq!(
            part("faults") + part("prefetched") + part("background"),
            filled,
            "{done}"
        );
        let zero = part("zero_stored");
        assert_eq!(filled + zero, pages, "{done}");
        // Zeros take no memory: the guest RAM holds the filled pages, those
        // faulted in as zeros, and what the guest touched since (its 32 MiB
        // working set was in the file already, but the stack and the heart-
        // beat page may be new, and it reads its 8 MiB of zeros, which the
        // file did not store), never the zeros the file stored.
        let ram = guest_ram_bytes(b.child.id()) as f64 / 4096.0;
        assert!(
            ram <= filled + part("zero_faults") + ZEROS_PAGES + 64.0,
            "guest RAM holds {ram} pages, beyond the {filled} filled: {done}"
        );
        assert!(
            field(&done, "prefetched").unwrap() > 0.0,
            "working set prefetched: {done}"
        );
        eprintln!("{cpus} vCPU(s): {done}");
        // The guest runs on, now with every page in place.
        console.wait_heartbeats(m, 2, Duration::from_secs(30));
        console.assert_clean();
        // A checkpoint of the restored VM says how it boots, as the file it
        // came from did (the process booted with --kernel wrote that one).
        b.signal(Signal::SIGUSR1);
        wait_log(&log, "snapshot written", Duration::from_secs(60));
        let first = vmm::snapshot::LazySnapshot::open(&snap).unwrap().boot;
        let kernel = first.as_ref().map(|b| b.kernel.clone()).unwrap_or_default();
        assert!(kernel.ends_with("testguest.elf"), "{first:?}");
        let second = vmm::snapshot::LazySnapshot::open(&again).unwrap().boot;
        assert_eq!(second, first);
        assert_eq!(b.terminate(), 0);
        console.assert_clean();
        if cpus == 1 {
            // The checkpoint was written in the background, which keeps slots
            // for the guest's zeros (allocated by now): a lazy restore of it
            // leaves them holes, and the guest still reads them as zeros.
            let tag = "lazy-again";
            let n = console.last_heartbeat().unwrap_or(0);
            let c = VmProcess::start(
                &dir,
                tag,
                &console,
                &["--restore", again.to_str().unwrap(), "--lazy"],
            );
            let done = wait_log(
                &dir.join(format!("{tag}.log")),
                "all pages filled",
                Duration::from_secs(60),
            );
            let part = |k: &str| field(&done, k).unwrap_or_else(|| panic!("no {k} in {done}"));
            assert!(part("zero_stored") >= ZEROS_PAGES, "{done}");
            assert_eq!(
                part("filled") + part("zero_stored"),
                part("pages"),
                "{done}"
            );
            console.wait_heartbeats(n, 3, Duration::from_secs(30));
            console.assert_clean();
            assert_eq!(c.terminate(), 0);
            console.assert_clean();
        }

        // The eager restore reads the same file (it has a working-set section).
        let eager_console = Console(dir.join(format!("eager{cpus}.console")));
        let c = VmProcess::start(
            &dir,
            &format!("eager{cpus}"),
            &eager_console,
            &["--restore", snap.to_str().unwrap()],
        );
        eager_console.wait_heartbeats(n, 3, Duration::from_secs(30));
        eager_console.assert_clean();
        assert_eq!(c.terminate(), 0);
        eager_console.assert_clean();
    }
}

/// Pages of the guest's `zeros=8`.
const ZEROS_PAGES: f64 = (8 << 20) as f64 / 4096.0;

/// Restores `file` lazily; returns (exit code, log).
fn lazy_run(dir: &Path, tag: &str, file: &Path) -> (i32, String) {
    let console = Console(dir.join(format!("{tag}.console")));
    let mut p = VmProcess::start(
        dir,
        tag,
        &console,
        &["--restore", file.to_str().unwrap(), "--lazy"],
    );
    let code = p.wait(Duration::from_secs(60));
    (code, log_text(&dir.join(format!("{tag}.log"))))
}

#[test]
fn corrupted_page_data_is_caught_by_the_lazy_filler() {
    if !kvm_or_skip("corrupted_page_data_is_caught_by_the_lazy_filler") {
        return;
    }
    let dir = scratch("lazy-corrupt");
    let (snap, _, _) = take_snapshot(&dir, "a", "workload=dirty:16:16", "128M", 1);
    let good = std::fs::read(&snap).unwrap();
    let n = good.len();

    // The data checksum in the trailer does not match: deterministic for the guest.
    let mut bad = good.clone();
    bad[n - 12] ^= 0x55;
    let f = dir.join("bad-crc.snap");
    std::fs::write(&f, &bad).unwrap();
    let (code, log) = lazy_run(&dir, "bad-crc", &f);
    assert_ne!(code, 0, "a corrupted snapshot ran to a clean exit:\n{log}");
    assert!(log.contains("page data checksum mismatch"), "{log}");
    assert!(log.contains("lazy restore failed"), "{log}");
    assert!(!log.contains("all pages filled"), "{log}");

    // A flipped byte in the last stored page.
    let mut bad = good.clone();
    bad[n - 12 - 100] ^= 0x01;
    let f = dir.join("bad-page.snap");
    std::fs::write(&f, &bad).unwrap();
    let (code, log) = lazy_run(&dir, "bad-page", &f);
    assert_ne!(code, 0, "a corrupted snapshot ran to a clean exit:\n{log}");
    let console = std::fs::read_to_string(dir.join("bad-page.console")).unwrap_or_default();
    assert!(
        log.contains("page data checksum mismatch") || console.contains("CORRUPT"),
        "corruption went unnoticed:\n{log}\n{console}"
    );

    // The eager reader refuses both up front.
    let (code, err) = migd_output(&["run", "--restore", f.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("page data checksum mismatch"), "{err}");
}

/// A slow fill (`MIGD_LAZY_PACE_MS`) whose file is truncated, then one whose
/// file is written to in place, while it still reads them: the VM stops at
/// once with a reason naming the change (before, a truncation read "failed
/// to fill whole buffer", and an overwrite ran the guest on the new bytes
/// until the checksum at the end of the stream).
#[test]
fn a_file_truncated_or_written_to_during_a_lazy_fill_stops_the_vm_naming_it() {
    if !kvm_or_skip("a_file_truncated_or_written_to_during_a_lazy_fill_stops_the_vm_naming_it") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = scratch("lazy-changed");
    let (snap, _, _) = take_snapshot(&dir, "a", "workload=dirty:16:16", "128M", 1);
    let len = std::fs::metadata(&snap).unwrap().len();
    // Some 5000 pages stored, 256 a chunk, 300 ms after each: about 6 s.
    let slow = [("MIGD_LAZY_PACE_MS", "300")];
    for tag in ["truncated", "written"] {
        let file = dir.join(format!("{tag}.snap"));
        std::fs::copy(&snap, &file).unwrap();
        let console = Console(dir.join(format!("{tag}.console")));
        let mut p = VmProcess::start_env(
            &dir,
            tag,
            &console,
            &["--restore", file.to_str().unwrap(), "--lazy"],
            &slow,
        );
        let log = dir.join(format!("{tag}.log"));
        wait_log(
            &log,
            "memory filling in the background",
            Duration::from_secs(30),
        );
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        let want = if tag == "truncated" {
            f.set_len(len / 2).unwrap();
            format!(
                "was truncated ({} bytes, was {len}) while the lazy restore still read it",
                len / 2
            )
        } else {
            // In the last stored page, which the stream reaches last.
            f.write_all_at(&[0x5a; 64], len - 12 - 4096).unwrap();
            "was written to while the lazy restore still read it".into()
        };
        let code = p.wait(Duration::from_secs(30));
        let text = log_text(&log);
        assert_eq!(code, 1, "{tag}: exit {code}:\n{text}");
        assert!(
            text.contains("VM failed: lazy restore failed: snapshot ") && text.contains(&want),
            "{tag}: no '{want}' in the reason:\n{text}"
        );
        assert!(!text.contains("all pages filled"), "{tag}:\n{text}");
        assert!(!text.contains("checksum mismatch"), "{tag}:\n{text}");
    }
}
