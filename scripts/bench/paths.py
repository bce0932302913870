"""Network paths for the benchmarks: loopback, or two network namespaces
joined by a veth pair, optionally shaped with tc tbf (netem is not in this
kernel). Root only for the namespaces.

  path = Path.make("veth:1gbit")   # "loopback", "veth", "veth:<rate>"
  ...                               # path.src_ns, path.dst_ns, path.dst_ip
  path.tcp_gbit()                   # TCP throughput over the same path
  path.close()
"""
import json, os, subprocess, time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LIMITS = os.path.join(ROOT, "target", "release", "examples", "limits")
NS = ("migbench-a", "migbench-b")
IPS = ("10.77.0.1", "10.77.0.2")


def sh(*args):
    subprocess.run(args, check=True)


class Path:
    def __init__(self, name, src_ns=None, dst_ns=None, dst_ip="127.0.0.1"):
        self.name, self.src_ns, self.dst_ns, self.dst_ip = name, src_ns, dst_ns, dst_ip

    @staticmethod
    def make(spec):
        if spec == "loopback":
            return Path("loopback")
        kind, _, rate = spec.partition(":")
        if kind != "veth":
            raise SystemExit(f"unknown path '{spec}': use loopback, veth or veth:<rate> (e.g. veth:1gbit)")
        for ns in NS:
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        for ns in NS:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "mbveth0", "netns", NS[0], "type", "veth", "peer", "name", "mbveth1",
           "netns", NS[1])
        for i, ns in enumerate(NS):
            dev = f"mbveth{i}"
            sh("ip", "-n", ns, "addr", "add", f"{IPS[i]}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            if rate:
                # Both directions; a burst of ~2 ms at the rate (tbf needs at
                # least a timer tick's worth at high rates).
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                   "burst", "4mb" if "10g" in rate else "512kb", "latency", "20ms")
        return Path(spec, NS[0], NS[1], IPS[1])

    def prefix(self, side):
        """The command prefix that runs a program on `side` ("src" or "dst")."""
        ns = self.src_ns if side == "src" else self.dst_ns
        return ["ip", "netns", "exec", ns] if ns else []

    def tcp_gbit(self):
        """TCP throughput from the source side to the destination's address (median of 3)."""
        port = 5299
        sink = subprocess.Popen(self.prefix("dst") + [LIMITS, "tcp-sink", f"{self.dst_ip}:{port}"],
                                stdout=subprocess.PIPE, text=True)
        sink.stdout.readline()  # "listening"
        out = subprocess.run(self.prefix("src") + [LIMITS, "tcp-send", f"{self.dst_ip}:{port}"],
                             check=True, capture_output=True, text=True).stdout
        sink.wait(60)

        return json.loads(out)["tcp_gbit_per_s"]

    def close(self):
        if self.src_ns:
            for ns in NS:
                subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
            time.sleep(0.1)
