//! The origin fallback's resolved addresses. A lookup runs `getaddrinfo` on the blocking
//! pool and goes on after its caller stopped waiting: one per request would fill that pool
//! with a slow resolver's lookups exactly when every edge of a region is down and all its
//! traffic takes the fallback. So each upstream is looked up once per [`FRESH_FOR`] (a
//! failure once per [`FAILED_FOR`]), and the requests that need it meanwhile share that one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::proxy::{resolve_upstream, ResolvedUpstream, UpstreamLookupError};

/// How long an answer is used: as long as the edges keep theirs (`RESOLVE_EVERY`) would be
/// a minute; the fallback is rarer and a moved origin should be followed sooner.
const FRESH_FOR: Duration = Duration::from_secs(30);
/// How long a failed lookup stands before the next request tries again.
const FAILED_FOR: Duration = Duration::from_secs(5);
/// Upstreams remembered at most; past it the expired go, then everything.
const MAX_ENTRIES: usize = 4096;

/// What a lookup gave, shared by the requests that waited for it.
pub(crate) type Lookup = Result<Arc<ResolvedUpstream>, Arc<UpstreamLookupError>>;

struct Slot {
    started: Instant,
    answer: OnceCell<Lookup>,
}

impl Slot {
    /// A lookup still running is never expired: newcomers wait for it.
    fn expired(&self, now: Instant) -> bool {
        let age = now.saturating_duration_since(self.started);
        match self.answer.get() {
            None => false,
            Some(Ok(_)) => age >= FRESH_FOR,
            Some(Err(_)) => age >= FAILED_FOR,
        }
    }
}

/// Resolved origin upstreams, by URL.
pub(crate) struct OriginAddrs {
    allow_private: bool,
    timeout: Duration,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl OriginAddrs {
    /// Lookups bounded by `timeout`, refusing private addresses unless `allow_private`
    /// ([`resolve_upstream`]).
    pub(crate) fn new(allow_private: bool, timeout: Duration) -> Self {
        OriginAddrs {
            allow_private,
            timeout,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// `upstream`'s addresses: the standing answer, or the one a new lookup gives.
    pub(crate) async fn resolve(&self, upstream: &str) -> Lookup {
        let slot = self.slot(upstream, Instant::now());
        slot.answer
            .get_or_init(|| async {
                resolve_upstream(upstream, self.allow_private, self.timeout)
                    .await
                    .map(Arc::new)
                    .map_err(Arc::new)
            })
            .await
            .clone()
    }

    fn slot(&self, upstream: &str, now: Instant) -> Arc<Slot> {
        let mut slots = self.slots.lock();
        if let Some(s) = slots.get(upstream).filter(|s| !s.expired(now)) {
            return s.clone();
        }
        if slots.len() >= MAX_ENTRIES {
            slots.retain(|_, s| !s.expired(now));
            if slots.len() >= MAX_ENTRIES {
                slots.clear();
            }
        }
        let s = Arc::new(Slot {
            started: now,
            answer: OnceCell::new(),
        });
        slots.insert(upstream.to_string(), s.clone());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_is_shared_until_it_expires() {
        let addrs = OriginAddrs::new(true, Duration::from_secs(2));
        let a = addrs.resolve("http://127.0.0.1:8000").await.unwrap();
        let b = addrs.resolve("http://127.0.0.1:8000").await.unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "the second request used the first lookup"
        );
        assert_eq!(a.addrs[0].port(), 8000);
        let later = Instant::now() + FRESH_FOR;
        let slot = addrs.slot("http://127.0.0.1:8000", later);
        assert!(
            slot.answer.get().is_none(),
            "an expired answer is looked up again"
        );
    }

    #[tokio::test]
    async fn a_failure_is_remembered_briefly() {
        let addrs = OriginAddrs::new(false, Duration::from_secs(2));
        let e = addrs.resolve("http://127.0.0.1:8000").await.unwrap_err();
        assert!(matches!(*e, UpstreamLookupError::Private { .. }), "{e}");
        let now = Instant::now();
        assert!(addrs
            .slot("http://127.0.0.1:8000", now)
            .answer
            .get()
            .is_some());
        let slot = addrs.slot("http://127.0.0.1:8000", now + FAILED_FOR);
        assert!(slot.answer.get().is_none());
    }

    #[tokio::test]
    async fn concurrent_requests_wait_for_one_lookup() {
        let addrs = Arc::new(OriginAddrs::new(true, Duration::from_secs(2)));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let addrs = addrs.clone();
                tokio::spawn(async move { addrs.resolve("http://localhost:9").await })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap().unwrap());
        }
        assert!(answers.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
        assert_eq!(addrs.slots.lock().len(), 1);
    }

    #[test]
    fn the_table_stays_bounded() {
        let addrs = OriginAddrs::new(true, Duration::from_secs(2));
        let now = Instant::now();
        for i in 0..MAX_ENTRIES + 10 {
            addrs.slot(&format!("http://o{i}.example"), now);
        }
        assert!(addrs.slots.lock().len() <= MAX_ENTRIES);
    }
}
