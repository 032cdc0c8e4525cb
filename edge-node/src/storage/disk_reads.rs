//! Reads from the hybrid cache that a stalled disk cannot hold up.
//!
//! A read that misses the memory tier waits for the disk, and a hung disk holds it for as
//! long as the stall lasts: the client waits, and so does every request coalesced behind it
//! on the cache lock. While the watchdog ([`DiskHealth`]) sees a stall, reads ask the memory
//! tier alone; a read that began before the stall was seen is given up after
//! `cache.disk_stall_secs`. Either way the read is a miss, so the request goes to the origin
//! (or a peer) and its fill is stored as usual. A disk read given up on still finishes on
//! foyer's runtime once the disk answers, but stores nothing over a newer copy: foyer drops a
//! read whose key was inserted meanwhile.

use std::sync::OnceLock;
use std::task::Poll;

use foyer::HybridCache;

use super::disk_health::DiskHealth;
use super::StoredObject;

/// Why a read did not wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    /// The watchdog saw the disk stall: the read asked the memory tier alone.
    Stalled,
    /// The read waited `cache.disk_stall_secs` and was given up.
    TimedOut,
}

impl Skip {
    const ALL: [Skip; 2] = [Skip::Stalled, Skip::TimedOut];

    fn label(self) -> &'static str {
        match self {
            Skip::Stalled => "stalled",
            Skip::TimedOut => "timed_out",
        }
    }
}

/// The storage's reads, bounded by the disk's health once [`DiskReads::watch`] is given it.
pub(super) struct DiskReads {
    health: OnceLock<DiskHealth>,
    /// `shadowcdn_edge_disk_reads_skipped_total{reason}`.
    skipped: prometheus::IntCounterVec,
}

impl DiskReads {
    pub(super) fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let skipped = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "shadowcdn_edge_disk_reads_skipped_total",
                "Reads of objects the disk tier may hold answered as misses without it: reason \
                 stalled (the disk's watchdog saw a stall, so only the memory tier was asked) \
                 or timed_out (the read waited cache.disk_stall_secs)",
            ),
            &["reason"],
        )?;
        for s in Skip::ALL {
            skipped.with_label_values(&[s.label()]);
        }
        registry.register(Box::new(skipped.clone()))?;
        Ok(DiskReads {
            health: OnceLock::new(),
            skipped,
        })
    }

    /// Bound reads by `health` from now on. Only the first call counts: the edge has one
    /// watchdog for its one cache directory.
    pub(super) fn watch(&self, health: DiskHealth) {
        let _ = self.health.set(health);
    }

    /// The object stored under `hash`, or `None` (a miss) when nothing is, or the disk was
    /// not waited for.
    pub(super) async fn get(
        &self,
        cache: &HybridCache<u128, StoredObject>,
        hash: u128,
    ) -> foyer::Result<Option<StoredObject>> {
        let Some(health) = self.health.get() else {
            return Ok(cache.get(&hash).await?.map(|e| e.value().clone()));
        };
        if health.stalled() {
            let held = cache.memory().get(&hash).map(|e| e.value().clone());
            if held.is_none() && cache.storage().may_contains(&hash) {
                self.count(Skip::Stalled);
            }
            return Ok(held);
        }
        // A memory hit is ready at the first poll: only a read that waits gets a timer.
        let mut get = std::pin::pin!(cache.get(&hash));
        if let Poll::Ready(got) = futures::poll!(&mut get) {
            return Ok(got?.map(|e| e.value().clone()));
        }
        match tokio::time::timeout(health.stall_after(), get).await {
            Ok(got) => Ok(got?.map(|e| e.value().clone())),
            Err(_) => {
                tracing::debug!(hash, "a read of the disk tier given up as a miss");
                self.count(Skip::TimedOut);
                Ok(None)
            }
        }
    }

    fn count(&self, skip: Skip) {
        self.skipped.with_label_values(&[skip.label()]).inc();
    }

    #[cfg(test)]
    pub(super) fn skipped(&self, reason: &str) -> u64 {
        self.skipped.with_label_values(&[reason]).get()
    }
}
