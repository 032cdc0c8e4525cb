//! Online calibration of P(any request in the horizon), the confidence the shadow planner
//! thresholds and prices.
//!
//! A threshold of 0.5 means "shadow what is more likely used than not" only if a forecaster's
//! P comes true as often as it says, and the baselines' do not. Seasonal naive counts the days
//! of the last week with a request in the slot, and a broker younger than a week has seen
//! fewer than seven: on the apache trace a P of 2/7 came true 64% of the time and 3/7 88%.
//! EWMA's Poisson P of 0.5–0.7 came true 17% of the time
//! (`bench/offline/forecast_calibration.py`). So every forecast is scored once its horizon
//! has passed, per forecaster in bands of its P, and a forecast's P is answered with what its
//! band came to.
//!
//! Every forecast of a series is scored, whatever is then done with it (the first one after
//! each bucket, as [`crate::guard`] scores its medians), so the shares are not biased by which
//! forecasts were acted on. A band starts from its own P counted as [`PRIOR`] forecasts, so
//! a fresh calibrator answers a forecaster's own P until outcomes say otherwise; outcomes fade
//! with a half-life of [`HALF_LIFE_BUCKETS`] buckets, so a changed workload is followed. The
//! bands' shares are made non-decreasing in P (pooled where a higher band came true less
//! often), and a P between two bands' mean P is interpolated, so forecasts keep their order.

use std::collections::{HashMap, VecDeque};

use crate::features::{horizon_after, History};

/// Bands of P, a tenth wide.
pub const BANDS: usize = 10;
/// Forecasts at its own P a band starts from.
const PRIOR: f64 = 10.0;
/// Buckets over which a band's outcomes fade to half: a day of 15-minute buckets.
const HALF_LIFE_BUCKETS: f64 = 96.0;

/// The band of `p`.
pub fn band(p: f64) -> usize {
    ((p.clamp(0.0, 1.0) * BANDS as f64) as usize).min(BANDS - 1)
}

/// One band's faded outcomes.
#[derive(Debug, Clone, Copy, Default)]
struct Band {
    /// Forecasts scored.
    n: f64,
    /// Sum of their P.
    p_sum: f64,
    /// Of them, with a request in the horizon.
    came: f64,
}

/// One forecaster's bands.
#[derive(Debug, Clone)]
struct Curve {
    name: String,
    bands: [Band; BANDS],
}

impl Curve {
    /// Points (mean P, share come true, weight) of every band, the prior included.
    fn points(&self) -> [(f64, f64, f64); BANDS] {
        std::array::from_fn(|b| {
            let centre = (b as f64 + 0.5) / BANDS as f64;
            let band = self.bands[b];
            let w = band.n + PRIOR;
            (
                (band.p_sum + PRIOR * centre) / w,
                (band.came + PRIOR * centre) / w,
                w,
            )
        })
    }

    /// The calibrated P of a forecast at `p`.
    fn map(&self, p: f64) -> f64 {
        let points = self.points();
        let ys = non_decreasing(&points.map(|(_, y, w)| (y, w)));
        let xs = points.map(|(x, _, _)| x);
        let y = match xs.iter().position(|x| *x >= p) {
            // Beyond the outermost points: their share, shifted by the distance in P.
            Some(0) => ys[0] + (p - xs[0]),
            None => ys[BANDS - 1] + (p - xs[BANDS - 1]),
            Some(i) => {
                let t = (p - xs[i - 1]) / (xs[i] - xs[i - 1]).max(f64::EPSILON);
                ys[i - 1] + t * (ys[i] - ys[i - 1])
            }
        };
        y.clamp(0.0, 1.0)
    }
}

/// Weighted isotonic (non-decreasing) fit of `(value, weight)` by pooling adjacent
/// violators.
fn non_decreasing(points: &[(f64, f64); BANDS]) -> [f64; BANDS] {
    // Blocks of (mean, weight, bands covered).
    let mut blocks: Vec<(f64, f64, usize)> = Vec::with_capacity(BANDS);
    for &(y, w) in points {
        blocks.push((y, w, 1));
        while blocks.len() > 1 && blocks[blocks.len() - 2].0 > blocks[blocks.len() - 1].0 {
            let (y2, w2, n2) = blocks.pop().expect("two blocks");
            let (y1, w1, n1) = blocks.pop().expect("two blocks");
            blocks.push(((y1 * w1 + y2 * w2) / (w1 + w2), w1 + w2, n1 + n2));
        }
    }
    let mut out = [0.0; BANDS];
    let mut i = 0;
    for (y, _, n) in blocks {
        out[i..i + n].fill(y);
        i += n;
    }
    out
}

/// A forecast waiting for its horizon.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Start of the bucket it was made after.
    made_after: i64,
    /// Index into the calibrator's curves.
    curve: usize,
    p: f64,
}

#[derive(Debug, Default)]
struct Series {
    pending: VecDeque<Pending>,
    /// Seen since the last [`Calibrator::end_tick`].
    seen: bool,
}

/// Outcomes scored since the last [`Calibrator::take_scored`]: per forecaster and band,
/// (came true, did not).
pub type Scored = HashMap<(String, usize), (u64, u64)>;

/// Per-forecaster calibration of P(any request in the horizon).
#[derive(Debug, Default)]
pub struct Calibrator {
    curves: Vec<Curve>,
    series: HashMap<u64, Series>,
    /// What forecaster the model slot is (see [`Self::serving`]).
    serving: Option<u64>,
    /// Newest bucket start seen: the outcomes fade as it moves on.
    latest: Option<i64>,
    scored: Scored,
}

impl Calibrator {
    /// A calibrator with no outcomes: it answers every P as given.
    pub fn new() -> Self {
        Self::default()
    }

    /// Say which model serves (any identity that changes when it does). On a change every
    /// outcome is dropped: a new model's P means something else.
    pub fn serving(&mut self, identity: u64) {
        if self.serving.is_some_and(|s| s != identity) {
            self.curves.clear();
            self.series.clear();
        }
        self.serving = Some(identity);
    }

    /// Series `id` with history `h` is forecast by `forecaster` at `p`: score the series'
    /// earlier forecasts whose horizon `h` now holds, keep this one (the first after its
    /// bucket), and return its calibrated P.
    pub fn calibrate(&mut self, id: u64, h: &History<'_>, forecaster: &str, p: f32) -> f32 {
        self.fade_to(h);
        let curve = match self.curves.iter().position(|c| c.name == forecaster) {
            Some(i) => i,
            None => {
                self.curves.push(Curve {
                    name: forecaster.to_string(),
                    bands: [Band::default(); BANDS],
                });
                self.curves.len() - 1
            }
        };
        let s = self.series.entry(id).or_default();
        s.seen = true;
        let span = crate::features::HORIZON as i64 * h.bucket_secs.max(1);
        while let Some(f) = s.pending.front().copied() {
            if f.made_after + span > h.last_bucket_start {
                break;
            }
            s.pending.pop_front();
            let Some(horizon) = horizon_after(h, f.made_after) else {
                continue;
            };
            let came = horizon.iter().any(|c| *c > 0);
            let c = &mut self.curves[f.curve];
            let b = &mut c.bands[band(f.p)];
            b.n += 1.0;
            b.p_sum += f.p;
            b.came += if came { 1.0 } else { 0.0 };
            let tally = self.scored.entry((c.name.clone(), band(f.p))).or_default();
            if came {
                tally.0 += 1;
            } else {
                tally.1 += 1;
            }
        }
        let p = f64::from(p);
        if s.pending
            .back()
            .is_none_or(|f| f.made_after < h.last_bucket_start)
        {
            s.pending.push_back(Pending {
                made_after: h.last_bucket_start,
                curve,
                p,
            });
        }
        self.curves[curve].map(p) as f32
    }

    /// Fade every band by the buckets `h` is past the newest seen.
    fn fade_to(&mut self, h: &History<'_>) {
        let last = h.last_bucket_start;
        let moved = match self.latest {
            Some(l) if last > l => (last - l) / h.bucket_secs.max(1),
            Some(_) => return,
            None => 0,
        };
        self.latest = Some(last);
        if moved == 0 {
            return;
        }
        let keep = 0.5f64.powf(moved as f64 / HALF_LIFE_BUCKETS);
        for c in &mut self.curves {
            for b in &mut c.bands {
                b.n *= keep;
                b.p_sum *= keep;
                b.came *= keep;
            }
        }
    }

    /// Forget the series not seen since the last call (their waiting forecasts are not
    /// scored): the calibrator holds no more series than the caller forecasts.
    pub fn end_tick(&mut self) {
        self.series.retain(|_, s| std::mem::take(&mut s.seen));
    }

    /// The outcomes scored since the last call.
    pub fn take_scored(&mut self) -> Scored {
        std::mem::take(&mut self.scored)
    }

    /// `forecaster`'s calibrated P for a forecast at `p`, without scoring anything.
    pub fn calibrated(&self, forecaster: &str, p: f32) -> f32 {
        self.curves
            .iter()
            .find(|c| c.name == forecaster)
            .map_or(p, |c| c.map(f64::from(p)) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: i64 = 900;

    fn hist(counts: &[u32], last: i64) -> History<'_> {
        History {
            counts,
            last_bucket_start: last,
            bucket_secs: B,
            priority: 5,
        }
    }

    /// Feed series `id`, bucket by bucket, forecasting `p` after each; returns the last
    /// calibrated P.
    fn feed(c: &mut Calibrator, id: u64, counts: &[u32], name: &str, p: f32) -> f32 {
        let mut out = p;
        for end in 1..=counts.len() {
            out = c.calibrate(id, &hist(&counts[..end], (end as i64 - 1) * B), name, p);
        }
        out
    }

    #[test]
    fn a_fresh_calibrator_answers_the_forecasters_own_p() {
        let c = Calibrator::new();
        for p in [0.0, 0.03, 0.29, 0.5, 0.97, 1.0] {
            assert!((c.calibrated("seasonal_naive", p) - p).abs() < 1e-6, "{p}");
        }
        let mut c = Calibrator::new();
        assert!((c.calibrate(1, &hist(&[0, 1], B), "ewma", 0.73) - 0.73).abs() < 1e-6);
    }

    #[test]
    fn an_underconfident_band_is_raised_and_an_overconfident_one_lowered() {
        let mut c = Calibrator::new();
        // Busy series said to be 0.29 likely: every horizon had a request.
        let busy = vec![1u32; 200];
        for id in 0..20 {
            feed(&mut c, id, &busy, "seasonal_naive", 2.0 / 7.0);
        }
        let raised = c.calibrated("seasonal_naive", 2.0 / 7.0);
        assert!(raised > 0.95, "{raised}");
        // Silent series said to be 0.6 likely: none came true.
        let quiet = vec![0u32; 200];
        for id in 100..120 {
            feed(&mut c, id, &quiet, "ewma", 0.6);
        }
        let lowered = c.calibrated("ewma", 0.6);
        assert!(lowered < 0.05, "{lowered}");
        // Each forecaster keeps its own bands; a higher P never answers less than a lower
        // band came to.
        assert!(c.calibrated("seasonal_naive", 0.6) > 0.95);
        assert!(c.calibrated("ewma", 0.3) < 0.05);
        let scored = c.take_scored();
        assert_eq!(scored[&("seasonal_naive".to_string(), 2)].1, 0);
        assert_eq!(scored[&("ewma".to_string(), 6)].0, 0);
        assert!(c.take_scored().is_empty());
    }

    #[test]
    fn outcomes_are_judged_on_the_horizon_after_the_forecast() {
        let mut c = Calibrator::new();
        // A forecast after bucket 9; requests only in bucket 14, outside its horizon 10..=13.
        let mut counts = [0u32; 20];
        counts[14] = 1;
        c.calibrate(1, &hist(&counts[..10], 9 * B), "m", 0.5);
        // Three buckets on the horizon is not whole yet.
        c.calibrate(1, &hist(&counts[..13], 12 * B), "m", 0.5);
        assert!(c.take_scored().is_empty());
        c.calibrate(1, &hist(&counts[..14], 13 * B), "m", 0.5);
        assert_eq!(c.take_scored()[&("m".to_string(), 5)], (0, 1));
        // Forecasts after buckets 12 and 13 see bucket 14: both came true.
        c.calibrate(1, &hist(&counts[..18], 17 * B), "m", 0.5);
        assert_eq!(c.take_scored()[&("m".to_string(), 5)], (2, 0));
    }

    #[test]
    fn one_forecast_per_bucket_is_scored_and_unseen_series_are_forgotten() {
        let mut c = Calibrator::new();
        let counts = [1u32; 40];
        for _ in 0..3 {
            c.calibrate(1, &hist(&counts[..30], 29 * B), "m", 0.9);
        }
        assert_eq!(c.series[&1].pending.len(), 1);
        c.calibrate(2, &hist(&counts[..30], 29 * B), "m", 0.9);
        c.end_tick();
        c.calibrate(2, &hist(&counts[..31], 30 * B), "m", 0.9);
        c.end_tick();
        assert!(!c.series.contains_key(&1));
        assert!(c.series.contains_key(&2));
    }

    #[test]
    fn the_curve_keeps_the_order_of_forecasts() {
        let mut c = Calibrator::new();
        // 0.45 came true always, 0.75 never: pooled, neither ranks the other.
        let busy = vec![1u32; 300];
        let quiet = vec![0u32; 300];
        for id in 0..10 {
            feed(&mut c, id, &busy, "m", 0.45);
            feed(&mut c, 100 + id, &quiet, "m", 0.75);
        }
        let mut last = 0.0;
        for i in 0..=100 {
            let p = c.calibrated("m", i as f32 / 100.0);
            assert!(p >= last - 1e-6, "{i}: {p} < {last}");
            last = p;
        }
    }

    #[test]
    fn outcomes_fade_and_a_new_model_starts_afresh() {
        let mut c = Calibrator::new();
        let busy = vec![1u32; 100];
        for id in 0..10 {
            feed(&mut c, id, &busy, "model", 0.25);
        }
        let before = c.curves[0].bands[2].n;
        // Ten days on, the outcomes kept are 2^-10 of what they were.
        c.calibrate(99, &hist(&busy, (99 + 960) * B), "model", 0.25);
        let after = c.curves[0].bands[2].n;
        assert!(
            (after / before - 2f64.powi(-10)).abs() < 1e-9,
            "{before} {after}"
        );
        c.serving(1);
        assert!(c.calibrated("model", 0.25) > 0.3);
        c.serving(1);
        assert!(
            c.calibrated("model", 0.25) > 0.3,
            "the same model keeps its outcomes"
        );
        c.serving(2);
        assert!((c.calibrated("model", 0.25) - 0.25).abs() < 1e-6);
    }
}
