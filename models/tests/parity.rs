//! The Rust pipeline against the training code: the fixture `models/fixtures/features.json`
//! holds real windows with the features, baseline forecasts and ONNX outputs Python computed.
//! Features, baselines and model outputs must match within 1e-4.

use std::path::PathBuf;

use models::baseline::{Ewma, SeasonalNaive};
use models::features::{push_features, History, N_FEATURES, WINDOW};
use models::onnx::OnnxLstm;
use models::reload::ReloadingForecaster;
use models::{Forecast, Forecaster};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    quantiles: [f32; 3],
    p_any: f32,
}

#[derive(Deserialize)]
struct Case {
    counts: Vec<u32>,
    last_bucket_start: i64,
    priority: u8,
    features: Vec<Vec<f32>>,
    quantiles: [f32; 3],
    p_any: f32,
    seasonal_naive: Expected,
    ewma: Expected,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Deserialize)]
struct Fixture {
    windows: Vec<Case>,
}

fn cases() -> Vec<Case> {
    let text =
        std::fs::read_to_string(root().join("fixtures/features.json")).expect("fixture exists");
    serde_json::from_str::<Fixture>(&text)
        .expect("fixture parses")
        .windows
}

fn history(c: &Case) -> History<'_> {
    History {
        counts: &c.counts,
        last_bucket_start: c.last_bucket_start,
        bucket_secs: 900,
        priority: c.priority,
    }
}

fn close(a: f32, b: f32, what: &str) {
    assert!(
        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
        "{what}: rust {a} vs python {b}"
    );
}

fn same(f: &Forecast, e: &Expected, what: &str) {
    for i in 0..3 {
        close(f.quantiles[i], e.quantiles[i], &format!("{what} q{i}"));
    }
    close(f.p_any, e.p_any, &format!("{what} p_any"));
}

#[test]
fn features_match_the_training_pipeline() {
    let cases = cases();
    assert!(cases.len() >= 2);
    for (k, c) in cases.iter().enumerate() {
        let mut f = Vec::new();
        push_features(&history(c), &mut f);
        assert_eq!(c.features.len(), WINDOW);
        for (i, row) in c.features.iter().enumerate() {
            assert_eq!(row.len(), N_FEATURES);
            for (j, v) in row.iter().enumerate() {
                close(
                    f[i * N_FEATURES + j],
                    *v,
                    &format!("case {k} step {i} feature {j}"),
                );
            }
        }
    }
}

#[test]
fn baselines_match_the_training_code() {
    for (k, c) in cases().iter().enumerate() {
        same(
            &SeasonalNaive::one(&history(c)),
            &c.seasonal_naive,
            &format!("case {k} seasonal"),
        );
        same(
            &Ewma::default().one(&history(c)),
            &c.ewma,
            &format!("case {k} ewma"),
        );
    }
}

#[test]
fn onnx_outputs_match_python() {
    let lstm = OnnxLstm::load(&root().join("lstm.onnx"), 1).expect("model loads");
    let cases = cases();
    let hs: Vec<History<'_>> = cases.iter().map(history).collect();
    let out = lstm.forecast(&hs).unwrap();
    for (k, (f, c)) in out.iter().zip(&cases).enumerate() {
        same(
            f,
            &Expected {
                quantiles: c.quantiles,
                p_any: c.p_any,
            },
            &format!("case {k} lstm"),
        );
        assert!(f.quantiles[0] <= f.quantiles[1] && f.quantiles[1] <= f.quantiles[2]);
    }
}

/// Give `path` the modification time `t` (as a deploy tool restoring times would).
fn set_mtime(path: &std::path::Path, t: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// The committed metadata without its model hash (as metadata from before the hash): the
/// fixture models it is paired with are judged by the checks after it.
fn unhashed_meta() -> serde_json::Value {
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("lstm.json")).unwrap()).unwrap();
    meta.as_object_mut().unwrap().remove("model_sha256");
    meta
}

#[test]
fn bad_models_fail_clearly_and_reload_falls_back_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    // No file: clear error, and the reloading forecaster serves the baseline.
    let err = OnnxLstm::load(&model, 1).unwrap_err().to_string();
    assert!(err.contains("m.json"), "{err}");
    let r = ReloadingForecaster::new(&model, 1, std::time::Duration::ZERO);
    assert!(!r.model_loaded());
    assert_eq!(r.name(), "seasonal_naive");
    let cases = cases();
    let hs: Vec<History<'_>> = cases.iter().map(history).collect();
    let before = r.forecast(&hs).unwrap();
    same(&before[0], &cases[0].seasonal_naive, "fallback");

    // Metadata promising other features is rejected before the model is used.
    let meta = unhashed_meta();
    let mut wrong = meta.clone();
    wrong["features"][0] = "something_else".into();
    std::fs::copy(root().join("lstm.onnx"), &model).unwrap();
    std::fs::write(dir.path().join("m.json"), wrong.to_string()).unwrap();
    let err = OnnxLstm::load(&model, 1).unwrap_err().to_string();
    assert!(err.contains("features"), "{err}");

    // A corrupt model file is an ONNX Runtime error, not a panic.
    std::fs::write(dir.path().join("m.json"), meta.to_string()).unwrap();
    std::fs::write(&model, b"not a model").unwrap();
    assert!(OnnxLstm::load(&model, 1).is_err());

    // The real model replaced on disk is picked up without a restart, by a check alone (a
    // caller with nothing to forecast) as by a forecast.
    std::fs::copy(root().join("lstm.onnx"), &model).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
    set_mtime(&model, later);
    r.check_reload();
    assert!(r.model_loaded(), "hot reload picked up the new file");
    let after = r.forecast(&hs).unwrap();
    // (Silent windows get the baseline even from a loaded model; see below.)
    let i = cases
        .iter()
        .position(|c| c.counts.iter().rev().take(WINDOW).any(|n| *n > 0))
        .expect("a fixture window with requests");
    close(
        after[i].quantiles[1],
        cases[i].quantiles[1],
        "reloaded lstm",
    );
    assert!(r.status().loads.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(r.name(), "lstm");
    // The same files written again (a deploy tool's re-sync, a `touch`) are no new model: the
    // guard's and the calibration's records of the serving one stay.
    let loads = || r.status().loads.load(std::sync::atomic::Ordering::Relaxed);
    let loaded = loads();
    std::fs::copy(root().join("lstm.onnx"), &model).unwrap();
    set_mtime(&model, later + std::time::Duration::from_secs(1));
    r.check_reload();
    assert_eq!(loads(), loaded, "rewritten unchanged");
    assert!(r.model_loaded());

    // A replacement with an older modification time (a rollback, `cp -p`) is noticed too;
    // a broken one is rejected and the previous model keeps serving. It is read again only
    // once it changes (as a file caught mid-copy does while the copy goes on), not at every
    // check.
    let failures = || {
        r.status()
            .load_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before_failures = failures();
    std::fs::write(&model, b"half a model").unwrap();
    let earlier = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    set_mtime(&model, earlier);
    r.forecast(&hs).unwrap();
    assert_eq!(failures(), before_failures + 1, "the older file was tried");
    assert!(r.model_loaded(), "the previous model keeps serving");
    r.forecast(&hs).unwrap();
    assert_eq!(failures(), before_failures + 1, "not again while unchanged");
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&model)
        .unwrap()
        .write_all(b", and the rest")
        .unwrap();
    r.forecast(&hs).unwrap();
    assert_eq!(
        failures(),
        before_failures + 2,
        "tried again once it changed"
    );
    assert_eq!(r.name(), "lstm");

    // Models that load but cannot serve are refused at load, so they never replace the
    // working one: a fixed batch size (an export without a dynamic axis) and NaN outputs.
    let fixtures = root().join("fixtures");
    for (file, reason) in [
        ("fixed-batch.onnx", "dynamic batch"),
        ("nan-output.onnx", "non-finite"),
        ("p-any-above-one.onnx", "outside [0, 1]"),
    ] {
        std::fs::copy(fixtures.join(file), &model).unwrap();
        let err = OnnxLstm::load(&model, 1).unwrap_err().to_string();
        assert!(err.contains(reason), "{file}: {err}");
        let stamp = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        set_mtime(&model, stamp);
        let served = r.forecast(&hs).unwrap();
        assert_eq!(r.name(), "lstm", "{file} did not replace the model");
        close(served[i].quantiles[1], cases[i].quantiles[1], file);
    }

    // A model of the same length renamed over the serving one with the same modification
    // time (`rsync -a`, a tarball, a reproducible build) is noticed too: its inode and
    // status-change time differ.
    std::fs::copy(root().join("lstm.onnx"), &model).unwrap();
    let stamp = std::time::SystemTime::now() + std::time::Duration::from_secs(120);
    set_mtime(&model, stamp);
    r.forecast(&hs).unwrap();
    let serving = std::fs::metadata(&model).unwrap();
    let staged = dir.path().join("staged.onnx");
    std::fs::copy(fixtures.join("nan-output.onnx"), &staged).unwrap();
    assert_eq!(std::fs::metadata(&staged).unwrap().len(), serving.len());
    set_mtime(&staged, serving.modified().unwrap());
    let before_failures = failures();
    r.forecast(&hs).unwrap();
    assert_eq!(
        failures(),
        before_failures,
        "the serving file is not retried"
    );
    std::fs::rename(&staged, &model).unwrap();
    r.forecast(&hs).unwrap();
    assert_eq!(
        failures(),
        before_failures + 1,
        "the swapped file was tried"
    );
    assert_eq!(r.name(), "lstm");

    let batch_failures = r
        .status()
        .batch_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(batch_failures, 0);
}

#[test]
fn silent_windows_get_the_baseline_forecast() {
    let path = root().join("lstm.onnx");
    let r = ReloadingForecaster::new(&path, 1, std::time::Duration::from_secs(3600));
    assert!(r.model_loaded());
    // A request days ago and none in the model's 32-bucket window, and the same series with
    // a request in the last bucket.
    let mut quiet = vec![0u32; 672];
    quiet[100] = 3;
    let mut recent = quiet.clone();
    recent[671] = 2;
    let h = |counts| History {
        counts,
        last_bucket_start: 1_431_900_000, // a bucket start (a multiple of 900)
        bucket_secs: 900,
        priority: 5,
    };
    let hs = [h(&quiet), h(&recent)];
    let served = r.forecast(&hs).unwrap();
    let naive = SeasonalNaive.forecast(&hs).unwrap();
    let lstm = OnnxLstm::load(&path, 1).unwrap().forecast(&hs).unwrap();
    assert_eq!(served[0], naive[0], "a silent window gets the baseline");
    // (The model runs on the windows with requests alone: a smaller batch, whose float
    // arithmetic may differ in the last bits.)
    close(
        served[1].p_any,
        lstm[1].p_any,
        "a window with requests gets the model",
    );
    for q in 0..3 {
        close(
            served[1].quantiles[q],
            lstm[1].quantiles[q],
            "its quantiles",
        );
    }
    // What the guard is for: trained without dead windows, the model alone is sure of a
    // request after any silent window.
    assert!(lstm[0].p_any > 0.5, "{:?}", lstm[0]);
}

#[test]
fn a_model_trained_on_one_priority_is_served_that_priority() {
    let cases = cases();
    let c = cases
        .iter()
        .find(|c| c.counts.iter().rev().take(WINDOW).any(|n| *n > 0))
        .expect("a fixture window with requests");
    let hs: Vec<History<'_>> = [0, 5, 10]
        .into_iter()
        .map(|priority| History {
            priority,
            ..history(c)
        })
        .collect();

    // The committed model saw priority 5 only: every series is served as priority 5.
    let lstm = OnnxLstm::load(&root().join("lstm.onnx"), 1).unwrap();
    let f = lstm.forecast(&hs).unwrap();
    assert_eq!(f[0], f[1]);
    assert_eq!(f[2], f[1]);

    // A model trained on several priorities reads each series' own.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    std::fs::copy(root().join("lstm.onnx"), &model).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("lstm.json")).unwrap()).unwrap();
    meta["trained_priorities"] = serde_json::json!([0, 5, 10]);
    std::fs::write(dir.path().join("m.json"), meta.to_string()).unwrap();
    let f = OnnxLstm::load(&model, 1).unwrap().forecast(&hs).unwrap();
    assert_ne!(f[0], f[2]);

    // Metadata from before the field: every such model was trained on priority 5 alone.
    meta.as_object_mut().unwrap().remove("trained_priorities");
    std::fs::write(dir.path().join("m.json"), meta.to_string()).unwrap();
    let f = OnnxLstm::load(&model, 1).unwrap().forecast(&hs).unwrap();
    assert_eq!(f[0], f[1]);
    assert_eq!(f[2], f[1]);

    // Priorities outside 0-10 are a metadata error.
    meta["trained_priorities"] = serde_json::json!([5, 11]);
    std::fs::write(dir.path().join("m.json"), meta.to_string()).unwrap();
    let err = OnnxLstm::load(&model, 1).unwrap_err().to_string();
    assert!(err.contains("trained_priorities"), "{err}");
}

#[test]
fn a_model_whose_bytes_differ_from_its_metadatas_hash_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    std::fs::copy(root().join("lstm.json"), dir.path().join("m.json")).unwrap();
    // Another model (the fixed-batch fixture) under this metadata: refused by its hash.
    std::fs::copy(root().join("fixtures").join("fixed-batch.onnx"), &model).unwrap();
    let err = OnnxLstm::load(&model, 1).unwrap_err().to_string();
    assert!(err.contains("model_sha256"), "{err}");
    // The model the metadata was written for loads.
    std::fs::copy(root().join("lstm.onnx"), &model).unwrap();
    assert!(OnnxLstm::load(&model, 1).is_ok());
}

/// Files that failed to load are read once more after a while even if they look unchanged
/// (a read that caught a same-size rewrite in place may have stamped the finished file), then
/// not again until they change.
#[test]
fn a_failed_model_is_read_once_more_after_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    std::fs::write(dir.path().join("m.json"), unhashed_meta().to_string()).unwrap();
    std::fs::write(&model, b"half a model").unwrap();
    let r = ReloadingForecaster::new(&model, 1, std::time::Duration::ZERO)
        .retry_failed_after(std::time::Duration::from_millis(200));
    let failures = || {
        r.status()
            .load_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(failures(), 1);
    r.check_reload();
    assert_eq!(failures(), 1, "not at once");
    std::thread::sleep(std::time::Duration::from_millis(250));
    r.check_reload();
    assert_eq!(failures(), 2, "once more after the wait");
    std::thread::sleep(std::time::Duration::from_millis(250));
    r.check_reload();
    assert_eq!(failures(), 2, "then not again while unchanged");
    assert!(!r.model_loaded());
}

/// The inputs and outputs the metadata lists (names and shapes) must be the model's.
#[test]
fn metadata_listing_other_inputs_or_outputs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    std::fs::copy(root().join("lstm.onnx"), &model).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("lstm.json")).unwrap()).unwrap();
    let load_with = |meta: &serde_json::Value| {
        std::fs::write(dir.path().join("m.json"), meta.to_string()).unwrap();
        OnnxLstm::load(&model, 1).map(|_| ())
    };
    load_with(&meta).expect("the committed pair loads");
    let mut narrower = meta.clone();
    narrower["inputs"]["counts"] = serde_json::json!([-1, 31]);
    let err = load_with(&narrower).unwrap_err().to_string();
    assert!(err.contains("metadata lists inputs"), "{err}");
    let mut renamed = meta.clone();
    let outputs = renamed["outputs"].as_object_mut().unwrap();
    let p_any = outputs.remove("p_any").unwrap();
    outputs.insert("probability".into(), p_any);
    let err = load_with(&renamed).unwrap_err().to_string();
    assert!(err.contains("metadata lists outputs"), "{err}");
    // A later metadata format is refused, not read as this one.
    let mut later = meta.clone();
    later["format"] = serde_json::json!(2);
    let err = load_with(&later).unwrap_err().to_string();
    assert!(err.contains("metadata format"), "{err}");
    // Metadata from before these fields were written is not checked for them.
    let mut older = meta.clone();
    older.as_object_mut().unwrap().remove("inputs");
    older.as_object_mut().unwrap().remove("outputs");
    load_with(&older).expect("older metadata loads");
}

#[test]
fn a_model_that_fails_on_some_series_in_service_hands_those_series_to_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    let fixture = root().join("fixtures").join("nan-on-large-counts.onnx");
    std::fs::copy(fixture, &model).unwrap();
    std::fs::write(dir.path().join("m.json"), unhashed_meta().to_string()).unwrap();
    let lstm = OnnxLstm::load(&model, 1).expect("it passes the load trial");

    let bucket = 900;
    let quiet = vec![1u32; 96];
    let huge = vec![5_000u32; 96];
    let h = |counts| History {
        counts,
        last_bucket_start: 1_700_000_100 - 1_700_000_100 % bucket,
        bucket_secs: bucket,
        priority: 5,
    };
    let batch = [h(&quiet), h(&huge)];
    assert!(lstm.forecast(&batch[..1]).is_ok());
    let err = lstm.forecast(&batch).unwrap_err().to_string();
    assert!(err.contains("series 1 of 2"), "{err}");

    // Served: the baseline answers the failed series alone, and it is counted.
    let r = ReloadingForecaster::new(&model, 1, std::time::Duration::from_secs(3600));
    assert!(r.model_loaded());
    let served = r.forecast(&batch).unwrap();
    let each = lstm.forecast_each(&batch).unwrap();
    assert!(each[1].is_none(), "{each:?}");
    assert_eq!(
        Some(served[0]),
        each[0],
        "the model answers the other series"
    );
    assert_eq!(served[1], SeasonalNaive.forecast(&batch[1..]).unwrap()[0]);
    let status = r.status();
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(count(&status.series_failures), 1);
    assert_eq!(count(&status.batch_failures), 0);
    assert!(!status.fallback.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(r.name(), "lstm");
    // When no series is usable, the batch failed: the fallback answers it and says so.
    assert_eq!(
        r.forecast(&batch[1..]).unwrap(),
        SeasonalNaive.forecast(&batch[1..]).unwrap()
    );
    assert_eq!(count(&status.batch_failures), 1);
    assert!(status.fallback.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(r.name(), "seasonal_naive");
}
