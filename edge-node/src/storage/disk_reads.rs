//! Reads of the disk tier that a stalled disk cannot hold up.
//!
//! A read that misses the memory tier waits for the disk, and a hung disk holds it for as
//! long as the stall lasts: the client waits, and so does every request coalesced behind it
//! on the cache lock. While the watchdog ([`DiskHealth`]) sees a stall, the disk is not read
//! at all; a read that began before the stall was seen is given up after
//! `cache.disk_stall_secs`. Either way the read is a miss, so the request goes to the origin
//! (or a peer) and its fill is stored as usual.
//!
//! The disk is read here rather than through foyer's hybrid `get`: that one puts what it read
//! into the memory tier when the read ends, however late, and in foyer 0.22.6 even over a
//! newer version stored meanwhile (its in-flight read is not told of the insert). A read given
//! up on would, once the disk answered, put the version a refill or a refresh replaced back in
//! front of clients. The caller puts what it read into memory itself, under its own rules
//! ([`super::FoyerStorage`]'s `read`). Concurrent reads of one object share one load, as in
//! foyer, so a hot object read back after a restart is read (and held) once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;

use super::disk_health::DiskHealth;
use super::StoredObject;

/// The disk tier of the edge's cache.
pub(super) type DiskTier =
    foyer::Store<u128, StoredObject, foyer::DefaultHasher, foyer::HybridCacheProperties>;

/// What a read of the disk tier found.
#[derive(Clone)]
pub(super) enum Read {
    /// The object stored under the key.
    Held(StoredObject),
    /// The object under the key in foyer's write buffer, on its way to the disk: foyer's
    /// removals do not reach that buffer, so it may be one removed since it was stored.
    Queued(StoredObject),
    /// Nothing is stored under the key.
    Absent,
    /// The disk may hold the key but was not waited for ([`Skip`]).
    Skipped,
}

/// Why a read did not wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    /// The watchdog saw the disk stall: it was not read.
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

/// A load under way, shared by every reader of its key.
type Loading = Shared<BoxFuture<'static, foyer::Result<Read>>>;

/// Loads under way by key.
type LoadsUnderWay = Arc<Mutex<HashMap<u128, LoadUnderWay>>>;

/// A load under way.
struct LoadUnderWay {
    /// Its number: a finished load removes only its own entry, not a newer one of its key.
    id: u64,
    /// The epoch of its key's purge slot when it began.
    epoch: u64,
    loading: Loading,
}

/// Removes a load's entry from the map when the load ends, however it ends; `ended` tells
/// a reader still to put the entry in that it came too late.
struct Leave {
    under_way: LoadsUnderWay,
    hash: u128,
    id: u64,
    ended: Arc<AtomicBool>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::SeqCst);
        let mut under_way = self.under_way.lock();
        if under_way.get(&self.hash).is_some_and(|l| l.id == self.id) {
            under_way.remove(&self.hash);
        }
    }
}

/// The storage's reads of its disk tier, bounded by the disk's health once
/// [`DiskReads::watch`] is given it.
pub(super) struct DiskReads {
    health: OnceLock<DiskHealth>,
    loading: LoadsUnderWay,
    next_load: AtomicU64,
    /// `shadowcdn_edge_disk_reads_skipped_total{reason}`.
    skipped: prometheus::IntCounterVec,
}

impl DiskReads {
    pub(super) fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let skipped = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "shadowcdn_edge_disk_reads_skipped_total",
                "Reads of objects the disk tier may hold answered as misses without it: reason \
                 stalled (the disk's watchdog saw a stall, so it was not read; per read) or \
                 timed_out (a load waited cache.disk_stall_secs; once per load, however many \
                 reads shared it)",
            ),
            &["reason"],
        )?;
        for s in Skip::ALL {
            skipped.with_label_values(&[s.label()]);
        }
        registry.register(Box::new(skipped.clone()))?;
        Ok(DiskReads {
            health: OnceLock::new(),
            loading: Arc::default(),
            next_load: AtomicU64::new(0),
            skipped,
        })
    }

    /// Bound reads by `health` from now on. Only the first call counts: the edge has one
    /// watchdog for its one cache directory.
    pub(super) fn watch(&self, health: DiskHealth) {
        let _ = self.health.set(health);
    }

    /// Whether the watchdog sees the disk stalled (never, until it is given one).
    pub(super) fn stalled(&self) -> bool {
        self.health.get().is_some_and(DiskHealth::stalled)
    }

    /// Read `hash` from `disk` for a reader that saw its key's purge slot at `epoch`
    /// (`FoyerStorage::read`), joining a load of it under way that began at the same epoch.
    /// A load that began before a write or removal of the slot is not joined: it may bring
    /// back what that write replaced, which a reader that came after it would keep.
    pub(super) async fn read(
        &self,
        disk: &DiskTier,
        hash: u128,
        epoch: u64,
    ) -> foyer::Result<Read> {
        if self.stalled() {
            if !disk.may_contains(&hash) {
                return Ok(Read::Absent);
            }
            self.count(Skip::Stalled);
            return Ok(Read::Skipped);
        }
        let limit = self.health.get().map(DiskHealth::stall_after);
        let joined = match self.loading.lock().get(&hash) {
            Some(l) if l.epoch == epoch => Some(l.loading.clone()),
            _ => None,
        };
        if let Some(loading) = joined {
            return loading.await;
        }
        // Spawned outside the map's lock (a task a stopped runtime drops at once would take
        // it on this thread); one that ended before its entry went in takes the entry out.
        let id = self.next_load.fetch_add(1, Ordering::Relaxed);
        let ended = Arc::new(AtomicBool::new(false));
        let loading = self.load(disk, hash, id, limit, ended.clone());
        let loading = {
            let mut under_way = self.loading.lock();
            match under_way.get(&hash) {
                // Another reader of the same epoch started one meanwhile: it is the one
                // shared (this one ends on its own, unread).
                Some(l) if l.epoch == epoch => l.loading.clone(),
                _ => {
                    let entry = LoadUnderWay {
                        id,
                        epoch,
                        loading: loading.clone(),
                    };
                    under_way.insert(hash, entry);
                    if ended.load(Ordering::SeqCst) {
                        under_way.remove(&hash);
                    }
                    loading
                }
            }
        };
        loading.await
    }

    /// One load of `hash`, run as a task of its own on foyer's runtime (as foyer runs its
    /// own reads) so that it ends, and leaves the map, even when every reader waiting for it
    /// gave up: a new read of the key then starts a load of its own rather than join one
    /// stuck on the disk.
    fn load(
        &self,
        disk: &DiskTier,
        hash: u128,
        id: u64,
        limit: Option<Duration>,
        ended: Arc<AtomicBool>,
    ) -> Loading {
        let leave = Leave {
            under_way: self.loading.clone(),
            hash,
            id,
            ended,
        };
        let (skipped, store) = (self.skipped.clone(), disk.clone());
        let task = disk.spawner().spawn(async move {
            // Leaves the map however the task ends (a panic, a runtime shutting down).
            let _leave = leave;
            let disk = store;
            let load = async {
                Ok(match disk.load(&hash).await? {
                    foyer::Load::Entry { value, .. } => Read::Held(value),
                    foyer::Load::Piece { piece, .. } => Read::Queued(piece.value().clone()),
                    foyer::Load::Throttled | foyer::Load::Miss => Read::Absent,
                })
            };
            let read = match limit {
                None => load.await,
                Some(limit) => tokio::time::timeout(limit, load).await.unwrap_or_else(|_| {
                    tracing::debug!(hash, "a read of the disk tier given up as a miss");
                    skipped.with_label_values(&[Skip::TimedOut.label()]).inc();
                    Ok(Read::Skipped)
                }),
            };
            read
        });
        // A load that did not end (a panic, a runtime shutting down) says nothing about the
        // stored entry, which an error would have dropped as unreadable: a miss.
        task.map(move |joined| {
            joined.unwrap_or_else(|e| {
                tracing::warn!(hash, error = %e, "a read of the disk tier did not end");
                Ok(Read::Skipped)
            })
        })
        .boxed()
        .shared()
    }

    fn count(&self, skip: Skip) {
        self.skipped.with_label_values(&[skip.label()]).inc();
    }

    /// The number of the load of `hash` under way, if one is.
    #[cfg(test)]
    pub(super) fn load_under_way(&self, hash: u128) -> Option<u64> {
        self.loading.lock().get(&hash).map(|l| l.id)
    }

    #[cfg(test)]
    pub(super) fn skipped(&self, reason: &str) -> u64 {
        self.skipped.with_label_values(&[reason]).get()
    }
}
