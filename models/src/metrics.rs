//! Forecast accuracy metrics (definitions in `models/README.md`).

use crate::forecast::{Forecast, QUANTILES};

/// Accumulates metrics over (forecast, actual) pairs.
#[derive(Debug, Clone, Default)]
pub struct Accuracy {
    n: u64,
    abs_err: f64,
    pinball: [f64; 3],
    covered: u64,
    brier: f64,
}

/// Pinball (quantile) loss of predicting `q_hat` at level `tau` for actual `y`.
pub fn pinball(y: f64, q_hat: f64, tau: f64) -> f64 {
    let d = y - q_hat;
    if d >= 0.0 {
        tau * d
    } else {
        (tau - 1.0) * d
    }
}

impl Accuracy {
    /// Add one forecast and the actual demand.
    pub fn add(&mut self, f: &Forecast, y: f64) {
        self.n += 1;
        self.abs_err += (y - f64::from(f.p50())).abs();
        for (i, tau) in QUANTILES.iter().enumerate() {
            self.pinball[i] += pinball(y, f64::from(f.quantiles[i]), f64::from(*tau));
        }
        if f64::from(f.quantiles[0]) <= y && y <= f64::from(f.quantiles[2]) {
            self.covered += 1;
        }
        let hit = if y >= 1.0 { 1.0 } else { 0.0 };
        self.brier += (f64::from(f.p_any) - hit).powi(2);
    }

    /// Windows counted.
    pub fn count(&self) -> u64 {
        self.n
    }

    fn mean(&self, x: f64) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            x / self.n as f64
        }
    }

    /// Mean absolute error of the median.
    pub fn mae(&self) -> f64 {
        self.mean(self.abs_err)
    }

    /// Mean pinball loss at each quantile.
    pub fn pinball(&self) -> [f64; 3] {
        self.pinball.map(|p| self.mean(p))
    }

    /// Fraction of actuals inside [p10, p90].
    pub fn coverage(&self) -> f64 {
        self.mean(self.covered as f64)
    }

    /// Brier score of `p_any`.
    pub fn brier(&self) -> f64 {
        self.mean(self.brier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinball_and_coverage() {
        assert!((pinball(10.0, 8.0, 0.9) - 1.8).abs() < 1e-12);
        assert!((pinball(10.0, 12.0, 0.9) - 0.2).abs() < 1e-12);
        let mut a = Accuracy::default();
        a.add(
            &Forecast {
                quantiles: [1.0, 2.0, 3.0],
                p_any: 1.0,
            },
            2.0,
        );
        a.add(
            &Forecast {
                quantiles: [1.0, 2.0, 3.0],
                p_any: 0.0,
            },
            5.0,
        );
        assert_eq!(a.coverage(), 0.5);
        assert_eq!(a.mae(), 1.5);
        assert_eq!(a.brier(), 0.5);
    }
}
