"""Offline cache-policy baselines with libCacheSim on the real traces (issue 6, "End-to-end proof").

For each trace (see traces.py for how requests, keys, sizes and regions are derived):

* W = working set = sum of the sizes of the distinct keys.
* cache sizes s = 1%, 5%, 10% of W (bytes; objects occupy their size).
* policies: LRU, S3-FIFO, SIEVE, SLRU (segmented LRU, the family of the edges' foyer memory
  tier), W-TinyLFU, GDSF, LRB, GLCache (online) and Belady, BeladySize
  (offline, with future knowledge). libCacheSim's ``Belady`` evicts the object whose next request
  is furthest away; with variable object sizes that is the classic offline bound but not a proven
  optimum (exact byte-optimal caching with sizes is NP-hard), so ``BeladySize`` (size-aware
  variant) is run too and the "offline best" reported is the lower of the two.
* topologies: ``whole`` = one cache of size s over the whole sequence; ``per_region`` = the
  sequence split by region (eu/us) into two caches of s/2 each, misses summed (the live layout:
  one edge per region).
* the compulsory-miss floor: the first request of each key (per cache) misses whatever the policy.

Every simulation runs in its own single-threaded subprocess (OMP_NUM_THREADS=1, niced), so a policy
that aborts inside libCacheSim or exceeds ``--time-limit`` is recorded as such instead of ending
the run. Requests are fed to libCacheSim one by one (``cache.get(req)``) with the next-access
index set for the offline policies; byte counts use the true (64-bit) sizes.

Outputs ``bench/results/offline-<trace>.json`` and ``bench/results/byte-miss-<trace>.svg``.
``--live PATH`` (default ``bench/results/replay-<trace>.json`` if present) adds the live
replayer's points (``{"runs":[{"mode", "cache_bytes_per_region", "byte_miss_ratio", ...}]}``) to
the plot; ``--plot-only`` redraws the plot from an existing offline JSON without simulating.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(REPO, "bench", "results")

FRACTIONS = (0.01, 0.05, 0.10)
# (label in reports, libcachesim class name, online?)
POLICIES = [
    ("LRU", "LRU", True),
    ("S3-FIFO", "S3FIFO", True),
    ("SIEVE", "Sieve", True),
    ("SLRU", "SLRU", True),
    ("W-TinyLFU", "WTinyLFU", True),
    ("GDSF", "GDSF", True),
    ("LRB", "LRB", True),
    ("GLCache", "GLCache", True),
    ("Belady", "Belady", False),
    ("BeladySize", "BeladySize", False),
]
TOPOLOGIES = ("whole", "per_region")
INT64_MAX = (1 << 63) - 1


# --------------------------------------------------------------------------------------------
# sequences
# --------------------------------------------------------------------------------------------
def build_arrays(name: str, traces_dir: str, out_path: str) -> dict:
    """Parse a trace (traces.py) and store compact arrays in out_path (outside the repo)."""
    import numpy as np

    import traces

    tr = traces.load(name, traces_dir)
    ids: dict[str, int] = {}
    key_id = np.empty(len(tr), dtype=np.int64)
    for i, k in enumerate(tr.keys):
        key_id[i] = ids.setdefault(k, len(ids) + 1)
    np.savez(out_path, ts=np.asarray(tr.ts, dtype=np.int64), key=key_id,
             size=np.asarray(tr.sizes, dtype=np.int64), region=np.asarray(tr.regions, dtype=np.int8))
    info = traces.summary(tr)
    info["file"] = traces.TRACE_FILES[name]
    return info


def next_access(keys: list[int]) -> list[int]:
    """Index of the next request for the same key in this sequence, INT64_MAX if none."""
    nxt = [INT64_MAX] * len(keys)
    last: dict[int, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        k = keys[i]
        nxt[i] = last.get(k, INT64_MAX)
        last[k] = i
    return nxt


def floors(key, size, region) -> dict:
    """Compulsory misses: first request of each key in each cache."""
    out = {}
    total_b = int(size.sum())
    n = len(key)
    for topo in TOPOLOGIES:
        groups = [slice(None)] if topo == "whole" else [region == 0, region == 1]
        miss_req = miss_b = 0
        for g in groups:
            seen: dict[int, int] = {}
            for k, s in zip(key[g].tolist(), size[g].tolist()):
                if k not in seen:
                    seen[k] = s
            miss_req += len(seen)
            miss_b += sum(seen.values())
        out[topo] = {"miss_ratio": miss_req / n, "byte_miss_ratio": miss_b / total_b,
                     "n_miss": miss_req, "bytes_miss": miss_b}
    return out


def oversize_floors(key, size, region, W: int) -> list[dict]:
    """A tighter floor per cache size: compulsory misses plus every request for an object larger
    than the cache it goes to (no demand-fetch cache can hold it)."""
    total_b = int(size.sum())
    n = len(key)
    out = []
    for topo in TOPOLOGIES:
        groups = [slice(None)] if topo == "whole" else [region == 0, region == 1]
        for f in FRACTIONS:
            cap = int(f * W) if topo == "whole" else int(f * W) // 2
            miss_req = miss_b = 0
            for g in groups:
                seen: set[int] = set()
                for k, s in zip(key[g].tolist(), size[g].tolist()):
                    if k not in seen or s > cap:
                        miss_req += 1
                        miss_b += s
                    seen.add(k)
            out.append({"topology": topo, "fraction": f, "capacity_bytes": cap,
                        "miss_ratio": miss_req / n, "byte_miss_ratio": miss_b / total_b})
    return out


# --------------------------------------------------------------------------------------------
# worker: one policy, one cache size, one topology (run in a subprocess)
# --------------------------------------------------------------------------------------------
def _simulate_one(cls_name: str, cache_bytes: int, ts, key, size) -> dict:
    import libcachesim as lcs

    cache = getattr(lcs, cls_name)(int(cache_bytes))
    keys = key.tolist()
    sizes = size.tolist()
    times = ts.tolist()
    nxt = next_access(keys)
    req = lcs.Request()
    req.op = lcs.ReqOp.OP_GET
    n_hit = b_hit = 0
    get = cache.get
    for i in range(len(keys)):
        s = sizes[i]
        req.obj_id = keys[i]
        req.obj_size = s if s > 0 else 1  # 0-byte objects occupy 1 byte in the simulator
        req.clock_time = times[i]
        req.next_access_vtime = nxt[i]
        if get(req):
            n_hit += 1
            b_hit += s
    n = len(keys)
    b = sum(sizes)
    return {"n_req": n, "n_miss": n - n_hit, "bytes_req": b, "bytes_miss": b - b_hit}


def worker(args) -> None:
    import numpy as np

    try:
        os.nice(10)
    except OSError:
        pass
    d = np.load(args.npz)
    ts, key, size, region = d["ts"], d["key"], d["size"], d["region"]
    t0 = time.time()
    if args.topology == "whole":
        parts = [_simulate_one(args.cls, args.cache_bytes, ts, key, size)]
    else:
        parts = []
        for g in (0, 1):
            m = region == g
            parts.append(_simulate_one(args.cls, args.cache_bytes, ts[m], key[m], size[m]))
    res = {k: sum(p[k] for p in parts) for k in ("n_req", "n_miss", "bytes_req", "bytes_miss")}
    if args.topology == "per_region":
        res["regions"] = parts
    res["seconds"] = round(time.time() - t0, 2)
    print("RESULT " + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def run_cell(npz: str, cls: str, cache_bytes: int, topology: str, limit: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "_worker", "--npz", npz, "--cls", cls,
           "--cache-bytes", str(cache_bytes), "--topology", topology]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"exceeded the {limit:.0f} s time limit", "seconds": round(time.time() - t0, 1)}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["status"] = "ok"
            r["miss_ratio"] = r["n_miss"] / r["n_req"]
            r["byte_miss_ratio"] = r["bytes_miss"] / r["bytes_req"]
            return r
    err = (p.stderr.strip().splitlines() or ["(no output)"])[-3:]
    kind = "unavailable" if "ImportError" in p.stderr or "AttributeError" in p.stderr else "crashed"
    return {"status": kind, "error": f"exit code {p.returncode}: " + " | ".join(e.strip() for e in err)[-600:],
            "seconds": round(time.time() - t0, 1)}


def offline_best(results: list[dict], topo: str, frac: float) -> dict | None:
    cands = [r for r in results if r["topology"] == topo and r["fraction"] == frac
             and r["policy"] in ("Belady", "BeladySize") and r["status"] == "ok"]
    return min(cands, key=lambda r: r["byte_miss_ratio"]) if cands else None


def gaps(results: list[dict]) -> list[dict]:
    out = []
    for topo in TOPOLOGIES:
        for f in FRACTIONS:
            lru = next((r for r in results if r["topology"] == topo and r["fraction"] == f
                        and r["policy"] == "LRU" and r["status"] == "ok"), None)
            best = offline_best(results, topo, f)
            if not lru or not best:
                continue
            online = [r for r in results if r["topology"] == topo and r["fraction"] == f
                      and r["status"] == "ok" and r["policy"] not in ("Belady", "BeladySize")]
            bo = min(online, key=lambda r: r["byte_miss_ratio"])
            gap = lru["byte_miss_ratio"] - best["byte_miss_ratio"]
            out.append({
                "topology": topo, "fraction": f,
                "lru_byte_miss_ratio": lru["byte_miss_ratio"],
                "offline_best_policy": best["policy"], "offline_best_byte_miss_ratio": best["byte_miss_ratio"],
                "lru_to_offline_gap": gap,
                "half_gap_target_byte_miss_ratio": lru["byte_miss_ratio"] - gap / 2,
                "best_online_policy": bo["policy"], "best_online_byte_miss_ratio": bo["byte_miss_ratio"],
            })
    return out


def simulate_trace(name: str, args) -> dict:
    import libcachesim
    import numpy as np

    tmp = args.workdir or tempfile.mkdtemp(prefix="shadowcdn-offline-")
    os.makedirs(tmp, exist_ok=True)
    npz = os.path.join(tmp, f"{name}.npz")
    t0 = time.time()
    info = build_arrays(name, args.traces, npz)
    print(f"[{name}] parsed {info['requests']} requests, {info['distinct_keys']} keys, "
          f"W = {info['working_set_bytes']:,} B in {time.time() - t0:.1f} s", flush=True)
    d = np.load(npz)
    W = int(d["size"][np.unique(d["key"], return_index=True)[1]].sum())
    assert W == info["working_set_bytes"]
    out = {
        "trace": name,
        "source": info.pop("file"),
        "libcachesim_version": getattr(libcachesim, "__version__", "?"),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "bench/offline/simulate.py"] + sys.argv[1:]),
        "time_limit_seconds_per_run": args.time_limit,
        "summary": info,
        "working_set_bytes": W,
        "regions": ["eu", "us"],
        "sizes": [{"fraction": f, "cache_bytes": int(f * W), "cache_bytes_per_region": int(f * W) // 2}
                  for f in FRACTIONS],
        "compulsory_floor": floors(d["key"], d["size"], d["region"]),
        "compulsory_plus_oversize_floor": oversize_floors(d["key"], d["size"], d["region"], W),
        "notes": [
            "whole = one cache of cache_bytes over the whole sequence; per_region = one cache of "
            "cache_bytes_per_region per region (eu/us), misses summed.",
            "Belady = libCacheSim Belady (evict furthest next request); BeladySize = its size-aware "
            "variant. With variable sizes neither is a proven optimum; offline_best = the lower.",
            "compulsory_plus_oversize_floor adds every request for an object larger than the cache it "
            "goes to (capacity_bytes): a bound for any demand-fetch cache of that size.",
            "0-byte objects (apache keys never logged with a byte count) occupy 1 byte in the simulator; "
            "byte ratios use the true sizes.",
        ],
        "results": [],
    }
    policies = [p for p in POLICIES if not args.policies or p[0] in args.policies or p[1] in args.policies]
    for label, cls, online in policies:
        for topo in TOPOLOGIES:
            for sz in out["sizes"]:
                cb = sz["cache_bytes"] if topo == "whole" else sz["cache_bytes_per_region"]
                r = run_cell(npz, cls, cb, topo, args.time_limit)
                row = {"policy": label, "libcachesim_class": cls, "online": online, "topology": topo,
                       "fraction": sz["fraction"], "cache_bytes": sz["cache_bytes"],
                       "cache_bytes_per_region": sz["cache_bytes_per_region"], **r}
                out["results"].append(row)
                if r["status"] == "ok":
                    msg = f"byte miss {r['byte_miss_ratio']:.4f}  miss {r['miss_ratio']:.4f}"
                else:
                    msg = f"{r['status'].upper()}: {r['error'][:200]}"
                print(f"[{name}] {label:10s} {topo:10s} {sz['fraction']:>5.0%}  {msg}  ({r['seconds']} s)", flush=True)
    out["gaps"] = gaps(out["results"])
    out["not_run"] = sorted({f"{r['policy']} ({r['topology']}, {r['fraction']:.0%}): {r['status']}: {r.get('error', '')}"
                             for r in out["results"] if r["status"] != "ok"})
    out["elapsed_seconds"] = round(time.time() - t0, 1)
    if not args.workdir:
        os.remove(npz)
        os.rmdir(tmp)
    return out


# --------------------------------------------------------------------------------------------
# plot (hand-written SVG)
# --------------------------------------------------------------------------------------------
COLORS = {"LRU": "#d62728", "S3-FIFO": "#1f77b4", "SIEVE": "#2ca02c", "W-TinyLFU": "#9467bd",
          "GDSF": "#8c564b", "SLRU": "#bc8f3f", "LRB": "#e377c2", "GLCache": "#17becf", "Belady": "#000000",
          "BeladySize": "#555555", "floor": "#7f7f7f"}
LIVE_COLORS = {"plain": "#ff7f0e", "peer": "#17becf", "lstm": "#bcbd22", "baseline": "#393b79"}


def load_live(path: str | None) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            runs = json.load(f).get("runs", [])
    except (OSError, ValueError, AttributeError):
        print(f"warning: could not read live report {path}; plotting without it", file=sys.stderr)
        return []
    return [r for r in runs if isinstance(r, dict) and "byte_miss_ratio" in r and "cache_bytes_per_region" in r]


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def plot_svg(off: dict, live: list[dict], path: str) -> None:
    W = off["working_set_bytes"]
    pw, ph, ml, mt, mb, gapx = 420, 300, 60, 50, 50, 40
    legend_w = 200
    width = ml + 2 * pw + gapx + 20 + legend_w
    height = mt + ph + mb
    xs = [0.005, 0.2]  # log x range: 0.5% .. 20% of W
    ymax = 1.0

    def X(panel: int, frac: float) -> float:
        f = min(max(frac, xs[0]), xs[1])
        x0 = ml + panel * (pw + gapx)
        return x0 + (math.log(f) - math.log(xs[0])) / (math.log(xs[1]) - math.log(xs[0])) * pw

    def Y(v: float) -> float:
        return mt + ph - min(max(v, 0.0), ymax) / ymax * ph

    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
          f'font-family="sans-serif" font-size="11">',
          f'<rect width="{width}" height="{height}" fill="white"/>',
          f'<text x="{ml}" y="18" font-size="14" font-weight="bold">{_esc(off["trace"])}: byte miss ratio vs cache size '
          f'(W = {W / 1e9:.3g} GB, libCacheSim {off["libcachesim_version"]})</text>']
    titles = {"whole": "one cache of size s", "per_region": "per region: 2 caches of s/2 (live layout)"}
    for p, topo in enumerate(TOPOLOGIES):
        x0 = ml + p * (pw + gapx)
        el.append(f'<rect x="{x0}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
        el.append(f'<text x="{x0 + pw / 2}" y="{mt - 8}" text-anchor="middle" font-size="12">{titles[topo]}</text>')
        for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
            el.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{Y(t)}" y2="{Y(t)}" stroke="#ddd"/>')
            el.append(f'<text x="{x0 - 4}" y="{Y(t) + 4}" text-anchor="end">{t:.1f}</text>')
        for f in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2):
            el.append(f'<line x1="{X(p, f)}" x2="{X(p, f)}" y1="{mt}" y2="{mt + ph}" stroke="#eee"/>')
            el.append(f'<text x="{X(p, f)}" y="{mt + ph + 14}" text-anchor="middle">{f * 100:g}%</text>')
        el.append(f'<text x="{x0 + pw / 2}" y="{mt + ph + 32}" text-anchor="middle">total cache size (% of working set W)</text>')
        # floor
        fl = off["compulsory_floor"][topo]["byte_miss_ratio"]
        el.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{Y(fl)}" y2="{Y(fl)}" stroke="{COLORS["floor"]}" '
                  f'stroke-dasharray="2,3" stroke-width="1.5"/>')
        ov = sorted((x["fraction"], x["byte_miss_ratio"]) for x in off.get("compulsory_plus_oversize_floor", [])
                    if x["topology"] == topo)
        if ov:
            el.append(f'<polyline fill="none" stroke="#bbbbbb" stroke-width="5" stroke-opacity="0.6" points="'
                      + " ".join(f"{X(p, f):.1f},{Y(v):.1f}" for f, v in ov) + '"/>')
        for label, _, online in POLICIES:
            pts = sorted((r["fraction"], r["byte_miss_ratio"]) for r in off["results"]
                         if r["policy"] == label and r["topology"] == topo and r["status"] == "ok")
            if not pts:
                continue
            c = COLORS[label]
            dash = '' if online else ' stroke-dasharray="6,3"'
            sw = 3.5 if label == "LRU" else 1.6  # LRB can coincide with LRU (untrained LRB runs LRU)
            el.append(f'<polyline fill="none" stroke="{c}" stroke-width="{sw}"{dash} points="'
                      + " ".join(f"{X(p, f):.1f},{Y(v):.1f}" for f, v in pts) + '"/>')
            for f, v in pts:
                el.append(f'<circle cx="{X(p, f):.1f}" cy="{Y(v):.1f}" r="2.5" fill="{c}"/>')
        if topo == "per_region":
            for mode in sorted({r.get("mode", "?") for r in live}):
                # A run with scaled-down objects (size_divisor) has scaled-down caches too: its
                # size as a share of the working set is of the scaled set.
                pts = sorted((2 * r["cache_bytes_per_region"] * r.get("size_divisor", 1) / W,
                              r["byte_miss_ratio"]) for r in live if r.get("mode", "?") == mode)
                c = LIVE_COLORS.get(mode, "#ff00ff")
                el.append(f'<polyline fill="none" stroke="{c}" stroke-width="2.2" points="'
                          + " ".join(f"{X(p, f):.1f},{Y(v):.1f}" for f, v in pts) + '"/>')
                for f, v in pts:
                    el.append(f'<rect x="{X(p, f) - 4:.1f}" y="{Y(v) - 4:.1f}" width="8" height="8" fill="{c}"/>')
    el.append(f'<text transform="translate(16,{mt + ph / 2}) rotate(-90)" text-anchor="middle">byte miss ratio</text>')
    # legend
    lx, ly = ml + 2 * pw + gapx + 20, mt + 5
    items = [(lab, COLORS[lab], "solid" if on else "dash") for lab, _, on in POLICIES
             if any(r["policy"] == lab and r["status"] == "ok" for r in off["results"])]
    items.append(("compulsory floor", COLORS["floor"], "dot"))
    if off.get("compulsory_plus_oversize_floor"):
        items.append(("floor incl. objects > cache", "#bbbbbb", "wide"))
    for mode in sorted({r.get("mode", "?") for r in live}):
        items.append((f"live: {mode}", LIVE_COLORS.get(mode, "#ff00ff"), "live"))
    missing = [lab for lab, _, _ in POLICIES if not any(r["policy"] == lab and r["status"] == "ok" for r in off["results"])]
    for i, (lab, c, style) in enumerate(items):
        y = ly + i * 17
        if style == "live":
            el.append(f'<rect x="{lx + 9}" y="{y - 4}" width="8" height="8" fill="{c}"/>')
        else:
            d = {"solid": "", "dash": ' stroke-dasharray="6,3"', "dot": ' stroke-dasharray="2,3"',
                 "wide": ' stroke-opacity="0.6"'}[style]
            w = 5 if style == "wide" else 2
            el.append(f'<line x1="{lx}" x2="{lx + 26}" y1="{y}" y2="{y}" stroke="{c}" stroke-width="{w}"{d}/>')
        el.append(f'<text x="{lx + 32}" y="{y + 4}">{_esc(lab)}</text>')
    y = ly + len(items) * 17 + 6
    if missing:
        el.append(f'<text x="{lx}" y="{y}" fill="#a00">not run/failed: {_esc(", ".join(missing))}</text>')
        y += 15
    if not live:
        el.append(f'<text x="{lx}" y="{y}" fill="#666">live replay: no report yet</text>')
    el.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(el) + "\n")


# --------------------------------------------------------------------------------------------
def markdown(off: dict) -> str:
    """Tables for bench/RESULTS.md: rows = policies, columns = byte / request miss ratio per size."""
    fr = FRACTIONS
    lines = []
    for topo in TOPOLOGIES:
        title = "one cache of size s" if topo == "whole" else "per region: 2 caches of s/2, misses summed"
        lines.append(f"{off['trace']}, {title} (byte miss ratio | request miss ratio):\n")
        lines.append("| policy | " + " | ".join(f"byte {f:.0%}" for f in fr) + " | "
                     + " | ".join(f"req {f:.0%}" for f in fr) + " |")
        lines.append("| --- |" + " ---: |" * (2 * len(fr)))
        for label, _, _ in POLICIES:
            cells_b, cells_r = [], []
            for f in fr:
                r = next((x for x in off["results"] if x["policy"] == label and x["topology"] == topo
                          and x["fraction"] == f), None)
                if r is None:
                    cells_b.append("not run"); cells_r.append("not run")
                elif r["status"] != "ok":
                    cells_b.append(r["status"]); cells_r.append(r["status"])
                else:
                    cells_b.append(f"{r['byte_miss_ratio']:.4f}"); cells_r.append(f"{r['miss_ratio']:.4f}")
            lines.append(f"| {label} | " + " | ".join(cells_b) + " | " + " | ".join(cells_r) + " |")
        fl = off["compulsory_floor"][topo]
        lines.append("| compulsory floor | " + " | ".join([f"{fl['byte_miss_ratio']:.4f}"] * len(fr)) + " | "
                     + " | ".join([f"{fl['miss_ratio']:.4f}"] * len(fr)) + " |")
        ov = [x for x in off.get("compulsory_plus_oversize_floor", []) if x["topology"] == topo]
        if ov:
            lines.append("| floor incl. objects > cache | " + " | ".join(f"{x['byte_miss_ratio']:.4f}" for x in ov)
                         + " | " + " | ".join(f"{x['miss_ratio']:.4f}" for x in ov) + " |")
        g = [x for x in off.get("gaps", []) if x["topology"] == topo]
        if g:
            lines.append("| LRU − offline best (gap) | " + " | ".join(
                f"{x['lru_to_offline_gap']:.4f}" for x in g) + " |" + " |" * len(fr))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        ap = argparse.ArgumentParser()
        ap.add_argument("_worker")
        ap.add_argument("--npz", required=True)
        ap.add_argument("--cls", required=True)
        ap.add_argument("--cache-bytes", type=int, required=True)
        ap.add_argument("--topology", choices=TOPOLOGIES, required=True)
        worker(ap.parse_args())
        return
    sys.path.insert(0, HERE)
    import traces

    ap = argparse.ArgumentParser(description="libCacheSim offline baselines (see module docstring)")
    ap.add_argument("traces_to_run", nargs="*", default=["apache", "nasa"], metavar="TRACE",
                    help="apache and/or nasa (default both)")
    ap.add_argument("--traces", default=traces.DEFAULT_TRACES, help="directory of ../shared/traces")
    ap.add_argument("--out", default=RESULTS, help="output directory (bench/results)")
    ap.add_argument("--policies", nargs="*", help="subset of policies (labels or class names)")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per simulation run (default 600)")
    ap.add_argument("--live", help="live replay report to add to the plot "
                    "(default bench/results/replay-<trace>.json if it exists)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the existing offline JSON")
    ap.add_argument("--markdown", action="store_true", help="also print the RESULTS.md tables")
    ap.add_argument("--workdir", help="keep the parsed arrays here (default: a temp dir, removed; never the repo)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.traces_to_run:
        if name not in traces.TRACE_FILES:
            ap.error(f"unknown trace {name!r}")
        jpath = os.path.join(args.out, f"offline-{name}.json")
        if args.plot_only:
            with open(jpath) as f:
                off = json.load(f)
        else:
            off = simulate_trace(name, args)
            with open(jpath, "w") as f:
                json.dump(off, f, indent=1)
                f.write("\n")
            print(f"[{name}] wrote {jpath} ({off['elapsed_seconds']} s)", flush=True)
        live_path = (args.live.replace("<trace>", name) if args.live
                     else os.path.join(args.out, f"replay-{name}.json"))
        live = load_live(live_path)
        spath = os.path.join(args.out, f"byte-miss-{name}.svg")
        plot_svg(off, live, spath)
        print(f"[{name}] wrote {spath}" + (f" with {len(live)} live points from {live_path}" if live else ""), flush=True)
        if args.markdown:
            print(markdown(off))


if __name__ == "__main__":
    main()
