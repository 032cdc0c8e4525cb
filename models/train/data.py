"""Trace parsing and series construction (models/README.md, "Series").

Two real traces are used (see ../shared/traces/README.md):

* ``apache`` — elastic_apache_logs/apache_logs, Apache combined log format.
  client = the IP field, resource = ``"semicomplete.com" + path`` (query stripped),
  only GET and HEAD requests are kept.
* ``nasa`` — nasa_lpdaac_opendap/logs_for_opendap.txt.gz, ``|&|``-separated, minute-resolution
  local times ``YYYY-MM-DD hh:mmAM/PM`` that are treated as UTC. client = the hashed IP field,
  resource = ``"opendap.lpdaac" + path`` (query stripped). Every line is a request (all status 200).

For each trace: requests are sorted by time, bucketed on ``bucket_start = ts - ts % 900``, the
top 50 resources by request count before the test tail (``val_end`` below; ties broken by
resource name, ascending) are kept and one series per (resource, region) is built over the
trace's full bucket range — from the bucket of the first parsed request of *any* resource to the
bucket of the last one — zeros included.
Series order: resource rank, then region 0, 1.

Splits (per trace, on the bucket range of ``n_buckets`` buckets starting at ``first_bucket``):
``n_train = n_buckets * 70 // 100``, ``n_val = n_buckets * 85 // 100`` (integer arithmetic);
``train_end = first_bucket + n_train * bucket_secs``, ``val_end = first_bucket + n_val * bucket_secs``.
A bucket with start < train_end is train, < val_end validation, else test.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

BUCKET_SECS = 900
N_REGIONS = 2
TOP_RESOURCES = 50
PRIORITY = 5

TRACE_FILES = {
    "apache": "elastic_apache_logs/apache_logs",
    "nasa": "nasa_lpdaac_opendap/logs_for_opendap.txt.gz",
}

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & MASK64
    return h


def region_of(client_id: str) -> int:
    return fnv1a64(client_id.encode("utf-8")) % N_REGIONS


def strip_query(path: str) -> str:
    return path.split("?", 1)[0]


_MONTHS = {m: i for i, m in enumerate(
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], start=1)}

_APACHE_RE = re.compile(r'^(\S+) \S+ \S+ \[([^\]]+)\] "(\S+) (\S+)[^"]*"')
_APACHE_TS_RE = re.compile(r"^(\d{2})/(\w{3})/(\d{4}):(\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})$")


def _apache_ts(s: str) -> int:
    m = _APACHE_TS_RE.match(s)
    if not m:
        raise ValueError(f"bad apache timestamp {s!r}")
    d, mon, y, hh, mm, ss, sign, oh, om = m.groups()
    t = calendar.timegm((int(y), _MONTHS[mon], int(d), int(hh), int(mm), int(ss)))
    off = (int(oh) * 3600 + int(om) * 60) * (1 if sign == "+" else -1)
    return t - off  # local = UTC + offset


def parse_apache(path: str) -> list[tuple[int, str, str]]:
    """Returns (ts, client_id, resource) for GET/HEAD requests."""
    out = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _APACHE_RE.match(line)
            if not m:
                continue
            ip, ts, method, target = m.groups()
            if method not in ("GET", "HEAD"):
                continue
            out.append((_apache_ts(ts), ip, "semicomplete.com" + strip_query(target)))
    return out


_NASA_TS_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2})([AP]M)$")


def _nasa_ts(s: str) -> int:
    m = _NASA_TS_RE.match(s.strip())
    if not m:
        raise ValueError(f"bad nasa timestamp {s!r}")
    y, mo, d, hh, mm, ap = m.groups()
    h = int(hh) % 12 + (12 if ap == "PM" else 0)  # 12AM -> 0, 12PM -> 12
    return calendar.timegm((int(y), int(mo), int(d), h, int(mm), 0))


def parse_nasa(path: str) -> list[tuple[int, str, str]]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("|&|")
            if len(parts) < 9:
                continue
            out.append((_nasa_ts(parts[0]), parts[1], "opendap.lpdaac" + strip_query(parts[6])))
    return out


@dataclass
class Series:
    resource: str
    region: int
    counts: np.ndarray  # int64 [n_buckets]
    priority: int = PRIORITY


@dataclass
class TraceData:
    name: str
    file: str  # relative to the traces directory
    sha256: str
    n_requests: int
    first_bucket: int
    n_buckets: int
    train_end: int
    val_end: int
    series: list[Series] = field(default_factory=list)
    bucket_secs: int = BUCKET_SECS

    def to_json(self) -> dict:
        return {
            "trace": self.name,
            "bucket_secs": self.bucket_secs,
            "first_bucket": self.first_bucket,
            "n_buckets": self.n_buckets,
            "train_end": self.train_end,
            "val_end": self.val_end,
            "series": [
                {"resource": s.resource, "region": s.region, "priority": s.priority,
                 "counts": [int(c) for c in s.counts]}
                for s in self.series
            ],
        }


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_bounds(first_bucket: int, n_buckets: int, bucket_secs: int = BUCKET_SECS) -> tuple[int, int]:
    n_train = n_buckets * 70 // 100
    n_val = n_buckets * 85 // 100
    return first_bucket + n_train * bucket_secs, first_bucket + n_val * bucket_secs


def build_trace(name: str, traces_dir: str, end_fraction: float = 1.0) -> TraceData:
    """With ``end_fraction`` < 1 the trace is cut at ``first + end_fraction * (last - first)``
    (request times) before anything else, so that its splits and series are those the pipeline
    would have built had the log ended there: one fold of a rolling-origin evaluation."""
    if not 0.0 < end_fraction <= 1.0:
        raise ValueError(f"end_fraction must be in (0, 1], got {end_fraction}")
    rel = TRACE_FILES[name]
    path = os.path.join(traces_dir, rel)
    reqs = parse_apache(path) if name == "apache" else parse_nasa(path)
    if not reqs:
        raise RuntimeError(f"no requests parsed from {path}")
    reqs.sort(key=lambda r: r[0])  # stable: ties keep file order
    if end_fraction < 1.0:
        cut = reqs[0][0] + end_fraction * (reqs[-1][0] - reqs[0][0])
        reqs = [r for r in reqs if r[0] <= cut]
    b = BUCKET_SECS
    first_bucket = reqs[0][0] - reqs[0][0] % b
    last_bucket = reqs[-1][0] - reqs[-1][0] % b
    n_buckets = (last_bucket - first_bucket) // b + 1

    # The resources are ranked on the requests before the test tail only: ranking on the whole
    # trace would pick the series by how popular they turn out to be in the held-out part.
    train_end, val_end = split_bounds(first_bucket, n_buckets)
    totals: dict[str, int] = {}
    for ts, _, res in reqs:
        if ts - ts % b >= val_end:
            break
        totals[res] = totals.get(res, 0) + 1
    top = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_RESOURCES]
    rank = {res: i for i, (res, _) in enumerate(top)}

    counts = np.zeros((len(top), N_REGIONS, n_buckets), dtype=np.int64)
    region_cache: dict[str, int] = {}
    for ts, client, res in reqs:
        i = rank.get(res)
        if i is None:
            continue
        r = region_cache.get(client)
        if r is None:
            r = region_cache[client] = region_of(client)
        counts[i, r, (ts - ts % b - first_bucket) // b] += 1

    series = [Series(res, r, counts[i, r]) for res, i in rank.items() for r in range(N_REGIONS)]
    return TraceData(name=name, file=rel, sha256=sha256_file(path), n_requests=len(reqs),
                     first_bucket=first_bucket, n_buckets=n_buckets, train_end=train_end,
                     val_end=val_end, series=series)


def write_dataset(td: TraceData, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"dataset-{td.name}.json")
    with open(out, "w") as f:
        json.dump(td.to_json(), f, separators=(",", ":"))
    return out


if __name__ == "__main__":  # quick summary
    import sys

    d = sys.argv[1] if len(sys.argv) > 1 else "../shared/traces"
    for n in TRACE_FILES:
        td = build_trace(n, d)
        tot = sum(int(s.counts.sum()) for s in td.series)
        print(n, td.n_requests, "requests;", td.n_buckets, "buckets from", td.first_bucket,
              "; top-50 requests", tot, "; train_end", td.train_end, "val_end", td.val_end)
