#!/usr/bin/env python3
"""Memory overhead of a migration (issue #5's goal: daemon and VM-process
memory for a 4 GiB guest ≤ 2 % of guest memory plus the XBZRLE cache).

  scripts/bench/overhead.py [--memory 4G] [--runs 3]

Two `migd` daemons over loopback, a guest created with `migctl create`
(workload dirty:256:0, 1 vCPU) and migrated with `migctl migrate`; every
10 ms the script reads /proc/PID/status of both daemons and both VM
processes. A VM process's own memory is its resident memory less the guest's
RAM (`VmRSS − RssShmem`: guest RAM is a shared memfd): dirty bitmaps, buffers,
caches, thread stacks, the binary. Prints, per process, that figure idle
(before the migration) and at its peak during it, as medians (min–max).
"""
import json, os, shutil, signal, statistics, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

MIGCTL = os.path.join(bench.ROOT, "target", "release", "migctl")


def own_kib(pid):
    """VmRSS − RssShmem of `pid`, KiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            st = dict(l.split(":", 1) for l in f if ":" in l)
    except OSError:
        return None
    kib = lambda k: int(st.get(k, "0 kB").split()[0])
    return kib("VmRSS") - kib("RssShmem")


def children(pid):
    """The processes whose parent is `pid` (the daemon's VM processes)."""
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    # Field 4 is the parent, after the parenthesised command name.
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return kids


class Daemon:
    def __init__(self, d, tag, port):
        self.sock = os.path.join(d, tag + ".sock")
        self.port = port
        self.p = bench.track(subprocess.Popen([bench.MIGD, "--listen", f"127.0.0.1:{port}", "--socket", self.sock,
                                               "--state-dir", os.path.join(d, tag), "--insecure"],
                                              stdout=subprocess.DEVNULL,
                                              stderr=open(os.path.join(d, tag + ".log"), "w")))
        bench.wait_path(self.sock)

    def ctl(self, *args):
        r = subprocess.run([MIGCTL, "--socket", self.sock, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"migctl {args}: {r.stderr.strip()}")
        return r.stdout

    def vm_pid(self, name):
        return json.loads(self.ctl("info", name, "--json"))["pid"]

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(30)


def one_run(d, i, mem, extra):
    a = Daemon(d, f"a{i}", bench.free_port())
    b = Daemon(d, f"b{i}", bench.free_port())
    name = f"vm{i}"
    try:
        a.ctl("create", name, "--kernel", bench.GUEST, "--cmdline", "workload=dirty:256:0",
              "--memory", mem, "--vcpus", "1")
        console = os.path.join(d, f"a{i}", "vms", name, "console.log")
        bench.wait_file(console, "HEARTBEAT n=2")
        src = a.vm_pid(name)
        idle = {"source daemon": own_kib(a.p.pid), "destination daemon": own_kib(b.p.pid),
                "source VM process": own_kib(src)}
        peak = dict(idle)
        seen = {}
        done = threading.Event()

        def sample():
            while not done.is_set():
                pids = {"source daemon": a.p.pid, "destination daemon": b.p.pid, "source VM process": src}
                if "destination VM process" not in seen:
                    kids = children(b.p.pid)
                    if kids:
                        seen["destination VM process"] = kids[0]
                pids.update(seen)
                for k, pid in pids.items():
                    v = own_kib(pid)
                    if v is not None:
                        peak[k] = max(peak.get(k) or 0, v)
                time.sleep(0.01)

        t = threading.Thread(target=sample)
        t.start()
        out = json.loads(a.ctl("migrate", name, "--to", f"127.0.0.1:{b.port}", "--json", *extra))
        time.sleep(0.2)
        done.set()
        t.join()
        if out.get("outcome") != "completed":
            raise RuntimeError(f"migration {out.get('outcome')}: {out.get('error')}")
        b.ctl("destroy", name)
        return idle, peak
    finally:
        a.stop()
        b.stop()


def main():
    bench.check_args(__doc__, valued=("--memory", "--runs"))
    mem = sys.argv[sys.argv.index("--memory") + 1] if "--memory" in sys.argv else "4G"
    runs = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 3
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "migd"], cwd=bench.ROOT, check=True)
    bench.build()
    gib = float(mem.rstrip("G"))
    cases = [("pre-copy", []), ("pre-copy, XBZRLE 256 MiB", ["--xbzrle-cache", "256M"]),
             ("post-copy", ["--mode", "postcopy"])]
    print(f"Memory of each process beyond guest RAM (VmRSS − RssShmem), {mem} guest, "
          f"256 MiB dirtied flat out, median (min–max) of {runs}, MiB\n")
    print("| case | process | idle | peak during migration | peak, % of guest memory |\n|---|---|---|---|---|")
    for case, extra in cases:
        d = tempfile.mkdtemp(prefix="migd-overhead-")
        try:
            results = [one_run(d, i, mem, extra) for i in range(runs)]
        finally:
            shutil.rmtree(d, ignore_errors=True)
        for k in ["source daemon", "source VM process", "destination daemon", "destination VM process"]:
            idle = [r[0][k] / 1024 for r in results if r[0].get(k) is not None]
            peak = [r[1][k] / 1024 for r in results if r[1].get(k) is not None]
            pct = [p / (gib * 1024) * 100 for p in peak]
            print(f"| {case} | {k} | {bench.med(idle) if idle else '–'} | {bench.med(peak)} | "
                  f"{bench.med(pct)} % |")


if __name__ == "__main__":
    main()
