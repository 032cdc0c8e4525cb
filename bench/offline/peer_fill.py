#!/usr/bin/env python3
"""Headroom for shadowing via peer fill: origin bytes a two-region cluster could save if a
region's misses were served from the other region's edge instead of the origin.

Same request sequence and regions as the live replayer and simulate.py (traces.py: requests in
time order, one size per key, region = fnv1a64(client) % 2); run it with bench/offline/.venv
(traces.py imports models/train/data.py, which needs numpy).

1. Unbounded caches: the per-region compulsory floor (first request of each key in each region)
   vs the global compulsory floor (first request of each key anywhere). The difference is every
   region's first request for an object the other region requested earlier: with a peer fill
   (a shadow filled from the peer ahead of that request, or a demand miss fetched from the peer)
   it costs no origin bytes. Also: how long after the other region's last request it arrives
   (a shadow must be placed, and the peer must still hold a fresh copy, in that interval).
2. The live layout at 1/5/10% of the working set W: one LRU cache of s/2 per region
   (objects above `--admit` × cache not cached: 1.0 = what libCacheSim's caches admit,
   0.25 = the live edges' max_object_size), simulated request by request. Every miss whose
   object the other region's cache holds at that moment could be a peer fill; reported
   separately for a region's first request of the key and for later misses, and as the byte
   miss ratio LRU would have with peer fill.

    bench/offline/.venv/bin/python bench/offline/peer_fill.py [apache|nasa] [--json bench/results/peer-fill-apache.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import traces  # noqa: E402

FRACTIONS = (0.01, 0.05, 0.10)


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def unbounded(tr) -> dict:
    total_b = sum(tr.sizes)
    seen_any: set[str] = set()
    seen_reg: set[tuple[str, int]] = set()
    last_req: dict[tuple[str, int], int] = {}
    glob_n = glob_b = reg_n = reg_b = 0
    gaps: list[int] = []
    for ts, k, s, r in zip(tr.ts, tr.keys, tr.sizes, tr.regions):
        if k not in seen_any:
            seen_any.add(k)
            glob_n += 1
            glob_b += s
        if (k, r) not in seen_reg:
            seen_reg.add((k, r))
            reg_n += 1
            reg_b += s
            other = last_req.get((k, 1 - r))
            if other is not None:
                gaps.append(ts - other)
        last_req[(k, r)] = ts
    peer_n, peer_b = reg_n - glob_n, reg_b - glob_b
    assert peer_n == len(gaps)
    return {
        "requests": len(tr), "requested_bytes": total_b, "keys": len(seen_any),
        "global_compulsory": {"requests": glob_n, "bytes": glob_b, "byte_miss_ratio": glob_b / total_b},
        "per_region_compulsory": {"requests": reg_n, "bytes": reg_b, "byte_miss_ratio": reg_b / total_b},
        "peer_fillable_first_requests": {
            "requests": peer_n, "bytes": peer_b, "share_of_requested_bytes": peer_b / total_b,
            "share_of_per_region_compulsory_bytes": peer_b / reg_b if reg_b else 0.0,
            "gap_since_other_region_secs": {
                "p10": quantile(gaps, 0.1), "p50": quantile(gaps, 0.5), "p90": quantile(gaps, 0.9),
                "within_1h": sum(g <= 3600 for g in gaps) / len(gaps) if gaps else 0.0,
                "within_24h": sum(g <= 86400 for g in gaps) / len(gaps) if gaps else 0.0,
            },
        },
    }


class Lru:
    def __init__(self, capacity: int, max_object: int):
        self.cap, self.max_obj, self.used = capacity, max_object, 0
        self.d: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, k: str) -> bool:
        return k in self.d

    def get(self, k: str) -> bool:
        if k in self.d:
            self.d.move_to_end(k)
            return True
        return False

    def put(self, k: str, size: int) -> None:
        size = max(size, 1)  # as libCacheSim: a 0-byte object occupies 1 byte
        if size > self.max_obj:
            return
        while self.used + size > self.cap and self.d:
            _, s = self.d.popitem(last=False)
            self.used -= s
        self.d[k] = size
        self.used += size


def bounded(tr, frac: float, admit: float) -> dict:
    W = tr.working_set_bytes()
    cap = int(frac * W) // 2
    caches = [Lru(cap, int(cap * admit)), Lru(cap, int(cap * admit))]
    total_b = sum(tr.sizes)
    miss_b = oversize_b = 0
    first_peer_n = first_peer_b = later_peer_n = later_peer_b = 0
    seen_reg: set[tuple[str, int]] = set()
    for k, s, r in zip(tr.keys, tr.sizes, tr.regions):
        first = (k, r) not in seen_reg
        seen_reg.add((k, r))
        if max(s, 1) > caches[r].max_obj:
            oversize_b += s  # never cached: no demand fill, shadow or peer copy can serve it
        if caches[r].get(k):
            continue
        miss_b += s
        if k in caches[1 - r]:  # the peer holds it now: a peer fill instead of the origin
            if first:
                first_peer_n += 1
                first_peer_b += s
            else:
                later_peer_n += 1
                later_peer_b += s
        caches[r].put(k, s)
    return {
        "fraction": frac, "cache_bytes_per_region": cap, "admit_max_object_bytes": int(cap * admit),
        "lru_byte_miss_ratio": miss_b / total_b,
        "uncacheable_share_of_requested_bytes": oversize_b / total_b,
        "peer_first_requests": {"requests": first_peer_n, "bytes": first_peer_b,
                                "share_of_requested_bytes": first_peer_b / total_b},
        "peer_later_misses": {"requests": later_peer_n, "bytes": later_peer_b,
                              "share_of_requested_bytes": later_peer_b / total_b},
        "lru_with_peer_first_byte_miss_ratio": (miss_b - first_peer_b) / total_b,
        "lru_with_peer_all_byte_miss_ratio": (miss_b - first_peer_b - later_peer_b) / total_b,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", nargs="?", default="apache", choices=sorted(traces.TRACE_FILES))
    ap.add_argument("--traces", default=traces.DEFAULT_TRACES)
    ap.add_argument("--json", help="write the numbers here too")
    a = ap.parse_args()
    tr = traces.load(a.trace, a.traces)
    out = {"trace": a.trace, "working_set_bytes": tr.working_set_bytes(), "unbounded": unbounded(tr),
           "bounded": [bounded(tr, f, adm) for adm in (1.0, 0.25) for f in FRACTIONS]}
    u = out["unbounded"]
    p = u["peer_fillable_first_requests"]
    print(f"{a.trace}: {u['requests']} requests, {u['requested_bytes'] / 1e6:.1f} MB requested, "
          f"{u['keys']} keys, W = {out['working_set_bytes'] / 1e6:.1f} MB")
    print(f"  compulsory floor global {u['global_compulsory']['byte_miss_ratio']:.4f} "
          f"({u['global_compulsory']['requests']} req, {u['global_compulsory']['bytes'] / 1e6:.1f} MB), "
          f"per region {u['per_region_compulsory']['byte_miss_ratio']:.4f} "
          f"({u['per_region_compulsory']['requests']} req, {u['per_region_compulsory']['bytes'] / 1e6:.1f} MB)")
    g = p["gap_since_other_region_secs"]
    print(f"  peer-fillable first requests: {p['requests']} req, {p['bytes'] / 1e6:.1f} MB = "
          f"{p['share_of_requested_bytes']:.4f} of requested bytes, "
          f"{p['share_of_per_region_compulsory_bytes']:.3f} of per-region compulsory bytes; gap since the other "
          f"region's last request p10/p50/p90 {g['p10'] / 3600:.2f}/{g['p50'] / 3600:.2f}/{g['p90'] / 3600:.2f} h, "
          f"{g['within_1h']:.2f} within 1 h, {g['within_24h']:.2f} within 24 h")
    print("  | admit | size | cache/region | uncacheable (> admit) | LRU | peer 1st req (share) | LRU + peer 1st | peer later misses (share) | LRU + peer all |")
    for b in out["bounded"]:
        adm = b["admit_max_object_bytes"] / b["cache_bytes_per_region"]
        print(f"  | {adm:.2f} | {b['fraction'] * 100:g}% | {b['cache_bytes_per_region'] / 1e6:.1f} MB | "
              f"{b['uncacheable_share_of_requested_bytes']:.4f} | "
              f"{b['lru_byte_miss_ratio']:.4f} | {b['peer_first_requests']['requests']} "
              f"({b['peer_first_requests']['share_of_requested_bytes']:.4f}) | "
              f"{b['lru_with_peer_first_byte_miss_ratio']:.4f} | {b['peer_later_misses']['requests']} "
              f"({b['peer_later_misses']['share_of_requested_bytes']:.4f}) | "
              f"{b['lru_with_peer_all_byte_miss_ratio']:.4f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
