//! The fill lock: pingora-cache's cache lock, except for fills refused for a passing reason.
//!
//! pingora hands every custom no-cache reason to the waiters as `GiveUp`: each then fetches
//! from the origin on its own, as for a response that can never be cached. A fill refused
//! because a purge overlapped it (or a peer lacked the object) says nothing of that kind, and
//! the next answer will likely be cached, so its waiters compete for the lock again instead:
//! one fetches, the rest wait for its answer. Server errors stay `GiveUp` (see
//! `refetch_together`).

use pingora_cache::lock::{CacheKeyLock, CacheLock, LockStatus, Locked, WritePermit};
use pingora_cache::CacheKey;
use std::time::Duration;

use super::refetch_together;

/// [`CacheLock`] with transient refusals passed on as `TransientError`.
pub struct FillLock(Box<CacheLock>);

impl FillLock {
    /// A lock whose writers are presumed dead after `age_timeout`.
    pub fn new(age_timeout: Duration) -> Self {
        FillLock(CacheLock::new_boxed(age_timeout))
    }
}

impl CacheKeyLock for FillLock {
    fn lock(&self, key: &CacheKey, stale_writer: bool) -> Locked {
        self.0.lock(key, stale_writer)
    }

    fn release(&self, key: &CacheKey, permit: WritePermit, reason: LockStatus) {
        self.0.release(key, permit, reason)
    }

    fn custom_lock_status(&self, reason: &'static str) -> LockStatus {
        if refetch_together(reason) {
            LockStatus::TransientError
        } else {
            self.0.custom_lock_status(reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{
        ERROR_ON_REVALIDATION, ORIGIN_SERVER_ERROR, PEER_LACKS_OBJECT, PURGED_DURING_FETCH,
    };

    #[test]
    fn transient_refusals_elect_a_new_writer_and_others_give_up() {
        let lock = FillLock::new(Duration::from_secs(5));
        for reason in [PURGED_DURING_FETCH, PEER_LACKS_OBJECT] {
            assert_eq!(lock.custom_lock_status(reason), LockStatus::TransientError);
        }
        for reason in [ERROR_ON_REVALIDATION, ORIGIN_SERVER_ERROR, "other"] {
            assert_eq!(
                lock.custom_lock_status(reason),
                LockStatus::GiveUp,
                "{reason}"
            );
        }
        let key = CacheKey::new("h/k", "");
        let Locked::Write(permit) = lock.lock(&key, false) else {
            panic!("the first request fetches");
        };
        let waiter = lock.lock(&key, false);
        assert!(!waiter.is_write(), "the second request waits");
        lock.release(&key, permit, LockStatus::TransientError);
        let Locked::Write(permit) = lock.lock(&key, false) else {
            panic!("released: the next request fetches");
        };
        lock.release(&key, permit, LockStatus::Done);
    }
}
