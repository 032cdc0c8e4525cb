//! Key purges of the last few minutes. A fetch that started before a purge and answers after
//! it carries the content the purge was meant to remove; the purge found nothing to cancel
//! (no fill existed yet), so the proxy asks here before caching the answer.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// When each recently purged key hash was last purged, for `window`, at most `cap` purges.
pub(crate) struct RecentPurges {
    inner: Mutex<Inner>,
    window: Duration,
    cap: usize,
}

#[derive(Default)]
struct Inner {
    last: HashMap<u128, Instant>,
    order: VecDeque<(Instant, u128)>,
    /// The newest purge dropped to stay within `cap` while still inside the window: every
    /// fetch that started before it counts as purged, since its key can no longer be told.
    forgotten: Option<Instant>,
}

impl RecentPurges {
    pub(crate) fn new(window: Duration, cap: usize) -> Self {
        RecentPurges {
            inner: Mutex::new(Inner::default()),
            window,
            cap: cap.max(1),
        }
    }

    /// Note that `hash` was purged at `now`.
    pub(crate) fn record(&self, hash: u128, now: Instant) {
        let mut i = self.inner.lock();
        i.last.insert(hash, now);
        i.order.push_back((now, hash));
        while let Some(&(t, h)) = i.order.front() {
            let expired = now.saturating_duration_since(t) > self.window;
            if !expired && i.order.len() <= self.cap {
                break;
            }
            i.order.pop_front();
            if i.last.get(&h) == Some(&t) {
                i.last.remove(&h);
            }
            if !expired {
                i.forgotten = Some(i.forgotten.map_or(t, |f| f.max(t)));
            }
        }
    }

    /// Whether `hash` may have been purged at or after `started`. A fetch older than the
    /// window counts as purged: the purges it overlapped may be forgotten.
    pub(crate) fn purged_since(&self, hash: u128, started: Instant) -> bool {
        if started.elapsed() > self.window {
            return true;
        }
        let i = self.inner.lock();
        i.last.get(&hash).is_some_and(|t| *t >= started)
            || i.forgotten.is_some_and(|f| f >= started)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_overlapping_a_purge_of_its_key_is_told_and_others_are_not() {
        let r = RecentPurges::new(Duration::from_secs(300), 100);
        let before = Instant::now();
        r.record(1, Instant::now());
        let after = Instant::now();
        assert!(r.purged_since(1, before), "started before the purge");
        assert!(!r.purged_since(1, after + Duration::from_millis(1)));
        assert!(!r.purged_since(2, before), "another key");
    }

    #[test]
    fn beyond_its_cap_it_forgets_keys_but_not_that_purges_happened() {
        let r = RecentPurges::new(Duration::from_secs(300), 2);
        let started = Instant::now();
        for h in 0..5 {
            r.record(h, Instant::now());
        }
        assert_eq!(r.len(), 2);
        assert!(
            r.purged_since(99, started),
            "a dropped purge may have been any key"
        );
        let later = Instant::now() + Duration::from_millis(1);
        assert!(!r.purged_since(99, later));
    }

    #[test]
    fn purges_older_than_the_window_are_dropped() {
        let r = RecentPurges::new(Duration::from_millis(10), 100);
        r.record(1, Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        r.record(2, Instant::now());
        assert_eq!(r.len(), 1);
        assert!(r.purged_since(2, Instant::now() - Duration::from_millis(5)));
    }
}
