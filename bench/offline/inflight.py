"""Why the live NASA held-out replay beats libCacheSim's LRU at small caches (issue 6).

Replays the same per-region request sequence as simulate.py (``<trace>-heldout`` by default)
through three byte-weighted caches of the live edges' size (s/2 per region, s = 1/5/10% of the
working set):

* ``LRU`` — plain LRU (matches libCacheSim's LRU exactly, a check of this script);
* ``foyer-Lru`` — foyer 0.22's memory-tier ``Lru`` as the edges run it: new entries go to a
  high-priority list holding 90% of the capacity, whose overflow moves to a low list; eviction
  takes the low list first; a hit moves an entry to the tail of the list it is in;
* ``LRU + in-flight W`` — LRU where an object stays servable for W trace seconds after its miss
  whether or not the cache kept it: what a fill still streaming does on an edge (fills are not
  counted against the cache's capacity), W being how long a fill lasts in trace time.

Usage: bench/offline/.venv/bin/python bench/offline/inflight.py [trace] [--windows S ...]
       [--traces DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import traces  # noqa: E402

FRACTIONS = (0.01, 0.05, 0.10)
WINDOWS = (60, 300, 600)


def lru(cap: int, reqs, window: int = 0) -> tuple[int, int]:
    cache: OrderedDict = OrderedDict()
    used = miss = total = 0
    filling: dict = {}
    for ts, key, size in reqs:
        total += size
        if key in cache:
            cache.move_to_end(key)
            continue
        if ts < filling.get(key, ts):
            continue  # served by the fill still in flight
        miss += size
        filling[key] = ts + window
        if size > cap:
            continue
        cache[key] = size
        used += size
        while used > cap:
            used -= cache.popitem(last=False)[1]
    return miss, total


def foyer_lru(cap: int, reqs, ratio: float = 0.9) -> tuple[int, int]:
    high: OrderedDict = OrderedDict()
    low: OrderedDict = OrderedDict()
    high_used = used = miss = total = 0
    high_cap = int(cap * ratio)
    for _, key, size in reqs:
        total += size
        if key in high:
            high.move_to_end(key)
            continue
        if key in low:
            low.move_to_end(key)
            continue
        miss += size
        if size > cap:
            continue
        high[key] = size
        high_used += size
        used += size
        while high_used > high_cap:
            k, w = high.popitem(last=False)
            high_used -= w
            low[k] = w
        while used > cap:
            if low:
                used -= low.popitem(last=False)[1]
            else:
                w = high.popitem(last=False)[1]
                high_used -= w
                used -= w
    return miss, total


def per_region(policy, tr, cap: int, **kw) -> float:
    miss = total = 0
    for region in (0, 1):
        reqs = [(t, k, s) for t, k, s, r in zip(tr.ts, tr.keys, tr.sizes, tr.regions) if r == region]
        m, t = policy(cap, reqs, **kw)
        miss += m
        total += t
    return miss / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="?", default="nasa-heldout")
    ap.add_argument("--traces", default=traces.DEFAULT_TRACES)
    ap.add_argument("--windows", nargs="*", type=int, default=list(WINDOWS),
                    help="in-flight windows in trace seconds (default 60 300 600)")
    args = ap.parse_args()
    tr = traces.load(args.trace, args.traces)
    ws = tr.working_set_bytes()
    print(f"{args.trace}: {len(tr)} requests, working set {ws} bytes; byte miss ratio, per region")
    head = ["size", "LRU", "foyer-Lru"] + [f"LRU + in-flight {w} s" for w in args.windows]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---:" for _ in head) + " |")
    for frac in FRACTIONS:
        cap = int(ws * frac / 2)
        row = [f"{frac:.0%}", f"{per_region(lru, tr, cap):.4f}", f"{per_region(foyer_lru, tr, cap):.4f}"]
        row += [f"{per_region(lru, tr, cap, window=w):.4f}" for w in args.windows]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
