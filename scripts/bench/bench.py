#!/usr/bin/env python3
"""migd benchmarks (not tests): prints markdown tables of medians (min-max).

  scripts/bench/bench.py [vm|migrate|features|multifd|estimate|predict|hugepages|save|dirty-ring|all] [--runs N] [--json FILE]

vm:      boot to WORKLOAD READY; pause -> capture -> restore in a new process
         (handover, memory shared through the memfd); snapshot to file and
         restore (time, file size).
migrate: pre-copy over loopback between two `migd run` processes: 1 GiB and
         4 GiB guests, idle and with a 256 MiB working set dirtied as fast as
         possible; total time, downtime, bytes, rounds, round-0 throughput.
features: side by side under a bandwidth cap, 1 GiB guests, 1 vCPU:
         compress none / zstd:1 / zstd:3 on a compressible working set (128
         and 32 MiB/s), and reorder off / on on a hot/cold working set (128).
multifd: the paused-source case of `migrate` (1 GiB, 768 MiB written) with
         1, 2 and 4 page streams (`streams`), plaintext and TLS (not in `all`).
estimate: pre-copy over veth shaped to 1 Gbit/s (root): downtime predicted
         at the stop decision against downtime measured (not in `all`).
dirty-ring: pre-copy with memory digests compared, 1 GiB flat out and 4 GiB
         idle: the bitmap log (cleared before sending, and as read) beside
         KVM's dirty ring of 4096 and 65536 entries (not in `all`).
predict: the cost model before and after, two daemons over loopback:
         `migctl estimate` (its inputs measured on the running guest and a
         probe of the path), then `migctl migrate`, whose statistics carry
         the model fed with what that migration measured (`model`); both
         beside the measured downtime and total, per mode, 1 GiB guests,
         1 vCPU (not in `all`).
hugepages: the destination's memory on 4 KiB shmem pages (the default)
         against 4 KiB pages allocated up front (`--prefault`), huge pages
         (`--hugepages`) and huge pages allocated up front (`--hugepages
         --prefault`), turn about run by run: the
         paused-source case (768 MiB), and 256 MiB flat out by pre-copy,
         post-copy, hybrid and auto, 1 GiB guests, and an idle 1 GiB guest
         with both sides on the same memory, also once its VM was handed
         to a new process first (`--takeover`); round-0 throughput against
         loopback TCP, post-copy's fault latency. Grows and touches the
         huge page pool first (scripts/hugepages.sh 2200, root; not in `all`).
limits:  memcpy, zero-scan and loopback TCP, measured in the same run.
"""
import atexit, json, os, re, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MIGD = os.path.join(ROOT, "target", "release", "migd")
GUEST = os.path.join(ROOT, "target", "guest", "testguest.elf")


def build():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "migd", "--bin", "migd", "--bin", "migctl"],
                   cwd=ROOT, check=True)
    subprocess.run([os.path.join(ROOT, "scripts", "build-guest.sh")], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)


def limits():
    out = subprocess.run(["cargo", "run", "-q", "--release", "-p", "migration", "--example", "limits"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def wait_file(path, needle, timeout=120, start=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(path) as f:
                if needle in f.read():
                    return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"no '{needle}' in {path}")


def check_args(doc, valued=(), switches=(), first=()):
    """The command line against a script's usage (`doc`, its docstring):
    -h/--help prints it; an unknown argument, or a flag of `valued` without
    its value, is refused before anything runs. `first`: the words allowed
    as the first argument (a subcommand)."""
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(doc.strip())
        sys.exit(0)
    i = 1 if argv and argv[0] in first else 0
    while i < len(argv):
        if argv[i] in valued and i + 1 < len(argv):
            i += 2
        elif argv[i] in switches:
            i += 1
        else:
            what = "needs a value" if argv[i] in valued else "is not an argument here"
            sys.exit(f"{os.path.basename(sys.argv[0])}: '{argv[i]}' {what}\n\n{doc.strip()}")


def wait_path(path, timeout=30):
    """Waits until the unix socket at `path` accepts connections (it exists a moment before)."""
    end = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            if time.monotonic() > end:
                raise RuntimeError(f"{path} never answered")
            time.sleep(0.005)


def request(sock, obj):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall((json.dumps(obj) + "\n").encode())
    r = s.makefile().readline()
    s.close()
    return json.loads(r)


# Every process a benchmark starts (VMs, daemons, QEMU), so that none outlives
# the script: a case that fails half-way (a destination that never answers,
# an exception, a SIGTERM from `timeout`) would otherwise leave VMs running,
# holding memory and huge pages that the next runs then lack.
STARTED = []


def track(p):
    """Registers the subprocess.Popen `p` to be killed when the script ends."""
    STARTED.append(p)
    return p


def stop_all():
    for p in STARTED:
        if p.poll() is None:
            p.kill()
            p.wait()


atexit.register(stop_all)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


class Vm:
    def __init__(self, d, tag, args, console=None, prefix=()):
        self.sock = os.path.join(d, tag + ".sock")
        self.console = console or os.path.join(d, tag + ".console")
        self.log = open(os.path.join(d, tag + ".log"), "w")
        self.t0 = time.monotonic()
        # `prefix`: e.g. `ip netns exec NS` (paths.Path.prefix).
        self.p = track(subprocess.Popen([*prefix, MIGD, "run", *args, "--serial", self.console, "--control", self.sock],
                                        stdout=subprocess.PIPE, stderr=self.log, text=True))

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()


def boot(d, tag, mem, cpus, workload, extra=(), prefix=()):
    return Vm(d, tag, ["--kernel", GUEST, "--cmdline", f"workload={workload}", "--memory", mem,
                       "--cpus", str(cpus), *extra], prefix=prefix)


def med(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    m = statistics.median(xs)
    return f"{m:.1f} ({min(xs):.1f}-{max(xs):.1f})" if len(xs) > 1 else f"{m:.1f}"


def bench_vm(runs):
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ready = []
        for i in range(runs):
            vm = boot(d, f"b{i}", "1G", 2, "idle")
            ready.append((wait_file(vm.console, "WORKLOAD READY") - vm.t0) * 1e3)
            vm.stop()
        rows.append(("start of `migd run` to WORKLOAD READY, 1 GiB, 2 vCPUs", "ms", med(ready)))
        for mem in ["1G", "4G"]:
            gaps = []
            for i in range(runs):
                vm = boot(d, f"h{mem}{i}", mem, 2, "dirty:256:0")
                wait_path(vm.sock)
                wait_file(vm.console, "HEARTBEAT n=2")
                new = Vm(d, f"n{mem}{i}", ["--takeover", vm.sock], console=vm.console)
                line = new.p.stdout.readline()
                gaps.append(json.loads(line)["downtime_us"] / 1e3)
                vm.p.wait(30)
                wait_file(new.console, "HEARTBEAT n=4")
                bad = "CORRUPT" in open(new.console).read()
                new.stop()
                if bad:
                    raise RuntimeError("guest reported corruption after handover")
            rows.append((f"pause -> capture -> restore in a new process -> running, {mem}, dirty:256:0",
                         "ms (guest gap)", med(gaps)))
        for wl in ["idle", "dirty:256:0"]:
            save, size, load, lazy_run, lazy_full = [], [], [], [], []
            for i in range(runs):
                snap = os.path.join(d, f"s{i}.snap")
                vm = Vm(d, f"s{wl[0]}{i}", ["--kernel", GUEST, "--cmdline", f"workload={wl}", "--memory", "1G",
                                            "--cpus", "2", "--snapshot-on-signal", snap])
                wait_file(vm.console, "HEARTBEAT n=2")
                t = time.monotonic()
                vm.p.send_signal(signal.SIGUSR2)
                vm.p.wait(120)
                save.append((time.monotonic() - t) * 1e3)
                size.append(os.path.getsize(snap) / 2**20)
                r = Vm(d, f"r{wl[0]}{i}", ["--restore", snap], console=vm.console)
                wait_path(r.sock)
                # The control socket answers status once the restored VM runs.
                if request(r.sock, {"cmd": "status"}).get("state") != "running":
                    raise RuntimeError("restored VM is not running")
                load.append((time.monotonic() - r.t0) * 1e3)
                r.stop()
                # Lazy: running at once, memory filled from the file meanwhile
                # ("all pages filled ... filled_ms=", from process start).
                z = Vm(d, f"z{wl[0]}{i}", ["--restore", snap, "--lazy"], console=vm.console)
                wait_file(z.log.name, "all pages filled")
                with open(z.log.name) as f:
                    text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
                m = re.search(r"resume_ms=([\d.]+) filled_ms=([\d.]+)", text)
                lazy_run.append(float(m.group(1)))
                lazy_full.append(float(m.group(2)))
                z.stop()
                os.unlink(snap)
            rows.append((f"snapshot to file, 1 GiB, {wl}", "ms", med(save)))
            rows.append((f"snapshot file size, 1 GiB, {wl}", "MiB", med(size)))
            rows.append((f"restore from file to running, 1 GiB, {wl}", "ms", med(load)))
            rows.append((f"lazy restore (--lazy) to running, 1 GiB, {wl}", "ms", med(lazy_run)))
            rows.append((f"lazy restore: every page filled, 1 GiB, {wl}", "ms", med(lazy_full)))
    return rows


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def tls_flags(d, host, peer):
    """`migd run` flags for TLS between host-a and host-b (certificates made once in `d`)."""
    certs = os.path.join(d, "certs")
    if not os.path.exists(os.path.join(certs, "host-b.pem")):
        subprocess.run([os.path.join(ROOT, "scripts", "make-certs.sh"), certs, "host-a=127.0.0.1",
                        "host-b=127.0.0.1"], check=True, stdout=subprocess.DEVNULL)
    return ["--tls-ca", os.path.join(certs, "ca.pem"), "--tls-cert", os.path.join(certs, host + ".pem"),
            "--tls-key", os.path.join(certs, host + ".key"), "--tls-peer", peer]


def cpu_s(pid):
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy():
    """(busy, total) jiffies of all CPUs so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def migrate_once(d, tag, mem, workload, extra=None, cpus=2, paused=False, tls=False, path=None, flags=(),
                 dst_flags=(), handover=False):
    """One migration between two `migd run` processes; `path` (paths.Path):
    where each side runs and the destination's address (default loopback);
    `flags`: more flags for both `migd run`s, `dst_flags` for the destination's;
    `handover`: the source's VM first moves to a new process on the same
    memory (`migd run --takeover`), which then migrates it."""
    src_prefix, dst_prefix = (path.prefix("src"), path.prefix("dst")) if path else ((), ())
    dst_ip = path.dst_ip if path else "127.0.0.1"
    src = boot(d, tag + "s", mem, cpus, workload,
               (tls_flags(d, "host-a", "host-b") if tls else []) + list(flags), prefix=src_prefix)
    wait_path(src.sock)
    # The working set is written once before READY: the guest's memory is all there.
    wait_file(src.console, "WORKLOAD READY")
    wait_file(src.console, "HEARTBEAT n=2")
    if handover:
        new = Vm(d, tag + "t", ["--takeover", src.sock], console=src.console, prefix=src_prefix)
        # The old process exits once the new one runs the VM.
        src.p.wait(30)
        src = new
        wait_path(src.sock)
    if paused:
        request(src.sock, {"cmd": "pause"})
    port = free_port()
    dst = Vm(d, tag + "d", ["--incoming", f"{dst_ip}:{port}", "--memory", mem, "--cpus", str(cpus)]
             + (tls_flags(d, "host-b", "host-a") if tls else []) + list(flags) + list(dst_flags),
             console=src.console,
             prefix=dst_prefix)
    wait_path(dst.sock)
    req = {"cmd": "migrate", "to": f"{dst_ip}:{port}", "name": tag}
    req.update(extra or {})
    t0, c0, m0 = time.monotonic(), (cpu_s(src.p.pid), cpu_s(dst.p.pid)), machine_busy()
    reply = request(src.sock, req)
    if "error" in reply:
        raise RuntimeError(f"{tag}: migrate refused: {reply['error']}")
    while True:
        st = request(src.sock, {"cmd": "migration"})
        if st.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() - t0 > 600:
            raise RuntimeError(f"{tag}: migration not over after 600 s: {st}")
        time.sleep(0.02)
    # Cores kept busy during the migration: by the source, by the destination,
    # and by the whole machine (other workers included).
    wall, m1 = time.monotonic() - t0, machine_busy()
    st["src_cores"] = (cpu_s(src.p.pid) - c0[0]) / wall
    st["dst_cores"] = (cpu_s(dst.p.pid) - c0[1]) / wall
    st["machine_cores"] = (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * os.cpu_count()
    request(src.sock, {"cmd": "stop"})
    if st["status"] == "completed":
        # A paused VM arrives paused (go-paused): resumed here to show it runs.
        if paused:
            request(dst.sock, {"cmd": "resume"})
        wait_file(src.console, "HEARTBEAT n=4")
    dst.stop()
    src.stop()
    if "CORRUPT" in open(src.console).read():
        raise RuntimeError(f"guest reported corruption in {tag}")
    st["dest_round0"] = dest_round0(dst.log.name)
    return st


def dest_round0(log):
    """Round 0 as the destination saw it: (pages, ms from its first frame until
    its last page was in guest memory), from its "round stored" log line."""
    with open(log) as f:
        text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
    m = re.search(r"round stored round=0 pages=(\d+) ms=([\d.]+)", text)
    return (int(m.group(1)), float(m.group(2))) if m else None


def bench_migrate(runs, lim):
    rows = []
    tcp_bytes = lim["loopback_tcp_gbit_per_s"] * 1e9 / 8
    # Dirtying guests get one vCPU: this machine has two cores, and the sender
    # and the receiver need one between them.
    # The last case measures page throughput alone: 768 MiB written, then the
    # source paused, so round 0 carries everything and nothing competes for the CPU.
    # The paused case runs twice, plaintext and TLS, to show what TLS costs.
    cases = [("1G", "idle", 2, False, "precopy", False), ("4G", "idle", 2, False, "precopy", False),
             ("1G", "dirty:256:0", 1, False, "precopy", False), ("4G", "dirty:256:0", 1, False, "precopy", False),
             ("1G", "dirty:768:0", 1, True, "precopy", False), ("1G", "dirty:768:0", 1, True, "precopy", True),
             ("1G", "dirty:256:0", 1, False, "postcopy", False), ("1G", "dirty:256:0", 1, False, "hybrid", False)]
    with tempfile.TemporaryDirectory() as d:
        for case, (mem, wl, cpus, paused, mode, tls) in enumerate(cases):
            res = [migrate_once(d, f"m{case}r{i}", mem, wl, {"mode": mode},
                                cpus=cpus, paused=paused, tls=tls)
                   for i in range(runs)]
            ok = [r for r in res if r["status"] == "completed"]
            # Round-0 throughput: page payload (4 KiB per page, no headers) per
            # second, from the destination's first frame of the round until its
            # last page is in guest memory: delivered, not merely written into
            # the source's socket buffer.
            # Rounds under 64 MiB (idle guests) say nothing about throughput.
            r0 = [pages * 4096 / (ms / 1e3) for pages, ms in
                  (r["dest_round0"] for r in ok if r.get("dest_round0"))
                  if pages * 4096 >= 64 << 20 and ms > 0]
            rows.append({
                "case": f"{mode} {mem} {wl} ({cpus} vCPU{', paused' if paused else ''}{', TLS' if tls else ''})",
                "completed": f"{len(ok)}/{len(res)}",
                "total_ms": med([r["total_ms"] for r in ok]),
                "downtime_ms": med([r["downtime_ms"] for r in ok]),
                "MiB_sent": med([r["bytes"] / 2**20 for r in ok]),
                "rounds": med([len(r["rounds"]) for r in ok]),
                "round0_vs_tcp": med([x / tcp_bytes for x in r0]) if r0 else "n/a",
                "fault_p50/p99_us": (med([r["faults"]["p50_us"] for r in ok]) + " / "
                                     + med([r["faults"]["p99_us"] for r in ok])) if mode != "precopy" and ok else "",
                "resume_to_last_page_ms": med([r.get("resume_ms") for r in ok]) if mode != "precopy" else "",
                "model_downtime_ms (err %)": med([r["model"]["prediction"]["downtime_ms"] for r in ok if r.get("model")])
                                              + " (" + med([r["model"]["downtime_error_pct"] for r in ok if r.get("model")]) + ")",
                "model_total_ms (err %)": med([r["model"]["prediction"]["total_ms"] for r in ok if r.get("model")])
                                           + " (" + med([r["model"]["total_error_pct"] for r in ok if r.get("model")]) + ")",
                # Pre-copy's pause: the bytes the model expected the rounds to
                # leave against those sent, and the pause's rate over the rounds'.
                "final_MiB predicted / sent (rate / rounds')": final_copy_cell(ok),
                "stop_reason": ok[0]["stop_reason"] if ok else "",
                "errors": "; ".join(sorted({r.get("error") or "" for r in res if r["status"] != "completed"})),
            })
    return rows


def round0_rate(r):
    """Round-0 page payload per second at the destination (None for rounds
    under 64 MiB, which say nothing about throughput)."""
    pages, ms = r.get("dest_round0") or (0, 0)
    return pages * 4096 / (ms / 1e3) if pages * 4096 >= 64 << 20 and ms > 0 else None


def bench_hugepages(runs, lim):
    # Two 1 GiB guests on huge pages at once (the idle case), with room to spare.
    subprocess.run([os.path.join(ROOT, "scripts", "hugepages.sh"), "2200"], check=True)
    tcp_bytes = lim["loopback_tcp_gbit_per_s"] * 1e9 / 8
    # (workload, source paused, mode, the source on the same memory too,
    # the source's VM handed to a new process first)
    cases = [("dirty:768:0", True, "precopy", False, False), ("dirty:256:0", False, "precopy", False, False),
             ("dirty:256:0", False, "postcopy", False, False), ("dirty:256:0", False, "hybrid", False, False),
             ("dirty:256:0", False, "auto", False, False), ("idle", False, "precopy", True, False),
             ("idle", False, "precopy", True, True)]
    # 4 KiB shmem and huge pages, each also allocated up front (`--prefault`).
    kinds = {"4 KiB shmem": [], "4 KiB shmem, prefaulted": ["--prefault"], "huge pages": ["--hugepages"],
             "huge pages, prefaulted": ["--hugepages", "--prefault"]}
    res = {(case, kind): [] for case in cases for kind in kinds}
    with tempfile.TemporaryDirectory() as d:
        for i in range(runs):
            for n, (wl, paused, mode, both, handover) in enumerate(cases):
                # Turn the order round run by run, so that none always meets the host's drifts first.
                order = list(kinds) if i % 2 == 0 else list(kinds)[::-1]
                for k, kind in enumerate(order):
                    flags = kinds[kind]
                    res[((wl, paused, mode, both, handover), kind)].append(migrate_once(
                        d, f"h{i}{k}{n}", "1G", wl, {"mode": mode}, cpus=1, paused=paused,
                        flags=flags if both else [], dst_flags=[] if both else flags, handover=handover))
    rows = []
    for ((wl, paused, mode, both, handover), memory), rs in res.items():
        ok = [r for r in rs if r["status"] == "completed"]
        r0 = [x for x in map(round0_rate, ok) if x]
        rows.append({
            "case": f"{mode} 1G {wl}{' (paused)' if paused else ''}{', after a handover' if handover else ''}",
            "memory": f"{memory}{', both sides' if both else ', destination'}",
            "completed": f"{len(ok)}/{len(rs)}",
            "total_ms": med([r["total_ms"] for r in ok]),
            "downtime_ms": med([r["downtime_ms"] for r in ok]),
            "round0_GB/s": med([x / 1e9 for x in r0]) if r0 else "n/a",
            "round0_vs_tcp": med([x / tcp_bytes for x in r0]) if r0 else "n/a",
            "fault_p50_us": med([r["faults"]["p50_us"] for r in ok]) if mode != "precopy" else "",
            "MiB_sent": med([r["bytes"] / 2**20 for r in ok]),
            "zero_pages_read": med([r["pages"]["zero"] for r in ok]),
            "errors": "; ".join(sorted({r.get("error") or "" for r in rs if r["status"] != "completed"})),
        })
    return rows


def final_copy_cell(ok):
    # A pause of a few pages (an idle guest) says nothing about rates.
    fc = [f for f in ((r.get("model") or {}).get("final_copy") for r in ok)
          if f and f["bytes_measured"] >= 1 << 20]
    if not fc:
        return ""
    return (med([f["bytes_predicted"] / 2**20 for f in fc]) + " / " + med([f["bytes_measured"] / 2**20 for f in fc])
            + " (" + med([f["final_rate"] / f["round_rate"] for f in fc]) + "x)")


def bench_features(runs):
    """What `compress` and `reorder` buy, each against its off case, in one run."""
    cap = 128 << 20
    # 256 MiB of pages zstd shrinks about tenfold, rewritten at 16 MiB/s.
    zwl = "dirty:256:16 pattern=compressible"
    # Half of 64 MiB/s of rewrites on 10 % of a 256 MiB set, half sweeping the rest.
    hwl = "dirty:256:64 hot=10"
    # Compression at the cap asked for (128 MiB/s) and at a WAN-like 32 MiB/s.
    cases = [(zwl, {"max_bandwidth": c, "compress": z}) for c in (cap, 32 << 20)
             for z in ("none", "zstd:1", "zstd:3")]
    cases += [(hwl, {"max_bandwidth": cap, "reorder": False}), (hwl, {"max_bandwidth": cap, "reorder": True})]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        res = {c: [] for c in range(len(cases))}
        # Interleaved: run i of every case before run i+1 of any.
        for i in range(runs):
            for case, (wl, opts) in enumerate(cases):
                res[case].append(migrate_once(d, f"f{case}r{i}", "1G", wl, dict(opts), cpus=1))
        for case, (wl, opts) in enumerate(cases):
            ok = [r for r in res[case] if r["status"] == "completed"]
            rows.append({
                "case": f"{wl}, cap {opts['max_bandwidth'] >> 20} MiB/s, "
                        + ", ".join(f"{k} {v}" for k, v in opts.items() if k != "max_bandwidth"),
                "completed": f"{len(ok)}/{len(res[case])}",
                "total_ms": med([r["total_ms"] for r in ok]),
                "downtime_ms": med([r["downtime_ms"] for r in ok]),
                "MiB_sent": med([r["bytes"] / 2**20 for r in ok]),
                "rounds": med([len(r["rounds"]) for r in ok]),
                "pages_sent": med([r["pages"]["sent"] for r in ok]),
                "ratio": med([r["compression"]["ratio"] for r in ok]) if "compress" in opts else "",
                "compress_ms": med([r["compression"]["compress_ms"] for r in ok]) if "compress" in opts else "",
                "skipped_redirtied": med([r["pages"]["skipped_redirtied"] for r in ok]) if "reorder" in opts else "",
                "stop_reason": ok[0]["stop_reason"] if ok else "",
                "errors": "; ".join(sorted({r.get("error") or "" for r in res[case] if r["status"] != "completed"})),
            })
    return rows


def bench_dirty_ring(runs):
    """The bitmap log (cleared before sending, and cleared as read) beside the
    dirty ring (two sizes), on the flat-out case and an idle 4 GiB guest;
    pre-copy with memory digests compared, interleaved run by run."""
    trackers = [("bitmap", (), {}), ("bitmap, cleared as read", (), {"clear_before_send": False}),
                ("ring 4096", ("--dirty-ring", "4096"), {}), ("ring 65536", ("--dirty-ring", "65536"), {})]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for mem, wl in (("1G", "dirty:256:0"), ("4G", "idle")):
            res = {t[0]: [] for t in trackers}
            for i in range(runs):
                order = list(enumerate(trackers))
                for t, (name, flags, opts) in (order if i % 2 == 0 else order[::-1]):
                    req = {"mode": "precopy", "verify": True, **opts}
                    res[name].append(migrate_once(d, f"dr{mem}{t}r{i}", mem, wl, req, cpus=1, flags=flags))
            for name, _, _ in trackers:
                ok = [r for r in res[name] if r["status"] == "completed" and r["verified"]]
                ring = [r.get("dirty_ring") or {} for r in ok]
                rows.append({
                    "case": f"{mem} {wl}", "tracking": name,
                    "completed": f"{len(ok)}/{len(res[name])}",
                    "total_ms": med([r["total_ms"] for r in ok]),
                    "downtime_ms": med([r["downtime_ms"] for r in ok]),
                    "MiB_sent": med([r["bytes"] / 2**20 for r in ok]),
                    "full_ring_exits": med([x.get("full_exits", 0) for x in ring]),
                    "overflows": sum(x.get("overflows", 0) for x in ring),
                })
    return rows


def bench_multifd(runs, lim):
    """The paused-source page-throughput case (1 GiB guest, 768 MiB written,
    source paused, so round 0 carries everything) with 1, 2 and 4 streams,
    plaintext and TLS."""
    rows = []
    tcp_bytes = lim["loopback_tcp_gbit_per_s"] * 1e9 / 8
    with tempfile.TemporaryDirectory() as d:
        for tls in (False, True):
            for streams in (1, 2, 4):
                res = [migrate_once(d, f"f{int(tls)}s{streams}r{i}", "1G", "dirty:768:0",
                                    {"mode": "precopy", "streams": streams},
                                    cpus=1, paused=True, tls=tls)
                       for i in range(runs)]
                ok = [r for r in res if r["status"] == "completed"]
                r0 = [(pages * 4096 / (ms / 1e3), ms) for pages, ms in
                      (r["dest_round0"] for r in ok if r.get("dest_round0")) if ms > 0]
                rows.append({
                    "streams": streams,
                    "link": "TLS" if tls else "plaintext",
                    "completed": f"{len(ok)}/{len(res)}",
                    "streams_used": med([r.get("streams", 1) for r in ok]),
                    "total_ms": med([r["total_ms"] for r in ok]),
                    "downtime_ms": med([r["downtime_ms"] for r in ok]),
                    "MiB_sent": med([r["bytes"] / 2**20 for r in ok]),
                    "round0_ms": med([ms for _, ms in r0]) if r0 else "n/a",
                    "round0_MB/s": med([x / 1e6 for x, _ in r0]) if r0 else "n/a",
                    "round0_vs_tcp": med([x / tcp_bytes for x, _ in r0]) if r0 else "n/a",
                    "cores src/dst/machine": " / ".join(
                        med([r[k] for r in ok]).split(" ")[0] for k in ("src_cores", "dst_cores", "machine_cores")),
                    "errors": "; ".join(sorted({r.get("error") or "" for r in res if r["status"] != "completed"})),
                })
    return rows


def bench_estimate(runs):
    """Pre-copy over veth shaped to 1 Gbit/s: the downtime the source
    predicted when it decided to pause (`expected_downtime_ms`) against the
    downtime measured, for a converging guest and a borderline one (dirty
    rate near the link's), 1 GiB guests, 1 vCPU."""
    import paths  # root only: network namespaces
    rows = []
    path = paths.Path.make("veth:1gbit")
    try:
        with tempfile.TemporaryDirectory() as d:
            for wl, mdt in (("dirty:128:64", 300), ("dirty:256:100", 100)):
                res = [migrate_once(d, f"e{mdt}r{i}", "1G", wl,
                                    {"mode": "precopy", "max_downtime_ms": mdt}, cpus=1, path=path)
                       for i in range(runs)]
                ok = [r for r in res if r["status"] == "completed"]
                rows.append({
                    "workload": wl,
                    "max_downtime_ms": mdt,
                    "completed": f"{len(ok)}/{len(res)}",
                    "converged": sum(r.get("stop_reason") == "expected downtime within max-downtime"
                                     for r in ok),
                    "predicted_ms": med([r["expected_downtime_ms"] for r in ok]),
                    "downtime_ms": med([r["downtime_ms"] for r in ok]),
                    "measured/predicted": med([r["downtime_ms"] / max(r["expected_downtime_ms"], 1e-3)
                                               for r in ok]),
                    "rounds": med([len(r["rounds"]) for r in ok]),
                    "total_ms": med([r["total_ms"] for r in ok]),
                })
    finally:
        path.close()
    return rows


class Daemon:
    """A `migd` daemon on loopback, driven with `migctl`."""

    def __init__(self, d, tag, flags=()):
        self.port = free_port()
        self.sock = os.path.join(d, tag + ".sock")
        self.log = open(os.path.join(d, tag + ".log"), "w")
        self.p = track(subprocess.Popen([MIGD, "--listen", f"127.0.0.1:{self.port}", "--socket", self.sock,
                                         "--state-dir", os.path.join(d, tag), "--insecure", *flags],
                                        stdout=subprocess.DEVNULL, stderr=self.log))
        wait_path(self.sock)

    def ctl(self, *args):
        migctl = os.path.join(os.path.dirname(MIGD), "migctl")
        return subprocess.run([migctl, "--socket", self.sock, *args], check=True,
                              capture_output=True, text=True, timeout=300).stdout

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(30)


def bench_predict(runs):
    """Per case and mode: what `migctl estimate` predicted before the
    migration, what the model says fed with the migration's own
    measurements (`model`), and what was measured."""
    rows = []
    cases = (("1 GiB, 256 MiB flat out", "dirty:256:0"), ("1 GiB, 256 MiB at 64 MiB/s", "dirty:256:64"))
    with tempfile.TemporaryDirectory() as d:
        a, b = Daemon(d, "a"), Daemon(d, "b")
        try:
            for case, wl in cases:
                for mode in ("precopy", "hybrid"):
                    res = []
                    for i in range(runs):
                        name = f"p{len(rows)}r{i}"
                        a.ctl("create", name, "--kernel", GUEST, "--cmdline", f"workload={wl}",
                              "--memory", "1G", "--vcpus", "1")
                        console = os.path.join(d, "a", "vms", name, "console.log")
                        wait_file(console, "HEARTBEAT n=2")
                        to = f"127.0.0.1:{b.port}"
                        est = json.loads(a.ctl("estimate", name, "--to", to, "--mode", mode, "--json"))
                        st = json.loads(a.ctl("migrate", name, "--to", to, "--mode", mode, "--json"))
                        b.ctl("destroy", name)
                        if st["outcome"] == "completed":
                            res.append((est, st))
                    ok = [(e, s) for e, s in res if s.get("model")]
                    err = lambda p, m: (p - m) / m * 100
                    rows.append({
                        "case": case, "mode": mode, "completed": f"{len(res)}/{runs}",
                        "working set MiB (estimate)": med([e["inputs"]["working_set"] / 2**20 for e, _ in res]),
                        "downtime ms": med([s["downtime_ms"] for _, s in res]),
                        "estimate ms (err %)": med([e["prediction"]["downtime_ms"] for e, _ in res])
                        + " (" + med([err(e["prediction"]["downtime_ms"], s["downtime_ms"]) for e, s in res]) + ")",
                        "total ms": med([s["total_ms"] for _, s in res]),
                        "estimate total ms (err %)": med([e["prediction"]["total_ms"] for e, _ in res])
                        + " (" + med([err(e["prediction"]["total_ms"], s["total_ms"]) for e, s in res]) + ")",
                        "check total ms (err %)": med([s["model"]["prediction"]["total_ms"] for _, s in ok])
                        + " (" + med([s["model"]["total_error_pct"] for _, s in ok]) + ")",
                        "path Gbit/s (estimate) / round 0 Gbit/s": med([e["inputs"]["bandwidth"] * 8e-9 for e, _ in res])
                        + " / " + med([s["rounds"][0]["bytes"] * 8e-6 / s["rounds"][0]["ms"] for _, s in res]),
                    })
        finally:
            a.stop()
            b.stop()
    return rows


def clock_steps(console):
    """The `CLOCK STEP ms=` values the guest printed (jumps of its clock)."""
    return [int(l.split("ms=")[1].split()[0]) for l in open(console) if l.startswith("CLOCK STEP ms=")]


def bench_save(runs):
    """A checkpoint (`snapshot` of a running VM that runs on) written in the
    background against one written in the pause, side by side: 1 GiB guest,
    1 vCPU, 256 MiB written at 64 MiB/s and flat out. `paused_ms` is the
    VM process's measure (pause to resume); `guest gap ms` the largest clock
    jump the guest itself reported."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for wl in ("dirty:256:64", "dirty:256:0"):
            res = {True: [], False: []}
            for i in range(runs):
                for bg in ((True, False) if i % 2 == 0 else (False, True)):
                    vm = boot(d, f"s{wl[-2:]}{i}{int(bg)}", "1G", 1, wl)
                    wait_path(vm.sock)
                    wait_file(vm.console, "WORKLOAD READY")
                    wait_file(vm.console, "HEARTBEAT n=2")
                    steps = len(clock_steps(vm.console))
                    snap = os.path.join(d, "ckpt.snap")
                    r = request(vm.sock, {"cmd": "snapshot", "path": snap, "background": bg})
                    if not r.get("ok"):
                        raise RuntimeError(f"snapshot failed: {r}")
                    n = int(open(vm.console).read().split("HEARTBEAT n=")[-1].split()[0])
                    wait_file(vm.console, f"HEARTBEAT n={n + 2}")
                    r["gap"] = max(clock_steps(vm.console)[steps:], default=0)
                    r["MiB"] = os.path.getsize(snap) / 2**20
                    bad = "CORRUPT" in open(vm.console).read()
                    vm.stop()
                    os.unlink(snap)
                    if bad:
                        raise RuntimeError("guest reported corruption after a checkpoint")
                    res[bg].append(r)
            for bg in (False, True):
                rs = res[bg]
                rows.append({
                    "workload": wl,
                    "written": "in the background" if bg else "in the pause",
                    "paused_ms": med([r["paused_ms"] for r in rs]),
                    "guest gap ms": med([r["gap"] for r in rs]),
                    "total_ms": med([r["ms"] for r in rs]),
                    "faults": med([r["faults"] for r in rs]) if bg else "-",
                    "MiB": med([r["MiB"] for r in rs]),
                })
    return rows


def print_table(rows):
    """A markdown table of dict rows (keys of the first as the header)."""
    keys = list(rows[0].keys())
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    print()


def main():
    check_args(__doc__, valued=("--runs", "--json"),
               first=("vm", "migrate", "features", "multifd", "estimate", "predict", "hugepages",
                      "save", "dirty-ring", "all"))
    what = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "all"
    runs = 3
    if "--runs" in sys.argv:
        runs = int(sys.argv[sys.argv.index("--runs") + 1])
    # (subcommand, in `all`, table title, what measures it; `lim` is set below)
    sections = [
        ("migrate", True, "Pre-copy over loopback", lambda: bench_migrate(runs, lim)),
        ("features", True, "compress and reorder under a bandwidth cap", lambda: bench_features(runs)),
        ("multifd", False, "Multifd: paused source, 768 MiB written", lambda: bench_multifd(runs, lim)),
        ("dirty-ring", False, "Dirty tracking: bitmap log and dirty ring", lambda: bench_dirty_ring(runs)),
        ("save", False, "Checkpoints: written in the background or in the pause", lambda: bench_save(runs)),
        ("estimate", False, "Downtime predicted and measured, veth at 1 Gbit/s", lambda: bench_estimate(runs)),
        ("hugepages", False, "Destination memory: 4 KiB shmem pages or huge pages",
         lambda: bench_hugepages(runs, lim)),
        ("predict", False, "The cost model: estimated before, checked after, measured",
         lambda: bench_predict(runs)),
    ]
    if what not in ("vm", "all", *(name for name, *_ in sections)):
        sys.exit(f"bench.py: unknown benchmark '{what}' (see the usage at the top of {__file__})")
    build()
    lim = limits()
    out = {"limits": lim}
    print("## Limits of this machine (same run)\n")
    print("| memcpy GB/s | zero scan GB/s | loopback TCP Gbit/s | loopback TCP, memory to memory, Gbit/s |\n"
          "|---|---|---|---|")
    print(f"| {lim['memcpy_gbytes_per_s']} | {lim['zero_scan_gbytes_per_s']} | {lim['loopback_tcp_gbit_per_s']} "
          f"| {lim.get('loopback_tcp_mem_gbit_per_s', 'n/a')} |\n")
    if what in ("vm", "all"):
        rows = bench_vm(runs)
        out["vm"] = rows
        print(f"## VM library (median (min-max) of {runs})\n\n| measure | unit | value |\n|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
        print()
    for name, in_all, title, measure in sections:
        if what == name or (in_all and what == "all"):
            rows = measure()
            out[name.replace("-", "_")] = rows
            print(f"## {title} (median (min-max) of {runs})\n")
            print_table(rows)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
