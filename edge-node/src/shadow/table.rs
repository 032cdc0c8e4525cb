//! Shadow marks: objects pre-positioned on this edge because demand is predicted here.
//!
//! A shadow is an ordinary cached object (filled through the edge's own cache path, so HTTP
//! freshness, coalescing with user misses and size limits all apply) plus a mark with an
//! expiry. foyer has no per-entry TTL, so expiries live here in a min-heap. When a mark
//! expires, a shadow that was never requested is purged (it was a wasted prefetch and only
//! takes space); one that served requests is demoted to a normal cache entry. A renewal (an
//! order for a key already marked, e.g. from a widening or a co-access follower) that
//! extends a mark adds no heap entry: the mark's one entry is moved to the new expiry when it
//! comes up, so the heap stays the size of the table; the entries of marks removed early are
//! dropped once they outnumber the marks.
//!
//! A mark knows its object's cache tags (as its fill saw them), so a tag purge ends the marks
//! of the objects it bans. A client served while a shadow is still filling (reading the fill
//! as it streams) is counted when the fill's mark is set.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::OutcomeLog;
use crate::sync::protocol::ShadowOutcome;

/// How long a purge or unshadow is held against fills in flight when it arrived (fills time
/// out after 60 s); a fill that started before what is remembered is not marked.
const DROP_MEMORY: Duration = Duration::from_secs(600);
/// Most purges and unshadows remembered.
const MAX_DROPS: usize = 4096;
/// Slots of key hashes that remember when a forgotten key drop happened, so that a burst of
/// key purges or unshadows past [`MAX_DROPS`] holds back only the fills of keys sharing a
/// slot with one of them, not every fill queued before it (512 KiB, allocated at the first).
const FORGOTTEN_SLOTS: usize = 65_536;
/// Most tags a mark lists; an object with more is ended by any tag purge of its host.
const MAX_TAGS: usize = 64;
/// How long a copy a dropped fill left ([`ShadowTable::end_unheld`]) waits for the next order
/// of its key; one that comes later finds it held like any other copy.
const LEFT_FOR: Duration = Duration::from_secs(300);
/// Most copies left waiting at once.
const MAX_LEFT: usize = 4096;

/// The cache tags of a shadow's object ([`crate::tags`]), as its fill saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillTags {
    /// These tags, lower-cased (none: untagged).
    Listed(Vec<String>),
    /// More than [`MAX_TAGS`]: treated as carrying every tag.
    Many,
}

impl Default for FillTags {
    fn default() -> Self {
        FillTags::Listed(Vec::new())
    }
}

impl FillTags {
    /// The tags of a response with `headers`.
    pub fn of(headers: &http::HeaderMap) -> Self {
        let mut listed: Vec<String> = Vec::new();
        let many = crate::tags::any(headers, |t| {
            if !listed.iter().any(|l| l == t) {
                listed.push(t.to_string());
            }
            listed.len() > MAX_TAGS
        });
        if many {
            FillTags::Many
        } else {
            FillTags::Listed(listed)
        }
    }

    /// Whether the object carries one of `tags` (checked, lower-cased).
    fn any_of(&self, tags: &[String]) -> bool {
        match self {
            FillTags::Listed(listed) => listed.iter().any(|t| tags.contains(t)),
            FillTags::Many => true,
        }
    }
}

/// A purge or unshadow, remembered against fills in flight.
#[derive(Debug)]
enum Dropped {
    Key(String),
    Prefix(String),
    /// Objects whose key starts with `host` (`host/`) carrying one of `tags`.
    Tags {
        host: String,
        tags: Vec<String>,
    },
}

impl Dropped {
    /// Whether it drops `key`, whose object carries `tags` (`None`: not known yet, which
    /// no tag purge matches; the fill's mark checks again once they are).
    fn drops(&self, key: &str, tags: Option<&FillTags>) -> bool {
        match self {
            Dropped::Key(k) => key == k,
            Dropped::Prefix(p) => key.starts_with(p.as_str()),
            Dropped::Tags { host, tags: purged } => {
                key.starts_with(host.as_str()) && tags.is_some_and(|t| t.any_of(purged))
            }
        }
    }
}

/// Clients served from a shadow still being filled, before its mark exists.
#[derive(Debug)]
struct Filling {
    /// Fills of the key under way.
    fills: u32,
    hits: u64,
    touched: bool,
    /// When the first of them began.
    started: Instant,
    /// How long after `started` the first client came.
    head_start: Option<Duration>,
}

/// One shadow mark.
#[derive(Debug, Clone)]
pub struct Mark {
    /// When the mark expires.
    pub expires: Instant,
    /// Provider priority 0–10.
    pub priority: u8,
    /// Requests served from this shadow.
    pub hits: u64,
    /// Body bytes of the filled object (0 until filled).
    pub bytes: u64,
    /// When the shadow was first marked (a renewal keeps it).
    pub marked_at: Instant,
    /// Whether a peer edge (not the origin) supplied the object.
    pub peer_filled: bool,
    /// Whether the edge already held a fresh copy when the shadow was first ordered (its first
    /// fill was a local hit). Such a mark moved nothing; at expiry the copy is left alone.
    pub held_before: bool,
    /// Whether a client asked for the key while marked, from the shadow or not (after the
    /// copy expired or was evicted, a client's own fetch replaced it): that copy is the
    /// client's, and is not purged with the mark.
    pub touched: bool,
    /// Whether a client's own fetch stored a copy of the key while marked (the shadow's was
    /// gone: evicted, or another variant asked): later hits are on that copy, and are not
    /// counted as the shadow's.
    pub refetched: bool,
    /// How far the fill was ahead of the first client, when that client came while it was
    /// still filling (and waited for the rest); `None` when it found the shadow complete.
    pub head_start: Option<Duration>,
    /// Whether the first fill completed (renewals do not change where the copy came from).
    filled: bool,
    /// Its copy was fetched by an earlier order's fill, dropped while it ran, whose outcome
    /// carried the fill's cost ([`ShadowTable::end_unheld`]): a prefetch, but one whose fill
    /// is not priced again.
    fill_paid: bool,
    /// The object's tags, as the latest fill saw them.
    tags: FillTags,
    /// The latest order accepted for it, as the broker named it (the order's `deadline_ms`,
    /// which the broker keeps distinct between its orders of one key for one edge); echoed in
    /// the outcome so the broker settles the order it belongs to, whatever the clocks say.
    order: Option<u64>,
    /// When that order was accepted ([`Order::accepted`]).
    accepted: u64,
    /// Generation, so a renewed mark is not ended by a check made before the renewal.
    generation: u64,
    /// The heap entry that stands for this mark: its time (never after `expires`) and id.
    scheduled: (Instant, u64),
}

/// The order a fill marks its shadow for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    /// Provider priority 0–10.
    pub priority: u8,
    /// How the broker names the order ([`Mark::order`]); `None` for an order that names
    /// none (the admin API's).
    pub id: Option<u64>,
    /// Its place in the order this edge accepted orders: a mark is named by the latest
    /// order accepted for it, whichever fill finishes last.
    pub accepted: u64,
}

/// The name (and acceptance) of a mark that was `old` once `order` marks or renews it: the
/// latest order accepted, so a fill of an earlier order finishing after a later one's does
/// not rename it.
fn named(old: Option<&Mark>, order: Order) -> (Option<u64>, u64) {
    match old {
        Some(m) if m.accepted > order.accepted => (m.order, m.accepted),
        _ => (order.id, order.accepted),
    }
}

impl Order {
    /// An order at `priority` that names no order id.
    pub fn unnamed(priority: u8) -> Self {
        Order {
            priority,
            id: None,
            accepted: 0,
        }
    }
}

/// Where a shadow fill's copy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillSource {
    /// The origin.
    Origin,
    /// A peer edge.
    Peer,
    /// This edge's cache already held a fresh copy.
    Local,
}

impl FillSource {
    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            FillSource::Origin => "origin",
            FillSource::Peer => "peer",
            FillSource::Local => "local",
        }
    }
}

/// How a mark ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Its TTL ran out.
    Expired,
    /// The cache evicted its object first.
    Evicted,
    /// An unshadow or a purge removed it first.
    Removed,
}

/// What happened to an expired mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expired {
    /// Never requested: purge the object.
    Wasted(String),
    /// Served requests: keep the object as a normal cache entry.
    Used(String),
}

#[derive(Debug, Default)]
struct Inner {
    marks: HashMap<String, Mark>,
    heap: BinaryHeap<Reverse<(Instant, u64, String)>>,
    next_gen: u64,
    /// Recent purges and unshadows, with when they happened.
    drops: VecDeque<(Instant, Dropped)>,
    /// When the newest forgotten prefix or tag drop happened: it may have covered any key.
    forgotten: Option<Instant>,
    /// When the newest forgotten key drop of each slot of key hashes happened.
    forgotten_keys: Option<ForgottenKeys>,
    /// Keys being filled that clients were served from before their mark was set.
    filling: HashMap<String, Filling>,
    /// Copies shadow fills brought whose orders were dropped while they ran, left for the
    /// next order of their key ([`ShadowTable::end_unheld`]).
    left: HashMap<String, LeftCopy>,
}

/// A shadow fill that ended without a mark of its own ([`ShadowTable::end_unheld`]).
#[derive(Debug, Clone, Copy)]
pub struct UnheldFill {
    /// The order it filled for, as the broker named it.
    pub order: Option<u64>,
    /// It renewed a live mark (whose end reported the order's).
    pub renews: bool,
    /// Bytes its attempts fetched.
    pub moved: u64,
    /// A peer supplied them (else the origin).
    pub peer: bool,
    /// Where the copy it leaves in the cache came from, if it leaves one.
    pub left: Option<FillSource>,
}

/// A copy a dropped shadow fill left in the cache.
#[derive(Debug, Clone)]
struct LeftCopy {
    /// A peer supplied it (else the origin).
    peer_filled: bool,
    /// The dropped fill's own outcome, when it was not reported because the mark that takes
    /// the copy carries the fill: reported after all if no mark takes it. `None`: reported,
    /// and the mark that takes the copy is not priced for its fill again.
    owed: Option<ShadowOutcome>,
    at: Instant,
}

/// Key drops no longer listed, by slot of key hashes: when the newest of each happened, in
/// whole milliseconds after `epoch` rounded up (plus one; 0 is none), so that a key sharing a
/// slot with one, or a fill queued in the same millisecond, is held back rather than let
/// through.
#[derive(Debug)]
struct ForgottenKeys {
    epoch: Instant,
    slots: Box<[u64]>,
}

impl ForgottenKeys {
    /// Slots for drops at or after `epoch`.
    fn since(epoch: Instant) -> Self {
        ForgottenKeys {
            epoch,
            slots: vec![0; FORGOTTEN_SLOTS].into(),
        }
    }

    fn slot(key: &str) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() % FORGOTTEN_SLOTS as u64) as usize
    }

    fn note(&mut self, key: &str, at: Instant) {
        let after = at.saturating_duration_since(self.epoch);
        let ms = after.as_millis() + u128::from(!after.subsec_nanos().is_multiple_of(1_000_000));
        let v = u64::try_from(ms + 1).unwrap_or(u64::MAX);
        let slot = &mut self.slots[Self::slot(key)];
        *slot = (*slot).max(v);
    }

    fn dropped_since(&self, key: &str, since: Instant) -> bool {
        let v = self.slots[Self::slot(key)];
        let since_ms = since.saturating_duration_since(self.epoch).as_millis();
        v != 0 && u128::from(v - 1) >= since_ms
    }
}

impl Inner {
    /// A client was served `key` without a mark: a copy a dropped fill left is the client's
    /// now, not the next order's prefetch. The outcome that copy still owed, to report.
    fn served_left(&mut self, key: &str) -> Option<ShadowOutcome> {
        if self.left.is_empty() {
            return None;
        }
        self.left.remove(key).and_then(|l| l.owed)
    }

    /// A client served from a fill of `key` under way: counted for its mark to come.
    fn hit_filling(&mut self, key: &str, now: Instant) -> Option<u64> {
        let f = self.filling.get_mut(key)?;
        if f.hits == 0 {
            f.head_start = Some(now.saturating_duration_since(f.started));
        }
        f.hits += 1;
        f.touched = true;
        Some(f.hits)
    }

    /// Keep a copy a dropped fill left for the next order of `key` (at most [`MAX_LEFT`]:
    /// those past [`LEFT_FOR`] go first, then the oldest; a copy owing its report is only
    /// ever left while the mark that takes it is being filled, so none is evicted in practice).
    fn leave(&mut self, key: &str, peer_filled: bool, owed: Option<ShadowOutcome>, now: Instant) {
        if self.left.len() >= MAX_LEFT {
            self.left
                .retain(|_, l| now.saturating_duration_since(l.at) <= LEFT_FOR);
        }
        if self.left.len() >= MAX_LEFT {
            let oldest = self.left.iter().min_by_key(|(_, l)| l.at);
            if let Some(k) = oldest.map(|(k, _)| k.clone()) {
                self.left.remove(&k);
            }
        }
        let left = LeftCopy {
            peer_filled,
            owed,
            at: now,
        };
        self.left.insert(key.to_string(), left);
    }

    fn note_drop(&mut self, dropped: Dropped, now: Instant) {
        while let Some((at, _)) = self.drops.front() {
            if self.drops.len() < MAX_DROPS && now.duration_since(*at) <= DROP_MEMORY {
                break;
            }
            let Some((at, gone)) = self.drops.pop_front() else {
                break;
            };
            match gone {
                Dropped::Key(k) => self
                    .forgotten_keys
                    .get_or_insert_with(|| ForgottenKeys::since(at))
                    .note(&k, at),
                _ => self.forgotten = self.forgotten.max(Some(at)),
            }
        }
        self.drops.push_back((now, dropped));
    }

    /// Whether `key`, whose object carries `tags`, was purged or unshadowed at or after
    /// `since` (or may have been: the record from then is forgotten).
    fn dropped_since(&self, key: &str, tags: Option<&FillTags>, since: Instant) -> bool {
        self.forgotten.is_some_and(|at| at >= since)
            || self
                .forgotten_keys
                .as_ref()
                .is_some_and(|f| f.dropped_since(key, since))
            || self
                .drops
                .iter()
                .rev()
                .take_while(|d| d.0 >= since)
                .any(|(_, d)| d.drops(key, tags))
    }

    /// After marks were removed other than by expiry: their heap entries stay until their
    /// time, so once they outnumber the marks the heap is rebuilt from the marks alone.
    fn compact_heap(&mut self) {
        if self.heap.len() <= 2 * self.marks.len() + 64 {
            return;
        }
        self.heap = self
            .marks
            .iter()
            .map(|(k, m)| Reverse((m.scheduled.0, m.scheduled.1, k.clone())))
            .collect();
    }

    fn mark(&mut self, key: &str, ttl: Duration, order: Order, tags: FillTags, now: Instant) {
        let priority = order.priority;
        self.next_gen += 1;
        let generation = self.next_gen;
        let expires = now + ttl;
        let old = self.marks.get(key);
        let hits = old.map_or(0, |m| m.hits);
        let bytes = old.map_or(0, |m| m.bytes);
        let marked_at = old.map_or(now, |m| m.marked_at);
        let peer_filled = old.is_some_and(|m| m.peer_filled);
        let held_before = old.is_some_and(|m| m.held_before);
        let filled = old.is_some_and(|m| m.filled);
        let fill_paid = old.is_some_and(|m| m.fill_paid);
        let mut touched = old.is_some_and(|m| m.touched);
        let refetched = old.is_some_and(|m| m.refetched);
        let mut head_start = old.and_then(|m| m.head_start);
        let (order, accepted) = named(old, order);
        let mut hits = hits;
        if let Some(f) = self.filling.get_mut(key) {
            // Clients served from this fill as it streamed: the first of them, unless the
            // mark had served one already, did not find it complete.
            if hits == 0 && f.hits > 0 {
                head_start = f.head_start;
            }
            hits += std::mem::take(&mut f.hits);
            touched |= std::mem::take(&mut f.touched);
            f.head_start = None;
        }
        // The mark's heap entry stays while it comes up no later than the new expiry.
        let scheduled = match old {
            Some(m) if m.scheduled.0 <= expires => m.scheduled,
            _ => {
                self.heap
                    .push(Reverse((expires, generation, key.to_string())));
                (expires, generation)
            }
        };
        self.marks.insert(
            key.to_string(),
            Mark {
                expires,
                priority,
                hits,
                bytes,
                marked_at,
                peer_filled,
                held_before,
                touched,
                refetched,
                head_start,
                filled,
                fill_paid,
                tags,
                order,
                accepted,
                generation,
                scheduled,
            },
        );
    }
}

/// All shadow marks of this edge.
#[derive(Default)]
pub struct ShadowTable {
    inner: Mutex<Inner>,
    /// Where every mark that ends goes for the broker's ledger: expiries (through the
    /// sweep) and removals (unshadow, purge) alike, so no shadow's cost goes unbooked.
    outcomes: OutcomeLog,
}

/// A shadow fill under way ([`ShadowTable::begin_fill`]); ends when dropped.
pub struct FillUnderWay {
    table: std::sync::Arc<ShadowTable>,
    key: String,
}

impl Drop for FillUnderWay {
    fn drop(&mut self) {
        let mut g = self.table.inner.lock();
        if let Some(f) = g.filling.get_mut(&self.key) {
            f.fills -= 1;
            if f.fills == 0 {
                g.filling.remove(&self.key);
            }
        }
    }
}

impl Mark {
    /// Whether the object goes when the mark ends: only a prediction nobody asked for, that
    /// the edge did not hold before the order.
    pub fn purge_with_mark(&self) -> bool {
        self.hits == 0 && !self.touched && !self.held_before
    }

    /// This mark's outcome, ending `now` as `end` says.
    pub(crate) fn outcome(&self, key: String, now: Instant, end: Ending) -> ShadowOutcome {
        ShadowOutcome {
            key,
            bytes: self.bytes,
            hits: self.hits,
            held_secs: now.saturating_duration_since(self.marked_at).as_secs(),
            peer_filled: self.peer_filled,
            evicted: end == Ending::Evicted,
            failed: false,
            held_before: self.held_before,
            removed: end == Ending::Removed,
            ended_ms: crate::sync::protocol::unix_ms_now(),
            head_start_ms: self
                .head_start
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            order: self.order,
            fill_paid: self.fill_paid,
        }
    }
}

impl ShadowTable {
    /// The log of ended shadows (see the field).
    pub fn outcomes(&self) -> &OutcomeLog {
        &self.outcomes
    }

    /// Mark `key` as a shadow for `ttl` (renewing an existing mark keeps its hit count);
    /// fills go through [`Self::mark_filled`].
    #[cfg(test)]
    pub fn mark(&self, key: &str, ttl: Duration, priority: u8, now: Instant) {
        self.inner
            .lock()
            .mark(key, ttl, Order::unnamed(priority), FillTags::default(), now);
    }

    /// Push the expiry of `key`'s mark, if it has one, to at least `ttl` from `now` (never
    /// shorter: a shortening renewal takes effect when its fill marks it), and name it by
    /// `order`, which renews it. Whether there was a mark to renew.
    pub fn extend(&self, key: &str, ttl: Duration, order: Order, now: Instant) -> bool {
        let mut inner = self.inner.lock();
        let Some(m) = inner.marks.get_mut(key) else {
            return false;
        };
        m.expires = m.expires.max(now + ttl);
        (m.order, m.accepted) = named(Some(m), order);
        true
    }

    /// A fill of `key` starts at `now`: until it is marked (or ends), clients served from it
    /// as it streams are counted for its mark ([`Self::hit`]).
    pub fn begin_fill(self: &std::sync::Arc<Self>, key: &str, now: Instant) -> FillUnderWay {
        self.inner
            .lock()
            .filling
            .entry(key.to_string())
            .or_insert_with(|| Filling {
                fills: 0,
                hits: 0,
                touched: false,
                started: now,
                head_start: None,
            })
            .fills += 1;
        FillUnderWay {
            table: self.clone(),
            key: key.to_string(),
        }
    }

    /// Mark `key`, whose object carries `tags`, after a fill that started at `started`,
    /// unless a purge or unshadow of it arrived since: the drop wins, else the mark would
    /// describe an object that is gone (or one the broker no longer wants) and a later order
    /// for it would find it "shadowed". Whether it was marked.
    pub fn mark_filled(
        &self,
        key: &str,
        ttl: Duration,
        order: Order,
        tags: FillTags,
        started: Instant,
        now: Instant,
    ) -> bool {
        let mut g = self.inner.lock();
        if g.dropped_since(key, Some(&tags), started) {
            return false;
        }
        g.mark(key, ttl, order, tags, now);
        true
    }

    /// Whether any fill is under way ([`Self::begin_fill`]).
    pub fn filling(&self) -> bool {
        !self.inner.lock().filling.is_empty()
    }

    /// Fills of `key` under way ([`Self::begin_fill`]).
    pub fn fills_under_way(&self, key: &str) -> u32 {
        self.inner.lock().filling.get(key).map_or(0, |f| f.fills)
    }

    /// Whether a client was served from a fill of `key` still under way.
    pub fn fill_touched(&self, key: &str) -> bool {
        self.inner
            .lock()
            .filling
            .get(key)
            .is_some_and(|f| f.touched)
    }

    /// Whether `key` was purged or unshadowed at or after `since` (tag purges aside: the
    /// object's tags are not known before its fill).
    pub fn dropped_since(&self, key: &str, since: Instant) -> bool {
        self.inner.lock().dropped_since(key, None, since)
    }

    /// Record the filled size of a shadow and, on its first fill, where it came from (a
    /// renewal refills from the edge's own cache, which says nothing about the first). A
    /// copy found held that a dropped fill left for this order ([`Self::end_unheld`]) came
    /// from where that fill fetched it, and was paid for by that fill's report.
    pub fn set_fill(&self, key: &str, bytes: u64, source: FillSource) {
        let owed = {
            let mut guard = self.inner.lock();
            let g = &mut *guard;
            let mut left = g.left.remove(key);
            if let Some(m) = g.marks.get_mut(key) {
                m.bytes = bytes;
                if !m.filled {
                    m.filled = true;
                    let fresh = |l: &LeftCopy| l.at.elapsed() <= LEFT_FOR;
                    match left.take_if(|l| source == FillSource::Local && fresh(l)) {
                        Some(l) => {
                            m.peer_filled = l.peer_filled;
                            m.held_before = false;
                            m.fill_paid = l.owed.is_none();
                        }
                        None => {
                            m.peer_filled = source == FillSource::Peer;
                            m.held_before = source == FillSource::Local;
                        }
                    }
                }
            }
            left.and_then(|l| l.owed)
        };
        if let Some(o) = owed {
            self.outcomes.push(o);
        }
    }

    /// A fill of `key` ended without a mark of its own: its order was dropped (a purge or an
    /// unshadow came after it) while it waited or ran. The broker hears so (`removed`, with
    /// the bytes its attempts fetched, which were paid for all the same), or it would count
    /// the order live until its TTL — unless a later order's mark takes the fill's copy and
    /// carries its cost, or the fill renewed a mark (whose removal reported the order's end).
    ///
    /// [`UnheldFill::left`]: where the copy the fill leaves in the cache came from. A
    /// later order of the key finds that copy held, but it is a prefetch all the same: a mark
    /// already set on it (still being filled, or filled as held before) takes it as its own
    /// fill; otherwise the next order's mark takes it within [`LEFT_FOR`] as a fill this
    /// report paid for ([`Self::set_fill`]), unless a client asks for the key first (the copy
    /// then served it, as any held one).
    pub fn end_unheld(&self, key: &str, fill: UnheldFill, now: Instant) {
        let UnheldFill {
            order,
            renews,
            moved,
            peer,
            left,
        } = fill;
        // A renewal's order was the mark's: its removal reported the end.
        if renews {
            return;
        }
        let outcome = ShadowOutcome {
            removed: true,
            bytes: moved,
            peer_filled: peer,
            order,
            ..ShadowOutcome::failed(key.to_string())
        };
        let report = {
            let mut guard = self.inner.lock();
            let g = &mut *guard;
            // A client served while this fill streamed used the copy first: it is held like
            // any other, and nothing is handed on.
            let touched = g.filling.get(key).is_some_and(|f| f.touched);
            let left = left.filter(|s| *s != FillSource::Local && !touched);
            let peer_filled = left == Some(FillSource::Peer);
            match g.marks.get_mut(key) {
                // A later order's mark set on this fill's copy: its first fill's source is
                // still to come (it takes the copy, and this outcome if it does not), or came
                // as "held before" (it is turned into this fill). That mark carries the fill.
                Some(m) if left.is_some() && !m.filled => {
                    g.leave(key, peer_filled, Some(outcome), now);
                    None
                }
                Some(m) if left.is_some() && m.held_before && !m.touched && !m.fill_paid => {
                    m.held_before = false;
                    m.peer_filled = peer_filled;
                    None
                }
                // A later order's mark that filled itself, or found the copy used.
                Some(_) => Some(outcome),
                None => {
                    if left.is_some() {
                        g.leave(key, peer_filled, None, now);
                    }
                    Some(outcome)
                }
            }
        };
        if let Some(o) = report {
            self.outcomes.push(o);
        }
    }

    /// If `key` has a valid mark, or a fill under way, count a shadow hit and return the
    /// hits so far (1: the first request found its shadow). A copy the edge held before the
    /// order, or one a client's own fetch stored since, is not the shadow's doing: `None`.
    pub fn hit(&self, key: &str, now: Instant) -> Option<u64> {
        let mut guard = self.inner.lock();
        let g = &mut *guard;
        match g.marks.get_mut(key) {
            Some(m) if m.expires > now => {
                m.touched = true;
                if m.held_before || m.refetched {
                    return None;
                }
                m.hits += 1;
                Some(m.hits)
            }
            _ => {
                if let Some(owed) = g.served_left(key) {
                    drop(guard);
                    self.outcomes.push(owed);
                    return self.inner.lock().hit_filling(key, now);
                }
                g.hit_filling(key, now)
            }
        }
    }

    /// A client asked for `key` and was not served from the shadow (its copy had expired,
    /// or was evicted or purged): the copy it fetched is not purged with the mark. `stored`:
    /// its fetch stores a copy (a miss), which later hits find instead of the shadow's.
    pub fn touch(&self, key: &str, stored: bool) {
        let owed = {
            let mut guard = self.inner.lock();
            let g = &mut *guard;
            if let Some(m) = g.marks.get_mut(key) {
                m.touched = true;
                m.refetched |= stored;
                None
            } else {
                if let Some(f) = g.filling.get_mut(key) {
                    f.touched = true;
                }
                g.served_left(key)
            }
        };
        if let Some(o) = owed {
            self.outcomes.push(o);
        }
    }

    /// Whether `key` has a live mark.
    pub fn is_marked(&self, key: &str) -> bool {
        self.inner.lock().marks.contains_key(key)
    }

    /// Remove a mark (unshadow or invalidation), logging its outcome.
    pub fn remove(&self, key: &str) -> Option<Mark> {
        self.end(key, true)
    }

    /// End the mark of a fill whose copy passed through uncached, logging its outcome. Not
    /// a drop of the key: a fill of another order of it under way keeps what it stores.
    pub fn end_uncached(&self, key: &str) -> Option<Mark> {
        self.end(key, false)
    }

    /// End `key`'s mark as removed; `dropped`: the key was purged or unshadowed, which fills
    /// under way from before must not mark.
    fn end(&self, key: &str, dropped: bool) -> Option<Mark> {
        let now = Instant::now();
        let removed = {
            let mut g = self.inner.lock();
            if dropped {
                g.note_drop(Dropped::Key(key.to_string()), now);
            }
            let owed = g.left.remove(key).and_then(|l| l.owed);
            let removed = g.marks.remove(key);
            g.compact_heap();
            (removed, owed)
        };
        let (removed, owed) = removed;
        if let Some(m) = &removed {
            self.outcomes
                .push(m.outcome(key.to_string(), now, Ending::Removed));
        }
        if let Some(o) = owed {
            self.outcomes.push(o);
        }
        removed
    }

    /// Remove every mark whose key starts with `prefix` (prefix purge), logging their
    /// outcomes; returns how many.
    pub fn remove_prefix(&self, prefix: &str) -> usize {
        self.remove_dropped(Dropped::Prefix(prefix.to_string()))
    }

    /// Remove every mark of `host` (`host/`) whose object carries one of `tags` (tag purge),
    /// logging their outcomes; returns how many.
    pub fn remove_tagged(&self, host: &str, tags: &[String]) -> usize {
        self.remove_dropped(Dropped::Tags {
            host: host.to_string(),
            tags: tags.to_vec(),
        })
    }

    fn remove_dropped(&self, dropped: Dropped) -> usize {
        let now = Instant::now();
        let removed: Vec<(String, Mark)> = {
            let mut g = self.inner.lock();
            let removed = g
                .marks
                .extract_if(|k, m| dropped.drops(k, Some(&m.tags)))
                .collect();
            g.note_drop(dropped, now);
            g.compact_heap();
            removed
        };
        for (key, m) in &removed {
            self.outcomes
                .push(m.outcome(key.clone(), now, Ending::Removed));
        }
        removed.len()
    }

    /// End every live mark at a stop, reported removed (their copies stay cached as ordinary
    /// entries: whether they would have been used is not known, unless they were), and report
    /// the outcomes copies of dropped fills still owed; the outcomes, oldest mark first.
    pub fn end_all(&self, now: Instant) -> Vec<ShadowOutcome> {
        let mut g = self.inner.lock();
        g.heap.clear();
        let mut marks: Vec<(String, Mark)> = std::mem::take(&mut g.marks).into_iter().collect();
        marks.sort_by_key(|(_, m)| m.marked_at);
        let owed: Vec<ShadowOutcome> = g.left.drain().filter_map(|(_, l)| l.owed).collect();
        marks
            .into_iter()
            .map(|(key, m)| m.outcome(key, now, Ending::Removed))
            .chain(owed)
            .collect()
    }

    /// Pop every mark whose expiry has passed, with the mark.
    pub fn expire(&self, now: Instant) -> Vec<(Expired, Mark)> {
        let mut guard = self.inner.lock();
        let g = &mut *guard;
        let mut out = Vec::new();
        while g.heap.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
            let Some(Reverse((at, id, key))) = g.heap.pop() else {
                break;
            };
            let Some(m) = g.marks.get_mut(&key) else {
                continue;
            };
            if m.scheduled != (at, id) {
                // An entry a shortening renewal replaced.
                continue;
            }
            if m.expires > now {
                // Extended since: its entry moves to the new expiry.
                m.scheduled = (m.expires, id);
                g.heap.push(Reverse((m.expires, id, key)));
                continue;
            }
            let m = g.marks.remove(&key).expect("looked up just above");
            let e = if m.hits == 0 {
                Expired::Wasted(key)
            } else {
                Expired::Used(key)
            };
            out.push((e, m));
        }
        out
    }

    /// Entries in the expiry heap (one per mark, plus those of shortened or removed marks
    /// until their time comes).
    #[cfg(test)]
    fn heap_len(&self) -> usize {
        self.inner.lock().heap.len()
    }

    /// End the marks whose object `held` says the cache no longer has (evicted before the
    /// mark expired), with the marks. `held` runs outside the table's lock, which the
    /// request path takes on every hit; a mark renewed meanwhile is kept.
    pub fn take_evicted(&self, held: impl Fn(&str) -> bool) -> Vec<(String, Mark)> {
        let marks: Vec<(String, u64)> = {
            let g = self.inner.lock();
            g.marks
                .iter()
                .map(|(k, m)| (k.clone(), m.generation))
                .collect()
        };
        let gone: Vec<(String, u64)> = marks.into_iter().filter(|(k, _)| !held(k)).collect();
        if gone.is_empty() {
            return Vec::new();
        }
        let mut g = self.inner.lock();
        let mut out = Vec::new();
        for (k, generation) in gone {
            if g.marks.get(&k).is_some_and(|m| m.generation == generation) {
                let m = g.marks.remove(&k).expect("checked just above");
                out.push((k, m));
            }
        }
        g.compact_heap();
        out
    }

    /// Live marks with keys after `after`, in key order, as many as fit `max_key_bytes` of
    /// keys (at least one); and whether more remain. Under the lock a page only compares
    /// keys, keeping the first few in a bounded heap, and copies just the marks it returns:
    /// a broker listing a large table page by page does not copy the whole table each time.
    pub fn page(
        &self,
        after: Option<&str>,
        max_key_bytes: usize,
        now: Instant,
    ) -> (Vec<(String, Mark)>, bool) {
        // Each entry also carries its field names and numbers (about 40 bytes encoded).
        const ENTRY_BYTES: usize = 64;
        let most = max_key_bytes / ENTRY_BYTES + 1;
        let g = self.inner.lock();
        let mut first: BinaryHeap<&str> = BinaryHeap::with_capacity(most + 1);
        let mut live = 0;
        for (k, m) in &g.marks {
            if m.expires <= now || after.is_some_and(|a| k.as_str() <= a) {
                continue;
            }
            live += 1;
            if first.len() < most {
                first.push(k);
            } else if first.peek().is_some_and(|last| k.as_str() < *last) {
                first.pop();
                first.push(k);
            }
        }
        let keys = first.into_sorted_vec();
        let mut used = 0;
        let n = keys
            .iter()
            .take_while(|k| {
                used += k.len() + ENTRY_BYTES;
                used <= max_key_bytes
            })
            .count()
            .max(1)
            .min(keys.len());
        let marks = keys[..n]
            .iter()
            .map(|k| (k.to_string(), g.marks[*k].clone()))
            .collect();
        (marks, live > n)
    }

    /// Number of live marks and the bytes they hold.
    pub fn usage(&self) -> (usize, u64) {
        let g = self.inner.lock();
        (g.marks.len(), g.marks.values().map(|m| m.bytes).sum())
    }

    /// A copy of one mark.
    pub fn get(&self, key: &str) -> Option<Mark> {
        self.inner.lock().marks.get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_a_client_fetched_itself_is_not_purged_with_its_mark() {
        let t = ShadowTable::default();
        let now = Instant::now();
        t.mark("h/a", Duration::from_secs(60), 5, now);
        t.mark("h/b", Duration::from_secs(60), 5, now);
        t.touch("h/a", false);
        t.touch("h/unmarked", true);
        let a = t.get("h/a").unwrap();
        assert!(a.hits == 0 && a.touched && !a.purge_with_mark());
        assert!(t.get("h/b").unwrap().purge_with_mark());
        assert!(t.get("h/unmarked").is_none());
    }

    #[test]
    fn a_burst_of_key_drops_past_the_memory_holds_back_only_their_own_keys() {
        let t = ShadowTable::default();
        let queued = Instant::now();
        t.remove("h/gone");
        for i in 0..2 * MAX_DROPS {
            t.remove(&format!("h/other-{i}"));
        }
        // "h/gone" and the first drops are forgotten: their keys' slots still remember.
        assert!(t.dropped_since("h/gone", queued));
        assert!(t.dropped_since("h/other-0", queued));
        assert!(t.dropped_since(&format!("h/other-{}", MAX_DROPS - 1), queued));
        // Most other keys share no slot with a drop: their fills go ahead.
        let held = (0..1000)
            .filter(|i| t.dropped_since(&format!("h/kept-{i}"), queued))
            .count();
        assert!(held < 200, "{held} of 1000 unrelated fills held back");
        // A fill queued after the burst is held back by none of it.
        let later = Instant::now();
        assert!(!t.dropped_since("h/gone", later));
        // A forgotten prefix drop may have covered any key.
        t.remove_prefix("h/dir/");
        for i in 0..MAX_DROPS {
            t.remove(&format!("h/more-{i}"));
        }
        assert!(t.dropped_since("h/kept-1", later));
    }

    /// Hits count as the shadow's only on the copy its fill brought: not on one the edge held
    /// before the order, nor on one a client's own miss stored after the shadow's was gone.
    #[test]
    fn only_hits_on_the_shadows_own_copy_count() {
        let t = ShadowTable::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        for k in ["h/held", "h/own", "h/refetched"] {
            t.mark(k, ttl, 5, now);
        }
        t.set_fill("h/held", 10, FillSource::Local);
        t.set_fill("h/own", 10, FillSource::Origin);
        t.set_fill("h/refetched", 10, FillSource::Origin);
        assert_eq!(t.hit("h/held", now), None);
        assert_eq!(t.hit("h/own", now), Some(1));
        assert_eq!(t.hit("h/refetched", now), Some(1));
        // Evicted, then a client's miss stored a copy of its own; a request that only
        // passed by (not stored) changes nothing.
        t.touch("h/own", false);
        assert_eq!(t.hit("h/own", now), Some(2));
        t.touch("h/refetched", true);
        assert_eq!(t.hit("h/refetched", now), None);
        let m = t.get("h/refetched").unwrap();
        assert!(m.hits == 1 && m.touched && m.refetched);
        // A renewal keeps it so.
        t.extend("h/refetched", ttl, Order::unnamed(5), now);
        assert_eq!(t.hit("h/refetched", now), None);
    }

    #[test]
    fn an_accepted_renewal_keeps_the_mark_until_its_own_ttl() {
        let t = ShadowTable::default();
        let five = Order::unnamed(5);
        let t0 = Instant::now();
        t.mark("h/a", Duration::from_secs(10), 5, t0);
        // The renewal is accepted 8 s in; its fill has not run when the old expiry comes.
        assert!(t.extend(
            "h/a",
            Duration::from_secs(60),
            five,
            t0 + Duration::from_secs(8),
        ));
        assert!(t.expire(t0 + Duration::from_secs(11)).is_empty());
        assert!(t.get("h/a").is_some());
        // Never shorter: a renewal with a smaller TTL leaves the expiry where it was.
        t.extend(
            "h/a",
            Duration::from_secs(1),
            five,
            t0 + Duration::from_secs(12),
        );
        assert!(t.expire(t0 + Duration::from_secs(20)).is_empty());
        assert_eq!(t.expire(t0 + Duration::from_secs(69)).len(), 1);
        // Nothing to extend without a mark, which the renewing fill is told.
        assert!(!t.extend("h/b", Duration::from_secs(60), Order::unnamed(5), t0));
        assert!(t.get("h/b").is_none());
    }

    #[test]
    fn the_first_fill_says_where_the_copy_came_from() {
        let t = ShadowTable::default();
        let now = Instant::now();
        t.mark("h/a", Duration::from_secs(60), 5, now);
        t.set_fill("h/a", 10, FillSource::Local);
        // A renewal refills from the edge's own cache; the first fill still decides.
        t.mark("h/a", Duration::from_secs(60), 5, now);
        t.set_fill("h/a", 12, FillSource::Origin);
        let m = t.get("h/a").unwrap();
        assert!(m.held_before && !m.peer_filled);
        assert_eq!(m.bytes, 12);
        t.mark("h/b", Duration::from_secs(60), 5, now);
        t.set_fill("h/b", 10, FillSource::Peer);
        t.set_fill("h/b", 10, FillSource::Local);
        let m = t.get("h/b").unwrap();
        assert!(m.peer_filled && !m.held_before);
    }

    fn unheld(
        order: Option<u64>,
        renews: bool,
        moved: u64,
        peer: bool,
        left: Option<FillSource>,
    ) -> UnheldFill {
        UnheldFill {
            order,
            renews,
            moved,
            peer,
            left,
        }
    }

    /// A fill whose order was dropped while it ran, but whose copy stayed (its fetch came
    /// after the purge), reports its cost; the next order finds the copy held yet counts it
    /// as its prefetch, whose fill is not priced again. A client served in between, or a
    /// mark set on the copy before the report, settle it otherwise.
    #[test]
    fn a_copy_a_dropped_fill_left_is_the_next_orders_prefetch() {
        let t = ShadowTable::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let origin = Some(FillSource::Origin);
        t.end_unheld("h/a", unheld(Some(1), false, 100, false, origin), now);
        let reported = t.outcomes().drain_within(1 << 20);
        assert_eq!(reported.len(), 1);
        assert!(reported[0].removed && reported[0].bytes == 100);
        t.mark("h/a", ttl, 5, now);
        t.set_fill("h/a", 100, FillSource::Local);
        let m = t.get("h/a").unwrap();
        assert!(!m.held_before && !m.peer_filled && m.fill_paid);
        assert_eq!(t.hit("h/a", now), Some(1), "a shadow hit");
        let o = m.outcome("h/a".into(), now, Ending::Expired);
        assert!(o.fill_paid && !o.held_before);
        // Taken once: the next first fill from the cache is held before.
        t.mark("h/b", ttl, 5, now);
        t.set_fill("h/b", 1, FillSource::Local);
        assert!(t.get("h/b").unwrap().held_before);
        // A client asked for the key before the next order: that copy is held before.
        t.end_unheld(
            "h/c",
            unheld(Some(1), false, 100, true, Some(FillSource::Peer)),
            now,
        );
        t.touch("h/c", false);
        t.mark("h/c", ttl, 5, now);
        t.set_fill("h/c", 100, FillSource::Local);
        assert!(t.get("h/c").unwrap().held_before);
        // The next order marked the copy as held before the dropped fill reported: its mark
        // takes the fill, and no removal is reported.
        t.mark("h/d", ttl, 5, now);
        t.set_fill("h/d", 100, FillSource::Local);
        t.end_unheld(
            "h/d",
            unheld(Some(1), false, 100, true, Some(FillSource::Peer)),
            now,
        );
        let m = t.get("h/d").unwrap();
        assert!(!m.held_before && m.peer_filled && !m.fill_paid);
        assert_eq!(
            t.outcomes().drain_within(1 << 20).len(),
            1,
            "h/c's, not h/d's"
        );
        // The next order's mark is set, its fill's source still to come: it takes the copy,
        // and carries the fill.
        t.mark("h/g", ttl, 5, now);
        t.end_unheld("h/g", unheld(Some(1), false, 100, false, origin), now);
        t.set_fill("h/g", 100, FillSource::Local);
        let m = t.get("h/g").unwrap();
        assert!(!m.held_before && !m.fill_paid);
        assert!(t.outcomes().drain_within(1 << 20).is_empty());
        // It filled itself after all: the dropped fill's outcome is reported then.
        t.mark("h/i", ttl, 5, now);
        t.end_unheld("h/i", unheld(Some(1), false, 100, false, origin), now);
        t.set_fill("h/i", 100, FillSource::Origin);
        let owed = t.outcomes().drain_within(1 << 20);
        assert_eq!((owed.len(), owed[0].bytes, owed[0].removed), (1, 100, true));
        // A later mark that filled itself: the dropped fill reports its own cost.
        t.end_unheld("h/i", unheld(Some(2), false, 50, false, origin), now);
        assert_eq!(t.outcomes().drain_within(1 << 20)[0].bytes, 50);
        // A client was served while the dropped fill streamed: the copy served it first.
        let under_way = std::sync::Arc::new(ShadowTable::default());
        let fill = under_way.begin_fill("h/t", now);
        assert_eq!(under_way.hit("h/t", now), Some(1));
        under_way.end_unheld("h/t", unheld(Some(1), false, 100, false, origin), now);
        drop(fill);
        under_way.mark("h/t", ttl, 5, now);
        under_way.set_fill("h/t", 100, FillSource::Local);
        assert!(under_way.get("h/t").unwrap().held_before);
        assert!(t.outcomes().drain_within(1 << 20).is_empty());
        // A fill that left nothing, or a renewal's, leaves nothing to take.
        t.end_unheld("h/e", unheld(Some(1), false, 0, false, None), now);
        t.end_unheld("h/f", unheld(Some(1), true, 100, false, origin), now);
        assert!(t.inner.lock().left.is_empty());
    }

    /// A stop ends every mark, reported removed with what it had earned, and reports the
    /// fill a dropped order's copy still owed; nothing is left to expire.
    #[test]
    fn a_stop_ends_every_mark_as_removed_and_reports_what_dropped_fills_owed() {
        let t = ShadowTable::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        t.mark("h/a", ttl, 5, now);
        t.set_fill("h/a", 10, FillSource::Origin);
        assert_eq!(t.hit("h/a", now), Some(1));
        t.mark("h/b", ttl, 5, now);
        let origin = Some(FillSource::Origin);
        t.end_unheld("h/b", unheld(Some(1), false, 100, false, origin), now);
        assert!(t.outcomes().drain_within(1 << 20).is_empty(), "owed");
        let ended = t.end_all(now + Duration::from_secs(2));
        assert_eq!(ended.len(), 3, "{ended:?}");
        assert!(ended.iter().all(|o| o.removed));
        let a = ended.iter().find(|o| o.key == "h/a").unwrap();
        assert_eq!((a.hits, a.bytes, a.held_secs), (1, 10, 2));
        assert!(ended.iter().any(|o| o.key == "h/b" && o.bytes == 100));
        assert_eq!(t.usage().0, 0);
        assert!(t.expire(now + Duration::from_secs(3600)).is_empty());
        assert!(t.inner.lock().left.is_empty());
    }

    #[test]
    fn pages_list_live_marks_in_key_order_once_each() {
        let t = ShadowTable::default();
        let now = Instant::now();
        for i in 0..25 {
            t.mark(&format!("h/{i:02}"), Duration::from_secs(60), 5, now);
        }
        t.mark("h/dead", Duration::from_secs(1), 5, now);
        let later = now + Duration::from_secs(2);
        let want: Vec<String> = (0..25).map(|i| format!("h/{i:02}")).collect();
        // One mark a page (the budget fits none: at least one), and seven (4-byte keys).
        for (budget, per_page) in [(40, 1), (7 * 68, 7)] {
            let (mut seen, mut after) = (Vec::new(), None::<String>);
            loop {
                let (page, more) = t.page(after.as_deref(), budget, later);
                assert!(!page.is_empty() && page.len() <= per_page);
                if more {
                    assert_eq!(page.len(), per_page);
                }
                after = page.last().map(|(k, _)| k.clone());
                seen.extend(page.into_iter().map(|(k, _)| k));
                if !more {
                    break;
                }
            }
            assert_eq!(seen, want, "{budget}");
        }
        let (rest, more) = t.page(Some("h/24"), 40, later);
        assert!(rest.is_empty() && !more);
    }

    #[test]
    fn marks_of_evicted_objects_end_early_and_only_those() {
        let t = ShadowTable::default();
        let now = Instant::now();
        t.mark("h/kept", Duration::from_secs(60), 5, now);
        t.mark("h/evicted", Duration::from_secs(60), 5, now);
        assert_eq!(t.hit("h/evicted", now), Some(1));
        let gone = t.take_evicted(|k| k != "h/evicted");
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].0.as_str(), gone[0].1.hits), ("h/evicted", 1));
        assert!(t.get("h/evicted").is_none() && t.get("h/kept").is_some());
        // Its heap entry no longer expires anything.
        assert!(t.expire(now + Duration::from_secs(61)).len() == 1);
    }

    #[test]
    fn hits_expiry_and_renewal() {
        let t = ShadowTable::default();
        let now = Instant::now();
        t.mark("h/a", Duration::from_secs(10), 5, now);
        t.mark("h/b", Duration::from_secs(5), 5, now);
        assert_eq!(t.hit("h/a", now), Some(1));
        assert_eq!(t.hit("h/a", now), Some(2));
        assert_eq!(t.hit("h/zz", now), None);
        // Renew b before it expires: the old heap entry must not expire it.
        t.mark(
            "h/b",
            Duration::from_secs(20),
            5,
            now + Duration::from_secs(4),
        );
        let out = t.expire(now + Duration::from_secs(11));
        assert_eq!(out[0].0, Expired::Used("h/a".into()));
        assert_eq!(out[0].1.hits, 2);
        assert_eq!(t.hit("h/a", now + Duration::from_secs(11)), None);
        let out = t.expire(now + Duration::from_secs(30));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, Expired::Wasted("h/b".into()));
        // The renewal kept the first mark time.
        assert_eq!(out[0].1.marked_at, now);
        assert_eq!(t.usage().0, 0);
    }

    #[test]
    fn renewals_keep_one_heap_entry_per_mark() {
        let t = ShadowTable::default();
        let now = Instant::now();
        let at = |s: u64| now + Duration::from_secs(s);
        t.mark("h/a", Duration::from_secs(10), 5, now);
        // A thousand extending renewals: still one entry.
        for i in 1..=1000 {
            t.mark(
                "h/a",
                Duration::from_secs(10),
                5,
                now + Duration::from_millis(i),
            );
        }
        assert_eq!(t.heap_len(), 1);
        // At the first expiry the entry moves; the mark ends at its real expiry.
        assert!(t.expire(at(10)).is_empty());
        assert_eq!(t.heap_len(), 1);
        assert_eq!(t.hit("h/a", at(10)), Some(1));
        assert_eq!(t.expire(at(11)).len(), 1);
        assert_eq!(t.heap_len(), 0);
        // A renewal that shortens a mark gets an entry of its own and ends it on time.
        t.mark("h/b", Duration::from_secs(100), 5, now);
        t.mark("h/b", Duration::from_secs(5), 5, now);
        assert_eq!(t.heap_len(), 2);
        assert_eq!(t.expire(at(6)).len(), 1);
        assert!(t.expire(at(200)).is_empty(), "the old entry ends nothing");
        assert_eq!(t.heap_len(), 0);
    }

    #[test]
    fn prefix_removal() {
        let t = ShadowTable::default();
        let now = Instant::now();
        t.mark("h/a/1", Duration::from_secs(10), 5, now);
        t.mark("h/a/2", Duration::from_secs(10), 5, now);
        t.mark("h/b/1", Duration::from_secs(10), 5, now);
        t.set_fill("h/a/1", 100, FillSource::Origin);
        assert_eq!(t.hit("h/a/1", now), Some(1));
        assert_eq!(t.remove_prefix("h/a/"), 2);
        assert_eq!(t.usage().0, 1);
        // The stale heap entries of removed marks expire nothing.
        assert!(t.expire(now + Duration::from_secs(11)).len() == 1);
        // Removed marks end like expired ones, with their outcomes logged for the broker.
        t.mark("h/c", Duration::from_secs(10), 5, now);
        t.set_fill("h/c", 7, FillSource::Peer);
        assert!(t.remove("h/c").is_some());
        assert!(t.remove("h/c").is_none());
        let mut ended = t.outcomes().drain_within(1 << 20);
        ended.sort_by(|a, b| a.key.cmp(&b.key));
        let got: Vec<_> = ended
            .iter()
            .map(|o| (o.key.as_str(), o.bytes, o.hits, o.peer_filled))
            .collect();
        assert_eq!(
            got,
            [
                ("h/a/1", 100, 1, false),
                ("h/a/2", 0, 0, false),
                ("h/c", 7, 0, true)
            ]
        );
    }

    #[test]
    fn a_mark_past_its_ttl_is_not_a_hit_even_before_expiry_runs() {
        let t = ShadowTable::default();
        let now = Instant::now();
        t.mark("k", Duration::from_secs(1), 1, now);
        assert_eq!(t.hit("k", now + Duration::from_secs(2)), None);
    }

    #[test]
    fn a_purge_during_a_fill_wins_over_its_mark() {
        let t = ShadowTable::default();
        let five = Order::unnamed(5);
        let ttl = Duration::from_secs(60);
        let started = Instant::now();
        t.remove("h/a");
        t.remove_prefix("h/dir/");
        let now = Instant::now();
        assert!(!t.mark_filled("h/a", ttl, five, FillTags::default(), started, now));
        assert!(!t.mark_filled("h/dir/x", ttl, five, FillTags::default(), started, now));
        assert!(t.get("h/a").is_none());
        // Other keys, and fills that started after the purge, are marked.
        assert!(t.mark_filled("h/b", ttl, five, FillTags::default(), started, now));
        let later = Instant::now() + Duration::from_millis(1);
        assert!(t.mark_filled("h/a", ttl, five, FillTags::default(), later, later));
        assert!(t.get("h/a").is_some());
    }

    fn tagged(tags: &[&str]) -> FillTags {
        FillTags::Listed(tags.iter().map(|t| t.to_string()).collect())
    }

    #[test]
    fn a_tag_purge_ends_the_marks_of_the_objects_it_bans() {
        let t = ShadowTable::default();
        let five = Order::unnamed(5);
        let (ttl, started) = (Duration::from_secs(60), Instant::now());
        let now = Instant::now();
        assert!(t.mark_filled("h/a", ttl, five, tagged(&["p-1", "home"]), started, now));
        assert!(t.mark_filled("h/b", ttl, five, tagged(&["p-2"]), started, now));
        assert!(t.mark_filled("h/c", ttl, five, FillTags::Many, started, now));
        assert!(t.mark_filled("other/a", ttl, five, tagged(&["p-1"]), started, now));
        assert_eq!(t.remove_tagged("h/", &["p-1".to_string()]), 2);
        assert!(t.get("h/a").is_none() && t.get("h/c").is_none());
        assert!(t.get("h/b").is_some() && t.get("other/a").is_some());
        // A fill under way when the purge came is not marked if its object carries a tag.
        let later = Instant::now() + Duration::from_millis(1);
        assert!(!t.mark_filled("h/d", ttl, five, tagged(&["p-1"]), started, later));
        assert!(t.mark_filled("h/e", ttl, five, tagged(&["p-3"]), started, later));
        assert!(
            !t.dropped_since("h/d", started),
            "tags unknown before the fill"
        );
        // The ended marks were booked.
        assert_eq!(t.outcomes().drain_within(1 << 20).len(), 2);
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, v.parse().unwrap());
            }
            m
        };
        assert_eq!(
            FillTags::of(&h(&[("surrogate-key", "A b a"), ("cache-tag", "c")])),
            tagged(&["a", "b", "c"])
        );
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        let many = many.join(" ");
        let mut m = http::HeaderMap::new();
        m.insert("surrogate-key", many.parse().unwrap());
        assert_eq!(FillTags::of(&m), FillTags::Many);
    }

    #[test]
    fn clients_served_while_a_shadow_fills_count_for_its_mark() {
        let t = std::sync::Arc::new(ShadowTable::default());
        let (ttl, now) = (Duration::from_secs(60), Instant::now());
        let fill = t.begin_fill("h/a", now);
        let first = now + Duration::from_millis(40);
        assert_eq!(t.hit("h/a", first), Some(1), "read from the streaming fill");
        assert_eq!(t.hit("h/a", first + ttl / 2), Some(2));
        assert_eq!(t.hit("h/other", now), None);
        assert!(t.mark_filled("h/a", ttl, Order::unnamed(5), FillTags::default(), now, now));
        drop(fill);
        let m = t.get("h/a").unwrap();
        assert!(m.hits == 2 && m.touched && !m.purge_with_mark());
        assert_eq!(
            m.head_start,
            Some(Duration::from_millis(40)),
            "the first client waited for what the fill had not done in 40 ms"
        );
        assert_eq!(t.hit("h/a", now), Some(3));
        let o = t.expire(now + ttl * 2);
        assert_eq!(
            o[0].1
                .outcome("h/a".into(), now, Ending::Expired)
                .head_start_ms,
            Some(40)
        );
        // A shadow complete before its first client: no head start to report.
        let fill = t.begin_fill("h/c", now);
        assert!(t.mark_filled("h/c", ttl, Order::unnamed(5), FillTags::default(), now, now));
        drop(fill);
        assert_eq!(t.hit("h/c", now), Some(1));
        assert_eq!(t.get("h/c").unwrap().head_start, None);
        // A fill that ends unmarked leaves nothing behind.
        let fill = t.begin_fill("h/b", now);
        t.touch("h/b", false);
        drop(fill);
        assert_eq!(t.hit("h/b", now), None);
        assert!(t.inner.lock().filling.is_empty());
    }

    #[test]
    fn entries_of_removed_marks_do_not_pile_up_in_the_heap() {
        let t = ShadowTable::default();
        let now = Instant::now();
        for round in 0..50 {
            for i in 0..20 {
                t.mark(&format!("h/{i}"), Duration::from_secs(3600), 5, now);
            }
            assert_eq!(t.remove_prefix("h/"), 20, "round {round}");
        }
        assert!(t.heap_len() <= 64 + 20, "{}", t.heap_len());
        t.mark("h/kept", Duration::from_secs(10), 5, now);
        assert_eq!(t.expire(now + Duration::from_secs(11)).len(), 1);
    }

    /// A shadow's outcome names the order that last marked it, so the broker settles that
    /// order and not another of the same key.
    #[test]
    fn an_outcome_names_the_latest_order_accepted_for_it() {
        let t = ShadowTable::default();
        let ttl = Duration::from_secs(60);
        // A fill that starts after the removals so far.
        let marked = |order| {
            let started = Instant::now() + Duration::from_millis(1);
            t.mark_filled("h/a", ttl, order, FillTags::default(), started, started)
        };
        let named = |id, accepted| Order {
            priority: 5,
            id: Some(id),
            accepted,
        };
        let ended = || {
            t.remove("h/a");
            let mut outs = t.outcomes().drain_within(1 << 20);
            assert_eq!(outs.len(), 1);
            outs.pop().unwrap().order
        };
        assert!(marked(named(7, 1)));
        assert_eq!(ended(), Some(7));
        assert!(marked(named(7, 2)) && marked(named(9, 3)));
        assert_eq!(ended(), Some(9), "a renewal's order");
        // Order 11 renews the mark when accepted, whether or not its own fill ever ends.
        assert!(marked(named(9, 4)));
        t.extend("h/a", ttl, named(11, 5), Instant::now());
        assert_eq!(ended(), Some(11), "the renewing order's, before its fill");
        // Fills finishing out of order: the later-accepted order keeps the name.
        assert!(marked(named(13, 7)) && marked(named(12, 6)));
        assert_eq!(ended(), Some(13));
        assert!(marked(named(13, 8)) && marked(Order::unnamed(5)));
        assert_eq!(
            ended(),
            Some(13),
            "an unnamed order accepted earlier renames nothing"
        );
    }
}
