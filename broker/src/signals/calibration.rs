//! How often co-access's offered followers are then asked for, and the probabilities that
//! measure gives them. The rule of succession over a leader's few requests picks, among
//! thousands of pairs, those that happened to follow in their few trials: on the apache trace
//! followers offered at P ≥ 0.6 were asked by the same client within the window 28% of the
//! time (`bench/offline/coaccess_calibration.py`). So the learner scores each offer it
//! makes — followed if the client asks for the follower within the window — in bands of the
//! offer's P, and answers a band's observed share instead. A band starts from the P it was
//! offered at, counted as [`PRIOR`] offers, so a fresh learner trusts its counts until its
//! own outcomes say otherwise; the outcomes fade six times slower than the pairs' counts.

use std::collections::HashMap;

/// Bands of P, a tenth wide.
pub const BANDS: usize = 10;
/// Offers at their own P a band starts from.
const PRIOR: f64 = 10.0;
/// What a band's outcomes keep per half-life of the pairs' counts: 0.5^(1/6).
const DECAY: f64 = 0.890_898_718_140_339_3;
/// Offers one client may have waiting for their outcome; past it the oldest is forgotten
/// unscored.
const PENDING_PER_CLIENT: usize = 16;
/// What an offer is charged beside its key.
const OFFER_BYTES: usize = 48;

/// The band of `p`.
pub fn band(p: f64) -> usize {
    ((p.clamp(0.0, 1.0) * BANDS as f64) as usize).min(BANDS - 1)
}

#[derive(Debug, Clone, Copy, Default)]
struct Band {
    offered: f64,
    followed: f64,
}

#[derive(Debug)]
struct Offer {
    key: String,
    band: usize,
    ts: u64,
    /// The leader's start (0: unknown): a follower that started before it did not follow it.
    started: u64,
}

/// Offers waiting for their outcome, and each band's outcomes.
#[derive(Debug, Default)]
pub struct Calibration {
    bands: [Band; BANDS],
    pending: HashMap<u64, Vec<Offer>>,
    pending_bytes: usize,
    /// Outcomes so far per band, never decayed: (followed, not followed).
    outcomes: [(u64, u64); BANDS],
}

impl Calibration {
    /// P(follows) for an offer the pairs' counts put at `p`.
    pub fn calibrated(&self, p: f64) -> f64 {
        let b = self.bands[band(p)];
        ((b.followed + PRIOR * p) / (b.offered + PRIOR)).clamp(0.0, 1.0)
    }

    /// `client` is offered `key` at `p` at `ts` by a leader that started at `started`. An
    /// unknown client (0) cannot be followed up, and a key already offered to the client and
    /// not yet decided is one offer. At most `max_clients` clients wait for outcomes.
    pub fn offer(
        &mut self,
        client: u64,
        key: &str,
        p: f64,
        ts: u64,
        started: u64,
        max_clients: usize,
    ) {
        if client == 0 {
            return;
        }
        if self.pending.len() >= max_clients && !self.pending.contains_key(&client) {
            self.shed();
        }
        let offers = self.pending.entry(client).or_default();
        if offers.iter().any(|o| o.key == key) {
            return;
        }
        if offers.len() >= PENDING_PER_CLIENT {
            let old = offers.remove(0);
            self.pending_bytes -= old.key.len() + OFFER_BYTES;
        }
        offers.push(Offer {
            key: key.to_string(),
            band: band(p),
            ts,
            started,
        });
        self.pending_bytes += key.len() + OFFER_BYTES;
    }

    /// An offer in band `b` was decided.
    fn decided(&mut self, b: usize, followed: bool) {
        self.bands[b].offered += 1.0;
        if followed {
            self.bands[b].followed += 1.0;
            self.outcomes[b].0 += 1;
        } else {
            self.outcomes[b].1 += 1;
        }
    }

    /// `client` asked for `key` at `ts` (its request started at `started`): an offer of it
    /// within `window` before is followed; the client's offers older than that were not.
    pub fn observed(&mut self, client: u64, key: &str, ts: u64, started: u64, window: u64) {
        let Some(offers) = self.pending.get_mut(&client) else {
            return;
        };
        let mut decided = Vec::new();
        offers.retain(|o| {
            let late = ts.saturating_sub(o.ts) > window;
            let after = started == 0 || o.started == 0 || started >= o.started;
            let followed = o.key == key && !late && after;
            if followed || late {
                decided.push((o.band, followed, o.key.len() + OFFER_BYTES));
            }
            !(followed || late)
        });
        if offers.is_empty() {
            self.pending.remove(&client);
        }
        for (b, followed, bytes) in decided {
            self.pending_bytes -= bytes;
            self.decided(b, followed);
        }
    }

    /// Score every offer older than `window` at `ts` as not followed (clients gone quiet),
    /// and fade the bands' outcomes by one half-life of the pairs' counts.
    pub fn decay(&mut self, ts: u64, window: u64) {
        let mut late = Vec::new();
        for offers in self.pending.values_mut() {
            offers.retain(|o| {
                let gone = ts.saturating_sub(o.ts) > window;
                if gone {
                    late.push((o.band, o.key.len() + OFFER_BYTES));
                }
                !gone
            });
        }
        self.pending.retain(|_, o| !o.is_empty());
        for (b, bytes) in late {
            self.pending_bytes -= bytes;
            self.decided(b, false);
        }
        for b in &mut self.bands {
            b.offered *= DECAY;
            b.followed *= DECAY;
        }
    }

    /// Forget the offers waiting for their outcome, unscored (memory is short).
    pub fn shed(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
    }

    /// Bytes charged for the offers waiting.
    pub fn bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Offers decided so far per band: (followed, not followed).
    pub fn outcomes(&self) -> &[(u64, u64); BANDS] {
        &self.outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_band_answers_what_its_offers_did_once_it_has_some() {
        let mut c = Calibration::default();
        // 40 offers at 0.65, a quarter followed.
        for client in 1..=40u64 {
            c.offer(client, "h/b", 0.65, 100, 0, 1000);
            if client % 4 == 0 {
                c.observed(client, "h/b", 110, 0, 30);
            }
        }
        assert!(
            (c.calibrated(0.65) - (10.0 + PRIOR * 0.65) / (10.0 + PRIOR)).abs() < 1e-12,
            "offers still undecided count for nothing"
        );
        c.decay(200, 30);
        assert_eq!(c.outcomes()[6], (10, 30));
        let decayed = 40.0 * DECAY;
        let want = (10.0 * DECAY + PRIOR * 0.65) / (decayed + PRIOR);
        assert!((c.calibrated(0.65) - want).abs() < 1e-9);
        assert!(c.calibrated(0.65) < 0.4);
        // Other bands are untouched.
        assert!((c.calibrated(0.85) - 0.85).abs() < 1e-12);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn only_the_same_client_asking_within_the_window_after_the_leader_follows() {
        let mut c = Calibration::default();
        c.offer(7, "h/b", 0.7, 100, 5_000, 1000);
        c.offer(7, "h/b", 0.7, 101, 5_100, 1000);
        // Another client, or a request of the key that started before the leader.
        c.observed(8, "h/b", 105, 6_000, 30);
        c.observed(7, "h/b", 105, 4_000, 30);
        assert_eq!(c.outcomes()[7], (0, 0));
        c.observed(7, "h/b", 106, 6_000, 30);
        assert_eq!(
            c.outcomes()[7],
            (1, 0),
            "one offer of a key pending at a time"
        );
        c.offer(7, "h/c", 0.7, 200, 0, 1000);
        c.observed(7, "h/c", 240, 0, 30);
        assert_eq!(c.outcomes()[7], (1, 1), "too late");
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn waiting_offers_are_bounded_and_shedding_them_scores_nothing() {
        let mut c = Calibration::default();
        for i in 0..40u64 {
            c.offer(1, &format!("h/{i}"), 0.55, 100, 0, 3);
        }
        assert_eq!(c.pending[&1].len(), PENDING_PER_CLIENT);
        for client in 2..=4u64 {
            c.offer(client, "h/x", 0.55, 100, 0, 3);
        }
        assert!(c.pending.len() <= 3);
        c.shed();
        assert_eq!(c.bytes(), 0);
        assert_eq!(c.outcomes()[5], (0, 0));
        assert_eq!(
            c.bands[5].offered, 0.0,
            "offers never decided count for nothing"
        );
    }
}
