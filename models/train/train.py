"""Train the demand-forecasting LSTM on the real traces and export it (models/README.md).

Usage: python models/train/train.py [TRACES_DIR] [--out models] [--seed 20240531]

Steps:
 1. parse both traces (data.py), write models/build/dataset-<trace>.json for the Rust evaluator;
 2. build windows (W=32, H=4, stride 1, dead windows skipped), split each trace by the time of a
    window's first target bucket: test = the last 15%, validation = the 15% before it plus every
    5th week of the rest, train = the remainder (train windows next to validation/test buckets and
    validation windows next to test buckets are purged);
 3. train one LSTM on the train windows of both traces together (pinball loss on ln(1+y) for
    q 0.1/0.5/0.9 + BCE for p_any); a small fixed grid of configurations is tried, each with early
    stopping on the validation split and per-quantile calibration offsets fitted on the validation
    split, and the best by calibrated validation score is kept — the test split is used only for
    the final report;
 4. export ONNX (models/lstm.onnx), check it against torch with onnxruntime, evaluate LSTM (via
    onnxruntime), seasonal naive and EWMA on each trace's test windows;
 5. write models/lstm.json, models/fixtures/features.json and models/MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import hashlib
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
# Hidden size 8 so that one batch of 10,000 series runs in <= 20 ms on one core (measured with
# `cargo bench -p models --bench forecast`: hidden 8 about 18 ms, hidden 12 or 16 22-32 ms);
# "group" = buckets per LSTM step (32 / group steps).
GRID = [
    {"hidden": 8, "head": 32, "group": 4, "lr": 3e-3, "bce_weight": 1.0},
    {"hidden": 8, "head": 32, "group": 8, "lr": 3e-3, "bce_weight": 1.0},
    {"hidden": 8, "head": 16, "group": 4, "lr": 3e-3, "bce_weight": 1.0},
]
BATCH = 256
DEV_NOTES = """Version 4 (this model): version 3's pipeline with two leaks of the held-out split closed; nothing
else in the features, architecture, grid or calibration changed.
1. The 50 resources of each trace were ranked on the whole trace, test tail included, so the held-out part chose
   the series. They are now ranked on the requests before `val_end`. On NASA this changes what the test split is:
   the last 15% of its time range holds 0.4% of its requests (2,004), of which 118 are on the 50 resources most
   requested before it, so the test split shrank from 932 to 131 non-dead windows — the 932 were mostly windows of
   resources picked because they were busy in the tail. NASA test metrics now rest on 131 windows and are noisy.
2. Validation windows whose 4 target buckets reach into the test split were kept (the windows of the last 3
   validation buckets); they are now purged like train windows next to validation.
3. The Python fixture check compares the exported graph with onnxruntime by the Rust parity test's rule
   (|diff| <= 1e-4 * max(1, |v|)) instead of an absolute 1e-4, which large quantiles exceed by float rounding.
Version 3's model retrained on this machine (AMD EPYC) with version 3's code gave different weights from the
committed ones (trained on another CPU; same seed, same packages) — same configuration selected, validation score
0.508 vs 0.516, test apache q90 pinball 0.241 vs 0.245 (seasonal naive 0.241) — so training is deterministic per CPU type, not across
them. Reruns on one machine are identical.
Tried in this version and not kept (validation only unless said):
- Level-relative inputs: the window's log counts and features 7-8 minus feature 6, feature 6 clipped at ln(17),
  so the head learns the shape of demand rather than its level; added to the grid as three more configurations,
  none of which beat the selected one on the calibrated validation score (0.530-0.538 vs 0.517).
- A split at request-count quantiles (test = the time after 85% of a trace's requests, validation after 70%), to
  give NASA a test split with traffic in it (2,028 windows). Test was looked at for this one: the NASA tail is
  then days 452-724, where two resources are requested about 100 times per bucket for days, a regime absent from
  the 1,457 NASA train windows (8 of them with 100+ requests in their last 4 buckets, none sustained). The LSTM has
  learned that NASA bursts end within hours and forecasts 5-9 requests after four buckets of 100: MASE 1.97 (1.84
  with level-relative inputs) against EWMA's 0.24. Not adopted, because it trains NASA on its first 99 days only;
  it shows that this model needs its recent errors watched online: the broker's planner now does, per series
  (`models::guard`, which answers a series with a baseline while that has lately been clearly better; on this tail
  1.97 -> 0.31, bench/RESULTS.md).
Evaluated after version 4 (session 28, bench/RESULTS.md "Rolling origin"): the whole pipeline rerun on the traces cut
at 40/55/70/85/100% of their time range (`rolling_origin.py`), each fold scored on its own last 15%. Apache: MASE
0.683-0.797 in every fold, pooled 0.731. NASA pooled: LSTM 0.980, EWMA 0.685, LSTM behind the guard 0.842 — 7,510 of
the LSTM's 8,515 pooled absolute error is one series' burst in the 40% fold (see Limitations). Tried then and not
kept: the q50 base from the EWMA level over the window, or a per-series mix of it and the window mean chosen by the
head; validation picked the mix on the full trace (0.5122 vs 0.5171) but the folds' pooled NASA MASE did not move
(0.982) and the committed test tail had been seen for it (apache q90 pinball 0.245 against naive's 0.241).

Version 3. Changes, in the order they were made:
1. Validation split: the 70-85% stretch plus every 5th week of the first 70% (see Splits). Motivation: the
   previous version's NASA coverage was 83.3% on its validation split (384 windows, one quiet stretch) and 62.3% on
   test (that test number was known, reported in the issue). On the new split, a leave-one-validation-week-out check
   on NASA (fit the offsets on all other validation windows, measure coverage on the held-out week; validation
   only) gave a pooled 81.6% with global offsets; offsets per observable group (cold start or not, history-mean
   bins, window-mean bins, window-vs-history trend) did not do better (79.5-81.2%), so the offsets stay global.
   The model trained with this change alone (9 features, same grid, selected hidden 8 / head 32 / 4 buckets per
   step, validation score 0.517) was evaluated on test once: apache coverage 85.4%, q90 pinball 0.295 vs seasonal
   naive 0.241; nasa coverage 84.7%, q10 pinball 0.340 vs 0.342, MASE 0.949.
2. Feature 9, `log1p_silence`. The apache q90 loss comes from cold-start windows (found on the previous version's
   test diagnostics). Measured on train and validation only: that model's median p90 on Apache cold starts was
   19.7 (train) / 17.2 (validation) while their y has p90 2; validation q90 pinball on those 78 windows 1.76 vs
   seasonal naive 0.81. Features 0-8 cannot tell a resource quiet for half a day (Apache cold starts: median 44-52
   buckets of silence) from a NASA file silent all week before a bulk burst (median 143-672). With feature 9 the
   median p90 on Apache cold starts is 8.7 (train) / 7.1 (validation), validation q90 pinball on them 0.76 (naive
   0.81), calibrated validation score 0.516 vs 0.517: kept by the rule fixed before looking at its test numbers
   (keep if the validation score is lower). Its test numbers were then looked at once; they are the ones above.
3. The ONNX graph reads `counts` [batch, 32] + `context` [batch, 9] instead of the full [batch, 32, 10] window (same
   function, same weights; models/README.md, "Model input"): in onnxruntime from Python, one 10,000-series batch
   took 14.8 ms with the full window and 7.7 ms with the compact input (random weights, same architecture, loaded
   machine), and the Rust input building writes 41 instead of 320 floats per series.
No other configuration, feature or calibration choice was made after looking at test numbers.

Version 2. The first version of this model (hidden 64 over 32 steps of the 7 original features, selected
by validation loss, no calibration) met MASE ≤ 0.8 on apache only, lost q90 pinball on apache and q10 on nasa to the
seasonal naive, had 87.1% coverage on apache, and took 388 ms per 10,000-series batch on one core. Its test metrics
were known (reported in the issue) when this version was designed; the changes address the causes found then
(cold-start tails pooled across traces, quantiles trained in log space but judged in counts, the cost of a 32-step
hidden-64 recurrence).

Tried while building this version (seed 20240531; val loss / calibrated val score, lower is better):
- 7 old features, hidden 16, 8 steps of 4 buckets: val loss 0.6318 (the old hidden-64 model: 0.6373);
  with features 7-8 (9 features): 0.6224 / 0.810.
- Weighting the log-space pinball loss by (1+y)^0.25 or (1+y)^0.5 (to mimic the count-space loss), hidden 16:
  score 1.002 and 1.042 (worse), so the loss is unweighted.
- Calibrating q10/q90 without the coverage constraint: 95–96% validation coverage on nasa (q10 pushed to 0), hence
  the constraint.
- Other sizes (9 features): hidden 12 0.6148 / 0.851, hidden 8 head 16 0.6298 / 0.862, hidden 16 with 4 steps of 8
  0.6408 / 0.838, hidden 12 with 4 steps of 8 0.6560 / 0.831, hidden 8 head 32 lr 0.01 0.6281 / 0.870.
- Inference cost (same function, different ONNX graphs; onnxruntime, 1 thread, 10,000 series): the ONNX LSTM
  operator, hidden 8 over 32 steps, 105 ms; an unrolled batch-first graph 96 ms; batch-last 58 ms; 8 steps of 4 with
  one Gemm per step 13–19 ms (Python, hidden 8–16). In Rust (`cargo bench`, random weights, measured while other
  builds were running on the 2-core machine): hidden 16 25–36 ms, hidden 12 23–25 ms, hidden 16 or 12 with 4 steps
  of 8 22–24 ms, hidden 8 about 18 ms, of which about 8 ms is building the input features in Rust (mostly reading
  7 days of history for feature 8). Hence the hidden-8 grid.
- Disclosure: the first full training run of this version used a grid of hidden 8/12/16 (head 16), selected hidden 16
  by validation score and printed its test metrics (apache MASE 0.710, q90 pinball 0.278, coverage 88.9%; nasa MASE
  0.931, q10 pinball 0.346, coverage 85.1%). The move to hidden 8 was made for the speed target (measured above),
  and the hidden-8 configurations in the table above were compared on validation only."""
MAX_EPOCHS = 40
PATIENCE = 6



def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()

def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------
# Windows


# Validation split: the contiguous stretch before the test tail (70-85% of the time range, as
# before) PLUS, in traces long enough, every VAL_EVERY-th block of VAL_BLOCK_BUCKETS buckets
# (one week) of the first 70%. A single contiguous stretch is not representative of a trace
# whose regime changes over months (NASA: its 70-85% stretch is one quiet period); interleaved
# weekly blocks spread the validation windows (early stopping, calibration, model selection)
# over the whole pre-test range. The Apache log (3.5 days) is shorter than one block, so its
# validation split is unchanged. The test tail (last 15%) is unchanged and never used.
VAL_BLOCK_BUCKETS = 7 * 96
VAL_EVERY = 5


def bucket_splits(td: data.TraceData) -> np.ndarray:
    """Split of every bucket of the trace: 0 train, 1 validation, 2 test (int64 [n_buckets])."""
    b = np.arange(td.n_buckets, dtype=np.int64)
    t = td.first_bucket + b * td.bucket_secs
    interleaved = (b // VAL_BLOCK_BUCKETS) % VAL_EVERY == VAL_EVERY - 1
    return np.where(t >= td.val_end, 2, np.where((t >= td.train_end) | interleaved, 1, 0))


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
        # split of every bucket (see `bucket_splits`); a window belongs to the split of its first
        # target bucket; train windows touching a validation or test bucket are purged (-1)
        bsplit = bucket_splits(td)
        self.split = bsplit[self.end]
        touch = np.concatenate([[0], np.cumsum(bsplit != 0)])
        purged = (self.split == 0) & (touch[np.minimum(self.end + H, n)] - touch[self.end - W] > 0)
        # validation windows whose targets reach into the test tail are purged too: validation
        # picks the model and fits its calibration, so it must not see a test bucket either
        purged |= (self.split == 1) & (bsplit[np.minimum(self.end + H - 1, n - 1)] == 2)
        self.split = np.where(purged, -1, self.split)
        self.block = (self.end // VAL_BLOCK_BUCKETS).astype(np.int64)  # calibration diagnostics
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


GROUP = 4  # default buckets per LSTM step: the LSTM reads the window as W / group steps
CTX = F - 1  # features 1.. of the last step feed the head


def assemble(z, feat6_last, calib):
    """ln(1+y) quantiles from the head outputs z [B, 4] and feature 6 of the last step [B]:
    q50 = base + z0, q10 = q50 - softplus(z1), q90 = q50 + softplus(z2) with
    base = ln(1 + H * window mean) (a persistence prior the network corrects); then the
    per-quantile calibration offsets `calib` [3] (fitted on the validation split, zero while
    training) are added and the order is restored (q10 <= q50 <= q90)."""
    mean = torch.exp(feat6_last) - 1.0
    base = torch.log(1.0 + H * mean)
    q50 = base + z[:, 0]
    q10 = q50 - tF.softplus(z[:, 1])
    q90 = q50 + tF.softplus(z[:, 2])
    c50 = q50 + calib[1]
    c10 = torch.minimum(q10 + calib[0], c50)
    c90 = torch.maximum(q90 + calib[2], c50)
    return torch.stack([c10, c50, c90], dim=1)


class LSTMForecaster(nn.Module):
    """An LSTM over the window's 32 log counts (feature 0) read as 32 / group steps of `group`
    buckets (group 4: 8 hourly steps of input size 4; no count is dropped, the recurrence is 8
    steps long instead of 32). Its last
    hidden state and the last step's features 1-6 (time of day, day of week, priority, window
    mean — the calendar of every earlier step is a fixed function of the last one) go through a
    Linear-ReLU-Linear head giving 4 numbers: the q50 correction, the two softplus quantile
    spreads and the p_any logit (see `assemble`)."""

    def __init__(self, hidden: int, head: int, group: int = GROUP):
        super().__init__()
        self.hidden = hidden
        self.group = group
        self.lstm = nn.LSTM(group, hidden, num_layers=1, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden + CTX, head), nn.ReLU(), nn.Linear(head, 4))
        self.register_buffer("calib", torch.zeros(3))

    def forward(self, x):
        seq = x[:, :, 0].reshape(x.shape[0], W // self.group, self.group)
        out, _ = self.lstm(seq)
        z = self.head(torch.cat([out[:, -1, :], x[:, -1, 1:]], dim=1))
        return assemble(z, x[:, -1, 6], self.calib), z[:, 3:4]


INPUT_NAMES = ("counts", "context")


def model_inputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ONNX model's inputs from feature windows x [B, W, F] (models/README.md, "Model
    input"): `counts` [B, W] = feature 0 of every step, `context` [B, F-1] = features 1.. of the
    last step. Nothing the model uses is dropped: features 1-4 of earlier steps are fixed functions
    of the last step's time and 5-9 are the same at every step; the input is 1/7 the size of the
    full [B, W, F] window, which is what makes a 10,000-series batch cheap to build and to read."""
    return np.ascontiguousarray(x[:, :, 0]), np.ascontiguousarray(x[:, -1, 1:])


def feeds(x: np.ndarray) -> dict:
    return dict(zip(INPUT_NAMES, model_inputs(x)))


class ExportModel(nn.Module):
    """What lstm.onnx computes: the same function as LSTMForecaster (same weights), written for
    fast batched CPU inference — the batch is the last (contiguous) axis inside the graph, so
    every step is one small Gemm with N = batch over [input; h] and element-wise ops on contiguous rows, with
    the gates reordered (i, f, o | g) so one Sigmoid and one Tanh cover them — then quantiles
    in request counts (expm1, clamped >= 0) and sigmoid p_any. (Two Gemms per gate instead, with
    no Slice/Concat copies, measured no faster in onnxruntime.)"""

    def __init__(self, core: LSTMForecaster):
        super().__init__()
        h = core.hidden
        self.h = h
        self.group = core.group
        perm = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
        lstm = core.lstm
        with torch.no_grad():
            self.register_buffer("wi", lstm.weight_ih_l0[perm].clone())  # [4h, group]
            self.register_buffer("w", torch.cat([self.wi, lstm.weight_hh_l0[perm]], dim=1))  # [4h, group + h]
            self.register_buffer("b", (lstm.bias_ih_l0 + lstm.bias_hh_l0)[perm][:, None].clone())
            w1 = core.head[0].weight
            self.register_buffer("w1h", w1[:, :h].clone())
            # the head's weights for features 1.. of the last step (the `context` input)
            self.register_buffer("w1c", w1[:, h:].clone())
            self.register_buffer("b1", core.head[0].bias[:, None].clone())
            self.register_buffer("w2", core.head[2].weight.clone())
            self.register_buffer("b2", core.head[2].bias[:, None].clone())
            self.register_buffer("calib", core.calib.clone())

    def forward(self, counts, context):
        """counts [B, W] = feature 0 of every step, context [B, F-1] = features 1.. of the last
        step (`model_inputs`)."""
        h = self.h
        n = counts.shape[0]
        steps = W // self.group
        seq = counts.transpose(0, 1).reshape(steps, self.group, n)  # [steps, group, B]
        hs = c = None
        for t in range(steps):
            if hs is None:
                g = torch.addmm(self.b, self.wi, seq[t])  # [4h, B]
            else:
                g = torch.addmm(self.b, self.w, torch.cat([seq[t], hs], dim=0))
            s = torch.sigmoid(g[:3 * h])
            gg = torch.tanh(g[3 * h:])
            c = s[:h] * gg if c is None else s[h:2 * h] * c + s[:h] * gg
            hs = s[2 * h:] * torch.tanh(c)
        a = torch.relu(torch.addmm(torch.addmm(self.b1, self.w1c, context.transpose(0, 1)), self.w1h, hs))
        z = torch.addmm(self.b2, self.w2, a).transpose(0, 1)  # [B, 4]
        qlog = assemble(z, context[:, 5], self.calib)  # context column 5 = feature 6
        quantiles = torch.clamp(torch.exp(qlog) - 1.0, min=0.0)
        return quantiles, torch.sigmoid(z[:, 3:4])


_QT = torch.tensor(QUANTILES, dtype=torch.float32)


def loss_terms(model, x, y, cfg):
    """Per-window loss: sum over quantiles of the pinball loss on ln(1+y), + bce_weight * BCE."""
    qlog, logit = model(x)
    t = torch.log1p(y)[:, None]
    diff = t - qlog
    pin = torch.maximum(_QT * diff, (_QT - 1.0) * diff).sum(dim=1)
    bce = tF.binary_cross_entropy_with_logits(logit[:, 0], (y >= 1).float(), reduction="none")
    return pin + cfg["bce_weight"] * bce


def mean_loss(model, x, y, cfg):
    model.eval()
    with torch.no_grad():
        tot = 0.0
        for i in range(0, len(x), 4096):
            tot += float(loss_terms(model, x[i:i + 4096], y[i:i + 4096], cfg).sum())
    return tot / max(1, len(x))


def val_loss(model, val_sets, cfg):
    """Mean over traces of the per-trace mean validation loss (so each trace counts equally)."""
    return float(np.mean([mean_loss(model, x, y, cfg) for x, y in val_sets]))


def train_config(cfg, seed, xtr, ytr, val_sets, deadline):
    torch.manual_seed(seed)
    model = LSTMForecaster(cfg["hidden"], cfg["head"], cfg["group"])
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
            loss = loss_terms(model, xtr[idx], ytr[idx], cfg).mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tl += float(loss.detach()) * len(idx)
        vl = val_loss(model, val_sets, cfg)
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


# ----------------------------------------------------------------------------------------------
# Calibration of the quantile offsets on the validation split

CALIB_GRID = np.round(np.arange(-2.0, 2.0001, 0.02), 2)
COVERAGE_BAND = (0.76, 0.84)  # the 75-85% target with one point of margin each side


def calibrate(model, wins: dict):
    """Post-hoc per-quantile offsets in ln(1+y) space, fitted on the VALIDATION split only
    (conformalised-quantile-regression style, but choosing the offsets on the count-space loss).

    The LSTM is trained on a log-space pinball loss over both traces pooled, but it is judged per
    trace by the pinball loss in request counts and by the p10-p90 coverage. The offsets are added
    to the ln(1+y) quantiles inside the model (`calib`, exported into the ONNX graph, so its outputs
    are already calibrated), q10 / q90 then clipped to the calibrated q50 exactly as the graph does:
    - q50: the offset in CALIB_GRID minimising the mean over traces of MAE(LSTM)/MAE(seasonal naive);
    - q10 and q90 jointly: the pair minimising the mean over traces of pinball_q10/pinball_q10(naive)
      + pinball_q90/pinball_q90(naive), subject to the validation coverage of every trace lying in
      COVERAGE_BAND (if no pair does, the pair closest to the band, then lowest loss).
    Returns the offsets."""
    model.eval()
    per_trace = []
    d = CALIB_GRID.astype(np.float64)
    for name, w in wins.items():
        idx = np.nonzero(w.mask("val"))[0]
        y = w.y[idx].astype(np.float64)
        (snq, _), _ = baseline_preds(w, idx)
        saved = model.calib.clone()
        model.calib.zero_()
        with torch.no_grad():
            qlog = model(torch.from_numpy(w.x()[idx]))[0].numpy().astype(np.float64)
        model.calib.copy_(saved)
        scale = [max(fx.pinball(y, snq[:, k], q), 1e-9) for k, q in enumerate(QUANTILES)]
        per_trace.append((y, qlog, scale))

    def pin(y, pred, q):  # pred [n, len(d)] -> [len(d)]
        diff = y[:, None] - pred
        return np.mean(np.maximum(q * diff, (q - 1.0) * diff), axis=0)

    obj50 = sum(pin(y, np.maximum(np.expm1(ql[:, 1:2] + d[None, :]), 0.0), 0.5) / sc[1]
                for y, ql, sc in per_trace) / len(per_trace)
    d50 = float(d[int(np.argmin(obj50))])
    loss = np.zeros((len(d), len(d)))
    gap = np.zeros((len(d), len(d)))
    for y, ql, sc in per_trace:
        c50 = (ql[:, 1] + d50)[:, None]
        p10 = np.maximum(np.expm1(np.minimum(ql[:, 0:1] + d[None, :], c50)), 0.0)
        p90 = np.maximum(np.expm1(np.maximum(ql[:, 2:3] + d[None, :], c50)), 0.0)
        loss += (pin(y, p10, 0.1) / sc[0])[:, None] + (pin(y, p90, 0.9) / sc[2])[None, :]
        cov = (p10 <= y[:, None]).astype(np.float64).T @ (y[:, None] <= p90).astype(np.float64) / len(y)
        gap = np.maximum(gap, np.maximum(COVERAGE_BAND[0] - cov, cov - COVERAGE_BAND[1]))
    loss /= len(per_trace)
    gap = np.maximum(gap, 0.0)
    best = np.lexsort((loss.ravel(), np.round(gap.ravel(), 9)))[0]
    i10, i90 = np.unravel_index(best, loss.shape)
    offsets = [float(d[i10]), d50, float(d[i90])]
    with torch.no_grad():
        model.calib.copy_(torch.tensor(offsets, dtype=torch.float32))
    return offsets

class TorchSession:
    """The exported function evaluated by PyTorch, with onnxruntime's `run` signature (used for
    model selection before anything is exported)."""

    def __init__(self, model):
        self.model = ExportModel(model).eval()

    def run(self, names, feeds):
        with torch.no_grad():
            q, p = self.model(torch.from_numpy(feeds["counts"]), torch.from_numpy(feeds["context"]))
        return [q.numpy(), p.numpy()]


def val_score(metrics_by_trace) -> float:
    """Model selection score on validation: mean over traces and quantiles of the count-space
    pinball loss of the LSTM relative to seasonal naive's (lower is better; < 1 beats it)."""
    return float(np.mean([m["lstm"]["pinball"][k] / m["seasonal_naive"]["pinball"][k]
                          for m in metrics_by_trace.values() for k in ("q10", "q50", "q90")]))


def ort_predict(sess, x: np.ndarray):
    qs, ps = [], []
    for i in range(0, len(x), 4096):
        q, p = sess.run(["quantiles", "p_any"], feeds(x[i:i + 4096]))
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
        # features 0-6 depend on the window only; 7-9 on the whole (here possibly truncated) history
        same = feats if cap is None else feats[:, :7]
        assert np.array_equal(same, win.x()[j][:, :same.shape[1]]), "vectorised features differ from the reference"
        q, p = sess.run(["quantiles", "p_any"], feeds(feats[None]))
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
    ap.add_argument("--end-fraction", type=float, default=1.0,
                    help="cut each trace at this fraction of its time range first (a rolling-origin fold; "
                         "models/train/rolling_origin.py); use a scratch --out")
    args = ap.parse_args()
    if not 0.0 < args.end_fraction <= 1.0:
        ap.error(f"--end-fraction must be in (0, 1], got {args.end_fraction}")
    if args.end_fraction < 1.0 and os.path.abspath(args.out) == os.path.join(REPO, "models"):
        ap.error("--end-fraction trains a fold, not the served model: pass a scratch --out")
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
        td = data.build_trace(name, traces_dir, args.end_fraction)
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

    # 3. train the grid; calibrate each configuration's quantile offsets on validation and keep the
    #    one with the best calibrated validation score (the test split is not looked at)
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
        offsets = calibrate(model, wins)
        tsess = TorchSession(model)
        vm = {name: evaluate(w, "val", tsess) for name, w in wins.items()}
        score = val_score(vm)
        results.append({**cfg, "val_loss": vl, "best_epoch": ep, "epochs_run": n_ep, "calibration": offsets,
                        "val_score": score, "val_coverage": {n: m["lstm"]["coverage"] for n, m in vm.items()},
                        "seconds": round(time.time() - t0, 1)})
        log(f"  -> val loss {vl:.4f} at epoch {ep}, calibration {offsets}, calibrated val score {score:.4f} "
            f"({time.time() - t0:.0f}s)")
        if best is None or score < best[1]:
            best = (cfg, score, model)
    cfg, _, model = best
    log(f"selected {cfg}")

    # 4. export + check
    import onnxruntime as ort

    onnx_path = os.path.join(out_dir, "lstm.onnx")
    exp_model = ExportModel(model).eval()
    dummy = tuple(torch.from_numpy(v) for v in model_inputs(wins["apache"].x()[:2]))
    torch.onnx.export(exp_model, dummy, onnx_path, dynamo=False, opset_version=17,
                      input_names=list(INPUT_NAMES), output_names=["quantiles", "p_any"],
                      dynamic_axes={"counts": {0: "batch"}, "context": {0: "batch"}, "quantiles": {0: "batch"},
                                    "p_any": {0: "batch"}})
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(INPUT_NAMES)
    assert [o.name for o in sess.get_outputs()] == ["quantiles", "p_any"]
    max_abs = max_rel = 0.0
    for w in wins.values():
        x = w.x()[w.mask("test")]
        with torch.no_grad():
            tq, tp = exp_model(*(torch.from_numpy(v) for v in model_inputs(x)))
            mq, ml = model(torch.from_numpy(x))  # the training-time module, same function
        assert torch.allclose(torch.clamp(torch.expm1(mq), min=0.0), tq, rtol=1e-4, atol=1e-4)
        assert torch.allclose(torch.sigmoid(ml), tp, rtol=1e-4, atol=1e-5)
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
            tq, tp = exp_model(*(torch.from_numpy(v) for v in model_inputs(np.array([f["features"]], np.float32))))
        want = np.array(f["quantiles"])  # the Rust parity test's rule: |diff| <= 1e-4 * max(1, |v|)
        assert np.all(np.abs(tq.numpy()[0] - want) <= 1e-4 * np.maximum(1.0, np.abs(want)))
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

    split_text = ("Per trace, bucket b of the range [first_bucket, first_bucket + n_buckets*900) is test if "
                  "b >= n_buckets*85//100 (the last 15%, val_end), validation if n_buckets*70//100 <= b < "
                  f"n_buckets*85//100 or if (b div {VAL_BLOCK_BUCKETS}) mod {VAL_EVERY} = {VAL_EVERY - 1} (every "
                  f"{VAL_EVERY}th week of the rest: interleaved validation weeks, so that validation spans the whole "
                  "pre-test range of the two-year NASA log instead of one quiet stretch; the 3.5-day Apache log is "
                  "shorter than a week, so its validation split is the 70-85% stretch only), train otherwise. A "
                  "window belongs to the split of its first target bucket; train windows with any input or target "
                  "bucket in validation or test, and validation windows with a target bucket in test, are dropped "
                  "(purged). Train windows of both traces train one model; "
                  "validation does early stopping (per-trace mean loss, averaged over traces), fits the quantile "
                  "calibration offsets and picks the configuration (calibrated count-space pinball relative to "
                  "seasonal naive); test is only reported.")
    norm_text = (f"No extra input scaling: the model consumes the {F} contract features as computed (features 0 and "
                 "6-9 are already ln(1+count) scaled, 1-4 in [-1,1], 5 = priority/10). The LSTM reads feature 0 of the "
                 f"{W} steps as {W // cfg['group']} steps of {cfg['group']}; the head reads its last state and features 1-{F - 1} of the last "
                 "step. It predicts ln(1+y) quantiles as base + offsets, base = ln(1 + 4*(exp(feature6[last step]) - 1)), "
                 "q10 = q50 - softplus, q90 = q50 + softplus, then adds the validation-fitted calibration offsets "
                 "(q10 and q90 clipped to q50); outputs apply exp(q)-1, clamp >= 0 (quantiles, request counts over the "
                 "4-bucket horizon) and sigmoid (p_any).")
    meta = {
        "format": 1,
        "window": W,
        "horizon": H,
        "bucket_secs": data.BUCKET_SECS,
        "features": fx.FEATURE_NAMES,
        "n_features": F,
        "quantiles": list(QUANTILES),
        # The traces carry no priorities (every series has the default): serving feeds the
        # model only priorities it was trained on (models/README.md, "Priority").
        "trained_priorities": sorted({int(s.priority) for w in wins.values() for s in w.td.series}),
        # Ties this file to its model: the server refuses a model whose bytes differ (a deploy
        # that copied one file of the two, or was caught between them).
        "model_sha256": file_sha256(onnx_path),
        "inputs": {"counts": [-1, W], "context": [-1, F - 1]},
        "outputs": {"quantiles": [-1, 3], "p_any": [-1, 1]},
        "normalisation": norm_text,
        "seed": args.seed,
        "architecture": {"type": "LSTM", "hidden": cfg["hidden"], "layers": 1, "steps": W // cfg["group"],
                         "buckets_per_step": cfg["group"],
                         "lstm_input": f"feature 0 of {cfg['group']} consecutive buckets",
                         "head": f"Linear(hidden+{CTX},{cfg['head']})-ReLU-Linear({cfg['head']},4)",
                         "calibration_offsets_log1p": [round(float(v), 4) for v in model.calib], "opset": 17},
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
    grid_rows = "\n".join(
        f"| {g['hidden']} | {g['head']} | {g['group']} | {g['lr']} | {g['bce_weight']} | {g['val_loss']:.4f} | {g['best_epoch']} | "
        f"{g['epochs_run']} | {' / '.join(f'{v:+.2f}' for v in g['calibration'])} | "
        f"{' / '.join(f'{v * 100:.1f}%' for v in g['val_coverage'].values())} | {g['val_score']:.4f} | {g['seconds']} |"
        for g in meta["training"]["grid"])
    cold_txt = "; ".join(f"{n} " + "/".join(f"{v:g}" for v in p)
                         for n, p in meta["diagnostics"]["cold_start_train_y_percentiles_50_75_90"].items())
    files = "\n".join(f"- `../shared/traces/{f['file']}` — sha256 `{f['sha256']}`" for f in meta["training_data"])
    wcount = "\n".join(f"| {n} | {w.td.n_buckets} | {len(w.td.series)} | " + " | ".join(
        str(int(w.mask(s).sum())) for s in SPLITS) + " |" for n, w in wins.items())
    feats = "\n".join(f"{i}. `{n}`" for i, n in enumerate(meta["features"]))
    text = f"""# Model card: shadowcdn demand forecaster (`models/lstm.onnx`)

*Generated by `models/train/train.py`; do not edit by hand — rerun training instead.*

## What it is
A small LSTM (1 layer, hidden {cfg['hidden']}, then a Linear–ReLU–Linear head of width {cfg['head']}) that reads the last
32 buckets (15 min each) of one (resource, region) request-count series and forecasts the total demand `y` of the
next 4 buckets (one hour) as quantiles 0.1 / 0.5 / 0.9, plus `p_any` = P(y ≥ 1). The LSTM reads the 32 log counts
(feature 0) as {meta['architecture']['steps']} steps of {cfg['group']} buckets (input size {cfg['group']}: no count is dropped, the recurrence is
{meta['architecture']['steps']} steps long); the head reads its last hidden state and features 1–{F - 1} of the last step (calendar, priority, window mean,
and the three features that look beyond the window: the seasonal-naive sum one day back, the 7-day history mean and
the number of buckets since the last request).
Quantiles are produced in ln(1+y) space as q50 plus cumulative softplus offsets (so they never cross), around a
persistence prior `ln(1 + 4·window mean)`, then shifted by per-quantile calibration offsets fitted on the
validation split ({' / '.join(f'{v:+.2f}' for v in meta['architecture']['calibration_offsets_log1p'])} for q10 / q50 / q90, in ln(1+y); q10/q90
clipped to q50), all inside the graph; the exported graph applies `exp(q) − 1`, clamps at 0 and applies the sigmoid.
Inside the graph the batch is the last axis, so each LSTM step is one small Gemm over `[input; h]` with
N = batch plus element-wise ops on contiguous rows (one batch of 10,000 series: see bench/RESULTS.md).

- ONNX (opset 17): inputs `counts` float32 `[batch, 32]` (feature 0 of every step) and `context` float32
  `[batch, {F - 1}]` (features 1–{F - 1} of the last step; models/README.md, "Model input"), dynamic batch; outputs `quantiles` float32
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
query. Region = fnv1a64(client) % 2. Per trace the 50 resources most requested before the test tail (so the
held-out part does not choose the series) × 2 regions = 100 series over the trace's full bucket range (zeros
included).

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

Calibration (`calibrate` in train.py, validation split only): per-quantile offsets in ln(1+y) space on a 0.02 grid in
[-2, 2]; q50's minimises the mean over traces of MAE / MAE(seasonal naive); q10's and q90's jointly minimise the mean
over traces of pinball_q10 / pinball_q10(naive) + pinball_q90 / pinball_q90(naive) subject to every trace's
p10–p90 coverage lying in {COVERAGE_BAND[0] * 100:.0f}–{COVERAGE_BAND[1] * 100:.0f}% (the issue's 75–85% with a margin). They are stored in the
graph, so `lstm.onnx` outputs calibrated quantiles and Rust needs no extra step.

Configurations tried (hidden 8 so one 10,000-series batch fits the 20 ms budget on one core; "buckets/step" = how
many buckets one LSTM step reads). Each is trained with early stopping on the validation loss, then calibrated; the
one with the lowest calibrated validation score (mean over traces and quantiles of count-space pinball / seasonal
naive's) is exported:

| hidden | head | buckets/step | lr | BCE weight | best val loss | best epoch | epochs run | calibration q10 / q50 / q90 | val coverage apache / nasa | val score | seconds |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |
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
within the horizon, so for them y ≥ 1 always. From the 32 steps alone such inputs of the two traces look the same
(only the time features differ), and earlier models predicted the pooled cold-start tail of both
traces — dominated by the NASA bulk bursts (y percentiles 50/75/90 of the training cold starts: {cold_txt}) —
which inflated their p90 on Apache cold starts. Features 7 and 8 (seasonal-naive sum one day back, 7-day history mean)
and, in this version, 9 (buckets since the last request: Apache cold starts follow hours of silence, NASA ones
mostly a silent week) give the model the series' longer history for them.
Cold-start windows per split: {json.dumps(meta['diagnostics']['cold_start_windows'])}.

{warm_table}

## Targets (from the issue), on the test split

| trace | target | LSTM (pinball: LSTM vs naive / EWMA) | status |
| --- | --- | --- | --- |
{chr(10).join(target_rows)}

Inference speed (10,000 series in one batch, one core, target ≤ 20 ms) is measured by
`cargo bench -p models --bench forecast` and reported in bench/RESULTS.md.

## Development notes
{DEV_NOTES}

## Limitations
- Tiny data: the Apache log is 3.5 days (333 buckets) so its test split is ~12 hours, and the history never reaches
  7 days (at most 3 seasonal lags); the NASA log spans two years but is extremely bursty and nearly idle in its
  last 30%, so its test split contains few non-dead windows ({int(wins['nasa'].mask('test').sum())}) and metrics there are noisy (one
  window more or less moves coverage by 0.8 points).
- The NASA traffic is dominated by one client (crawler-like bulk downloads), not CDN-like human traffic; the Apache
  log is a single personal website. Neither is CDN traffic; the regions are synthetic (hash of client).
- The calibration offsets and the model choice rest on the validation split ({int(wins['nasa'].mask('val').sum())} NASA windows from 14
  weeks spread over the two years); the NASA regimes differ wildly from week to week (uncalibrated coverage per
  validation week ranged from 68% to 92% for a model trained on this split), so coverage on one held-out stretch such as the test tail can still
  land outside 75–85% — compare the validation and test tables above. The offsets are shared by both traces.
- A demand level the training data never held is not extrapolated: in the rolling-origin fold cut at 40% of the
  traces (bench/RESULTS.md, "Rolling origin"), whose NASA training data has no window with four buckets of 50+
  requests, the model forecast about 1 request per hour through a 5-hour burst of ~450 per hour, where EWMA follows
  the level. In service the broker's per-series guard hands such a series to a baseline after a few buckets.
- Top-50 resources per trace only; long-tail and brand-new resources are not represented in training.
- Priority is always 5 in the traces, so the model has never seen feature 5 vary.
- Timestamps of the NASA log are local server time with unknown zone, treated as UTC, so time-of-day features may
  be shifted for that trace.

## Retrain
```sh
bash models/train/train.sh          # traces from ../shared/traces, or set SHADOWCDN_TRACES
```
Deterministic for a given seed and thread count on the same software versions (`models/train/requirements.txt`)
and the same CPU type (torch's CPU kernels differ between CPUs, see the development notes).
"""
    with open(path, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
