#![allow(missing_docs)] // criterion_group! generates an undocumented fn

//! Inference speed: one batch of 10,000 series on one core, LSTM (ONNX Runtime, 1 intra-op
//! thread) vs the baselines. `cargo bench -p models --bench forecast`
//! (needs `models/lstm.onnx` and ONNX Runtime from `deploy/setup.sh` for the LSTM row).

use criterion::{criterion_group, criterion_main, Criterion};
use models::baseline::{Ewma, SeasonalNaive};
use models::features::History;
use models::onnx::OnnxLstm;
use models::Forecaster;

const SERIES: usize = 10_000;
const HISTORY: usize = 672; // 7 days of 15-minute buckets

fn synthetic() -> Vec<Vec<u32>> {
    // Deterministic, diurnal-ish, sparse counts (xorshift).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..SERIES)
        .map(|s| {
            (0..HISTORY)
                .map(|t| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let base = 1.0 + ((t % 96) as f64 / 96.0 * std::f64::consts::TAU).sin();
                    ((x % 100) as f64 / 100.0 * base * (1 + s % 7) as f64) as u32
                })
                .collect()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let data = synthetic();
    let hs: Vec<History<'_>> = data
        .iter()
        .map(|counts| History {
            counts,
            last_bucket_start: 1_700_000_000 - 1_700_000_000 % 900,
            bucket_secs: 900,
            priority: 5,
        })
        .collect();
    let mut g = c.benchmark_group("forecast_10k_series");
    g.sample_size(20);
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("lstm.onnx");
    match OnnxLstm::load(&model, 1) {
        Ok(lstm) => {
            g.bench_function("lstm_ort_1_thread", |b| {
                b.iter(|| lstm.forecast(&hs).expect("forecast"))
            });
        }
        Err(e) => eprintln!("skipping the LSTM: {e}"),
    }
    // The part of the LSTM row spent building its input (`counts` and `context`) in Rust.
    let (mut counts, mut context) = (Vec::new(), Vec::new());
    g.bench_function("lstm_input_features_only", |b| {
        b.iter(|| models::features::batch_model_input_into(&hs, &mut counts, &mut context))
    });
    // For comparison: the full [10000, 32, 10] feature windows (the parity-tested layout that
    // the model input is a projection of; the model input used to be this).
    let mut full = Vec::new();
    g.bench_function("full_feature_windows", |b| {
        b.iter(|| models::features::batch_features_into(&hs, &mut full))
    });
    g.bench_function("seasonal_naive", |b| {
        b.iter(|| SeasonalNaive.forecast(&hs).expect("forecast"))
    });
    let ewma = Ewma::default();
    g.bench_function("ewma", |b| b.iter(|| ewma.forecast(&hs).expect("forecast")));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
