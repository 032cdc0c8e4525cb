//! Baselines the LSTM must beat (definitions in `models/README.md`): seasonal naive with
//! empirical day-over-day quantiles, and EWMA with Poisson quantiles. They are also the
//! fallback when the model cannot be loaded.

use crate::features::{seasonal_naive_p50, History, HORIZON};
use crate::forecast::{Forecast, ForecastError, Forecaster, QUANTILES};

/// Sum of `HORIZON` counts starting at `start`, if inside the history.
fn horizon_sum(counts: &[u32], start: isize) -> Option<f64> {
    if start < 0 || start as usize + HORIZON > counts.len() {
        return None;
    }
    Some(
        counts[start as usize..start as usize + HORIZON]
            .iter()
            .map(|c| f64::from(*c))
            .sum(),
    )
}

/// numpy's default (linear interpolation) quantile of `v` (not empty).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Same time yesterday; quantiles from the same slot over the last 7 days.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeasonalNaive;

impl SeasonalNaive {
    /// Forecast one history.
    pub fn one(h: &History<'_>) -> Forecast {
        let n = h.counts.len() as isize;
        let period = (86_400 / h.bucket_secs.max(1)) as isize;
        let p50 = seasonal_naive_p50(h.counts, h.bucket_secs);
        let mut days: Vec<f64> = (1..=7)
            .filter_map(|k| horizon_sum(h.counts, n - k * period))
            .collect();
        let (p10, p90, p_any) = if days.is_empty() {
            (p50, p50, if p50 >= 1.0 { 1.0 } else { 0.0 })
        } else {
            let any = days.iter().filter(|d| **d >= 1.0).count() as f64 / days.len() as f64;
            let q10 = quantile(&mut days, 0.1);
            let q90 = quantile(&mut days, 0.9);
            (q10.min(p50), q90.max(p50), any)
        };
        Forecast {
            quantiles: [p10 as f32, p50 as f32, p90 as f32],
            p_any: p_any as f32,
        }
    }
}

impl Forecaster for SeasonalNaive {
    fn name(&self) -> &str {
        "seasonal_naive"
    }

    fn forecast(&self, histories: &[History<'_>]) -> Result<Vec<Forecast>, ForecastError> {
        Ok(histories.iter().map(Self::one).collect())
    }
}

/// Exponentially weighted moving average of the per-bucket rate, Poisson quantiles.
#[derive(Debug, Clone, Copy)]
pub struct Ewma {
    /// Smoothing factor.
    pub alpha: f64,
}

impl Default for Ewma {
    fn default() -> Self {
        Ewma { alpha: 0.3 }
    }
}

/// Smallest `k` with Poisson(λ) CDF(k) ≥ q. The pmf is carried in log space so a large λ
/// does not underflow `e^(−λ)` to zero. It sums from 0, as `models/train/features.py` does,
/// up to a λ of [`SKIP_FROM`]; above it, from 40 standard deviations below λ, where the terms
/// skipped are all under f64's smallest value (their sum, e^−800 or so, is no sum in f64
/// either): about 40√λ steps instead of λ, so a flood of requests on one series (λ in the
/// hundreds of millions) costs a planner tick milliseconds, not minutes.
pub fn poisson_quantile(lambda: f64, q: f64) -> f64 {
    if lambda <= 0.0 {
        return 0.0;
    }
    let ln_lambda = lambda.ln();
    let start = if lambda > SKIP_FROM {
        (lambda - 40.0 * lambda.sqrt()).floor()
    } else {
        0.0
    };
    let mut lp = -lambda + start * ln_lambda - ln_factorial(start);
    let mut cdf = lp.exp();
    let mut k = start as u32;
    // Bounded: the tail beyond λ + 50√λ + 100 has negligible mass (the bound
    // `models/train/features.py` uses, so both pipelines stop at the same k).
    let limit = (lambda + 50.0 * lambda.sqrt() + 100.0) as u32;
    while cdf < q && k < limit {
        k += 1;
        lp += ln_lambda - f64::from(k).ln();
        cdf += lp.exp();
    }
    f64::from(k)
}

/// Above this λ, [`poisson_quantile`] starts its sum below the mean instead of at 0.
pub const SKIP_FROM: f64 = 1e4;

/// ln(n!) for a whole `n`, by Stirling's series (to n⁻⁵; within 1e-15 of the exact value from
/// n = 100 on, and only called with n in the thousands).
fn ln_factorial(n: f64) -> f64 {
    if n < 2.0 {
        return 0.0;
    }
    let inv = 1.0 / n;
    let inv2 = inv * inv;
    n * n.ln() - n
        + 0.5 * (std::f64::consts::TAU * n).ln()
        + inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))
}

impl Ewma {
    /// Forecast one history.
    pub fn one(&self, h: &History<'_>) -> Forecast {
        let mut it = h.counts.iter().map(|c| f64::from(*c));
        let mut level = it.next().unwrap_or(0.0);
        for c in it {
            level = self.alpha * c + (1.0 - self.alpha) * level;
        }
        let lambda = HORIZON as f64 * level;
        let q = QUANTILES.map(|q| poisson_quantile(lambda, f64::from(q)) as f32);
        Forecast {
            quantiles: q,
            p_any: (1.0 - (-lambda).exp()) as f32,
        }
    }
}

impl Forecaster for Ewma {
    fn name(&self) -> &str {
        "ewma"
    }

    fn forecast(&self, histories: &[History<'_>]) -> Result<Vec<Forecast>, ForecastError> {
        Ok(histories.iter().map(|h| self.one(h)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sum from 0, as the training code computes it.
    fn summed_from_zero(lambda: f64, q: f64) -> f64 {
        let ln_lambda = lambda.ln();
        let (mut lp, mut k) = (-lambda, 0u32);
        let mut cdf = lp.exp();
        let limit = (lambda + 50.0 * lambda.sqrt() + 100.0) as u32;
        while cdf < q && k < limit {
            k += 1;
            lp += ln_lambda - f64::from(k).ln();
            cdf += lp.exp();
        }
        f64::from(k)
    }

    #[test]
    fn a_large_lambda_gets_the_same_quantiles_in_far_fewer_steps() {
        for lambda in [10_000.5, 12_345.6, 80_000.0, 1.5e6] {
            for q in [0.1, 0.5, 0.9] {
                assert_eq!(
                    poisson_quantile(lambda, q),
                    summed_from_zero(lambda, q),
                    "lambda {lambda}, q {q}"
                );
            }
        }
        for n in [100.0_f64, 6_000.0] {
            let exact: f64 = (1..=n as u32).map(|k| f64::from(k).ln()).sum();
            assert!((ln_factorial(n) - exact).abs() < 1e-9 * exact, "{n}");
        }
        // A flood: answered, and ordered.
        let q: Vec<f64> = [0.1, 0.5, 0.9]
            .iter()
            .map(|q| poisson_quantile(3.6e8, *q))
            .collect();
        assert!(
            q[0] < q[1] && q[1] < q[2] && (q[1] - 3.6e8).abs() < 10.0,
            "{q:?}"
        );
    }

    fn hist(counts: &[u32]) -> History<'_> {
        History {
            counts,
            last_bucket_start: 0,
            bucket_secs: 21_600, // 4 buckets a day keeps the test small
            priority: 5,
        }
    }

    #[test]
    fn seasonal_naive_uses_yesterday_and_day_quantiles() {
        // 3 days of 4 buckets: day sums 4, 8, 12 for the slot starting one period back.
        let counts = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3];
        let f = SeasonalNaive::one(&hist(&counts));
        assert_eq!(f.quantiles[1], 12.0);
        // d = [12, 8, 4] → q10 = 4.8, q90 = 11.2 → p90 raised to p50.
        assert!((f.quantiles[0] - 4.8).abs() < 1e-5);
        assert_eq!(f.quantiles[2], 12.0);
        assert_eq!(f.p_any, 1.0);
    }

    #[test]
    fn seasonal_naive_short_history_uses_last_horizon() {
        let f = SeasonalNaive::one(&hist(&[0, 2, 0, 1]));
        assert_eq!(f.quantiles, [3.0, 3.0, 3.0]);
        assert_eq!(f.p_any, 1.0);
    }

    #[test]
    fn poisson_quantiles() {
        assert_eq!(poisson_quantile(0.0, 0.9), 0.0);
        assert_eq!(poisson_quantile(1.0, 0.5), 1.0);
        assert_eq!(poisson_quantile(1.0, 0.1), 0.0);
        assert_eq!(poisson_quantile(1.0, 0.9), 2.0);
        // λ = 1000: e^(−λ) underflows, the log-space pmf does not.
        let q = poisson_quantile(1000.0, 0.5);
        assert!((995.0..=1005.0).contains(&q), "{q}");
        let f = Ewma::default().one(&hist(&[0, 0, 10]));
        assert!(f.p_any > 0.99);
    }
}
