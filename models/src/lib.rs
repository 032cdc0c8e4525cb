//! shadowcdn demand forecasting.
//!
//! Every forecaster implements [`Forecaster`]: given the recent per-bucket request counts of
//! many (resource, region) series, it returns demand quantiles over the next
//! [`features::HORIZON`] buckets and the probability of any request. Implementations: the
//! LSTM served through ONNX Runtime ([`onnx::OnnxLstm`], wrapped with hot reload and a
//! fallback in [`reload::ReloadingForecaster`]), and the baselines [`baseline::SeasonalNaive`]
//! and [`baseline::Ewma`]. [`guard::SeriesGuard`] lets a baseline answer a series on which it
//! has lately been clearly better than the model, and [`calibration::Calibrator`] makes each
//! forecaster's P(any request) come true as often as it says. [`features`] is the pipeline shared with the
//! Python training code; the contract is `models/README.md`.

pub mod baseline;
pub mod calibration;
pub mod features;
pub mod forecast;
pub mod guard;
pub mod metrics;
pub mod onnx;
pub mod reload;

pub use features::History;
pub use forecast::{Forecast, ForecastError, Forecaster};
