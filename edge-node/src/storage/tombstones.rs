//! Whether every key purge's tombstone is known to be on the disk tier.
//!
//! A key purge removes the object from memory at once and hands foyer a tombstone for the disk
//! tier; until that is written, an edge that crashes would find the object on disk when it
//! starts again and serve it. So a purge is answered only once the disk tier has written what
//! was submitted before it ([`super::FoyerStorage::settle_purge`]). That wait is bounded: one
//! that runs out reports the purge failed (the broker sends it again), and the tombstones it
//! covered are owed until a later wait, started after them, completes. Until then every key
//! purge waits again — also one of a key no longer held, which is what the broker's resend
//! finds.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Tombstones submitted, and the latest one not known to be written.
#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    /// Tombstones submitted so far.
    submitted: AtomicU64,
    /// The highest count of submitted tombstones a timed-out wait covered; 0 when none is owed.
    owed: Mutex<u64>,
}

impl Tombstones {
    /// A key purge submitted its tombstone.
    pub(crate) fn submit(&self) {
        self.submitted.fetch_add(1, Ordering::AcqRel);
    }

    /// What a wait starting now covers: every tombstone submitted so far.
    pub(crate) fn mark(&self) -> u64 {
        self.submitted.load(Ordering::Acquire)
    }

    /// A wait that started at `mark` completed: the tombstones it covered are written, and with
    /// them every owed one it covered.
    pub(crate) fn written(&self, mark: u64) {
        let mut owed = self.owed.lock();
        if *owed <= mark {
            *owed = 0;
        }
    }

    /// A wait that started at `mark` ran out: its tombstones are owed.
    pub(crate) fn timed_out(&self, mark: u64) {
        let mut owed = self.owed.lock();
        *owed = (*owed).max(mark);
    }

    /// Whether some tombstone is not known to be written.
    pub(crate) fn owed(&self) -> bool {
        *self.owed.lock() > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timed_out_wait_is_owed_until_a_later_wait_covers_it() {
        let t = Tombstones::default();
        assert!(!t.owed());
        t.submit();
        let first = t.mark();
        t.timed_out(first);
        assert!(t.owed());
        // A wait that started before the owed tombstone was submitted says nothing of it.
        t.written(first - 1);
        assert!(t.owed());
        t.submit();
        let later = t.mark();
        t.written(later);
        assert!(!t.owed());
    }

    #[test]
    fn a_wait_that_finishes_late_does_not_clear_a_newer_debt() {
        let t = Tombstones::default();
        t.submit();
        let early = t.mark();
        t.submit();
        let late = t.mark();
        t.timed_out(late);
        // The early wait completes after the late one gave up: the late tombstone may still
        // be in the queue.
        t.written(early);
        assert!(t.owed());
        t.written(late);
        assert!(!t.owed());
    }
}
