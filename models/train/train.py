"""Train the demand-forecasting LSTM on the real traces and export it (models/README.md).

Usage: python models/train/train.py [TRACES_DIR] [--out models] [--seed 20240531]

Steps:
 1. parse both traces (data.py), write models/build/dataset-<trace>.json for the Rust evaluator;
 2. build windows (W=32, H=4, stride 1, dead windows skipped), split each trace 70/15/15 by the time
    of a window's first target bucket;
 3. train one LSTM on the train windows of both traces together (pinball loss on ln(1+y) for
    q 0.1/0.5/0.9 + BCE for p_any); a small fixed grid of configurations is tried and the best one
    by validation loss (early stopping on the validation split) is kept — the test split is used
    only for the final report;
 4. export ONNX (models/lstm.onnx), check it against torch with onnxruntime, evaluate LSTM (via
    onnxruntime), seasonal naive and EWMA on each trace's test windows;
 5. write models/lstm.json, models/fixtures/features.json and models/MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as tF

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import features as fx  # noqa: E402
from features import H, W, F, QUANTILES  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SPLITS = ("train", "val", "test")
EXPECTED_SHA256 = {  # from ../shared/traces/README.md
    "elastic_apache_logs/apache_logs": "f15c31e905f86c7b4b6ab44aee74d0a2086dce89f010187d983edea7ef0364ef",
    "nasa_lpdaac_opendap/logs_for_opendap.txt.gz": "3974bcbdbf08afedb2a193853b317258a5fd922287701e51e09ec4e10d12fb15",
}
# Configurations tried, in order; the best by validation loss is exported.
GRID = [
    {"hidden": 32, "layers": 1, "lr": 3e-3, "bce_weight": 1.0},
    {"hidden": 64, "layers": 1, "lr": 2e-3, "bce_weight": 1.0},
    {"hidden": 48, "layers": 2, "lr": 2e-3, "bce_weight": 1.0},
]
BATCH = 256
DEV_NOTES = """Besides the grid above, these variants were tried by hand while writing this pipeline (seed 20240531,
hidden 64 unless noted); none improved the validation loss meaningfully, so the grid was kept as is:
trace-balanced loss weights (val loss 0.658), an exponential moving average of the weights with decay 0.995
(0.635), learning rate 1e-3 (0.651), hidden 32 with weight EMA (0.644), and seeds 1 and 2 of the selected
configuration (0.634, 0.645; their 3-seed ensemble did not clearly help either). In the interest of full
disclosure: the test-split metrics of those variants were printed too while diagnosing the Apache p90 (cold-start)
problem described above, but no choice was made on them; the shipped configuration is the one selected on validation
loss in the first run."""
MAX_EPOCHS = 40
PATIENCE = 6


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# Windows


class Windows:
    """All non-dead windows of one trace. `end` is the exclusive end index of the W input buckets
    (targets are end .. end+H-1); the split is that of the first target bucket."""

    def __init__(self, td: data.TraceData):
        self.td = td
        counts = np.stack([s.counts for s in td.series])  # [S, N]
        self.counts = counts
        n = td.n_buckets
        nz = np.concatenate([np.zeros((counts.shape[0], 1), np.int64), np.cumsum(counts > 0, axis=1)], axis=1)
        cs = np.concatenate([np.zeros((counts.shape[0], 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
        ends = np.arange(W, n - H + 1)
        alive = (nz[:, ends + H] - nz[:, ends - W]) > 0  # not dead
        s_idx, e_idx = np.nonzero(alive)
        self.series = s_idx
        self.end = ends[e_idx]
        self.y = cs[s_idx, self.end + H] - cs[s_idx, self.end]
        first_target = td.first_bucket + self.end * td.bucket_secs
        self.split = np.where(first_target < td.train_end, 0, np.where(first_target < td.val_end, 1, 2))
        self._x = None

    def x(self) -> np.ndarray:
        if self._x is None:
            x = np.empty((len(self.end), W, F), dtype=np.float32)
            for s in np.unique(self.series):
                m = self.series == s
                x[m] = fx.series_windows_features(self.counts[s], self.td.first_bucket, self.end[m],
                                                  self.td.series[s].priority, self.td.bucket_secs)
            self._x = x
        return self._x

    def history(self, j: int, max_len: int | None = None) -> np.ndarray:
        e = int(self.end[j])
        L = fx.max_history(self.td.bucket_secs) if max_len is None else max_len
        return self.counts[self.series[j], max(0, e - L):e]

    def last_bucket_start(self, j: int) -> int:
        return self.td.first_bucket + (int(self.end[j]) - 1) * self.td.bucket_secs

    def mask(self, split: str) -> np.ndarray:
        return self.split == SPLITS.index(split)


# ----------------------------------------------------------------------------------------------
# Model


class LSTMForecaster(nn.Module):
    """LSTM over the window; the head predicts ln(1+y) quantiles as
    q50 = base + z0, q10 = q50 - softplus(z1), q90 = q50 + softplus(z2) (non-decreasing by
    construction) and a p_any logit z3. base = ln(1 + H * mean(window counts)), recovered from
    feature 6 (ln(1 + mean)) of the last step — a persistence prior the network corrects."""

    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(F, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, x):
        out, _ = self.lstm(x)
        z = self.head(out[:, -1, :])
        mean = torch.exp(x[:, -1, 6]) - 1.0
        base = torch.log(1.0 + H * mean)
        q50 = base + z[:, 0]
        q10 = q50 - tF.softplus(z[:, 1])
        q90 = q50 + tF.softplus(z[:, 2])
        return torch.stack([q10, q50, q90], dim=1), z[:, 3:4]


class ExportModel(nn.Module):
    """What lstm.onnx computes: quantiles in request counts (expm1, clamped >= 0) and sigmoid p_any."""

    def __init__(self, core: LSTMForecaster):
        super().__init__()
        self.core = core

    def forward(self, window):
        qlog, logit = self.core(window)
        quantiles = torch.clamp(torch.exp(qlog) - 1.0, min=0.0)
        return quantiles, torch.sigmoid(logit)


_QT = torch.tensor(QUANTILES, dtype=torch.float32)


def loss_terms(model, x, y, bce_weight):
    """Per-window loss: sum over quantiles of the pinball loss on ln(1+y), + bce_weight * BCE."""
    qlog, logit = model(x)
    t = torch.log1p(y)[:, None]
    diff = t - qlog
    pin = torch.maximum(_QT * diff, (_QT - 1.0) * diff).sum(dim=1)
    bce = tF.binary_cross_entropy_with_logits(logit[:, 0], (y >= 1).float(), reduction="none")
    return pin + bce_weight * bce


def mean_loss(model, x, y, bce_weight):
    model.eval()
    with torch.no_grad():
        tot = 0.0
        for i in range(0, len(x), 4096):
            tot += float(loss_terms(model, x[i:i + 4096], y[i:i + 4096], bce_weight).sum())
    return tot / max(1, len(x))


def val_loss(model, val_sets, bce_weight):
    """Mean over traces of the per-trace mean validation loss (so each trace counts equally)."""
    return float(np.mean([mean_loss(model, x, y, bce_weight) for x, y in val_sets]))


def train_config(cfg, seed, xtr, ytr, val_sets, deadline):
    torch.manual_seed(seed)
    model = LSTMForecaster(cfg["hidden"], cfg["layers"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, bad = math.inf, None, -1, 0
    history = []
    for epoch in range(MAX_EPOCHS):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        tl = 0.0
        for i in range(0, len(perm), BATCH):
            idx = perm[i:i + BATCH]
            loss = loss_terms(model, xtr[idx], ytr[idx], cfg["bce_weight"]).mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tl += float(loss.detach()) * len(idx)
        vl = val_loss(model, val_sets, cfg["bce_weight"])
        sched.step(vl)
        history.append((epoch, tl / len(perm), vl))
        log(f"    epoch {epoch:2d} train {tl / len(perm):.4f} val {vl:.4f}")
        if vl < best - 1e-5:
            best, best_epoch, bad = vl, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= PATIENCE:
                break
        if time.time() > deadline:
            log("    time budget reached")
            break
    model.load_state_dict(best_state)
    model.eval()
    return model, best, best_epoch, len(history)


# ----------------------------------------------------------------------------------------------
# Evaluation


def baseline_preds(win: Windows, idx: np.ndarray):
    sn_q, sn_p, ew_q, ew_p = [], [], [], []
    for j in idx:
        h = win.history(int(j))
        q, p = fx.seasonal_naive(h, win.td.bucket_secs)
        sn_q.append(q)
        sn_p.append(p)
        q, p = fx.ewma(h)
        ew_q.append(q)
        ew_p.append(p)
    return (np.array(sn_q), np.array(sn_p)), (np.array(ew_q), np.array(ew_p))


def ort_predict(sess, x: np.ndarray):
    qs, ps = [], []
    for i in range(0, len(x), 4096):
        q, p = sess.run(["quantiles", "p_any"], {"window": x[i:i + 4096]})
        qs.append(q)
        ps.append(p)
    return np.concatenate(qs), np.concatenate(ps)[:, 0]


def evaluate(win: Windows, split: str, sess, warm_only: bool = False):
    """Contract metrics on the non-dead windows of `split`. With warm_only, only windows whose 32
    input counts are not all zero (a diagnostic, not the contract metric)."""
    m = win.mask(split)
    if warm_only:
        m = m & (win.x()[:, :, 0].max(axis=1) > 0)
    idx = np.nonzero(m)[0]
    y = win.y[idx].astype(np.float64)
    (snq, snp), (ewq, ewp) = baseline_preds(win, idx)
    lq, lp = ort_predict(sess, win.x()[idx])
    naive_mae = float(np.mean(np.abs(y - snq[:, 1])))
    return {
        "lstm": fx.metrics(y, lq, lp, naive_mae),
        "seasonal_naive": fx.metrics(y, snq, snp, naive_mae),
        "ewma": fx.metrics(y, ewq, ewp, naive_mae),
    }


def fmt_table(metrics_by_trace) -> str:
    rows = ["| trace | model | MAE | MASE | pinball q10 | pinball q50 | pinball q90 | coverage p10–p90 | Brier p_any | windows |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for trace, ms in metrics_by_trace.items():
        for name, m in ms.items():
            p = m["pinball"]
            rows.append(f"| {trace} | {name} | {m['mae']:.4f} | {m['mase']:.4f} | {p['q10']:.4f} | {p['q50']:.4f} | "
                        f"{p['q90']:.4f} | {m['coverage'] * 100:.1f}% | {m['brier']:.4f} | {m['windows']} |")
    return "\n".join(rows)


def targets_check(metrics_by_trace):
    out = {}
    for trace, ms in metrics_by_trace.items():
        l, sn, ew = ms["lstm"], ms["seasonal_naive"], ms["ewma"]
        out[trace] = {
            "mase_le_0.8": l["mase"] <= 0.8,
            "pinball_better_than_both": all(l["pinball"][k] < sn["pinball"][k] and l["pinball"][k] < ew["pinball"][k]
                                            for k in ("q10", "q50", "q90")),
            "coverage_75_85": 0.75 <= l["coverage"] <= 0.85,
        }
    return out


# ----------------------------------------------------------------------------------------------
# Fixtures


def pick(cands: np.ndarray, frac: float) -> int:
    return int(cands[int(len(cands) * frac)])


def make_fixtures(wins: dict, sess) -> list:
    """Test windows: (trace, selection, history length cap, note)."""
    specs = []
    a, n = wins["apache"], wins["nasa"]
    # NASA test window with the full 7-day history (672 buckets): 7 seasonal lags. Chosen so that the
    # interpolated quantile(d, 0.9) exceeds p50 (interpolation visible in p90), then by the number of
    # distinct same-time sums d_k, then y >= 1; first window on ties.
    c = np.nonzero(n.mask("test") & (n.end >= 672))[0]
    P = fx.period_buckets(n.td.bucket_secs)

    def score(j):
        h = n.history(int(j))
        d = [int(h[len(h) - k * P:len(h) - k * P + H].sum()) for k in range(1, 8)]
        return (float(np.quantile(d, 0.9)) > d[0], len(set(d)), bool(n.y[j] >= 1))

    scores = [score(j) for j in c]
    j_full = int(c[max(range(len(c)), key=lambda i: (scores[i], -i))])
    specs.append((n, j_full, None, "nasa test window, full 7-day history (672 buckets, 7 seasonal lags)"))
    # NASA test window with history cut to 200 buckets: 2 seasonal lags.
    c = np.nonzero(n.mask("test") & (n.y >= 1) & (n.end >= 672))[0]
    specs.append((n, pick(c, 0.25), 200, "nasa test window, history truncated to its last 200 buckets (2 seasonal lags)"))
    # Apache test window with all of the trace's history before it (> 3 days: 3 seasonal lags).
    c = np.nonzero(a.mask("test") & (a.y >= 1))[0]
    specs.append((a, pick(c, 0.5), None, "apache test window, all available history (< 7 days)"))
    # Apache test window with history cut below one period (seasonal naive falls back to the last H).
    specs.append((a, pick(c, 0.75), 48, "apache test window, history truncated to its last 48 buckets (< 96: no seasonal lag)"))
    # Apache non-dead test window with y = 0.
    c = np.nonzero(a.mask("test") & (a.y == 0))[0]
    specs.append((a, pick(c, 0.5), None, "apache test window with zero target, all available history"))

    out = []
    for win, j, cap, note in specs:
        hist = win.history(j, cap)
        lbs = win.last_bucket_start(j)
        s = win.td.series[win.series[j]]
        feats = fx.window_features(hist, lbs, s.priority, win.td.bucket_secs)
        assert np.array_equal(feats, win.x()[j]), "vectorised features differ from the reference"
        q, p = sess.run(["quantiles", "p_any"], {"window": feats[None]})
        snq, snp = fx.seasonal_naive(hist, win.td.bucket_secs)
        ewq, ewp = fx.ewma(hist)
        out.append({
            "note": note,
            "trace": win.td.name,
            "resource": s.resource,
            "region": s.region,
            "bucket_secs": win.td.bucket_secs,
            "counts": [int(v) for v in hist],
            "last_bucket_start": lbs,
            "priority": s.priority,
            "y": int(win.y[j]),
            "features": [[float(v) for v in row] for row in feats],
            "quantiles": [float(v) for v in q[0]],
            "p_any": float(p[0, 0]),
            "seasonal_naive": {"quantiles": list(snq), "p_any": snp},
            "ewma": {"quantiles": list(ewq), "p_any": ewp},
        })
    return out


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", nargs="?", default=os.path.join(REPO, "..", "shared", "traces"))
    ap.add_argument("--out", default=os.path.join(REPO, "models"))
    ap.add_argument("--seed", type=int, default=20240531)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SHADOWCDN_TRAIN_THREADS", "1")))
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds for the whole training grid")
    args = ap.parse_args()
    t_start = time.time()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    np.random.seed(args.seed)
    traces_dir = os.path.abspath(args.traces)
    out_dir = os.path.abspath(args.out)
    build_dir = os.path.join(out_dir, "build")
    os.makedirs(os.path.join(out_dir, "fixtures"), exist_ok=True)

    # 1. data
    wins, files = {}, []
    for name in data.TRACE_FILES:
        td = data.build_trace(name, traces_dir)
        exp = EXPECTED_SHA256.get(td.file)
        if exp and exp != td.sha256:
            log(f"WARNING: {td.file} sha256 {td.sha256} differs from the traces README ({exp})")
        files.append({"file": td.file, "sha256": td.sha256})
        path = data.write_dataset(td, build_dir)
        wins[name] = w = Windows(td)
        log(f"{name}: {td.n_requests} requests, {td.n_buckets} buckets from {td.first_bucket}, "
            f"{len(td.series)} series -> {path}")
        log(f"  non-dead windows train/val/test: " + "/".join(str(int(w.mask(s).sum())) for s in SPLITS))

    # 2. tensors
    def cat(split):
        xs = [torch.from_numpy(w.x()[w.mask(split)]) for w in wins.values()]
        ys = [torch.from_numpy(w.y[w.mask(split)].astype(np.float32)) for w in wins.values()]
        return xs, ys

    xs, ys = cat("train")
    xtr, ytr = torch.cat(xs), torch.cat(ys)
    vx, vy = cat("val")
    val_sets = list(zip(vx, vy))
    log(f"training windows: {len(xtr)} (both traces), validation: {sum(len(v) for v in vx)}")

    # 3. train the grid, keep the best by validation loss
    deadline = t_start + args.time_budget
    results = []
    best = None
    for i, cfg in enumerate(GRID):
        if time.time() > deadline:
            log(f"skipping config {cfg}: time budget used")
            continue
        log(f"config {i}: {cfg}")
        t0 = time.time()
        model, vl, ep, n_ep = train_config(cfg, args.seed, xtr, ytr, val_sets, deadline)
        results.append({**cfg, "val_loss": vl, "best_epoch": ep, "epochs_run": n_ep,
                        "seconds": round(time.time() - t0, 1)})
        log(f"  -> val loss {vl:.4f} at epoch {ep} ({time.time() - t0:.0f}s)")
        if best is None or vl < best[1]:
            best = (cfg, vl, model)
    cfg, _, model = best
    log(f"selected {cfg}")

    # 4. export + check
    import onnxruntime as ort

    onnx_path = os.path.join(out_dir, "lstm.onnx")
    exp_model = ExportModel(model).eval()
    dummy = torch.from_numpy(wins["apache"].x()[:2])
    torch.onnx.export(exp_model, (dummy,), onnx_path, dynamo=False, opset_version=17,
                      input_names=["window"], output_names=["quantiles", "p_any"],
                      dynamic_axes={"window": {0: "batch"}, "quantiles": {0: "batch"}, "p_any": {0: "batch"}})
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["window"]
    assert [o.name for o in sess.get_outputs()] == ["quantiles", "p_any"]
    max_abs = max_rel = 0.0
    for w in wins.values():
        x = w.x()[w.mask("test")]
        with torch.no_grad():
            tq, tp = exp_model(torch.from_numpy(x))
        oq, op = ort_predict(sess, x)
        d = np.abs(oq - tq.numpy())
        max_abs = max(max_abs, float(d.max()), float(np.abs(op - tp.numpy()[:, 0]).max()))
        max_rel = max(max_rel, float((d / np.maximum(1.0, np.abs(tq.numpy()))).max()))
        assert np.all(np.diff(oq, axis=1) >= 0) and np.all(oq >= 0), "quantiles not non-negative/non-decreasing"
    log(f"onnxruntime vs torch on test windows: max abs diff {max_abs:.3g}, max diff/max(1,|v|) {max_rel:.3g}")
    assert max_rel < 1e-4, "ONNX export does not match torch"

    # evaluation
    test_metrics = {name: evaluate(w, "test", sess) for name, w in wins.items()}
    val_metrics = {name: evaluate(w, "val", sess) for name, w in wins.items()}
    log("validation:\n" + fmt_table(val_metrics))
    log("test:\n" + fmt_table(test_metrics))
    checks = targets_check(test_metrics)
    warm_metrics = {name: evaluate(w, "test", sess, warm_only=True) for name, w in wins.items()}
    cold = {name: {s: int((w.mask(s) & (w.x()[:, :, 0].max(axis=1) == 0)).sum()) for s in SPLITS}
            for name, w in wins.items()}
    cold_y = {}
    for name, w in wins.items():
        m = w.mask("train") & (w.x()[:, :, 0].max(axis=1) == 0)
        cold_y[name] = [float(v) for v in np.percentile(w.y[m], [50, 75, 90])] if m.any() else []
    log("test, excluding windows with all-zero input (diagnostic):\n" + fmt_table(warm_metrics))
    log("all-zero-input (cold-start) windows per split: " + json.dumps(cold))
    log("targets (test): " + json.dumps(checks))

    # fixtures
    fixtures = make_fixtures(wins, sess)
    for f in fixtures:
        with torch.no_grad():
            tq, tp = exp_model(torch.tensor([f["features"]], dtype=torch.float32))
        assert np.allclose(tq.numpy()[0], f["quantiles"], atol=1e-4, rtol=0)
        assert abs(float(tp[0, 0]) - f["p_any"]) < 1e-4
    with open(os.path.join(out_dir, "fixtures", "features.json"), "w") as fh:
        json.dump({
            "format": 1, "window": W, "horizon": H, "bucket_secs": data.BUCKET_SECS,
            "feature_names": fx.FEATURE_NAMES, "tolerance": 1e-4,
            "description": "Real test windows: raw history counts (oldest first; the LSTM uses the last 32), "
                           "start of the last history bucket, priority, the Python features, lstm.onnx outputs "
                           "(onnxruntime) and the two baselines computed on the whole given history.",
            "windows": fixtures,
        }, fh, indent=1)

    split_text = ("Per trace, the bucket range [first_bucket, first_bucket + n_buckets*900) is split by bucket "
                  "start time: n_train = n_buckets*70//100, n_val = n_buckets*85//100, train_end = first_bucket + "
                  "n_train*900, val_end = first_bucket + n_val*900; a window belongs to the split of its first "
                  "target bucket. Train windows of both traces train one model; validation (per-trace mean loss, "
                  "averaged over traces) does early stopping and picks the configuration; test is only reported.")
    norm_text = ("No extra input scaling: the model consumes the 7 contract features as computed (features 0 and 6 "
                 "are already ln(1+count) scaled, 1-4 in [-1,1], 5 = priority/10). Inside the graph the head predicts "
                 "ln(1+y) quantiles as base + offsets, base = ln(1 + 4*(exp(feature6[last step]) - 1)), q10 = q50 - "
                 "softplus, q90 = q50 + softplus; outputs apply exp(q)-1, clamp >= 0 (quantiles, request counts "
                 "over the 4-bucket horizon) and sigmoid (p_any).")
    meta = {
        "format": 1,
        "window": W,
        "horizon": H,
        "bucket_secs": data.BUCKET_SECS,
        "features": fx.FEATURE_NAMES,
        "n_features": F,
        "quantiles": list(QUANTILES),
        "inputs": {"window": [-1, W, F]},
        "outputs": {"quantiles": [-1, 3], "p_any": [-1, 1]},
        "normalisation": norm_text,
        "seed": args.seed,
        "architecture": {"type": "LSTM", **{k: cfg[k] for k in ("hidden", "layers")},
                         "head": "Linear(hidden,hidden)-ReLU-Linear(hidden,4)", "opset": 17},
        "training": {"loss": "sum of pinball losses on ln(1+y) at q 0.1/0.5/0.9 + bce_weight * BCE(p_any, y>=1)",
                     "optimizer": "Adam", "batch": BATCH, "max_epochs": MAX_EPOCHS, "patience": PATIENCE,
                     "selected": cfg, "grid": results, "threads": args.threads,
                     "windows": {name: {s: int(w.mask(s).sum()) for s in SPLITS} for name, w in wins.items()}},
        "training_data": files,
        "splits": split_text,
        "test_metrics": test_metrics,
        "validation_metrics": val_metrics,
        "targets": checks,
        "diagnostics": {
            "cold_start_windows": cold,
            "cold_start_train_y_percentiles_50_75_90": cold_y,
            "test_metrics_excluding_cold_start": warm_metrics,
        },
    }
    with open(os.path.join(out_dir, "lstm.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")

    write_model_card(os.path.join(out_dir, "MODEL_CARD.md"), meta, wins, fmt_table(test_metrics),
                     fmt_table(val_metrics), fmt_table(warm_metrics), max_rel)
    log(f"done in {time.time() - t_start:.0f}s")


def write_model_card(path, meta, wins, test_table, val_table, warm_table, max_rel):
    cfg = meta["training"]["selected"]
    checks = meta["targets"]
    tm = meta["test_metrics"]

    def yn(b):
        return "**met**" if b else "**not met**"

    target_rows = []
    for trace, c in checks.items():
        l = tm[trace]["lstm"]
        target_rows.append(f"| {trace} | MASE ≤ 0.8 | {l['mase']:.3f} | {yn(c['mase_le_0.8'])} |")
        pb = ", ".join(f"{k} {l['pinball'][k]:.3f} vs {tm[trace]['seasonal_naive']['pinball'][k]:.3f} / "
                       f"{tm[trace]['ewma']['pinball'][k]:.3f}" for k in ("q10", "q50", "q90"))
        target_rows.append(f"| {trace} | pinball < seasonal naive and EWMA at every quantile | {pb} | "
                           f"{yn(c['pinball_better_than_both'])} |")
        target_rows.append(f"| {trace} | p10–p90 coverage in 75–85% | {l['coverage'] * 100:.1f}% | "
                           f"{yn(c['coverage_75_85'])} |")
    grid_rows = "\n".join(f"| {g['hidden']} | {g['layers']} | {g['lr']} | {g['bce_weight']} | {g['val_loss']:.4f} | "
                          f"{g['best_epoch']} | {g['epochs_run']} | {g['seconds']} |" for g in meta["training"]["grid"])
    cold_txt = "; ".join(f"{n} " + "/".join(f"{v:g}" for v in p)
                         for n, p in meta["diagnostics"]["cold_start_train_y_percentiles_50_75_90"].items())
    files = "\n".join(f"- `../shared/traces/{f['file']}` — sha256 `{f['sha256']}`" for f in meta["training_data"])
    wcount = "\n".join(f"| {n} | {w.td.n_buckets} | {len(w.td.series)} | " + " | ".join(
        str(int(w.mask(s).sum())) for s in SPLITS) + " |" for n, w in wins.items())
    feats = "\n".join(f"{i}. `{n}`" for i, n in enumerate(meta["features"]))
    text = f"""# Model card: shadowcdn demand forecaster (`models/lstm.onnx`)

*Generated by `models/train/train.py`; do not edit by hand — rerun training instead.*

## What it is
A small LSTM ({cfg["layers"]} layer(s), hidden {cfg['hidden']}, then Linear–ReLU–Linear head) that reads the last
32 buckets (15 min each) of one (resource, region) request-count series and forecasts the total demand `y` of the
next 4 buckets (one hour) as quantiles 0.1 / 0.5 / 0.9, plus `p_any` = P(y ≥ 1). Quantiles are produced in
ln(1+y) space as q50 plus cumulative softplus offsets (so they never cross), around a persistence prior
`ln(1 + 4·window mean)`; the exported graph applies `exp(q) − 1`, clamps at 0 and applies the sigmoid.

- ONNX (opset 17): input `window` float32 `[batch, 32, 7]` (dynamic batch); outputs `quantiles` float32
  `[batch, 3]` (request counts over the horizon, non-negative, non-decreasing) and `p_any` float32 `[batch, 1]`.
- Metadata: `models/lstm.json`. Fixture for the Rust feature pipeline, ort and baselines: `models/fixtures/features.json`.
- onnxruntime vs PyTorch on all test windows: max |diff| / max(1, |value|) = {max_rel:.2g}.

## Intended use
Demand forecasts for the shadow planner of shadowcdn: which (resource, region) pairs to pre-place ahead of
demand, thresholded on `p_any` and the quantiles. It is a research prototype trained on two small public
logs; it is not a general-purpose traffic forecaster.

## Training data
{files}

Parsing (`models/train/data.py`): Apache combined log, GET/HEAD only, client = IP, resource =
`semicomplete.com` + path without query; NASA LP DAAC OPeNDAP log, `|&|`-separated, minute-resolution
`YYYY-MM-DD hh:mmAM/PM` times treated as UTC, client = hashed IP, resource = `opendap.lpdaac` + path without
query. Region = fnv1a64(client) % 2. Per trace the 50 most requested resources × 2 regions = 100 series over the
trace's full bucket range (zeros included).

| trace | buckets | series | train windows | validation windows | test windows |
| --- | ---: | ---: | ---: | ---: | ---: |
{wcount}

(Non-dead windows only; a window is dead when its 32 input and 4 target counts are all zero.)

## Splits
{meta['splits']}

## Features (per step, float32, see models/README.md)
{feats}

Normalisation: {meta['normalisation']}

## Training
Loss: {meta['training']['loss']}. Adam, batch {BATCH}, up to {MAX_EPOCHS} epochs, early stopping with patience
{PATIENCE} on validation loss (LR halved on plateau), gradient-norm clip 1.0, seed {meta['seed']},
{meta['training']['threads']} CPU thread(s), deterministic algorithms. Both traces train one model together.
Configurations tried (selection by validation loss only):

| hidden | layers | lr | BCE weight | best val loss | best epoch | epochs run | seconds |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{grid_rows}

## Held-out test metrics
Non-dead windows whose first target bucket lies in the test split (last 15% of each trace's time range).
LSTM outputs are from `lstm.onnx` through onnxruntime. MAE and pinball are in requests per 4-bucket horizon;
MASE = MAE / MAE(seasonal naive) on the same windows; coverage = fraction with p10 ≤ y ≤ p90; Brier of p_any.
Baselines use up to 7 days of history (seasonal naive: daily period, p10/p90 from the same-time sums 1..7 days
back; EWMA α = 0.3 with Poisson quantiles).

{test_table}

Validation split (used for model selection), same columns:

{val_table}

Diagnostic — test windows whose 32 input counts are not all zero (MASE relative to seasonal naive on these
windows). Windows with an all-zero input (cold starts) are kept by the contract whenever a request follows
within the horizon, so for them y ≥ 1 always; the LSTM cannot tell the traces apart from such an input (only the
time features differ) and predicts the pooled cold-start tail of both traces — dominated by the NASA bulk bursts
(y percentiles 50/75/90 of the training cold starts: {cold_txt}) — which inflates its p90 on Apache cold starts.
Cold-start windows per split: {json.dumps(meta['diagnostics']['cold_start_windows'])}.

{warm_table}

## Targets (from the issue), on the test split

| trace | target | LSTM (pinball: LSTM vs naive / EWMA) | status |
| --- | --- | --- | --- |
{chr(10).join(target_rows)}

## Development notes
{DEV_NOTES}

## Limitations
- Tiny data: the Apache log is 3.5 days (333 buckets) so its test split is ~12 hours, and the history never reaches
  7 days (at most 3 seasonal lags); the NASA log spans two years but is extremely bursty and nearly idle in its
  last 30%, so its validation and test splits contain few non-dead windows ({int(wins['nasa'].mask('val').sum())}
  and {int(wins['nasa'].mask('test').sum())}) and metrics there are noisy.
- The NASA traffic is dominated by one client (crawler-like bulk downloads), not CDN-like human traffic; the Apache
  log is a single personal website. Neither is CDN traffic; the regions are synthetic (hash of client).
- Top-50 resources per trace only; long-tail and brand-new resources are not represented in training.
- Priority is always 5 in the traces, so the model has never seen feature 5 vary.
- Timestamps of the NASA log are local server time with unknown zone, treated as UTC, so time-of-day features may
  be shifted for that trace.

## Retrain
```sh
bash models/train/train.sh          # traces from ../shared/traces, or set SHADOWCDN_TRACES
```
Deterministic for a given seed and thread count on the same software versions (`models/train/requirements.txt`).
"""
    with open(path, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
