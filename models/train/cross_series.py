"""Does activity elsewhere on the site announce a NASA series' next hour? Measured on the
VALIDATION split only (the test tail is not read), for the committed model's windows.

A per-(resource, region) forecaster sees only its own series. If a bulk download that reaches
a file first shows up as requests to *other* files — anywhere on the site in that region, or
in the same directory — then site or directory activity would be a feature worth adding to the
model contract. This script asks whether it adds anything beyond the series' own recent counts:

* among windows whose own last hour is silent (the model has nothing of its own to go on),
  is a next-hour request likelier when the site or directory was active in that hour?
* among windows active in their last bucket, does the next hour's count per request of that
  bucket grow with the site's activity?

    models/train/.venv/bin/python models/train/cross_series.py [TRACES_DIR]
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402
import features as fx  # noqa: E402
import train  # noqa: E402


def directory(resource: str) -> str:
    return resource.rsplit("/", 1)[0]


def main() -> None:
    traces = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../../shared/traces")
    td = data.build_trace("nasa", traces)
    n, b, first = td.n_buckets, td.bucket_secs, td.first_bucket
    dirs = {directory(s.resource) for s in td.series}
    site = np.zeros((data.N_REGIONS, n))
    by_dir = {(d, r): np.zeros(n) for d in dirs for r in range(data.N_REGIONS)}
    regions: dict[str, int] = {}
    for ts, client, res in data.parse_nasa(os.path.join(traces, data.TRACE_FILES["nasa"])):
        r = regions.setdefault(client, data.region_of(client))
        k = (ts - ts % b - first) // b
        site[r, k] += 1
        d = by_dir.get((directory(res), r))
        if d is not None:
            d[k] += 1

    w = train.Windows(td)
    idx = np.nonzero(w.mask("val"))[0]
    y = w.y[idx].astype(np.float64)
    end = w.end[idx]
    series = [td.series[s] for s in w.series[idx]]
    own = np.stack([w.counts[w.series[j], w.end[j] - fx.H:w.end[j]] for j in idx])  # last hour
    cold = np.array([w.counts[w.series[j], w.end[j] - fx.W:w.end[j]].sum() == 0 for j in idx])
    last_hour = {
        "site": np.array([site[s.region, e - fx.H:e].sum() for s, e in zip(series, end)]),
        "directory": np.array([by_dir[(directory(s.resource), s.region)][e - fx.H:e].sum()
                               for s, e in zip(series, end)]),
    }
    print(f"NASA validation windows: {len(idx)} (cold starts {cold.sum()}, kept only when y > 0)")
    silent = ~cold & (own.sum(axis=1) == 0)
    print(f"\nwarm windows whose own last hour is silent: {silent.sum()}")
    print("  activity elsewhere in that hour  windows  P(y > 0)  mean y")
    for name, act in last_hour.items():
        for label, m in ((f"{name} active", silent & (act > 0)), (f"{name} silent", silent & (act == 0))):
            print(f"  {label:31s} {m.sum():7d}  {np.mean(y[m] > 0):8.3f}  {y[m].mean():6.2f}")
    print(f"\ncold starts (32 silent buckets; in this dataset only those followed by a request): {cold.sum()}")
    print("  activity elsewhere in the last hour  windows  mean y")
    for name, act in last_hour.items():
        for label, m in ((f"{name} active", cold & (act > 0)), (f"{name} silent", cold & (act == 0))):
            print(f"  {label:35s} {m.sum():7d}  {y[m].mean():6.2f}")
    # Without that selection: every validation window whose 32 buckets are silent, dead or not.
    split = train.bucket_splits(td)
    ends = np.arange(fx.W, n - fx.H + 1)
    ends = ends[split[ends] == 1]
    print("  every silent validation window (a live forecaster cannot tell which will wake):")
    total = {True: [0, 0], False: [0, 0]}
    for si, s in enumerate(td.series):
        cs = np.concatenate([[0], np.cumsum(w.counts[si])])
        silent_w = cs[ends] - cs[ends - fx.W] == 0
        woke = cs[ends + fx.H] - cs[ends] > 0
        site_cs = np.concatenate([[0], np.cumsum(site[s.region])])
        active = site_cs[ends] - site_cs[ends - fx.H] > 0
        for a in (True, False):
            m = silent_w & (active == a)
            total[a][0] += int(m.sum())
            total[a][1] += int((m & woke).sum())
    for a, label in ((True, "site active"), (False, "site silent")):
        k, woke = total[a]
        print(f"    {label:33s} {k:7d}  P(y > 0) = {woke / max(k, 1):.4f}")
    busy = ~cold & (own[:, -1] > 0)
    print(f"\nwarm windows with requests in their last bucket: {busy.sum()}")
    print("  site requests in that bucket  windows  mean y / mean last-bucket count")
    site_last = np.array([site[s.region, e - 1] for s, e in zip(series, end)])
    for lo, hi in ((1, 10), (10, 100), (100, 1000), (1000, np.inf)):
        m = busy & (site_last >= lo) & (site_last < hi)
        if m.sum():
            print(f"  [{lo}, {hi}){'':20s} {m.sum():7d}  {y[m].mean() / own[m, -1].mean():6.2f}")


if __name__ == "__main__":
    main()
