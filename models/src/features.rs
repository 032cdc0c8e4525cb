//! The feature pipeline, identical to the training code's (`models/train/features.py`); the
//! contract is in `models/README.md`. A fixture exported by training checks the two agree.

/// Steps in a model window.
pub const WINDOW: usize = 32;
/// Buckets in the forecast horizon.
pub const HORIZON: usize = 4;
/// Features per step.
pub const N_FEATURES: usize = 7;
/// Feature names, in order.
pub const FEATURE_NAMES: [&str; N_FEATURES] = [
    "log1p_count",
    "sin_time_of_day",
    "cos_time_of_day",
    "sin_day_of_week",
    "cos_day_of_week",
    "priority_over_10",
    "log1p_window_mean",
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

/// Append the `WINDOW × N_FEATURES` features of `h` to `out` (row-major, step by step).
/// Histories shorter than `WINDOW` are left-padded with zero counts.
pub fn push_features(h: &History<'_>, out: &mut Vec<f32>) {
    let n = h.counts.len();
    let take = n.min(WINDOW);
    let pad = WINDOW - take;
    let recent = &h.counts[n - take..];
    let mean = recent.iter().map(|c| f64::from(*c)).sum::<f64>() / WINDOW as f64;
    let mean_feature = mean.ln_1p() as f32;
    let priority = f64::from(h.priority.min(10)) / 10.0;
    for i in 0..WINDOW {
        let c = if i < pad { 0 } else { recent[i - pad] };
        let t = h.last_bucket_start - (WINDOW - 1 - i) as i64 * h.bucket_secs;
        let tod = t.rem_euclid(86_400) as f64 / 86_400.0;
        let dow = (t.div_euclid(86_400) + 4).rem_euclid(7) as f64;
        let tau = std::f64::consts::TAU;
        out.extend_from_slice(&[
            f64::from(c).ln_1p() as f32,
            (tau * tod).sin() as f32,
            (tau * tod).cos() as f32,
            (tau * dow / 7.0).sin() as f32,
            (tau * dow / 7.0).cos() as f32,
            priority as f32,
            mean_feature,
        ]);
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
}
