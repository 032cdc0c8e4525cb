//! Per-series online choice between the model and the baselines, by their recent errors.
//!
//! A model answers well for the regimes it was trained on and can be badly wrong for one it
//! never saw: on the NASA log's later months two resources are fetched ~100 times per
//! 15 minutes for days, and the LSTM, which learned that bursts end within hours, forecasts a
//! handful of requests after every such hour (`models/MODEL_CARD.md`, development notes).
//! Persistence gets those series right. [`SeriesGuard`] scores, for every series, each
//! forecaster's median against what then happened, and answers a series with a baseline only
//! while that baseline has been clearly better on it; everywhere else the model answers.

use std::collections::{HashMap, VecDeque};

use crate::features::{horizon_after, History, HORIZON};

/// How the guard judges and switches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    /// Weight of the newest error in each forecaster's moving average of absolute errors
    /// (0.2: about the last five horizons count).
    pub alpha: f64,
    /// Horizons scored on a series before anything but the model may answer it.
    pub min_scored: u32,
    /// A baseline takes over when its error times this, plus `floor`, is below the model's.
    pub margin: f64,
    /// Requests per horizon under which a difference in error never switches, so near-silent
    /// series stay with the model.
    pub floor: f64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            alpha: 0.2,
            min_scored: 4,
            margin: 1.25,
            floor: 2.0,
        }
    }
}

/// One series' record.
#[derive(Debug)]
struct Record {
    /// Forecasts whose horizon has not yet been seen whole: the start of the bucket they were
    /// made after, and every forecaster's median.
    pending: VecDeque<(i64, Vec<f32>)>,
    /// Moving average of each forecaster's absolute error.
    err: Vec<f64>,
    scored: u32,
    /// Index of the forecaster answering this series.
    chosen: usize,
    /// Seen since the last [`SeriesGuard::end_tick`].
    seen: bool,
}

/// The per-series choice. Forecaster 0 is the model; the others are fallbacks, in the order
/// the caller passes their forecasts.
#[derive(Debug)]
pub struct SeriesGuard {
    cfg: GuardConfig,
    n: usize,
    series: HashMap<u64, Record>,
    /// What forecaster 0 is (see [`Self::serving`]).
    serving: Option<u64>,
}

impl SeriesGuard {
    /// A guard over `n` forecasters (the model first).
    pub fn new(n: usize, cfg: GuardConfig) -> Self {
        SeriesGuard {
            cfg,
            n: n.max(1),
            series: HashMap::new(),
            serving: None,
        }
    }

    /// Say which model is forecaster 0 (any identity that changes when it does: a reload, a
    /// fall back to a baseline). On a change every record is dropped: the errors were the old
    /// model's, and would keep a baseline answering after a better model arrived.
    pub fn serving(&mut self, identity: u64) {
        if self.serving.is_some_and(|s| s != identity) {
            self.series.clear();
        }
        self.serving = Some(identity);
    }

    /// For the series `id` with history `h` and each forecaster's median forecast `p50s`
    /// (made on `h`): score the earlier forecasts whose horizon `h` now covers, keep these
    /// for later, and return the index of the forecaster that should answer.
    pub fn choose(&mut self, id: u64, h: &History<'_>, p50s: &[f32]) -> usize {
        let cfg = self.cfg;
        let n = self.n;
        let r = self.series.entry(id).or_insert_with(|| Record {
            pending: VecDeque::new(),
            err: vec![0.0; n],
            scored: 0,
            chosen: 0,
            seen: false,
        });
        r.seen = true;
        let width = h.bucket_secs.max(1);
        let span = HORIZON as i64 * width;
        while let Some((made_after, _)) = r.pending.front() {
            let made_after = *made_after;
            if made_after + span > h.last_bucket_start {
                break;
            }
            let (_, medians) = r.pending.pop_front().expect("a front entry");
            let Some(horizon) = horizon_after(h, made_after) else {
                continue;
            };
            let y: f64 = horizon.iter().map(|c| f64::from(*c)).sum();
            for (e, m) in r.err.iter_mut().zip(&medians) {
                let miss = (f64::from(*m) - y).abs();
                *e = if r.scored == 0 {
                    miss
                } else {
                    cfg.alpha * miss + (1.0 - cfg.alpha) * *e
                };
            }
            r.scored += 1;
        }
        if r.pending
            .back()
            .is_none_or(|(t, _)| *t < h.last_bucket_start)
            && p50s.len() == n
        {
            r.pending.push_back((h.last_bucket_start, p50s.to_vec()));
        }
        r.chosen = pick(&r.err, r.scored, r.chosen, &cfg);
        r.chosen
    }

    /// Forget the series not seen since the last call: the guard holds no more records than
    /// the caller forecasts series.
    pub fn end_tick(&mut self) {
        self.series.retain(|_, r| std::mem::take(&mut r.seen));
    }

    /// How many series each forecaster answers now.
    pub fn answering(&self) -> Vec<usize> {
        let mut out = vec![0; self.n];
        for r in self.series.values() {
            out[r.chosen] += 1;
        }
        out
    }
}

/// The forecaster to answer with, given each one's recent error: the model until a baseline
/// has been better by the margin; back to the model once it is within `floor` of the
/// baseline answering (not by the margin: a band between the two keeps a series from
/// flapping), unless another baseline beats it by the margin.
fn pick(err: &[f64], scored: u32, chosen: usize, cfg: &GuardConfig) -> usize {
    if scored < cfg.min_scored || err.is_empty() {
        return 0;
    }
    let best = (0..err.len())
        .min_by(|a, b| err[*a].total_cmp(&err[*b]))
        .unwrap_or(0);
    let beats = |a: usize, b: usize| err[a] * cfg.margin + cfg.floor < err[b];
    // Answered by the model, or by a baseline that is no longer clearly better than it.
    let judged_against_model =
        chosen == 0 || chosen >= err.len() || err[0] <= err[chosen] + cfg.floor;
    if judged_against_model {
        if beats(best, 0) {
            best
        } else {
            0
        }
    } else if best != chosen && beats(best, chosen) {
        best
    } else {
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::features::test_history as hist;

    const B: i64 = 900;

    /// Feed a series bucket by bucket: at each bucket the model forecasts `model` and the
    /// baseline the last four buckets' sum (persistence). Returns the choices.
    fn run(guard: &mut SeriesGuard, counts: &[u32], model: f32) -> Vec<usize> {
        let mut out = Vec::new();
        for end in 1..=counts.len() {
            let c = &counts[..end];
            let persistence: u32 = c.iter().rev().take(4).sum();
            let h = hist(c, (end as i64 - 1) * B);
            out.push(guard.choose(7, &h, &[model, persistence as f32]));
            guard.end_tick();
        }
        out
    }

    #[test]
    fn a_baseline_answers_only_after_it_was_clearly_better_and_the_model_returns() {
        let mut g = SeriesGuard::new(2, GuardConfig::default());
        // 100 requests per bucket for 12 buckets: the model keeps saying 5 per hour.
        let busy = [100u32; 12];
        let picks = run(&mut g, &busy, 5.0);
        // The first forecast's horizon is whole four buckets later; four are needed.
        let first = picks.iter().position(|p| *p == 1).expect("switched");
        assert_eq!(first, 7, "{picks:?}");
        assert!(picks[first..].iter().all(|p| *p == 1), "{picks:?}");
        assert_eq!(g.answering(), vec![0, 1]);
    }

    #[test]
    fn the_model_is_back_once_it_is_no_worse() {
        let mut g = SeriesGuard::new(2, GuardConfig::default());
        let mut counts = vec![100u32; 12];
        run(&mut g, &counts, 5.0);
        // The model catches up (forecasts 400 an hour) while the series holds its rate.
        let mut picks = Vec::new();
        for _ in 0..40 {
            counts.push(100);
            let h = hist(&counts, (counts.len() as i64 - 1) * B);
            picks.push(g.choose(7, &h, &[400.0, 400.0]));
            g.end_tick();
        }
        assert_eq!(*picks.last().unwrap(), 0, "{picks:?}");
    }

    #[test]
    fn small_differences_never_switch() {
        let mut g = SeriesGuard::new(2, GuardConfig::default());
        // One request a bucket: the model says 3.8 per hour, persistence 4 — within the floor.
        let picks = run(&mut g, &[1u32; 24], 3.8);
        assert!(picks.iter().all(|p| *p == 0), "{picks:?}");
    }

    #[test]
    fn forecasts_within_one_bucket_are_scored_once_and_unseen_series_are_forgotten() {
        let mut g = SeriesGuard::new(2, GuardConfig::default());
        let counts = [3u32; 40];
        for _ in 0..3 {
            g.choose(1, &hist(&counts, 39 * B), &[1.0, 12.0]);
        }
        assert_eq!(g.series[&1].pending.len(), 1);
        g.choose(2, &hist(&counts, 39 * B), &[1.0, 12.0]);
        g.end_tick();
        g.choose(2, &hist(&counts, 40 * B), &[1.0, 12.0]);
        g.end_tick();
        assert!(!g.series.contains_key(&1));
        assert_eq!(g.answering(), vec![1, 0]);
    }

    #[test]
    fn a_gap_in_the_calls_scores_what_the_history_still_holds() {
        let mut g = SeriesGuard::new(2, GuardConfig::default());
        let counts: Vec<u32> = (0..30).collect();
        g.choose(1, &hist(&counts[..10], 9 * B), &[0.0, 0.0]);
        // Ten buckets later the horizon after bucket 9 (buckets 10..=13) is in the history.
        g.choose(1, &hist(&counts[..20], 19 * B), &[0.0, 0.0]);
        let r = &g.series[&1];
        assert_eq!(r.scored, 1);
        assert_eq!(r.err[0], f64::from(10 + 11 + 12 + 13));
        // A history too short to hold the horizon scores nothing.
        let mut g = SeriesGuard::new(2, GuardConfig::default());
        g.choose(1, &hist(&counts[..10], 9 * B), &[0.0, 0.0]);
        g.choose(1, &hist(&counts[..2], 19 * B), &[0.0, 0.0]);
        assert_eq!(g.series[&1].scored, 0);
    }

    #[test]
    fn the_best_of_several_baselines_answers() {
        let err = [10.0, 6.0, 2.0];
        let cfg = GuardConfig::default();
        assert_eq!(pick(&err, 4, 0, &cfg), 2);
        assert_eq!(pick(&err, 3, 0, &cfg), 0, "too few horizons scored");
        // Answering with 1, 2 is not better by the margin: 1 stays.
        assert_eq!(pick(&[10.0, 2.2, 2.0], 9, 1, &cfg), 1);
        // 1 no longer beats the model, but 2 does: 2 answers, not the model for a tick.
        assert_eq!(pick(&[10.0, 9.0, 2.0], 9, 1, &cfg), 2);
        assert_eq!(pick(&[10.0, 9.0, 8.5], 9, 1, &cfg), 0);
    }

    #[test]
    fn a_new_model_starts_with_no_record() {
        let mut g = SeriesGuard::new(2, GuardConfig::default());
        g.serving(1);
        run(&mut g, &[100u32; 12], 5.0);
        assert_eq!(g.answering(), vec![0, 1]);
        g.serving(1);
        assert_eq!(g.answering(), vec![0, 1], "the same model keeps its record");
        g.serving(2);
        assert_eq!(g.answering(), vec![0, 0]);
    }
}
