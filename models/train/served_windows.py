"""silent_windows.py restricted to the windows with a request in the 32-bucket input — the only ones the
LSTM answers behind the planner's silent-window guard: calibration of p_any on the Apache test tail, top-50
vs all long-tail series, hourly windows, for each model given.

    models/train/.venv/bin/python models/train/served_windows.py MODEL.onnx [MODEL.onnx ...]
(traces from $SHADOWCDN_TRACES, default ../shared/traces)
"""
import os, sys
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data, features as F
import onnxruntime as ort
data.TOP_RESOURCES = 10**9
td = data.build_trace("apache", os.environ.get("SHADOWCDN_TRACES", os.path.join(HERE, "../../../shared/traces")))
totals = {}
for s in td.series: totals[s.resource] = totals.get(s.resource, 0) + int(s.counts.sum())
rank = {r: i for i, (r, _) in enumerate(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])))}
W, H = F.W, F.H
for mp in sys.argv[1:]:
    sess = ort.InferenceSession(mp)
    res = {"top": [], "tail": []}
    for s in td.series:
        c = s.counts; n = len(c)
        vi = (td.val_end - td.first_bucket) // F.BUCKET_SECS
        ends = np.arange(max(W, vi), n - H + 1, 4)
        if len(ends) == 0: continue
        csum = np.concatenate([[0], np.cumsum(c)])
        ends = ends[(csum[ends] - csum[ends - W]) > 0]
        if len(ends) == 0: continue
        x = F.series_windows_features(c, td.first_bucket, ends)
        p = sess.run(None, {"counts": x[:, :, 0], "context": x[:, -1, 1:]})[1][:, 0]
        y = np.array([F.target(c, e) for e in ends]) >= 1
        res["top" if rank[s.resource] < 50 else "tail"].append((p, y))
    print(mp)
    for g, rows in res.items():
        p = np.concatenate([r[0] for r in rows]); y = np.concatenate([r[1] for r in rows])
        print(f" {g}: windows {len(p)} mean p_any {p.mean():.3f} freq {y.mean():.3f} brier {np.mean((p-y)**2):.3f}",
              " ".join(f"p>={lo}: n={int((p>=lo).sum())} realised {y[p>=lo].mean():.3f};" for lo in (0.5, 0.8, 0.9, 0.95) if (p>=lo).any()))
