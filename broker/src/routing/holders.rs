//! Which edges recently served each key, so a miss in one region can be filled from an edge
//! of another region instead of the origin (cooperative, or "sibling", caching).
//!
//! The broker sees every request and which edge answered it, so it knows where copies are
//! likely to be without asking the edges. The knowledge is a hint, not a guarantee: the edge
//! may have evicted the object since, and then its peer answers "not held" and the asking
//! edge goes to the origin, at the cost of one round trip between edges.
//!
//! Memory is bounded: keys live in sharded two-generation maps; when a shard's current map is
//! full it becomes the previous one and the old previous one is dropped, so a key that has
//! not been served for two generations is forgotten in O(1).
//!
//! Purges: a key purge forgets the key's holders. A prefix or tag purge names no key, and keys
//! are remembered by hash only, so it sets a floor for the whole host instead: holders of the
//! host's keys recorded up to the purge are no longer hinted, and each key regains a holder
//! when an edge next serves it. Either way a request that began before the purge and ends
//! after it (answered from the old copy) does not count as a holder.
//!
//! Restarts: an edge that comes back empty (no disk tier, or a new one) holds nothing the old
//! process served, so its holders recorded before the broker saw it restart are dropped the
//! same way, by a floor of its own.
//!
//! Broker restarts: the map is written at a graceful stop and every `snapshot_secs`, and read
//! back at start ([`file`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

mod file;

pub use file::{HoldersFileError, Restored};

/// Holders remembered per key (one per region, the most recent when regions outnumber it).
const SLOTS: usize = 4;
/// Shards of the map; requests on different keys rarely share a lock.
const SHARDS: usize = 16;

/// `[peer_fill]`: demand misses filled from another edge that holds the object.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFillSection {
    /// Hint edges, on each request, where another edge served the same key.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long after an edge served a key it is still hinted as a holder (broker-clock
    /// seconds). A day: origin lifetimes and edge residency are rarely longer, and a stale
    /// hint costs only one round trip between edges.
    #[serde(default = "default_max_age")]
    pub max_age_secs: u64,
    /// Keys remembered (bounds memory: about 250 bytes per key, with the hash maps' own
    /// overhead).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// How often the map is written to `data_dir` (and at every graceful stop), so a restarted
    /// broker hints what the edges held before; 0: only at a graceful stop. Five minutes: a
    /// crash loses the holders of five minutes' new keys, which traffic brings back.
    #[serde(default = "default_snapshot_secs")]
    pub snapshot_secs: u64,
}

impl Default for PeerFillSection {
    fn default() -> Self {
        PeerFillSection {
            enabled: true,
            max_age_secs: default_max_age(),
            max_keys: default_max_keys(),
            snapshot_secs: default_snapshot_secs(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_max_age() -> u64 {
    86_400
}

fn default_max_keys() -> usize {
    1_000_000
}

fn default_snapshot_secs() -> u64 {
    300
}

/// One edge that served a key, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    edge: u16,
    region: u16,
    /// `Holders::purges` when the request it was learnt from began ([`Holders::epoch`]):
    /// orders it against host purges exactly, where clock seconds would tie.
    purges: u32,
    at: u64,
}

type Slots = [Option<Holder>; SLOTS];

/// What is remembered of one key.
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    holders: Slots,
    /// The key's own last purge ([`Holders::forget`]): requests that began before it are
    /// not recorded as holders.
    floor: Option<Floor>,
}

/// A purge, as holders are judged against it: the count of purges just after it, and its
/// broker second.
#[derive(Debug, Clone, Copy)]
struct Floor {
    count: u32,
    at: u64,
}

impl Floor {
    /// Its count while it still decides at `now`: past `max_age` the holders it hides are
    /// too old to hint anyway, and the count may have wrapped since.
    fn in_force(self, now: u64, max_age: u64) -> Option<u32> {
        (now.saturating_sub(self.at) <= max_age).then_some(self.count)
    }
}

#[derive(Default)]
struct Shard {
    current: HashMap<u64, Entry>,
    previous: HashMap<u64, Entry>,
}

impl Shard {
    /// The current generation's entry for `key`, carried over from the previous one or new;
    /// a full current generation becomes the previous one first.
    fn entry(&mut self, key: u64, per_shard: usize) -> &mut Entry {
        if !self.current.contains_key(&key) && self.current.len() >= per_shard {
            self.previous = std::mem::take(&mut self.current);
        }
        let carried = self.previous.get(&key).copied();
        self.current
            .entry(key)
            .or_insert_with(|| carried.unwrap_or_default())
    }
}

/// Whether purge count `count` is `floor` or later, as serial numbers (RFC 1982).
fn at_or_after(count: u32, floor: u32) -> bool {
    count.wrapping_sub(floor) < 1 << 31
}

/// Recent holders of keys (by 64-bit key hash, [`Holders::key_of`]).
pub struct Holders {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    max_age: u64,
    /// Purges so far (of keys and of hosts). Compared with holders' counts as serial numbers
    /// (RFC 1982), so it may wrap: holders and floors count for `max_age` only, far less than
    /// two billion purges.
    purges: AtomicU32,
    /// Per host, its last host purge (kept while it is in force).
    purged: RwLock<HashMap<Box<str>, Floor>>,
    /// Per edge, when it was last seen restarting with its cache emptied
    /// ([`Holders::forget_edge`]).
    emptied: RwLock<HashMap<u16, Floor>>,
    /// Per edge whose holders were read back, the cache id they were kept with, until its
    /// first stats poll ([`Holders::edge_heard_again`]).
    /// Their holders are not hinted meanwhile: the edge may have come back empty.
    saved_caches: RwLock<HashMap<u16, u64>>,
    /// Held by a write of the map ([`Holders::save`]): one at a time.
    saving: Mutex<()>,
}

impl Holders {
    /// A map remembering about `cfg.max_keys` keys for `cfg.max_age_secs`.
    pub fn new(cfg: &PeerFillSection) -> Self {
        Holders {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            // Two generations per shard hold up to `max_keys` together.
            per_shard: (cfg.max_keys / SHARDS / 2).max(1),
            max_age: cfg.max_age_secs,
            purges: AtomicU32::new(0),
            purged: RwLock::default(),
            emptied: RwLock::default(),
            saved_caches: RwLock::default(),
            saving: Mutex::default(),
        }
    }

    /// The hash a cache key is remembered by: every caller names keys through it.
    pub fn key_of(key: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64(key.as_bytes())
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        &self.shards[(key >> 60) as usize % SHARDS]
    }

    /// The count of purges now, to read as a request begins and pass to [`Holders::record`]
    /// when it ends: a purge that came while the edge answered from its old copy hides the
    /// holder it records, as it hides those recorded before it.
    pub fn epoch(&self) -> u32 {
        self.purges.load(Ordering::Acquire)
    }

    /// `edge` (of `region`) served `key` at `now`, to a request that began at `epoch`: it
    /// holds a copy.
    pub fn record(&self, key: u64, edge: usize, region: usize, now: u64, epoch: u32) {
        let (Ok(edge), Ok(region)) = (u16::try_from(edge), u16::try_from(region)) else {
            return;
        };
        let mut s = self.shard(key).lock();
        let entry = s.entry(key, self.per_shard);
        let floor = entry.floor.and_then(|f| f.in_force(now, self.max_age));
        if floor.is_some_and(|f| !at_or_after(epoch, f)) {
            return;
        }
        let slots = &mut entry.holders;
        let h = Holder {
            edge,
            region,
            purges: epoch,
            at: now,
        };
        let slot = slots
            .iter()
            .position(|x| x.is_some_and(|x| x.region == region))
            .or_else(|| slots.iter().position(Option::is_none))
            .unwrap_or_else(|| {
                (0..SLOTS)
                    .min_by_key(|i| slots[*i].map_or(0, |x| x.at))
                    .unwrap_or(0)
            });
        slots[slot] = Some(h);
    }

    /// The most recent holder of `key` other than `serving` that is still within the age
    /// limit at `now` and passes `usable` (healthy, reachable over QUIC).
    pub fn peer_for(
        &self,
        key: u64,
        serving: usize,
        now: u64,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        self.latest(key, serving, now, || None, usable)
    }

    /// `peer_for`, counting only holders recorded after the host purge numbered `floor()`
    /// (asked only of a key with holders: most lookups have none).
    fn latest(
        &self,
        key: u64,
        serving: usize,
        now: u64,
        floor: impl FnOnce() -> Option<u32>,
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let slots = {
            let s = self.shard(key).lock();
            s.current
                .get(&key)
                .or_else(|| s.previous.get(&key))
                .map(|e| e.holders)
        }?;
        let floor = floor();
        let emptied = self.emptied.read();
        let unchecked = self.saved_caches.read();
        let kept = |h: &Holder| {
            let f = emptied
                .get(&h.edge)
                .and_then(|f| f.in_force(now, self.max_age));
            f.is_none_or(|f| at_or_after(h.purges, f)) && !unchecked.contains_key(&h.edge)
        };
        slots
            .iter()
            .flatten()
            .filter(|h| usize::from(h.edge) != serving && now.saturating_sub(h.at) <= self.max_age)
            .filter(|h| floor.is_none_or(|f| at_or_after(h.purges, f)))
            .filter(|h| kept(h))
            .filter(|h| usable(usize::from(h.edge)))
            .max_by_key(|h| h.at)
            .map(|h| usize::from(h.edge))
    }

    /// The holder of `key` (whose host is `host`) to hint to `serving`'s miss of it: the
    /// latest other one that is up, reachable over QUIC, and routes `host` as the broker does
    /// (one whose origin table routes it otherwise may hold another origin's copy).
    pub fn hint(
        &self,
        key: u64,
        host: &str,
        serving: usize,
        fleet: &super::Fleet,
        health: &super::Health,
        now: u64,
    ) -> Option<usize> {
        let usable = |e: usize| {
            fleet.addresses.get(e).sync.is_some() && health.is_up(e) && health.serves_host(e, host)
        };
        let floor = || self.purged.read().get(host)?.in_force(now, self.max_age);
        self.latest(key, serving, now, floor, usable)
    }

    /// Forget every holder of `key`, purged at `now`: a hint to any of them would cost the
    /// miss a round trip to a peer that no longer holds it. Requests for it that began
    /// before the purge are not recorded as holders when they end; for a key not remembered
    /// that is kept only while the current generation has room (a burst of purges of
    /// unknown keys must not push out the holders of known ones).
    pub fn forget(&self, key: u64, now: u64) {
        let mut s = self.shard(key).lock();
        let floor = self.next_purge(now);
        let known = s.current.contains_key(&key) || s.previous.contains_key(&key);
        if !known && s.current.len() >= self.per_shard {
            return;
        }
        *s.entry(key, self.per_shard) = Entry {
            holders: Slots::default(),
            floor: Some(floor),
        };
    }

    /// Count one more purge, at broker second `now`.
    fn next_purge(&self, now: u64) -> Floor {
        let count = self.purges.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
        Floor { count, at: now }
    }

    /// Forget every holder of `host`'s keys recorded so far: a prefix or tag purge removed
    /// some of its copies, and which keys it hit is not known here. `now` only bounds how
    /// long the host's floor is kept.
    pub fn forget_host(&self, host: &str, now: u64) {
        self.raise_floor(&self.purged, host.into(), now);
    }

    /// Set `key`'s floor in `floors` to a purge counted now, dropping the floors no longer in
    /// force.
    fn raise_floor<K: Eq + std::hash::Hash>(
        &self,
        floors: &RwLock<HashMap<K, Floor>>,
        key: K,
        now: u64,
    ) {
        let mut floors = floors.write();
        let floor = self.next_purge(now);
        floors.retain(|_, f| f.in_force(now, self.max_age).is_some());
        floors.insert(key, floor);
    }

    /// Forget every holder `edge` was recorded as so far: it restarted with an empty cache
    /// (seen at broker second `now`), so a hint to it would cost a miss a round trip for
    /// nothing. It regains each key as it serves it again.
    pub fn forget_edge(&self, edge: usize, now: u64) {
        if let Ok(edge) = u16::try_from(edge) {
            self.raise_floor(&self.emptied, edge, now);
        }
    }

    /// Keys remembered now (both generations).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock();
                s.current.len() + s.previous.len()
            })
            .sum()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders(max_keys: usize) -> Holders {
        Holders::new(&PeerFillSection {
            enabled: true,
            max_age_secs: 100,
            max_keys,
            snapshot_secs: 0,
        })
    }

    #[test]
    fn hints_the_latest_other_holder_within_the_age_limit() {
        let h = holders(1000);
        let all = |_| true;
        assert_eq!(h.peer_for(7, 0, 10, all), None);
        h.record(7, 0, 0, 10, h.epoch());
        // The serving edge is never its own peer.
        assert_eq!(h.peer_for(7, 0, 10, all), None);
        assert_eq!(h.peer_for(7, 2, 10, all), Some(0));
        h.record(7, 1, 1, 20, h.epoch());
        assert_eq!(h.peer_for(7, 2, 30, all), Some(1));
        assert_eq!(h.peer_for(7, 2, 30, |e| e != 1), Some(0));
        // Too old: 0 served it at 10, 1 at 20.
        assert_eq!(h.peer_for(7, 2, 115, all), Some(1));
        assert_eq!(h.peer_for(7, 2, 121, all), None);
    }

    #[test]
    fn a_purged_key_has_no_holders() {
        let h = holders(1000);
        h.record(7, 0, 0, 10, h.epoch());
        h.record(8, 0, 0, 10, h.epoch());
        let began = h.epoch();
        h.forget(7, 10);
        assert_eq!(h.peer_for(7, 2, 10, |_| true), None);
        assert_eq!(h.peer_for(8, 2, 10, |_| true), Some(0));
        // A request that began before the purge, answered from the old copy, ends after it.
        h.record(7, 1, 1, 11, began);
        assert_eq!(h.peer_for(7, 2, 11, |_| true), None);
        // One that began after it holds the new copy.
        h.record(7, 1, 1, 12, h.epoch());
        assert_eq!(h.peer_for(7, 2, 12, |_| true), Some(1));
        // Other keys' purges move the count on; they do not hide this key's holders.
        h.forget(9, 12);
        assert_eq!(h.peer_for(7, 2, 12, |_| true), Some(1));
        // A key floor past the age limit no longer refuses (the count may have wrapped).
        let before = h.epoch();
        h.forget(7, 20);
        h.record(7, 0, 0, 121, before);
        assert_eq!(h.peer_for(7, 2, 121, |_| true), Some(0));
    }

    #[test]
    fn purges_of_unknown_keys_do_not_push_out_known_holders() {
        let h = holders(2 * SHARDS);
        // One key per shard fills its current generation (one slot per generation).
        let keys: Vec<u64> = (0..SHARDS as u64).map(|s| s << 60).collect();
        for &k in &keys {
            h.record(k, 0, 0, 1, h.epoch());
        }
        for &k in &keys {
            h.forget(k | 1, 2);
        }
        for &k in &keys {
            assert_eq!(h.peer_for(k, 2, 2, |_| true), Some(0), "{k:x}");
        }
        assert_eq!(h.len(), SHARDS);
    }

    #[test]
    fn a_host_purge_hides_the_holders_recorded_until_it() {
        let h = holders(1000);
        let all = |_| true;
        let floor = |host: &str| h.purged.read().get(host).map(|f| f.count);
        h.record(7, 0, 0, 10, h.epoch());
        h.record(8, 1, 1, 20, h.epoch());
        h.forget_host("a.example", 20);
        assert_eq!(floor("a.example"), Some(1));
        assert_eq!(h.latest(7, 2, 30, || floor("a.example"), all), None);
        assert_eq!(h.latest(8, 2, 30, || floor("a.example"), all), None);
        // Another host's keys keep their holders.
        assert_eq!(floor("b.example"), None);
        assert_eq!(h.latest(8, 2, 30, || floor("b.example"), all), Some(1));
        // Served again after the purge, in the same clock second: hinted again, the holder
        // recorded before it still not.
        h.record(7, 1, 1, 20, h.epoch());
        assert_eq!(h.latest(7, 2, 30, || floor("a.example"), all), Some(1));
        assert_eq!(h.latest(7, 2, 30, || floor("a.example"), |e| e == 0), None);
        // Another purge of the host hides that one too; floors past the age limit are
        // dropped with the next purge (their holders are too old to hint anyway).
        h.forget_host("a.example", 25);
        assert_eq!(h.latest(7, 2, 30, || floor("a.example"), all), None);
        h.forget_host("b.example", 200);
        assert_eq!(floor("a.example"), None);
        assert_eq!(floor("b.example"), Some(3));
        // A request that began before a purge and ended after it was answered from the old
        // copy: its holder stays hidden.
        let began = h.epoch();
        h.forget_host("b.example", 200);
        h.record(9, 1, 1, 200, began);
        assert_eq!(h.latest(9, 2, 200, || floor("b.example"), all), None);
    }

    #[test]
    fn an_edge_that_came_back_empty_holds_nothing_it_served_before() {
        let h = holders(1000);
        let all = |_| true;
        h.record(7, 0, 0, 10, h.epoch());
        h.record(7, 1, 1, 10, h.epoch());
        h.record(8, 0, 0, 10, h.epoch());
        // A request to the old process that ends after the restart was seen.
        let began = h.epoch();
        h.forget_edge(0, 20);
        assert_eq!(h.peer_for(7, 2, 20, all), Some(1));
        assert_eq!(h.peer_for(8, 2, 20, all), None);
        h.record(8, 0, 0, 21, began);
        assert_eq!(h.peer_for(8, 2, 21, all), None);
        // What the new process serves, it holds.
        h.record(8, 0, 0, 22, h.epoch());
        assert_eq!(h.peer_for(8, 2, 22, all), Some(0));
        // Past the age limit the floor no longer decides (the count may have wrapped).
        let before = h.epoch();
        h.forget_edge(1, 30);
        h.record(7, 1, 1, 131, before);
        assert_eq!(h.peer_for(7, 2, 131, all), Some(1));
    }

    #[test]
    fn the_purge_count_may_wrap() {
        let h = holders(1000);
        h.purges.store(u32::MAX, Ordering::Release);
        h.record(7, 0, 0, 10, h.epoch());
        h.forget_host("a.example", 10);
        assert_eq!(h.epoch(), 0);
        let floor = || h.purged.read().get("a.example").map(|f| f.count);
        assert_eq!(h.latest(7, 2, 10, floor, |_| true), None);
        h.record(7, 1, 1, 10, h.epoch());
        assert_eq!(h.latest(7, 2, 10, floor, |_| true), Some(1));
    }

    #[test]
    fn one_slot_per_region_then_the_oldest_is_replaced() {
        let h = holders(1000);
        h.record(1, 0, 0, 1, h.epoch());
        h.record(1, 5, 0, 2, h.epoch()); // same region: replaces edge 0
        assert_eq!(h.peer_for(1, 9, 3, |e| e == 0), None);
        for r in 1..=4 {
            h.record(1, 10 + r, r, 2 + r as u64, h.epoch());
        }
        // Five regions, four slots: the oldest (edge 5, at 2) went.
        assert_eq!(h.peer_for(1, 9, 10, |e| e == 5), None);
        assert_eq!(h.peer_for(1, 9, 10, |_| true), Some(14));
    }

    #[test]
    fn memory_is_bounded_by_generations() {
        let h = holders(64);
        for k in 0..10_000u64 {
            h.record(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), 0, 0, 1, h.epoch());
        }
        assert!(h.len() <= 64 + SHARDS, "{}", h.len());
        // A key served again survives the rotation that drops its generation.
        let hot = 0xdead_beef_u64;
        h.record(hot, 3, 0, 1, h.epoch());
        for k in 0..10_000u64 {
            h.record(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), 0, 0, 1, h.epoch());
            if k % 2 == 0 {
                h.record(hot, 3, 0, 1, h.epoch());
            }
        }
        assert_eq!(h.peer_for(hot, 9, 1, |_| true), Some(3));
    }
}
