#!/usr/bin/env python3
"""Threshold and net benefit over trace time, from a live replay report (issue 6, plots).

Reads ``bench/results/replay-<trace>.json`` (written by ``bench/replay.sh``: each run has a
``timeline`` of samples of the broker's ``GET /v1/cost`` taken every ``sample_secs`` of trace
time) and writes ``bench/results/timeline-<trace>.svg``: one row per cache size, columns

1. the confidence threshold in force per region (and priority class) — what the cost tuner did;
2. cumulative net benefit (savings − spend, USD) of the settled shadows;
3. cumulative byte precision (shadowed bytes hit before expiry / shadowed bytes) and recall
   (requests that found a shadow first, over those plus every demand miss on the edges).

Only the shadowing modes (``lstm``, ``baseline``) are drawn; ``plain`` has no shadows.
Standard library only (hand-written SVG in the style of ``simulate.py``).

    python3 bench/offline/timeline.py apache            # or: --report PATH --out PATH
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

MODE_COLORS = {"lstm": "#bcbd22", "baseline": "#393b79"}
REGION_DASH = {"eu": "", "us": ' stroke-dasharray="6,3"'}
CLASS_DASH = ["", ' stroke-dasharray="2,2"', ' stroke-dasharray="9,3,2,3"']
MODES = ("baseline", "lstm")


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    t = math.ceil(lo / step) * step
    out = []
    while t <= hi + 1e-12 * abs(hi):
        out.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return out


def fmt_money(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e")


def plot(runs: list[dict], trace: str, path: str) -> None:
    runs = [r for r in runs if r.get("mode") in MODES and r.get("timeline")]
    sizes = sorted({r["cache_bytes_per_region"] for r in runs})
    pw, ph, ml, mt, gx, gy, legend_w = 300, 170, 84, 56, 70, 58, 190
    width = ml + 3 * pw + 2 * gx + 20 + legend_w
    height = mt + max(len(sizes), 1) * (ph + gy) + 10
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
          f'font-family="sans-serif" font-size="11">',
          f'<rect width="{width}" height="{height}" fill="white"/>',
          f'<text x="{ml}" y="18" font-size="14" font-weight="bold">{esc(trace)}: shadowing over trace time '
          f'(live replay, cost ledger sampled every {runs[0]["sample_secs"] / 3600 if runs else 1:g} trace h)</text>']
    if not runs:
        el.append(f'<text x="{ml}" y="{mt + 20}" fill="#a00">no runs with a timeline in the report</text>')
    tmax = max((s["trace_secs"] for r in runs for s in r["timeline"]), default=3600) / 3600
    xticks = nice_ticks(0, tmax, 6)
    tmax = max(tmax, xticks[-1])
    cols = ("confidence threshold (per region, class)", "cumulative net benefit, USD",
            "byte precision (solid), recall (dotted)")
    for row, size in enumerate(sizes):
        rs = sorted((r for r in runs if r["cache_bytes_per_region"] == size), key=lambda r: r["mode"])
        y0 = mt + row * (ph + gy)
        nets = [s["net"] for r in rs for s in r["timeline"]] + [0.0]
        nlo, nhi = min(nets), max(nets)
        pad = 0.08 * ((nhi - nlo) or abs(nhi) or 1e-6)
        nlo, nhi = nlo - pad, nhi + pad
        ranges = [(0.0, 1.0), (nlo, nhi), (0.0, 1.0)]
        for c in range(3):
            x0 = ml + c * (pw + gx)
            lo, hi = ranges[c]

            def X(h: float, x0=x0) -> float:
                return x0 + h / tmax * pw

            def Y(v: float, lo=lo, hi=hi) -> float:
                return y0 + ph - (min(max(v, lo), hi) - lo) / (hi - lo) * ph

            el.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
            if row == 0:
                el.append(f'<text x="{x0 + pw / 2}" y="{y0 - 8}" text-anchor="middle" font-size="12">{esc(cols[c])}</text>')
            if c == 0:
                el.append(f'<text transform="translate(18,{y0 + ph / 2}) rotate(-90)" text-anchor="middle" '
                          f'font-size="12" font-weight="bold">cache {size / 1e6:.1f} MB per region</text>')
            for t in (nice_ticks(lo, hi, 6) if c == 1 else [0, 0.2, 0.4, 0.6, 0.8, 1.0]):
                if lo <= t <= hi:
                    el.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" '
                              f'stroke="{"#999" if c == 1 and t == 0 else "#e4e4e4"}"/>')
                    lab = fmt_money(t) if c == 1 else f"{t:.1f}"
                    el.append(f'<text x="{x0 - 4}" y="{Y(t) + 4:.1f}" text-anchor="end">{lab}</text>')
            for h in xticks:
                el.append(f'<line x1="{X(h):.1f}" x2="{X(h):.1f}" y1="{y0}" y2="{y0 + ph}" stroke="#f0f0f0"/>')
                el.append(f'<text x="{X(h):.1f}" y="{y0 + ph + 14}" text-anchor="middle">{h:g}</text>')
            el.append(f'<text x="{x0 + pw / 2}" y="{y0 + ph + 28}" text-anchor="middle">trace hours</text>')
            if c == 2:
                el.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{Y(0.6):.1f}" y2="{Y(0.6):.1f}" '
                          f'stroke="#d62728" stroke-dasharray="3,3"/>')
                el.append(f'<text x="{x0 + pw - 2}" y="{Y(0.6) - 3:.1f}" text-anchor="end" fill="#d62728">target 0.6</text>')
            for r in rs:
                color = MODE_COLORS.get(r["mode"], "#ff00ff")
                tl = sorted(r["timeline"], key=lambda s: s["trace_secs"])

                def line(pts, dash="", w=1.8):
                    if pts:
                        el.append(f'<polyline fill="none" stroke="{color}" stroke-width="{w}"{dash} points="'
                                  + " ".join(f"{X(h):.1f},{Y(v):.1f}" for h, v in pts) + '"/>')

                if c == 0:
                    keys = sorted({(x["region"], x["class"]) for s in tl for x in s.get("by_region_class", [])
                                   if x.get("threshold") is not None and x["region"] != "-"})
                    classes = sorted({k[1] for k in keys})
                    for reg, cls in keys:
                        pts = [(s["trace_secs"] / 3600, x["threshold"]) for s in tl for x in s["by_region_class"]
                               if (x["region"], x["class"]) == (reg, cls) and x.get("threshold") is not None]
                        dash = REGION_DASH.get(reg, "") if len(classes) == 1 else \
                            CLASS_DASH[classes.index(cls) % 3] if reg == "eu" else REGION_DASH["us"]
                        line(pts, dash)
                elif c == 1:
                    line([(s["trace_secs"] / 3600, s["net"]) for s in tl], w=2.2)
                else:
                    line([(s["trace_secs"] / 3600, s["precision_bytes"]) for s in tl if s["shadows"] > 0], w=2.2)
                    line([(s["trace_secs"] / 3600, s["recall"]) for s in tl], ' stroke-dasharray="2,3"', w=2.2)
    # legend
    lx, ly = ml + 3 * pw + 2 * gx + 20, mt + 5
    items = [(f"{m} (mode)", MODE_COLORS[m], "") for m in MODES if any(r["mode"] == m for r in runs)]
    items += [("threshold: region eu", "#444", REGION_DASH["eu"]), ("threshold: region us", "#444", REGION_DASH["us"]),
              ("recall", "#444", ' stroke-dasharray="2,3"')]
    for i, (lab, c, dash) in enumerate(items):
        y = ly + i * 17
        el.append(f'<line x1="{lx}" x2="{lx + 26}" y1="{y}" y2="{y}" stroke="{c}" stroke-width="2"{dash}/>')
        el.append(f'<text x="{lx + 32}" y="{y + 4}">{esc(lab)}</text>')
    classes = sorted({x["class"] for r in runs for s in r["timeline"] for x in s.get("by_region_class", [])
                      if x["region"] != "-"})
    if classes:
        y = ly + len(items) * 17 + 8
        el.append(f'<text x="{lx}" y="{y}" fill="#666">priority classes: {esc(", ".join(classes))}</text>')
    el.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(el) + "\n")


def sched(r: dict) -> str:
    """Latency from the request's traced time (reports before session 44 lack it)."""
    s = r.get("latency_from_schedule_ms")
    return f"{s['p50']:.1f} / {s['p99']:.1f}" if s else "–"


def markdown(runs: list[dict]) -> str:
    """The replay table of bench/RESULTS.md, one row per (size, mode)."""
    order = {"plain": 0, "peer": 1, "baseline": 2, "lstm": 3}
    rows = ["| cache per region | mode | hit ratio | byte hit ratio | origin bytes | byte miss ratio "
            "| demand peer fills hit / miss / error | shadow hits "
            "| fills origin / peer | shadows settled / used / already held | precision (bytes) | recall | net $ "
            "| threshold at end eu / us | p50 / p99 ms | from schedule p50 / p99 ms | max lag ms |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(runs, key=lambda r: (r["cache_bytes_per_region"], order.get(r["mode"], 9))):
        th = {t["region"]: t["threshold"] for t in r.get("thresholds") or [] if t.get("class") == "normal"}
        ths = " / ".join(f"{th[g]:.2f}" if g in th else "–" for g in ("eu", "us")) if th else "–"
        pf = r.get("demand_peer_fills") or {}
        held = sum(s.get("already_held", 0) or 0 for s in r.get("by_source") or [])
        rows.append(
            f"| {r['cache_bytes_per_region'] / 1e6:.1f} MB | {r['mode']} | {r['hit_ratio']:.3f} | {r['byte_hit_ratio']:.3f} "
            f"| {r['origin_bytes'] / 1e6:.1f} MB | {r['byte_miss_ratio']:.4f} "
            f"| {pf.get('hit', 0):.0f} / {pf.get('miss', 0):.0f} / {pf.get('error', 0):.0f} | {r['shadow_hits']} "
            f"| {r['shadow_fills']['origin']:.0f} / {r['shadow_fills']['peer']:.0f} "
            f"| {r['shadows_settled']} / {r['shadows_used']} / {held} | {r['precision_bytes']:.3f} | {r['recall']:.3f} "
            f"| {r['cost']['net']:.2e} | {ths} | {r['latency_ms']['p50']:.1f} / {r['latency_ms']['p99']:.1f} "
            f"| {sched(r)} | {r['max_lag_ms']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", nargs="?", default="apache")
    ap.add_argument("--report", help="replay report (default bench/results/replay-TRACE.json)")
    ap.add_argument("--out", help="SVG to write (default bench/results/timeline-TRACE.svg)")
    ap.add_argument("--markdown", action="store_true", help="also print the replay table for RESULTS.md")
    args = ap.parse_args()
    report = args.report or f"bench/results/replay-{args.trace}.json"
    out = args.out or f"bench/results/timeline-{args.trace}.svg"
    try:
        with open(report) as f:
            runs = json.load(f).get("runs", [])
    except (OSError, ValueError) as e:
        sys.exit(f"cannot read {report}: {e}")
    with_tl = [r for r in runs if r.get("timeline")]
    if not with_tl:
        print(f"warning: no run in {report} has a timeline (re-run bench/replay.sh)", file=sys.stderr)
    plot(runs, args.trace, out)
    print(f"wrote {os.path.relpath(out)} ({len(with_tl)} runs with a timeline)")
    if args.markdown:
        print(markdown(runs))


if __name__ == "__main__":
    main()
