"""Where the committed LSTM's NASA MASE comes from, on the VALIDATION split only (the test tail
is not read): MASE per validation week, and on the "sparse" weeks — those where seasonal naive
forecasts zero for almost every window, as on the test tail — how much of the demand arrives in
cold-start windows (all 32 input buckets zero), which no forecaster reading the window can see
coming, and what simple rules would score there.

    models/train/.venv/bin/python models/train/regimes.py [TRACES_DIR]
"""
import os
import sys

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402
import features as fx  # noqa: E402
import train  # noqa: E402

SPARSE_NAIVE_ZERO = 0.95  # a week is sparse when naive forecasts 0 for at least this share


def main() -> None:
    traces = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../../shared/traces")
    w = train.Windows(data.build_trace("nasa", traces))
    idx = np.nonzero(w.mask("val"))[0]
    x = w.x()[idx]
    q50 = ort.InferenceSession(os.path.join(HERE, "../lstm.onnx")).run(None, train.feeds(x))[0][:, 1]
    y = w.y[idx].astype(np.float64)
    naive = np.array([fx.seasonal_naive(w.history(j))[0][1] for j in idx])
    ewma = np.array([fx.ewma(w.history(j))[0][1] for j in idx])
    last4 = np.array([w.counts[w.series[j], w.end[j] - fx.H:w.end[j]].sum() for j in idx], dtype=np.float64)
    cold = x[:, :, 0].max(axis=1) == 0
    week = w.block[idx]

    def mase(pred, m):
        den = np.abs(y[m] - naive[m]).sum()
        return np.abs(y[m] - pred[m]).sum() / den if den > 0 else float("nan")

    everything = np.ones_like(cold)
    print(f"validation windows {len(y)}; pooled MASE lstm {mase(q50, everything):.3f}, ewma {mase(ewma, everything):.3f}")
    print("week  windows  naive=0  y=0   share of naive's error  MASE lstm  MASE ewma")
    sparse = np.zeros_like(cold)
    total = np.abs(y - naive).sum()
    for k in np.unique(week):
        m = week == k
        nz = float(np.mean(naive[m] == 0))
        if nz >= SPARSE_NAIVE_ZERO:
            sparse |= m
        share = np.abs(y[m] - naive[m]).sum() / total
        print(f"{k:4d}  {m.sum():7d}  {nz:7.2f}  {np.mean(y[m] == 0):4.2f}  {share:22.3f}  "
              f"{mase(q50, m):9.3f}  {mase(ewma, m):9.3f}")
    s = sparse
    print(f"\nsparse weeks (naive = 0 for >= {SPARSE_NAIVE_ZERO:.0%} of windows): {s.sum()} windows")
    print(f"  MASE lstm {mase(q50, s):.3f}, ewma {mase(ewma, s):.3f}, always 0 {mase(np.zeros_like(y), s):.3f}")
    for c in (0.25, 0.5, 1.0):
        print(f"  MASE {c} x sum of the last {fx.H} buckets {mase(c * last4, s):.3f}")
    pos = s & (y > 0)
    print(f"  windows with y > 0: {pos.sum()}, of which cold starts {(pos & cold).sum()} "
          f"carrying {y[pos & cold].sum() / y[pos].sum():.0%} of the demand")
    oracle = np.where(cold, 0.0, y)
    print(f"  MASE of an oracle exact on every window but cold starts (0 there): {mase(oracle, s):.3f}")
    print(f"  MASE lstm on cold starts {mase(q50, s & cold):.3f}, on the rest {mase(q50, s & ~cold):.3f}")


if __name__ == "__main__":
    main()
