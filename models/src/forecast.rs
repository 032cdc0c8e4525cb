//! What a forecaster returns, and the trait every forecaster implements.

use crate::features::History;

/// Quantile levels of every forecast.
pub const QUANTILES: [f32; 3] = [0.1, 0.5, 0.9];

/// Demand over the next `HORIZON` buckets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// Requests at quantiles 0.1, 0.5, 0.9 (non-negative, non-decreasing).
    pub quantiles: [f32; 3],
    /// Probability of at least one request in the horizon.
    pub p_any: f32,
}

impl Forecast {
    /// A forecast from a model's raw outputs, held to the contract: `p_any` lies in [0, 1],
    /// quantiles are non-negative and non-decreasing, and a value that is not a finite number
    /// counts as 0 (a NaN would otherwise slip through every threshold comparison of the
    /// planner and sort first). The ONNX model fails a batch with such a value instead, so
    /// the baseline answers it.
    pub fn from_raw(quantiles: [f32; 3], p_any: f32) -> Self {
        let clean = |v: f32| if v.is_finite() { v.max(0.0) } else { 0.0 };
        let mut q = quantiles.map(clean);
        q.sort_by(f32::total_cmp);
        Forecast {
            quantiles: q,
            p_any: clean(p_any).min(1.0),
        }
    }

    /// The median forecast.
    pub fn p50(&self) -> f32 {
        self.quantiles[1]
    }
}

/// Why a batch could not be forecast.
#[derive(Debug, thiserror::Error)]
pub enum ForecastError {
    /// ONNX Runtime failed.
    #[error("onnx runtime: {0}")]
    Runtime(String),
    /// The model answered with unexpected shapes.
    #[error("model output: {0}")]
    Output(String),
    /// A series' buckets are not the width the model was trained on: its calendar and
    /// seasonal features would mean other times than the model learned.
    #[error("series of {got}-second buckets; the model forecasts {want}-second ones")]
    Bucket {
        /// The series' bucket width.
        got: i64,
        /// The model's.
        want: u64,
    },
}

/// A demand forecaster: one call predicts a whole batch of series.
pub trait Forecaster: Send + Sync {
    /// Short name for logs, metrics and reports.
    fn name(&self) -> &str;
    /// Forecast every history; the result has one entry per input, in order.
    fn forecast(&self, histories: &[History<'_>]) -> Result<Vec<Forecast>, ForecastError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_outputs_are_held_to_the_contract() {
        let f = Forecast::from_raw([f32::NAN, 2.0, f32::INFINITY], f32::NAN);
        assert_eq!((f.quantiles, f.p_any), ([0.0, 0.0, 2.0], 0.0));
        let f = Forecast::from_raw([3.0, -1.0, 5.0], 1.5);
        assert_eq!((f.quantiles, f.p_any), ([0.0, 3.0, 5.0], 1.0));
        let f = Forecast::from_raw([0.5, 1.0, 4.0], 0.7);
        assert_eq!((f.quantiles, f.p_any), ([0.5, 1.0, 4.0], 0.7));
    }
}
