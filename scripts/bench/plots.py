#!/usr/bin/env python3
"""The benchmark's plots (SVG, no dependencies): runs migrations with `migd run`
over loopback (as bench.py does) and draws

  docs/img/bytes-per-round.svg     bytes sent in each pre-copy round
  docs/img/dirty-rate-per-round.svg  the dirty rate each round measured
  docs/img/fault-latency.svg       post-copy fault latency histogram, with and
                                   without the fault channel

  scripts/bench/plots.py [--out DIR] [--json FILE]   # runs the migrations
  scripts/bench/plots.py --from-json FILE [--out DIR]  # redraws from saved statistics

Each series is one migration (the plot shows a shape, not a median); the
statistics behind them go to --json.
"""
import json, os, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def bar_chart(title, xlabels, series, ylabel, xlabel):
    """Grouped bars: `series` = [(name, [value per x])]. Returns SVG text."""
    w, h, left, right, top, bottom = 860, 360, 70, 20, 40, 60
    pw, ph = w - left - right, h - top - bottom
    ymax = max([v for _, vs in series for v in vs] + [1e-9]) * 1.1
    # A round step for the y axis: 1, 2 or 5 × 10^k, about 5 ticks.
    raw = ymax / 5
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1
    while mag > raw:
        mag /= 10
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{esc(title)}</text>']
    y = 0.0
    while y <= ymax:
        py = top + ph - y / ymax * ph
        out.append(f'<line x1="{left}" y1="{py:.1f}" x2="{left + pw}" y2="{py:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{y:g}</text>')
        y += step
    n, k = len(xlabels), len(series)
    gw = pw / max(n, 1)
    bw = gw * 0.8 / max(k, 1)
    for i, label in enumerate(xlabels):
        gx = left + i * gw
        out.append(f'<text x="{gx + gw / 2:.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="10">{esc(label)}</text>')
        for j, (_, vs) in enumerate(series):
            v = vs[i] if i < len(vs) else 0
            bh = v / ymax * ph
            out.append(f'<rect x="{gx + gw * 0.1 + j * bw:.1f}" y="{top + ph - bh:.1f}" width="{bw:.1f}" '
                       f'height="{bh:.1f}" fill="{COLORS[j % len(COLORS)]}"><title>{esc(v)}</title></rect>')
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 12}" text-anchor="middle">{esc(xlabel)}</text>')
    out.append(f'<text x="16" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + ph / 2})">{esc(ylabel)}</text>')
    lx = left + 10
    for j, (name, _) in enumerate(series):
        out.append(f'<rect x="{lx}" y="{top - 8}" width="10" height="10" fill="{COLORS[j % len(COLORS)]}"/>')
        out.append(f'<text x="{lx + 14}" y="{top + 1}">{esc(name)}</text>')
        lx += 14 + 7 * len(name) + 16
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    bench.check_args(__doc__, valued=("--out", "--json", "--from-json"))
    out_dir = os.path.join(bench.ROOT, "docs", "img")
    if "--out" in sys.argv:
        out_dir = sys.argv[sys.argv.index("--out") + 1]
    os.makedirs(out_dir, exist_ok=True)
    if "--from-json" in sys.argv:
        with open(sys.argv[sys.argv.index("--from-json") + 1]) as f:
            draw(json.load(f), out_dir)
        return
    bench.build()
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        # A set larger than one round can send under the cap: several rounds.
        for i, (tag, wl, extra) in enumerate([
                ("pre-copy, whole pages rewritten", "dirty:512:100", {}),
                ("pre-copy, a word per page rewritten", "sparse:512:100", {}),
                ("the same with XBZRLE (512 MiB)", "sparse:512:100", {"xbzrle_cache": 512 << 20})]):
            runs[tag] = bench.migrate_once(d, f"pre{i}", "1G", wl,
                                           {"mode": "precopy", "max_bandwidth": 256 << 20, **extra}, cpus=1)
        for tag, extra in [("postcopy", {}), ("postcopy, no fault channel", {"fault_channel": False})]:
            runs[tag] = bench.migrate_once(d, "pc" + str(len(runs)), "1G", "dirty:256:0",
                                           {"mode": "postcopy", **extra}, cpus=1)
    for tag, st in runs.items():
        if st["status"] != "completed":
            raise RuntimeError(f"{tag}: {st['status']}: {st.get('error')}")
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(runs, f, indent=1)
    draw(runs, out_dir)


def draw(runs, out_dir):

    pre = [t for t in runs if "pre-copy" in t or "XBZRLE" in t]
    n = max(len(runs[t]["rounds"]) for t in pre)
    rounds = [str(i) for i in range(n)]
    with open(os.path.join(out_dir, "bytes-per-round.svg"), "w") as f:
        f.write(bar_chart("Bytes per pre-copy round (1 GiB guest, 512 MiB set rewritten at 100 MiB/s, cap 256 MiB/s)", rounds,
                          [(t, [r["bytes"] / 2**20 for r in runs[t]["rounds"]]) for t in pre],
                          "MiB", "round"))
    with open(os.path.join(out_dir, "dirty-rate-per-round.svg"), "w") as f:
        f.write(bar_chart("Dirty rate measured in each pre-copy round (same migrations)", rounds,
                          [(t, [r["dirty_rate"] / 2**20 for r in runs[t]["rounds"]]) for t in pre],
                          "MiB/s", "round"))
    post = [t for t in runs if t.startswith("postcopy")]
    nb = max(len(runs[t]["faults"]["histogram_us"]) for t in post)
    labels = [f"{1 << i}" if i < 10 else f"{(1 << i) / 1000:.0f}m" for i in range(nb)]
    with open(os.path.join(out_dir, "fault-latency.svg"), "w") as f:
        f.write(bar_chart("Post-copy fault latency (1 GiB guest, 256 MiB rewritten flat out)", labels,
                          [(t, runs[t]["faults"]["histogram_us"] + [0] * (nb - len(runs[t]["faults"]["histogram_us"])))
                           for t in post],
                          "faults", "latency, µs (m: ms), bucket [2^i, 2^(i+1)) µs"))
    for t, st in runs.items():
        f = st["faults"]
        print(f"{t}: total {st['total_ms']:.0f} ms, downtime {st['downtime_ms']:.1f} ms, "
              f"{st['bytes'] / 2**20:.0f} MiB, rounds {len(st['rounds'])}, "
              f"faults {f['count']} p50 {f['p50_us']} µs p99 {f['p99_us']} µs")
    print(f"plots written to {out_dir}")


if __name__ == "__main__":
    main()
