//! The LSTM served through ONNX Runtime (`ort`, loaded dynamically).
//!
//! Loading checks the model against its metadata file and against what this crate's feature
//! pipeline produces (input names and shapes, feature order, outputs), so a model trained for other
//! features fails at load with a clear error instead of predicting garbage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::features::{
    batch_model_input_into, priority_feature, History, BUCKET_SECS, CONTEXT, DEFAULT_PRIORITY,
    FEATURE_NAMES, HORIZON, MAX_PRIORITY, N_FEATURES, PRIORITY_FEATURE, WINDOW,
};
use crate::forecast::{Forecast, ForecastError, Forecaster, QUANTILES};

/// ONNX Runtime version this crate's `ort` features (`api-31`) are paired with.
pub const ORT_VERSION: &str = "1.31.1";

/// Why the model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The ONNX Runtime shared library was not found or failed to load.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    /// The metadata file is missing or malformed.
    #[error("model metadata {path}: {reason}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model does not match its metadata or this crate's feature pipeline.
    #[error("model {path} does not match: {reason}")]
    Mismatch {
        /// The model file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// ONNX Runtime rejected the model file.
    #[error("model {path}: {reason}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// ONNX Runtime's message.
        reason: String,
    },
}

/// The metadata written next to the model by the training script.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// Steps in a window.
    pub window: usize,
    /// Buckets forecast.
    pub horizon: usize,
    /// Bucket width.
    pub bucket_secs: u64,
    /// Feature names in input order.
    pub features: Vec<String>,
    /// Number of features.
    pub n_features: usize,
    /// Quantile levels of the `quantiles` output.
    pub quantiles: Vec<f32>,
    /// The priorities of the training series. A model trained on one priority has only
    /// learnt a constant for its priority feature, so it is served that priority whatever
    /// the series' is. Absent in older metadata, whose models were all trained on
    /// [`DEFAULT_PRIORITY`] alone: served that one.
    #[serde(default)]
    pub trained_priorities: Option<Vec<u8>>,
    /// Hex sha256 of the model file this metadata describes (absent in older metadata): a
    /// model file whose bytes differ is refused, so a deploy that copied one file of the two,
    /// or a reload caught between the copies, never serves a model with another's metadata.
    #[serde(default)]
    pub model_sha256: Option<String>,
    /// The model's inputs by name, with their shapes (-1: a dynamic axis), as exported;
    /// checked against the model file at load (absent in older metadata: not checked).
    #[serde(default)]
    pub inputs: Option<BTreeMap<String, Vec<i64>>>,
    /// The model's outputs, as [`Self::inputs`].
    #[serde(default)]
    pub outputs: Option<BTreeMap<String, Vec<i64>>>,
    /// Everything else the training script recorded (data hashes, metrics, …).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The metadata format this build reads (`format` in the metadata file).
pub const METADATA_FORMAT: u64 = 1;

/// Path of the ONNX Runtime library: `ORT_DYLIB_PATH`, else the copy `deploy/setup.sh`
/// unpacks into the repository's `.cache/onnxruntime/`.
pub fn runtime_library() -> Result<PathBuf, LoadError> {
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(LoadError::Runtime(format!(
                "ORT_DYLIB_PATH={} is not a file",
                p.display()
            )))
        };
    }
    let name = format!("libonnxruntime.so.{ORT_VERSION}");
    let mut candidates = vec![PathBuf::from(".cache/onnxruntime").join(&name)];
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/<bin> or target/<profile>/deps/<test> → repository root
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join(".cache/onnxruntime").join(&name));
        }
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../.cache/onnxruntime")
            .join(&name),
    );
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        LoadError::Runtime(format!(
            "{name} not found: run deploy/setup.sh (it unpacks it into .cache/onnxruntime/) or set ORT_DYLIB_PATH"
        ))
    })
}

/// The process-wide ONNX Runtime environment (ort allows one per process). Only success is
/// kept: a library installed after start is found by the next model load.
fn environment() -> Result<&'static Environment, LoadError> {
    static ENV: OnceLock<Environment> = OnceLock::new();
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let _one_at_a_time = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let lib = runtime_library()?;
    let env = ort::init_from(&lib)
        .map_err(|e| LoadError::Runtime(format!("loading {}: {e}", lib.display())))?
        .with_name("shadowcdn")
        .build()
        .map_err(|e| LoadError::Runtime(e.to_string()))?;
    Ok(ENV.get_or_init(|| env))
}

/// The session and the input buffers it reads (reused between calls).
struct Inner {
    session: Session,
    counts: Vec<f32>,
    context: Vec<f32>,
}

/// The name the LSTM forecaster answers under (in metrics, `explain` and calibration).
pub const NAME: &str = "lstm";

/// The LSTM forecaster.
pub struct OnnxLstm {
    inner: Mutex<Inner>,
    meta: ModelMetadata,
    /// The one priority the model was trained on, fed to every series (see
    /// [`ModelMetadata::trained_priorities`]).
    pinned_priority: Option<u8>,
    path: PathBuf,
    /// What the model was loaded from: the model file's sha256 and the metadata as read.
    identity: (String, String),
}

impl OnnxLstm {
    /// Whether `other` was loaded from the same model and metadata as this one: files
    /// copied again unchanged (a deploy tool's re-sync, a `touch`) are no new model.
    pub fn same_model(&self, other: &OnnxLstm) -> bool {
        self.identity == other.identity
    }
}

impl std::fmt::Debug for OnnxLstm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxLstm")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The metadata file of a model: same path with a `.json` extension.
pub fn metadata_path(model: &Path) -> PathBuf {
    model.with_extension("json")
}

/// Names and shapes (-1: a dynamic axis) of a model's inputs or outputs.
fn signature<'a>(
    values: impl Iterator<Item = (&'a str, &'a ort::value::ValueType)>,
) -> BTreeMap<String, Vec<i64>> {
    values
        .map(|(name, t)| {
            let shape = t.tensor_shape().map(|s| s.to_vec()).unwrap_or_default();
            (name.to_string(), shape)
        })
        .collect()
}

fn check(cond: bool, path: &Path, reason: impl FnOnce() -> String) -> Result<(), LoadError> {
    if cond {
        Ok(())
    } else {
        Err(LoadError::Mismatch {
            path: path.to_path_buf(),
            reason: reason(),
        })
    }
}

impl OnnxLstm {
    /// Load `model` (and `model` with `.json`), validating both; `threads` is ONNX Runtime's
    /// intra-op thread count.
    pub fn load(model: &Path, threads: usize) -> Result<Self, LoadError> {
        let meta_path = metadata_path(model);
        let meta_err = |reason: String| LoadError::Metadata {
            path: meta_path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&meta_path).map_err(|e| meta_err(e.to_string()))?;
        let meta: ModelMetadata =
            serde_json::from_str(&text).map_err(|e| meta_err(e.to_string()))?;
        check(meta.bucket_secs == BUCKET_SECS, model, || {
            format!(
                "{} s buckets in metadata, {BUCKET_SECS} s in this build",
                meta.bucket_secs
            )
        })?;
        check(
            meta.window == WINDOW && meta.horizon == HORIZON,
            model,
            || {
                format!(
                    "window/horizon {}/{} in metadata, {WINDOW}/{HORIZON} in this build",
                    meta.window, meta.horizon
                )
            },
        )?;
        check(
            meta.n_features == N_FEATURES
                && meta.features.iter().map(String::as_str).eq(FEATURE_NAMES),
            model,
            || {
                format!(
                    "features {:?} in metadata, {FEATURE_NAMES:?} in this build",
                    meta.features
                )
            },
        )?;
        // A later format may need what this build does not do (input scaling, say): refused
        // rather than served as if it were this one. Metadata from before the field has none.
        let format = meta.extra.get("format");
        check(
            format.is_none_or(|f| f.as_u64() == Some(METADATA_FORMAT)),
            model,
            || format!("metadata format {format:?}, this build reads {METADATA_FORMAT}"),
        )?;
        check(meta.quantiles == QUANTILES, model, || {
            format!(
                "quantiles {:?} in metadata, {QUANTILES:?} in this build",
                meta.quantiles
            )
        })?;
        let pinned_priority = match meta.trained_priorities.as_deref() {
            None => Some(DEFAULT_PRIORITY),
            Some(ps) if ps.is_empty() || ps.iter().any(|p| *p > MAX_PRIORITY) => {
                return Err(meta_err(format!(
                    "trained_priorities {ps:?}: expected priorities 0-{MAX_PRIORITY}"
                )))
            }
            Some([one]) => Some(*one),
            Some(_) => None,
        };

        let env = environment()?;
        let model_err = |reason: String| LoadError::Model {
            path: model.to_path_buf(),
            reason,
        };
        // The bytes checked are the bytes loaded: the file may be replaced meanwhile.
        let bytes = std::fs::read(model).map_err(|e| model_err(e.to_string()))?;
        if let Some(want) = &meta.model_sha256 {
            let got = hex_sha256(&bytes);
            if !got.eq_ignore_ascii_case(want.trim()) {
                return Err(meta_err(format!(
                    "model_sha256 {want} does not match the model file ({got}): it describes \
                     another model"
                )));
            }
        }
        let session = Session::builder(env)
            .map_err(|e| model_err(e.to_string()))?
            .with_intra_threads(threads.max(1))
            .map_err(|e| model_err(e.to_string()))?
            // Batches vary in size from tick to tick: a memory plan is kept per input shape
            // and never dropped, so with it on, a long-running broker's memory only grows.
            .with_memory_pattern(false)
            .map_err(|e| model_err(e.to_string()))?
            .commit_from_memory(&bytes)
            .map_err(|e| model_err(e.to_string()))?;

        let inputs = session.inputs();
        check(
            inputs.iter().map(|i| i.name()).eq(["counts", "context"]),
            model,
            || {
                format!(
                    "inputs {:?}, expected [\"counts\", \"context\"]",
                    inputs.iter().map(|i| i.name()).collect::<Vec<_>>()
                )
            },
        )?;
        for (input, width) in inputs.iter().zip([WINDOW, CONTEXT]) {
            let shape = input
                .dtype()
                .tensor_shape()
                .map(|s| s.to_vec())
                .unwrap_or_default();
            // A fixed batch size (an export without a dynamic axis) would fail every batch
            // of another size, after the model had replaced a working one.
            check(
                shape.len() == 2 && shape[0] < 0 && shape[1] == width as i64,
                model,
                || {
                    format!(
                        "input {:?} has shape {shape:?}, expected [batch, {width}] with a dynamic batch",
                        input.name()
                    )
                },
            )?;
        }
        for (name, width) in [("quantiles", 3i64), ("p_any", 1)] {
            let out = session.outputs().iter().find(|o| o.name() == name);
            let shape = out
                .and_then(|o| o.dtype().tensor_shape().map(|s| s.to_vec()))
                .unwrap_or_default();
            // A fixed output batch would pass the two-series trial and fail every other batch.
            check(
                shape.len() == 2 && shape[0] < 0 && shape[1] == width,
                model,
                || {
                    format!(
                        "output {name:?} has shape {shape:?}, expected [batch, {width}] with a \
                         dynamic batch"
                    )
                },
            )?;
        }
        let io = [
            (
                "inputs",
                &meta.inputs,
                signature(session.inputs().iter().map(|i| (i.name(), i.dtype()))),
            ),
            (
                "outputs",
                &meta.outputs,
                signature(session.outputs().iter().map(|o| (o.name(), o.dtype()))),
            ),
        ];
        for (what, listed, actual) in io {
            if let Some(listed) = listed {
                check(listed == &actual, model, || {
                    format!(
                        "metadata lists {what} {listed:?}, the model has {actual:?}: they \
                         describe different models"
                    )
                })?;
            }
        }
        let identity = (
            hex_sha256(&bytes),
            serde_json::to_string(&meta).unwrap_or_default(),
        );
        let lstm = OnnxLstm {
            inner: Mutex::new(Inner {
                session,
                counts: Vec::new(),
                context: Vec::new(),
            }),
            meta,
            pinned_priority,
            path: model.to_path_buf(),
            identity,
        };
        lstm.trial().map_err(model_err)?;
        Ok(lstm)
    }

    /// Forecast two fixed series (one silent, one busy) and require outputs within the
    /// contract: a model that loads but cannot run, answers NaN or no probability (an export
    /// that lost its sigmoid), must not replace one that works.
    fn trial(&self) -> Result<(), String> {
        let bucket = BUCKET_SECS as i64;
        let days = (7 * 86_400 / bucket) as usize;
        let silent = vec![0u32; days];
        let busy: Vec<u32> = (0..days as u32).map(|i| 1 + i % 7).collect();
        let history = |counts| History {
            counts,
            last_bucket_start: 1_700_000_100 - 1_700_000_100 % bucket,
            bucket_secs: bucket,
            priority: 5,
        };
        let (q, p) = self
            .run(&[history(&silent), history(&busy)])
            .map_err(|e| format!("trial forecast failed: {e}"))?;
        for (i, (q, p)) in q.chunks_exact(3).zip(&p).enumerate() {
            out_of_contract(q, *p)
                .map_or(Ok(()), |why| Err(format!("trial forecast {i}: {why}")))?;
        }
        Ok(())
    }

    /// Run the model on `histories`: raw quantiles (3 per series) and probabilities.
    fn run(&self, histories: &[History<'_>]) -> Result<(Vec<f32>, Vec<f32>), ForecastError> {
        let rt = |e: ort::Error| ForecastError::Runtime(e.to_string());
        let mut guard = self.inner.lock();
        let Inner {
            session,
            counts,
            context,
        } = &mut *guard;
        batch_model_input_into(histories, counts, context);
        if let Some(p) = self.pinned_priority {
            let v = priority_feature(p);
            for ctx in context.chunks_exact_mut(CONTEXT) {
                ctx[PRIORITY_FEATURE - 1] = v;
            }
        }
        let n = histories.len();
        let counts = TensorRef::from_array_view(([n, WINDOW], counts.as_slice())).map_err(rt)?;
        let context = TensorRef::from_array_view(([n, CONTEXT], context.as_slice())).map_err(rt)?;
        let outputs = session
            .run(ort::inputs!["counts" => counts, "context" => context])
            .map_err(rt)?;
        let (_, q) = outputs["quantiles"]
            .try_extract_tensor::<f32>()
            .map_err(rt)?;
        let (_, p) = outputs["p_any"].try_extract_tensor::<f32>().map_err(rt)?;
        if q.len() != n * 3 || p.len() != n {
            return Err(ForecastError::Output(format!(
                "{} quantiles and {} probabilities for {n} series",
                q.len(),
                p.len(),
            )));
        }
        Ok((q.to_vec(), p.to_vec()))
    }

    /// One forecast per history, `None` where the model's answer breaks the contract. A
    /// model that passed its load trial can still overflow or divide by zero on some input:
    /// rather than read those series as "no demand" (or huge demand as none), the caller
    /// hands them to a baseline.
    pub fn forecast_each(
        &self,
        histories: &[History<'_>],
    ) -> Result<Vec<Option<Forecast>>, ForecastError> {
        if histories.is_empty() {
            return Ok(Vec::new());
        }
        let want = self.meta.bucket_secs;
        if let Some(h) = histories
            .iter()
            .find(|h| u64::try_from(h.bucket_secs) != Ok(want))
        {
            return Err(ForecastError::Bucket {
                got: h.bucket_secs,
                want,
            });
        }
        let (q, p) = self.run(histories)?;
        Ok(q.chunks_exact(3)
            .zip(&p)
            .map(|(q, p)| {
                out_of_contract(q, *p)
                    .is_none()
                    .then(|| Forecast::from_raw([q[0], q[1], q[2]], *p))
            })
            .collect())
    }

    /// The metadata the model was trained with.
    pub fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }
}

impl Forecaster for OnnxLstm {
    fn name(&self) -> &str {
        NAME
    }

    /// Fails the batch if any series' answer breaks the contract.
    fn forecast(&self, histories: &[History<'_>]) -> Result<Vec<Forecast>, ForecastError> {
        let n = histories.len();
        self.forecast_each(histories)?
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                f.ok_or_else(|| {
                    ForecastError::Output(format!("output out of contract for series {i} of {n}"))
                })
            })
            .collect()
    }
}

/// Why raw outputs break the contract of [`Forecast`] (finite, `p_any` in [0, 1],
/// quantiles non-negative and non-decreasing), if they do. `from_raw` would clamp them into
/// it, hiding a broken model behind plausible numbers.
fn out_of_contract(q: &[f32], p: f32) -> Option<String> {
    if let Some(v) = q.iter().chain([&p]).find(|v| !v.is_finite()) {
        return Some(format!("non-finite output {v}"));
    }
    if !(0.0..=1.0).contains(&p) {
        return Some(format!("p_any {p} outside [0, 1]"));
    }
    if q.iter().any(|v| *v < 0.0) || q.windows(2).any(|w| w[0] > w[1]) {
        return Some(format!("quantiles {q:?} negative or decreasing"));
    }
    None
}

/// Hex sha256 of `bytes`.
fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
