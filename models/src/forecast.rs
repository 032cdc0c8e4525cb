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
}

/// A demand forecaster: one call predicts a whole batch of series.
pub trait Forecaster: Send + Sync {
    /// Short name for logs, metrics and reports.
    fn name(&self) -> &str;
    /// Forecast every history; the result has one entry per input, in order.
    fn forecast(&self, histories: &[History<'_>]) -> Result<Vec<Forecast>, ForecastError>;
}
