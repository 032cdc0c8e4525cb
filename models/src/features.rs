//! The feature pipeline, identical to the training code's (`models/train/features.py`); the
//! contract is in `models/README.md`. A fixture exported by training checks the two agree.

/// Steps in a model window.
pub const WINDOW: usize = 32;
/// Buckets in the forecast horizon.
pub const HORIZON: usize = 4;
/// Features per step.
pub const N_FEATURES: usize = 9;
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
];

/// Priority assumed when a resource has none registered.
pub const DEFAULT_PRIORITY: u8 = 5;

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
        self.counts.iter().rev().take(WINDOW).all(|c| *c == 0)
    }
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

/// `ln(1 + c)` as f32, from a table for small counts (same values as computing it).
fn log1p_count(c: u32) -> f32 {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| std::array::from_fn(|c| (c as f64).ln_1p() as f32));
    match table.get(c as usize) {
        Some(v) => *v,
        None => f64::from(c).ln_1p() as f32,
    }
}

fn push_with_calendar(h: &History<'_>, cal: &Calendar, out: &mut Vec<f32>) {
    let n = h.counts.len();
    let take = n.min(WINDOW);
    let pad = WINDOW - take;
    let recent = &h.counts[n - take..];
    let mean_feature = (sum(recent) / WINDOW as f64).ln_1p() as f32;
    let seasonal = seasonal_naive_p50(h.counts, h.bucket_secs).ln_1p() as f32;
    let long = &h.counts[n - n.min(max_history(h.bucket_secs))..];
    let long_mean = if long.is_empty() {
        0.0
    } else {
        sum(long) / long.len() as f64
    };
    let history_feature = long_mean.ln_1p() as f32;
    let priority = (f64::from(h.priority.min(10)) / 10.0) as f32;
    // One series' block, built on the stack and appended with one copy.
    let mut block = [0f32; WINDOW * N_FEATURES];
    for (i, (row, c)) in block.chunks_exact_mut(N_FEATURES).zip(cal).enumerate() {
        let count = if i < pad { 0 } else { recent[i - pad] };
        row.copy_from_slice(&[
            log1p_count(count),
            c[0],
            c[1],
            c[2],
            c[3],
            priority,
            mean_feature,
            seasonal,
            history_feature,
        ]);
    }
    out.extend_from_slice(&block);
}

/// Append the `WINDOW × N_FEATURES` features of `h` to `out` (row-major, step by step).
/// Histories shorter than `WINDOW` are left-padded with zero counts (features 7 and 8 use the
/// history as given).
pub fn push_features(h: &History<'_>, out: &mut Vec<f32>) {
    push_with_calendar(h, &calendar(h.last_bucket_start, h.bucket_secs), out);
}

/// The model input for a batch, `[histories.len(), WINDOW, N_FEATURES]` row-major: the same
/// values as [`push_features`] for each history, with the calendar features computed once per
/// distinct (last bucket start, bucket width) run — in a planner tick every series shares them.
pub fn batch_features(histories: &[History<'_>]) -> Vec<f32> {
    let mut out = Vec::new();
    batch_features_into(histories, &mut out);
    out
}

/// [`batch_features`] into a reused buffer (cleared first), so a caller forecasting every tick
/// does not allocate and page in a fresh input of `len × WINDOW × N_FEATURES` floats each time.
pub fn batch_features_into(histories: &[History<'_>], out: &mut Vec<f32>) {
    out.clear();
    out.reserve(histories.len() * WINDOW * N_FEATURES);
    let mut cached: Option<(CalendarKey, Calendar)> = None;
    for h in histories {
        let key = (h.last_bucket_start, h.bucket_secs);
        let cal = match &cached {
            Some((k, cal)) if *k == key => cal,
            _ => &cached.insert((key, calendar(key.0, key.1))).1,
        };
        push_with_calendar(h, cal, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let empty = History { counts: &[], ..h };
        let mut f = Vec::new();
        push_features(&empty, &mut f);
        assert!(f.iter().all(|v| v.is_finite()));
    }
}
