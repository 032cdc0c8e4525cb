"""Per-request sequences of the two real traces, as the live trace replayer will see them.

Each trace becomes a list of requests ``(ts, key, size, region)``, sorted by ``ts`` (stable: ties
keep file order), built with the parsing rules of ``models/train/data.py`` (imported, not
copied: its regexes, timestamp parsers, ``strip_query`` and ``region_of`` are used as they are):

* ``apache`` — elastic_apache_logs/apache_logs (Apache combined log). Only GET and HEAD
  requests; every status is kept (200, 304, 404, ... all reach the edge). key =
  ``"semicomplete.com" + path`` without the query string; client = the IP field.
  Size: the logged byte count. A ``-`` (some 304s) counts as "unknown"; every key then gets ONE
  size for the whole trace = the largest byte count logged for that key anywhere in the trace
  (so a ``-`` request takes the object's largest size seen elsewhere), or 0 if the key is never
  logged with a byte count.
* ``nasa`` — nasa_lpdaac_opendap/logs_for_opendap.txt.gz (``|&|``-separated). Every line is a
  request (all status 200). key = ``"opendap.lpdaac" + path`` without the query; client = the
  hashed IP field; time = the minute-resolution ``YYYY-MM-DD hh:mmAM/PM`` field, treated as UTC.
  Size: the bytes field; every key gets the largest size seen for it.

region = fnv1a64(client) % 2 (FNV-1a 64-bit over the client's UTF-8 bytes): 0 = "eu", 1 = "us".

The traces are read from ../shared/traces/ (``--traces`` / ``SHADOWCDN_TRACES``) and never
copied into the repository.

CLI: ``python traces.py [--traces DIR]`` prints a summary of both sequences.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "models", "train"))

import data as _data  # noqa: E402  models/train/data.py: parsing rules shared with training

REGION_NAMES = ("eu", "us")
# "<trace>-heldout": the forecaster's held-out test tail of <trace> (what the live replay's
# HELD_OUT=1 sends), from the same file.
HELD_OUT_SUFFIX = "-heldout"
TRACE_FILES = {**_data.TRACE_FILES, "nasa" + HELD_OUT_SUFFIX: _data.TRACE_FILES["nasa"]}
DEFAULT_TRACES = os.environ.get("SHADOWCDN_TRACES", os.path.join(os.path.dirname(REPO), "shared", "traces"))

# After data.py's request-line match: `` <status> <bytes>`` (bytes may be ``-``).
_APACHE_TAIL_RE = re.compile(r" (\d{3}|-) (\d+|-)")

fnv1a64 = _data.fnv1a64
region_of = _data.region_of


@dataclass
class Trace:
    name: str
    ts: list[int]        # unix seconds, sorted ascending
    keys: list[str]      # key per request
    sizes: list[int]     # size per request (= the key's single size)
    regions: list[int]   # 0 = eu, 1 = us
    clients: list[str]
    n_unknown_size: int = 0      # requests whose own line had no byte count
    n_zero_size_keys: int = 0    # keys never logged with a byte count (size 0)

    def __len__(self) -> int:
        return len(self.ts)

    def key_sizes(self) -> dict[str, int]:
        return dict(zip(self.keys, self.sizes))

    def working_set_bytes(self) -> int:
        return sum(self.key_sizes().values())


def _finish(name: str, raw: list[tuple[int, str, str, int | None]]) -> Trace:
    """raw: (ts, client, key, size or None) in file order -> sorted Trace with max size per key."""
    best: dict[str, int | None] = {}
    for _, _, key, size in raw:
        cur = best.get(key)
        if size is not None and (cur is None or size > cur):
            best[key] = size
        elif key not in best:
            best[key] = None
    raw.sort(key=lambda r: r[0])  # stable: ties keep file order (as data.build_trace does)
    region_cache: dict[str, int] = {}
    ts, keys, sizes, regions, clients = [], [], [], [], []
    for t, client, key, _ in raw:
        r = region_cache.get(client)
        if r is None:
            r = region_cache[client] = region_of(client)
        ts.append(t)
        keys.append(key)
        sizes.append(best[key] or 0)
        regions.append(r)
        clients.append(client)
    return Trace(name=name, ts=ts, keys=keys, sizes=sizes, regions=regions, clients=clients,
                 n_unknown_size=sum(1 for r in raw if r[3] is None),
                 n_zero_size_keys=sum(1 for v in best.values() if not v))


def parse_apache(path: str) -> Trace:
    raw: list[tuple[int, str, str, int | None]] = []
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _data._APACHE_RE.match(line)
            if not m:
                continue
            ip, ts, method, target = m.groups()
            if method not in ("GET", "HEAD"):
                continue
            tail = _APACHE_TAIL_RE.match(line, m.end())
            size = int(tail.group(2)) if tail and tail.group(2) != "-" else None
            raw.append((_data._apache_ts(ts), ip, "semicomplete.com" + _data.strip_query(target), size))
    return _finish("apache", raw)


def parse_nasa(path: str) -> Trace:
    raw: list[tuple[int, str, str, int | None]] = []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("|&|")
            if len(parts) < 9:
                continue
            b = parts[8].strip()
            size = int(b) if b.isdigit() else None
            raw.append((_data._nasa_ts(parts[0]), parts[1], "opendap.lpdaac" + _data.strip_query(parts[6]), size))
    return _finish("nasa", raw)


def held_out(tr: Trace) -> Trace:
    """The requests of the forecaster's test split (models/train/data.py split_bounds on its
    15-minute buckets), in order, with the sizes the whole trace gives each key."""
    b = _data.BUCKET_SECS
    first_bucket = tr.ts[0] - tr.ts[0] % b
    n_buckets = (tr.ts[-1] - tr.ts[-1] % b - first_bucket) // b + 1
    _, test_start = _data.split_bounds(first_bucket, n_buckets)
    keep = [i for i, t in enumerate(tr.ts) if t >= test_start]
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    return Trace(name=tr.name + HELD_OUT_SUFFIX, ts=pick(tr.ts), keys=pick(tr.keys),
                 sizes=pick(tr.sizes), regions=pick(tr.regions), clients=pick(tr.clients))


def load(name: str, traces_dir: str = DEFAULT_TRACES) -> Trace:
    if name.endswith(HELD_OUT_SUFFIX):
        return held_out(load(name[: -len(HELD_OUT_SUFFIX)], traces_dir))
    path = os.path.join(traces_dir, TRACE_FILES[name])
    return parse_apache(path) if name == "apache" else parse_nasa(path)


def check_against_training(tr: Trace, traces_dir: str = DEFAULT_TRACES) -> None:
    """The (ts, client, key) sequence must equal models/train/data.py's, sorted the same way."""
    path = os.path.join(traces_dir, TRACE_FILES[tr.name])
    ref = _data.parse_apache(path) if tr.name == "apache" else _data.parse_nasa(path)
    ref.sort(key=lambda r: r[0])
    if len(ref) != len(tr):
        raise AssertionError(f"{tr.name}: {len(tr)} requests, data.py has {len(ref)}")
    for i, (t, c, k) in enumerate(ref):
        if (t, c, k) != (tr.ts[i], tr.clients[i], tr.keys[i]):
            raise AssertionError(f"{tr.name}: request {i} differs from data.py: {(t, c, k)}")


def summary(tr: Trace) -> dict:
    n_keys = len(set(tr.keys))
    per_region = [sum(1 for r in tr.regions if r == g) for g in range(2)]
    return {
        "requests": len(tr),
        "distinct_keys": n_keys,
        "working_set_bytes": tr.working_set_bytes(),
        "requested_bytes": sum(tr.sizes),
        "first_ts": tr.ts[0],
        "last_ts": tr.ts[-1],
        "requests_per_region": dict(zip(REGION_NAMES, per_region)),
        "distinct_clients": len(set(tr.clients)),
        "requests_without_byte_count": tr.n_unknown_size,
        "keys_with_size_0": tr.n_zero_size_keys,
        "max_object_bytes": max(tr.sizes),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default=DEFAULT_TRACES)
    ap.add_argument("--check", action="store_true", help="compare with models/train/data.py")
    a = ap.parse_args()
    for n in TRACE_FILES:
        t = load(n, a.traces)
        if a.check and not n.endswith(HELD_OUT_SUFFIX):
            check_against_training(t, a.traces)
        print(n, summary(t))
