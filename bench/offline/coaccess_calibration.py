#!/usr/bin/env python3
"""How well co-access's follow probabilities are calibrated on a trace.

Replays the trace's requests in order through a model of the broker's co-access learner
(broker/src/signals/coaccess.rs, default `[signals.coaccess]`: window 30 s, counts halved every
hour and forgotten below 0.5, P(B follows A) = (transitions + a) / (requests of A + a + b), the
rule of succession at a = b = 1, a leader trusted from 3 requests, at most 8 recent requests
per client). At each request of A (its start, where the broker now triggers), every follower
with P >= 0.6 (the precision floor a co-access shadow is held to) is a prediction, scored by two
outcomes: the same client asked for B within the window (what P claims), and anyone in the
region asked for B within the default shadow TTL (one hour: what a shadow needs to be used);
also split by whether B was asked in the region in the hour before (then likely held, and an
order moves nothing).
Regions and order as the replayer (traces.py).

With --calibrate K the model also holds P to the learner's own outcomes, as the broker does
since session 33 (broker/src/signals/calibration.rs, K = 10 there): every follower offered at
raw P >= 0.5 is scored by whether the same client asks for it within the window, per band of
0.1, and P becomes (followed + K * P) / (decided + K) of its band, the band's counts fading
by 0.5^(1/6) per hour. The model decides an offer at the client's next request past the
window (or hourly) where the broker decides it twice the window after the offer, and it leaves
out the broker's limits on offers waiting (16 per client, a byte budget: past them offers are
not scored) and the offers of leaders whose start was not queued (not scored); none of these
change which offers come true.

    bench/offline/.venv/bin/python bench/offline/coaccess_calibration.py apache [--prior A B] [--calibrate K]
"""
from __future__ import annotations

import argparse
import bisect
import os
import sys
from collections import defaultdict, deque

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import traces  # noqa: E402

WINDOW = 30
HALF_LIFE = 3600
SUPPORT = 3.0
FLOOR = 0.6
RECENT = 8
TTL = 3600
# The calibration's counts decay six times slower than the pairs'.
CAL_DECAY = 0.5 ** (1 / 6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", choices=["apache", "nasa"])
    ap.add_argument("--prior", nargs=2, type=float, default=(1.0, 1.0), metavar=("A", "B"))
    ap.add_argument("--calibrate", type=float, default=0.0, metavar="K",
                    help="model the learner's own calibration: each raw P >= 0.5 offered at a "
                    "leader's start is scored by whether the same client asks for the follower "
                    "within the window, per band of 0.1, and P becomes (followed + K*P) / "
                    "(scored + K) of its band (0 = off)")
    args = ap.parse_args()
    K = args.calibrate
    # band -> [decided, followed], decayed with the learner's counts' calibration half-life
    cal: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    pending: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
    a, b = args.prior
    tr = traces.load(args.trace)
    n = len(tr.ts)
    by_client: dict[str, list[int]] = defaultdict(list)
    by_key_region: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i in range(n):
        by_client[tr.clients[i]].append(i)
        by_key_region[(tr.keys[i], tr.regions[i])].append(tr.ts[i])
    place = {i: j for idx in by_client.values() for j, i in enumerate(idx)}

    counts: dict[tuple[int, str], float] = defaultdict(float)
    pairs: dict[tuple[int, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    recent: dict[str, deque] = defaultdict(deque)
    last_decay = None
    # by P band: predictions, same client within the window, anyone in the region within TTL
    bands: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    for i in range(n):
        ts, key, region, client = tr.ts[i], tr.keys[i], tr.regions[i], tr.clients[i]
        if last_decay is None:
            last_decay = ts
        while ts >= last_decay + HALF_LIFE:
            last_decay += HALF_LIFE
            # Offers of clients gone quiet are decided (not followed) hourly, as in the broker.
            for offers in pending.values():
                for f in [f for f, (_, t0) in offers.items() if ts - t0 > WINDOW]:
                    cal[offers[f][0]][0] += 1.0
                    del offers[f]
            for row in cal.values():
                row[0] *= CAL_DECAY
                row[1] *= CAL_DECAY
            for k in [k for k, c in counts.items() if c * 0.5 < 0.5]:
                del counts[k]
            for k in counts:
                counts[k] *= 0.5
            for leader, followers in list(pairs.items()):
                for f in [f for f, c in followers.items() if c * 0.5 < 0.5]:
                    del followers[f]
                for f in followers:
                    followers[f] *= 0.5
                if not followers:
                    del pairs[leader]
        # The client's earlier offers: one for this key was followed; those past the window not.
        mine_pending = pending[client]
        if key in mine_pending and ts - mine_pending[key][1] <= WINDOW:
            cal[mine_pending[key][0]][0] += 1.0
            cal[mine_pending[key][0]][1] += 1.0
            del mine_pending[key]
        for f in [f for f, (_, t0) in mine_pending.items() if ts - t0 > WINDOW]:
            cal[mine_pending[f][0]][0] += 1.0
            del mine_pending[f]
        leader = (region, key)
        seen = counts.get(leader, 0.0)
        if seen >= SUPPORT:
            for follower, t in pairs.get(leader, {}).items():
                p = (t + a) / (seen + a + b)
                if K and p >= 0.5:
                    band_i = min(int(p * 10), 9)
                    if follower not in pending[client]:
                        pending[client][follower] = (band_i, ts)
                    scored, followed = cal[band_i]
                    p = (followed + K * p) / (scored + K)
                if p < FLOOR:
                    continue
                mine = by_client[client]
                same = any(
                    tr.keys[mine[j]] == follower
                    for j in range(place[i] + 1, len(mine))
                    if tr.ts[mine[j]] - ts <= WINDOW
                )
                times = by_key_region.get((follower, region), [])
                at = bisect.bisect_right(times, ts)
                anyone = at < len(times) and times[at] - ts <= TTL
                band = "0.6-0.7" if p < 0.7 else "0.7-0.8" if p < 0.8 else "0.8-1.0"
                # Asked in the region within the hour before: likely held, an order moves nothing.
                recent_ask = at > 0 and ts - times[at - 1] <= TTL
                held = "held (asked in the region in the hour before)" if recent_ask else "not held"
                for name in (band, "all", held):
                    row = bands[name]
                    row[0] += 1
                    row[1] += same
                    row[2] += anyone
                    row[3] += p
        # Learn as the broker does: every distinct key the client asked within the window
        # since its own last request for this key leads to it.
        q = recent[client]
        led: set[str] = set()
        for prev, t in reversed(q):
            if ts - t > WINDOW:
                continue
            if prev == key:
                break
            if prev in led:
                continue
            led.add(prev)
            pairs[(region, prev)][key] += 1.0
        q.append((key, ts))
        if len(q) > RECENT:
            q.popleft()
        counts[leader] += 1.0

    print(f"{args.trace}: prior a={a:g} b={b:g}, calibration K={K:g}, predictions with P >= {FLOOR}")
    if K:
        for band_i in sorted(cal):
            scored, followed = cal[band_i]
            print(f"  band {band_i / 10:.1f}: scored {scored:.1f} (decayed), followed {followed / max(scored, 1e-9):.3f}")
    print("| P band | predictions | mean P | same client within 30 s | anyone in region within 1 h |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in ("0.6-0.7", "0.7-0.8", "0.8-1.0", "all", "held (asked in the region in the hour before)", "not held"):
        k, same, anyone, ps = bands.get(name, [0, 0, 0, 0.0])
        if k:
            print(f"| {name} | {k:,} | {ps / k:.3f} | {same / k:.3f} | {anyone / k:.3f} |")
        else:
            print(f"| {name} | 0 | – | – | – |")


if __name__ == "__main__":
    main()
