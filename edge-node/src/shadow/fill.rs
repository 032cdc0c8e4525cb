//! Shadow fills: a bounded queue of objects to pre-position, earliest expected request first,
//! drained by a few workers that fetch each object through this edge's own HTTP listener.
//! Going through the real cache path means a fill honours HTTP freshness and size limits and
//! coalesces with user misses of the same object under the cache lock; the concurrency limit
//! keeps fills from starving user traffic. A fill names a peer edge when the broker knows one
//! holding the object: it is tried first (over QUIC, see [`crate::sync::bridge`]), then the
//! origin.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::{Notify, Semaphore};

use super::table::{
    Ending, Expired, FillSource, FillTags, FillUnderWay, Order, ShadowTable, UnheldFill,
};
use super::{FillPacer, FILL_HEADER, REFRESH_HEADER};
use crate::accept_encoding::{Coding, Mix};
use crate::config::ShadowSection;
use crate::metrics::EdgeMetrics;
use crate::proxy::{normalize_key, InternalSecret, FILLED_FROM_HEADER};
use crate::storage::{FoyerStorage, RefreshRecord};
use crate::sync::protocol::{PeerRef, ShadowOutcome};
use crate::sync::{format_peer_via, PEER_VIA_HEADER};

/// One object to shadow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillRequest {
    /// Primary cache key, `host/path?query`.
    pub key: String,
    /// How long the shadow lives.
    pub ttl: Duration,
    /// Provider priority 0–10.
    pub priority: u8,
    /// Unix milliseconds of the expected first request (0: as soon as possible).
    pub deadline_ms: u64,
    /// A peer edge to fill from first.
    pub peer: Option<PeerRef>,
    /// Revalidate a held copy with the origin (it changed) instead of reusing it.
    pub refresh: bool,
    /// A refresh's record in the ban log, so that a crash before the refresh ends does not
    /// leave the replaced copy served after the restart; dropped with the last clone of the
    /// request, when the refresh has ended however it ended.
    pub record: Option<Arc<RefreshRecord>>,
    /// When it was queued: a purge or unshadow of the key after that cancels it, even while
    /// it still waits for a worker.
    pub queued_at: Instant,
    /// Its place in the order orders were accepted here (set when queued).
    pub accepted: u64,
    /// It renewed a live mark (set when queued): the mark stands for it from then on, and
    /// the mark's end reports the order's.
    pub renews: bool,
}

/// Why a shadow request is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidShadow {
    /// The key is not `host/path`, or its path has `.` or `..` segments.
    #[error("key must be {{host}}/{{path}}, spelled as URL parsing keeps it (no . or .. segments, no raw quote, space or non-ASCII byte)")]
    Key,
    /// The TTL is zero or too long.
    #[error("ttl_secs must be between 1 and {0}")]
    Ttl(u64),
    /// The priority is out of range.
    #[error("priority must be 0..=10")]
    Priority,
}

impl InvalidShadow {
    /// Machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            InvalidShadow::Key => "bad_key",
            InvalidShadow::Ttl(_) => "bad_ttl",
            InvalidShadow::Priority => "bad_priority",
        }
    }
}

/// Longest shadow key accepted: the proxy refuses request targets over 8 KiB, and a key
/// carried in every outcome must stay far inside a control frame.
pub const MAX_KEY_BYTES: usize = 8 * 1024;

impl FillRequest {
    /// Check and normalize a shadow request as every entry point (admin API, QUIC) must.
    pub fn validated(
        key: &str,
        ttl_secs: u64,
        priority: u8,
        max_ttl_secs: u64,
    ) -> Result<Self, InvalidShadow> {
        let key = normalize_key(key)
            .filter(|k| k.len() <= MAX_KEY_BYTES && split_key(k).is_some())
            .ok_or(InvalidShadow::Key)?;
        if ttl_secs == 0 || ttl_secs > max_ttl_secs {
            return Err(InvalidShadow::Ttl(max_ttl_secs));
        }
        if priority > 10 {
            return Err(InvalidShadow::Priority);
        }
        Ok(FillRequest {
            key,
            ttl: Duration::from_secs(ttl_secs),
            priority,
            deadline_ms: 0,
            peer: None,
            refresh: false,
            record: None,
            queued_at: Instant::now(),
            accepted: 0,
            renews: false,
        })
    }

    /// The order it fills for: its priority, and its deadline as the order's name (the
    /// broker keeps it distinct between its orders of one key for one edge; 0 names none).
    pub fn order(&self) -> Order {
        Order {
            priority: self.priority,
            id: (self.deadline_ms != 0).then_some(self.deadline_ms),
            accepted: self.accepted,
        }
    }

    /// With the expected arrival of the first request.
    pub fn deadline_ms(mut self, deadline_ms: u64) -> Self {
        self.deadline_ms = deadline_ms;
        self
    }

    /// Revalidating a held copy first.
    pub fn refreshing(mut self, refresh: bool) -> Self {
        self.refresh = refresh;
        self
    }

    /// Holding the refresh's record in the ban log ([`FoyerStorage::record_refresh`]).
    pub fn recorded(mut self, record: RefreshRecord) -> Self {
        self.record = Some(Arc::new(record));
        self
    }

    /// With a peer edge to try before the origin.
    pub fn from_peer(mut self, peer: Option<PeerRef>) -> Self {
        self.peer = peer;
        self
    }
}

/// Why a fill request was refused.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The queue is full.
    #[error("shadow fill queue is full")]
    QueueFull,
    /// The edge is shutting down and runs no more fills.
    #[error("edge is shutting down")]
    Closed,
}

/// Heap entry: earliest deadline first, then higher priority, then arrival order.
#[derive(PartialEq, Eq)]
struct Queued {
    seq: u64,
    req: FillRequest,
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: "greater" pops first.
        other
            .req
            .deadline_ms
            .cmp(&self.req.deadline_ms)
            .then(self.req.priority.cmp(&other.req.priority))
            .then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

struct Queue {
    pending: parking_lot::Mutex<Pending>,
    capacity: usize,
    ready: Notify,
}

/// What waits for a worker, and the refreshes the workers run.
#[derive(Default)]
struct Pending {
    heap: BinaryHeap<Queued>,
    seq: u64,
    /// Keys of refreshes under way, with how many of each: their held copy is stale until
    /// the refresh commits.
    refreshing: HashMap<String, usize>,
    /// Set at shutdown: later orders are refused, so the broker treats a refresh as failed
    /// (and purges) rather than as accepted by an edge that will never run it.
    closed: bool,
}

impl Queue {
    /// Whether `pending` (this queue's, locked) takes another order.
    fn room(&self, pending: &Pending) -> Result<(), FillError> {
        if pending.closed {
            return Err(FillError::Closed);
        }
        if pending.heap.len() >= self.capacity {
            return Err(FillError::QueueFull);
        }
        Ok(())
    }

    fn new(capacity: usize) -> Self {
        Queue {
            pending: parking_lot::Mutex::new(Pending::default()),
            capacity: capacity.max(1),
            ready: Notify::new(),
        }
    }
}

/// The handle shadow requests are submitted through.
#[derive(Clone)]
pub struct Filler {
    queue: Arc<Queue>,
    table: Arc<ShadowTable>,
}

impl Filler {
    /// Queue a fill without waiting. A renewal of a live mark extends it at once, and the
    /// mark is the renewing order's from then on: the broker counts the order from its
    /// acceptance (and settles its outcome against it), and a mark left to expire while the
    /// renewal waits for a worker would end (its object purged if unused) under that order.
    pub fn submit(&self, mut r: FillRequest) -> Result<(), FillError> {
        r.queued_at = Instant::now();
        let mut g = self.queue.pending.lock();
        self.queue.room(&g)?;
        g.seq += 1;
        let seq = g.seq;
        r.accepted = seq;
        r.renews = self.table.extend(&r.key, r.ttl, r.order(), r.queued_at);
        g.heap.push(Queued { seq, req: r });
        drop(g);
        self.queue.ready.notify_one();
        Ok(())
    }

    /// Whether an order would be queued now ([`Self::submit`] says for sure): a refresh checks
    /// before it pays for its record's fsync.
    pub fn has_room(&self) -> Result<(), FillError> {
        self.queue.room(&self.queue.pending.lock())
    }

    /// Whether an order for `key` waits for a worker.
    fn queued(&self, key: &str) -> bool {
        self.queue
            .pending
            .lock()
            .heap
            .iter()
            .any(|q| q.req.key == key)
    }

    /// The next fill to run; a refresh counts as under way from here until its guard drops,
    /// and every fill counts as under way in the shadow table ([`ShadowTable::begin_fill`])
    /// from the moment it leaves the queue, under the queue's lock: a check of the queue
    /// ([`Self::queued`]) followed by one of the fills under way misses no order between the
    /// two.
    fn pop(&self) -> Option<(FillRequest, Option<Refreshing>, FillUnderWay)> {
        let mut g = self.queue.pending.lock();
        let req = g.heap.pop()?.req;
        let guard = req.refresh.then(|| {
            *g.refreshing.entry(req.key.clone()).or_default() += 1;
            Refreshing {
                queue: self.queue.clone(),
                key: req.key.clone(),
            }
        });
        let under_way = self.table.begin_fill(&req.key, Instant::now());
        Some((req, guard, under_way))
    }

    /// Refuse further orders; the keys of every refresh queued or under way, whose held
    /// copies would otherwise outlive the process as the version their origin replaced, and
    /// the records of the queued ones, to hold until those copies are purged. The orders
    /// still queued end unfilled, each reported as one dropped while it waited (removed,
    /// nothing moved), so the broker settles them now instead of counting them as live
    /// shadows of this edge until their TTLs run out.
    fn close(&self) -> (Vec<String>, Vec<Arc<RefreshRecord>>) {
        let mut g = self.queue.pending.lock();
        g.closed = true;
        let queued = std::mem::take(&mut g.heap).into_iter().map(|q| q.req);
        let (mut stale, mut records) = (Vec::new(), Vec::new());
        for r in queued {
            report_unheld(&self.table, &r, 0, false, None);
            if r.refresh {
                stale.push(r.key);
                records.extend(r.record);
            }
        }
        stale.extend(g.refreshing.keys().cloned());
        stale.sort();
        stale.dedup();
        (stale, records)
    }
}

/// A refresh under way; dropped when its fill ends, however it ends.
struct Refreshing {
    queue: Arc<Queue>,
    key: String,
}

impl Drop for Refreshing {
    fn drop(&mut self) {
        let mut g = self.queue.pending.lock();
        if let Some(n) = g.refreshing.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                g.refreshing.remove(&self.key);
            }
        }
    }
}

/// Purge `key`, whose held copy a refresh ordered and that refresh will not replace: without
/// it the copy would be served, as fresh, as the version the origin replaced until its own
/// lifetime ended. Its mark goes with it (reported removed).
async fn purge_stale(
    storage: &FoyerStorage,
    table: &ShadowTable,
    metrics: &EdgeMetrics,
    key: &str,
    why: &'static str,
) {
    if let Err(e) = super::purge(storage, table, &[key]).await {
        // Gone from memory; the next key purge waits for the tombstone again.
        tracing::warn!(error = %e, why, "purge of a copy a refresh did not replace");
    }
    metrics.purges.with_label_values(&["key", why]).inc();
}

/// Background service: fill workers plus the expiry sweep.
pub struct ShadowService {
    filler: Filler,
    table: Arc<ShadowTable>,
    storage: &'static FoyerStorage,
    metrics: EdgeMetrics,
    listen: SocketAddr,
    internal: InternalSecret,
    concurrency: usize,
    pacer: Arc<FillPacer>,
    sweeps: std::sync::atomic::AtomicU64,
    /// Held from start until the shutdown purge is done, so the drain waits for it before
    /// the cache is flushed and the process exits.
    inflight: crate::drain::InflightCounter,
    /// The codings the edge's clients are served with.
    encodings: Arc<Mix>,
}

/// Every this many sweeps (of 250 ms) the marks are checked against the cache, so a shadow
/// the cache evicted is reported as ended now rather than when its TTL runs out.
const EVICTION_SCAN_EVERY: u64 = 20;

impl ShadowService {
    /// A service filling through `listen` (this edge's proxy) within `limits` (fills at
    /// once, fills waiting, bandwidth); returns it and the submission handle.
    pub fn new(
        table: Arc<ShadowTable>,
        storage: &'static FoyerStorage,
        metrics: EdgeMetrics,
        listen: SocketAddr,
        internal: InternalSecret,
        limits: &ShadowSection,
        inflight: crate::drain::InflightCounter,
    ) -> (Self, Filler) {
        let (concurrency, queue) = (limits.fill_concurrency, limits.fill_queue);
        let filler = Filler {
            queue: Arc::new(Queue::new(queue)),
            table: table.clone(),
        };
        (
            ShadowService {
                filler: filler.clone(),
                table,
                storage,
                metrics,
                listen,
                internal,
                concurrency: concurrency.max(1),
                pacer: Arc::new(FillPacer::new(limits.fill_bandwidth.map(|b| b.as_u64()))),
                sweeps: Default::default(),
                inflight,
                encodings: Arc::default(),
            },
            filler,
        )
    }

    /// Ask fills for the coding `encodings` says the edge's clients ask for most.
    pub fn asking_like(mut self, encodings: Arc<Mix>) -> Self {
        self.encodings = encodings;
        self
    }
}

/// Split `host/path?query` into host and path.
///
/// The edge fetches a key through its own listener with a URL, and URL parsing (WHATWG rules)
/// may change the path and query on the way: resolve `.` and `..` segments (`%2e` counts as
/// `.`, a backslash as `/`), percent-encode a `'`, a space or a non-ASCII byte. The answer
/// would then be stored under another key than the one named, so such keys are refused.
pub(crate) fn split_key(key: &str) -> Option<(&str, String)> {
    let (host, rest) = key.split_once('/')?;
    let path = format!("/{rest}");
    (!host.is_empty() && kept_by_url_parsing(&path)).then_some((host, path))
}

/// Whether `path_and_query` comes out of URL parsing exactly as it went in.
fn kept_by_url_parsing(path_and_query: &str) -> bool {
    url::Url::parse(&format!("http://h{path_and_query}")).is_ok_and(|u| {
        let path = u.path();
        match u.query() {
            Some(q) => {
                path_and_query.len() == path.len() + 1 + q.len()
                    && path_and_query.starts_with(path)
                    && path_and_query[path.len() + 1..] == *q
            }
            None => path_and_query == path,
        }
    })
}

/// How fills reach this edge's own HTTP listener, and what they ask it for.
#[derive(Clone)]
struct Local {
    client: reqwest::Client,
    listen: SocketAddr,
    internal: InternalSecret,
    /// The coding fills ask for: the one the edge's clients asked for most when the fill
    /// started, so that an origin varying on `Accept-Encoding` fills the variant they get.
    coding: Option<Coding>,
}

/// What a fill's fetch brought.
struct Fetched {
    /// Where the body came from.
    source: FillSource,
    /// The object's cache tags.
    tags: FillTags,
}

/// Fetch `r`'s key through this edge's own listener, from `peer` if one is named; with
/// `revalidate`, a held copy is revalidated with the origin instead of reused.
async fn fetch(
    local: &Local,
    r: &FillRequest,
    peer: Option<&PeerRef>,
    revalidate: bool,
    max_bytes: u64,
    moved: &mut u64,
) -> Result<Fetched, String> {
    let (host, path) = split_key(&r.key).ok_or_else(|| format!("bad key {:?}", r.key))?;
    let mut req = local
        .client
        .get(format!("http://{}{path}", local.listen))
        .header("host", host)
        .header(FILL_HEADER, local.internal.value());
    if let Some(c) = local.coding {
        req = req.header(http::header::ACCEPT_ENCODING, c.token());
    }
    if let Some(p) = peer {
        req = req.header(PEER_VIA_HEADER, format_peer_via(p));
    }
    if revalidate {
        req = req.header(REFRESH_HEADER, "1");
    }
    let mut resp = req.send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let x_cache = resp.headers().get("x-cache").and_then(|v| v.to_str().ok());
    let cached = x_cache.is_some_and(|v| v != "BYPASS");
    // Answered from a copy this edge held (fresh, revalidated with a 304, or served stale):
    // the order moved no body from elsewhere, and the copy is not the order's to purge.
    let local_hit = matches!(
        x_cache,
        Some("HIT" | "REVALIDATED" | "STALE" | "STALE-UPDATING")
    );
    let peer_served = resp
        .headers()
        .get(FILLED_FROM_HEADER)
        .is_some_and(|v| v == "peer");
    // A body that will not be cached is not downloaded for nothing.
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    if !cached {
        return Err("response is not cacheable".into());
    }
    // The proxy leaves the tag headers on a shadow fill's answer.
    let tags = FillTags::of(resp.headers());
    // Read through (the proxy fills the cache as it streams), counting, never buffering.
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        *moved += chunk.len() as u64;
        if *moved > max_bytes {
            return Err(format!(
                "larger than the cache's object limit ({max_bytes} bytes)"
            ));
        }
    }
    // What the proxy says answered: a copy it held, the peer (over the bridge), else the
    // origin (a copy held stale is revalidated there, whoever was named).
    let source = if local_hit {
        FillSource::Local
    } else if peer_served {
        FillSource::Peer
    } else {
        FillSource::Origin
    };
    Ok(Fetched { source, tags })
}

/// Whether a key purge, or a prefix or tag ban, of `key` came since `started` (a fill's
/// start): the fill's copy was kept out of the cache by it.
fn purged_since(storage: &FoyerStorage, key: &str, started: Instant) -> bool {
    let wall = wall_at(started);
    storage.purged_during(key, started, wall, &http::HeaderMap::new())
}

/// The wall-clock time of the monotonic instant `at` (a fill's start).
fn wall_at(at: Instant) -> std::time::SystemTime {
    std::time::SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or(std::time::UNIX_EPOCH)
}

/// Whether the copy of `key` held now was stored or revalidated since `started`, to the
/// second (slack for the step from the monotonic clock to the wall clock).
async fn stored_since(storage: &FoyerStorage, key: &str, started: Instant) -> bool {
    let second = wall_at(started)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let since = std::time::UNIX_EPOCH + Duration::from_secs(second);
    storage.stored_at(key).await.is_some_and(|at| at >= since)
}

/// A fill whose order was dropped holds nothing here for it ([`ShadowTable::end_unheld`]):
/// `moved` bytes fetched (`peer`: from a peer), `left`: where the copy it leaves in the cache
/// came from, if any.
fn report_unheld(
    table: &ShadowTable,
    req: &FillRequest,
    moved: u64,
    peer: bool,
    left: Option<FillSource>,
) {
    let fill = UnheldFill {
        order: req.order().id,
        renews: req.renews,
        moved,
        peer,
        left,
    };
    table.end_unheld(&req.key, fill, Instant::now());
}

/// Fill from the peer if one is named, else (or when it fails) from the origin; a copy this
/// edge already held answers either from its cache (unless `revalidate`: see [`fetch`]).
/// Returns the body size and what the fetch brought, and adds the bytes every attempt moved
/// to `moved` (the bandwidth budget is charged for all).
async fn fill_one(
    local: &Local,
    r: &FillRequest,
    revalidate: bool,
    max_bytes: u64,
    moved: &mut u64,
) -> Result<(u64, Fetched), String> {
    // A refresh must reach the origin: the peers hold the old version too.
    if let (Some(peer), false) = (&r.peer, r.refresh) {
        let mut from_peer = 0;
        let got = fetch(local, r, Some(peer), revalidate, max_bytes, &mut from_peer).await;
        *moved += from_peer;
        match got {
            Ok(fetched) => return Ok((from_peer, fetched)),
            Err(e) => {
                tracing::info!(key = %r.key, peer = %peer.id, error = %e, "peer fill failed; using the origin");
            }
        }
    }
    let mut from_origin = 0;
    let got = fetch(local, r, None, revalidate, max_bytes, &mut from_origin).await;
    *moved += from_origin;
    got.map(|fetched| (from_origin, fetched))
}

impl ShadowService {
    /// Expire marks: a never-used shadow is purged (or was already evicted by the cache),
    /// a used one stays as a normal entry; every ending is logged for the broker's ledger.
    fn sweep(&self) {
        let now = Instant::now();
        let n = self
            .sweeps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % EVICTION_SCAN_EVERY == EVICTION_SCAN_EVERY - 1 {
            for (key, mark) in self.table.take_evicted(|k| self.storage.holds(k)) {
                self.metrics
                    .shadows_expired
                    .with_label_values(&["evicted"])
                    .inc();
                self.table
                    .outcomes()
                    .push(mark.outcome(key, now, Ending::Evicted));
            }
        }
        for (e, mark) in self.table.expire(now) {
            let (key, label, evicted) = match e {
                Expired::Wasted(key) => {
                    let evicted = !self.storage.holds(&key);
                    // A copy the edge held before the order, or one a client fetched for
                    // itself, is an ordinary cache entry.
                    if mark.purge_with_mark() {
                        self.storage.purge_key(&key);
                    }
                    (key, if evicted { "evicted" } else { "wasted" }, evicted)
                }
                Expired::Used(key) => (key, "used", false),
            };
            self.metrics
                .shadows_expired
                .with_label_values(&[label])
                .inc();
            let end = if evicted {
                Ending::Evicted
            } else {
                Ending::Expired
            };
            self.table.outcomes().push(mark.outcome(key, now, end));
        }
    }
}

#[async_trait]
impl BackgroundService for ShadowService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let _until_purged = self.inflight.enter();
        // A redirect is the object (cached like any answer), not a place to go: followed, it
        // would send the fill, internal secret and all, wherever an origin pointed it.
        match crate::internal_http::client()
            .timeout(Duration::from_secs(60))
            .build()
        {
            Ok(client) => self.work(&client, &mut shutdown).await,
            Err(e) => {
                tracing::error!(error = %e, "shadow filler cannot build its HTTP client");
                let _ = shutdown.changed().await;
            }
        }
        let (stale, _records) = self.filler.close();
        futures::future::join_all(stale.iter().map(|key| {
            purge_stale(
                self.storage,
                &self.table,
                &self.metrics,
                key,
                "refresh_abandoned",
            )
        }))
        .await;
    }
}

impl ShadowService {
    /// Run fills until shutdown.
    async fn work(&self, client: &reqwest::Client, shutdown: &mut ShutdownWatch) {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut sweep = tokio::time::interval(Duration::from_millis(250));
        loop {
            // Wait for a worker slot first, so the heap (not a worker) holds waiting fills
            // and a later, more urgent order can still overtake them.
            let permit = tokio::select! {
                _ = shutdown.changed() => return,
                _ = sweep.tick() => { self.sweep(); continue; }
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            // Within the bandwidth budget: wait off the debt of earlier fills.
            loop {
                let wait = self.pacer.wait(Instant::now());
                if wait.is_zero() {
                    break;
                }
                let t = Instant::now();
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = sweep.tick() => self.sweep(),
                    _ = tokio::time::sleep(wait) => {}
                }
                self.metrics
                    .shadow_fill_paced_seconds
                    .inc_by(t.elapsed().as_secs_f64());
            }
            let (req, refreshing, under_way) = loop {
                if let Some(r) = self.filler.pop() {
                    break r;
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = sweep.tick() => self.sweep(),
                    _ = self.filler.queue.ready.notified() => {}
                }
            };
            let max_bytes = self.storage.max_object_bytes() as u64;
            let storage = self.storage;
            let local = Local {
                client: client.clone(),
                listen: self.listen,
                internal: self.internal.clone(),
                coding: self.encodings.most_asked(),
            };
            let (table, metrics, pacer) =
                (self.table.clone(), self.metrics.clone(), self.pacer.clone());
            let filler = self.filler.clone();
            // Work the drain waits for, so the fill's end (its mark, or its outcome) is in
            // the table before the stop saves what the table reports.
            let working = self.inflight.enter();
            let stopping = shutdown.clone();
            tokio::spawn(async move {
                let _working = working;
                let _permit = permit;
                let _refreshing = refreshing;
                // Dropped while it waited: the broker no longer wants it, or it was purged.
                if table.dropped_since(&req.key, req.queued_at) {
                    // Not under way: clients are not counted for a mark it will never set.
                    drop(under_way);
                    metrics.shadow_fills.with_label_values(&["dropped"]).inc();
                    // An unshadow keeps a copy clients used; one ordered refreshed is stale
                    // (unless a later order marked the key since: that mark is not ours).
                    if req.refresh && table.get(&req.key).is_none() {
                        purge_stale(storage, &table, &metrics, &req.key, "refresh_dropped").await;
                    }
                    report_unheld(&table, &req, 0, false, None);
                    return;
                }
                // A renewal whose mark ended while it waited (its TTL ran out, or it was
                // evicted) had its order reported with that end: a fetch now would bring a
                // copy no mark or report accounts for. A refresh still runs: the copy it
                // replaces may be held.
                if req.renews && !req.refresh && table.get(&req.key).is_none() {
                    drop(under_way);
                    metrics.shadow_fills.with_label_values(&["dropped"]).inc();
                    return;
                }
                let started = req.queued_at;
                let _under_way = under_way;
                let mut moved = 0;
                // The origin changed an object that varies: revalidating the one variant the
                // fill asks for would leave the others serving the old version, so every
                // variant goes and the fill fetches the new one afresh (clients meanwhile wait
                // on its fill, as after any purge).
                let replace_all = req.refresh && storage.varies(&req.key).await;
                if replace_all {
                    let before = storage.purge_baseline();
                    storage.invalidate_key(&req.key);
                    if let Err(e) = storage.settle_purge(&[&req.key], before).await {
                        // The old variants are gone from memory; the next purge of any key
                        // waits for their tombstones again.
                        tracing::warn!(error = %e, "refresh of variants");
                    }
                    metrics
                        .purges
                        .with_label_values(&["key", "refresh_of_variants"])
                        .inc();
                }
                let filled = fill_one(
                    &local,
                    &req,
                    req.refresh && !replace_all,
                    max_bytes,
                    &mut moved,
                )
                .await;
                // A copy the edge held moved nothing over the network: only what earlier
                // attempts brought counts against the fill bandwidth.
                let charged = match &filled {
                    Ok((bytes, f)) if f.source == FillSource::Local => moved.saturating_sub(*bytes),
                    _ => moved,
                };
                pacer.charge(charged, Instant::now());
                match filled {
                    Ok((bytes, Fetched { source, tags })) => {
                        // A refresh whose answer passed through uncached (the fill memory was
                        // full) left the old copy held: it goes, or it would be served as the
                        // version the origin replaced.
                        if req.refresh && !stored_since(storage, &req.key, started).await {
                            purge_stale(storage, &table, &metrics, &req.key, "refresh_not_stored")
                                .await;
                        }
                        // A renewal whose mark ended while it waited or filled (expired, or
                        // evicted) had this order's outcome reported with that end: a new
                        // mark named by it would report it twice. Its copy stays, unmarked.
                        let renewed_mark_ended = req.renews
                            && table.get(&req.key).is_none()
                            && !table.dropped_since(&req.key, started);
                        if renewed_mark_ended {
                            tracing::debug!(key = %req.key, "the mark this fill renews ended");
                            metrics.shadow_fills.with_label_values(&["dropped"]).inc();
                            return;
                        }
                        let now = Instant::now();
                        if !table.mark_filled(&req.key, req.ttl, req.order(), tags, started, now) {
                            tracing::debug!(key = %req.key, "purged or unshadowed while filling");
                            metrics.shadow_fills.with_label_values(&["dropped"]).inc();
                            // An unshadow that came while the body streamed in found no mark
                            // and no copy to remove: the copy it brought is removed now, as the
                            // unshadow would have, unless a client used it, the edge held it
                            // before, or a later order marked the key, fills it or waits to:
                            // the copy is that order's prefetch (purged, that order would be
                            // refused as purged after it was accepted, and lost). A purge
                            // since the fill started kept its copy out already (it cancelled
                            // the fill, or the answer was refused as purged during its fetch);
                            // purging the key again would take out the fill of an order that
                            // came after it. Asked in the order an order moves: queued, under
                            // way (from the moment it leaves the queue), marked (before its
                            // fill ends), so none slips between the questions.
                            let ours = source != FillSource::Local
                                && !purged_since(storage, &req.key, started)
                                && !table.fill_touched(&req.key)
                                && !filler.queued(&req.key)
                                && table.fills_under_way(&req.key) <= 1
                                && table.get(&req.key).is_none();
                            if ours {
                                let why = "unshadowed_while_filling";
                                purge_stale(storage, &table, &metrics, &req.key, why).await;
                            }
                            // Otherwise its copy stays if it was stored (its fetch came after
                            // the purge, say): the next order of the key takes it as its fill.
                            let left = (!ours && storage.holds(&req.key)).then_some(source);
                            let peer = source == FillSource::Peer;
                            report_unheld(&table, &req, charged, peer, left);
                            return;
                        }
                        // Passed through the cache uncached (the fill memory was full): its
                        // `X-Cache` said MISS, but nothing is held here. Not the key's fault,
                        // so no failure (which would back the key off): the shadow ends.
                        if source != FillSource::Local && !storage.holds(&req.key) {
                            tracing::info!(key = %req.key, "shadow fill passed through uncached");
                            metrics.shadow_fills.with_label_values(&["dropped"]).inc();
                            // Its outcome carries what the fill moved, which was paid for.
                            table.set_fill(&req.key, charged, source);
                            table.end_uncached(&req.key);
                            return;
                        }
                        table.set_fill(&req.key, bytes, source);
                        metrics.shadow_fills.with_label_values(&["filled"]).inc();
                        metrics
                            .shadow_fill_sources
                            .with_label_values(&[source.label()])
                            .inc();
                        if source != FillSource::Local {
                            metrics.shadow_fill_bytes.inc_by(bytes);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(key = %req.key, error = %e, "shadow fill failed");
                        metrics.shadow_fills.with_label_values(&["failed"]).inc();
                        // The broker refreshes the copies it holds live instead of purging
                        // them: one whose refresh failed is purged after all.
                        if req.refresh {
                            purge_stale(storage, &table, &metrics, &req.key, "refresh_failed")
                                .await;
                        } else if *stopping.borrow() {
                            // The edge stops (its listener no longer takes the fill): not the
                            // key's failure, which would hold the broker back from it.
                            report_unheld(&table, &req, moved, false, None);
                        } else if table.get(&req.key).is_none() && !req.renews {
                            // Any other failure means the broker's order holds nothing here
                            // (a renewal's order is reported with the mark it renamed, still
                            // held or ended already).
                            table.outcomes().push(ShadowOutcome {
                                bytes: moved,
                                order: req.order().id,
                                ..ShadowOutcome::failed(req.key.clone())
                            });
                        }
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_host_and_path() {
        assert_eq!(
            split_key("h.com/a?b=1"),
            Some(("h.com", "/a?b=1".to_string()))
        );
        assert_eq!(split_key("h.com/"), Some(("h.com", "/".to_string())));
        for dotted in [
            "h.com/a/../b",
            "h.com/a/./b",
            "h.com/pub/%2e%2e/priv/x",
            "h.com/pub/.%2E/x",
            "h.com/pub\\..\\x",
            "h.com/..",
        ] {
            assert_eq!(split_key(dotted), None, "{dotted}");
            assert!(
                FillRequest::validated(dotted, 60, 5, 3600).is_err(),
                "{dotted}"
            );
        }
        assert!(
            split_key("h.com/a..b/.c/x?q=/../").is_some(),
            "not whole segments"
        );
        // Re-encoded by URL parsing: the fill would fetch and store another key.
        for encoded in [
            "h.com/a?q='x'",
            "h.com/a b",
            "h.com/caf\u{e9}",
            "h.com/a?x=\"1\"",
            "h.com/a#frag",
        ] {
            assert_eq!(split_key(encoded), None, "{encoded}");
        }
        for kept in [
            "h.com/a?",
            "h.com/a?b=%27&c=d",
            "h.com/%7Euser/x%20y",
            "h.com/a;b=1",
        ] {
            assert!(split_key(kept).is_some(), "{kept}");
        }
        assert_eq!(split_key("/a"), None);
        let long = format!("h.com/{}", "a".repeat(MAX_KEY_BYTES));
        assert_eq!(
            FillRequest::validated(&long, 60, 5, 3600),
            Err(InvalidShadow::Key)
        );
        assert_eq!(split_key("nohost"), None);
    }

    #[test]
    fn an_overtaken_fill_reports_what_it_moved_unless_its_mark_spoke_for_it() {
        let table = ShadowTable::default();
        let mut req = FillRequest::validated("h.com/a", 60, 5, 3600).unwrap();
        report_unheld(&table, &req, 1234, true, None);
        let got = table.outcomes().drain_within(1 << 20);
        assert_eq!(got.len(), 1);
        let o = &got[0];
        assert!(o.removed && o.failed && o.peer_filled, "{o:?}");
        assert_eq!(o.bytes, 1234);
        // A renewal's order was the live mark's: the mark's removal reported its end.
        req.renews = true;
        report_unheld(&table, &req, 1234, false, None);
        assert!(table.outcomes().drain_within(1 << 20).is_empty());
    }

    #[test]
    fn validation_normalizes_and_bounds() {
        let r = FillRequest::validated("h.com/a", 60, 5, 3600).unwrap();
        assert_eq!(r.key, "h.com/a");
        assert_eq!(
            FillRequest::validated("nohost", 60, 5, 3600),
            Err(InvalidShadow::Key)
        );
        assert_eq!(
            FillRequest::validated("h.com/a", 0, 5, 3600),
            Err(InvalidShadow::Ttl(3600))
        );
        assert_eq!(
            FillRequest::validated("h.com/a", 60, 11, 3600),
            Err(InvalidShadow::Priority)
        );
    }

    #[test]
    fn queue_pops_earliest_deadline_then_priority_and_is_bounded() {
        let filler = Filler {
            queue: Arc::new(Queue::new(3)),
            table: Arc::new(ShadowTable::default()),
        };
        let req = |key: &str, deadline, priority| {
            FillRequest::validated(key, 60, priority, 3600)
                .unwrap()
                .deadline_ms(deadline)
        };
        filler.submit(req("h/late", 300, 9)).unwrap();
        filler.submit(req("h/soon-low", 100, 1)).unwrap();
        filler.submit(req("h/soon-high", 100, 8)).unwrap();
        assert!(matches!(
            filler.submit(req("h/x", 1, 1)),
            Err(FillError::QueueFull)
        ));
        let order: Vec<String> = std::iter::from_fn(|| filler.pop().map(|r| r.0.key)).collect();
        assert_eq!(order, vec!["h/soon-high", "h/soon-low", "h/late"]);
    }

    #[test]
    fn closing_refuses_orders_and_names_every_refresh_not_yet_done() {
        let filler = Filler {
            queue: Arc::new(Queue::new(8)),
            table: Arc::new(ShadowTable::default()),
        };
        let order = |key: &str, refresh: bool| {
            FillRequest::validated(key, 60, 5, 3600)
                .unwrap()
                .refreshing(refresh)
        };
        for (key, refresh) in [("h/a", true), ("h/b", true), ("h/c", false)] {
            filler.submit(order(key, refresh)).unwrap();
        }
        filler.submit(order("h/d", true)).unwrap();
        // Two refreshes run (one of them already finished), the rest wait.
        let mut running: Vec<_> = (0..3).map(|_| filler.pop().unwrap()).collect();
        let keys: Vec<&str> = running.iter().map(|(r, _, _)| r.key.as_str()).collect();
        assert_eq!(keys, ["h/a", "h/b", "h/c"]);
        assert!(running[2].1.is_none(), "not a refresh");
        running.remove(1);
        assert_eq!(filler.close().0, ["h/a", "h/d"]);
        // The order still queued ends as dropped while it waited: nothing moved, no failure.
        let ended = filler.table.outcomes().drain_within(1 << 20);
        let keys: Vec<&str> = ended.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["h/d"]);
        assert!(ended[0].removed && ended[0].bytes == 0, "{:?}", ended[0]);
        assert!(matches!(
            filler.submit(order("h/e", false)),
            Err(FillError::Closed)
        ));
        assert!(filler.pop().is_none(), "the queue went with the close");
        drop(running);
        assert!(filler.queue.pending.lock().refreshing.is_empty());
    }
}
