//! A forecaster that follows its model file: a replaced file is loaded and swapped in
//! without dropping a prediction, and while no model can be loaded the best baseline answers
//! (said in the logs and in [`ModelStatus`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};

use crate::baseline::SeasonalNaive;
use crate::features::History;
use crate::forecast::{Forecast, ForecastError, Forecaster};
use crate::onnx::{metadata_path, LoadError, OnnxLstm};

/// Counters an owner can export as metrics.
#[derive(Debug, Default)]
pub struct ModelStatus {
    /// Successful (re)loads.
    pub loads: AtomicU64,
    /// Failed (re)loads.
    pub load_failures: AtomicU64,
    /// Whether the baseline answered the last batch: no model is loaded, or the model
    /// failed on that batch.
    pub fallback: AtomicBool,
    /// Batches the loaded model failed on (the baseline answered them).
    pub batch_failures: AtomicU64,
    /// Series the loaded model answered outside the contract (NaN, say) in batches it
    /// otherwise served: the baseline answered those series alone.
    pub series_failures: AtomicU64,
}

/// The LSTM with hot reload and a baseline fallback.
pub struct ReloadingForecaster {
    path: PathBuf,
    threads: usize,
    current: RwLock<Option<Arc<OnnxLstm>>>,
    fallback: SeasonalNaive,
    seen: Mutex<Seen>,
    check_every: Duration,
    /// How long before files that failed to load, unchanged since, are read once more.
    retry_failed_after: Duration,
    status: Arc<ModelStatus>,
}

/// Files that failed to load are read once more after this long, unchanged or not: a read
/// that caught a same-size rewrite in place part-way may have stamped the finished file
/// (status-change times move in ticks of a few milliseconds), which a stamp check alone would
/// then never read again.
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(60);

/// What the reload check knows of the files.
struct Seen {
    /// The files as they were when the serving model was loaded.
    loaded: Option<Fingerprint>,
    /// The last failed load (its error is logged once per version of the files).
    failed: Option<Failed>,
    checked: Instant,
}

/// A failed load: a broken file is not re-read at every check (once more after
/// [`ReloadingForecaster::retry_failed_after`]), a missing ONNX Runtime library is looked for
/// again.
struct Failed {
    /// The files as they were.
    stamp: Fingerprint,
    /// Worth loading again at every check (the runtime library was missing).
    retry: bool,
    /// When it failed.
    at: Instant,
    /// It was already the second try of these files: not read again until they change.
    again: bool,
}

/// What tells one version of a file from another without reading it: its inode, its
/// status-change time (set by the kernel on every write, rename or `cp -p`, whatever
/// modification time the deploy tool restores), modification time and length. Models of one
/// architecture all have the same length, and `rsync -a` or a tarball keeps modification
/// times, so those two alone miss a swapped model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    inode: u64,
    changed: (i64, i64),
    modified: Option<SystemTime>,
    len: u64,
}

/// The versions of the model and of its metadata.
type Fingerprint = [Option<FileVersion>; 2];

fn fingerprint(path: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let of = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some(FileVersion {
            inode: m.ino(),
            changed: (m.ctime(), m.ctime_nsec()),
            modified: m.modified().ok(),
            len: m.len(),
        })
    };
    [of(path), of(&metadata_path(path))]
}

impl ReloadingForecaster {
    /// Load `path` now (falling back to the baseline if it cannot be loaded) and re-check
    /// the file at most every `check_every`.
    pub fn new(path: &Path, threads: usize, check_every: Duration) -> Self {
        let f = ReloadingForecaster {
            path: path.to_path_buf(),
            threads,
            current: RwLock::new(None),
            fallback: SeasonalNaive,
            seen: Mutex::new(Seen {
                loaded: None,
                failed: None,
                checked: Instant::now(),
            }),
            check_every,
            retry_failed_after: RETRY_FAILED_AFTER,
            status: Arc::default(),
        };
        f.reload();
        f
    }

    /// Read files that failed to load once more after `after` ([`RETRY_FAILED_AFTER`] by
    /// default).
    pub fn retry_failed_after(mut self, after: Duration) -> Self {
        self.retry_failed_after = after;
        self
    }

    /// Counters for metrics.
    pub fn status(&self) -> Arc<ModelStatus> {
        self.status.clone()
    }

    /// Whether the LSTM (rather than the fallback) is serving.
    pub fn model_loaded(&self) -> bool {
        self.current.read().is_some()
    }

    /// Load the file now; keeps the previous model if the new one fails.
    pub fn reload(&self) {
        let stamp = fingerprint(&self.path);
        let result = OnnxLstm::load(&self.path, self.threads);
        let mut seen = self.seen.lock();
        seen.checked = Instant::now();
        match result {
            Ok(m) => {
                seen.failed = None;
                let unchanged = self
                    .current
                    .read()
                    .as_ref()
                    .is_some_and(|c| c.same_model(&m));
                if unchanged {
                    // The same bytes: the guard's and the calibration's records of the
                    // serving model stay (a new load would start them afresh).
                    tracing::debug!(model = %self.path.display(), "forecast model files rewritten unchanged");
                    seen.loaded = Some(stamp);
                    return;
                }
                tracing::info!(model = %self.path.display(), "forecast model loaded");
                *self.current.write() = Some(Arc::new(m));
                seen.loaded = Some(stamp);
                seen.failed = None;
                self.status.loads.fetch_add(1, Ordering::Relaxed);
                self.status.fallback.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                // Loaded again once the files change (a file caught mid-copy changes as the
                // copy goes on: the stamp was taken before the read); logged once per version.
                self.status.load_failures.fetch_add(1, Ordering::Relaxed);
                let retry = matches!(e, LoadError::Runtime(_));
                // Only a repeat of the same kind of failure: once the runtime library turns up,
                // a model the runtime then refuses is news (logged, and read once more later).
                let again = seen
                    .failed
                    .as_ref()
                    .is_some_and(|f| f.stamp == stamp && f.retry == retry);
                let first = !again;
                seen.failed = Some(Failed {
                    stamp,
                    retry,
                    at: Instant::now(),
                    again,
                });
                if self.current.read().is_some() {
                    if first {
                        tracing::error!(error = %e, "new forecast model rejected; keeping the previous one");
                    }
                } else {
                    if first {
                        tracing::error!(error = %e, "forecast model unavailable; falling back to seasonal naive");
                    }
                    self.status.fallback.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Look for a replaced model file now (at most every `check_every`), as every forecast
    /// does first: a caller with nothing to forecast still notices a swap or a recovery.
    /// Blocking: it may load a model.
    pub fn check_reload(&self) {
        let due = {
            let mut seen = self.seen.lock();
            if seen.checked.elapsed() < self.check_every {
                return;
            }
            seen.checked = Instant::now();
            let now = fingerprint(&self.path);
            let worth = match &seen.failed {
                Some(f) if f.stamp == now => {
                    f.retry || (!f.again && f.at.elapsed() >= self.retry_failed_after)
                }
                _ => true,
            };
            seen.loaded != Some(now) && worth
        };
        if due {
            self.reload();
        }
    }
}

impl ReloadingForecaster {
    /// `model`'s forecasts for the windows with requests, the baseline's for silent ones,
    /// which the model is not run on. Training drops dead windows (no request in the window
    /// nor in the horizon), so every silent window the LSTM saw was followed by a request: it
    /// answers `p_any` near 1 for any silent window, while a long-tail resource quiet for
    /// eight hours mostly stays quiet (apache test tail: mean `p_any` 0.83 against 2%
    /// realised). The planner forecasts every series with recent history, most of them
    /// silent, so those windows go to the baseline (and cost no inference).
    fn model_for_windows_with_requests(
        &self,
        model: &OnnxLstm,
        histories: &[History<'_>],
    ) -> Result<Vec<Forecast>, ForecastError> {
        let (quiet, busy): (Vec<usize>, Vec<usize>) =
            (0..histories.len()).partition(|i| histories[*i].input_is_silent());
        let pick =
            |idx: &[usize]| -> Vec<History<'_>> { idx.iter().map(|i| histories[*i]).collect() };
        // Every index is in one of the two parts, so each placeholder is replaced.
        let none = Forecast {
            quantiles: [0.0; 3],
            p_any: 0.0,
        };
        let mut forecasts = vec![none; histories.len()];
        let mut baseline = quiet;
        let mut failed = 0;
        for (i, f) in busy.iter().zip(model.forecast_each(&pick(&busy))?) {
            match f {
                Some(f) => forecasts[*i] = f,
                None => {
                    baseline.push(*i);
                    failed += 1;
                }
            }
        }
        if failed > 0 && failed == busy.len() {
            // Nothing the model answered is usable: the batch failed, and the fallback says so.
            return Err(ForecastError::Output(format!(
                "every one of {failed} series answered outside the contract"
            )));
        }
        if failed > 0 {
            tracing::warn!(
                series = failed,
                of = busy.len(),
                "model answered some series outside its contract; baseline answers those"
            );
            let failed = failed as u64;
            self.status
                .series_failures
                .fetch_add(failed, Ordering::Relaxed);
        }
        for (i, f) in baseline
            .iter()
            .zip(self.fallback.forecast(&pick(&baseline))?)
        {
            forecasts[*i] = f;
        }
        Ok(forecasts)
    }
}

impl Forecaster for ReloadingForecaster {
    /// The forecaster that answered the last batch.
    fn name(&self) -> &str {
        if self.status.fallback.load(Ordering::Relaxed) {
            "seasonal_naive"
        } else {
            crate::onnx::NAME
        }
    }

    fn forecast(&self, histories: &[History<'_>]) -> Result<Vec<Forecast>, ForecastError> {
        self.check_reload();
        // Clone the Arc so a reload swapping the model never waits for, or cuts, this batch.
        let model = self.current.read().clone();
        match model {
            Some(m) => match self.model_for_windows_with_requests(&m, histories) {
                Ok(f) => {
                    self.status.fallback.store(false, Ordering::Relaxed);
                    Ok(f)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "model failed on a batch; baseline answers it");
                    self.status.batch_failures.fetch_add(1, Ordering::Relaxed);
                    self.status.fallback.store(true, Ordering::Relaxed);
                    self.fallback.forecast(histories)
                }
            },
            None => self.fallback.forecast(histories),
        }
    }
}
