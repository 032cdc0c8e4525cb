#!/usr/bin/env python3
"""How well the baselines' P(any request in the next hour) is calibrated, as the broker's planner
forecasts them on a broker that starts with the trace, and what the online calibration makes of it.

The planner forecasts every (resource, region) series with a request in the last week, after each
complete 15-minute bucket, from a week of history padded with zero buckets before the broker
started (broker/src/planner.rs). Two baselines (models/src/baseline.rs):

* seasonal naive: P = the share of the last 7 days with a request in the same hour-long slot;
* EWMA (alpha 0.3 over the buckets): P = 1 - exp(-4 * level).

A forecast made after bucket L came true if the series had a request in buckets L+1..L+4.

With --calibrate the forecasts also go, in time order, through a model of the planner's online
calibration (models/src/calibration.rs): per forecaster and kind of series (asked in the hour
before the forecast, or quiet), bands of P a tenth wide; a forecast is scored once its horizon
has passed; each band starts from its own P counted as 10 forecasts and fades by half every 96
buckets the curve scores in (a gap counting at most 4); the bands' shares are made
non-decreasing by pooling adjacent violators (weighted), and a P is interpolated between the
bands' mean P (above the highest, on the line to (1, 1)). Both baselines' forecasts of every
series are scored, as the planner scores every forecaster whichever answered. The tables then
show the calibrated P's bands against what came true. (The live planner forecasts once per
tick, not after every bucket: the replay's tick is one trace hour, so it scores a quarter of
these forecasts.)

Regions and order as the replayer (traces.py).

    bench/offline/.venv/bin/python bench/offline/forecast_calibration.py apache [--calibrate]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter, defaultdict, deque

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import traces  # noqa: E402

BUCKET = 900
HORIZON = 4
DAY = 86_400 // BUCKET
HISTORY = 7 * DAY
ALPHA = 0.3
BANDS = 10
PRIOR = 10.0
HALF_LIFE = 96.0


def band(p: float) -> int:
    return min(int(max(0.0, min(1.0, p)) * BANDS), BANDS - 1)


def pool(ys: list[float], ws: list[float]) -> list[float]:
    """Weighted pool-adjacent-violators: the non-decreasing fit of ys."""
    blocks: list[list[float]] = []
    for y, w in zip(ys, ws):
        blocks.append([y, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            y2, w2, n2 = blocks.pop()
            y1, w1, n1 = blocks.pop()
            blocks.append([(y1 * w1 + y2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for y, _, n in blocks:
        out += [y] * int(n)
    return out


class Curve:
    """One forecaster's bands, as models/src/calibration.rs keeps them."""

    def __init__(self) -> None:
        self.n = [0.0] * BANDS
        self.p_sum = [0.0] * BANDS
        self.came = [0.0] * BANDS
        self.clock: int | None = None

    def advance(self, at: int) -> None:
        """Fade by the buckets since the last one scored in, a gap counting at most HORIZON."""
        steps = 0 if self.clock is None else min(max(at - self.clock, 0), HORIZON)
        self.clock = at if self.clock is None else max(self.clock, at)
        keep = 0.5 ** (steps / HALF_LIFE)
        for b in range(BANDS):
            self.n[b] *= keep
            self.p_sum[b] *= keep
            self.came[b] *= keep

    def score(self, p: float, came: bool, at: int) -> None:
        self.advance(at)
        b = band(p)
        self.n[b] += 1
        self.p_sum[b] += p
        self.came[b] += came

    def map(self, p: float) -> float:
        xs, ys, ws = [], [], []
        for b in range(BANDS):
            centre = (b + 0.5) / BANDS
            w = self.n[b] + PRIOR
            xs.append((self.p_sum[b] + PRIOR * centre) / w)
            ys.append((self.came[b] + PRIOR * centre) / w)
            ws.append(w)
        ys = pool(ys, ws)
        i = next((i for i, x in enumerate(xs) if x >= p), None)
        if i == 0:
            y = ys[0] + (p - xs[0])
        elif i is None:
            y = ys[-1] + (p - xs[-1]) * (1 - ys[-1]) / max(1 - xs[-1], 1e-12)
        else:
            t = (p - xs[i - 1]) / max(xs[i] - xs[i - 1], 1e-12)
            y = ys[i - 1] + t * (ys[i] - ys[i - 1])
        return max(0.0, min(1.0, y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", choices=["apache", "nasa-heldout"])
    ap.add_argument("--calibrate", action="store_true")
    args = ap.parse_args()
    tr = traces.load(args.trace)
    t0 = tr.ts[0] - tr.ts[0] % BUCKET
    n_buckets = (tr.ts[-1] - t0) // BUCKET + 1
    series: dict[tuple[str, int], Counter] = defaultdict(Counter)
    for t, k, r in zip(tr.ts, tr.keys, tr.regions):
        series[(k, r)][(t - t0) // BUCKET] += 1
    # The series forecast after each bucket: those with a request in the last week.
    due: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for s, c in series.items():
        active = set()
        for b in c:
            active.update(range(b, min(b + HISTORY, n_buckets - HORIZON)))
        for last in active:
            due[last].append(s)
    ewma_level: dict[tuple[str, int], tuple[int, float]] = {}
    names = ("seasonal_naive", "ewma")
    kinds = [(f, asked) for f in names for asked in (True, False)]
    curves = {k: Curve() for k in kinds}
    waiting: deque[tuple[int, tuple[str, bool], float, bool]] = deque()
    raw = {k: [[0, 0, 0.0] for _ in range(BANDS)] for k in kinds}
    cal = {k: [[0, 0, 0.0] for _ in range(BANDS)] for k in kinds}
    for last in range(n_buckets - HORIZON):
        while waiting and waiting[0][0] + HORIZON <= last:
            _, f, p, came = waiting.popleft()
            curves[f].score(p, came, last)
        for s in due.get(last, ()):
            c = series[s]
            came = any(c.get(last + j, 0) for j in range(1, HORIZON + 1))
            asked = any(c.get(last - j, 0) for j in range(HORIZON))
            days = sum(
                1 for k in range(1, 8)
                if any(c.get(last + 1 - k * DAY + j, 0) for j in range(HORIZON))
            )
            # EWMA over the padded history: zero buckets decay the level.
            prev_at, level = ewma_level.get(s, (last - 1, 0.0))
            level *= (1 - ALPHA) ** max(0, last - prev_at - 1)
            level = ALPHA * c.get(last, 0) + (1 - ALPHA) * level
            ewma_level[s] = (last, level)
            for f, p in (("seasonal_naive", days / 7), ("ewma", 1 - math.exp(-HORIZON * level))):
                f = (f, asked)
                row = raw[f][band(p)]
                row[0] += 1
                row[1] += came
                row[2] += p
                if args.calibrate:
                    q = curves[f].map(p)
                    row = cal[f][band(q)]
                    row[0] += 1
                    row[1] += came
                    row[2] += q
                    waiting.append((last, f, p, came))
    tables = [("forecast", raw)] + ([("calibrated", cal)] if args.calibrate else [])
    print(f"{args.trace}: {len(series)} series, {n_buckets} buckets of {BUCKET} s")
    print("| forecaster | last hour | P | band | forecasts | mean P | came true |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for what, t in tables:
        for (f, asked), rows in t.items():
            for b, (n, came, p_sum) in enumerate(rows):
                if n:
                    print(f"| {f} | {'asked' if asked else 'quiet'} | {what} | {b / BANDS:.1f} | {n:,} "
                          f"| {p_sum / n:.3f} | {came / n:.3f} |")
    for what, t in tables:
        for (f, asked), rows in t.items():
            n = sum(r[0] for b, r in enumerate(rows) if b >= 6)
            came = sum(r[1] for b, r in enumerate(rows) if b >= 6)
            share = f"{came / n:.3f}" if n else "-"
            print(f"{f} ({'asked' if asked else 'quiet'}) {what}: P >= 0.6 for {n:,} forecasts, came true {share}")


if __name__ == "__main__":
    main()
