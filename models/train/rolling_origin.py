"""Rolling-origin evaluation of the training pipeline (bench/RESULTS.md, "Rolling origin").

Usage: python models/train/rolling_origin.py [TRACES_DIR] --out DIR
           [--fractions 0.4,0.55,0.7,0.85,1.0] [--forecast-eval target/release/forecast_eval]

The committed model is judged on one held-out tail per trace, the last 15% of its time range. On
the NASA log that tail holds 0.4% of the requests, too few to tell forecasters apart. This
script asks the same question of more data without looking at any test tail twice: for each
fraction f it cuts both traces at f of their time range, reruns the whole training pipeline on
what is left (`train.py --end-fraction f`: series ranking, splits, training, calibration and
model selection all see only the cut trace) and scores the fold's model on the fold's own test
tail with the Rust evaluator (`forecast_eval`, which also scores the LSTM behind the broker's
per-series guard). With the default fractions the five test tails are the stretches
[0.34, 0.40], [0.47, 0.55], [0.60, 0.70], [0.72, 0.85] and [0.85, 1.0] of each trace, so
together they cover most of its last two thirds and no window is scored twice. The fractions
were fixed before any fold was scored.

Writes DIR/fold-<f>/ (each fold's model, datasets and report) and DIR/rolling-origin.json, and
prints one markdown table per trace: every fold, then the folds pooled (metrics are means over
windows, so the pool weighs each fold by its window count; MASE pooled = pooled MAE / pooled
seasonal-naive MAE).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
MODELS = ("lstm", "lstm_guarded", "seasonal_naive", "ewma")
QS = ("q10", "q50", "q90")


def fractions(text: str) -> list[float]:
    try:
        out = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"fractions must be comma-separated numbers, got {text!r}")
    if not out or any(not 0.0 < f <= 1.0 for f in out):
        raise argparse.ArgumentTypeError(f"every fraction must be in (0, 1], got {text!r}")
    return sorted(set(out))


def run(cmd: list[str], log_path: str) -> None:
    with open(log_path, "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"rolling_origin: {' '.join(cmd)} failed with exit code {r.returncode}; see {log_path}")


def fold(args, f: float) -> dict:
    """Train and score one fold; returns forecast_eval's report (metrics per trace and model)."""
    d = os.path.join(args.out, f"fold-{f:g}")
    os.makedirs(d, exist_ok=True)
    run([sys.executable, os.path.join(HERE, "train.py"), args.traces, "--out", d, "--end-fraction", str(f),
         "--seed", str(args.seed)], os.path.join(d, "train.log"))
    build = os.path.join(d, "build")
    datasets = sorted(os.path.join(build, n) for n in os.listdir(build) if n.startswith("dataset-"))
    cmd = [args.forecast_eval, "--model", os.path.join(d, "lstm.onnx"), "--out", d]
    for ds in datasets:
        cmd += ["--dataset", ds]
    run(cmd, os.path.join(d, "forecast_eval.log"))
    with open(os.path.join(d, "forecast-eval.json")) as fh:
        report = json.load(fh)
    bounds = {}
    for ds in datasets:
        with open(ds) as fh:
            meta = json.load(fh)
        bounds[meta["trace"]] = {"val_end": meta["val_end"],
                                 "end": meta["first_bucket"] + meta["n_buckets"] * meta["bucket_secs"]}
    return {"fraction": f, "metrics": report, "test_range": bounds}


def pool(rows: list[dict]) -> dict:
    """Window-weighted means of per-fold metrics; MASE from the pooled MAEs."""
    n = sum(r["lstm"]["windows"] for r in rows)
    out = {}
    for m in MODELS:
        if any(m not in r for r in rows):
            continue
        w = [(r[m], r[m]["windows"]) for r in rows]
        mean = lambda key: sum(x[key] * k for x, k in w) / n  # noqa: E731
        out[m] = {
            "mae": mean("mae"),
            "coverage": mean("coverage"),
            "brier": mean("brier"),
            "pinball": {q: sum(x["pinball"][q] * k for x, k in w) / n for q in QS},
            "windows": n,
        }
    naive = out["seasonal_naive"]["mae"]
    for m in out.values():
        m["mase"] = m["mae"] / naive if naive > 0 else float("nan")
    return out


def table(trace: str, folds: list[dict], pooled: dict) -> str:
    rows = [f"#### {trace}", "",
            "| fold (cut at) | model | MAE | MASE | pinball q10 | pinball q50 | pinball q90 | coverage p10–p90 | windows |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, ms in [(f"{fo['fraction']:g}", fo["metrics"][trace]) for fo in folds] + [("pooled", pooled)]:
        for m in MODELS:
            if m not in ms:
                continue
            x, p = ms[m], ms[m]["pinball"]
            rows.append(f"| {label} | {m} | {x['mae']:.3f} | {x['mase']:.3f} | {p['q10']:.3f} | {p['q50']:.3f} | "
                        f"{p['q90']:.3f} | {x['coverage'] * 100:.1f}% | {x['windows']} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="?", default=os.path.join(REPO, "..", "shared", "traces"))
    ap.add_argument("--out", required=True, help="scratch directory for the folds (not models/)")
    ap.add_argument("--fractions", type=fractions, default=fractions("0.4,0.55,0.7,0.85,1.0"))
    ap.add_argument("--forecast-eval", default=os.path.join(REPO, "target", "release", "forecast_eval"),
                    help="the Rust evaluator (cargo build --release -p shadowcdn-bench --bin forecast_eval)")
    ap.add_argument("--seed", type=int, default=20240531)
    args = ap.parse_args()
    args.traces = os.path.abspath(args.traces)
    args.out = os.path.abspath(args.out)
    if os.path.commonpath([args.out, os.path.join(REPO, "models")]) == os.path.join(REPO, "models"):
        ap.error("--out must not be inside models/: the folds' models would replace the committed one")
    if not os.access(args.forecast_eval, os.X_OK):
        ap.error(f"{args.forecast_eval} is not an executable; build it with "
                 "`cargo build --release -p shadowcdn-bench --bin forecast_eval` or pass --forecast-eval")

    folds = []
    for f in args.fractions:
        print(f"fold {f:g}: training and scoring ...", file=sys.stderr, flush=True)
        folds.append(fold(args, f))
    traces = list(folds[0]["metrics"])
    result = {"fractions": args.fractions, "folds": folds,
              "pooled": {t: pool([fo["metrics"][t] for fo in folds]) for t in traces}}
    with open(os.path.join(args.out, "rolling-origin.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    for t in traces:
        print(table(t, folds, result["pooled"][t]) + "\n")


if __name__ == "__main__":
    main()
