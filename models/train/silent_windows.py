"""Calibration of the committed LSTM's p_any on a trace's test tail, top-50 vs long-tail series,
over hourly windows whose 7-day history has at least one request (what the live planner
forecasts), silent input windows included (training drops dead windows).

    models/train/.venv/bin/python models/train/silent_windows.py [TRACES_DIR]
"""
import os, sys
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data, features as F
import onnxruntime as ort
data.TOP_RESOURCES = 10**9
td = data.build_trace("apache", sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../../shared/traces"))
sess = ort.InferenceSession(os.path.join(HERE, "../lstm.onnx"))
totals = {}
for s in td.series:
    totals[s.resource] = totals.get(s.resource, 0) + int(s.counts.sum())
rank = {r: i for i, (r, _) in enumerate(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])))}
W, H = F.W, F.H
res = {"top": [], "tail": []}
for s in td.series:
    c = s.counts
    n = len(c)
    vi = (td.val_end - td.first_bucket) // F.BUCKET_SECS
    ends = np.arange(max(W, vi), n - H + 1, 4)  # test tail, every hour
    ends = ends[ends >= W]
    if len(ends) == 0: continue
    csum = np.concatenate([[0], np.cumsum(c)])
    L = np.minimum(ends, F.max_history())
    hist = csum[ends] - csum[ends - L]
    ends = ends[hist > 0]
    if len(ends) == 0: continue
    x = F.series_windows_features(c, td.first_bucket, ends)
    out = sess.run(None, {"counts": x[:, :, 0], "context": x[:, -1, 1:]})
    p = out[1][:, 0]
    y = np.array([F.target(c, e) for e in ends]) >= 1
    res["top" if rank[s.resource] < 50 else "tail"].append((p, y))
for g, rows in res.items():
    p = np.concatenate([r[0] for r in rows]); y = np.concatenate([r[1] for r in rows])
    print(f"{g}: series {len(rows)} windows {len(p)} mean p_any {p.mean():.3f} freq {y.mean():.3f} brier {np.mean((p-y)**2):.3f}")
    for lo in (0.5, 0.8, 0.9, 0.95):
        m = p >= lo
        if m.any(): print(f"   p>={lo}: n={m.sum()} realized {y[m].mean():.3f}")
