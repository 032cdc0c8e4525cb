//! Whether every key purge's tombstone is known to be on the disk tier.
//!
//! A key purge removes the object from memory at once and hands foyer a tombstone for the disk
//! tier; until that is written, an edge that crashes would find the object on disk when it
//! starts again and serve it. So a purge is answered only once the disk tier has written what
//! was submitted before it ([`super::FoyerStorage::settle_purge`]). A tombstone is owed until
//! a wait that started after it completes — while its own purge still waits, and after a wait
//! that ran out (a key ban stands in for that purge's tombstone meanwhile, or, when the ban
//! could not be written, the purge is reported failed and the broker sends it again). While
//! any is owed, every key purge waits too, also one of a key no longer held: it may be the
//! broker's resend, or a second purge of a key whose first purge is still waiting, and must
//! not be answered as done before the first one is durable.

use std::sync::atomic::{AtomicU64, Ordering};

/// Tombstones submitted, and how many of them a completed wait covered.
#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    /// Tombstones submitted so far.
    submitted: AtomicU64,
    /// The most submitted tombstones a completed wait covered.
    covered: AtomicU64,
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

    /// A wait that started at `mark` completed: the tombstones it covered are written.
    pub(crate) fn written(&self, mark: u64) {
        self.covered.fetch_max(mark, Ordering::AcqRel);
    }

    /// How many tombstones completed waits covered: the first that many are written.
    pub(crate) fn written_so_far(&self) -> u64 {
        self.covered.load(Ordering::Acquire)
    }

    /// Whether some tombstone is not known to be written.
    pub(crate) fn owed(&self) -> bool {
        let covered = self.covered.load(Ordering::Acquire);
        self.submitted.load(Ordering::Acquire) > covered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_is_owed_until_a_wait_that_covers_it_completes() {
        let t = Tombstones::default();
        assert!(!t.owed());
        t.submit();
        // Its own purge is still waiting.
        assert!(t.owed());
        let first = t.mark();
        // A wait that started before it was submitted says nothing of it.
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
        // The late wait ran out; the early one completes after it.
        t.written(early);
        assert!(t.owed());
        t.written(late);
        assert!(!t.owed());
        t.written(early);
        assert!(
            !t.owed(),
            "a late completion of an older wait takes nothing back"
        );
    }
}
