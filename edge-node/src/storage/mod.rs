//! pingora-cache storage on foyer's hybrid memory + disk cache.
//!
//! pingora-cache owns HTTP semantics (freshness, revalidation, Vary, ranges, locking); this
//! module only stores and returns `(CacheMeta, body)` pairs. Objects are keyed by the 128-bit
//! combined hash pingora computes from the primary key and variance. Bodies being filled live
//! in [`fill`] until complete, so concurrent readers can stream them; complete bodies go to
//! foyer, which writes them to disk on insertion so they survive a restart.

mod bans;
mod disk_health;
mod disk_io;
mod disk_reads;
mod disk_sync;
mod fill;
mod lineage;
mod lock;
mod object;
mod recent;
mod tombstone_log;
mod tombstones;
mod written;

pub use lock::FillLock;

use std::any::Any;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use foyer::{
    BlockEngineConfig, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy, HybridCacheProperties, Location, RecoverMode, Spawner,
};
use http::HeaderMap;
use parking_lot::Mutex;
use pingora_cache::key::{CacheHashKey, CacheKey, CompactCacheKey};
use pingora_cache::predictor::{CacheablePredictor, Predictor};
use pingora_cache::storage::{
    HandleMiss, HitHandler, MissFinishType, MissHandler, PurgeOutcome, PurgeTarget, PurgeType,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheEntryKey, CacheMeta, NoCacheReason, Storage};

use crate::drain::InflightCounter;
use pingora_error::{Error, ErrorType, Result};

pub(crate) use bans::off_runtime;
pub use bans::{BanError, BanList, OwnerChange, RefreshRecord, Unwritten};
pub use disk_health::{DiskHealth, DiskVerdict, ProbeMetrics, PROBE_FILE};
use disk_io::DiskErrors;
pub use disk_io::{layer as disk_errors_layer, FlusherErrors};
use disk_reads::{DiskReads, Read};
use disk_sync::DiskSync;
use fill::{CompleteHit, Fill, FillState, PartialHit};
pub use object::{ObjectMeta, StoredObject};
use recent::RecentPurges;
use tombstones::Tombstones;

/// A key purge neither the disk tier (its tombstone) nor the ban log (a key ban) made durable.
#[derive(Debug, thiserror::Error)]
#[error(
    "purge of {key}: its tombstone is not known to be on disk ({wait}), and a key ban could \
     not stand in for it ({ban}); purge again"
)]
pub struct NotDurable {
    /// The purged key.
    pub key: String,
    /// Why the disk tier's tombstone was not trusted.
    pub wait: Wait,
    /// Why the key ban was not recorded.
    pub ban: BanError,
}

/// The disk tier's failed writes when a purge began ([`FoyerStorage::purge_baseline`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskBaseline(u64);

/// What a key purge's wait for the disk tier showed of its tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Wait {
    /// Written: a wait that started after it completed, then a sync of foyer's tombstone log
    /// ([`disk_sync`]), and no disk write (or sync) failed meanwhile.
    #[error("written")]
    Written,
    /// Not written yet: the wait or the sync ran out (a long fill backlog, a slow device). A
    /// later wait may show it written, and retire the key ban standing in for it.
    #[error("not written after {SETTLE_TIMEOUT:?}")]
    Late,
    /// Never to be known written: the cache is closing (foyer drops removals), or a disk
    /// write or sync failed while the purge waited (foyer ends its waits all the same). Its
    /// key ban stays until the ban retention.
    #[error("the cache is closing, or a disk write or sync failed while it waited")]
    Lost,
}

/// Why the cache could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The cache directory could not be created.
    #[error("cache dir {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// foyer failed to open or recover the disk tier.
    #[error("opening the foyer cache: {0}")]
    Foyer(#[from] foyer::Error),
    /// The ban log could not be opened.
    #[error(transparent)]
    Bans(#[from] BanError),
    /// The storage's metrics could not be registered.
    #[error("storage metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Sizes and location of the cache; see [`crate::config::CacheSection`].
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Disk tier directory.
    pub dir: PathBuf,
    /// Memory tier capacity in bytes.
    pub memory_bytes: usize,
    /// Memory tier shards.
    pub memory_shards: usize,
    /// Disk tier capacity in bytes.
    pub disk_bytes: usize,
    /// foyer block size; bounds the largest storable object.
    pub block_size: usize,
    /// Largest body admitted.
    pub max_object_bytes: usize,
    /// Bytes all fills together may keep for the cache; a fill whose next chunk would pass it
    /// passes through uncached, and fills passing through then hold a small window each.
    pub max_fill_bytes: usize,
    /// How long prefix bans are kept.
    pub ban_retention: Duration,
}

/// Why an answer that would be cacheable is not cached this once: it overlapped a purge.
pub const PURGED_DURING_FETCH: &str = "purged during fetch";
/// Why a peer edge's error answer (it lacks the object) is not cached.
pub const PEER_LACKS_OBJECT: &str = "peer lacks the object";
/// Why a server error that answered the revalidation of a stored copy does not replace it.
pub const ERROR_ON_REVALIDATION: &str = "server error on revalidation";

/// Why a server error on a miss, without a lifetime of its own, is not cached.
pub const ORIGIN_SERVER_ERROR: &str = "origin server error";

/// Why a redirect that may point at its own cache key is not cached: it answers a request
/// whose query lost ignored parameters on the way to its key (many sites redirect to strip
/// tracking parameters), or its `Location` keys the same (`http` to `https`). Stored, it
/// would answer the very URL it points to, a loop; the key's next answer may well be
/// cacheable.
pub const REDIRECT_TO_ITS_OWN_KEY: &str = "redirect to its own key";

/// Why a 206 answering a fill (which asks for the whole object) is not cached: the origin
/// sent a part nobody asked for; its next answer may well be whole.
pub const UNASKED_PART: &str = "part of the object not asked for";

/// Why an answer to a request with credentials (`Authorization` or a `Cookie`) is not cached
/// (its response did not allow it): a property of that request, not of the key.
pub const CREDENTIALED_REQUEST: &str = "request with credentials";

/// Why the answer to a request whose own `Cache-Control` says `no-store` is not cached: a
/// property of that request, not of the key.
pub const CLIENT_NO_STORE: &str = "request no-store";

/// Reasons that say nothing about the key's next answer, so pingora's predictor must not
/// remember the key as uncacheable (which would send its next requests past the cache and
/// its lock).
fn transient_no_cache(reason: &'static str) -> bool {
    refetch_together(reason)
        || [
            ERROR_ON_REVALIDATION,
            ORIGIN_SERVER_ERROR,
            REDIRECT_TO_ITS_OWN_KEY,
            CREDENTIALED_REQUEST,
            CLIENT_NO_STORE,
            UNASKED_PART,
        ]
        .contains(&reason)
}

/// Transient refusals after which the requests waiting on the fill's lock elect one of them to
/// fetch again: the next answer is likely cacheable and serves them all. After a server error
/// they go to the origin on their own instead, as after any uncacheable answer: while the origin
/// stays down, queueing them behind one failure after another would only add latency.
fn refetch_together(reason: &'static str) -> bool {
    [PURGED_DURING_FETCH, PEER_LACKS_OBJECT].contains(&reason)
}

/// foyer's disk engine as the storage configures it ([`FoyerStorage::open_with`]).
type DiskEngine = BlockEngineConfig<u128, StoredObject, HybridCacheProperties>;

/// The foyer-backed pingora-cache [`Storage`].
pub struct FoyerStorage {
    cache: HybridCache<u128, StoredObject>,
    fills: Mutex<HashMap<u128, Vec<Arc<Fill>>>>,
    /// Removals and writes counted per slot of [`PURGE_SLOTS`] (by key hash). Writes that
    /// read before they store (a 304's metadata update, an expiry) and fill commits store
    /// under this lock and only if nothing in their slot changed in between, so a purge
    /// answered 200 is never undone by them, nor a newer version committed meanwhile replaced
    /// by the older body they read; changes to other keys of the slot (another fill, a wasted
    /// shadow dropped) cost a revalidation its update, which the next request repeats, rarely
    /// with this many slots. A disk read keeps what it read in memory on the same condition.
    purges: Mutex<[u64; PURGE_SLOTS]>,
    /// Key purges of the last minutes, for fetches that overlapped one (`purged_during`).
    recent: RecentPurges,
    /// Disk writes that may be in flight ([`written`]): a removal sends them a tombstone.
    written: Mutex<written::RecentWrites>,
    /// Whether every key purge's tombstone is known to be on disk ([`Self::settle_purge`]).
    tombstones: Tombstones,
    /// Set when the cache starts closing: foyer drops removals from then on, and a wait for
    /// the disk tier returns at once, so a key purge is made durable by a key ban instead.
    closing: AtomicBool,
    next_fill: AtomicU64,
    /// Shared with the blocking tasks that write key bans ([`Self::settle_purge`]).
    bans: Arc<BanList>,
    /// Key purges made durable by a key ban: their tombstones were late.
    key_bans: prometheus::IntCounter,
    /// Failed disk tier writes: a wait during which one failed proves no tombstone written.
    disk_errors: Arc<DiskErrors>,
    /// The failed writes [`Self::observe_failures`] has seen.
    failures_seen: Mutex<u64>,
    /// Syncs the disk tier's writes to the device before a tombstone counts as written.
    disk_sync: DiskSync,
    /// Every read of the cache, which a stalled disk does not hold up once watched.
    reads: DiskReads,
    /// Keys of purges whose tombstones may be lost and whose key bans could not be written,
    /// with when they were purged: banned at the next purge of any key, or compaction.
    unbanned: Mutex<HashMap<String, SystemTime>>,
    /// Key bans of purges being written now.
    bans_writing: AtomicUsize,
    /// Purges still making themselves durable after their answer
    /// ([`crate::invalidate::purge_answered`]).
    purges_under_way: InflightCounter,
    max_object_bytes: usize,
    /// Keys pingora-cache should not try to cache for a while; the storage marks the ones
    /// whose bodies outgrew `max_object_bytes` as they streamed.
    predictor: Predictor<32>,
    /// Bytes held by in-flight fills, bounded by `max_fill_bytes`.
    fill_bytes: Arc<AtomicUsize>,
    max_fill_bytes: usize,
    /// Fills passed through, by [`PassReason`].
    passthroughs: prometheus::IntCounterVec,
    /// Readers cut off for falling too far behind a fill passing through.
    cut_readers: prometheus::IntCounter,
    /// The id of the content it started with ([`lineage::content_id`]).
    content_id: u64,
}

/// Why a fill stopped keeping its body for the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PassReason {
    /// The body outgrew `max_object_bytes`.
    TooLarge,
    /// All fills together hold `max_fill_bytes`.
    FillMemory,
    /// A purge cancelled the fill, or a newer one replaced it: nothing of it will be
    /// stored, so its body is no longer kept whole for the commit.
    Cancelled,
}

impl PassReason {
    /// Every reason, each a label of the pass-through counter from the start.
    const ALL: [PassReason; 3] = [
        PassReason::TooLarge,
        PassReason::FillMemory,
        PassReason::Cancelled,
    ];

    fn label(self) -> &'static str {
        match self {
            PassReason::TooLarge => "too_large",
            PassReason::FillMemory => "fill_memory",
            PassReason::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Debug for FoyerStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FoyerStorage")
            .field("memory_usage", &self.cache.memory().usage())
            .finish_non_exhaustive()
    }
}

fn hash_of(bin: [u8; 16]) -> u128 {
    u128::from_be_bytes(bin)
}

/// Slots of the purge epochs: enough that the fills committing every second rarely share a
/// slot with a revalidation's read, which then stores nothing (32 KiB).
const PURGE_SLOTS: usize = 4096;
/// How long key purges are remembered for fetches under way: longer than an origin takes to
/// answer (the edge's connect and read timeouts, a cache-lock wait); an answer that took
/// longer is not cached.
const RECENT_PURGE_WINDOW: Duration = Duration::from_secs(300);
/// Longest a key purge waits for the disk tier to write its tombstone before a key ban stands
/// in for it: with the ban's fsync, within the broker's 3 s fan-out, so a purge behind a long
/// flush backlog is answered in time rather than queued as missed.
const SETTLE_TIMEOUT: Duration = Duration::from_millis(1500);
/// foyer's directory, in the cache directory.
const FOYER_DIR: &str = "foyer";
/// Longest the ban compaction waits for late tombstones, so that it can retire their key bans.
const COMPACTION_WAIT: Duration = Duration::from_secs(30);
/// Key purges remembered at most (about 50 bytes each). Past it, a fetch that started before
/// the oldest one dropped is not cached, whatever its key.
const RECENT_PURGE_CAP: usize = 100_000;

/// Note that the purge of `key` at `at` still needs a key ban: the ban that covers it must be
/// at least as late as the latest such purge.
fn unbanned_since(unbanned: &mut HashMap<String, SystemTime>, key: &str, at: SystemTime) {
    let since = unbanned.entry(key.to_string()).or_insert(at);
    *since = (*since).max(at);
}

/// The storage hash of `primary_key`'s primary slot (the tombstone of all its variants).
fn primary_hash(primary_key: &str) -> u128 {
    hash_of(CacheKey::new(primary_key, "").primary_bin())
}

fn purge_slot(hash: u128) -> usize {
    (hash % PURGE_SLOTS as u128) as usize
}

impl FoyerStorage {
    /// Open the cache, recovering the disk tier from `opts.dir`.
    ///
    /// foyer's background tasks run on `spawner`, which must outlive the storage; the edge
    /// gives it a runtime of its own so they are independent of pingora's service runtimes.
    pub async fn open(
        opts: &StorageOptions,
        spawner: Spawner,
        registry: &prometheus::Registry,
    ) -> Result<Self, StorageError> {
        Self::open_with(opts, spawner, registry, disk_io::process(), |e| e).await
    }

    /// [`Self::open`] checking the failed disk writes `disk_errors` counts (tests count their
    /// own).
    async fn open_with(
        opts: &StorageOptions,
        spawner: Spawner,
        registry: &prometheus::Registry,
        disk_errors: Arc<DiskErrors>,
        engine: impl FnOnce(DiskEngine) -> DiskEngine,
    ) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&opts.dir).map_err(|source| StorageError::Dir {
            path: opts.dir.clone(),
            source,
        })?;
        registry.register(Box::new(disk_errors.counter()))?;
        let mixtrics_registry: mixtrics::metrics::BoxedRegistry = Box::new(
            mixtrics::registry::prometheus::PrometheusMetricsRegistry::new(registry.clone()),
        );
        let storage = HybridCacheBuilder::new()
            .with_name("shadowcdn_edge")
            .with_metrics_registry(mixtrics_registry)
            // Objects go to disk as soon as they are stored, so a crash or restart keeps them.
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            .with_flush_on_close(true)
            .memory(opts.memory_bytes)
            .with_shards(opts.memory_shards)
            .with_weighter(|_k: &u128, v: &StoredObject| v.weight())
            .storage()
            .with_spawner(spawner)
            // Updates and purges must not resurrect old versions after a restart.
            .with_recover_mode(RecoverMode::Quiet);
        // A disk capacity of zero makes a memory-only cache (small caches in benchmarks).
        let foyer_dir = (opts.disk_bytes > 0).then(|| opts.dir.join(FOYER_DIR));
        // Before foyer creates its directory or lays out its blocks: a start that fails
        // after a wipe must not leave the old id to the next one.
        let content_id = lineage::content_id(
            foyer_dir.as_deref(),
            opts.disk_bytes as u64,
            opts.block_size as u64,
        );
        let storage = if let Some(foyer_dir) = &foyer_dir {
            let device = FsDeviceBuilder::new(foyer_dir)
                .with_capacity(opts.disk_bytes)
                .build()?;
            // foyer writes entries through a flush buffer and drops (silently, counting
            // `storage_queue_buffer_overflow`) any entry that does not fit what is left of it
            // while the previous buffer is being written; 16 MiB by default, which no object
            // over 16 MiB ever fit. So it holds the largest admitted object plus foyer's
            // default 16 MiB for the small ones queued with it. Two such buffers are
            // allocated; their pages are touched only as they fill.
            let buffer = opts.block_size.next_multiple_of(4096) + (16 << 20);
            storage.with_engine_config(engine(
                BlockEngineConfig::new(device)
                    .with_block_size(opts.block_size)
                    .with_buffer_pool_size(buffer)
                    .with_submit_queue_size_threshold(2 * buffer)
                    .with_tombstone_log(true),
            ))
        } else {
            storage
        };
        if let Some(foyer_dir) = &foyer_dir {
            let log = foyer_dir.join(tombstone_log::FILE);
            match tombstone_log::normalize(&log, opts.disk_bytes) {
                Ok(Some(held)) => tracing::info!(
                    tombstones = held,
                    "foyer's tombstone log laid out for its recovery to resume after the newest"
                ),
                Ok(None) => {}
                Err(source) => return Err(StorageError::Dir { path: log, source }),
            }
        }
        let cache = storage.build().await?;
        let bans = Arc::new(BanList::open(&opts.dir, opts.ban_retention)?);
        let passthroughs = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "shadowcdn_edge_fill_passthrough_total",
                "Fills streamed to their clients uncached: reason too_large (no Content-Length, \
                 outgrew cache.max_object_size), fill_memory (cache.max_fill_memory in use) or \
                 cancelled (purged, or replaced by a newer fill, while streaming)",
            ),
            &["reason"],
        )?;
        for r in PassReason::ALL {
            passthroughs.with_label_values(&[r.label()]);
        }
        let cut_readers = prometheus::IntCounter::new(
            "shadowcdn_edge_fill_readers_cut_total",
            "Clients cut off for falling too far behind a body passing through uncached",
        )?;
        let key_bans = prometheus::IntCounter::new(
            "shadowcdn_edge_purge_key_bans_total",
            "Key purges made durable by a key ban because the disk tier had not written their \
             tombstones in time (a long fill backlog)",
        )?;
        registry.register(Box::new(key_bans.clone()))?;
        registry.register(Box::new(cut_readers.clone()))?;
        let disk_sync = DiskSync::open(foyer_dir.as_deref(), disk_errors.clone(), registry)?;
        let reads = DiskReads::new(registry)?;
        registry.register(Box::new(passthroughs.clone()))?;
        Ok(FoyerStorage {
            cache,
            fills: Mutex::new(HashMap::new()),
            purges: Mutex::new([0; PURGE_SLOTS]),
            recent: RecentPurges::new(RECENT_PURGE_WINDOW, RECENT_PURGE_CAP),
            written: Mutex::default(),
            tombstones: Tombstones::default(),
            closing: AtomicBool::new(false),
            next_fill: AtomicU64::new(1),
            bans,
            key_bans,
            failures_seen: Mutex::new(disk_errors.count()),
            disk_errors,
            disk_sync,
            reads,
            unbanned: Mutex::default(),
            bans_writing: AtomicUsize::new(0),
            purges_under_way: InflightCounter::default(),
            max_object_bytes: opts.max_object_bytes,
            predictor: Predictor::new(128, Some(transient_no_cache)),
            fill_bytes: Arc::default(),
            max_fill_bytes: opts.max_fill_bytes,
            passthroughs,
            cut_readers,
            content_id,
        })
    }

    /// The id of the content this cache started with: the same across restarts that recover
    /// the disk tier, new when the cache started empty
    /// ([`crate::sync::protocol::StatsReport::cache_id`]).
    pub fn content_id(&self) -> u64 {
        self.content_id
    }

    /// Read the disk tier only while `health` sees it answer, and give up a read after its
    /// `cache.disk_stall_secs` ([`disk_reads`]).
    pub fn watch_disk(&self, health: DiskHealth) {
        self.reads.watch(health);
    }

    /// Hold every write of the ban log while the returned guard lives, as a hung fsync does.
    #[cfg(test)]
    pub(crate) fn hold_ban_writes(&self) -> impl Sized + '_ {
        self.bans.hold_writes()
    }

    /// The refreshes whose records were ended ([`BanList::ended_refreshes`]).
    #[cfg(test)]
    pub(crate) fn ended_refreshes(&self) -> Vec<u64> {
        self.bans.ended_refreshes()
    }

    /// Whether the disk's watchdog ([`Self::watch_disk`]) sees it stalled now: a write that
    /// must reach it (a ban's fsync) waits as long as the stall lasts.
    pub fn disk_stalled(&self) -> bool {
        self.reads.stalled()
    }

    /// Purges past their in-memory part and not yet durable, which
    /// [`crate::invalidate::purge_answered`] counts and bounds on a stalled disk.
    pub fn purges_under_way(&self) -> &InflightCounter {
        &self.purges_under_way
    }

    /// Largest body the cache stores.
    pub fn max_object_bytes(&self) -> usize {
        self.max_object_bytes
    }

    /// Bytes held by in-flight fills.
    pub fn fill_bytes(&self) -> usize {
        self.fill_bytes.load(Ordering::Relaxed)
    }

    /// The cacheability predictor to give pingora-cache with this storage.
    pub fn predictor(&'static self) -> &'static Predictor<32> {
        &self.predictor
    }

    /// Flush and close foyer; called on graceful shutdown. Key purges still answered meanwhile
    /// (the admin listener serves until the process ends) are made durable by key bans.
    /// Every tombstone submitted before the close is written by it, so the key bans standing
    /// in for late ones are retired then (their keys first dropped from memory, which the
    /// close writes out; a safeguard, as a disk read under way at their purge keeps nothing in
    /// memory, [`Self::read`]).
    pub async fn close(&self) -> Result<(), StorageError> {
        self.closing.store(true, Ordering::Release);
        let before = self.observe_failures();
        let (mark, ended) = (self.tombstones.mark(), self.bans.ended_refreshes());
        for key in self.bans.written_keys(u64::MAX) {
            self.cache.memory().remove(&primary_hash(&key));
        }
        self.cache.close().await?;
        let synced = self.disk_sync.everything().await.is_ok();
        if synced && self.observe_failures() == before {
            self.tombstones.written(mark);
            self.bans.refreshes_written(&ended);
        }
        if let Err(e) = self.retire_key_bans().await {
            tracing::warn!(error = %e, "ban log compaction at close");
        }
        Ok(())
    }

    /// Make a purge of `primary_key` final: wait until the disk tier has written what was
    /// submitted to it so far, the purge's tombstone included (so the purge survives a crash
    /// of the edge), then drop the key from memory again. Until that write, a lookup could
    /// still read the object from foyer's write queue or a disk read already under way, and
    /// put it back in memory. One wait settles several keys purged together (a URL's two key
    /// forms), so their answer comes within one wait, not one per key.
    ///
    /// A wait that runs out (a long fill backlog) leaves the purge holding in memory but not
    /// across a crash, so a key ban stands in for the tombstone ([`BanList::add_keys`]); only
    /// when that cannot be written either is the purge an error, to be asked again. Answering
    /// it failed would have the broker hold the whole edge out of routing over one slow disk
    /// write. Every key purge waits until a completed wait covers the late tombstones
    /// ([`Self::tombstones_owed`]).
    ///
    /// foyer ends a wait whether the writes before it succeeded or failed ([`disk_io`]), so a
    /// wait proves the tombstone written only if no disk write failed since `before` — read
    /// ([`Self::purge_baseline`]) before the purge removed anything; otherwise the purge is
    /// made durable by a key ban that no wait retires.
    pub async fn settle_purge(
        &self,
        primary_keys: &[&str],
        before: DiskBaseline,
    ) -> Result<(), NotDurable> {
        let (mark, at) = (self.tombstones.mark(), SystemTime::now());
        // The wait covers every flusher's backlog, then a sync puts the tombstone log on the
        // device (a failed sync counts as a failed write); under a heavy fill load the answer
        // must not outlast the caller's deadline (the purge itself already holds in memory).
        // A closing cache drops the removal: nothing to wait for.
        let written = async {
            self.cache.storage().wait().await;
            self.disk_sync.tombstones().await
        };
        let synced = if self.closing() {
            None
        } else {
            tokio::time::timeout(SETTLE_TIMEOUT, written).await.ok()
        };
        // Read after the wait: a failed write is counted before foyer tells its waiters.
        let failures = self.observe_failures();
        let failed = failures != before.0 || matches!(synced, Some(Err(_)));
        let wait = if failed || self.closing() {
            Wait::Lost
        } else if synced.is_some() {
            Wait::Written
        } else {
            Wait::Late
        };
        self.settled(primary_keys, (mark, at), (wait, failures))
            .await
    }

    /// What a purge reads before it removes anything, for [`Self::settle_purge`]: the disk
    /// tier's failed writes so far.
    pub fn purge_baseline(&self) -> DiskBaseline {
        DiskBaseline(self.disk_errors.count())
    }

    /// The disk tier's failed writes so far. When some are new since the last call, every
    /// key ban standing in for a late tombstone is kept until the retention first
    /// ([`BanList::keep_for_retention`]): the failures may have been those tombstones. Every wait
    /// calls this when it ends, before it counts any tombstone written, so no key ban is
    /// retired on the strength of a wait that a failure made worthless.
    fn observe_failures(&self) -> u64 {
        let mut seen = self.failures_seen.lock();
        let now = self.disk_errors.count();
        if now > *seen {
            self.bans.keep_for_retention();
            tracing::error!(
                failed = now - *seen,
                "disk tier writes failed: the key purges they may have lost are made durable \
                 by key bans kept until the ban retention"
            );
            *seen = now;
        }
        now
    }

    /// Whether the cache is closing ([`Self::close`]): a key purge must settle (and will be
    /// made durable by a key ban) even when it found nothing, since a closing foyer may no
    /// longer tell what its disk tier holds.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The end of [`Self::settle_purge`]: its wait, started at `mark` (wall time `at`: what a
    /// key ban covers is stored before it), completed or not.
    async fn settled(
        &self,
        primary_keys: &[&str],
        (mark, at): (u64, SystemTime),
        (wait, failures): (Wait, u64),
    ) -> Result<(), NotDurable> {
        for key in primary_keys {
            self.cache.memory().remove(&primary_hash(key));
        }
        if wait == Wait::Written {
            self.tombstones.written(mark);
        }
        // A key whose earlier purge was lost and not banned is banned now, whatever this wait
        // says: this may be that purge asked again, and its tombstone will never be written.
        let bans: Vec<(String, Option<u64>)> = {
            let mut unbanned = self.unbanned.lock();
            let bans: Vec<(String, Option<u64>)> = primary_keys
                .iter()
                .filter_map(|key| {
                    let mark = match wait {
                        _ if unbanned.contains_key(*key) => None,
                        Wait::Written => return None,
                        Wait::Late => Some(mark),
                        // A lost tombstone is never written: no wait retires its ban.
                        Wait::Lost => None,
                    };
                    Some((key.to_string(), mark))
                })
                .collect();
            // Listed before the ban is written: a purge of the same key meanwhile (it is no
            // longer held) must settle and ban it too, not be answered at once.
            for (key, _) in bans.iter().filter(|(_, m)| m.is_none()) {
                unbanned_since(&mut unbanned, key, at);
            }
            if !bans.is_empty() {
                // Counted under the same lock: while it is written, every key purge settles
                // (a late one's tombstone may fail meanwhile, and its resend find nothing).
                self.bans_writing.fetch_add(1, Ordering::AcqRel);
            }
            bans
        };
        if bans.is_empty() {
            return Ok(());
        }
        // A failure since the wait was judged: the marks of late tombstones go.
        let banned = self.write_key_bans(&bans, at, Some(failures)).await;
        let mut unbanned = self.unbanned.lock();
        self.bans_writing.fetch_sub(1, Ordering::AcqRel);
        match banned {
            Ok(()) => {
                self.key_bans.inc();
                Ok(())
            }
            Err(ban) => {
                // Until a key ban covers them, every key purge settles (it may be one of
                // these asked again), and the compaction tries their bans again.
                for (key, _) in &bans {
                    unbanned_since(&mut unbanned, key, at);
                }
                Err(NotDurable {
                    key: primary_keys.join(" "),
                    wait,
                    ban,
                })
            }
        }
    }

    /// Whether a key purge's tombstone is not yet known to be on disk (no wait that started
    /// after it has completed): then a purge of a key no longer held must settle too — it may
    /// be the resend of one that ran out, or a second purge of a key whose first still waits.
    ///
    /// So must every key purge while a purge whose tombstone may be lost has no key ban (its
    /// ban could not be written): the purge being asked again may be that one.
    pub fn tombstones_owed(&self) -> bool {
        self.tombstones.owed()
            || !self.unbanned.lock().is_empty()
            || self.bans_writing.load(Ordering::Acquire) > 0
    }

    /// Bytes held by the memory tier.
    pub fn memory_usage(&self) -> usize {
        self.cache.memory().usage()
    }

    /// Remove every variant of `primary_key` (pingora treats the primary slot as the tombstone
    /// of all variants). Returns whether an object was present.
    pub fn purge_key(&self, primary_key: &str) -> bool {
        self.remove(primary_hash(primary_key))
    }

    /// A purge ordered by an operator, a provider or the broker: [`Self::purge_key`], and a
    /// fetch of the key already under way will not cache its answer (`purged_during`).
    pub fn invalidate_key(&self, primary_key: &str) -> bool {
        let hash = primary_hash(primary_key);
        // Asked before the purge is noted: from then on a concurrent lookup drops the object
        // itself (`purged_after`), and the purge must still count it as found and settle.
        let held = self.cache.contains(&hash);
        // Noted before the removal: a fill that appears after the removal comes from a fetch
        // that either started after the purge or is refused by `purged_during`.
        self.recent.record(hash, Instant::now());
        let removed = self.remove(hash);
        // Only a purge that removed something has a tombstone to wait for; one of a key not
        // held answers at once unless another purge's tombstone is still owed.
        if removed || held {
            self.tombstones.submit();
        }
        removed || held
    }

    /// Whether a fetch of `primary_key` that started at `started` (`started_wall` on the wall
    /// clock) and answered with `headers` overlapped a key purge or a prefix, tag or key ban
    /// covering it: its answer predates the purge and must not be cached.
    pub fn purged_during(
        &self,
        primary_key: &str,
        started: Instant,
        started_wall: SystemTime,
        headers: &HeaderMap,
    ) -> bool {
        let hash = primary_hash(primary_key);
        self.recent.purged_since(hash, started)
            || self.bans.is_banned(primary_key, started_wall, headers)
    }

    /// Whether a copy another edge admitted at `admitted` predates a purge this edge applied:
    /// a key purge since then (within the recent-purge window, as for a local copy read back)
    /// or a prefix, tag or key ban or host floor covering it (`headers` are the copy's). That edge
    /// may not have applied the purge yet.
    pub fn purged_since_admitted(
        &self,
        primary_key: &str,
        admitted: SystemTime,
        headers: &HeaderMap,
    ) -> bool {
        // A copy admitted before the window may predate a purge no longer remembered: held
        // against its key's slot instead (a peer held out of routing for missed purges still
        // answers a fetch).
        self.bans.is_banned(primary_key, admitted, headers)
            || self.recent.may_cover(admitted, primary_hash(primary_key))
    }

    /// Whether an object of `primary_key` stored at `created` is covered by a ban (prefix,
    /// tag, key, host floor) or a key purge still remembered since; `hash` gives the key's primary
    /// hash, computed only when a key purge must be looked up.
    fn purged_since(
        &self,
        primary_key: &str,
        hash: impl FnOnce() -> u128,
        created: SystemTime,
        headers: &HeaderMap,
    ) -> bool {
        self.bans.is_banned(primary_key, created, headers)
            || self.recent.purged_after(created, hash)
    }

    /// Whether the object stored under `primary_key` varies: its primary slot holds one of
    /// several possible variants, so refreshing one leaves the others as they were. `false`
    /// when nothing is stored, `true` when the disk was not read (a stall): not known.
    pub async fn varies(&self, primary_key: &str) -> bool {
        match self.read(primary_hash(primary_key)).await {
            Read::Held(obj) | Read::Queued(obj) => obj.meta().is_ok_and(|m| m.variance().is_some()),
            Read::Absent => false,
            // Not known: replacing every variant is right whether it varies or not.
            Read::Skipped => true,
        }
    }

    /// Whether the cache (memory or disk) holds an object under `primary_key`.
    pub fn holds(&self, primary_key: &str) -> bool {
        self.cache.contains(&primary_hash(primary_key))
    }

    /// When the copy held under `primary_key` was stored or last revalidated (`None` when
    /// none is held): whether a refresh replaced it.
    pub async fn stored_at(&self, primary_key: &str) -> Option<SystemTime> {
        let held = self.load(primary_hash(primary_key)).await.ok()??;
        Some(held.meta().ok()?.updated())
    }

    /// Whether the cache holds an object under `primary_key` or a fill for it is under way.
    pub fn holds_or_fills(&self, primary_key: &str) -> bool {
        let hash = primary_hash(primary_key);
        self.cache.contains(&hash) || self.any_fill(hash).is_some()
    }

    /// Remove an object and cancel its fills; whether anything was there. The disk gets a
    /// tombstone only when it may hold the object ([`written`]): foyer's tombstones live in
    /// a ring that tombstones of keys never held would wrap.
    fn remove(&self, hash: u128) -> bool {
        let mut epochs = self.purges.lock();
        epochs[purge_slot(hash)] += 1;
        let had_fill = self.cancel_fills(hash);
        let in_memory = self.cache.memory().contains(&hash);
        let indexed = self.cache.storage().may_contains(&hash);
        // Held in memory, the object may be on disk too (a write foyer dropped leaves an
        // older copy indexed only until a refresh's delete, whose tombstone the ring may have
        // dropped since): such a removal writes its own tombstone, as before.
        if in_memory || indexed || self.written.lock().may_be_writing(hash, Instant::now()) {
            self.cache.remove(&hash);
        }
        in_memory || indexed || had_fill
    }

    /// Store `body` under `hash` with new metadata (revalidation, expiry), unless a removal
    /// happened since purge epoch `since` (then `false`).
    fn store_unless_purged(
        &self,
        since: u64,
        hash: u128,
        meta: &CacheMeta,
        body: Bytes,
    ) -> Result<bool> {
        self.write_unless_purged(since, hash, meta, body, Tier::Both)
    }

    /// [`Self::store_unless_purged`] into `tier`. A revalidation whose headers only extend
    /// the stored ones goes to memory only: the body did not change, and writing it to disk
    /// again (every 304 of an object revalidated on each request would rewrite it whole) is
    /// left out. The disk keeps the same body under its earlier headers, which a 304 just
    /// confirmed; read back (after the memory tier dropped it, or a restart), it is
    /// revalidated again once those headers say it is stale.
    fn write_unless_purged(
        &self,
        since: u64,
        hash: u128,
        meta: &CacheMeta,
        body: Bytes,
        tier: Tier,
    ) -> Result<bool> {
        let mut obj = StoredObject::new(ObjectMeta::of(meta)?, body);
        let mut epochs = self.purges.lock();
        if epochs[purge_slot(hash)] != since {
            return Ok(false);
        }
        // A disk read under way keeps nothing in memory over this ([`Self::read`]).
        epochs[purge_slot(hash)] += 1;
        match tier {
            Tier::Both => self.replace(hash, obj),
            Tier::Memory { disk_stale_until } => {
                obj.disk_stale_until = Some(disk_stale_until);
                let memory = HybridCacheProperties::default().with_location(Location::InMem);
                self.cache.insert_with_properties(hash, obj, memory);
            }
        }
        Ok(true)
    }

    /// Store `obj` under `hash` in place of any older version. foyer drops a disk write
    /// when its queues are full and leaves the disk's older version indexed: once the new
    /// one left memory (or after a restart) the old would come back, fresh by its own
    /// headers, after a refresh meant to replace it. Deleting that copy first turns a
    /// dropped write into a miss.
    fn replace(&self, hash: u128, obj: StoredObject) {
        let disk = self.cache.storage();
        if disk.may_contains(&hash) {
            disk.delete(&hash);
        }
        self.written.lock().note(hash, Instant::now());
        self.cache.insert(hash, obj);
    }

    fn purge_epoch(&self, hash: u128) -> u64 {
        self.purges.lock()[purge_slot(hash)]
    }

    /// Ban every object whose primary key starts with `prefix`: in force at once, durable once
    /// [`Self::write_bans`] has written it.
    pub fn purge_prefix(&self, prefix: &str) -> Unwritten {
        // Fills in flight under the prefix carry a creation time older than the ban, so their
        // objects are dropped at their first lookup after commit.
        self.bans.ban(prefix)
    }

    /// Ban every object of host scope `scope` (`host/`) whose response carries one of `tags`
    /// (checked by [`crate::tags::check`]): in force at once, durable once
    /// [`Self::write_bans`] has written it. As with a prefix, a fill in flight is dropped at
    /// its first lookup after commit.
    pub fn purge_tags(&self, scope: &str, tags: &[String]) -> Unwritten {
        self.bans.ban_tags(scope, tags)
    }

    /// Record the bans of [`Self::purge_prefix`] or [`Self::purge_tags`] on disk, with one
    /// fsync: call it off the async runtime ([`off_runtime`]), since a stalled disk holds it.
    pub fn write_bans(&self, bans: Unwritten) -> Result<(), BanError> {
        self.bans.write(bans)
    }

    /// The registration time last applied to host scope `scope` (see [`crate::ownership`]).
    pub fn host_owner(&self, scope: &str) -> Option<u64> {
        self.bans.owner(scope)
    }

    /// Raise host floors for registrations, durably (one fsync for all of them).
    pub fn apply_owner_changes(&self, changes: &[OwnerChange]) -> Result<(), BanError> {
        self.bans.apply_owner_changes(changes)
    }

    /// Drop expired bans, the key bans whose tombstones are written since, and the records of
    /// refreshes that ended (run periodically). A late tombstone still owed, or an ended
    /// refresh's writes, are waited for first, so a key ban or record does not outlive its
    /// need for want of a later key purge.
    pub async fn compact_bans(&self) -> Result<(), BanError> {
        // Failures first: a refresh whose writes may have failed is kept, not taken as ended.
        let before = self.observe_failures();
        let ended = self.bans.ended_refreshes();
        self.ban_unbanned().await?;
        if (self.tombstones.owed() || !ended.is_empty()) && !self.closing() {
            let mark = self.tombstones.mark();
            let written = async {
                self.cache.storage().wait().await;
                self.disk_sync.everything().await.is_ok()
            };
            let completed = tokio::time::timeout(COMPACTION_WAIT, written)
                .await
                .unwrap_or(false);
            if completed && self.observe_failures() == before && !self.closing() {
                self.tombstones.written(mark);
                self.bans.refreshes_written(&ended);
            }
        }
        self.retire_key_bans().await
    }

    /// Ban the keys of the lost purges whose key bans could not be written (see
    /// [`Self::settled`]), as of now: a copy stored since is a miss, never a purged one served.
    async fn ban_unbanned(&self) -> Result<(), BanError> {
        let bans: Vec<(String, Option<u64>)> = (self.unbanned.lock().keys())
            .map(|k| (k.clone(), None))
            .collect();
        if bans.is_empty() {
            return Ok(());
        }
        self.write_key_bans(&bans, SystemTime::now(), None).await
    }

    /// Write key bans at `at` ([`BanList::add_keys`]; their marks dropped if the disk tier's
    /// failed writes moved from `failures`), off the runtime. A ban without a mark covers the
    /// lost purge of its key listed in `unbanned`, unless that one is later than `at` (it
    /// waits for its own ban).
    async fn write_key_bans(
        &self,
        bans: &[(String, Option<u64>)],
        at: SystemTime,
        failures: Option<u64>,
    ) -> Result<(), BanError> {
        let (log, errors, keys) = (self.bans.clone(), self.disk_errors.clone(), bans.to_vec());
        off_runtime(move || {
            let keys: Vec<(&str, Option<u64>)> =
                keys.iter().map(|(k, m)| (k.as_str(), *m)).collect();
            log.add_keys(&keys, at, || failures.is_none_or(|f| errors.count() == f))
        })
        .await?;
        let mut unbanned = self.unbanned.lock();
        for (key, _) in bans.iter().filter(|(_, m)| m.is_none()) {
            if unbanned.get(key).is_some_and(|since| *since <= at) {
                unbanned.remove(key);
            }
        }
        Ok(())
    }

    /// Record that a refresh of `primary_key` was accepted, durably: a crash before it ends
    /// leaves the copy it was to replace on disk, and the record bans that copy after the
    /// restart (see [`BanList::add_refresh`]). The refresh holds the record until it ends.
    pub async fn record_refresh(&self, primary_key: &str) -> Result<RefreshRecord, BanError> {
        RefreshRecord::add(self.bans.clone(), primary_key).await
    }

    /// Compact the ban log, retiring the key bans whose tombstones are written. Each retired
    /// key is dropped from memory once more, a safeguard now that a disk read under way at
    /// its purge keeps nothing in memory ([`Self::read`]): only the ban kept such a copy from
    /// being served.
    async fn retire_key_bans(&self) -> Result<(), BanError> {
        let written = self.tombstones.written_so_far();
        for key in self.bans.written_keys(written) {
            self.cache.memory().remove(&primary_hash(&key));
        }
        let bans = self.bans.clone();
        off_runtime(move || bans.compact(written)).await
    }

    /// Number of purge bans in force.
    pub fn ban_count(&self) -> usize {
        self.bans.len()
    }

    /// Cancel the fills of `hash`; whether one was still live. Cancelled fills stay listed
    /// until their writers finish: pingora-cache looks its writer's own reader up by tag
    /// right after creating the fill (and panics if it is gone), while new requests skip them.
    fn cancel_fills(&self, hash: u128) -> bool {
        let fills = self.fills.lock();
        let Some(v) = fills.get(&hash) else {
            return false;
        };
        let mut live = false;
        for f in v.iter().filter(|f| !f.is_cancelled()) {
            f.cancel();
            live = true;
        }
        live
    }

    /// A fill of `hash` newer than fill `id` committed: the older ones still streaming (a
    /// slow fetch overtaken by a refresh) must not overwrite it when they finish. Their
    /// readers still get their bodies, as after a purge.
    fn supersede_older(&self, hash: u128, id: u64) {
        if let Some(v) = self.fills.lock().get(&hash) {
            for f in v.iter().filter(|f| f.id < id && !f.is_cancelled()) {
                f.cancel();
            }
        }
    }

    fn any_fill(&self, hash: u128) -> Option<Arc<Fill>> {
        self.fills
            .lock()
            .get(&hash)
            .and_then(|v| v.iter().find(|f| !f.is_cancelled()).cloned())
    }

    fn remove_fill(&self, hash: u128, id: u64) {
        let mut fills = self.fills.lock();
        if let Some(v) = fills.get_mut(&hash) {
            v.retain(|f| f.id != id);
            if v.is_empty() {
                fills.remove(&hash);
            }
        }
    }

    async fn load(&self, hash: u128) -> Result<Option<StoredObject>> {
        Ok(match self.read(hash).await {
            Read::Held(obj) | Read::Queued(obj) => Some(obj),
            Read::Absent | Read::Skipped => None,
        })
    }

    /// The object under `hash`: from memory, else from disk ([`disk_reads`]). What the disk
    /// gave goes into memory, unless a write or removal of the key's slot came while it was
    /// read, or memory holds the key again: a newer version stored meanwhile stays. What
    /// foyer's write buffer gave does not: a removal does not reach that buffer, so a copy
    /// purged just now may still come from it (the lookup's purge checks refuse it).
    async fn read(&self, hash: u128) -> Read {
        let in_memory = || {
            let held = self.cache.memory().get(&hash)?;
            Some(Read::Held(held.value().clone()))
        };
        if let Some(held) = in_memory() {
            return held;
        }
        // Asked again once the epoch is known: a write that came in between is in memory.
        let since = self.purge_epoch(hash);
        if let Some(held) = in_memory() {
            return held;
        }
        match self.reads.read(self.cache.storage(), hash, since).await {
            Ok(Read::Held(obj)) => {
                let epochs = self.purges.lock();
                if epochs[purge_slot(hash)] == since && !self.cache.memory().contains(&hash) {
                    self.cache.memory().insert(hash, obj.clone());
                }
                Read::Held(obj)
            }
            Ok(other) => other,
            Err(e) => {
                // An entry this build cannot read (another version's format, a bad block) is
                // a miss, and is dropped: as an error it would stay, and every request for
                // the key would go to the origin past the cache lock until a fill replaced it.
                // Not one stored since the read began, and once for the readers sharing it.
                if self.remove_unless_stored_since(hash, since) {
                    tracing::warn!(error = %e, "unreadable cache entry dropped");
                }
                Read::Absent
            }
        }
    }

    /// Remove the copy of `hash` a read found, unless its purge slot moved since `since` (the
    /// slot's epoch before the read): a copy stored or removed since is not the one read.
    /// Whether it was removed.
    fn remove_unless_stored_since(&self, hash: u128, since: u64) -> bool {
        let mut epochs = self.purges.lock();
        let unchanged = epochs[purge_slot(hash)] == since;
        if unchanged {
            epochs[purge_slot(hash)] += 1;
            self.cache.remove(&hash);
        }
        unchanged
    }
}

/// A reader of `fill`, or `None` if it passes through (it cannot serve a body from the start).
fn partial_hit(fill: Arc<Fill>) -> Result<Option<(CacheMeta, HitHandler)>> {
    let meta = fill.meta.meta()?;
    Ok(PartialHit::new(fill).map(|hit| (meta, Box::new(hit) as HitHandler)))
}

#[async_trait]
impl Storage for FoyerStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let hash = hash_of(key.combined_bin());
        let primary = String::from_utf8_lossy(key.primary_key());
        // Prefer an in-progress fill: it is newer than whatever foyer holds. One whose fetch
        // began before a purge of its key or a prefix ban covering it is not joined (nor, once
        // committed, served): a fill registered just after a key purge found nothing to
        // cancel, and must not serve what the purge removed while it streams.
        if let Some(fill) = self.any_fill(hash) {
            if let Some(hit) = partial_hit(fill)? {
                let key_hash = || hash_of(key.primary_bin());
                if !self.purged_since(&primary, key_hash, hit.0.created(), hit.0.headers()) {
                    return Ok(Some(hit));
                }
            }
        }
        // Taken before the load: what it removes below must be the copy it read, not one a
        // fill committed while the load ran.
        let since = self.purge_epoch(hash);
        let Some(obj) = self.load(hash).await? else {
            return Ok(None);
        };
        let meta = match obj.meta() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "dropping undecodable cache entry");
                self.remove_unless_stored_since(hash, since);
                return Ok(None);
            }
        };
        let key_hash = || hash_of(key.primary_bin());
        if self.purged_since(&primary, key_hash, meta.created(), meta.headers()) {
            self.remove_unless_stored_since(hash, since);
            return Ok(None);
        }
        Ok(Some((meta, Box::new(CompleteHit::new(obj.body)))))
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        streaming_write_tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let hash = hash_of(key.combined_bin());
        if let Some(tag) = streaming_write_tag {
            let fill = self
                .fills
                .lock()
                .get(&hash)
                .and_then(|v| v.iter().find(|f| f.tag == tag).cloned());
            // The write already committed (or was purged): fall back to a normal lookup.
            if let Some(hit) = fill.map(partial_hit).transpose()?.flatten() {
                return Ok(Some(hit));
            }
        }
        self.lookup(key, trace).await
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let hash = hash_of(key.combined_bin());
        let id = self.next_fill.fetch_add(1, Ordering::Relaxed);
        let fill = Fill::new(id, ObjectMeta::of(meta)?, self.fill_bytes.clone());
        self.fills
            .lock()
            .entry(hash)
            .or_default()
            .push(fill.clone());
        Ok(Box::new(FoyerMissHandler {
            storage: self,
            key: key.clone(),
            hash,
            created: meta.created(),
            fill,
            size: 0,
            passing: false,
            too_large: false,
            finished: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        // Entries carry no generation id, so an exact identified target cannot be ours.
        if matches!(target, PurgeTarget::Exact(CacheEntryKey::Identified { .. })) {
            return Ok(PurgeOutcome::NotFound);
        }
        let hash = hash_of(compact_bin(target.key()));
        Ok(if self.remove(hash) {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn expire(
        &'static self,
        target: PurgeTarget<'_>,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        if matches!(target, PurgeTarget::Exact(CacheEntryKey::Identified { .. })) {
            return Ok(PurgeOutcome::NotFound);
        }
        let hash = hash_of(compact_bin(target.key()));
        let since = self.purge_epoch(hash);
        let Some(obj) = self.load(hash).await? else {
            return Ok(PurgeOutcome::NotFound);
        };
        let mut meta = obj.meta()?;
        // A key purge whose delete foyer has not flushed yet still lets the object load: it
        // must not be stored again (the ban list needs the key's text, which a target lacks).
        let primary = || hash_of(target.key().primary_bin());
        if self.recent.purged_after(meta.created(), primary) {
            return Ok(PurgeOutcome::NotFound);
        }
        meta.expire_at(SystemTime::now());
        Ok(if self.store_unless_purged(since, hash, &meta, obj.body)? {
            PurgeOutcome::Expired
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let hash = hash_of(key.combined_bin());
        let since = self.purge_epoch(hash);
        let Some(obj) = self.load(hash).await? else {
            return Ok(false);
        };
        // A revalidation keeps the object's `created`; another one means a newer version
        // replaced the object while this 304 was on its way, and its headers must not be
        // paired with that version's body.
        let stored = obj.meta()?;
        if stored.created() != meta.created() {
            return Ok(false);
        }
        // A purge whose delete foyer has not flushed yet still lets the object load: it
        // must not be stored again, where only the lookup window would catch it.
        let primary = String::from_utf8_lossy(key.primary_key());
        let key_hash = || hash_of(key.primary_bin());
        if self.purged_since(&primary, key_hash, stored.created(), stored.headers()) {
            return Ok(false);
        }
        // Only a refresh that extends what the disk copy says may leave that copy as it
        // is: one that shortens its lifetimes, or changes what purges and variants judge it
        // by (tags, Vary), is written whole, and so is one the disk copy's stale-if-error
        // window lags too far behind.
        if extends_only(&stored, meta) {
            let disk = obj
                .disk_stale_until
                .unwrap_or_else(|| stale_if_error_until(&stored));
            if !disk_lags(disk, meta) {
                let tier = Tier::Memory {
                    disk_stale_until: disk,
                };
                return self.write_unless_purged(since, hash, meta, obj.body, tier);
            }
        }
        self.store_unless_purged(since, hash, meta, obj.body)
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// Where a write goes.
#[derive(Clone, Copy)]
enum Tier {
    /// Memory and (in place of any older version) disk.
    Both,
    /// Memory only, the disk copy left as it is: its stale-if-error window ends then.
    Memory { disk_stale_until: SystemTime },
}

/// The end of `meta`'s stale-if-error window.
fn stale_if_error_until(meta: &CacheMeta) -> SystemTime {
    meta.fresh_until() + Duration::from_secs(meta.stale_if_error_sec().into())
}

/// Whether a disk copy whose stale-if-error window ends at `disk` lags `new` by more than
/// half of that window. Read back during an origin outage after the memory copy is gone
/// (evicted, or a restart), it would turn away clients whom `new` serves stale, which is
/// what stale-if-error is for. Such a refresh is written whole: the disk copy of an object
/// revalidated more often than every half window is rewritten about twice per window, not at
/// each revalidation (one revalidated less often is rewritten at each revalidation).
fn disk_lags(disk: SystemTime, new: &CacheMeta) -> bool {
    let window = Duration::from_secs(new.stale_if_error_sec().into());
    !window.is_zero() && disk + window / 2 < stale_if_error_until(new)
}

/// Whether `new` (a revalidation's headers) only extends `old`: no lifetime is shorter and
/// every field but the ones that date a response (`Date`, `Expires`, `Age`) is the same, so
/// a copy still labelled `old` can never be served where `new` would not be, nor with other
/// fields than `new` (a 304 may change any field, RFC 9111 §4.3.4; tags and `Vary` decide
/// purges and variants).
fn extends_only(old: &CacheMeta, new: &CacheMeta) -> bool {
    use http::header::{AGE, DATE, EXPIRES};
    let (a, b) = (old.headers(), new.headers());
    let same_fields = a
        .keys()
        .chain(b.keys())
        .filter(|n| !matches!(**n, DATE | EXPIRES | AGE))
        .all(|n| a.get_all(n).iter().eq(b.get_all(n).iter()));
    new.fresh_until() >= old.fresh_until()
        && new.stale_while_revalidate_sec() >= old.stale_while_revalidate_sec()
        && new.stale_if_error_sec() >= old.stale_if_error_sec()
        && same_fields
}

fn compact_bin(key: &CompactCacheKey) -> [u8; 16] {
    key.combined_bin()
}

/// Writes one body into a [`Fill`], then commits it to foyer.
struct FoyerMissHandler {
    storage: &'static FoyerStorage,
    key: CacheKey,
    hash: u128,
    /// When the fetch began (the object's `created`): purges from then on cover it.
    created: SystemTime,
    fill: Arc<Fill>,
    size: usize,
    /// The body passes through: it streams to its readers and is not committed.
    passing: bool,
    /// The body outgrew the object limit (and the predictor was told).
    too_large: bool,
    finished: bool,
}

/// What a fill passing through may hold for its slowest reader while all fills together are
/// over their budget, and at least what it may hold otherwise (up to the object limit when
/// that is larger): many upstream chunks, so a reader whose client keeps up — pingora's own
/// first client is at most a chunk or two behind — is never cut off, however small the limit.
const PASS_WINDOW: usize = 4 * 1024 * 1024;

impl FoyerMissHandler {
    /// Stop keeping this body for the cache. pingora-cache would end the response mid-body
    /// (its clients would see a truncated object); instead the fill keeps streaming to the
    /// readers it has.
    fn pass_through(&mut self, reason: PassReason) {
        self.passing = true;
        self.fill.pass_through();
        self.storage.remove_fill(self.hash, self.fill.id);
        self.storage
            .passthroughs
            .with_label_values(&[reason.label()])
            .inc();
        tracing::info!(
            key = %String::from_utf8_lossy(self.key.primary_key()),
            reason = reason.label(),
            "passing a fill through uncached"
        );
    }
}

#[async_trait]
impl HandleMiss for FoyerMissHandler {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if !self.passing && self.fill.is_cancelled() {
            self.pass_through(PassReason::Cancelled);
        }
        self.size += data.len();
        let max = self.storage.max_object_bytes;
        if self.size > max && !self.too_large {
            // Remembered, so later requests for the key bypass the cache and are proxied
            // directly (a fill that only met a spent budget is tried again by the next miss).
            self.too_large = true;
            self.storage
                .predictor
                .mark_uncacheable(&self.key, NoCacheReason::ResponseTooLarge);
            if !self.passing {
                self.pass_through(PassReason::TooLarge);
            }
        }
        let pressed = self.storage.fill_bytes() + data.len() > self.storage.max_fill_bytes;
        if pressed && !self.passing {
            self.pass_through(PassReason::FillMemory);
        }
        self.fill.push(data);
        if self.passing {
            let window = if pressed {
                PASS_WINDOW
            } else {
                max.max(PASS_WINDOW)
            };
            let held = self.fill.release_read(window);
            if held.cut > 0 {
                self.storage.cut_readers.inc_by(held.cut as u64);
            }
            if held.readers == 0 {
                // Every client is gone or cut off: fetching the rest serves no one.
                return Error::e_explain(
                    ErrorType::InternalError,
                    "no client is left reading a body passing through the cache",
                );
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        self.finished = true;
        // Nothing to commit when the body passed through or a purge cancelled the fill (its
        // readers still get the whole body they asked for before the purge); a purge landing
        // during the copy below is caught under the lock.
        if self.passing || self.fill.is_cancelled() {
            self.fill.finish(FillState::Done);
            self.storage.remove_fill(self.hash, self.fill.id);
            return Ok(MissFinishType::Created(self.size));
        }
        let body = self.fill.body();
        let meta = match self.fill.meta.with_length(body.len()) {
            Ok(stated) => stated.unwrap_or_else(|| self.fill.meta.clone()),
            Err(e) => {
                tracing::debug!(error = %e, "stored without its length");
                self.fill.meta.clone()
            }
        };
        let obj = StoredObject::new(meta, body);
        {
            // A purge cancels the fill under the same lock: it lands wholly before this check
            // or after the insert, never between.
            let mut epochs = self.storage.purges.lock();
            // A key purge that landed after the fetch began but before the fill was
            // registered found nothing to cancel: it still covers this copy, and a lookup
            // only refuses the copy while that purge is remembered.
            let primary = hash_of(self.key.primary_bin());
            if self.storage.recent.may_cover(self.created, primary) {
                tracing::debug!(
                    key = %String::from_utf8_lossy(self.key.primary_key()),
                    "a purge overtook the fill: not stored"
                );
                self.fill.cancel();
            }
            if !self.fill.is_cancelled() {
                // A 304 or an expiry that read the older version stores nothing over this one.
                epochs[purge_slot(self.hash)] += 1;
                // Commit before the fill disappears so lookups always find one of the two.
                self.storage.replace(self.hash, obj);
                self.fill.committed();
                self.storage.supersede_older(self.hash, self.fill.id);
            }
        }
        self.fill.finish(FillState::Done);
        self.storage.remove_fill(self.hash, self.fill.id);
        Ok(MissFinishType::Created(self.size))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(&self.fill.tag)
    }
}

impl Drop for FoyerMissHandler {
    fn drop(&mut self) {
        if !self.finished {
            self.fill.finish(FillState::Aborted);
            self.storage.remove_fill(self.hash, self.fill.id);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pingora_http::ResponseHeader;

    /// A memory-only storage taking objects up to 512 KiB, alive for the test process.
    pub(crate) async fn small_storage(dir: &std::path::Path) -> &'static FoyerStorage {
        storage_with_disk(dir, 0).await
    }

    /// A disk watchdog that sees a stall from its start until [`Self::resume`]: its probe
    /// file is a FIFO nobody reads.
    pub(crate) struct StalledDisk {
        dir: PathBuf,
        health: DiskHealth,
    }

    impl StalledDisk {
        /// Watch `s`'s disk, probing `dir`, stalled.
        pub(crate) fn watch(s: &FoyerStorage, dir: &std::path::Path) -> Self {
            disk_health::tests::make_fifo(&dir.join(PROBE_FILE));
            let metrics = disk_health::tests::metrics();
            let health = DiskHealth::start(dir, Duration::from_millis(100), metrics).unwrap();
            assert!(health.stalled());
            s.watch_disk(health.clone());
            StalledDisk {
                dir: dir.into(),
                health,
            }
        }

        /// Let the stuck probe come back (failing: a pipe cannot be synced).
        pub(crate) async fn resume(self) {
            let fifo = self.dir.join("fifo");
            std::fs::rename(self.dir.join(PROBE_FILE), &fifo).unwrap();
            let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
            for _ in 0..200 {
                if !self.health.stalled() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            reader.join().unwrap();
            assert!(!self.health.stalled(), "the probe came back");
        }
    }

    /// A storage with 4 MiB of memory and `disk_bytes` of disk in 1 MiB blocks, taking
    /// objects up to 512 KiB, alive for the test process.
    async fn storage_with_disk(dir: &std::path::Path, disk_bytes: usize) -> &'static FoyerStorage {
        storage_counting(dir, disk_bytes, disk_io::tests::own()).await
    }

    /// [`storage_with_disk`] checking the failed writes `errors` counts.
    async fn storage_counting(
        dir: &std::path::Path,
        disk_bytes: usize,
        errors: Arc<DiskErrors>,
    ) -> &'static FoyerStorage {
        storage_tuned(dir, disk_bytes, errors, |e| e).await
    }

    /// [`storage_counting`] with its disk engine configured by `engine` too.
    async fn storage_tuned(
        dir: &std::path::Path,
        disk_bytes: usize,
        errors: Arc<DiskErrors>,
        engine: impl FnOnce(DiskEngine) -> DiskEngine,
    ) -> &'static FoyerStorage {
        let opts = StorageOptions {
            dir: dir.into(),
            memory_bytes: 4 << 20,
            memory_shards: 1,
            disk_bytes,
            block_size: 1 << 20,
            max_object_bytes: 1 << 19,
            max_fill_bytes: 1 << 20,
            ban_retention: Duration::from_secs(60),
        };
        let spawner = Spawner::from(tokio::runtime::Handle::current());
        let s =
            FoyerStorage::open_with(&opts, spawner, &prometheus::Registry::new(), errors, engine)
                .await
                .unwrap();
        Box::leak(Box::new(s))
    }

    /// Store `body` under `hash` now (no removal in between); whether it was stored.
    fn store_now(s: &FoyerStorage, hash: u128, meta: &CacheMeta, body: Bytes) -> bool {
        s.store_unless_purged(s.purge_epoch(hash), hash, meta, body)
            .unwrap()
    }

    /// Store a fresh object under each of the primary `keys`.
    fn store_keys(s: &FoyerStorage, keys: &[&str]) {
        for key in keys {
            let hash = primary_hash(key);
            assert!(store_now(s, hash, &fresh_meta(), Bytes::from_static(b"v")));
        }
    }

    /// Purge `key` (held) as one whose tombstone was late: a key ban with a mark stands in.
    async fn purge_late(s: &FoyerStorage, key: &str) {
        assert!(s.invalidate_key(key));
        let mark = s.tombstones.mark();
        s.settled(&[key], (mark, SystemTime::now()), (Wait::Late, 0))
            .await
            .unwrap();
    }

    #[test]
    fn a_refresh_that_changes_a_field_is_not_memory_only() {
        let now = SystemTime::now();
        let meta = |fields: &[(&str, &str)], fresh: u64| {
            let mut h = ResponseHeader::build(200, None).unwrap();
            for (n, v) in fields {
                h.append_header(n.to_string(), *v).unwrap();
            }
            CacheMeta::new(now + Duration::from_secs(fresh), now, 0, 0, h)
        };
        let old = meta(&[("x-ver", "1"), ("date", "a"), ("surrogate-key", "t")], 60);
        let dated = meta(
            &[("x-ver", "1"), ("date", "b"), ("surrogate-key", "t")],
            120,
        );
        assert!(
            extends_only(&old, &dated),
            "only its date and lifetime moved"
        );
        let changed = meta(
            &[("x-ver", "2"), ("date", "b"), ("surrogate-key", "t")],
            120,
        );
        assert!(!extends_only(&old, &changed));
        let retagged = meta(
            &[("x-ver", "1"), ("date", "b"), ("surrogate-key", "u")],
            120,
        );
        assert!(!extends_only(&old, &retagged));
        let added = meta(
            &[("x-ver", "1"), ("link", "</a>"), ("surrogate-key", "t")],
            120,
        );
        assert!(!extends_only(&old, &added));
        let shorter = meta(&[("x-ver", "1"), ("date", "b"), ("surrogate-key", "t")], 30);
        assert!(!extends_only(&old, &shorter));
    }

    fn fresh_meta() -> CacheMeta {
        let now = SystemTime::now();
        let header = ResponseHeader::build(200, None).unwrap();
        CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header)
    }

    /// A fill of `key` and the reader pingora gives the client that started it.
    async fn fill_with_reader(
        s: &'static FoyerStorage,
        key: &CacheKey,
    ) -> (MissHandler, HitHandler) {
        let trace = pingora_cache::trace::Span::inactive().handle();
        let miss = s
            .get_miss_handler(key, &fresh_meta(), &trace)
            .await
            .unwrap();
        let reader = reader_of(s, key, &miss).await;
        (miss, reader)
    }

    /// One more reader of the fill `miss` writes (a client that joined it).
    async fn reader_of(s: &'static FoyerStorage, key: &CacheKey, miss: &MissHandler) -> HitHandler {
        let trace = pingora_cache::trace::Span::inactive().handle();
        let tag = miss.streaming_write_tag().unwrap();
        s.lookup_streaming_write(key, Some(tag), &trace)
            .await
            .unwrap()
            .unwrap()
            .1
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_right_after_a_fill_starts_still_leaves_its_writer_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let key = CacheKey::new("h/raced", "");
        let trace = pingora_cache::trace::Span::inactive().handle();
        let mut miss = s
            .get_miss_handler(&key, &fresh_meta(), &trace)
            .await
            .unwrap();
        // The purge lands between pingora creating the fill and asking for its reader.
        assert!(s.purge_key("h/raced"), "a live fill counts as found");
        assert!(!s.purge_key("h/raced"), "a cancelled one does not");
        let mut reader = reader_of(s, &key, &miss).await;
        assert!(
            s.lookup(&key, &trace).await.unwrap().is_none(),
            "new requests do not join a cancelled fill"
        );
        miss.write_body(Bytes::from_static(b"old"), true)
            .await
            .unwrap();
        miss.finish().await.unwrap();
        assert_eq!(&reader.read_body().await.unwrap().unwrap()[..], b"old");
        assert!(
            s.lookup(&key, &trace).await.unwrap().is_none(),
            "not committed"
        );
        assert!(
            s.fills.lock().is_empty(),
            "the finished fill left the table"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_fill_finishing_last_does_not_overwrite_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let key = CacheKey::new("h/versions", "");
        let trace = pingora_cache::trace::Span::inactive().handle();
        let mut slow = s
            .get_miss_handler(&key, &fresh_meta(), &trace)
            .await
            .unwrap();
        let mut reader = reader_of(s, &key, &slow).await;
        let mut fresh = s
            .get_miss_handler(&key, &fresh_meta(), &trace)
            .await
            .unwrap();
        fresh
            .write_body(Bytes::from_static(b"v2"), true)
            .await
            .unwrap();
        fresh.finish().await.unwrap();
        slow.write_body(Bytes::from_static(b"v1"), true)
            .await
            .unwrap();
        slow.finish().await.unwrap();
        assert_eq!(
            &reader.read_body().await.unwrap().unwrap()[..],
            b"v1",
            "its reader still gets its body"
        );
        let obj = s.load(hash_of(key.combined_bin())).await.unwrap().unwrap();
        assert_eq!(&obj.body[..], b"v2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_over_the_limit_streams_to_its_reader_uncached() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let key = CacheKey::new("h/big", "");
        let trace = pingora_cache::trace::Span::inactive().handle();
        let (mut miss, mut reader) = fill_with_reader(s, &key).await;
        let chunk = 16 * 1024;
        let mut got = Vec::new();
        // 1 MiB, twice the limit, read as it streams.
        for i in 0..64u8 {
            miss.write_body(Bytes::from(vec![i; chunk]), false)
                .await
                .unwrap();
            got.extend_from_slice(&reader.read_body().await.unwrap().unwrap());
            if i == 40 {
                assert!(
                    s.lookup(&key, &trace).await.unwrap().is_none(),
                    "a passed-through fill takes no new readers"
                );
            }
        }
        miss.finish().await.unwrap();
        assert!(reader.read_body().await.unwrap().is_none());
        assert_eq!(got.len(), 64 * chunk);
        assert!(got.chunks(chunk).enumerate().all(|(i, c)| c[0] == i as u8));
        assert!(!s.holds("h/big"), "not committed");
        assert_eq!(
            s.predictor().predicted_uncacheable_reason(&key),
            Some(NoCacheReason::ResponseTooLarge)
        );
        assert_eq!(s.passthroughs.with_label_values(&["too_large"]).get(), 1);
        drop(reader);
        assert_eq!(s.fill_bytes(), 0, "every chunk freed");
    }

    /// A key purge that lands after a fetch began but before its fill is registered finds
    /// nothing to cancel; the fill is still not stored, and neither is one whose fetch began
    /// after the purge's record was forgotten but before the purge.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_before_the_fill_was_registered_still_keeps_it_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let began = SystemTime::now() - Duration::from_millis(5);
        // A whole fill of `key` whose fetch began at `created`.
        let fill = |key: &'static str, created: SystemTime| {
            let trace = pingora_cache::trace::Span::inactive().handle();
            async move {
                let header = ResponseHeader::build(200, None).unwrap();
                let meta = CacheMeta::new(created + Duration::from_secs(60), created, 0, 0, header);
                let key = CacheKey::new(key, "");
                let mut miss = s.get_miss_handler(&key, &meta, &trace).await.unwrap();
                miss.write_body(Bytes::from_static(b"body"), true)
                    .await
                    .unwrap();
                miss.finish().await.unwrap();
            }
        };
        s.invalidate_key("h/gap");
        fill("h/gap", began).await;
        assert!(!s.holds("h/gap"), "the purge covers the copy");
        // A fetch that began after the purge is stored as usual.
        fill("h/gap", SystemTime::now()).await;
        assert!(s.holds("h/gap"));
        // A fill older than the purge window: the slot of its key says a purge came after.
        let long_ago = SystemTime::now() - RECENT_PURGE_WINDOW - Duration::from_secs(1);
        s.invalidate_key("h/long");
        fill("h/long", long_ago).await;
        assert!(!s.holds("h/long"));
    }

    /// A peer's copy admitted before the purge window is held against its key's purge slot:
    /// the purge of its key may be forgotten by now, and the peer may not have applied it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_copy_older_than_the_purge_window_is_judged_by_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let headers = HeaderMap::new();
        let long_ago = SystemTime::now() - RECENT_PURGE_WINDOW - Duration::from_secs(1);
        assert!(!s.purged_since_admitted("h/peer", long_ago, &headers));
        s.invalidate_key("h/peer");
        assert!(s.purged_since_admitted("h/peer", long_ago, &headers));
        assert!(!s.purged_since_admitted("h/peer", SystemTime::now(), &headers));
    }

    /// A fill a purge cancelled keeps streaming to its reader, but holds only what the reader
    /// has not read yet instead of the whole body for a commit that will not come.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_fill_stops_keeping_its_body() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let key = CacheKey::new("h/purged", "");
        let (mut miss, mut reader) = fill_with_reader(s, &key).await;
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        miss.write_body(chunk.clone(), false).await.unwrap();
        assert!(s.invalidate_key("h/purged"), "the fill counts as found");
        let mut got = reader.read_body().await.unwrap().unwrap().len();
        for _ in 0..6 {
            miss.write_body(chunk.clone(), false).await.unwrap();
            got += reader.read_body().await.unwrap().unwrap().len();
            // The chunk just written stays until the writer's next release.
            assert!(s.fill_bytes() <= chunk.len(), "{}", s.fill_bytes());
        }
        miss.finish().await.unwrap();
        while let Some(b) = reader.read_body().await.unwrap() {
            got += b.len();
        }
        assert_eq!(got, 7 * chunk.len(), "its reader gets the whole body");
        assert!(!s.holds("h/purged"));
        assert_eq!(s.passthroughs.with_label_values(&["cancelled"]).get(), 1);
        drop(reader);
        assert_eq!(s.fill_bytes(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fills_past_the_fill_memory_pass_through_and_the_rest_commit() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let chunk = Bytes::from(vec![1u8; 64 * 1024]);
        let mut misses = Vec::new();
        let mut readers = Vec::new();
        for k in ["h/a", "h/b", "h/c"] {
            // Each fill serves a client, as pingora's first request reads its own fill.
            let (miss, reader) = fill_with_reader(s, &CacheKey::new(k, "")).await;
            misses.push(miss);
            readers.push(reader);
        }
        // a and b hold 512 KiB each: the whole 1 MiB budget.
        for m in &mut misses[..2] {
            for _ in 0..8 {
                m.write_body(chunk.clone(), false).await.unwrap();
            }
        }
        assert_eq!(s.fill_bytes(), 1 << 20);
        // c finds it full: it passes through, holding only what its client has not read.
        misses[2].write_body(chunk.clone(), false).await.unwrap();
        assert_eq!(s.fill_bytes(), (1 << 20) + chunk.len());
        readers[2].read_body().await.unwrap().unwrap();
        misses[2].write_body(chunk.clone(), false).await.unwrap();
        assert_eq!(s.fill_bytes(), (1 << 20) + chunk.len());
        for m in misses {
            m.finish().await.unwrap();
        }
        assert!(s.holds("h/a") && s.holds("h/b"));
        assert!(!s.holds("h/c"));
        assert!(
            s.predictor()
                .cacheable_prediction(&CacheKey::new("h/c", "")),
            "a full budget says nothing about the object: the next miss may cache it"
        );
        assert_eq!(s.passthroughs.with_label_values(&["fill_memory"]).get(), 1);
        drop(readers);
        assert_eq!(s.fill_bytes(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_reader_is_cut_off_and_a_fill_nobody_reads_ends() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let chunk = Bytes::from(vec![7u8; 16 * 1024]);
        let key = CacheKey::new("h/slow", "");
        let (mut miss, mut fast) = fill_with_reader(s, &key).await;
        let mut stuck = reader_of(s, &key, &miss).await;
        // 6 MiB: the stuck reader falls more than the 4 MiB window behind and is cut off; the
        // other one, and the fill, go on to the end.
        for _ in 0..384 {
            miss.write_body(chunk.clone(), false).await.unwrap();
            fast.read_body().await.unwrap().unwrap();
        }
        miss.finish().await.unwrap();
        assert!(fast.read_body().await.unwrap().is_none());
        assert_eq!(s.cut_readers.get(), 1);
        let mut read = 0;
        let end = loop {
            match stuck.read_body().await {
                Ok(Some(c)) => read += c.len(),
                other => break other,
            }
        };
        assert!(end.unwrap_err().to_string().contains("behind"));
        assert_eq!(read, 0, "cut off before it read anything");
        drop(stuck);
        drop(fast);
        assert_eq!(s.fill_bytes(), 0);

        // With its only reader stuck, the fill stops once that reader is cut off.
        let (mut miss, _stuck) = fill_with_reader(s, &CacheKey::new("h/alone", "")).await;
        let mut written = 0;
        let err = loop {
            match miss.write_body(chunk.clone(), false).await {
                Ok(()) => written += chunk.len(),
                Err(e) => break e,
            }
        };
        assert!(
            ((4 << 20)..=(4 << 20) + (1 << 19)).contains(&written),
            "{written}"
        );
        assert!(err.to_string().contains("no client"), "{err}");
        assert!(!s.holds("h/alone") && !s.holds("h/slow"));
    }

    /// foyer drops disk writes while its queue is over its threshold, leaving the disk's
    /// older version indexed: a newer version that never reached the disk must not bring the
    /// older back once it left memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_disk_write_does_not_bring_the_older_version_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage_with_disk(dir.path(), 256 << 20).await;
        let meta = fresh_meta();
        let store = |hash: u128, body: Bytes| assert!(store_now(s, hash, &meta, body));
        let filler = Bytes::from(vec![7u8; 1 << 19]);
        let mut resurrected = 0;
        for round in 0..8u128 {
            let hash = primary_hash(&format!("h/v{round}"));
            store(hash, Bytes::from_static(b"v1"));
            s.cache.storage().wait().await;
            // Far more than the write queue takes at once: most of these, and v2, are dropped.
            for i in 0..200u128 {
                store(1_000_000 * (round + 1) + i, filler.clone());
            }
            store(hash, Bytes::from_static(b"v2"));
            s.cache.memory().remove(&hash);
            s.cache.storage().wait().await;
            if let Some(obj) = s.load(hash).await.unwrap() {
                if &obj.body[..] == b"v1" {
                    resurrected += 1;
                }
            }
        }
        assert_eq!(resurrected, 0, "rounds in which v1 came back");
    }

    /// While the disk's watchdog sees a stall, reads ask the memory tier alone: an object
    /// only the disk holds is a miss (counted), one in memory still a hit. Once the stuck
    /// probe comes back (here failing: its file is a FIFO, and a pipe cannot be synced) the
    /// disk is read again. The hang: the probe file is a FIFO nobody reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_disk_is_not_read_until_its_probe_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage_with_disk(dir.path(), 64 << 20).await;
        store_keys(s, &["h/disk", "h/memory"]);
        s.cache.storage().wait().await;
        s.cache.memory().remove(&primary_hash("h/disk"));

        let stalled = StalledDisk::watch(s, dir.path());
        assert!(s.load(primary_hash("h/disk")).await.unwrap().is_none());
        assert_eq!(s.reads.skipped("stalled"), 1);
        assert!(s.load(primary_hash("h/memory")).await.unwrap().is_some());
        assert!(s.load(primary_hash("h/never")).await.unwrap().is_none());
        assert_eq!(
            s.reads.skipped("stalled"),
            1,
            "nothing of these was on disk to skip"
        );

        stalled.resume().await;
        let back = s.load(primary_hash("h/disk")).await.unwrap();
        assert_eq!(&back.expect("read from disk").body[..], b"v");
        assert_eq!(s.reads.skipped("timed_out"), 0);
    }

    /// A storage whose disk reads wait while the returned holder holds them, as on a hung
    /// disk (foyer's load holder, which holds a read before it looks its key up), and give
    /// up after `stall`; it holds `v1` on disk only, under the returned hash (of `h/k`). Its
    /// watchdog probes the second of the returned directories (kept for the test's length),
    /// in memory where there is one, so that a slow fsync of a busy test machine does not
    /// read as a stall.
    async fn storage_reading_v1_from_disk(
        stall: Duration,
    ) -> (
        &'static FoyerStorage,
        foyer_storage::test_utils::Holder,
        u128,
        [tempfile::TempDir; 2],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let hash = primary_hash("h/k");
        let holder = foyer_storage::test_utils::Holder::default();
        let held = holder.clone();
        let s = storage_tuned(dir.path(), 64 << 20, disk_io::tests::own(), move |e| {
            e.with_load_holder(held)
        })
        .await;
        assert!(store_now(s, hash, &fresh_meta(), Bytes::from_static(b"v1")));
        s.cache.storage().wait().await;
        s.cache.memory().remove(&hash);
        let probed = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let metrics = disk_health::tests::metrics();
        s.watch_disk(DiskHealth::start(probed.path(), stall, metrics).unwrap());
        (s, holder, hash, [dir, probed])
    }

    /// A disk read that has not come back within `cache.disk_stall_secs` is given up as a miss
    /// (counted), a fill stored meanwhile is what the key serves once the read comes back,
    /// and a read that comes back in time keeps what it read in memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_disk_read_given_up_leaves_what_was_stored_meanwhile() {
        let (s, holder, hash, _dirs) = storage_reading_v1_from_disk(Duration::from_secs(2)).await;
        holder.hold();
        assert!(s.load(hash).await.unwrap().is_none(), "given up");
        assert_eq!(s.reads.skipped("timed_out"), 1);
        assert!(store_now(s, hash, &fresh_meta(), Bytes::from_static(b"v2")));
        holder.unhold();
        // The held read's task ends now; whatever it does, v2 stays.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = s.load(hash).await.unwrap().unwrap();
        assert_eq!(&got.body[..], b"v2");

        s.cache.storage().wait().await;
        s.cache.memory().remove(&hash);
        let got = s.load(hash).await.unwrap().unwrap();
        assert_eq!(&got.body[..], b"v2", "read back from disk");
        assert!(s.cache.memory().contains(&hash), "and kept in memory");
        assert_eq!(s.reads.skipped("timed_out"), 1);
    }

    /// What a disk read brings back does not replace what memory came to hold while it ran:
    /// here a revalidation's update, which goes to memory only (the disk keeps the body under
    /// its earlier fields). foyer's own read would put the disk's version over it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_disk_read_does_not_replace_what_memory_came_to_hold_meanwhile() {
        let (s, holder, hash, _dirs) = storage_reading_v1_from_disk(Duration::from_secs(30)).await;
        holder.hold();
        let reading = tokio::spawn(s.load(hash));
        wait_for_load(s, hash, None).await;
        let updated = Bytes::from_static(b"v1, revalidated");
        update_in_memory(s, hash, updated.clone());
        holder.unhold();
        reading.await.unwrap().unwrap().expect("the read found v1");
        // Time for a late insert to land, as foyer's own read makes when it ends.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = s.load(hash).await.unwrap().unwrap();
        assert_eq!(got.body, updated);
    }

    /// foyer's removals do not reach its write buffer: a copy purged before it was flushed
    /// still loads from there, and is not put back into memory, where it would outlive the
    /// lookup's memory of the purge.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_read_from_foyers_write_buffer_is_not_kept_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let flushes = foyer_storage::test_utils::Switch::default();
        let held = flushes.clone();
        let s = storage_tuned(dir.path(), 64 << 20, disk_io::tests::own(), move |e| {
            e.with_flush_switch(held)
        })
        .await;
        flushes.on();
        let hash = primary_hash("h/k");
        assert!(store_now(s, hash, &fresh_meta(), Bytes::from_static(b"v1")));
        assert!(s.remove(hash));
        assert!(!s.cache.memory().contains(&hash));
        let from_buffer = s.load(hash).await.unwrap();
        assert!(!s.cache.memory().contains(&hash), "not kept");
        flushes.off();
        // foyer itself answers from its buffer here; should it stop, the check above is moot.
        assert!(
            from_buffer.is_some(),
            "foyer no longer loads removed buffered writes"
        );
    }

    /// What a lookup found banned is removed only if it is still what the key holds: a copy
    /// a fill committed while the lookup's disk read ran (foyer reading the older bytes) stays.
    /// (No hook holds a foyer read after its index lookup, so the race is staged here.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_banned_copy_is_removed_only_while_it_is_still_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let hash = primary_hash("h/k");
        assert!(store_now(s, hash, &fresh_meta(), Bytes::from_static(b"v1")));
        let read_at = s.purge_epoch(hash);
        assert!(store_now(s, hash, &fresh_meta(), Bytes::from_static(b"v2")));
        s.remove_unless_stored_since(hash, read_at);
        let got = s.cache.memory().get(&hash).expect("v2 stays");
        assert_eq!(&got.value().body[..], b"v2");
        s.remove_unless_stored_since(hash, s.purge_epoch(hash));
        assert!(!s.cache.memory().contains(&hash), "what was read goes");
    }

    /// Wait until a disk load of `hash` other than load `other_than` is under way; its number.
    async fn wait_for_load(s: &FoyerStorage, hash: u128, other_than: Option<u64>) -> u64 {
        for _ in 0..500 {
            match s.reads.load_under_way(hash) {
                Some(id) if Some(id) != other_than => return id,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        panic!("no load of the key began");
    }

    /// Store `body` under `hash` in memory only, as a revalidation's update does.
    fn update_in_memory(s: &FoyerStorage, hash: u128, body: Bytes) {
        let memory = Tier::Memory {
            disk_stale_until: SystemTime::now(),
        };
        let since = s.purge_epoch(hash);
        assert!(s
            .write_unless_purged(since, hash, &fresh_meta(), body, memory)
            .unwrap());
    }

    /// A disk read keeps nothing in memory once a write of its key's slot came while it ran,
    /// even when memory no longer holds what was written; a read that begins after the write
    /// does not join the earlier load (which may bring back what the write replaced), and
    /// keeps what its own load brings.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_disk_read_keeps_nothing_once_its_slot_changed() {
        let (s, holder, hash, _dirs) = storage_reading_v1_from_disk(Duration::from_secs(30)).await;
        holder.hold();
        let early = tokio::spawn(s.load(hash));
        let first = wait_for_load(s, hash, None).await;
        update_in_memory(s, hash, Bytes::from_static(b"v1, revalidated"));
        s.cache.memory().remove(&hash);
        let late = tokio::spawn(s.load(hash));
        wait_for_load(s, hash, Some(first)).await;
        assert_ne!(
            s.reads.load_under_way(hash),
            Some(first),
            "a load of its own"
        );
        holder.unhold();
        let early = early.await.unwrap().unwrap().expect("v1 from disk");
        assert_eq!(&early.body[..], b"v1");
        late.await.unwrap().unwrap().expect("v1 from disk");
        assert!(
            s.cache.memory().contains(&hash),
            "the late read's copy is kept"
        );

        // The early read alone: nothing kept.
        s.cache.memory().remove(&hash);
        holder.hold();
        let early = tokio::spawn(s.load(hash));
        wait_for_load(s, hash, None).await;
        update_in_memory(s, hash, Bytes::from_static(b"v1, revalidated again"));
        s.cache.memory().remove(&hash);
        holder.unhold();
        early.await.unwrap().unwrap().expect("v1 from disk");
        assert!(
            !s.cache.memory().contains(&hash),
            "the early read's copy is not kept"
        );
    }

    /// Only a purge that removed something owes a tombstone, until a wait that started after
    /// it completes: a purge of a key the edge does not hold has nothing to wait for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_purge_that_removed_something_waits_for_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        assert!(!s.invalidate_key("h/absent"));
        assert!(!s.tombstones_owed());
        let key = CacheKey::new("h/held", "");
        let hash = hash_of(key.combined_bin());
        assert!(store_now(s, hash, &fresh_meta(), Bytes::from_static(b"v")));
        assert!(s.invalidate_key("h/held"));
        assert!(s.tombstones_owed(), "until its wait completes");
        // A purge that finds nothing meanwhile must still wait for the first's tombstone.
        assert!(!s.invalidate_key("h/absent"));
        assert!(s.tombstones_owed());
        s.settle_purge(&["h/held"], s.purge_baseline())
            .await
            .unwrap();
        assert!(!s.tombstones_owed());
    }

    /// A purge whose wait for its tombstone ran out is made durable by a key ban and answered
    /// as done: the ban covers the copy stored before it (what a restart after a crash would
    /// find on disk, or a disk read under way at the purge put back in memory). The next
    /// compaction waits for the late tombstone, drops the key from memory once more and
    /// retires the ban.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_tombstone_is_stood_in_for_by_a_key_ban() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        let trace = pingora_cache::trace::Span::inactive().handle();
        let before = SystemTime::now() - Duration::from_secs(1);
        let key = CacheKey::new("h/late", "");
        let hash = hash_of(key.combined_bin());
        let meta = fresh_meta();
        let old = StoredObject::new(ObjectMeta::of(&meta).unwrap(), Bytes::from_static(b"v"));
        assert!(store_now(s, hash, &meta, Bytes::from_static(b"v")));
        purge_late(s, "h/late").await;
        assert_eq!((s.ban_count(), s.key_bans.get()), (1, 1));
        assert!(s.bans.is_banned("h/late", before, &HeaderMap::new()));
        assert!(!s.bans.is_banned("h/later", before, &HeaderMap::new()));
        assert!(s.tombstones_owed(), "the tombstone itself is still late");
        s.cache.memory().insert(hash, old.clone());
        assert!(s.lookup(&key, &trace).await.unwrap().is_none());
        s.cache.memory().insert(hash, old);
        s.compact_bans().await.unwrap();
        assert!(!s.tombstones_owed(), "the compaction waited for it");
        assert_eq!(s.ban_count(), 0);
        assert!(
            !s.cache.memory().contains(&hash),
            "the old copy dropped again"
        );
    }

    /// The close writes every tombstone submitted before it, so it retires the key bans that
    /// stood in for late ones. A key purge answered while the cache closes (foyer drops
    /// removals from then on, and a wait for its disk tier returns at once) is made durable by
    /// a key ban that no later wait retires.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_while_the_cache_closes_is_made_durable_by_a_key_ban() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        let before = SystemTime::now() - Duration::from_secs(1);
        store_keys(s, &["h/late", "h/closing"]);
        purge_late(s, "h/late").await;
        assert_eq!(s.ban_count(), 1);
        assert!(!s.closing());
        s.close().await.unwrap();
        assert!(s.closing());
        assert_eq!(s.ban_count(), 0, "the close wrote the late tombstone");
        s.invalidate_key("h/closing");
        s.settle_purge(&["h/closing"], s.purge_baseline())
            .await
            .unwrap();
        assert_eq!((s.ban_count(), s.key_bans.get()), (1, 2));
        assert!(s.bans.is_banned("h/closing", before, &HeaderMap::new()));
        s.compact_bans().await.unwrap();
        assert_eq!(s.ban_count(), 1, "no wait retires it");
    }

    /// foyer ends a wait for its disk tier whether the writes before it succeeded or failed (a
    /// full disk): a purge whose wait saw a write fail must not be answered as durable on that
    /// wait, or a restart recovers the object from disk. It gets a key ban that no wait
    /// retires; a key ban standing in for a late tombstone when the write failed is kept too.
    /// A purge after the failure, whose wait sees none, is settled by its wait again. (That
    /// foyer's flusher logs a failed write is checked live: see the disk_io module.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_whose_wait_saw_a_failed_disk_write_is_made_durable_by_a_key_ban() {
        let dir = tempfile::tempdir().unwrap();
        let errors = disk_io::tests::own();
        let s = storage_counting(dir.path(), 16 << 20, errors.clone()).await;
        let trace = pingora_cache::trace::Span::inactive().handle();
        let names = ["h/full", "h/late", "h/after"];
        store_keys(s, &names);
        let keys = names.map(|k| CacheKey::new(k, ""));
        s.cache.storage().wait().await;
        // A purge whose tombstone is late gets a key ban a later wait would retire.
        purge_late(s, "h/late").await;
        // A write fails while the next purge waits: foyer logs it and ends the wait as if
        // it had not.
        let before = s.purge_baseline();
        assert!(s.invalidate_key("h/full"));
        errors.record_failure();
        s.settle_purge(&["h/full"], before).await.unwrap();
        assert_eq!(
            (s.ban_count(), s.key_bans.get()),
            (2, 2),
            "a key ban stood in for the tombstone"
        );
        // Later purges trust their own waits again.
        let before = s.purge_baseline();
        assert!(s.invalidate_key("h/after"));
        s.settle_purge(&["h/after"], before).await.unwrap();
        assert_eq!(s.ban_count(), 2);
        s.compact_bans().await.unwrap();
        assert!(!s.tombstones_owed());
        s.close().await.unwrap();
        assert_eq!(
            s.ban_count(),
            2,
            "no wait retires them, the late one's neither"
        );
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        assert_eq!(s.ban_count(), 2, "read back from the log");
        for key in &keys {
            assert!(s.lookup(key, &trace).await.unwrap().is_none());
        }
    }

    /// Purges hold across restarts however many tombstones the disk tier wrote: foyer 0.22.6's
    /// tombstone log, reopened, resumes on its first page (it takes the newest tombstone's
    /// offset within its page for one within the log), so past a page of tombstones (256) the
    /// purges after a restart overwrite older ones, and their objects come back at the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purges_hold_across_two_restarts_past_a_page_of_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let trace = pingora_cache::trace::Span::inactive().handle();
        let keys = |batch: &str, n: usize| -> Vec<String> {
            (0..n).map(|i| format!("h/{batch}/{i}")).collect()
        };
        async fn store_and_purge(s: &FoyerStorage, keys: &[String]) {
            store_keys(s, &keys.iter().map(String::as_str).collect::<Vec<_>>());
            s.cache.storage().wait().await;
            for k in keys {
                let before = s.purge_baseline();
                assert!(s.invalidate_key(k));
                s.settle_purge(&[k.as_str()], before).await.unwrap();
            }
        }
        let (first, second) = (keys("first", 300), keys("second", 100));
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        store_and_purge(s, &first).await;
        s.close().await.unwrap();
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        store_and_purge(s, &second).await;
        s.close().await.unwrap();
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        assert_eq!(s.ban_count(), 0, "the tombstones alone hold the purges");
        let mut back = Vec::new();
        for k in first.iter().chain(&second) {
            let key = CacheKey::new(k.as_str(), "");
            if s.lookup(&key, &trace).await.unwrap().is_some() {
                back.push(k.clone());
            }
        }
        assert!(
            back.is_empty(),
            "{} purged objects came back: {back:?}",
            back.len()
        );
    }

    /// A tombstone counts as written only once foyer's tombstone log synced. A purge whose
    /// sync fails is made durable by a key ban no wait retires, and so is a late purge's from
    /// before the failure (the failed write-back may have held its tombstone); once syncs
    /// pass, purges need no ban.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_whose_tombstone_did_not_sync_is_made_durable_by_a_key_ban() {
        let dir = tempfile::tempdir().unwrap();
        let errors = disk_io::tests::own();
        let s = storage_counting(dir.path(), 16 << 20, errors.clone()).await;
        assert!(
            s.disk_sync.syncs_the_log(),
            "foyer's tombstone log is where it was"
        );
        store_keys(s, &["h/late", "h/unsynced", "h/synced"]);
        purge_late(s, "h/late").await;
        s.disk_sync.break_syncs(true);
        let before = s.purge_baseline();
        assert!(s.invalidate_key("h/unsynced"));
        s.settle_purge(&["h/unsynced"], before).await.unwrap();
        assert_eq!((s.ban_count(), s.key_bans.get()), (2, 2));
        assert_eq!((s.disk_sync.failures(), errors.count()), (1, 1));
        s.disk_sync.break_syncs(false);
        let before = s.purge_baseline();
        assert!(s.invalidate_key("h/synced"));
        s.settle_purge(&["h/synced"], before).await.unwrap();
        assert_eq!(s.ban_count(), 2, "its own sync passed");
        s.compact_bans().await.unwrap();
        assert_eq!(
            s.ban_count(),
            2,
            "no later sync retires the lost one or the late one"
        );
    }

    /// A purge whose tombstone may be lost and whose key ban could not be written (the ban
    /// log's disk is full too) fails, and every key purge settles until a ban covers it: the
    /// purge asked again finds the key no longer held, and must not be answered at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_purge_without_a_ban_is_banned_when_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let errors = disk_io::tests::own();
        let s = storage_counting(dir.path(), 16 << 20, errors.clone()).await;
        store_keys(s, &["h/full"]);
        let before = s.purge_baseline();
        assert!(s.invalidate_key("h/full"));
        errors.record_failure();
        s.bans.break_appends(true);
        let e = s.settle_purge(&["h/full"], before).await.unwrap_err();
        assert_eq!(e.wait, Wait::Lost);
        assert!(s.tombstones_owed());
        s.compact_bans().await.unwrap_err();
        assert!(s.tombstones_owed(), "still not banned");
        s.bans.break_appends(false);
        // Asked again: not held, but it settles, and its wait (clean now) does not matter.
        let before = s.purge_baseline();
        assert!(!s.invalidate_key("h/full"));
        assert!(s.tombstones_owed());
        s.settle_purge(&["h/full"], before).await.unwrap();
        assert_eq!(s.ban_count(), 1);
        assert!(s.bans.is_banned(
            "h/full",
            SystemTime::now() - Duration::from_secs(1),
            &HeaderMap::new()
        ));
        s.compact_bans().await.unwrap();
        assert!(!s.tombstones_owed());
    }

    /// A refresh that ended before a disk write failed (its new copy's write, or the old
    /// copy's tombstone, may have been the failure) keeps its record until the retention.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_ended_before_a_failed_write_keeps_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let errors = disk_io::tests::own();
        let s = storage_counting(dir.path(), 16 << 20, errors.clone()).await;
        drop(s.record_refresh("h/ended").await.unwrap());
        errors.record_failure();
        s.compact_bans().await.unwrap();
        s.compact_bans().await.unwrap();
        assert_eq!(s.bans.refresh_records(), 1);
    }

    /// A refresh's record goes at the first compaction after the refresh ended, which waits
    /// for the disk tier to write what the refresh stored; one still under way stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compaction_drops_the_records_of_ended_refreshes() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        let ended = s.record_refresh("h/ended").await.unwrap();
        let _live = s.record_refresh("h/live").await.unwrap();
        assert_eq!((s.bans.refresh_records(), s.ban_count()), (2, 0));
        drop(ended);
        s.compact_bans().await.unwrap();
        assert_eq!(s.bans.refresh_records(), 1);
        assert!(!s.tombstones_owed());
    }

    /// A purge while lookups keep reading the object from disk and foyer's write queue: once
    /// the purge is settled, no lookup finds the object, in memory or on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_lookup_brings_a_settled_purge_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        let trace = pingora_cache::trace::Span::inactive().handle();
        for round in 0..20 {
            let name = format!("h/p{round}");
            let key = CacheKey::new(name.as_str(), "");
            let hash = hash_of(key.combined_bin());
            let body = Bytes::from(vec![b'x'; 64 * 1024]);
            assert!(store_now(s, hash, &fresh_meta(), body));
            if round % 2 == 0 {
                // On disk only: lookups read it back from the device.
                s.cache.storage().wait().await;
                s.cache.memory().remove(&hash);
            }
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    let key = key.clone();
                    tokio::spawn(async move {
                        let trace = pingora_cache::trace::Span::inactive().handle();
                        for _ in 0..50 {
                            let _ = s.lookup(&key, &trace).await;
                        }
                    })
                })
                .collect();
            let before = s.purge_baseline();
            assert!(s.invalidate_key(&name));
            s.settle_purge(&[&name], before).await.unwrap();
            for r in readers {
                r.await.unwrap();
            }
            assert!(s.lookup(&key, &trace).await.unwrap().is_none(), "{name}");
            assert!(!s.holds(&name), "{name}");
        }
    }

    /// A fill whose fetch began before a purge of its key, registered after the purge (which
    /// found nothing to cancel), is not joined while it streams.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fill_from_before_a_key_purge_is_not_joined() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let trace = pingora_cache::trace::Span::inactive().handle();
        let key = CacheKey::new("h/k", "");
        let meta = fresh_meta();
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(!s.invalidate_key("h/k"), "nothing stored yet");
        let mut miss = s.get_miss_handler(&key, &meta, &trace).await.unwrap();
        miss.write_body(Bytes::from_static(b"old"), false)
            .await
            .unwrap();
        assert!(s.lookup(&key, &trace).await.unwrap().is_none());
        // A fill that began after the purge is joined.
        let mut fresh = s
            .get_miss_handler(&key, &fresh_meta(), &trace)
            .await
            .unwrap();
        fresh
            .write_body(Bytes::from_static(b"new"), false)
            .await
            .unwrap();
        drop(miss);
        assert!(s.lookup(&key, &trace).await.unwrap().is_some());
        drop(fresh);
    }

    /// A peer's copy is judged by when the peer admitted it, on the wall clock: an old copy
    /// with no purge since is cacheable (it used to be refused once older than the
    /// recent-purge window), one that predates a key purge or a prefix ban applied here is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_copy_is_refused_only_when_a_purge_here_came_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        assert!(
            !s.purged_since_admitted("h/old", long_ago, &HeaderMap::new()),
            "no purge since"
        );
        let before = SystemTime::now();
        std::thread::sleep(Duration::from_millis(2));
        s.invalidate_key("h/k");
        std::thread::sleep(Duration::from_millis(2));
        let after = SystemTime::now();
        assert!(s.purged_since_admitted("h/k", long_ago, &HeaderMap::new()));
        assert!(s.purged_since_admitted("h/k", before, &HeaderMap::new()));
        assert!(
            !s.purged_since_admitted("h/k", after, &HeaderMap::new()),
            "admitted after the purge"
        );
        assert!(
            !s.purged_since_admitted("h/other", before, &HeaderMap::new()),
            "another key"
        );
        s.write_bans(s.purge_prefix("h/dir/")).unwrap();
        assert!(
            s.purged_since_admitted("h/dir/x", before, &HeaderMap::new()),
            "under a later ban"
        );
        assert!(!s.purged_since_admitted(
            "h/dir/x",
            SystemTime::now() + Duration::from_secs(1),
            &HeaderMap::new()
        ));
        // Refusing such an answer once says nothing about the key's next one.
        use pingora_cache::predictor::CacheablePredictor;
        let key = CacheKey::new("h/k", "");
        for reason in [
            PURGED_DURING_FETCH,
            PEER_LACKS_OBJECT,
            ERROR_ON_REVALIDATION,
            ORIGIN_SERVER_ERROR,
            REDIRECT_TO_ITS_OWN_KEY,
        ] {
            let reason = pingora_cache::NoCacheReason::Custom(reason);
            assert_eq!(s.predictor().mark_uncacheable(&key, reason), None);
        }
        assert!(s.predictor().cacheable_prediction(&key));
    }

    /// A 304 refreshes the headers in memory and leaves the disk copy alone: its body did
    /// not change, and rewriting it on every revalidation would rewrite it whole each time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revalidation_does_not_rewrite_the_body_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        let key = CacheKey::new("h/big", "");
        let hash = hash_of(key.combined_bin());
        let trace = pingora_cache::trace::Span::inactive().handle();
        let v1 = fresh_meta();
        let body = Bytes::from(vec![b'x'; 256 * 1024]);
        assert!(store_now(s, hash, &v1, body.clone()));
        s.cache.storage().wait().await;
        let header = ResponseHeader::build(200, None).unwrap();
        let later = v1.fresh_until() + Duration::from_secs(600);
        let refreshed = CacheMeta::new(later, v1.created(), 0, 0, header);
        assert!(s.update_meta(&key, &refreshed, &trace).await.unwrap());
        let hit = s.lookup(&key, &trace).await.unwrap().unwrap();
        assert_eq!(hit.0.fresh_until(), later, "served with the new headers");
        s.cache.storage().wait().await;
        s.cache.memory().remove(&hash);
        let on_disk = s.load(hash).await.unwrap().expect("the disk copy stays");
        assert_eq!(on_disk.body, body);
        assert_eq!(
            on_disk.meta().unwrap().fresh_until(),
            v1.fresh_until(),
            "not written again"
        );
        // A 304 that adds a tag is written whole: the disk copy must carry it for tag purges.
        let mut tagged = ResponseHeader::build(200, None).unwrap();
        tagged.insert_header("cache-tag", "t1").unwrap();
        let with_tag = CacheMeta::new(later, v1.created(), 0, 0, tagged);
        assert!(s.update_meta(&key, &with_tag, &trace).await.unwrap());
        s.cache.storage().wait().await;
        s.cache.memory().remove(&hash);
        let on_disk = s.load(hash).await.unwrap().expect("rewritten");
        assert!(on_disk.meta().unwrap().headers().contains_key("cache-tag"));
    }

    /// Memory-only refreshes must not leave the disk copy's stale-if-error window far behind
    /// the served one: read back during an outage, it would refuse what the headers allow.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_disk_copy_whose_stale_if_error_window_lags_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage_with_disk(dir.path(), 16 << 20).await;
        let key = CacheKey::new("h/sie", "");
        let hash = hash_of(key.combined_bin());
        let trace = pingora_cache::trace::Span::inactive().handle();
        let header = || ResponseHeader::build(200, None).unwrap();
        let now = SystemTime::now();
        let v1 = CacheMeta::new(now + Duration::from_secs(60), now, 0, 600, header());
        assert!(store_now(s, hash, &v1, Bytes::from_static(b"body")));
        s.cache.storage().wait().await;
        let refresh = |extra: u64| {
            let until = v1.fresh_until() + Duration::from_secs(extra);
            CacheMeta::new(until, v1.created(), 0, 600, header())
        };
        let disk_until = v1.fresh_until() + Duration::from_secs(600);
        // 100 s later than the disk copy's window: memory only, and the lag is remembered.
        assert!(s.update_meta(&key, &refresh(100), &trace).await.unwrap());
        let held = s.load(hash).await.unwrap().unwrap();
        assert_eq!(held.disk_stale_until, Some(disk_until));
        // A second memory-only refresh keeps the disk copy's window, not its own.
        assert!(s.update_meta(&key, &refresh(250), &trace).await.unwrap());
        let held = s.load(hash).await.unwrap().unwrap();
        assert_eq!(held.disk_stale_until, Some(disk_until));
        // 400 s: more than half the 600 s window behind, so it is written whole.
        assert!(s.update_meta(&key, &refresh(400), &trace).await.unwrap());
        let held = s.load(hash).await.unwrap().unwrap();
        assert_eq!(held.disk_stale_until, None);
        s.cache.storage().wait().await;
        s.cache.memory().remove(&hash);
        let on_disk = s.load(hash).await.unwrap().expect("rewritten");
        assert_eq!(
            on_disk.meta().unwrap().fresh_until(),
            refresh(400).fresh_until()
        );
        assert_eq!(&on_disk.body[..], b"body");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_revalidation_does_not_relabel_a_newer_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let key = CacheKey::new("h/v", "");
        let hash = hash_of(key.combined_bin());
        let trace = pingora_cache::trace::Span::inactive().handle();
        let v1 = fresh_meta();
        let stored = |meta: &CacheMeta, body: &'static [u8]| {
            store_now(s, hash, meta, Bytes::from_static(body))
        };
        assert!(stored(&v1, b"v1"));
        // v1's revalidation keeps its `created`: its new headers go with v1's body.
        assert!(s.update_meta(&key, &v1, &trace).await.unwrap());
        // v2 replaced v1 while another 304 for v1 was on its way: that one is refused.
        std::thread::sleep(Duration::from_millis(2));
        assert!(stored(&fresh_meta(), b"v2"));
        assert!(!s.update_meta(&key, &v1, &trace).await.unwrap());
        let obj = s.load(hash).await.unwrap().unwrap();
        assert_eq!(&obj.body[..], b"v2");
        assert_ne!(obj.meta().unwrap().created(), v1.created());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fill_committed_after_a_revalidation_read_the_object_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let key = CacheKey::new("h/raced", "");
        let hash = hash_of(key.combined_bin());
        let trace = pingora_cache::trace::Span::inactive().handle();
        let v1 = fresh_meta();
        assert!(store_now(s, hash, &v1, Bytes::from_static(b"v1")));
        // A 304 for v1 read it; v2's fill commits before the 304's update is stored.
        let since = s.purge_epoch(hash);
        let read = s.load(hash).await.unwrap().unwrap();
        let mut fill = s
            .get_miss_handler(&key, &fresh_meta(), &trace)
            .await
            .unwrap();
        fill.write_body(Bytes::from_static(b"v2"), true)
            .await
            .unwrap();
        fill.finish().await.unwrap();
        assert!(!s.store_unless_purged(since, hash, &v1, read.body).unwrap());
        let obj = s.load(hash).await.unwrap().unwrap();
        assert_eq!(&obj.body[..], b"v2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revalidation_does_not_store_a_banned_object_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let key = CacheKey::new("h/r/x", "");
        let hash = hash_of(key.combined_bin());
        let trace = pingora_cache::trace::Span::inactive().handle();
        let v1 = fresh_meta();
        let body = Bytes::from_static(b"v1");
        assert!(store_now(s, hash, &v1, body));
        std::thread::sleep(Duration::from_millis(2));
        // A ban leaves the object where it is until a lookup meets it; the 304 that
        // revalidates it in the meantime does not store it again.
        s.write_bans(s.purge_prefix("h/r/")).unwrap();
        assert!(s.load(hash).await.unwrap().is_some());
        assert!(!s.update_meta(&key, &v1, &trace).await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_between_a_read_and_its_store_wins() {
        let dir = tempfile::tempdir().unwrap();
        let s = small_storage(dir.path()).await;
        let hash = hash_of(CacheKey::new("h/a", "").primary_bin());
        let meta = fresh_meta();
        let v1 = Bytes::from_static(b"v1");
        assert!(store_now(s, hash, &meta, v1));
        assert!(s.holds("h/a"));
        // A revalidation read the object, then a purge came before it stored its update.
        let since = s.purge_epoch(hash);
        assert!(s.purge_key("h/a"));
        let v2 = Bytes::from_static(b"v2");
        assert!(!s
            .store_unless_purged(since, hash, &meta, v2.clone())
            .unwrap());
        assert!(!s.holds("h/a"));
        // A removal of another key (in another slot) does not void it.
        let other = (1..)
            .map(|i| format!("h/other{i}"))
            .find(|k| {
                purge_slot(hash_of(CacheKey::new(k.as_str(), "").primary_bin())) != purge_slot(hash)
            })
            .unwrap();
        let since = s.purge_epoch(hash);
        s.purge_key(&other);
        assert!(s.store_unless_purged(since, hash, &meta, v2).unwrap());
    }
}
