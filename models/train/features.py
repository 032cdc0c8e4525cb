"""Feature pipeline, targets, dead windows, baselines and metrics (models/README.md, "The contract").

Everything here is the reference the Rust crate `models` reproduces; models/fixtures/features.json
pins the numbers. Exact arithmetic choices (where the contract leaves room) are spelled out in the
docstrings so both sides compute the same thing.
"""

from __future__ import annotations

import math

import numpy as np

W = 32  # window length (buckets)
H = 4  # horizon (buckets)
F = 10  # features per step
BUCKET_SECS = 900
QUANTILES = (0.1, 0.5, 0.9)
EWMA_ALPHA = 0.3
FEATURE_NAMES = [
    "log1p_count",
    "sin_time_of_day",
    "cos_time_of_day",
    "sin_day_of_week",
    "cos_day_of_week",
    "priority_over_10",
    "log1p_window_mean",
    "log1p_seasonal_naive",
    "log1p_history_mean",
    "log1p_silence",
]


def period_buckets(bucket_secs: int = BUCKET_SECS) -> int:
    return 86400 // bucket_secs


def max_history(bucket_secs: int = BUCKET_SECS) -> int:
    return 7 * 86400 // bucket_secs


# ----------------------------------------------------------------------------------------------
# Features


def time_features(t: int) -> tuple[float, float, float, float]:
    """sin/cos of time of day and day of week for a bucket start `t` (UTC seconds)."""
    tod = (t % 86400) / 86400.0
    dow = ((t // 86400) + 4) % 7  # 0 = Sunday; 1970-01-01 was a Thursday
    a = 2.0 * math.pi * tod
    b = 2.0 * math.pi * dow / 7.0
    return math.sin(a), math.cos(a), math.sin(b), math.cos(b)


def history_features(hist, bucket_secs: int = BUCKET_SECS) -> tuple[float, float, float]:
    """The per-window features that look beyond the W-step window, from the whole history
    `hist` (counts of consecutive buckets ending at the window end; only the last 7 days count):

    - feature 7, `log1p_seasonal_naive` = ln(1 + s) with s the seasonal-naive p50 (see
      `seasonal_naive`): the sum of the H buckets one day (P buckets) before the target buckets,
      hist[n-P : n-P+H], or with fewer than P buckets of history the sum of the last H buckets;
    - feature 8, `log1p_history_mean` = ln(1 + mean(hist[-L:])) with L = min(len(hist), 7 days);
    - feature 9, `log1p_silence` = ln(1 + z), z = the number of buckets after the last non-zero
      count of hist[-L:] (0 when the last bucket is non-zero; L when all L are zero).
    """
    h = np.asarray(hist, dtype=np.int64)
    n = h.shape[0]
    p = period_buckets(bucket_secs)
    s = int(h[n - p:n - p + H].sum()) if n >= p else int(h[max(0, n - H):n].sum())
    L = min(n, max_history(bucket_secs))
    mean = float(h[n - L:].sum()) / L if L > 0 else 0.0
    nz = np.nonzero(h[n - L:])[0]
    z = (L - 1 - int(nz[-1])) if len(nz) else L
    return math.log1p(float(s)), math.log1p(mean), math.log1p(float(z))


def window_features(counts, last_bucket_start: int, priority: int = 5,
                    bucket_secs: int = BUCKET_SECS) -> np.ndarray:
    """Features of the window made of the last W counts of `counts` (the history).

    `last_bucket_start` is the start of the last history bucket, so step i (0..W-1) starts at
    `last_bucket_start - (W - 1 - i) * bucket_secs`. Features 6-9 are the same at every step.
    Computed in float64, returned as float32 `[W, F]`.
    """
    full = np.asarray(counts, dtype=np.float64)
    if full.shape[0] < W:
        raise ValueError(f"need at least {W} buckets of history, got {full.shape[0]}")
    c = full[-W:]
    mean_feat = math.log1p(float(c.sum()) / W)
    sn_feat, hist_feat, sil_feat = history_features(np.asarray(counts, dtype=np.int64), bucket_secs)
    out = np.empty((W, F), dtype=np.float64)
    for i in range(W):
        t = last_bucket_start - (W - 1 - i) * bucket_secs
        s1, c1, s2, c2 = time_features(t)
        out[i] = (math.log1p(c[i]), s1, c1, s2, c2, priority / 10.0, mean_feat, sn_feat, hist_feat, sil_feat)
    return out.astype(np.float32)


def series_windows_features(counts: np.ndarray, first_bucket: int, ends: np.ndarray,
                            priority: int = 5, bucket_secs: int = BUCKET_SECS) -> np.ndarray:
    """Vectorised `window_features` for many windows of one series, each with the history
    counts[max(0, e - 7 days) : e].

    `ends[j]` is the exclusive end index of window j: inputs are counts[e-W:e], the target
    buckets counts[e:e+H]. Returns float32 `[len(ends), W, F]`; equal to `window_features`
    (checked in train.py).
    """
    n = counts.shape[0]
    t = first_bucket + np.arange(n, dtype=np.int64) * bucket_secs
    tod = (t % 86400) / 86400.0
    dow = ((t // 86400) + 4) % 7
    per_bucket = np.stack([
        np.log1p(counts.astype(np.float64)),
        np.sin(2.0 * np.pi * tod), np.cos(2.0 * np.pi * tod),
        np.sin(2.0 * np.pi * dow / 7.0), np.cos(2.0 * np.pi * dow / 7.0),
        np.full(n, priority / 10.0),
    ], axis=1)
    idx = ends[:, None] - W + np.arange(W)[None, :]
    x = np.empty((len(ends), W, F), dtype=np.float64)
    x[:, :, :6] = per_bucket[idx]
    csum = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
    wsum = (csum[ends] - csum[ends - W]).astype(np.float64)
    x[:, :, 6] = np.log1p(wsum / W)[:, None]
    p = period_buckets(bucket_secs)
    L = np.minimum(ends, max_history(bucket_secs))  # history length
    sn = np.where(L >= p, csum[np.clip(ends - p + H, 0, None)] - csum[np.clip(ends - p, 0, None)],
                  csum[ends] - csum[np.maximum(ends - L, ends - H)])
    x[:, :, 7] = np.log1p(sn.astype(np.float64))[:, None]
    hsum = (csum[ends] - csum[ends - L]).astype(np.float64)
    x[:, :, 8] = np.log1p(hsum / L)[:, None]
    # index of the last non-zero count at or before each bucket (-1: none yet)
    last_nz = np.maximum.accumulate(np.where(counts > 0, np.arange(n), -1))
    j = last_nz[ends - 1]
    z = np.where(j >= ends - L, ends - 1 - j, L)
    x[:, :, 9] = np.log1p(z.astype(np.float64))[:, None]
    return x.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Targets and dead windows


def target(counts: np.ndarray, end: int) -> int:
    """y = sum of the H counts following the window (indices end .. end+H-1)."""
    return int(counts[end:end + H].sum())


def is_dead(counts: np.ndarray, end: int) -> bool:
    """Dead: the last W input counts and the H target counts are all zero."""
    return not np.any(counts[end - W:end + H])


# ----------------------------------------------------------------------------------------------
# Baselines. Both take the history (counts of consecutive buckets up to the window end, at most
# 7 days) and return ((p10, p50, p90), p_any) as floats.


def seasonal_naive(hist, bucket_secs: int = BUCKET_SECS):
    """Seasonal naive with period P = one day.

    n = len(hist). p50 = sum(hist[n-P : n-P+H]) if n >= P else sum(hist[n-H : n]).
    d_k = sum(hist[n-kP : n-kP+H]) for k = 1..7 with n - kP >= 0.
    p10 = min(quantile(d, 0.1), p50), p90 = max(quantile(d, 0.9), p50) using numpy's default
    (linear) quantile; with no d_k, p10 = p90 = p50. p_any = fraction of d_k >= 1; with no d_k,
    1 if p50 >= 1 else 0.
    """
    h = np.asarray(hist, dtype=np.int64)
    n = h.shape[0]
    p = period_buckets(bucket_secs)
    d = [int(h[n - k * p:n - k * p + H].sum()) for k in range(1, 8) if n - k * p >= 0]
    if n >= p:
        p50 = float(h[n - p:n - p + H].sum())
    else:
        p50 = float(h[max(0, n - H):n].sum())
    if d:
        da = np.asarray(d, dtype=np.float64)
        p10 = min(float(np.quantile(da, 0.1)), p50)
        p90 = max(float(np.quantile(da, 0.9)), p50)
        p_any = sum(1 for v in d if v >= 1) / len(d)
    else:
        p10 = p90 = p50
        p_any = 1.0 if p50 >= 1 else 0.0
    return (p10, p50, p90), float(p_any)


def poisson_quantile(lam: float, q: float) -> int:
    """Smallest k with Poisson CDF(k; lam) >= q.

    Computed in float64 as: lp = -lam; cdf = exp(lp); k = 0; while cdf < q:
    k += 1; lp += ln(lam) - ln(k); cdf += exp(lp). (Log-space so large lam does not underflow.)
    lam <= 0 gives 0.
    """
    if lam <= 0.0:
        return 0
    ln_lam = math.log(lam)
    lp = -lam
    cdf = math.exp(lp)
    k = 0
    limit = int(lam + 50.0 * math.sqrt(lam) + 100.0)
    while cdf < q and k < limit:
        k += 1
        lp += ln_lam - math.log(k)
        cdf += math.exp(lp)
    return k


def ewma_level(hist, alpha: float = EWMA_ALPHA) -> float:
    """level = hist[0]; then for each following count c: level = alpha*c + (1-alpha)*level."""
    it = iter(hist)
    level = float(next(it))
    one_minus = 1.0 - alpha
    for c in it:
        level = alpha * float(c) + one_minus * level
    return level


def ewma(hist, alpha: float = EWMA_ALPHA):
    """EWMA: lambda = H * level; quantiles = Poisson quantiles of lambda; p_any = 1 - exp(-lambda)."""
    lam = H * ewma_level(hist, alpha)
    qs = tuple(float(poisson_quantile(lam, q)) for q in QUANTILES)
    return qs, float(1.0 - math.exp(-lam))


# ----------------------------------------------------------------------------------------------
# Metrics


def pinball(y: np.ndarray, pred: np.ndarray, q: float) -> float:
    diff = y - pred
    return float(np.mean(np.maximum(q * diff, (q - 1.0) * diff)))


def metrics(y, quantiles, p_any, naive_mae: float) -> dict:
    """y [n], quantiles [n, 3] (p10, p50, p90, in counts), p_any [n].

    MASE = MAE / MAE(seasonal naive) on the same windows.
    """
    y = np.asarray(y, dtype=np.float64)
    qs = np.asarray(quantiles, dtype=np.float64)
    pa = np.asarray(p_any, dtype=np.float64)
    mae = float(np.mean(np.abs(y - qs[:, 1])))
    return {
        "mae": mae,
        "mase": (mae / naive_mae) if naive_mae > 0 else float("nan"),
        "pinball": {f"q{int(round(q * 100))}": pinball(y, qs[:, i], q) for i, q in enumerate(QUANTILES)},
        "coverage": float(np.mean((qs[:, 0] <= y) & (y <= qs[:, 2]))),
        "brier": float(np.mean((pa - (y >= 1).astype(np.float64)) ** 2)),
        "windows": int(y.shape[0]),
    }
