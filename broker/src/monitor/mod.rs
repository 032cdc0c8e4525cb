//! Request monitoring: the proxy hands each request's record to a bounded lock-free queue
//! (a failed push is a counted drop, never a wait), and with co-access on each read's start
//! too while the queue is less than half full, so its followers are shadowed before its
//! response ends (a start not queued is counted, and its record triggers them instead); one
//! aggregator thread drains it into the time-series store, and a snapshot thread writes the
//! store to disk so a restart keeps history.
//!
//! The aggregator never waits for the store's readers (a snapshot serializing a large store,
//! a planning tick): while they hold it, it keeps draining the queue into a buffer that it
//! applies once the store is free, so the queue does not fill and drop records meanwhile.

mod series;
mod sizes;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use parking_lot::RwLock;

pub use series::{Bucket, Observation, Series, SeriesStore};

use crate::config::MonitorSection;
use crate::metrics::BrokerMetrics;
use crate::signals::calibration::BANDS;
use crate::signals::{CoAccess, CoAccessSection, Trigger};

/// Co-access learning in the aggregator, and where its triggers go.
pub struct CoAccessFeed {
    /// Settings.
    pub cfg: CoAccessSection,
    /// The co-access service's queue (full: the trigger is dropped).
    pub triggers: tokio::sync::mpsc::Sender<Trigger>,
}

/// One proxied request.
#[derive(Debug, Clone)]
pub struct Record {
    /// Resource key (`host/path`, no query): what demand is aggregated by.
    pub resource: String,
    /// The cache key requested (`host/path?query`): what a shadow must be stored under.
    pub key: String,
    /// Seconds since the epoch.
    pub ts: u64,
    /// Client region index.
    pub region: u16,
    /// User segment, if the configured header was present.
    pub segment: Option<String>,
    /// Response body bytes.
    pub bytes: u64,
    /// The whole object's size when the response told it (a 200's `Content-Length`, a
    /// 206's `Content-Range` total; not a 304 or a body of unknown length): what a shadow
    /// of it costs, whatever part of it this request fetched.
    pub object_bytes: Option<u64>,
    /// Edge cache status (`hit`, `miss`, … or `origin`).
    pub cache_status: &'static str,
    /// Broker-side latency in microseconds.
    pub latency_us: u64,
    /// Hash of the client address (co-access pairs a client's consecutive requests).
    pub client: u64,
    /// When the request arrived (wall clock, ms; 0: unknown). Records are made as requests
    /// end, so co-access orders a client's requests by this instead.
    pub started_ms: u64,
    /// Its [`Start`] was queued, so co-access triggered its followers then: the record only
    /// teaches. Otherwise (co-access off, not a GET or HEAD, a key too long, the queue half
    /// full, the monitor stopping) the record triggers them, late but not never.
    pub announced: bool,
}

/// A read request as it begins, for co-access: its followers are shadowed now, while the
/// leader is still being answered, not when its record comes at the end. A page's assets
/// are asked for while the page is still arriving; triggered at its end, most of them would
/// come too late to shadow.
#[derive(Debug, Clone)]
pub struct Start {
    /// The cache key requested.
    pub key: String,
    /// Client region index.
    pub region: u16,
    /// Hash of the client address.
    pub client: u64,
    /// Seconds since the epoch (the broker's clock).
    pub ts: u64,
    /// Wall clock, ms: the same value its [`Record::started_ms`] will carry.
    pub started_ms: u64,
}

/// What the proxy queues for the aggregator.
enum Event {
    Start(Start),
    Done(Record),
}

/// Whether a request is demand for its resource, i.e. worth recording for the forecasts
/// and co-access: a read (GET or HEAD) answered with content or a confirmation of it (2xx,
/// 304). A POST, an error or a redirect asks for nothing a shadow could hold; counted, they
/// would pre-position whatever clients fail on or write to.
pub fn is_demand(method: &http::Method, status: u16) -> bool {
    (method == http::Method::GET || method == http::Method::HEAD)
        && ((200..300).contains(&status) || status == 304)
}

/// The whole object's size as a response tells it: a 200's `Content-Length` (a HEAD's too),
/// the total of a 206's `Content-Range`; `None` for anything else.
pub fn object_size(status: u16, headers: &http::HeaderMap) -> Option<u64> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let size: Option<u64> = match status {
        200 => text(http::header::CONTENT_LENGTH)?.trim().parse().ok(),
        206 => text(http::header::CONTENT_RANGE)?
            .rsplit_once('/')?
            .1
            .trim()
            .parse()
            .ok(),
        _ => None,
    };
    // An origin's claim: a bogus total must not swamp the series' sums.
    size.filter(|s| *s <= MAX_OBJECT_SIZE)
}

/// Longest resource plus key a request record may carry: with the default queue of 65,536
/// records, the strings the queue can hold stay under 128 MiB.
pub const MAX_RECORDED_KEY_BYTES: usize = 2048;

/// Largest object size a response is believed about (1 TiB).
const MAX_OBJECT_SIZE: u64 = 1 << 40;

/// The hot-path side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Recorder {
    queue: Arc<ArrayQueue<Event>>,
    enabled: bool,
    /// Co-access is on: request starts are queued too ([`Self::announce`]).
    announcing: bool,
    metrics: BrokerMetrics,
    /// Set when the aggregator is told to stop: later records have no one to take them.
    stop: Arc<AtomicBool>,
    /// Records between their look at `stop` and their push: the aggregator's last drain
    /// waits for them, so a record is either aggregated or counted as dropped.
    pushing: Arc<AtomicUsize>,
}

impl Recorder {
    /// Queue a record; drops (and counts) it when the queue is full. A record whose resource
    /// and key exceed [`MAX_RECORDED_KEY_BYTES`] is not kept (and counted): keys may be 8 KiB
    /// long, and the queue and the series would hold the strings of every one.
    pub fn record(&self, r: Record) {
        if !self.enabled {
            return;
        }
        if r.resource.len() + r.key.len() > MAX_RECORDED_KEY_BYTES {
            self.metrics.recorder_long_keys.inc();
            return;
        }
        if !self.push(Event::Done(r)) {
            self.metrics.recorder_drops.inc();
        }
    }

    /// Queue a read request's start for co-access; whether it was queued. Only while the
    /// queue is less than half full: the records, which the forecasts are made of, keep the
    /// other half. One not queued (counted, unless co-access is off or its key too long) is
    /// not a drop: its record triggers its followers instead.
    pub fn announce(&self, s: Start) -> bool {
        if !self.announcing || s.key.len() > MAX_RECORDED_KEY_BYTES {
            return false;
        }
        let queued = self.queue.len() < self.queue.capacity() / 2 && self.push(Event::Start(s));
        if !queued {
            self.metrics.recorder_starts_skipped.inc();
        }
        queued
    }

    /// Whether request starts are wanted ([`Self::announce`]): the proxy skips building one
    /// otherwise.
    pub fn announcing(&self) -> bool {
        self.announcing
    }

    fn push(&self, e: Event) -> bool {
        // Once stopped, refused at once: a push must not hold the aggregator's last drain.
        if self.stop.load(Ordering::Acquire) {
            return false;
        }
        // Announced before the look at `stop` (both sequentially consistent): an aggregator
        // that saw none pushing after it was told to stop drains after every push that saw
        // `stop` unset.
        self.pushing.fetch_add(1, Ordering::SeqCst);
        let queued = !self.stop.load(Ordering::SeqCst) && self.queue.push(e).is_ok();
        self.pushing.fetch_sub(1, Ordering::SeqCst);
        queued
    }

    /// Whether recording is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Records waiting for the aggregator.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queue.len()
    }
}

pub use crate::clock::now_secs;

/// The aggregating side: owns the store.
pub struct Monitor {
    store: Arc<RwLock<SeriesStore>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Dropped to stop the snapshot thread.
    snapshots_stop: Option<std::sync::mpsc::Sender<()>>,
    snapshots: Option<std::thread::JoinHandle<()>>,
    snapshot_path: PathBuf,
}

impl Monitor {
    /// Start the aggregator thread; loads the last snapshot from `snapshot_path` if present.
    /// One it cannot use is renamed aside, not overwritten by the next snapshot: days of
    /// history stay recoverable (e.g. by converting it back after a bucket width change).
    pub fn start(
        cfg: &MonitorSection,
        regions: Vec<String>,
        snapshot_path: PathBuf,
        metrics: BrokerMetrics,
        coaccess: Option<CoAccessFeed>,
    ) -> (Monitor, Recorder) {
        let mut store = SeriesStore::new(cfg.bucket_secs, cfg.retention_buckets, cfg.max_series)
            .with_max_buckets(cfg.max_buckets);
        load_snapshot(&mut store, &snapshot_path);
        let store = Arc::new(RwLock::new(store));
        let queue = Arc::new(ArrayQueue::new(cfg.queue_capacity));
        let stop = Arc::new(AtomicBool::new(false));
        let pushing = Arc::new(AtomicUsize::new(0));
        let recorder = Recorder {
            queue: queue.clone(),
            enabled: cfg.enabled,
            announcing: cfg.enabled && coaccess.is_some(),
            metrics: metrics.clone(),
            stop: stop.clone(),
            pushing: pushing.clone(),
        };
        let thread = {
            let (store, stop, path) = (store.clone(), stop.clone(), snapshot_path.clone());
            std::thread::Builder::new()
                .name("monitor".into())
                .spawn(move || {
                    let sink = Sink {
                        store,
                        regions,
                        metrics,
                        coaccess: coaccess.map(|f| (CoAccess::new(f.cfg), f.triggers)),
                        triggered: HashMap::new(),
                        sizes: Default::default(),
                        offers_counted: Default::default(),
                    };
                    aggregate(queue, sink, (stop, pushing), path)
                })
                .ok()
        };
        let (snapshots_stop, stopped) = std::sync::mpsc::channel::<()>();
        let snapshots = {
            let (store, path) = (store.clone(), snapshot_path.clone());
            let every = Duration::from_secs(cfg.snapshot_secs.max(1));
            std::thread::Builder::new()
                .name("monitor-snapshot".into())
                .spawn(move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(every)
                    {
                        snapshot(&store, &path);
                    }
                })
                .ok()
        };
        (
            Monitor {
                store,
                stop,
                thread,
                snapshots_stop: Some(snapshots_stop),
                snapshots,
                snapshot_path,
            },
            recorder,
        )
    }

    /// Read access to the series.
    pub fn store(&self) -> Arc<RwLock<SeriesStore>> {
        self.store.clone()
    }

    /// Drain what is queued, snapshot, and stop the thread.
    pub fn shutdown(mut self) {
        // The periodic snapshots end first (one under way finishes): the final one is the
        // aggregator's, and two writers must not share the temporary file.
        drop(self.snapshots_stop.take());
        if let Some(t) = self.snapshots.take() {
            let _ = t.join();
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::info!(path = %self.snapshot_path.display(), "monitor stopped");
    }
}

/// Where aggregated records go.
struct Sink {
    store: Arc<RwLock<SeriesStore>>,
    regions: Vec<String>,
    metrics: BrokerMetrics,
    coaccess: Option<(CoAccess, tokio::sync::mpsc::Sender<Trigger>)>,
    /// When each (region, leader) last sent its followers (record time): while the trigger
    /// queue is crowded, a hot page sends them once per [`TRIGGER_EVERY_SECS`], not on every
    /// request.
    triggered: HashMap<(u16, String), u64>,
    /// Followers' object sizes, read from the store at most once a minute.
    sizes: sizes::SizeMemo,
    /// The co-access offers' outcomes already counted in the metrics.
    offers_counted: [(u64, u64); BANDS],
}

/// Seconds (of record time) between two triggers of one leader in one region: a page asked
/// for hundreds of times a second would otherwise fill the trigger queue, and other pages'
/// triggers would be dropped.
const TRIGGER_EVERY_SECS: u64 = 2;
/// Leaders [`Sink::triggered`] remembers before it forgets those past their interval.
const MAX_TRIGGERED: usize = 1 << 16;

impl Sink {
    /// Learn co-access from a record, and trigger its followers' shadows unless its start
    /// did.
    fn coaccess(&mut self, r: &Record) {
        let Some((map, _)) = &mut self.coaccess else {
            return;
        };
        // A request whose start was not queued follows its offers as it ends.
        if !r.announced {
            map.asked(r.client, &r.key, r.ts, r.started_ms);
        }
        // Cache keys, not resources: a follower must be shadowed under the key it is asked by.
        map.observe_started(r.client, r.region, &r.key, r.ts, r.started_ms);
        if !r.announced {
            self.trigger(r.region, &r.key, r.client, r.ts, r.started_ms, false);
        }
    }

    /// The co-access map's size and its offers' outcomes, into the metrics.
    fn count_coaccess(&mut self) {
        let Some((map, _)) = &self.coaccess else {
            return;
        };
        self.metrics.coaccess_pairs.set(map.pairs() as i64);
        self.metrics.coaccess_bytes.set(map.bytes() as i64);
        for (b, (now, counted)) in map
            .outcomes()
            .iter()
            .zip(self.offers_counted.iter_mut())
            .enumerate()
        {
            if *now == *counted {
                continue;
            }
            let band = format!("{:.1}", b as f64 / BANDS as f64);
            for (outcome, n, was) in [
                ("followed", now.0, &mut counted.0),
                ("not_followed", now.1, &mut counted.1),
            ] {
                if n > *was {
                    self.metrics
                        .coaccess_offers
                        .with_label_values(&[&band, outcome])
                        .inc_by(n - *was);
                    *was = n;
                }
            }
        }
    }

    /// A request as it starts: it follows the offers of it, and triggers its own followers.
    fn started(&mut self, s: &Start) {
        if let Some((map, _)) = &mut self.coaccess {
            map.asked(s.client, &s.key, s.ts, s.started_ms);
        }
        self.trigger(s.region, &s.key, s.client, s.ts, s.started_ms, true);
    }

    /// Send `key`'s likely followers in `region` to the co-access service, less those
    /// `client` asked for since the leader started; `at_start` if it is starting now (then
    /// its offers are scored, [`CoAccess::offer`]).
    fn trigger(
        &mut self,
        region: u16,
        key: &str,
        client: u64,
        ts: u64,
        started_ms: u64,
        at_start: bool,
    ) {
        let Some((map, triggers)) = &mut self.coaccess else {
            return;
        };
        let (mut followers, asked) = map.offer(client, region, key, ts, started_ms, at_start);
        self.metrics
            .coaccess_followers
            .inc_by((asked + followers.len()) as u64);
        if asked > 0 {
            self.metrics
                .coaccess_shadows
                .with_label_values(&["asked_already"])
                .inc_by(asked as u64);
        }
        if !followers.is_empty() {
            // Once the queue is half full, a leader that sent its followers lately waits its
            // turn, so that one hot page does not crowd out every other page's triggers.
            let crowded = triggers.capacity() < triggers.max_capacity() / 2;
            let leader = (region, key.to_string());
            if crowded
                && self
                    .triggered
                    .get(&leader)
                    .is_some_and(|t| ts.saturating_sub(*t) < TRIGGER_EVERY_SECS)
            {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["leader_repeated"])
                    .inc_by(followers.len() as u64);
                return;
            }

            // Never waits: behind a snapshot (or a writer queued behind one) the records would
            // pile up and be dropped. Without the store the followers' sizes are unknown, and
            // they are not shadowed this time.
            let Some(store) = self.store.try_read() else {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["store_busy"])
                    .inc_by(followers.len() as u64);
                return;
            };
            for f in &mut followers {
                let resource = f.key.split_once('?').map_or(f.key.as_str(), |(r, _)| r);
                f.bytes = self.sizes.size(resource, ts, || {
                    store.query(resource).and_then(|by_region| {
                        by_region.values().filter_map(|s| s.mean_bytes()).max()
                    })
                });
            }
            drop(store);
            if self.triggered.len() >= MAX_TRIGGERED {
                self.triggered
                    .retain(|_, t| ts.saturating_sub(*t) < TRIGGER_EVERY_SECS);
                if self.triggered.len() >= MAX_TRIGGERED {
                    self.triggered.clear();
                }
            }
            self.triggered.insert(leader, ts);
            let n = followers.len() as u64;
            let sent = triggers.try_send(Trigger {
                region: region as usize,
                leader: key.to_string(),
                followers,
            });
            if sent.is_err() {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["queue_full"])
                    .inc_by(n);
            }
        }
    }
}

/// Records held back while the store is busy; past this many, or past [`MAX_PENDING_BYTES`]
/// of them, the aggregator waits for it (a reader would have to hold the store for seconds
/// at a high request rate).
const MAX_PENDING: usize = 1 << 18;
/// What held-back records may take: their strings are client-chosen and may be 2 KiB each,
/// so a count alone would let the backlog reach half a gigabyte.
const MAX_PENDING_BYTES: usize = 64 << 20;

/// What a held-back record takes in memory, its strings included.
fn held_bytes(r: &Record) -> usize {
    std::mem::size_of::<Record>()
        + r.resource.len()
        + r.key.len()
        + r.segment.as_ref().map_or(0, String::len)
}

/// The aggregator's stop flag and the count of records being pushed ([`Recorder`]).
type StopSignal = (Arc<AtomicBool>, Arc<AtomicUsize>);

fn aggregate(queue: Arc<ArrayQueue<Event>>, mut sink: Sink, stop: StopSignal, path: PathBuf) {
    let mut pending: Vec<Record> = Vec::new();
    let mut pending_bytes = 0usize;
    let (stop, pushing) = stop;
    loop {
        // Told to stop: once no record is between its look at the flag and its push, take
        // what is queued, snapshot, and stop.
        let stopping = stop.load(Ordering::SeqCst) && pushing.load(Ordering::SeqCst) == 0;
        let mut arrived = 0usize;
        // Co-access acts on arrival, in the order requests started and ended: a follower's
        // shadow is only useful before it is asked for.
        while let Some(e) = queue.pop() {
            arrived += 1;
            match e {
                Event::Start(s) => sink.started(&s),
                Event::Done(r) => {
                    sink.coaccess(&r);
                    pending_bytes += held_bytes(&r);
                    pending.push(r);
                }
            }
            if arrived >= 4096 {
                break;
            }
        }
        sink.count_coaccess();
        let mut n = 0u64;
        if !pending.is_empty() {
            let store =
                if stopping || pending.len() >= MAX_PENDING || pending_bytes >= MAX_PENDING_BYTES {
                    Some(sink.store.write())
                } else {
                    sink.store.try_write()
                };
            if let Some(mut s) = store {
                for r in pending.drain(..) {
                    let region = sink
                        .regions
                        .get(r.region as usize)
                        .map_or("unknown", String::as_str);
                    s.add(&Observation {
                        resource: &r.resource,
                        key: &r.key,
                        region,
                        segment: r.segment.as_deref(),
                        ts: r.ts,
                        bytes: r.bytes,
                        object_bytes: r.object_bytes,
                        hit: matches!(r.cache_status, "hit" | "stale" | "stale-updating"),
                    });
                    n += 1;
                }
                pending_bytes = 0;
                // A backlog from a long reader does not keep its memory afterwards.
                pending.shrink_to(4096);
            }
        }
        sink.metrics.recorded.inc_by(n);
        if stopping && queue.is_empty() && pending.is_empty() {
            snapshot(&sink.store, &path);
            return;
        }
        if arrived == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Restore `store` from the snapshot at `path`. A snapshot that cannot be used, or read
/// (a permission or device error), is set aside, so the next snapshot does not replace days
/// of history with an empty store.
fn load_snapshot(store: &mut SeriesStore, path: &std::path::Path) {
    // Read through a buffer, not whole: the file is about twice the store's size.
    let file = std::fs::File::open(path).map(|f| std::io::BufReader::with_capacity(1 << 20, f));
    let adopted = match file {
        Ok(reader) => match serde_json::from_reader::<_, SeriesStore>(reader) {
            Ok(snap) => store.restore(snap, now_secs()),
            Err(e) => {
                tracing::warn!(error = %e, "monitor snapshot unreadable");
                false
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "monitor snapshot cannot be read");
            false
        }
    };
    if !adopted {
        set_aside(path);
    }
}

/// Write the store atomically: temp file, fsync, rename, fsync of the directory (so the
/// rename itself survives a crash). A copy of the store is taken under the read lock and
/// streamed to the file after it is released: a slow disk must not hold the store (the
/// aggregator waits for it once its buffer of held-back records is full), and the copy is
/// about half what the JSON would be built whole in memory (a gigabyte at the default bucket
/// budget).
fn snapshot(store: &RwLock<SeriesStore>, path: &std::path::Path) {
    let copy = store.read().clone();
    let written = edge_node::durable::write_atomic_with(path, |w| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, w);
        serde_json::to_writer(&mut out, &copy).map_err(std::io::Error::from)?;
        std::io::Write::flush(&mut out)
    });
    if let Err(e) = written {
        tracing::warn!(error = %e, path = %path.display(), "monitor snapshot failed");
    }
}

/// Rename an unusable snapshot to `<name>.unused-<unix secs>` so the next snapshot does not
/// overwrite it.
fn set_aside(path: &std::path::Path) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".unused-{secs}"));
    match std::fs::rename(path, &aside) {
        Ok(()) => {
            tracing::warn!(kept = %std::path::Path::new(&aside).display(), "monitor starts empty; the unusable snapshot was set aside")
        }
        Err(e) => {
            tracing::error!(error = %e, "monitor snapshot could not be set aside; the next snapshot replaces it")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A sink with co-access on, sending its triggers to a queue of `capacity`.
    fn coaccess_sink(
        metrics: &BrokerMetrics,
        capacity: usize,
    ) -> (Sink, tokio::sync::mpsc::Receiver<Trigger>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        let sink = Sink {
            store: Arc::new(RwLock::new(series::SeriesStore::new(60, 10, 100))),
            regions: vec!["eu".into()],
            metrics: metrics.clone(),
            coaccess: Some((CoAccess::new(CoAccessSection::default()), tx)),
            triggered: HashMap::new(),
            sizes: Default::default(),
            offers_counted: Default::default(),
        };
        (sink, rx)
    }

    /// A 100-byte hit on `key` in region 0.
    fn hit(key: &str, client: u64, ts: u64, started_ms: u64, announced: bool) -> Record {
        Record {
            resource: key.into(),
            key: key.into(),
            ts,
            region: 0,
            segment: None,
            bytes: 100,
            object_bytes: Some(100),
            cache_status: "hit",
            latency_us: 0,
            client,
            started_ms,
            announced,
        }
    }

    #[test]
    fn only_reads_answered_with_content_are_demand() {
        use http::Method;
        for status in [200, 203, 206, 304] {
            assert!(is_demand(&Method::GET, status), "{status}");
            assert!(is_demand(&Method::HEAD, status), "{status}");
        }
        for status in [0, 301, 302, 400, 404, 416, 500, 502, 503] {
            assert!(!is_demand(&Method::GET, status), "{status}");
        }
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert!(!is_demand(&method, 200), "{method}");
        }
    }

    #[test]
    fn object_sizes_come_from_the_length_or_the_range_total() {
        let h = |name: &'static str, v: &'static str| {
            let mut m = http::HeaderMap::new();
            m.insert(name, http::HeaderValue::from_static(v));
            m
        };
        assert_eq!(object_size(200, &h("content-length", "1234")), Some(1234));
        assert_eq!(
            object_size(206, &h("content-range", "bytes 0-99/5000")),
            Some(5000)
        );
        assert_eq!(object_size(206, &h("content-range", "bytes 0-99/*")), None);
        assert_eq!(object_size(304, &h("content-length", "1234")), None);
        assert_eq!(object_size(200, &http::HeaderMap::new()), None);
        let bogus = "bytes 0-1/18446744073709551615";
        assert_eq!(object_size(206, &h("content-range", bogus)), None);
    }

    /// While the trigger queue is half full, a leader that sent its followers lately does not
    /// send them again: one hot page must not crowd out every other page's triggers.
    #[test]
    fn a_crowded_trigger_queue_takes_each_leader_once_a_while() {
        let metrics = BrokerMetrics::register(&prometheus::Registry::new()).unwrap();
        let (mut sink, mut rx) = coaccess_sink(&metrics, 4);
        let rec = |key: &str, client: u64, ts: u64| hit(key, client, ts, 0, false);
        // Clients that ask for the page and then its script teach the pair.
        for client in 0..8 {
            sink.coaccess(&rec("h/page", client, 100));
            sink.coaccess(&rec("h/app.js", client, 100));
        }
        let mut sent = 0;
        while rx.try_recv().is_ok() {
            sent += 1;
        }
        assert!(sent > 0, "the pair was learnt");
        let repeated = || {
            metrics
                .coaccess_shadows
                .with_label_values(&["leader_repeated"])
                .get()
        };
        // Ten views at once: taken until the queue (4) is half full, then held back.
        let view = |sink: &mut Sink, client: u64, ts: u64| {
            sink.coaccess(&rec("h/page", client, ts));
            sink.coaccess(&rec("h/app.js", client, ts));
        };
        for client in 10..20 {
            view(&mut sink, client, 101);
        }
        assert!(repeated() >= 7, "{}", repeated());
        // Once its interval has passed, the page's next view is taken, crowded or not.
        view(&mut sink, 20, 101 + TRIGGER_EVERY_SECS);
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 4);
        // An uncrowded queue takes every view, however recent.
        let before = repeated();
        view(&mut sink, 21, 101 + TRIGGER_EVERY_SECS);
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 1);
        assert_eq!(repeated(), before);
    }

    /// A request's followers are triggered by its start, while it is still being answered;
    /// its record then only teaches. A record whose start was not queued triggers them.
    #[test]
    fn followers_are_triggered_at_the_start_and_the_record_only_teaches() {
        let metrics = BrokerMetrics::register(&prometheus::Registry::new()).unwrap();
        let (mut sink, mut rx) = coaccess_sink(&metrics, 64);
        let rec = |key: &str, client: u64, started_ms: u64, announced: bool| {
            hit(key, client, 100, started_ms, announced)
        };
        for client in 1..9 {
            sink.coaccess(&rec("h/page", client, 1_000, false));
            sink.coaccess(&rec("h/app.js", client, 1_100, false));
        }
        while rx.try_recv().is_ok() {}

        // A new view: the page's start sends its script at once.
        sink.started(&Start {
            key: "h/page".into(),
            region: 0,
            client: 20,
            ts: 100,
            started_ms: 5_000,
        });
        let t = rx.try_recv().expect("triggered at the start");
        assert_eq!(t.leader, "h/page");
        assert_eq!(t.followers[0].key, "h/app.js");
        // Its script starts: the offer came true.
        sink.started(&Start {
            key: "h/app.js".into(),
            region: 0,
            client: 20,
            ts: 100,
            started_ms: 5_100,
        });
        while rx.try_recv().is_ok() {}
        let followed = |sink: &Sink| {
            let map = &sink.coaccess.as_ref().unwrap().0;
            map.outcomes()
                .iter()
                .fold((0, 0), |a, o| (a.0 + o.0, a.1 + o.1))
        };
        assert_eq!(followed(&sink), (1, 0), "only the start's offer is scored");
        sink.count_coaccess();
        assert_eq!(
            sink.metrics
                .coaccess_offers
                .with_label_values(&["0.9", "followed"])
                .get()
                + sink
                    .metrics
                    .coaccess_offers
                    .with_label_values(&["0.8", "followed"])
                    .get(),
            1
        );
        // Its script comes, then the page's record: neither triggers again.
        sink.coaccess(&rec("h/app.js", 20, 5_100, true));
        sink.coaccess(&rec("h/page", 20, 5_000, true));
        assert!(rx.try_recv().is_err(), "the record only teaches");
        let learnt = sink.coaccess.as_ref().unwrap().0.followers(0, "h/page");
        assert!(learnt[0].probability > 0.8, "{learnt:?}");

        // A page whose start was not queued triggers at its record.
        sink.coaccess(&rec("h/page", 21, 6_000, false));
        assert_eq!(
            rx.try_recv().expect("triggered at the record").leader,
            "h/page"
        );
        // Its offers are not scored: those already asked for were dropped from them.
        sink.coaccess(&rec("h/elsewhere", 22, 9_000, false));
        let map = &mut sink.coaccess.as_mut().unwrap().0;
        map.asked(22, "h/x", 10_000, 0);
        assert_eq!(followed(&sink), (1, 0));
    }

    #[test]
    fn starts_are_queued_only_when_co_access_wants_them() {
        let metrics = BrokerMetrics::register(&prometheus::Registry::new()).unwrap();
        let recorder = |announcing| Recorder {
            queue: Arc::new(ArrayQueue::new(4)),
            enabled: true,
            announcing,
            metrics: metrics.clone(),
            stop: Arc::default(),
            pushing: Arc::default(),
        };
        let start = |key: String| Start {
            key,
            region: 0,
            client: 1,
            ts: 0,
            started_ms: 0,
        };
        assert!(!recorder(false).announce(start("h/a".into())));
        let on = recorder(true);
        let long = format!("h/a?{}", "x".repeat(MAX_RECORDED_KEY_BYTES));
        assert!(!on.announce(start(long)), "a key too long to record");
        assert!(on.announce(start("h/a".into())));
        assert!(on.announce(start("h/b".into())));
        assert!(!on.announce(start("h/c".into())), "the queue is half full");
        on.record(hit("h/a", 1, 0, 0, true));
        on.record(hit("h/b", 1, 0, 0, true));
        assert_eq!(on.queued(), 4, "the records keep the other half");
        assert_eq!(metrics.recorder_drops.get(), 0, "a start is not a record");
        assert_eq!(metrics.recorder_starts_skipped.get(), 1);
    }

    #[test]
    fn a_record_with_an_overlong_key_is_counted_not_queued() {
        let metrics = BrokerMetrics::register(&prometheus::Registry::new()).unwrap();
        let recorder = Recorder {
            queue: Arc::new(ArrayQueue::new(4)),
            enabled: true,
            announcing: false,
            metrics: metrics.clone(),
            stop: Arc::default(),
            pushing: Arc::default(),
        };
        let with_key = |key: String| Record {
            resource: "h/a".into(),
            key,
            ts: 0,
            region: 0,
            segment: None,
            bytes: 0,
            object_bytes: None,
            cache_status: "hit",
            latency_us: 0,
            client: 0,
            started_ms: 0,
            announced: false,
        };
        recorder.record(with_key(format!(
            "h/a?{}",
            "x".repeat(MAX_RECORDED_KEY_BYTES)
        )));
        assert_eq!(
            (recorder.queued(), metrics.recorder_long_keys.get()),
            (0, 1)
        );
        recorder.record(with_key("h/a?x=1".into()));
        assert_eq!(
            (recorder.queued(), metrics.recorder_long_keys.get()),
            (1, 1)
        );
    }

    #[test]
    fn records_keep_flowing_while_a_reader_holds_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("monitor.json");
        let cfg = MonitorSection {
            queue_capacity: 128,
            snapshot_secs: 3600,
            ..MonitorSection::default()
        };
        let metrics = BrokerMetrics::register(&prometheus::Registry::new()).unwrap();
        let (monitor, recorder) =
            Monitor::start(&cfg, vec!["eu".into()], path.clone(), metrics.clone(), None);
        let store = monitor.store();
        let record = || Record {
            resource: "h/a".into(),
            key: "h/a".into(),
            ts: now_secs(),
            region: 0,
            segment: None,
            bytes: 10,
            object_bytes: Some(10),
            cache_status: "hit",
            latency_us: 1,
            client: 1,
            started_ms: 0,
            announced: false,
        };
        // A long reader (a snapshot of a large store, a planning tick) holds the store while
        // ten queues' worth of records arrive: the aggregator keeps the queue drained.
        let reader = store.read();
        for _ in 0..10 {
            for _ in 0..100 {
                recorder.record(record());
            }
            wait_for("the queue drains", || recorder.queued() == 0);
        }
        assert_eq!(metrics.recorder_drops.get(), 0);
        assert_eq!(
            metrics.recorded.get(),
            0,
            "held back while the store is busy"
        );
        drop(reader);
        wait_for("the held records land", || metrics.recorded.get() == 1000);
        assert_eq!(store.read().total("h/a", "eu"), 1000);
        monitor.shutdown();
        let snap: SeriesStore = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(snap.total("h/a", "eu"), 1000, "the final snapshot has them");
    }

    #[test]
    fn every_record_across_the_shutdown_is_aggregated_or_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("monitor.json");
        let cfg = MonitorSection {
            queue_capacity: 1 << 16,
            snapshot_secs: 3600,
            ..MonitorSection::default()
        };
        let metrics = BrokerMetrics::register(&prometheus::Registry::new()).unwrap();
        let (monitor, recorder) =
            Monitor::start(&cfg, vec!["eu".into()], path.clone(), metrics.clone(), None);
        let go = Arc::new(AtomicBool::new(true));
        let senders: Vec<_> = (0..3)
            .map(|_| {
                let (recorder, go) = (recorder.clone(), go.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while go.load(Ordering::Relaxed) {
                        recorder.record(Record {
                            resource: "h/a".into(),
                            key: "h/a".into(),
                            ts: now_secs(),
                            region: 0,
                            segment: None,
                            bytes: 1,
                            object_bytes: None,
                            cache_status: "miss",
                            latency_us: 1,
                            client: 1,
                            started_ms: 0,
                            announced: false,
                        });
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        monitor.shutdown();
        std::thread::sleep(Duration::from_millis(20));
        go.store(false, Ordering::Relaxed);
        let sent: u64 = senders.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(
            metrics.recorder_drops.get() > 0,
            "records after the stop are counted"
        );
        assert_eq!(metrics.recorded.get() + metrics.recorder_drops.get(), sent);
    }

    #[test]
    fn a_snapshot_that_cannot_be_read_is_set_aside_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("monitor.json");
        // A read error that is not "missing" (here: a directory where the file should be).
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"kept").unwrap();
        let mut store = SeriesStore::new(60, 10, 10);
        load_snapshot(&mut store, &path);
        assert!(store.is_empty());
        assert!(!path.exists(), "moved out of the next snapshot's way");
        let kept: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(std::fs::read(kept[0].join("inside")).unwrap(), b"kept");
        // No snapshot at all is the normal first start: nothing is set aside.
        let mut store = SeriesStore::new(60, 10, 10);
        load_snapshot(&mut store, &dir.path().join("absent.json"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_unusable_snapshot_is_kept_beside_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("monitor.json");
        std::fs::write(&path, b"{ not a snapshot").unwrap();
        super::set_aside(&path);
        assert!(!path.exists());
        let kept: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(kept.len(), 1);
        assert!(kept[0].starts_with("monitor.json.unused-"), "{kept:?}");
    }
}
