//! Anomalies: a (resource, region) series whose live counts leave its forecast band for a
//! sustained interval. Above the upper quantile it is a surge (shadowing widens to more
//! regions until it calms); below the lower quantile it is a drop (its shadows are released
//! before their TTL).
//!
//! A tick's window holds a minute or two of requests, where a count varies by chance far more
//! than the hourly forecast's band: a steady 120 requests an hour (band 106–134) counts 0–6 in
//! 90 s. So the band is widened by that chance, as a Poisson count: a window is above the band
//! when its count exceeds the 90th percentile of a count whose mean is the band's top, below it
//! when under the 10th percentile of one whose mean is the band's bottom.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// `[signals.anomaly]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalySection {
    /// Whether anomalies change shadowing.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Consecutive planning ticks outside the band to flag a series; a flag clears after as
    /// many ticks in a row that do not confirm it, or at once on a tick beyond the other
    /// side of the band (a surge ends on a tick below the lower quantile, an empty one
    /// included, when that quantile, as a window count, is at least one request).
    #[serde(default = "default_sustain")]
    pub sustain_ticks: u32,
    /// Fewest requests in a tick's window that can count as a surge.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// Extra regions (nearest first) a surging resource is shadowed in.
    #[serde(default = "default_widen")]
    pub widen_regions: usize,
}

impl Default for AnomalySection {
    fn default() -> Self {
        AnomalySection {
            enabled: true,
            sustain_ticks: default_sustain(),
            min_requests: default_min_requests(),
            widen_regions: default_widen(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_sustain() -> u32 {
    3
}
fn default_min_requests() -> u32 {
    3
}
fn default_widen() -> usize {
    1
}

/// A series' standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    /// Inside its band.
    Normal,
    /// Above the upper quantile for a sustained interval.
    Surge,
    /// Below the lower quantile for a sustained interval.
    Drop,
}

impl Standing {
    /// Label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Standing::Normal => "normal",
            Standing::Surge => "surge",
            Standing::Drop => "drop",
        }
    }
}

#[derive(Debug, Clone)]
struct Track {
    /// Expected requests per second at the lower and upper quantile (previous forecast).
    band: (f64, f64),
    above: u32,
    below: u32,
    /// Ticks in a row that did not confirm the current flag.
    unconfirmed: u32,
    standing: Standing,
}

/// The standard normal's 90th percentile.
const Z90: f64 = 1.281_551_565_5;

/// The 90th (`upper`) or 10th percentile of a Poisson count with mean `mean`: exact up to a
/// mean of 100 ([`models::baseline::poisson_quantile`], which takes about `mean` steps), by
/// the normal approximation (with continuity correction) above, where it is within a count of
/// the exact one.
fn poisson_quantile(mean: f64, upper: bool) -> u32 {
    if mean.is_nan() || mean <= 0.0 {
        return 0;
    }
    let (q, z) = if upper { (0.9, Z90) } else { (0.1, -Z90) };
    let k = if mean > 100.0 {
        (mean + z * mean.sqrt() - 0.5).ceil().max(0.0)
    } else {
        models::baseline::poisson_quantile(mean, q)
    };
    k.min(f64::from(u32::MAX)) as u32
}

/// Per-series band tracking.
#[derive(Debug, Default)]
pub struct Detector {
    tracks: HashMap<(String, usize), Track>,
}

impl Detector {
    /// Compare `actual` requests seen in the last `window_secs` with the band of the previous
    /// forecast, then store `band` (requests per second at p10 and p90) for the next tick.
    /// Returns the new standing when it changed.
    pub fn observe(
        &mut self,
        key: &str,
        region: usize,
        (actual, window_secs): (u32, f64),
        band: (f64, f64),
        cfg: &AnomalySection,
    ) -> Option<Standing> {
        let t = self
            .tracks
            .entry((key.to_string(), region))
            .or_insert(Track {
                band,
                above: 0,
                below: 0,
                unconfirmed: 0,
                standing: Standing::Normal,
            });
        let lo = poisson_quantile(t.band.0 * window_secs, false);
        let hi = poisson_quantile(t.band.1 * window_secs, true);
        let above = actual > hi && actual >= cfg.min_requests;
        let below = !above && actual < lo;
        t.above = if above { t.above + 1 } else { 0 };
        t.below = if below { t.below + 1 } else { 0 };
        t.band = band;
        let before = t.standing;
        let n = cfg.sustain_ticks.max(1);
        // A flag lasts while ticks keep confirming it: traffic swinging across the band
        // (busy, idle, busy, …) reaches no run of `n` and must not hold a flag for ever.
        let (confirms, contradicts) = match t.standing {
            Standing::Surge => (above, below),
            Standing::Drop => (below, above),
            Standing::Normal => (false, false),
        };
        t.unconfirmed = if confirms {
            0
        } else {
            t.unconfirmed.saturating_add(1)
        };
        if contradicts || (t.standing != Standing::Normal && t.unconfirmed >= n) {
            t.standing = Standing::Normal;
        }
        if t.above >= n {
            t.standing = Standing::Surge;
        } else if t.below >= n {
            t.standing = Standing::Drop;
        }
        if t.standing != before {
            t.unconfirmed = 0;
        }
        (t.standing != before).then_some(t.standing)
    }

    /// The current standing of a series.
    pub fn standing(&self, key: &str, region: usize) -> Standing {
        self.tracks
            .get(&(key.to_string(), region))
            .map_or(Standing::Normal, |t| t.standing)
    }

    /// Forget series not seen this tick, so memory follows the monitored set.
    pub fn retain(&mut self, keep: impl Fn(&str, usize) -> bool) {
        self.tracks.retain(|(k, r), _| keep(k, *r));
    }

    /// Series per standing.
    pub fn census(&self) -> (usize, usize) {
        self.tracks
            .values()
            .fold((0, 0), |(s, d), t| match t.standing {
                Standing::Surge => (s + 1, d),
                Standing::Drop => (s, d + 1),
                Standing::Normal => (s, d),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sustained_surge_and_drop_are_flagged_and_calm_clears_them() {
        let cfg = AnomalySection::default();
        let mut d = Detector::default();
        // Band: 0.01–0.05 requests/s, i.e. 0.6–3 per 60 s window.
        let band = (0.01, 0.05);
        let w = 60.0;
        assert_eq!(d.observe("k", 0, (2, w), band, &cfg), None);
        // One spike is not an anomaly; three in a row is.
        assert_eq!(d.observe("k", 0, (40, w), band, &cfg), None);
        assert_eq!(d.observe("k", 0, (40, w), band, &cfg), None);
        assert_eq!(
            d.observe("k", 0, (40, w), band, &cfg),
            Some(Standing::Surge)
        );
        assert_eq!(d.standing("k", 0), Standing::Surge);
        assert_eq!(d.census(), (1, 0));
        for _ in 0..2 {
            assert_eq!(d.observe("k", 0, (2, w), band, &cfg), None);
        }
        assert_eq!(
            d.observe("k", 0, (2, w), band, &cfg),
            Some(Standing::Normal)
        );
        // A drop needs a lower bound of at least one request to fall below.
        let busy = (0.5, 1.0);
        d.observe("b", 1, (40, w), busy, &cfg);
        for _ in 0..2 {
            assert_eq!(d.observe("b", 1, (0, w), busy, &cfg), None);
        }
        assert_eq!(d.observe("b", 1, (0, w), busy, &cfg), Some(Standing::Drop));
        // Too few requests never make a surge.
        let quiet = (0.0, 0.001);
        for _ in 0..5 {
            assert_eq!(d.observe("q", 0, (2, w), quiet, &cfg), None);
        }
        d.retain(|k, _| k == "k");
        assert_eq!(d.standing("b", 1), Standing::Normal);
    }

    #[test]
    fn window_counts_are_judged_with_their_chance_variation() {
        assert_eq!(poisson_quantile(0.0, true), 0);
        assert_eq!(poisson_quantile(3.0, true), 5);
        assert_eq!(poisson_quantile(3.0, false), 1);
        assert_eq!(poisson_quantile(0.6, false), 0);
        assert_eq!(poisson_quantile(100.0, true), 113);
        // Above 100 the approximation, within a count of the exact 90th percentile.
        let approx = poisson_quantile(400.0, true);
        assert!((425..=427).contains(&approx), "{approx}");
        assert_eq!(poisson_quantile(f64::NAN, true), 0);
        // A steady 120 requests an hour, forecast at 106–134, judged on 90 s windows of what
        // such a series counts: no flag, though most windows fall outside the scaled band
        // (2.65–3.35 requests) and runs of three on either side occur.
        let cfg = AnomalySection::default();
        let mut d = Detector::default();
        let band = (106.0 / 3600.0, 134.0 / 3600.0);
        let counts = [3, 1, 2, 2, 4, 5, 4, 3, 0, 2, 1, 2, 6, 4, 5, 3, 2, 3];
        for (i, n) in counts.into_iter().enumerate() {
            assert_eq!(d.observe("k", 0, (n, 90.0), band, &cfg), None, "window {i}");
        }
    }

    #[test]
    fn traffic_swinging_across_the_band_holds_no_flag() {
        let cfg = AnomalySection::default();
        let mut d = Detector::default();
        let (w, busy) = (60.0, (0.05, 0.2)); // 3–12 per window
        for _ in 0..3 {
            d.observe("k", 0, (0, w), busy, &cfg);
        }
        assert_eq!(d.standing("k", 0), Standing::Drop);
        // Busy above the band, then idle: the first busy tick ends the drop.
        assert_eq!(
            d.observe("k", 0, (40, w), busy, &cfg),
            Some(Standing::Normal)
        );
        for i in 0..20 {
            let n = if i % 2 == 0 { 0 } else { 40 };
            assert_eq!(d.observe("k", 0, (n, w), busy, &cfg), None, "tick {i}");
        }
        // A surge that goes on inside the band and above it, never three above in a row,
        // ends after three ticks without one.
        for _ in 0..3 {
            d.observe("s", 0, (40, w), busy, &cfg);
        }
        assert_eq!(d.standing("s", 0), Standing::Surge);
        for (n, expect) in [(5, None), (40, None), (5, None), (5, None)] {
            assert_eq!(d.observe("s", 0, (n, w), busy, &cfg), expect);
        }
        assert_eq!(
            d.observe("s", 0, (5, w), busy, &cfg),
            Some(Standing::Normal)
        );
    }
}
