//! Objects whose disk write may still be on its way. foyer's disk index learns an object only
//! once its write is flushed, so an object evicted from memory before then is in neither tier
//! by `contains`; a removal must still send it a disk tombstone. Removals of objects in
//! neither tier otherwise skip the tombstone: foyer keeps tombstones in a ring of fixed size,
//! and one written for every purge of a key the edge never held (most of the fleet's purges
//! on any one edge) would overwrite the tombstones of objects it did remove, which a restart
//! would then bring back.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a write is taken to be possibly in flight.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Writes remembered at most; past it every removal sends its tombstone for a window.
pub const CAP: usize = 65_536;

/// Recent disk writes by key hash, expired oldest first.
#[derive(Debug, Default)]
pub struct RecentWrites {
    at: HashMap<u128, Instant>,
    order: VecDeque<(Instant, u128)>,
    /// Until then, every key counts as written (more than [`CAP`] writes in a window).
    all_until: Option<Instant>,
}

impl RecentWrites {
    /// A disk write of `hash` was queued at `now`.
    pub fn note(&mut self, hash: u128, now: Instant) {
        while let Some(&(t, h)) = self.order.front() {
            if now.duration_since(t) < WINDOW {
                break;
            }
            self.order.pop_front();
            if self.at.get(&h) == Some(&t) {
                self.at.remove(&h);
            }
        }
        if self.order.len() >= CAP {
            self.at.clear();
            self.order.clear();
            self.all_until = Some(now + WINDOW);
        }
        self.at.insert(hash, now);
        self.order.push_back((now, hash));
    }

    /// Whether a disk write of `hash` may still be in flight at `now`.
    pub fn may_be_writing(&self, hash: u128, now: Instant) -> bool {
        self.all_until.is_some_and(|t| now < t)
            || self
                .at
                .get(&hash)
                .is_some_and(|t| now.duration_since(*t) < WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_counts_for_its_window_and_an_overflow_for_everything() {
        let mut w = RecentWrites::default();
        let t0 = Instant::now();
        w.note(1, t0);
        assert!(w.may_be_writing(1, t0 + WINDOW / 2));
        assert!(!w.may_be_writing(1, t0 + WINDOW));
        assert!(!w.may_be_writing(2, t0));
        for h in 0..CAP as u128 {
            w.note(h + 10, t0);
        }
        assert!(w.may_be_writing(999_999_999, t0), "overflowed: every key");
        assert!(!w.may_be_writing(999_999_999, t0 + WINDOW * 2));
        // Expired writes leave from the front: a steady rate under the cap never overflows.
        let mut w = RecentWrites::default();
        for i in 0..(3 * CAP) as u32 {
            w.note(u128::from(i), t0 + WINDOW * i / (CAP as u32 / 2));
        }
        assert!(w.all_until.is_none());
        assert!(w.order.len() <= CAP);
    }
}
