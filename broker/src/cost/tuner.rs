//! The threshold tuner of one (region, class, source), free of I/O and clocks: settled shadows
//! go in with the score that placed them, a planning tick asks for a move.
//!
//! Why it is shaped this way (the replay in `bench/RESULTS.md` saw the earlier tuner walk each
//! threshold across its whole range with fixed steps, 82–98 moves in 84 ticks):
//!
//! - **Evidence first.** It decides only once `min_settled` shadows settled since its last
//!   decision, or once some have waited `max_wait_ticks` (so a quiet region still tunes, just
//!   less often). A few shadows per tick are noise, not a trend.
//! - **Judged at the threshold in force.** Each decision reads a window of recent outcomes,
//!   keeping only those whose score still clears the current threshold: outcomes of shadows a
//!   raised threshold no longer admits do not keep pushing it up for a whole TTL (their
//!   outcomes arrive only when they expire), which is what overshot before.
//! - **Down only on what the lower threshold admitted.** Every move starts an epoch, and each
//!   shadow carries the epoch it was placed in. Outcomes of shadows placed before a lowering
//!   never include the newly admitted (less certain) band, so they cannot say whether going
//!   lower still pays: a move down is made only on outcomes of the epoch in force, and after
//!   a raise the same rule waits for shadows placed at the raised threshold. (Judged on the
//!   older outcomes, the simulation of `outcomes_arriving_a_ttl_late_…` below stepped down
//!   every tick for a whole TTL, then sat below the floor until the waste settled: a sawtooth
//!   of 222 moves in 600 ticks, against 10 with the rule.)
//! - **Adaptive step.** A move in the same direction as the last grows the step by half, up to
//!   `step`; a reversal halves it, down to `min_step`, so an oscillation dies out while a
//!   sustained trend (a workload shift) still accelerates to full speed within a few ticks.
//! - **Dead band.** It rises only when the shadows lose more than `dead_band` of what they cost,
//!   and falls only when they profit with precision a quarter of the way from break-even to
//!   perfect; in between it holds.
//! - **Precision floor.** Once `min_settled` shadows back it, a byte precision below
//!   `min_precision` raises the threshold whatever the money says, straight to the lowest
//!   score above which the judged shadows cleared the floor by the dead band (climbing a step
//!   at a time, a replay's LSTM tuner took ten ticks and kept wasting shadows meanwhile). On
//!   fewer shadows the floor raises nothing, but no move goes down unless the byte precision
//!   clears the floor by the dead band (a replay saw a threshold walk down on six profitable
//!   shadows at byte precision 0.25).

use std::collections::VecDeque;

use super::{CostSection, Stats};

/// Growth of the step while the direction holds.
const STEP_GROWTH: f32 = 1.5;
/// Shrink of the step on a reversal.
const STEP_SHRINK: f32 = 0.5;
/// Outcomes a tuner judges, as a multiple of `min_settled`: enough to span a few decisions,
/// few enough that a workload shift dominates it within a few.
const WINDOW_DECISIONS: u64 = 4;

/// One settled shadow as the tuner sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Settled {
    /// The score of the signal that placed it (1 for unscored placements).
    pub score: f32,
    /// The tuner's epoch when it was placed ([`Tuner::epoch`]).
    pub epoch: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Whether a request found it.
    pub used: bool,
    /// Savings − spend, USD.
    pub net: f64,
    /// Spend, USD.
    pub spend: f64,
}

/// A direction of move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

/// Ticks with neither an outcome nor an admitted placement after which a tuner probes lower
/// ([`Tuner::tick`]): an hour at the default one-minute planning interval.
pub(super) const IDLE_PROBE_TICKS: u32 = 60;

/// A decided move, before bounds.
#[derive(Debug, Clone, PartialEq)]
struct Verdict {
    dir: Dir,
    reason: String,
    /// Whether the precision floor decided it (then the move goes straight to the lowest
    /// threshold at which the judged outcomes cleared the floor by the dead band).
    floor: bool,
}

/// A move the tuner made.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Moved {
    /// Threshold before.
    pub from: f32,
    /// Threshold after.
    pub to: f32,
    /// Why.
    pub reason: String,
}

/// Rolling state of one (region, class, source).
#[derive(Debug, Clone)]
pub(super) struct Tuner {
    /// Threshold in force.
    pub threshold: f32,
    /// Moves made so far: the shadows of one epoch were all placed at one threshold.
    epoch: u64,
    /// Size of the next move in the last direction.
    step: f32,
    last_dir: Option<Dir>,
    /// Recent settled shadows, newest last.
    window: VecDeque<Settled>,
    /// Settled since the last decision.
    fresh: u64,
    /// Ticks the oldest of those has waited.
    waited: u32,
    /// Ticks since the last outcome settled or placement was admitted.
    idle: u32,
    /// Where it started: an idle probe goes no lower.
    start: f32,
    /// The window as judged at the last decision (for the report).
    pub judged: Option<Stats>,
    /// Why the threshold last moved.
    pub last_reason: Option<String>,
}

impl Tuner {
    /// A tuner at `threshold`, first moving by the full step.
    pub fn new(threshold: f32, cfg: &CostSection) -> Self {
        Tuner {
            threshold,
            epoch: 0,
            step: cfg.step,
            last_dir: None,
            window: VecDeque::new(),
            fresh: 0,
            waited: 0,
            idle: 0,
            start: threshold,
            judged: None,
            last_reason: None,
        }
    }

    /// A placement this tuner's threshold let through: its outcome is on its way (at its
    /// TTL, which may be hours), so the tuner is not idle.
    pub fn admitted(&mut self) {
        self.idle = 0;
    }

    /// The epoch a placement admitted now belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Take one settled shadow into the window.
    pub fn settle(&mut self, s: Settled, cfg: &CostSection) {
        let cap = (cfg.min_settled.max(1) * WINDOW_DECISIONS) as usize;
        crate::bounded::push_bounded(&mut self.window, s, cap);
        self.fresh += 1;
    }

    /// One planning tick: decide when the evidence is due and move within
    /// `[lower, cfg.max_threshold]`. `None` when it waits, holds or sits at a bound.
    pub fn tick(&mut self, cfg: &CostSection, lower: f32) -> Option<Moved> {
        if self.fresh == 0 {
            return self.probe_when_idle(cfg, lower);
        }
        self.idle = 0;
        if !self.evidence_due(cfg) {
            return None;
        }
        let stats = Stats::of(
            self.window
                .iter()
                .filter(|s| s.score >= self.threshold)
                .copied(),
        );
        self.judged = Some(stats);
        if stats.shadows == 0 || !cfg.tune {
            return None;
        }
        let mut verdict = judge(&stats, cfg)?;
        if verdict.dir == Dir::Down {
            let current = Stats::of(
                self.window
                    .iter()
                    .filter(|s| s.epoch == self.epoch && s.score >= self.threshold)
                    .copied(),
            );
            // A sample, not the first outcome to arrive (one used shadow is precision 1).
            if current.shadows < (cfg.min_settled / WINDOW_DECISIONS).max(1) {
                return None;
            }
            verdict = judge(&current, cfg).filter(|v| v.dir == Dir::Down)?;
        }
        let step = self.next_step(verdict.dir, cfg);
        let mut to = match verdict.dir {
            Dir::Up => self.threshold + step,
            Dir::Down => self.threshold - step,
        };
        if verdict.floor {
            // Aim at the top of the band the threshold then rests in (it falls again only
            // above floor + dead band), not at its bottom, where noise sends it back below.
            let aim = (cfg.min_precision.get() + cfg.dead_band.get()).min(1.0);
            let target = self.floor_target(aim).unwrap_or(cfg.max_threshold);
            if target > to {
                verdict.reason = format!(
                    "{}; shadows scored from {target:.2} up reached {aim:.2}",
                    verdict.reason
                );
                to = target;
                // The jump is the move; the next one starts from the full step again.
                self.step = cfg.step.max(cfg.min_step);
            }
        }
        // max/min rather than clamp: bounds from a config never panic, even crossed.
        let to = to.max(lower).min(cfg.max_threshold);
        if (to - self.threshold).abs() < f32::EPSILON {
            return None;
        }
        Some(self.move_to(to, verdict.reason))
    }

    /// Move the threshold, starting a new epoch.
    fn move_to(&mut self, to: f32, reason: String) -> Moved {
        let from = std::mem::replace(&mut self.threshold, to);
        self.epoch += 1;
        self.last_reason = Some(reason.clone());
        Moved { from, to, reason }
    }

    /// Outcomes arrive only for placements that clear the threshold: one raised above every
    /// score its source offers (a forecaster uninformative for a while, a floor jump to the
    /// ceiling) would never be judged again. So after [`IDLE_PROBE_TICKS`] ticks with neither
    /// an outcome nor an admitted placement, a threshold above where it started steps down by
    /// the full step (not below its start or `lower`) to let some through; their outcomes then
    /// judge it as usual. Only a rise is undone: a quiet source does not drift below its
    /// configured start.
    fn probe_when_idle(&mut self, cfg: &CostSection, lower: f32) -> Option<Moved> {
        self.idle += 1;
        if self.idle < IDLE_PROBE_TICKS || !cfg.tune {
            return None;
        }
        self.idle = 0;
        let to = (self.threshold - cfg.step).max(lower).max(self.start);
        if to >= self.threshold {
            return None;
        }
        let reason =
            format!("nothing admitted nor settled for {IDLE_PROBE_TICKS} ticks: probing lower");
        self.last_dir = Some(Dir::Down);
        Some(self.move_to(to, reason))
    }

    /// The lowest score `t` such that the judged outcomes scored `t` or more reach `aim` in
    /// byte precision: the threshold that, on this evidence, would have kept it; `None` when
    /// no score does. A stepwise climb from far below would keep placing shadows that miss the
    /// floor for many ticks (each outcome arrives only at its expiry).
    fn floor_target(&self, aim: f64) -> Option<f32> {
        let mut judged: Vec<Settled> = self
            .window
            .iter()
            .filter(|s| s.score >= self.threshold)
            .copied()
            .collect();
        judged.sort_by(|a, b| b.score.total_cmp(&a.score));
        let (mut bytes, mut used_bytes) = (0u64, 0u64);
        let mut best = None;
        // Walk down from the highest score; remember the lowest score where the precision of
        // everything at or above it still reaches the aim (at a boundary between scores).
        for (i, s) in judged.iter().enumerate() {
            bytes += s.bytes;
            if s.used {
                used_bytes += s.bytes;
            }
            let boundary = judged.get(i + 1).is_none_or(|n| n.score < s.score);
            let precision = if bytes == 0 {
                1.0
            } else {
                used_bytes as f64 / bytes as f64
            };
            if boundary && precision >= aim {
                best = Some(s.score);
            }
        }
        best
    }

    /// Whether this tick decides: enough fresh outcomes, or some that waited long enough.
    fn evidence_due(&mut self, cfg: &CostSection) -> bool {
        if self.fresh == 0 {
            return false;
        }
        self.waited += 1;
        if self.fresh < cfg.min_settled && self.waited < cfg.max_wait_ticks {
            return false;
        }
        self.fresh = 0;
        self.waited = 0;
        true
    }

    /// Grow the step while the direction holds, halve it on a reversal.
    fn next_step(&mut self, dir: Dir, cfg: &CostSection) -> f32 {
        let max = cfg.step.max(cfg.min_step);
        self.step = match self.last_dir {
            Some(last) if last == dir => self.step * STEP_GROWTH,
            Some(_) => self.step * STEP_SHRINK,
            None => self.step,
        }
        .clamp(cfg.min_step, max);
        self.last_dir = Some(dir);
        self.step
    }

    /// The current step (tests).
    #[cfg(test)]
    pub fn step(&self) -> f32 {
        self.step
    }
}

/// Up, down or hold for a window judged at the threshold in force.
fn judge(s: &Stats, cfg: &CostSection) -> Option<Verdict> {
    let (net, precision, bytes_p) = (s.net_per_shadow(), s.precision(), s.byte_precision());
    let break_even = s.break_even();
    let floor = cfg.min_precision.get();
    if floor > 0.0 && s.shadows >= cfg.min_settled && bytes_p < floor {
        return Some(Verdict {
            dir: Dir::Up,
            reason: format!(
                "byte precision {bytes_p:.2} over {} shadows below the floor {floor:.2}",
                s.shadows
            ),
            floor: true,
        });
    }
    if s.return_on_spend() < -cfg.dead_band.get() {
        return Some(Verdict {
            dir: Dir::Up,
            reason: format!(
                "net ${net:.3e} per shadow < 0 over {} shadows: precision {precision:.2} below break-even {break_even:.4}",
                s.shadows
            ),
            floor: false,
        });
    }
    // The floor is a constraint, not only a trigger: lowering the threshold admits less
    // certain predictions, so it never happens while the byte precision measured (on however
    // few shadows) sits below the floor or within the dead band above it.
    let clear_of_floor = floor <= 0.0 || bytes_p >= floor + cfg.dead_band.get();
    if net > 0.0 && clear_of_floor && precision > break_even + 0.25 * (1.0 - break_even) {
        return Some(Verdict {
            dir: Dir::Down,
            reason: format!(
                "net ${net:.3e} per shadow > 0 over {} shadows with precision {precision:.2} above break-even {break_even:.4}: admit less certain predictions",
                s.shadows
            ),
            floor: false,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{price, Fraction};
    use edge_node::sync::protocol::ShadowOutcome;

    const MB10: u64 = 10_000_000;

    fn settled(cfg: &CostSection, score: f32, used: bool, peer: bool) -> Settled {
        let p = price(
            cfg,
            &ShadowOutcome {
                key: "h/a".into(),
                bytes: MB10,
                hits: u64::from(used),
                held_secs: 3600,
                peer_filled: peer,
                evicted: false,
                failed: false,
                held_before: false,
                removed: false,
                ended_ms: 0,
                head_start_ms: None,
                order: None,
                fill_paid: false,
            },
        );
        Settled {
            score,
            epoch: 0,
            bytes: MB10,
            used,
            net: p.net(),
            spend: p.spend(),
        }
    }

    /// One tick of a world where a shadow is used exactly when its score reaches `boundary`:
    /// `min_settled` shadows placed at scores spread over [threshold, 1] settle, then the
    /// tuner ticks.
    fn tick_world(t: &mut Tuner, cfg: &CostSection, boundary: f32) -> Option<Moved> {
        let n = cfg.min_settled;
        let from = t.threshold;
        for i in 0..n {
            let score = from + (1.0 - from) * (i as f32 + 0.5) / n as f32;
            let s = Settled {
                epoch: t.epoch(),
                ..settled(cfg, score, score >= boundary, false)
            };
            t.settle(s, cfg);
        }
        t.tick(cfg, cfg.min_threshold)
    }

    #[test]
    fn outcomes_arriving_a_ttl_late_neither_walk_it_down_nor_make_it_saw() {
        // Calibrated forecasts (a shadow scored s is used with probability s), peer-filled,
        // 30 candidates a tick scored evenly over (0, 1]; outcomes settle 60 ticks (one TTL)
        // after placement. Above a threshold t the byte precision is (1 + t) / 2: the floor
        // 0.6 holds from t = 0.2 up.
        let cfg = CostSection::default();
        let mut t = Tuner::new(0.5, &cfg);
        let mut pending: VecDeque<(usize, Settled)> = VecDeque::new();
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut uniform = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 40) as f32 / (1u64 << 24) as f32
        };
        let (mut moves, mut lowest_late) = (0, 1.0f32);
        for tick in 0..600 {
            for i in 0..30 {
                let score = (i as f32 + 0.5) / 30.0;
                if score >= t.threshold {
                    let s = Settled {
                        epoch: t.epoch(),
                        ..settled(&cfg, score, uniform() < score, true)
                    };
                    pending.push_back((tick + 60, s));
                }
            }
            while pending.front().is_some_and(|(at, _)| *at <= tick) {
                let (_, s) = pending.pop_front().unwrap();
                t.settle(s, &cfg);
            }
            moves += usize::from(t.tick(&cfg, cfg.min_threshold).is_some());
            if tick >= 120 {
                lowest_late = lowest_late.min(t.threshold);
            }
        }
        assert!(moves <= 20, "{moves} moves, lowest {lowest_late}");
        assert!(lowest_late >= 0.18, "went down to {lowest_late}");
    }

    #[test]
    fn it_waits_for_min_settled_outcomes_or_max_wait_ticks() {
        let cfg = CostSection::default();
        let mut t = Tuner::new(0.5, &cfg);
        assert_eq!(t.tick(&cfg, 0.05), None, "no evidence, no decision");
        for _ in 0..3 {
            t.settle(settled(&cfg, 0.9, false, false), &cfg);
        }
        for _ in 1..cfg.max_wait_ticks {
            assert_eq!(t.tick(&cfg, 0.05), None);
            assert!(t.judged.is_none(), "decided before its evidence was due");
        }
        let m = t.tick(&cfg, 0.05).expect("decides after max_wait_ticks");
        assert!(
            m.to > m.from && m.reason.contains("below break-even"),
            "{m:?}"
        );
        // A full batch decides at once.
        for _ in 0..cfg.min_settled {
            t.settle(settled(&cfg, 0.9, false, false), &cfg);
        }
        assert!(t.tick(&cfg, 0.05).is_some());
    }

    #[test]
    fn the_step_grows_while_the_direction_holds_and_halves_on_a_reversal() {
        let cfg = CostSection::default();
        let mut t = Tuner::new(0.5, &cfg);
        assert_eq!(t.next_step(Dir::Up, &cfg), 0.05);
        assert!(
            (t.next_step(Dir::Up, &cfg) - 0.05).abs() < 1e-6,
            "capped at step"
        );
        assert!((t.next_step(Dir::Down, &cfg) - 0.025).abs() < 1e-6);
        assert!((t.next_step(Dir::Up, &cfg) - 0.0125).abs() < 1e-6);
        assert!(
            (t.next_step(Dir::Down, &cfg) - 0.01).abs() < 1e-6,
            "floored at min_step"
        );
        assert!((t.next_step(Dir::Down, &cfg) - 0.015).abs() < 1e-6);
        assert!((t.next_step(Dir::Down, &cfg) - 0.0225).abs() < 1e-6);
        assert!((t.step() - 0.0225).abs() < 1e-6);
    }

    #[test]
    fn outcomes_the_threshold_no_longer_admits_are_not_judged() {
        let cfg = CostSection {
            min_precision: Fraction(0.0),
            ..CostSection::default()
        };
        let mut t = Tuner::new(0.5, &cfg);
        // Wasted shadows at 0.50–0.59, used ones at 0.6 and above.
        for i in 0..cfg.min_settled {
            t.settle(settled(&cfg, 0.5 + i as f32 * 0.005, false, false), &cfg);
            t.settle(settled(&cfg, 0.6 + i as f32 * 0.01, true, false), &cfg);
        }
        assert!(t.tick(&cfg, 0.05).is_some_and(|m| m.to > m.from));
        t.threshold = 0.6;
        // Shadows placed at the raised threshold: a move down is judged on them.
        for _ in 0..5 {
            let placed_since = Settled {
                epoch: t.epoch(),
                ..settled(&cfg, 0.95, true, false)
            };
            t.settle(placed_since, &cfg);
        }
        t.fresh = cfg.min_settled;
        let m = t.tick(&cfg, 0.05);
        let judged = t.judged.unwrap();
        assert_eq!((judged.shadows, judged.used), (25, 25));
        // Above 0.6 everything was used: no reason to keep rising on the old waste.
        assert!(m.is_some_and(|m| m.to < m.from));
    }

    #[test]
    fn it_settles_near_where_shadows_stop_losing_money_instead_of_oscillating() {
        let cfg = CostSection::default();
        let mut t = Tuner::new(0.5, &cfg);
        let moves: Vec<(usize, Moved)> = (0..84)
            .filter_map(|tick| tick_world(&mut t, &cfg, 0.7).map(|m| (tick, m)))
            .collect();
        assert!(moves.len() <= 10, "{} moves: {moves:?}", moves.len());
        assert!(
            moves.iter().all(|(tick, _)| *tick < 20),
            "still moving late: {moves:?}"
        );
        assert!((0.65..=0.75).contains(&t.threshold), "{}", t.threshold);
    }

    #[test]
    fn a_settled_tuner_still_reacts_to_a_workload_shift_within_a_few_ticks() {
        let cfg = CostSection::default();
        let mut t = Tuner::new(0.5, &cfg);
        for _ in 0..40 {
            tick_world(&mut t, &cfg, 0.7);
        }
        let settled_at = t.threshold;
        // Predictions turn wrong: now only shadows scored 0.9 or more are used.
        let first = tick_world(&mut t, &cfg, 0.9).expect("moves on the first tick");
        assert!(first.to > first.from, "{first:?}");
        for _ in 1..5 {
            tick_world(&mut t, &cfg, 0.9);
        }
        assert!(
            t.threshold >= settled_at + 0.1,
            "{settled_at} -> {}",
            t.threshold
        );
        for _ in 5..30 {
            tick_world(&mut t, &cfg, 0.9);
        }
        assert!((0.85..=0.95).contains(&t.threshold), "{}", t.threshold);
    }

    #[test]
    fn below_the_precision_floor_the_threshold_only_rises_even_when_shadows_pay() {
        // Peer-filled shadows pay at precision 0.5 (break-even about 0.22).
        let run = |min_precision: f64| {
            let cfg = CostSection {
                min_precision: Fraction(min_precision),
                ..CostSection::default()
            };
            let mut t = Tuner::new(0.5, &cfg);
            let mut moves = Vec::new();
            for _ in 0..5 {
                for i in 0..cfg.min_settled {
                    t.settle(settled(&cfg, 0.99, i % 2 == 0, true), &cfg);
                }
                moves.extend(t.tick(&cfg, cfg.min_threshold));
            }
            assert!(t.judged.unwrap().net > 0.0);
            moves
        };
        let floored = run(0.6);
        assert!(!floored.is_empty());
        assert!(floored.iter().all(|m| m.to > m.from), "{floored:?}");
        assert!(
            floored[0].reason.contains("below the floor 0.60"),
            "{floored:?}"
        );
        let unfloored = run(0.0);
        assert!(!unfloored.is_empty());
        assert!(unfloored.iter().all(|m| m.to < m.from), "{unfloored:?}");
    }

    #[test]
    fn a_threshold_no_outcome_reaches_probes_lower_then_is_judged_again() {
        let cfg = CostSection::default();
        let mut t = Tuner::new(0.5, &cfg);
        t.threshold = cfg.max_threshold;
        let moves: Vec<Moved> = (0..IDLE_PROBE_TICKS)
            .filter_map(|_| t.tick(&cfg, 0.05))
            .collect();
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert!(moves[0].to < moves[0].from && moves[0].reason.contains("probing"));
        let probed = t.threshold;
        // Outcomes reset the idle count: a tuner that hears from its source does not drift.
        for tick in 0..(3 * IDLE_PROBE_TICKS) {
            if tick % cfg.max_wait_ticks == 0 {
                t.settle(settled(&cfg, 0.99, true, false), &cfg);
                t.settle(settled(&cfg, 0.99, false, false), &cfg);
            }
            if let Some(m) = t.tick(&cfg, 0.05) {
                assert!(!m.reason.contains("probing"), "{m:?}");
            }
        }
        assert!(t.threshold >= probed - 1e-6, "{} < {probed}", t.threshold);
        // A tuner that still admits placements waits for their outcomes, however long.
        let mut waiting = Tuner::new(0.5, &cfg);
        waiting.threshold = cfg.max_threshold;
        for _ in 0..3 * IDLE_PROBE_TICKS {
            waiting.admitted();
            assert_eq!(waiting.tick(&cfg, 0.05), None);
        }
        // At or below where it started it stays.
        let mut quiet = Tuner::new(0.5, &cfg);
        assert!((0..2 * IDLE_PROBE_TICKS).all(|_| quiet.tick(&cfg, 0.05).is_none()));
        let mut raised = Tuner::new(0.5, &cfg);
        raised.threshold = 0.52;
        let m: Vec<Moved> = (0..2 * IDLE_PROBE_TICKS)
            .filter_map(|_| raised.tick(&cfg, 0.05))
            .collect();
        assert_eq!(m.len(), 1, "{m:?}");
        assert!((raised.threshold - 0.5).abs() < 1e-6);
    }

    #[test]
    fn below_the_floor_it_jumps_to_the_lowest_score_that_met_it() {
        let cfg = CostSection::default();
        let mut t = Tuner::new(0.1, &cfg);
        // 40 shadows scored 0.10–0.88: only those scored 0.7 or more were used.
        for i in 0..40 {
            let score = 0.1 + i as f32 * 0.02;
            t.settle(settled(&cfg, score, score >= 0.7, false), &cfg);
        }
        let m = t.tick(&cfg, 0.05).expect("the floor moves it");
        assert!(m.reason.contains("below the floor"), "{m:?}");
        // It aims at the floor plus the dead band, 0.65. Equal sizes: from 0.60 up, 10 of 15
        // were used (0.667); from 0.58 up, 10 of 16 (0.625).
        assert!((m.to - 0.60).abs() < 1e-3, "{m:?}");
        assert!((t.step() - cfg.step).abs() < 1e-6);
    }

    #[test]
    fn too_little_evidence_neither_trips_the_floor_nor_lowers_the_threshold_below_it() {
        let cfg = CostSection::default();
        let mut t = Tuner::new(0.5, &cfg);
        // Small objects: a used one earns far more latency value than a wasted one costs.
        let small = |used| {
            let mut s = settled(&cfg, 0.9, used, false);
            let p = price(
                &cfg,
                &ShadowOutcome {
                    key: "h/a".into(),
                    bytes: 1000,
                    hits: u64::from(used),
                    held_secs: 60,
                    peer_filled: false,
                    evicted: false,
                    failed: false,
                    held_before: false,
                    removed: false,
                    ended_ms: 0,
                    head_start_ms: None,
                    order: None,
                    fill_paid: false,
                },
            );
            (s.bytes, s.net, s.spend) = (1000, p.net(), p.spend());
            s
        };
        t.settle(small(true), &cfg);
        t.settle(small(false), &cfg);
        let m = (0..cfg.max_wait_ticks).find_map(|_| t.tick(&cfg, 0.05));
        // Byte precision 0.5 over two shadows is no evidence against the floor, nor for
        // admitting less certain predictions: the threshold holds though the shadows paid.
        assert_eq!(m, None);
        assert!(t.judged.is_some_and(|j| j.net > 0.0 && j.shadows == 2));
        // Five used shadows (a quarter of `min_settled`, the least a move down is judged on)
        // clear the floor: then the money may lower it.
        for _ in 0..4 {
            t.settle(small(true), &cfg);
        }
        t.window.retain(|s| s.used);
        let m = (0..cfg.max_wait_ticks).find_map(|_| t.tick(&cfg, 0.05));
        assert!(m.is_some_and(|m| m.to < m.from));
    }

    #[test]
    fn profitable_shadows_just_above_the_floor_do_not_lower_the_threshold() {
        let cfg = CostSection::default();
        let mut t = Tuner::new(0.5, &cfg);
        // Peer fills pay at byte precision 0.62 (break-even about 0.22), within the dead band
        // above the floor 0.6.
        for i in 0..50 {
            t.settle(settled(&cfg, 0.9, i % 50 < 31, true), &cfg);
        }
        assert_eq!(t.tick(&cfg, 0.05), None);
        let judged = t.judged.unwrap();
        assert!(judged.net > 0.0, "{judged:?}");
    }
}
