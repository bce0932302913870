//! Several VMs migrating at once between two daemons, sharing the source's
//! host-wide bandwidth cap: `migctl evacuate` moves every VM and reports each.

mod common;

use std::time::Duration;

use common::daemon::*;
use common::*;
use serde_json::Value;

#[test]
fn evacuate_moves_every_vm_sharing_the_bandwidth_cap() {
    if !kvm_or_skip("evacuate_moves_every_vm_sharing_the_bandwidth_cap") {
        return;
    }
    let dir = scratch("load");
    // 24 MiB/s for the whole host: four jobs at once get 6 MiB/s each.
    let a = Daemon::start_flags(
        &dir,
        "a",
        free_port(),
        &["--insecure", "--max-bandwidth", "24M"],
    );
    let b = Daemon::start(&dir, "b");
    let _ra = Reaper(a.state.clone());
    let _rb = Reaper(b.state.clone());
    let names = ["vm1", "vm2", "vm3", "vm4"];
    for n in names {
        a.create_guest(n, "workload=dirty:8:2", "64M", 1);
    }
    let mut beats = Vec::new();
    for n in names {
        let c = Console(a.vm_dir(n).join("console.log"));
        c.wait_for("WORKLOAD READY", Duration::from_secs(60));
        beats.push(c.wait_heartbeats(0, 1, Duration::from_secs(30)));
    }
    let target = format!("127.0.0.1:{}", b.port);
    let (code, out, err) = a.migctl(&["evacuate", "--to", &target, "--json"]);
    assert_eq!(code, 0, "{err}\n{out}\n{}", a.log_text());
    let results: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(results.len(), 4, "{out}");
    let mut rates = Vec::new();
    for r in &results {
        assert_eq!(r["outcome"], "completed", "{r}");
        let mib = r["bytes"].as_f64().unwrap() / (1 << 20) as f64;
        let secs = r["total_ms"].as_f64().unwrap() / 1e3;
        assert!(mib > 8.0, "{r}");
        rates.push(mib / secs);
        eprintln!(
            "{}: {:.1} MiB in {:.0} ms ({:.1} MiB/s), downtime {:.1} ms",
            r["vm"],
            mib,
            secs * 1e3,
            mib / secs,
            r["downtime_ms"].as_f64().unwrap()
        );
    }
    // Four at once under a 24 MiB/s host cap: together they stayed near the
    // cap. (Not the sum of the four average rates: the jobs start one after
    // the other, and the first runs alone, at the whole cap, for a while.
    // All the bytes over the longest job is an upper bound of the host's rate.)
    let bytes: f64 = results.iter().map(|r| r["bytes"].as_f64().unwrap()).sum();
    let longest = results
        .iter()
        .map(|r| r["total_ms"].as_f64().unwrap())
        .fold(0f64, f64::max);
    let host = bytes / (1 << 20) as f64 / (longest / 1e3);
    assert!(
        host < 24.0 * 1.5,
        "the host cap was not shared: {host} MiB/s, {rates:?}"
    );
    let (lo, hi) = rates
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    assert!(hi / lo < 3.0, "unfair shares: {rates:?}");
    // Everything moved, and runs on B.
    let left: Value = serde_json::from_str(&a.ok(&["list", "--json"])).unwrap();
    assert_eq!(left.as_array().map(Vec::len), Some(0), "{left}");
    for (n, before) in names.iter().zip(beats) {
        let c = Console(b.vm_dir(n).join("console.log"));
        c.wait_heartbeats(before, 1, Duration::from_secs(30));
        c.assert_clean();
        b.ok(&["destroy", n]);
    }
    // A VM that cannot move now (its own migration under way, slowly) is
    // named, and the host is not reported empty.
    a.create_guest("vm5", "workload=dirty:8:2", "64M", 1);
    Console(a.vm_dir("vm5").join("console.log"))
        .wait_for("WORKLOAD READY", Duration::from_secs(60));
    let job: Value = serde_json::from_str(&a.ok(&[
        "migrate",
        "vm5",
        "--to",
        &target,
        "--max-bandwidth",
        "1M",
        "--detach",
        "--json",
    ]))
    .unwrap();
    let id = job["job"].as_str().unwrap().to_string();
    let (code, out, err) = a.migctl(&["evacuate", "--to", &target, "--json"]);
    assert_eq!(code, 1, "{err}\n{out}");
    let results: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(results.len(), 1, "{out}");
    assert_eq!(results[0]["vm"], "vm5", "{out}");
    assert_eq!(results[0]["outcome"], "skipped", "{out}");
    assert!(
        results[0]["error"].as_str().unwrap_or("").contains(&id),
        "{out}"
    );
    let (code, out, _) = a.migctl(&["evacuate", "--to", &target]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("0 of 1 VMs moved"), "{out}");
    a.ok(&["cancel", &id]);
    let j = a.wait_job(&id, Duration::from_secs(60));
    assert_eq!(j["status"], "cancelled", "{j}");
    a.ok(&["destroy", "vm5"]);
    // Nothing to do: says so, exit 0.
    let (code, out, _) = a.migctl(&["evacuate", "--to", &target]);
    assert_eq!(code, 0);
    assert!(out.contains("no VM to evacuate"), "{out}");
}
