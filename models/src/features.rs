//! The feature pipeline, identical to the training code's (`models/train/features.py`); the
//! contract is in `models/README.md`. A fixture exported by training checks the two agree.

/// Bucket width, in seconds, the models are trained on and fed.
pub const BUCKET_SECS: u64 = 900;
/// Steps in a model window.
pub const WINDOW: usize = 32;
/// Buckets in the forecast horizon.
pub const HORIZON: usize = 4;
/// Features per step.
pub const N_FEATURES: usize = 10;
/// Feature names, in order.
pub const FEATURE_NAMES: [&str; N_FEATURES] = [
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
];

/// Priority assumed when a resource has none registered.
pub const DEFAULT_PRIORITY: u8 = 5;
/// Highest priority; higher values count as this.
pub const MAX_PRIORITY: u8 = 10;
/// Index of `priority_over_10` in [`FEATURE_NAMES`].
pub const PRIORITY_FEATURE: usize = 5;

/// The value of feature `priority_over_10` for priority `p`.
pub fn priority_feature(p: u8) -> f32 {
    (f64::from(p.min(MAX_PRIORITY)) / 10.0) as f32
}

/// The history of one series, as every forecaster receives it.
#[derive(Debug, Clone, Copy)]
pub struct History<'a> {
    /// Counts of consecutive buckets, oldest first, ending with the latest complete bucket.
    pub counts: &'a [u32],
    /// Start (UTC seconds) of the last bucket in `counts`.
    pub last_bucket_start: i64,
    /// Bucket width in seconds.
    pub bucket_secs: i64,
    /// Provider priority 0–10.
    pub priority: u8,
}

impl History<'_> {
    /// Whether the last `WINDOW` counts are all zero (with a zero target the window is "dead").
    pub fn input_is_silent(&self) -> bool {
        window_is_silent(self.counts)
    }
}

/// A test history of `counts` whose last bucket starts at `last`, 15 minutes wide.
#[cfg(test)]
pub(crate) fn test_history(counts: &[u32], last: i64) -> History<'_> {
    History {
        counts,
        last_bucket_start: last,
        bucket_secs: BUCKET_SECS as i64,
        priority: DEFAULT_PRIORITY,
    }
}

/// The `HORIZON` counts that followed the bucket starting at `made_after`, if `h` holds them
/// whole: what a forecast made after that bucket is judged against.
pub fn horizon_after<'a>(h: &History<'a>, made_after: i64) -> Option<&'a [u32]> {
    let back = (h.last_bucket_start - made_after) / h.bucket_secs.max(1);
    if back < HORIZON as i64 || back > h.counts.len() as i64 {
        return None;
    }
    let first = h.counts.len() - back as usize;
    Some(&h.counts[first..first + HORIZON])
}

/// Whether `counts` has a request in its last [`HORIZON`] buckets, the hour before a forecast:
/// the edge that owns such a series likely still holds it.
pub fn asked_lately(counts: &[u32]) -> bool {
    counts.iter().rev().take(HORIZON).any(|c| *c > 0)
}

/// Whether the model's input window, the last `WINDOW` of `counts`, holds no request: the
/// serving wrapper answers such a window with the baseline.
pub fn window_is_silent(counts: &[u32]) -> bool {
    counts.iter().rev().take(WINDOW).all(|c| *c == 0)
}

/// Buckets in one day (the seasonal period) for `bucket_secs`.
pub fn period_buckets(bucket_secs: i64) -> usize {
    (86_400 / bucket_secs.max(1)) as usize
}

/// Buckets in 7 days (the longest history that counts) for `bucket_secs`.
pub fn max_history(bucket_secs: i64) -> usize {
    (7 * 86_400 / bucket_secs.max(1)) as usize
}

/// Exact sum of counts (an integer sum, then one conversion: the same value as summing in f64
/// while below 2^53).
fn sum(counts: &[u32]) -> f64 {
    counts.iter().map(|c| u64::from(*c)).sum::<u64>() as f64
}

/// The seasonal-naive point forecast: the sum of the `HORIZON` buckets one day before the
/// target buckets, or, with less than a day of history, the sum of the last `HORIZON` buckets.
pub fn seasonal_naive_p50(counts: &[u32], bucket_secs: i64) -> f64 {
    let n = counts.len();
    let period = period_buckets(bucket_secs);
    if n >= period && period >= HORIZON {
        sum(&counts[n - period..n - period + HORIZON])
    } else {
        sum(&counts[n.saturating_sub(HORIZON)..])
    }
}

/// Calendar features (1–4) of every step of a window.
type Calendar = [[f32; 4]; WINDOW];
/// What the calendar features depend on: (last bucket start, bucket width).
type CalendarKey = (i64, i64);

/// Calendar features (1–4) of the `WINDOW` steps of a window whose last bucket starts at
/// `last_bucket_start`.
fn calendar(last_bucket_start: i64, bucket_secs: i64) -> Calendar {
    let tau = std::f64::consts::TAU;
    std::array::from_fn(|i| {
        let t = last_bucket_start - (WINDOW - 1 - i) as i64 * bucket_secs;
        let tod = t.rem_euclid(86_400) as f64 / 86_400.0;
        let dow = (t.div_euclid(86_400) + 4).rem_euclid(7) as f64;
        [
            (tau * tod).sin() as f32,
            (tau * tod).cos() as f32,
            (tau * dow / 7.0).sin() as f32,
            (tau * dow / 7.0).cos() as f32,
        ]
    })
}

/// `ln(1 + c)` as f32, from a table for small counts (the same values as computing it: the
/// table is filled with the same expression).
fn log1p_count(c: u32) -> f32 {
    static TABLE: std::sync::OnceLock<[f32; 1024]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| std::array::from_fn(|c| (c as f64).ln_1p() as f32));
    match table.get(c as usize) {
        Some(v) => *v,
        None => f64::from(c).ln_1p() as f32,
    }
}

/// `ln(1 + x)` as f32 for a non-negative integer-valued `x` (a sum of counts), through the
/// table when it is small.
fn log1p_integer(x: f64) -> f32 {
    if x < 1024.0 {
        log1p_count(x as u32)
    } else {
        x.ln_1p() as f32
    }
}

/// Number of floats one series occupies in the full `[WINDOW, N_FEATURES]` window.
const BLOCK: usize = WINDOW * N_FEATURES;

/// Number of floats in the model's `context` input per series: features 1.. of the last step.
pub const CONTEXT: usize = N_FEATURES - 1;

/// Features 5–9 of a history: the same at every step of its window.
struct SeriesFeatures {
    priority: f32,
    window_mean: f32,
    seasonal: f32,
    history_mean: f32,
    silence: f32,
}

/// The last `take = min(n, WINDOW)` counts of `h` (the rest of the window is zero padding).
fn recent<'a>(h: &History<'a>) -> &'a [u32] {
    let n = h.counts.len();
    &h.counts[n - n.min(WINDOW)..]
}

fn series_features(h: &History<'_>) -> SeriesFeatures {
    let n = h.counts.len();
    let window_mean = (sum(recent(h)) / WINDOW as f64).ln_1p() as f32;
    let seasonal = log1p_integer(seasonal_naive_p50(h.counts, h.bucket_secs));
    let long = &h.counts[n - n.min(max_history(h.bucket_secs))..];
    let long_mean = if long.is_empty() {
        0.0
    } else {
        sum(long) / long.len() as f64
    };
    // Buckets after the last non-zero count of the last 7 days (all of them when all are zero).
    let silence = long
        .iter()
        .rev()
        .position(|c| *c != 0)
        .unwrap_or(long.len());
    SeriesFeatures {
        priority: priority_feature(h.priority),
        window_mean,
        seasonal,
        history_mean: long_mean.ln_1p() as f32,
        silence: log1p_integer(silence as f64),
    }
}

/// Feature 0 of every step of the window of `h` into `out` (`WINDOW` values, left-padded).
fn fill_counts(h: &History<'_>, out: &mut [f32]) {
    let recent = recent(h);
    let pad = WINDOW - recent.len();
    out[..pad].fill(0.0);
    for (o, c) in out[pad..].iter_mut().zip(recent) {
        *o = log1p_count(*c);
    }
}

/// Features 1.. of one step, from its calendar and the series' features.
fn step_context(c: &[f32; 4], s: &SeriesFeatures) -> [f32; CONTEXT] {
    [
        c[0],
        c[1],
        c[2],
        c[3],
        s.priority,
        s.window_mean,
        s.seasonal,
        s.history_mean,
        s.silence,
    ]
}

/// Write the features of `h` into `block` (`WINDOW × N_FEATURES`, row-major), every element.
fn fill_with_calendar(h: &History<'_>, cal: &Calendar, block: &mut [f32]) {
    let s = series_features(h);
    let mut counts = [0f32; WINDOW];
    fill_counts(h, &mut counts);
    for ((row, c), x0) in block.chunks_exact_mut(N_FEATURES).zip(cal).zip(counts) {
        row[0] = x0;
        row[1..].copy_from_slice(&step_context(c, &s));
    }
}

/// Append the `WINDOW × N_FEATURES` features of `h` to `out` (row-major, step by step).
/// Histories shorter than `WINDOW` are left-padded with zero counts (features 7–9 use the
/// history as given).
pub fn push_features(h: &History<'_>, out: &mut Vec<f32>) {
    let at = out.len();
    out.resize(at + BLOCK, 0.0);
    fill_with_calendar(
        h,
        &calendar(h.last_bucket_start, h.bucket_secs),
        &mut out[at..],
    );
}

/// The full feature windows of a batch, `[histories.len(), WINDOW, N_FEATURES]` row-major: the
/// same values as [`push_features`] for each history, with the calendar features computed once
/// per distinct (last bucket start, bucket width) run — in a planner tick every series shares
/// them.
pub fn batch_features(histories: &[History<'_>]) -> Vec<f32> {
    let mut out = Vec::new();
    batch_features_into(histories, &mut out);
    out
}

/// Resize a reused buffer to `len` (a buffer already that long is not cleared: every element
/// is overwritten by the caller).
fn resize_for(out: &mut Vec<f32>, len: usize) {
    if out.len() != len {
        out.clear();
        out.resize(len, 0.0);
    }
}

/// Calendar features of `key`, computed once per run of equal keys.
fn cached_calendar(cached: &mut Option<(CalendarKey, Calendar)>, key: CalendarKey) -> &Calendar {
    match cached {
        Some((k, _)) if *k == key => {}
        _ => *cached = Some((key, calendar(key.0, key.1))),
    }
    &cached.as_ref().expect("just set").1
}

/// [`batch_features`] into a reused buffer, so a caller forecasting every tick does not
/// allocate and page in a fresh buffer each time; each series' rows are written in place.
pub fn batch_features_into(histories: &[History<'_>], out: &mut Vec<f32>) {
    resize_for(out, histories.len() * BLOCK);
    let mut cached: Option<(CalendarKey, Calendar)> = None;
    for (h, block) in histories.iter().zip(out.chunks_exact_mut(BLOCK)) {
        let cal = cached_calendar(&mut cached, (h.last_bucket_start, h.bucket_secs));
        fill_with_calendar(h, cal, block);
    }
}

/// The ONNX model's inputs for a batch (`models/README.md`, "Model input"), into reused
/// buffers: `counts` `[len, WINDOW]` = feature 0 of every step, `context` `[len, CONTEXT]` =
/// features 1.. of the last step — the same values as the corresponding entries of
/// [`batch_features`], without the redundant ones (features 1–4 of earlier steps follow from
/// the last step's time, 5–9 are the same at every step), so 1/7 of the floats.
pub fn batch_model_input_into(
    histories: &[History<'_>],
    counts: &mut Vec<f32>,
    context: &mut Vec<f32>,
) {
    resize_for(counts, histories.len() * WINDOW);
    resize_for(context, histories.len() * CONTEXT);
    let mut cached: Option<(CalendarKey, Calendar)> = None;
    for ((h, cts), ctx) in histories
        .iter()
        .zip(counts.chunks_exact_mut(WINDOW))
        .zip(context.chunks_exact_mut(CONTEXT))
    {
        let cal = cached_calendar(&mut cached, (h.last_bucket_start, h.bucket_secs));
        fill_counts(h, cts);
        ctx.copy_from_slice(&step_context(&cal[WINDOW - 1], &series_features(h)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_priority_feature_is_named_so() {
        assert_eq!(FEATURE_NAMES[PRIORITY_FEATURE], "priority_over_10");
        assert_eq!(priority_feature(200), priority_feature(MAX_PRIORITY));
    }

    #[test]
    fn log1p_tables_equal_computing() {
        for c in [0u32, 1, 2, 255, 256, 1023, 1024, 5000, u32::MAX] {
            assert_eq!(log1p_count(c), f64::from(c).ln_1p() as f32);
            assert_eq!(log1p_integer(f64::from(c)), f64::from(c).ln_1p() as f32);
        }
    }

    #[test]
    fn calendar_features() {
        // 1970-01-04 00:00 UTC was a Sunday; the window's last bucket starts then.
        let counts = [0u32; 40];
        let h = History {
            counts: &counts,
            last_bucket_start: 3 * 86_400,
            bucket_secs: 900,
            priority: 10,
        };
        let mut f = Vec::new();
        push_features(&h, &mut f);
        assert_eq!(f.len(), WINDOW * N_FEATURES);
        let last = &f[(WINDOW - 1) * N_FEATURES..];
        assert!(
            (last[1] - 0.0).abs() < 1e-6 && (last[2] - 1.0).abs() < 1e-6,
            "midnight"
        );
        assert!(
            (last[3] - 0.0).abs() < 1e-6 && (last[4] - 1.0).abs() < 1e-6,
            "sunday"
        );
        assert!((last[5] - 1.0).abs() < 1e-6);
        assert!(h.input_is_silent());
    }

    #[test]
    fn short_history_is_left_padded() {
        let counts = [3u32, 1];
        let h = History {
            counts: &counts,
            last_bucket_start: 0,
            bucket_secs: 900,
            priority: 5,
        };
        let mut f = Vec::new();
        push_features(&h, &mut f);
        assert_eq!(f[0], 0.0);
        assert!((f[(WINDOW - 2) * N_FEATURES] - 4f32.ln()).abs() < 1e-6);
        assert!((f[(WINDOW - 1) * N_FEATURES] - 2f32.ln()).abs() < 1e-6);
        let mean = (4.0f64 / 32.0).ln_1p() as f32;
        assert!((f[6] - mean).abs() < 1e-7);
    }

    #[test]
    fn history_features_and_batch_equal_single() {
        // Two days of history: feature 7 is the sum of the 4 buckets one day (96) before the
        // target, feature 8 the log of the mean of the whole history.
        let counts: Vec<u32> = (0..192u32).map(|i| i % 5).collect();
        let h = History {
            counts: &counts,
            last_bucket_start: 1_700_000_100, // a multiple of 900
            bucket_secs: 900,
            priority: 5,
        };
        let mut f = Vec::new();
        push_features(&h, &mut f);
        let seasonal: f64 = counts[96..100].iter().map(|c| f64::from(*c)).sum();
        let mean = counts.iter().map(|c| f64::from(*c)).sum::<f64>() / 192.0;
        assert!((f[7] - seasonal.ln_1p() as f32).abs() < 1e-7);
        assert!((f[8] - mean.ln_1p() as f32).abs() < 1e-7);
        assert_eq!(f[9], 0.0, "the last bucket is non-zero: no silence");
        // Feature 9: buckets after the last non-zero count, or the whole history when silent.
        let mut quiet = counts.clone();
        quiet.extend([0u32; 40]);
        let mut f = Vec::new();
        push_features(
            &History {
                counts: &quiet,
                ..h
            },
            &mut f,
        );
        assert!((f[9] - 40f32.ln_1p()).abs() < 1e-6);
        let silent = [0u32; 50];
        let mut f = Vec::new();
        push_features(
            &History {
                counts: &silent,
                ..h
            },
            &mut f,
        );
        assert!((f[9] - 50f32.ln_1p()).abs() < 1e-6);
        let other = History {
            last_bucket_start: h.last_bucket_start + 900,
            ..h
        };
        let batch = batch_features(&[h, h, other, h]);
        let mut single = Vec::new();
        for x in [h, h, other, h] {
            push_features(&x, &mut single);
        }
        assert_eq!(batch, single);
        // The model input is the projection of the full windows: feature 0 of every step and
        // features 1.. of the last step, bit for bit.
        let quiet: Vec<u32> = counts[..20].to_vec();
        let hs = [
            h,
            other,
            History {
                counts: &quiet,
                ..h
            },
        ];
        let full = batch_features(&hs);
        let (mut cts, mut ctx) = (vec![7.0; 3], Vec::new());
        batch_model_input_into(&hs, &mut cts, &mut ctx);
        for (k, w) in full.chunks_exact(BLOCK).enumerate() {
            for i in 0..WINDOW {
                assert_eq!(cts[k * WINDOW + i], w[i * N_FEATURES]);
            }
            assert_eq!(
                &ctx[k * CONTEXT..(k + 1) * CONTEXT],
                &w[(WINDOW - 1) * N_FEATURES + 1..]
            );
        }
        let empty = History { counts: &[], ..h };
        let mut f = Vec::new();
        push_features(&empty, &mut f);
        assert!(f.iter().all(|v| v.is_finite()));
    }
}
