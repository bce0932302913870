#!/usr/bin/env python3
"""Post-copy and hybrid benchmarks (not tests): prints a markdown table of medians (min-max).

  scripts/bench/postcopy.py [--runs N] [--json FILE]

Same guests and harness as bench.py (two `migd run` processes over loopback,
the test guest with `workload=dirty:256:0`, i.e. 256 MiB rewritten as fast as
one vCPU can). Cases:
  - post-copy downtime for idle and dirtying 1 GiB and 4 GiB guests;
  - fault latency (p50/p99) and vCPU block time per MiB of demanded memory;
  - pre-paging window 0 / 16 / 64, and fault requests on their own connection
    or behind the push on the main one;
  - pre-copy against hybrid for the 256 MiB flat-out working set, without a
    cap and under a 128 MiB/s cap (where pre-copy cannot converge).
"""
import json, os, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

CAP = 128 << 20


def cases():
    pc = {"mode": "postcopy"}
    return [
        ("post-copy, 1 GiB idle, 2 vCPUs", "1G", "idle", 2, pc),
        ("post-copy, 4 GiB idle, 2 vCPUs", "4G", "idle", 2, pc),
        ("post-copy, 1 GiB, 256 MiB flat out", "1G", "dirty:256:0", 1, pc),
        ("post-copy, 4 GiB, 256 MiB flat out", "4G", "dirty:256:0", 1, pc),
        ("post-copy, 1 GiB, 256 MiB flat out, window 0", "1G", "dirty:256:0", 1,
         dict(pc, prepaging_window=0)),
        ("post-copy, 1 GiB, 256 MiB flat out, window 64", "1G", "dirty:256:0", 1,
         dict(pc, prepaging_window=64)),
        ("post-copy, 1 GiB, 256 MiB flat out, no fault channel", "1G", "dirty:256:0", 1,
         dict(pc, fault_channel=False)),
        ("post-copy, 1 GiB, 256 MiB flat out, window 0, no fault channel", "1G", "dirty:256:0", 1,
         dict(pc, prepaging_window=0, fault_channel=False)),
        ("pre-copy, 1 GiB, 256 MiB flat out", "1G", "dirty:256:0", 1, {"mode": "precopy"}),
        ("hybrid, 1 GiB, 256 MiB flat out", "1G", "dirty:256:0", 1, {"mode": "hybrid"}),
        ("pre-copy, 1 GiB, 256 MiB flat out, 128 MiB/s cap", "1G", "dirty:256:0", 1,
         {"mode": "precopy", "max_bandwidth": CAP}),
        ("hybrid, 1 GiB, 256 MiB flat out, 128 MiB/s cap", "1G", "dirty:256:0", 1,
         {"mode": "hybrid", "max_bandwidth": CAP}),
    ]


def blocked_ms_per_mib(r):
    """vCPU time blocked on the source per MiB of memory faulted on demand."""
    demand = r["pages"].get("demand", 0)
    if not demand:
        return None
    return r["faults"].get("blocked_us", 0) / 1e3 / (demand * 4096 / 2**20)


def nonzero_mib(r):
    """Guest memory that had to travel at least once: round 0 (pre-copy), plus
    the hot pages hybrid kept out of it, or the post-copy page map."""
    if r["rounds"]:
        return (r["rounds"][0]["pages"] + r["pages"].get("deferred", 0)) * 4096 / 2**20
    return r["pages"]["expected"] * 4096 / 2**20


def main():
    bench.check_args(__doc__, valued=("--runs", "--json"))
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 3
    bench.build()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i, (name, mem, wl, cpus, req) in enumerate(cases()):
            res = [bench.migrate_once(d, f"p{i}r{k}", mem, wl, dict(req), cpus=cpus) for k in range(runs)]
            ok = [r for r in res if r["status"] == "completed"]
            post = req["mode"] != "precopy"
            rows.append({
                "case": name,
                "completed": f"{len(ok)}/{len(res)}",
                "total ms": bench.med([r["total_ms"] for r in ok]),
                "downtime ms": bench.med([r["downtime_ms"] for r in ok]),
                "MiB sent": bench.med([r["bytes"] / 2**20 for r in ok]),
                "sent / non-zero": bench.med([r["bytes"] / 2**20 / max(nonzero_mib(r), 1e-9) for r in ok]),
                "rounds": bench.med([len(r["rounds"]) for r in ok]),
                "faults": bench.med([r["faults"]["count"] for r in ok]) if post else "",
                "fault p50 / p99 µs": (bench.med([r["faults"]["p50_us"] for r in ok]) + " / "
                                       + bench.med([r["faults"]["p99_us"] for r in ok])) if post and ok else "",
                "blocked ms per demanded MiB": bench.med([blocked_ms_per_mib(r) for r in ok]) if post else "",
                "resume → last page ms": bench.med([r["resume_ms"] for r in ok]) if post else "",
                "errors": "; ".join(sorted({r.get("error") or "" for r in res if r["status"] != "completed"})),
            })
            print(f"{name}: done", file=sys.stderr)
    print(f"## Post-copy and hybrid over loopback (median (min-max) of {runs})\n")
    bench.print_table(rows)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
