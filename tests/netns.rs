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
        let id = std::process::id() % 100_000;
        let link = Link {
            ns: [format!("migdA{id}"), format!("migdB{id}")],
            ip: ["10.231.0.1", "10.231.0.2"],
        };
        let (va, vb) = (format!("mva{id}"), format!("mvb{id}"));
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
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let j: Value = serde_json::from_str(&from.ok(&["job", job, "--json"])).unwrap();
        if matches!(
            j["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            assert_eq!(j["stats"]["stop_reason"], "post-copy requested", "{j}");
            return j["stats"].clone();
        }
        assert!(Instant::now() < end, "hybrid job did not end: {j}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn migrate_between_two_network_namespaces_and_back() {
    if !kvm_or_skip("migrate_between_two_network_namespaces_and_back") {
        return;
    }
    let link = match Link::new() {
        Ok(l) => l,
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("cannot make network namespaces under CI=true: {e}");
            }
            eprintln!("SKIP migrate_between_two_network_namespaces_and_back: {e}");
            return;
        }
    };
    let dir = scratch("netns");
    let port = 7070;
    let a = Daemon::start_in_netns(&dir, "a", &link.ns[0], link.ip[0], port);
    let b = Daemon::start_in_netns(&dir, "b", &link.ns[1], link.ip[1], port);
    let _ra = Reaper(a.state.clone());
    let _rb = Reaper(b.state.clone());
    let elf = guest_elf();
    a.ok(&[
        "create",
        "web1",
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "workload=dirty:32:32",
        "--memory",
        "256M",
        "--vcpus",
        "2",
    ]);
    let mut console = Console(a.vm_dir("web1").join("console.log"));
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
