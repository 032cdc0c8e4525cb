//! How often co-access's offered followers are then asked for, and the probabilities that
//! measure gives them. The rule of succession over a leader's few requests picks, among
//! thousands of pairs, those that happened to follow in their few trials: on the apache trace
//! followers offered at P ≥ 0.6 were asked by the same client within the window 28% of the
//! time (`bench/offline/coaccess_calibration.py`). So the learner scores the offers it makes
//! as a request starts — followed if the same client starts a request for the follower within
//! the window — in bands of the offer's P, and answers a band's observed share instead. A band
//! starts from the P it was offered at, counted as [`PRIOR`] offers, so a fresh learner trusts
//! its counts until its own outcomes say otherwise; the outcomes fade six times slower than
//! the pairs' counts.
//!
//! Which offers are scored must not depend on how they turn out, or the shares are biased: an
//! offer is refused (never scored) when its client already has [`PENDING_PER_CLIENT`] waiting
//! or the waiting offers hold their byte budget, and every offer waiting is decided, in the
//! order offered, once it is twice the window old.

use std::collections::{HashMap, VecDeque};

pub use models::calibration::{band, BANDS};

/// Offers at their own P a band starts from.
const PRIOR: f64 = 10.0;
/// What a band's outcomes keep per half-life of the pairs' counts: 0.5^(1/6).
const DECAY: f64 = 0.890_898_718_140_339_3;
/// Offers one client may have waiting for their outcome; past it new ones are not scored.
const PENDING_PER_CLIENT: usize = 16;
/// What an offer is charged beside its key (its deadline's place in the queue is
/// [`QUEUED_BYTES`]).
const OFFER_BYTES: usize = 64;
/// What an offer's deadline costs in [`Calibration::queue`].
const QUEUED_BYTES: usize = std::mem::size_of::<(u64, u64, u64)>();

#[derive(Debug, Clone, Copy, Default)]
struct Band {
    decided: f64,
    followed: f64,
}

#[derive(Debug)]
struct Offer {
    seq: u64,
    key: String,
    band: usize,
    /// When the leader started (broker clock, seconds).
    ts: u64,
    /// The leader's start on the wall (ms; 0: unknown): a request for the follower that
    /// started before it did not follow it.
    started: u64,
}

impl Offer {
    fn charge(&self) -> usize {
        self.key.len() + OFFER_BYTES
    }
}

/// Offers waiting for their outcome, and each band's outcomes.
#[derive(Debug, Default)]
pub struct Calibration {
    bands: [Band; BANDS],
    pending: HashMap<u64, Vec<Offer>>,
    /// (offered at, client, seq) of every offer waiting, oldest first.
    queue: VecDeque<(u64, u64, u64)>,
    next_seq: u64,
    pending_bytes: usize,
    /// Outcomes so far per band, never faded: (followed, not followed).
    outcomes: [(u64, u64); BANDS],
}

impl Calibration {
    /// P(follows) for an offer the pairs' counts put at `p`.
    pub fn calibrated(&self, p: f64) -> f64 {
        let b = self.bands[band(p)];
        ((b.followed + PRIOR * p) / (b.decided + PRIOR)).clamp(0.0, 1.0)
    }

    /// `client` is offered `key` at `p` by a leader that started at `ts` (broker clock) and
    /// `started` (wall ms). Not scored: an unknown client (0), a key already offered to the
    /// client and not yet decided, a client with [`PENDING_PER_CLIENT`] offers waiting, or
    /// any past `max_bytes` of waiting offers.
    pub fn offer(
        &mut self,
        client: u64,
        key: &str,
        p: f64,
        ts: u64,
        started: u64,
        max_bytes: usize,
    ) {
        // The queue counts too: a followed offer leaves its entry there until it is due.
        if client == 0 || self.bytes() + key.len() + OFFER_BYTES + QUEUED_BYTES > max_bytes {
            return;
        }
        let offers = self.pending.entry(client).or_default();
        if offers.len() >= PENDING_PER_CLIENT || offers.iter().any(|o| o.key == key) {
            return;
        }
        let offer = Offer {
            seq: self.next_seq,
            key: key.to_string(),
            band: band(p),
            ts,
            started,
        };
        self.next_seq += 1;
        self.pending_bytes += offer.charge();
        self.queue.push_back((ts, client, offer.seq));
        offers.push(offer);
    }

    /// `client` started a request for `key` at `ts` (broker clock; `started` on the wall, ms,
    /// 0 if unknown): a waiting offer of it made within `window` before is followed.
    pub fn asked(&mut self, client: u64, key: &str, ts: u64, started: u64, window: u64) {
        let Some(offers) = self.pending.get_mut(&client) else {
            return;
        };
        let Some(i) = offers.iter().position(|o| o.key == key) else {
            return;
        };
        let o = &offers[i];
        let after = started == 0 || o.started == 0 || started >= o.started;
        if after && ts.saturating_sub(o.ts) <= window {
            self.settle(client, i, true);
        }
    }

    /// Decide every offer made more than twice `window` before `now` as not followed: a
    /// request that started within the window has been seen by then (as it started or,
    /// when its start was not queued, as it ended).
    pub fn expire(&mut self, now: u64, window: u64) {
        while let Some(&(ts, client, seq)) = self.queue.front() {
            // An entry from further ahead of `now` than records arrive out of order (the
            // clock was set back) is due too: waiting for the clock to reach it would hold
            // every offer behind it.
            let span = window.saturating_mul(2);
            let ahead = ts > now.saturating_add(span);
            if !ahead && now.saturating_sub(ts) <= span {
                break;
            }
            self.queue.pop_front();
            let waiting = self.pending.get(&client);
            if let Some(i) = waiting.and_then(|w| w.iter().position(|o| o.seq == seq)) {
                self.settle(client, i, false);
            }
        }
        // Followed offers leave their entry in the queue until it comes up; the queue holds
        // only deadlines of the last two windows, so it stays short, and gives back what a
        // burst made it hold.
        if self.queue.capacity() > 64 && self.queue.len() < self.queue.capacity() / 4 {
            self.queue.shrink_to(self.queue.len() * 2);
        }
    }

    /// Decide offer `i` of `client`'s waiting ones.
    fn settle(&mut self, client: u64, i: usize, followed: bool) {
        let Some(offers) = self.pending.get_mut(&client) else {
            return;
        };
        let o = offers.swap_remove(i);
        if offers.is_empty() {
            self.pending.remove(&client);
        }
        self.pending_bytes -= o.charge();
        self.decided(o.band, followed);
    }

    /// An offer in band `b` was decided.
    fn decided(&mut self, b: usize, followed: bool) {
        self.bands[b].decided += 1.0;
        if followed {
            self.bands[b].followed += 1.0;
            self.outcomes[b].0 += 1;
        } else {
            self.outcomes[b].1 += 1;
        }
    }

    /// Fade the bands' outcomes by one half-life of the pairs' counts.
    pub fn decay(&mut self) {
        for b in &mut self.bands {
            b.decided *= DECAY;
            b.followed *= DECAY;
        }
    }

    /// Bytes charged for the offers waiting and the queue of their deadlines.
    pub fn bytes(&self) -> usize {
        self.pending_bytes + self.queue.len() * QUEUED_BYTES
    }

    /// Offers decided so far per band: (followed, not followed).
    pub fn outcomes(&self) -> &[(u64, u64); BANDS] {
        &self.outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: usize = 1 << 20;

    #[test]
    fn a_band_answers_what_its_offers_did_once_it_has_some() {
        let mut c = Calibration::default();
        // 40 offers at 0.65, a quarter followed.
        for client in 1..=40u64 {
            c.offer(client, "h/b", 0.65, 100, 0, BUDGET);
            if client % 4 == 0 {
                c.asked(client, "h/b", 110, 0, 30);
            }
        }
        assert!(
            (c.calibrated(0.65) - (10.0 + PRIOR * 0.65) / (10.0 + PRIOR)).abs() < 1e-12,
            "offers still undecided count for nothing"
        );
        c.expire(161, 30);
        assert_eq!(c.outcomes()[6], (10, 30));
        assert!((c.calibrated(0.65) - (10.0 + PRIOR * 0.65) / (40.0 + PRIOR)).abs() < 1e-12);
        assert!(c.calibrated(0.65) < 0.4);
        c.decay();
        let want = (10.0 * DECAY + PRIOR * 0.65) / (40.0 * DECAY + PRIOR);
        assert!((c.calibrated(0.65) - want).abs() < 1e-9);
        // Other bands are untouched.
        assert!((c.calibrated(0.85) - 0.85).abs() < 1e-12);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn only_the_same_client_asking_within_the_window_after_the_leader_follows() {
        let mut c = Calibration::default();
        c.offer(7, "h/b", 0.7, 100, 5_000, BUDGET);
        c.offer(7, "h/b", 0.7, 101, 5_100, BUDGET);
        // Another client, or a request of the key that started before the leader.
        c.asked(8, "h/b", 105, 6_000, 30);
        c.asked(7, "h/b", 105, 4_000, 30);
        assert_eq!(c.outcomes()[7], (0, 0));
        c.asked(7, "h/b", 106, 6_000, 30);
        assert_eq!(
            c.outcomes()[7],
            (1, 0),
            "one offer of a key waits at a time"
        );
        c.offer(7, "h/c", 0.7, 200, 0, BUDGET);
        c.asked(7, "h/c", 240, 0, 30);
        assert_eq!(
            c.outcomes()[7],
            (1, 0),
            "too late to follow, not yet decided"
        );
        c.expire(261, 30);
        assert_eq!(c.outcomes()[7], (1, 1));
        // A key offered again once its first offer was decided is a new offer.
        c.offer(7, "h/c", 0.7, 300, 0, BUDGET);
        c.asked(7, "h/c", 301, 0, 30);
        assert_eq!(c.outcomes()[7], (2, 1));
        c.expire(10_000, 30);
        assert_eq!(c.bytes(), 0);
        assert!(c.queue.is_empty());
    }

    #[test]
    fn offers_past_a_limit_are_refused_whatever_they_would_have_done() {
        let mut c = Calibration::default();
        for i in 0..40u64 {
            c.offer(1, &format!("h/{i}"), 0.55, 100, 0, BUDGET);
        }
        assert_eq!(c.pending[&1].len(), PENDING_PER_CLIENT);
        // The first sixteen wait; the rest were never offered.
        c.asked(1, "h/39", 101, 0, 30);
        c.asked(1, "h/0", 101, 0, 30);
        assert_eq!(c.outcomes()[5], (1, 0));
        // The byte budget: an offer that would pass it is refused.
        let one = "h/x".len() + OFFER_BYTES + QUEUED_BYTES;
        let mut c = Calibration::default();
        for client in 1..=10u64 {
            c.offer(client, "h/x", 0.55, 100, 0, 3 * one);
        }
        assert_eq!(c.pending.len(), 3);
        c.offer(0, "h/x", 0.55, 100, 0, BUDGET);
        assert_eq!(c.pending.len(), 3, "an unknown client is not followed up");

        // Followed offers leave their deadlines queued until due: those count too.
        let mut c = Calibration::default();
        let budget = 100 * QUEUED_BYTES;
        for client in 1..=1000u64 {
            c.offer(client, "h/x", 0.55, 100, 0, budget);
            c.asked(client, "h/x", 101, 0, 30);
        }
        assert!(c.bytes() <= budget, "{}", c.bytes());
        assert!(c.queue.len() < 100, "{}", c.queue.len());
        c.expire(161, 30);
        assert!(c.queue.is_empty());
    }

    #[test]
    fn offers_from_before_the_clock_was_set_back_do_not_hold_the_rest() {
        let mut c = Calibration::default();
        c.offer(1, "h/a", 0.55, 10_000, 0, BUDGET);
        // The clock went back an hour: the offer is due, not held until the clock is back.
        c.offer(2, "h/b", 0.55, 6_400, 0, BUDGET);
        c.expire(6_400, 30);
        assert_eq!(c.outcomes()[5], (0, 1));
        assert_eq!(c.queue.len(), 1);
        // Records a little out of order are not that.
        c.offer(3, "h/c", 0.55, 6_410, 0, BUDGET);
        c.expire(6_405, 30);
        assert_eq!(c.queue.len(), 2);
    }
}
