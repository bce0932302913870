//! Two migd daemons on two "hosts": network namespaces joined by a veth pair.
//! A VM goes A → B → A → B with `migctl migrate`, once in each mode (pre-copy,
//! post-copy, hybrid), the guest checking itself all along.
//! Needs root and iproute2; without them the test says SKIP (a failure under CI=true).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;
use serde_json::Value;

/// Two namespaces joined by a veth pair; removed on drop.
struct Link {
    ns: [String; 2],
    ip: [&'static str; 2],
    dev: [String; 2],
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Link {
    fn new() -> Result<Link, String> {
        // Unique per test (tests of this file run in parallel): 15-byte device names.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id() % 10_000 * 10 + n % 10;
        let (va, vb) = (format!("mva{id}"), format!("mvb{id}"));
        let link = Link {
            ns: [format!("migdA{id}"), format!("migdB{id}")],
            ip: ["10.231.0.1", "10.231.0.2"],
            dev: [va.clone(), vb.clone()],
        };
        ip(&["netns", "add", &link.ns[0]])?;
        ip(&["netns", "add", &link.ns[1]])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        for (ns, (dev, addr)) in link.ns.iter().zip([(&va, link.ip[0]), (&vb, link.ip[1])]) {
            ip(&["link", "set", dev, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(link)
    }
}

impl Link {
    /// Takes host A's end of the veth pair down (`false`) or up (`true`).
    fn set_a(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.ns[0], "link", "set", &self.dev[0], state]).unwrap();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn wait_state(d: &Daemon, name: &str, want: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, _) = d.migctl(&["info", name, "--json"]);
        if code == 0 {
            let info: Value = serde_json::from_str(&out).unwrap();
            if info["state"] == want {
                return;
            }
        }
        assert!(Instant::now() < end, "{name} never became {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A slow (capped) hybrid migration that the operator switches to post-copy with
/// `migctl postcopy JOB`; returns the job's final statistics.
fn operator_switch_to_postcopy(from: &Daemon, target: &str) -> Value {
    let job = from.ok(&[
        "migrate",
        "web1",
        "--to",
        target,
        "--mode",
        "hybrid",
        "--max-bandwidth",
        "16M",
        "--detach",
    ]);
    let job = job.trim();
    std::thread::sleep(Duration::from_millis(500));
    from.ok(&["postcopy", job]);
    let j = from.wait_job(job, Duration::from_secs(60));
    assert_eq!(j["stats"]["stop_reason"], "post-copy requested", "{j}");
    j["stats"].clone()
}

/// Two namespaces, or None (SKIP) where they cannot be made outside CI.
fn link_or_skip(test: &str) -> Option<Link> {
    match Link::new() {
        Ok(l) => Some(l),
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("cannot make network namespaces under CI=true: {e}");
            }
            eprintln!("SKIP {test}: {e}");
            None
        }
    }
}

/// Two daemons on port 7070, one in each namespace of a new link, with their
/// state dirs reaped at the end; None (SKIP) where namespaces cannot be made.
/// The scratch directory comes first: bindings drop in reverse, so it
/// outlives the reapers and the daemons.
fn two_hosts(test: &str, tag: &str) -> Option<(Scratch, Link, Daemon, Daemon, [Reaper; 2])> {
    let link = link_or_skip(test)?;
    let dir = scratch(tag);
    let a = Daemon::start_in_netns(&dir, "a", &link.ns[0], link.ip[0], 7070);
    let b = Daemon::start_in_netns(&dir, "b", &link.ns[1], link.ip[1], 7070);
    let reapers = [Reaper(a.state.clone()), Reaper(b.state.clone())];
    Some((dir, link, a, b, reapers))
}

#[test]
fn migrate_between_two_network_namespaces_and_back() {
    if !kvm_or_skip("migrate_between_two_network_namespaces_and_back") {
        return;
    }
    let Some((_dir, link, a, b, _reapers)) =
        two_hosts("migrate_between_two_network_namespaces_and_back", "netns")
    else {
        return;
    };
    let port = 7070;
    // Slow enough that hybrid's hot-page sampling leaves most of the set to
    // the pre-copy rounds, which the operator then cuts short.
    let mut console = a.create_guest("web1", "workload=dirty:32:4", "256M", 2);
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    let mut n = console.wait_heartbeats(0, 2, Duration::from_secs(30));
    let hops = [
        (&a, &b, link.ip[1], "precopy"),
        (&b, &a, link.ip[0], "postcopy"),
        (&a, &b, link.ip[1], "hybrid"),
    ];
    for (hop, (from, to, to_ip, mode)) in hops.iter().enumerate() {
        let target = format!("{to_ip}:{port}");
        let stats = if *mode == "hybrid" {
            operator_switch_to_postcopy(from, &target)
        } else {
            let (code, out, err) =
                from.migctl(&["migrate", "web1", "--to", &target, "--mode", mode, "--json"]);
            assert_eq!(
                code,
                0,
                "hop {hop}: {err}\n{out}\n{}\n{}",
                from.log_text(),
                to.log_text()
            );
            serde_json::from_str(&out).unwrap()
        };
        assert_eq!(stats["outcome"], "completed", "{mode}: {stats}");
        assert_eq!(stats["mode"], *mode, "{stats}");
        assert!(stats["downtime_ms"].as_f64().unwrap() < 1000.0, "{stats}");
        if *mode != "precopy" {
            let p = &stats["pages"];
            let arrived = ["demand", "pushed", "prepaged"]
                .iter()
                .map(|k| p[k].as_u64().unwrap())
                .sum::<u64>();
            assert_eq!(arrived, p["expected"].as_u64().unwrap(), "{mode}: {stats}");
        }
        wait_state(to, "web1", "running");
        let (code, _, _) = from.migctl(&["info", "web1"]);
        assert_ne!(code, 0, "hop {hop}: source still lists the VM");
        console = Console(to.vm_dir("web1").join("console.log"));
        n = console.wait_heartbeats(n, 2, Duration::from_secs(30));
        console.assert_clean();
    }
    b.ok(&["destroy", "web1"]);
}

/// Polls `migctl job ID --json` until `pred` holds on its status; returns the job.
fn wait_job(d: &Daemon, id: &str, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let j: Value = serde_json::from_str(&d.ok(&["job", id, "--json"])).unwrap();
        if pred(j["status"].as_str().unwrap_or("")) {
            return j;
        }
        assert!(Instant::now() < end, "job {id} never {what}: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a slow post-copy migration of web1 and takes the link down as soon
/// as the destination runs the VM; returns the job id once the source has seen
/// the link die.
fn postcopy_then_link_down(link: &Link, from: &Daemon, target: &str) -> String {
    let job = from.ok(&[
        "migrate",
        "web1",
        "--to",
        target,
        "--mode",
        "postcopy",
        "--max-bandwidth",
        "2M",
        "--prepaging-window",
        "0",
        "--detach",
    ]);
    let job = job.trim().to_string();
    wait_job(from, &job, "switched to post-copy", 30, |s| {
        s == "postcopy-active"
    });
    link.set_a(false);
    // A dead link shows within the 5 s link timeout; the source keeps its half.
    let j = wait_job(from, &job, "lost the link", 20, |s| s != "postcopy-active");
    assert_eq!(j["status"], "postcopy-paused", "{j}");
    job
}

/// The source VM process's `migration` reply (its control socket, no daemon
/// poll in between), polled every 10 ms until `pred` holds (20 s at most).
fn wait_migration(
    sock: &std::path::Path,
    what: &str,
    mut pred: impl FnMut(&Value) -> bool,
) -> Value {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let m = try_request(sock, &serde_json::json!({"cmd": "migration"})).unwrap_or_default();
        if pred(&m) {
            return m;
        }
        assert!(Instant::now() < end, "never {what}: {m}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until a post-copy recovery attempt numbered `min` or more has just
/// failed (its number newly in the job's error); returns that number.
fn wait_for_failed_attempt(sock: &std::path::Path, min: u64) -> u64 {
    let attempt = |m: &Value| -> Option<u64> {
        let e = m["error"].as_str()?;
        let tail = &e[e.rfind("(attempt ")? + "(attempt ".len()..];
        tail.split(':').next()?.parse().ok()
    };
    let mut last = None;
    let m = wait_migration(sock, "at the back-off's cap", |m| {
        let Some(n) = attempt(m) else {
            return false;
        };
        let fresh = n >= min && last.is_some_and(|l| l != n);
        last = Some(n);
        fresh
    });
    attempt(&m).unwrap()
}

#[test]
fn postcopy_recovers_after_the_link_goes_down_and_up() {
    if !kvm_or_skip("postcopy_recovers_after_the_link_goes_down_and_up") {
        return;
    }
    let Some((_dir, link, a, b, _reapers)) = two_hosts(
        "postcopy_recovers_after_the_link_goes_down_and_up",
        "netns-recover",
    ) else {
        return;
    };
    let port = 7070;
    let console = a.create_guest("web1", "workload=dirty:48:2", "256M", 2);
    console.wait_for("WORKLOAD READY", Duration::from_secs(60));
    let n = console.wait_heartbeats(0, 2, Duration::from_secs(30));

    // A → B: the link dies after the switch and comes back; `migctl recover`
    // reconnects without waiting for the back-off.
    let job = postcopy_then_link_down(&link, &a, &format!("{}:{port}", link.ip[1]));
    // B runs the VM and says how much of it is still on A.
    let info: Value = serde_json::from_str(&b.ok(&["info", "web1", "--json"])).unwrap();
    let arriving = &info["arriving"];
    let (got, all) = (
        arriving["pages_received"].as_u64().expect("arriving on B"),
        arriving["pages_total"].as_u64().unwrap(),
    );
    assert!(got < all && all > 0, "{info}");
    assert_eq!(arriving["source"], link.ip[0], "{info}");
    assert!(b.ok(&["info", "web1"]).contains("Arriving:"));
    let err = a.fails(&["recover", "job999"]);
    assert!(err.contains("no job 'job999'"), "{err}");
    // The link stays down until the back-off is at its 5 s cap (the 7th
    // attempt waits 5 s) and comes back just after an attempt failed: the
    // next one is ~5 s away, and `migctl recover` must not wait for it.
    let source = a.vm_dir("web1").join("control.sock");
    let attempt = wait_for_failed_attempt(&source, 7);
    link.set_a(true);
    let asked = Instant::now();
    a.ok(&["recover", &job]);
    let m = wait_migration(&source, "recovered", |m| {
        m["recoveries"].as_u64().unwrap_or(0) >= 1
    });
    let took = asked.elapsed();
    eprintln!("recovered {took:?} after `migctl recover` (attempt {attempt} had failed)");
    assert!(
        took < Duration::from_millis(1500),
        "recovered {took:?} after `migctl recover`: it waited for the back-off ({m})"
    );
    let j = wait_job(&a, &job, "ended", 60, |s| {
        matches!(s, "completed" | "failed" | "cancelled")
    });
    let stats = &j["stats"];
    assert_eq!(
        j["status"],
        "completed",
        "{j}\n{}\n{}",
        a.log_text(),
        b.log_text()
    );
    assert!(stats["recoveries"].as_u64().unwrap() >= 1, "{stats}");
    let p = &stats["pages"];
    let arrived: u64 = ["demand", "pushed", "prepaged"]
        .iter()
        .map(|k| p[k].as_u64().unwrap())
        .sum();
    assert_eq!(arrived, p["expected"].as_u64().unwrap(), "{stats}");
    wait_state(&b, "web1", "running");
    let console = Console(b.vm_dir("web1").join("console.log"));
    let n = console.wait_heartbeats(n, 3, Duration::from_secs(30));
    // Every page is here: nothing arriving any more.
    let info: Value = serde_json::from_str(&b.ok(&["info", "web1", "--json"])).unwrap();
    assert!(info["arriving"].is_null(), "{info}");
    console.assert_clean();

    // B → A, and this time the operator gives up while the link is down: the
    // job fails saying which host holds what, and neither side destroys its half.
    let job = postcopy_then_link_down(&link, &b, &format!("{}:{port}", link.ip[0]));
    b.ok(&["cancel", &job]);
    let j = wait_job(&b, &job, "ended", 30, |s| {
        matches!(s, "completed" | "failed" | "cancelled")
    });
    assert_eq!(j["status"], "failed", "{j}");
    let why = j["error"].as_str().unwrap_or_default().to_string();
    assert!(
        why.contains("abandoned by the operator")
            && why.contains(link.ip[0])
            && why.contains("holds"),
        "{why}"
    );
    let info: Value = serde_json::from_str(&b.ok(&["info", "web1", "--json"])).unwrap();
    assert_eq!(
        info["state"], "unconfirmed",
        "the source keeps its half: {info}"
    );
    // Nothing runs it again unasked: migrate (and evacuate) refuse it.
    let e = b.fails(&["migrate", "web1", "--to", &format!("{}:{port}", link.ip[0])]);
    assert!(e.contains("unconfirmed"), "{e}");
    let _ = n;
    link.set_a(true);
    // Each half refuses a plain destroy, naming why, and takes a forced one.
    let e = a.fails(&["destroy", "web1"]);
    assert!(e.contains("post-copy pages are still arriving"), "{e}");
    a.ok(&["destroy", "web1", "--force"]);
    let e = b.fails(&["destroy", "web1"]);
    assert!(e.contains("ended unconfirmed"), "{e}");
    b.ok(&["destroy", "web1", "--force"]);
}
