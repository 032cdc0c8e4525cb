//! Key purges of the last few minutes. A fetch that started before a purge and answers after
//! it carries the content the purge was meant to remove; the purge found nothing to cancel
//! (no fill existed yet), so the proxy asks here before caching the answer. A lookup asks
//! too: a read of the object that was under way when it was purged can put it back in
//! memory, and the lookup that made that read must not serve it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// When each recently purged key hash was last purged, for `window`, at most `cap` purges.
pub(crate) struct RecentPurges {
    inner: Mutex<Inner>,
    window: Duration,
    cap: usize,
    /// Wall time of the newest purge (µs since the epoch): an object created after it was
    /// purged by none of them, and a lookup needs no lock to know.
    newest_us: AtomicU64,
    /// The same per slot of key hashes ([`SLOTS`], never forgotten): an object created after
    /// its slot's newest purge was not purged either, however busy other keys' purges keep
    /// `newest_us`, and again no lock is taken.
    slots: Box<[AtomicU64]>,
}

/// Slots of [`RecentPurges::slots`]: 32 KiB, and few keys purged in one slot within the
/// lifetime of a hot object.
const SLOTS: usize = 4096;

fn slot(hash: u128) -> usize {
    (hash % SLOTS as u128) as usize
}

#[derive(Default)]
struct Inner {
    /// The last purge of each hash, on both clocks (wall time in µs since the epoch).
    last: HashMap<u128, (Instant, u64)>,
    order: VecDeque<(Instant, u128)>,
    /// The newest purge dropped to stay within `cap` while still inside the window: every
    /// fetch that started before it counts as purged, since its key can no longer be told.
    forgotten: Option<Instant>,
    /// Its wall time (µs since the epoch): an object created before it may have been purged.
    forgotten_wall: Option<u64>,
}

impl RecentPurges {
    pub(crate) fn new(window: Duration, cap: usize) -> Self {
        RecentPurges {
            inner: Mutex::new(Inner::default()),
            window,
            cap: cap.max(1),
            newest_us: AtomicU64::new(0),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Note that `hash` was purged at `now`.
    pub(crate) fn record(&self, hash: u128, now: Instant) {
        let wall = micros(SystemTime::now());
        let mut i = self.inner.lock();
        i.last.insert(hash, (now, wall));
        self.newest_us.fetch_max(wall, Ordering::Release);
        self.slots[slot(hash)].fetch_max(wall, Ordering::Release);
        i.order.push_back((now, hash));
        while let Some(&(t, h)) = i.order.front() {
            let expired = now.saturating_duration_since(t) > self.window;
            if !expired && i.order.len() <= self.cap {
                break;
            }
            i.order.pop_front();
            if i.last.get(&h).is_some_and(|(last, _)| *last == t) {
                i.last.remove(&h);
            }
            if !expired {
                i.forgotten = Some(i.forgotten.map_or(t, |f| f.max(t)));
                // The dropped purge's wall time: this purge's, less how much earlier it was.
                let t_wall =
                    wall.saturating_sub(now.saturating_duration_since(t).as_micros() as u64);
                i.forgotten_wall = Some(i.forgotten_wall.map_or(t_wall, |f| f.max(t_wall)));
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
        i.last.get(&hash).is_some_and(|(t, _)| *t >= started)
            || i.forgotten.is_some_and(|f| f >= started)
    }

    /// Whether an object created at `created`, whose key hashes to `hash()`, was purged after
    /// that (within the window): a copy read back from the write queue or the disk after its
    /// purge. Every cache hit asks, so it first tests without a lock (or hashing the key)
    /// whether any purge in the window could cover the object: a copy read back after its
    /// purge is caught by the lookup that read it, within milliseconds, so purges older than
    /// the window need not be asked about. Then, still without a lock, whether any purge of
    /// the key's slot came after the object.
    pub(crate) fn purged_after(&self, created: SystemTime, hash: impl FnOnce() -> u128) -> bool {
        let created = micros(created);
        let newest = self.newest_us.load(Ordering::Acquire);
        let horizon = micros(SystemTime::now()).saturating_sub(self.window.as_micros() as u64);
        if created > newest || newest < horizon {
            return false;
        }
        let hash = hash();
        if self.slots[slot(hash)].load(Ordering::Acquire) < created {
            return false;
        }
        let i = self.inner.lock();
        i.last.get(&hash).is_some_and(|(_, wall)| *wall >= created)
            // A forgotten purge stands only while it is inside the window, like any other:
            // kept for good, it would make every hit on an older object a purged one.
            || i
                .forgotten_wall
                .is_some_and(|f| f >= created && f >= horizon)
    }

    /// Whether a purge of `hash` may cover an object dated `created` (a fill whose fetch
    /// started then and was not registered in time to be cancelled, a peer's copy admitted
    /// then): a purge still remembered, or, for an object older than the window, any purge of
    /// the key's slot since, since the record of one of this key may be gone.
    pub(crate) fn may_cover(&self, created: SystemTime, hash: u128) -> bool {
        let started = micros(created);
        if self.slots[slot(hash)].load(Ordering::Acquire) < started {
            return false;
        }
        let horizon = micros(SystemTime::now()).saturating_sub(self.window.as_micros() as u64);
        started < horizon || self.purged_after(created, || hash)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().order.len()
    }
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
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
    fn objects_created_before_a_purge_of_their_key_are_told() {
        let r = RecentPurges::new(Duration::from_secs(300), 100);
        let before = SystemTime::now() - Duration::from_millis(5);
        assert!(!r.purged_after(before, || 1), "nothing purged yet");
        r.record(1, Instant::now());
        assert!(r.purged_after(before, || 1));
        assert!(!r.purged_after(before, || 2), "another key");
        let after = SystemTime::now() + Duration::from_millis(5);
        assert!(!r.purged_after(after, || 1), "created after the purge");
    }

    #[test]
    fn read_backs_are_told_past_the_cap_but_not_after_the_window() {
        let r = RecentPurges::new(Duration::from_secs(300), 2);
        let before = SystemTime::now() - Duration::from_millis(5);
        for h in 0..5 {
            r.record(h, Instant::now());
        }
        assert!(
            r.purged_after(before, || 0),
            "a forgotten purge may have been this key"
        );
        assert!(
            !r.purged_after(before, || SLOTS as u128 - 1),
            "a key whose slot saw no purge was not purged"
        );
        assert!(
            r.purged_after(before, || SLOTS as u128),
            "a key sharing a purged slot may have been"
        );
        let old = RecentPurges::new(Duration::from_millis(10), 100);
        old.record(1, Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!old.purged_after(before, || 1), "older than the window");
    }

    #[test]
    fn a_burst_past_the_cap_stops_counting_once_it_leaves_the_window() {
        let r = RecentPurges::new(Duration::from_secs(1), 2);
        let before = SystemTime::now() - Duration::from_millis(5);
        for h in 0..5 {
            r.record(h * SLOTS as u128, Instant::now());
        }
        assert!(
            r.purged_after(before, || 7 * SLOTS as u128),
            "forgotten, in the window"
        );
        std::thread::sleep(Duration::from_millis(1100));
        // A later purge of the same slot keeps the lock-free checks from answering.
        r.record(9 * SLOTS as u128, Instant::now());
        assert!(
            !r.purged_after(before, || 7 * SLOTS as u128),
            "the burst is older than the window"
        );
        assert!(
            r.purged_after(before, || 9 * SLOTS as u128),
            "the new purge"
        );
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
