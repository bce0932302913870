#!/usr/bin/env python3
"""migd against QEMU, side by side (not a test): the same test guest (PVH
testguest.elf), memory, vCPUs and workload, migrated over loopback by each
system in turn, case by case; prints one markdown table with medians
(min-max) and the migd/QEMU ratio per figure.

  scripts/bench/vs_qemu.py [--runs N] [--only SUBSTRING[|SUBSTRING...]] [--path P] [--install] [--json FILE]

--path: loopback (default), veth (two network namespaces joined by a veth
pair) or veth:<rate> (the same shaped with tc tbf, e.g. veth:1gbit,
veth:10gbit); the TCP throughput of the same path is measured in the run.

--install: apt-get install qemu-system-x86 first (Debian; bookworm has 7.2).
QEMU runs with KVM, `-cpu host,-arch-capabilities` (kvm-pvm refuses that MSR),
its isa-debug-exit at 0xf4 and the serial port on a file, and is driven over
QMP (migrate, query-migrate, migrate-set-parameters, migrate-start-postcopy).
Known here: under QEMU on kvm-pvm the guest's own SIMD check reports the
upper halves of its ymm registers lost even before any migration, so those
guest lines are ignored for QEMU; everything else is timing.
"""
import json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import paths  # noqa: E402

QEMU = "qemu-system-x86_64"
CAP = 128 << 20
# Pre-copy that has not converged after this long is given up (QEMU's default
# would go on for ever); the figure says so.
GIVE_UP_S = 30
XBZRLE_CACHE = 512 << 20


class Qmp:
    def __init__(self, path):
        end = time.monotonic() + 20
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.02)
        self.f = self.s.makefile("rw")
        self.f.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args} if args else {"execute": name}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            # an event: skip


def qemu(d, tag, mem, cpus, workload, console, incoming=None, prefix=(), ip="127.0.0.1"):
    qmp = os.path.join(d, tag + ".qmp")
    args = [*prefix, QEMU, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", mem, "-smp", str(cpus),
            "-kernel", bench.GUEST, "-append", f"workload={workload}", "-nodefaults", "-display", "none",
            "-monitor", "none", "-serial", f"file:{console}",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming:
        args += ["-incoming", f"tcp:{ip}:{incoming}"]
    p = bench.track(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, tag + ".log"), "w")))
    return p, Qmp(qmp)


def qemu_once(d, tag, mem, workload, cpus, mode, cap, paused=False, path=None):
    path = path or paths.Path("loopback")
    console = os.path.join(d, tag + ".console")
    src, sq = qemu(d, tag + "s", mem, cpus, workload, console, prefix=path.prefix("src"))
    bench.wait_file(console, "WORKLOAD READY")
    bench.wait_file(console, "HEARTBEAT n=2")
    if paused:
        sq.cmd("stop")
    port = bench.free_port()
    dst, dq = qemu(d, tag + "d", mem, cpus, workload, console + ".dst", incoming=port,
                   prefix=path.prefix("dst"), ip=path.dst_ip)
    try:
        if mode in ("postcopy", "xbzrle"):
            cap_name = "postcopy-ram" if mode == "postcopy" else "xbzrle"
            for q in (sq, dq):
                q.cmd("migrate-set-capabilities",
                      capabilities=[{"capability": cap_name, "state": True}])
        if mode == "xbzrle":
            sq.cmd("migrate-set-parameters", **{"xbzrle-cache-size": XBZRLE_CACHE})
        # QEMU's default cap is 128 MiB/s; "unlimited" means a cap far above the link.
        sq.cmd("migrate-set-parameters", **{"max-bandwidth": cap or (1 << 40), "downtime-limit": 300})
        sq.cmd("migrate", uri=f"tcp:{path.dst_ip}:{port}")
        if mode == "postcopy":
            time.sleep(0.05)
            sq.cmd("migrate-start-postcopy")
        start = time.monotonic()
        while True:
            st = sq.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - start > GIVE_UP_S:
                sq.cmd("migrate_cancel")
                return {"status": f"did not converge in {GIVE_UP_S} s",
                        "bytes": st.get("ram", {}).get("transferred", 0)}
            time.sleep(0.02)
        ram = st.get("ram", {})
        return {"status": st["status"], "total_ms": st.get("total-time"), "downtime_ms": st.get("downtime"),
                "bytes": ram.get("transferred", 0)}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def main():
    bench.check_args(__doc__, valued=("--runs", "--only", "--path", "--json"), switches=("--install",))
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 3
    if "--install" in sys.argv:
        subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86"], check=True)
    if shutil.which("qemu-system-x86_64") is None:
        sys.exit("vs_qemu.py: qemu-system-x86_64 is not installed: run with --install "
                 "(Debian's qemu-system-x86) or install it yourself")
    bench.build()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "migration", "--example", "limits"],
                   cwd=bench.ROOT, check=True)
    lim = bench.limits()
    path = paths.Path.make(sys.argv[sys.argv.index("--path") + 1] if "--path" in sys.argv else "loopback")
    try:
        run_cases(runs, lim, path)
    finally:
        path.close()


def run_cases(runs, lim, path):
    path_tcp = path.tcp_gbit()
    cases = [
        ("pre-copy, 1 GiB idle", "1G", "idle", 2, "precopy", None),
        ("pre-copy, 4 GiB idle", "4G", "idle", 2, "precopy", None),
        ("pre-copy, 1 GiB, 256 MiB flat out", "1G", "dirty:256:0", 1, "precopy", None),
        ("1 GiB, 256 MiB flat out (migd --mode auto, QEMU pre-copy)", "1G", "dirty:256:0", 1, "auto", None),
        ("128 MiB/s cap, 1 GiB, 256 MiB flat out (migd --mode auto)", "1G", "dirty:256:0", 1, "precopy", CAP),
        ("post-copy, 1 GiB, 256 MiB flat out", "1G", "dirty:256:0", 1, "postcopy", None),
        ("pre-copy, 2 GiB, 1 GiB set at 100 MiB/s", "2G", "dirty:1024:100", 1, "precopy", None),
        ("128 MiB/s cap, 2 GiB, 1 GiB set at 100 MiB/s (migd --mode auto)", "2G", "dirty:1024:100", 1,
         "precopy", CAP),
        ("few bytes per page, 1 GiB, 256 MiB at 256 MiB/s, XBZRLE 512 MiB", "1G", "sparse:256:256", 1,
         "xbzrle", None),
        # Page throughput alone: 768 MiB written, the guest paused, one pass.
        ("paused, 1 GiB with 768 MiB written", "1G", "dirty:768:0", 1, "precopy", None, True),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        only = (sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else "").split("|")
        for i, (name, mem, wl, cpus, mode, cap, *rest) in enumerate(cases):
            if not any(o in name for o in only):
                continue
            paused = bool(rest and rest[0])
            m, q = [], []
            for k in range(runs):
                # A cap: migd decides for itself (QEMU: pre-copy under its default cap).
                req = {"mode": "auto" if cap else ("precopy" if mode == "xbzrle" else mode)}
                if mode == "xbzrle":
                    req["xbzrle_cache"] = XBZRLE_CACHE
                if cap:
                    req["max_bandwidth"] = cap
                m.append(bench.migrate_once(d, f"m{i}r{k}", mem, wl, req, cpus=cpus, paused=paused, path=path))
                q.append(qemu_once(d, f"q{i}r{k}", mem, wl, cpus, mode, cap, paused=paused, path=path))
            mo = [r for r in m if r["status"] == "completed"]
            qo = [r for r in q if r["status"] == "completed"]

            def fig(rs, key, scale=1.0):
                xs = [r[key] * scale for r in rs if r.get(key) is not None]
                return bench.med(xs), (statistics.median(xs) if xs else None)

            row = {"case": name, "migd completed": f"{len(mo)}/{runs}", "QEMU completed": f"{len(qo)}/{runs}"}
            # Bytes over the whole migration time: the page throughput when the guest is paused.
            for r in mo + qo:
                r["mb_per_s"] = r["bytes"] / 1e6 / (r["total_ms"] / 1e3) if r.get("total_ms") else None
            for label, key, scale in (("total ms", "total_ms", 1.0), ("downtime ms", "downtime_ms", 1.0),
                                      ("MiB", "bytes", 1 / 2**20), ("MB/s", "mb_per_s", 1.0)):
                ms, mv = fig(mo, key, scale)
                qs, qv = fig(qo, key, scale)
                row[f"{label} migd"] = ms
                row[f"{label} QEMU"] = qs
                row[f"{label} ratio"] = f"{mv / qv:.2f}" if mv is not None and qv else "–"
            notes = sorted({r["status"] for r in q if r["status"] != "completed"})
            row["QEMU notes"] = "; ".join(notes)
            rows.append(row)
            print(f"{name}: done", file=sys.stderr)
    print(f"## migd against QEMU {subprocess.run([QEMU, '--version'], capture_output=True, text=True).stdout.split(chr(10))[0]} "
          f"over {path.name} (median (min-max) of {runs}; TCP over that path {path_tcp} Gbit/s, "
          f"loopback TCP {lim['loopback_tcp_gbit_per_s']} Gbit/s, "
          f"memcpy {lim['memcpy_gbytes_per_s']} GB/s in the same run)\n")
    bench.print_table(rows)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
