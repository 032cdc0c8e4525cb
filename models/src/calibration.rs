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
//! Which forecasts are scored never depends on how they turn out, or the shares are biased:
//! every forecaster's forecast of every series the caller forecasts is scored (the first one
//! after each bucket, as [`crate::guard`] scores its medians), whichever of them answered and
//! whatever was then done with it. A series the caller stops forecasting (its week of history
//! is empty, or the store let it go as the quietest) has its forecasts still waiting scored as
//! not come true once their horizon has passed.
//!
//! A forecaster's forecasts are calibrated apart for series with a request in the last
//! [`HORIZON`] buckets and quiet ones: at the same P the first come back far more often (on
//! apache, seasonal naive's 2/7 came true 85% of the time for the first and 33% for the
//! second), and the quiet ones are those a shadow is for, a series asked within the hour being
//! likely held already.
//!
//! A band starts from its own P counted as [`PRIOR`] forecasts, so a fresh calibrator answers
//! a forecaster's own P until outcomes say otherwise; outcomes fade with a half-life of
//! [`HALF_LIFE_BUCKETS`] buckets of scoring, so a changed workload is followed. The bands'
//! shares are made non-decreasing in P (pooled where a higher band came true less often), and
//! a P between two bands' mean P is interpolated, so no forecast ranks below one with a lower
//! P.
//!
//! An outcome is judged on the horizon's whole buckets, the target the model was trained on;
//! a forecast is made up to one planning tick into the first of them, so the calibrated P is
//! that of a request in the hour from the bucket's start.

use std::collections::{HashMap, VecDeque};

use crate::features::{asked_lately, horizon_after, History, HORIZON};

/// Bands of P, a tenth wide.
pub const BANDS: usize = 10;
/// Forecasts at its own P a band starts from.
const PRIOR: f64 = 10.0;
/// Buckets over which a curve's outcomes fade to half: a day of 15-minute buckets. Only
/// buckets in which the curve scores count, a gap at most a horizon's: evidence is not lost to
/// a silence (the NASA log is silent for days between bursts), only to newer outcomes.
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

/// One forecaster's bands for one kind of series.
#[derive(Debug, Clone)]
struct Curve {
    name: String,
    /// Whether for series with a request in the last [`HORIZON`] buckets.
    recent: bool,
    bands: [Band; BANDS],
    /// Start of the last bucket it scored in.
    clock: Option<i64>,
}

impl Curve {
    /// Score in the bucket starting at `at`: fade by the buckets since the last one scored
    /// in, a gap counting at most [`HORIZON`].
    fn advance(&mut self, at: i64, bucket_secs: i64) {
        let steps = match self.clock {
            Some(c) if at > c => ((at - c) / bucket_secs.max(1)).min(HORIZON as i64),
            Some(_) => return,
            None => 0,
        };
        self.clock = Some(at);
        if steps == 0 {
            return;
        }
        let keep = 0.5f64.powf(steps as f64 / HALF_LIFE_BUCKETS);
        for b in &mut self.bands {
            b.n *= keep;
            b.p_sum *= keep;
            b.came *= keep;
        }
    }

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
            // Below the lowest point: its share, shifted by the distance in P. Above the
            // highest: on the line from it to (1, 1), so only P = 1 is answered with 1.
            Some(0) => ys[0] + (p - xs[0]),
            None => {
                let (x, y) = (xs[BANDS - 1], ys[BANDS - 1]);
                y + (p - x) * (1.0 - y) / (1.0 - x).max(f64::EPSILON)
            }
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

/// The forecasts of one series made after one bucket, waiting for their horizon.
#[derive(Debug, Clone)]
struct Pending {
    /// Start of the bucket they were made after.
    made_after: i64,
    /// (index into the calibrator's curves, P) of every forecaster.
    forecasts: Vec<(usize, f64)>,
}

#[derive(Debug, Default)]
struct Series {
    pending: VecDeque<Pending>,
    /// Seen since the last [`Calibrator::end_tick`].
    seen: bool,
}

/// Outcomes scored since the last [`Calibrator::take_scored`]: per forecaster, kind of series
/// (with a request in the last [`HORIZON`] buckets or not) and band, (came true, did not).
pub type Scored = HashMap<(String, bool, usize), (u64, u64)>;

/// Per-forecaster calibration of P(any request in the horizon).
#[derive(Debug, Default)]
pub struct Calibrator {
    curves: Vec<Curve>,
    series: HashMap<u64, Series>,
    /// The model's version per model name (see [`Self::model_version`]).
    versions: HashMap<String, u64>,
    /// Per curve, outcomes per band since the last [`Self::take_scored`].
    tally: Vec<[(u64, u64); BANDS]>,
}

impl Calibrator {
    /// A calibrator with no outcomes: it answers every P as given.
    pub fn new() -> Self {
        Self::default()
    }

    /// Say which version of the model named `name` serves (any identity that changes when
    /// the model does: a reload). On a change that model's outcomes are dropped, a new model's
    /// P meaning something else; the baselines' stay.
    pub fn model_version(&mut self, name: &str, version: u64) {
        let old = self.versions.insert(name.to_string(), version);
        if old.is_none_or(|v| v == version) {
            return;
        }
        let reset: Vec<usize> = (0..self.curves.len())
            .filter(|i| self.curves[*i].name == name)
            .collect();
        for i in &reset {
            self.curves[*i].bands = [Band::default(); BANDS];
        }
        for s in self.series.values_mut() {
            for p in &mut s.pending {
                p.forecasts.retain(|(c, _)| !reset.contains(c));
            }
        }
    }

    /// The index of `name`'s curve for `recent` series, if it has one.
    fn find(&self, name: &str, recent: bool) -> Option<usize> {
        self.curves
            .iter()
            .position(|c| c.name == name && c.recent == recent)
    }

    /// The index of `name`'s curve for `recent` series, added if new.
    fn curve(&mut self, name: &str, recent: bool) -> usize {
        if let Some(i) = self.find(name, recent) {
            return i;
        }
        self.curves.push(Curve {
            name: name.to_string(),
            recent,
            bands: [Band::default(); BANDS],
            clock: None,
        });
        self.tally.push([(0, 0); BANDS]);
        self.curves.len() - 1
    }

    /// Score forecast `(curve, p)` in the bucket starting at `at`, `bucket_secs` wide.
    fn score(&mut self, (curve, p): (usize, f64), came: bool, (at, bucket_secs): (i64, i64)) {
        let b = band(p);
        self.curves[curve].advance(at, bucket_secs);
        let band = &mut self.curves[curve].bands[b];
        band.n += 1.0;
        band.p_sum += p;
        let tally = &mut self.tally[curve][b];
        if came {
            band.came += 1.0;
            tally.0 += 1;
        } else {
            tally.1 += 1;
        }
    }

    /// Series `id` with history `h` is forecast at `forecasts` (forecaster name, P; a name
    /// given twice counts once): score the series' earlier forecasts whose horizon `h` now
    /// holds, keep these (the first after their bucket), and return the calibrated P of
    /// forecast `answer`, the one the caller acts on (0 if there is none).
    pub fn calibrate(
        &mut self,
        id: u64,
        h: &History<'_>,
        forecasts: &[(&str, f32)],
        answer: usize,
    ) -> f32 {
        let now_recent = asked_lately(h.counts);
        let mut made: Vec<(usize, f64)> = Vec::with_capacity(forecasts.len());
        for (name, p) in forecasts {
            let c = self.curve(name, now_recent);
            if !made.iter().any(|(m, _)| *m == c) {
                made.push((c, f64::from(*p)));
            }
        }
        let span = crate::features::HORIZON as i64 * h.bucket_secs.max(1);
        let s = self.series.entry(id).or_default();
        s.seen = true;
        let mut due = Vec::new();
        while s
            .pending
            .front()
            .is_some_and(|f| f.made_after + span <= h.last_bucket_start)
        {
            let f = s.pending.pop_front().expect("a front entry");
            if let Some(horizon) = horizon_after(h, f.made_after) {
                let came = horizon.iter().any(|c| *c > 0);
                due.extend(f.forecasts.into_iter().map(|f| (f, came)));
            }
        }
        if s.pending
            .back()
            .is_none_or(|f| f.made_after < h.last_bucket_start)
        {
            s.pending.push_back(Pending {
                made_after: h.last_bucket_start,
                forecasts: made,
            });
        }
        for (f, came) in due {
            self.score(f, came, (h.last_bucket_start, h.bucket_secs));
        }
        match forecasts.get(answer) {
            Some((name, p)) => self.calibrated(name, now_recent, *p),
            None => 0.0,
        }
    }

    /// End a tick whose forecasts were made after the bucket starting at `last_bucket_start`
    /// (`bucket_secs` wide). A series not forecast since the last call had no request in its
    /// history, or was let go as the quietest: its waiting forecasts whose horizon has passed
    /// are scored as not come true, and it is forgotten once none waits.
    pub fn end_tick(&mut self, last_bucket_start: i64, bucket_secs: i64) {
        let span = crate::features::HORIZON as i64 * bucket_secs.max(1);
        let mut due = Vec::new();
        self.series.retain(|_, s| {
            if std::mem::take(&mut s.seen) {
                return true;
            }
            while s
                .pending
                .front()
                .is_some_and(|f| f.made_after + span <= last_bucket_start)
            {
                let f = s.pending.pop_front().expect("a front entry");
                due.extend(f.forecasts);
            }
            !s.pending.is_empty()
        });
        for f in due {
            self.score(f, false, (last_bucket_start, bucket_secs));
        }
    }

    /// The outcomes scored since the last call.
    pub fn take_scored(&mut self) -> Scored {
        let mut out = Scored::new();
        for (c, tally) in self.curves.iter().zip(&mut self.tally) {
            for (b, t) in tally.iter_mut().enumerate() {
                if *t != (0, 0) {
                    out.insert((c.name.clone(), c.recent, b), std::mem::take(t));
                }
            }
        }
        out
    }

    /// `forecaster`'s calibrated P for a forecast at `p` of a series with (`recent`) or
    /// without a request in the last [`HORIZON`] buckets, without scoring anything.
    pub fn calibrated(&self, forecaster: &str, recent: bool, p: f32) -> f32 {
        self.find(forecaster, recent)
            .map_or(p, |i| self.curves[i].map(f64::from(p)) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::features::test_history as hist;

    const B: i64 = 900;

    /// Forecast series `id` at `p` by `name` after bucket `last` of `counts`.
    fn one(c: &mut Calibrator, id: u64, counts: &[u32], last: usize, name: &str, p: f32) -> f32 {
        let h = hist(&counts[..=last], last as i64 * B);
        c.calibrate(id, &h, &[(name, p)], 0)
    }

    /// Feed series `id`, bucket by bucket, forecasting `p` after each; returns the last
    /// calibrated P.
    fn feed(c: &mut Calibrator, id: u64, counts: &[u32], name: &str, p: f32) -> f32 {
        (0..counts.len())
            .map(|last| one(c, id, counts, last, name, p))
            .last()
            .unwrap_or(p)
    }

    #[test]
    fn a_fresh_calibrator_answers_the_forecasters_own_p() {
        let c = Calibrator::new();
        for p in [0.0, 0.03, 0.29, 0.5, 0.97, 0.999, 1.0] {
            assert!(
                (c.calibrated("seasonal_naive", false, p) - p).abs() < 1e-6,
                "{p}"
            );
        }
        let mut c = Calibrator::new();
        assert!((one(&mut c, 1, &[0, 1], 1, "ewma", 0.73) - 0.73).abs() < 1e-6);
    }

    #[test]
    fn an_underconfident_band_is_raised_and_an_overconfident_one_lowered() {
        let mut c = Calibrator::new();
        // Busy series said to be 0.29 likely: every horizon had a request.
        let busy = vec![1u32; 200];
        for id in 0..20 {
            feed(&mut c, id, &busy, "seasonal_naive", 2.0 / 7.0);
        }
        let raised = c.calibrated("seasonal_naive", true, 2.0 / 7.0);
        assert!(raised > 0.95, "{raised}");
        // Silent series said to be 0.6 likely: none came true.
        let quiet = vec![0u32; 200];
        for id in 100..120 {
            feed(&mut c, id, &quiet, "ewma", 0.6);
        }
        let lowered = c.calibrated("ewma", false, 0.6);
        assert!(lowered < 0.05, "{lowered}");
        // Each forecaster keeps its own bands; a higher P never answers less than a lower
        // band came to.
        assert!(c.calibrated("seasonal_naive", true, 0.6) > 0.95);
        assert!(c.calibrated("ewma", false, 0.3) < 0.05);
        // Above the highest point the answer rises to 1 only at P = 1.
        assert!(c.calibrated("ewma", false, 0.999) < 1.0);
        let scored = c.take_scored();
        assert_eq!(scored[&("seasonal_naive".to_string(), true, 2)].1, 0);
        assert_eq!(scored[&("ewma".to_string(), false, 6)].0, 0);
        assert!(c.take_scored().is_empty());
    }

    #[test]
    fn series_asked_lately_and_quiet_ones_are_calibrated_apart() {
        let mut c = Calibrator::new();
        let busy = vec![1u32; 200];
        let silent = vec![0u32; 200];
        for id in 0..20 {
            feed(&mut c, id, &busy, "m", 0.3);
            feed(&mut c, 100 + id, &silent, "m", 0.3);
        }
        assert!(c.calibrated("m", true, 0.3) > 0.9);
        assert!(c.calibrated("m", false, 0.3) < 0.1);
    }

    #[test]
    fn outcomes_are_judged_on_the_horizon_after_the_forecast() {
        let mut c = Calibrator::new();
        // A forecast after bucket 9; requests only in bucket 14, outside its horizon 10..=13.
        let mut counts = [0u32; 20];
        counts[14] = 1;
        one(&mut c, 1, &counts, 9, "m", 0.5);
        // Three buckets on the horizon is not whole yet.
        one(&mut c, 1, &counts, 12, "m", 0.5);
        assert!(c.take_scored().is_empty());
        one(&mut c, 1, &counts, 13, "m", 0.5);
        assert_eq!(c.take_scored()[&("m".to_string(), false, 5)], (0, 1));
        // Forecasts after buckets 12 and 13 see bucket 14: both came true.
        one(&mut c, 1, &counts, 17, "m", 0.5);
        assert_eq!(c.take_scored()[&("m".to_string(), false, 5)], (2, 0));
    }

    #[test]
    fn every_forecaster_is_scored_whichever_answered() {
        let mut c = Calibrator::new();
        let counts = [1u32; 10];
        let forecasts = [("lstm", 0.95), ("seasonal_naive", 0.15), ("lstm", 0.2)];
        for last in 0..10 {
            let h = hist(&counts[..=last], last as i64 * B);
            let p = c.calibrate(1, &h, &forecasts, 1);
            assert!(p >= 0.15, "seasonal naive answered: {p}");
        }
        let scored = c.take_scored();
        // Forecasts after buckets 0..=5 have had their horizon; a name given twice counts once.
        assert_eq!(scored[&("lstm".to_string(), true, 9)], (6, 0));
        assert_eq!(scored[&("seasonal_naive".to_string(), true, 1)], (6, 0));
        assert_eq!(scored.len(), 2);
    }

    #[test]
    fn one_forecast_per_bucket_is_scored_and_series_no_longer_forecast_are_settled() {
        let mut c = Calibrator::new();
        let counts = [1u32; 40];
        for _ in 0..3 {
            one(&mut c, 1, &counts, 29, "m", 0.95);
        }
        assert_eq!(c.series[&1].pending.len(), 1);
        one(&mut c, 2, &counts, 29, "m", 0.95);
        c.end_tick(29 * B, B);
        // Series 1 is no longer forecast: it waits until its forecast's horizon has passed,
        // then counts as not come true, and is forgotten.
        one(&mut c, 2, &counts, 30, "m", 0.95);
        c.end_tick(30 * B, B);
        assert!(c.series.contains_key(&1));
        assert!(c.take_scored().is_empty());
        c.end_tick(33 * B, B);
        assert!(!c.series.contains_key(&1));
        // Nor was series 2 this tick: its forecast after bucket 29 is settled too, the one
        // after 30 waits.
        assert!(c.series.contains_key(&2));
        assert_eq!(c.take_scored()[&("m".to_string(), true, 9)], (0, 2));
    }

    #[test]
    fn the_curve_keeps_the_order_of_forecasts() {
        let mut c = Calibrator::new();
        // Of quiet series, those said at 0.45 came true always (a request every fifth bucket,
        // none in the four before it), at 0.75 never: pooled, neither ranks the other.
        let periodic: Vec<u32> = (0..300).map(|i| u32::from(i % 5 == 0)).collect();
        let silent = vec![0u32; 300];
        for id in 0..10 {
            feed(&mut c, id, &periodic, "m", 0.45);
            feed(&mut c, 100 + id, &silent, "m", 0.75);
        }
        assert!(c.calibrated("m", false, 0.45) < 0.9);
        let mut last = 0.0;
        for i in 0..=100 {
            let p = c.calibrated("m", false, i as f32 / 100.0);
            assert!(p >= last - 1e-6, "{i}: {p} < {last}");
            last = p;
        }
    }

    #[test]
    fn a_new_model_starts_afresh_and_outcomes_fade() {
        let mut c = Calibrator::new();
        let busy = vec![1u32; 100];
        for id in 0..10 {
            feed(&mut c, id, &busy, "lstm", 0.25);
            feed(&mut c, 50 + id, &busy, "ewma", 0.25);
        }
        c.model_version("lstm", 1);
        assert!(c.calibrated("lstm", true, 0.25) > 0.3);
        c.model_version("lstm", 1);
        assert!(
            c.calibrated("lstm", true, 0.25) > 0.3,
            "the same model keeps its outcomes"
        );
        c.model_version("lstm", 2);
        assert!((c.calibrated("lstm", true, 0.25) - 0.25).abs() < 1e-6);
        assert!(
            c.calibrated("ewma", true, 0.25) > 0.3,
            "the baselines keep theirs"
        );
        assert!(c.series[&0].pending.iter().all(|p| p.forecasts.is_empty()));
        // Outcomes fade with the buckets scored in; a silence counts as one horizon.
        let curve = &mut c.curves[1];
        let before = curve.bands[2].n;
        curve.advance(99 * B + 2 * B, B);
        curve.advance(99 * B + 962 * B, B);
        let after = curve.bands[2].n;
        let expected = 0.5f64.powf(6.0 / HALF_LIFE_BUCKETS);
        assert!((after / before - expected).abs() < 1e-9, "{before} {after}");
    }
}
