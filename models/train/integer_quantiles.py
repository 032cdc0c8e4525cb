"""Would integer quantiles help the committed LSTM? On the VALIDATION split only (the test tail
is not read): request counts are integers, so every quantile of their distribution is one, and
between two integers the expected pinball loss is linear. This snaps each LSTM quantile to
floor(q + c) and reports, per trace, the pinball loss relative to seasonal naive for each
offset c; then the best (c10, c90) pair against the p10-p90 coverage band the calibration
keeps (76-84%), with q50 snapped at its best offset.

    models/train/.venv/bin/python models/train/integer_quantiles.py [TRACES_DIR]
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

OFFSETS = np.round(np.arange(0, 1.0, 0.05), 2)


def main() -> None:
    traces = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../../shared/traces")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(os.path.join(HERE, "../lstm.onnx"), so, providers=["CPUExecutionProvider"])
    traces_val = {}
    for name in data.TRACE_FILES:
        w = train.Windows(data.build_trace(name, traces))
        idx = np.nonzero(w.mask("val"))[0]
        (naive, _), _ = train.baseline_preds(w, idx)
        lstm, _ = train.ort_predict(sess, w.x()[idx])
        traces_val[name] = (w.y[idx].astype(np.float64), naive, lstm.astype(np.float64))

    def rel(k, q, preds):
        return [fx.pinball(y, p, q) / fx.pinball(y, naive[:, k], q)
                for (y, naive, _), p in zip(traces_val.values(), preds)]

    names = list(traces_val)
    best_c = {}
    for k, q in enumerate(fx.QUANTILES):
        plain = rel(k, q, [lstm[:, k] for _, _, lstm in traces_val.values()])
        print(f"q{q}: unsnapped {dict(zip(names, np.round(plain, 3)))}")
        rows = []
        for c in OFFSETS:
            r = rel(k, q, [np.floor(lstm[:, k] + c) for _, _, lstm in traces_val.values()])
            rows.append((float(np.mean(r)), c, r))
            print(f"   c={c:.2f} {dict(zip(names, np.round(r, 3)))}")
        _, best_c[k], r = min(rows, key=lambda t: t[0])
        print(f"   best c={best_c[k]:.2f} {dict(zip(names, np.round(r, 3)))}")

    best = None
    for c10 in OFFSETS:
        for c90 in OFFSETS:
            loss, gap, covs = 0.0, 0.0, []
            for y, naive, lstm in traces_val.values():
                p50 = np.floor(lstm[:, 1] + best_c[1])
                p10 = np.minimum(np.floor(lstm[:, 0] + c10), p50)
                p90 = np.maximum(np.floor(lstm[:, 2] + c90), p50)
                loss += fx.pinball(y, p10, 0.1) / fx.pinball(y, naive[:, 0], 0.1)
                loss += fx.pinball(y, p90, 0.9) / fx.pinball(y, naive[:, 2], 0.9)
                cov = float(np.mean((p10 <= y) & (y <= p90)))
                covs.append(cov)
                gap = max(gap, train.COVERAGE_BAND[0] - cov, cov - train.COVERAGE_BAND[1])
            key = (round(max(gap, 0.0), 9), loss)
            if best is None or key < best[0]:
                best = (key, c10, c90, covs)
    (gap, _), c10, c90, covs = best
    print(f"best (c10, c90) = ({c10:.2f}, {c90:.2f}): coverage "
          f"{dict(zip(names, np.round(covs, 3)))}, distance from the band {gap:.3f}")


if __name__ == "__main__":
    main()
