//! Per-(resource, region) request counts and bytes in fixed-width time buckets.
//!
//! Memory is bounded three times: each series keeps at most `retention` buckets (oldest
//! dropped), and the store keeps at most `max_series` series and `max_buckets` buckets in all
//! (least recently updated series dropped). The bucket budget is what bounds the bytes: a
//! client that requests many paths every minute fills every series to `retention`.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::routing::host_of;

/// One bucket of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Bucket start, seconds since the epoch.
    pub start: u64,
    /// Requests in the bucket.
    pub requests: u64,
    /// Response bytes in the bucket.
    pub bytes: u64,
    /// Requests the edge answered from cache (hit or stale).
    #[serde(default)]
    pub hits: u64,
    /// Requests whose response told the object's size.
    #[serde(default)]
    pub sized: u64,
    /// Sum of those objects' sizes.
    #[serde(default)]
    pub object_bytes: u64,
}

/// The buckets of one (resource, region), oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Series {
    /// Buckets, oldest first, only non-empty ones.
    pub buckets: VecDeque<Bucket>,
    /// Requests by user segment over the retained window's lifetime.
    pub segments: HashMap<String, u64>,
    /// Last update (seconds since the epoch), for eviction.
    pub touched: u64,
    /// The cache key (`host/path?query`) most of this resource's requests use: what the
    /// planner shadows, so a resource asked for with a query string is shadowed under the key
    /// its requests use, and one request with a stray query does not move it.
    #[serde(default)]
    pub key: String,
    /// The majority vote behind `key` (Boyer–Moore: +1 for `key`, −1 for any other; at 0 the
    /// next key takes over).
    #[serde(default)]
    pub key_votes: u32,
}

impl Series {
    /// What of this series may be shown to whoever registered its host in the bucket that
    /// starts at `since` ([`SeriesStore::bucket_of`]): the buckets from that one on. The
    /// lifetime tallies (segments, majority key) cannot be split by time, so they are kept only
    /// when no bucket is older.
    pub fn since(&self, since: u64) -> Series {
        let buckets: VecDeque<Bucket> = self
            .buckets
            .iter()
            .filter(|b| b.start >= since)
            .copied()
            .collect();
        let whole = buckets.len() == self.buckets.len();
        Series {
            buckets,
            segments: if whole {
                self.segments.clone()
            } else {
                HashMap::new()
            },
            touched: self.touched,
            key: if whole {
                self.key.clone()
            } else {
                String::new()
            },
            key_votes: if whole { self.key_votes } else { 0 },
        }
    }
}

/// User segments counted per series; further ones are counted under [`OTHER_SEGMENT`]
/// (segment names come from a request header).
pub const MAX_SEGMENTS: usize = 32;
/// Where segments beyond [`MAX_SEGMENTS`] are counted.
pub const OTHER_SEGMENT: &str = "other";

/// All series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeriesStore {
    bucket_secs: u64,
    retention: usize,
    max_series: usize,
    /// (resource, region) → series.
    series: HashMap<String, HashMap<String, Series>>,
    count: usize,
    /// Buckets held by all series.
    #[serde(default)]
    buckets: usize,
    #[serde(default = "unbounded")]
    max_buckets: usize,
}

fn unbounded() -> usize {
    usize::MAX
}

/// One request as the aggregator sees it.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    /// Resource key (`host/path`).
    pub resource: &'a str,
    /// Cache key requested (`host/path?query`).
    pub key: &'a str,
    /// Region name.
    pub region: &'a str,
    /// User segment, if any.
    pub segment: Option<&'a str>,
    /// Seconds since the epoch.
    pub ts: u64,
    /// Response bytes.
    pub bytes: u64,
    /// The object's size, when the response told it.
    pub object_bytes: Option<u64>,
    /// Whether the edge served it from cache.
    pub hit: bool,
}

impl Series {
    /// Re-bucket into `width`-second buckets covering the `n` buckets that end with the one
    /// containing `now`, oldest first (missing buckets are zero).
    pub fn counts(&self, width: u64, n: usize, now: u64) -> Vec<u32> {
        let width = width.max(1);
        let last = now - now % width;
        let first = last.saturating_sub(width * (n as u64 - 1));
        let mut out = vec![0u32; n];
        for b in &self.buckets {
            if b.start >= first && b.start < last + width {
                let i = ((b.start - first) / width) as usize;
                out[i] = out[i].saturating_add(b.requests.min(u64::from(u32::MAX)) as u32);
            }
        }
        out
    }

    /// Mean size of the objects requested: what a shadow of this series costs. Requests that
    /// did not tell it (304s, bodies of unknown length) do not count; ranges count as the whole
    /// object. Buckets from before object sizes were recorded fall back to the mean response.
    pub fn mean_bytes(&self) -> Option<u64> {
        let (n, b) = self.buckets.iter().fold((0u64, 0u64), |(n, b), x| {
            (n.saturating_add(x.sized), b.saturating_add(x.object_bytes))
        });
        if let Some(mean) = b.checked_div(n) {
            return Some(mean);
        }
        let (r, b) = self.buckets.iter().fold((0u64, 0u64), |(r, b), x| {
            (r.saturating_add(x.requests), b.saturating_add(x.bytes))
        });
        (r > 0).then(|| b / r)
    }
}

impl SeriesStore {
    /// An empty store.
    pub fn new(bucket_secs: u64, retention: usize, max_series: usize) -> Self {
        SeriesStore {
            bucket_secs: bucket_secs.max(1),
            retention: retention.max(1),
            max_series: max_series.max(1),
            series: HashMap::new(),
            count: 0,
            buckets: 0,
            max_buckets: usize::MAX,
        }
    }

    /// Hold at most `max_buckets` buckets over all series.
    pub fn with_max_buckets(mut self, max_buckets: usize) -> Self {
        self.max_buckets = max_buckets.max(1);
        self
    }

    /// Adopt a snapshot's data under this store's limits; whether it could (not when its
    /// bucket width differs from this store's). A snapshot written before the clock was set
    /// back (or by a replay's scaled clock) holds buckets later than `now`: they are kept
    /// (forecasts read them once the clock reaches them, and counts added then join them),
    /// but update times are clamped to `now`, or eviction would reach those series last.
    pub fn restore(&mut self, snapshot: SeriesStore, now: u64) -> bool {
        if snapshot.bucket_secs == self.bucket_secs {
            let current = self.bucket_of(now);
            let mut ahead = 0usize;
            self.series = snapshot.series;
            self.count = self.series.values().map(HashMap::len).sum();
            self.buckets = 0;
            for regions in self.series.values_mut() {
                for s in regions.values_mut() {
                    ahead += s.buckets.iter().filter(|b| b.start > current).count();
                    s.touched = s.touched.min(now);
                    while s.buckets.len() > self.retention {
                        s.buckets.pop_front();
                    }
                    self.buckets += s.buckets.len();
                }
            }
            if ahead > 0 {
                tracing::warn!(
                    buckets = ahead,
                    now,
                    "monitor snapshot holds buckets later than the clock (was it set back?)"
                );
            }
            if self.count > self.max_series || self.buckets > self.max_buckets {
                self.evict_oldest();
            }
            true
        } else {
            tracing::warn!(
                old = snapshot.bucket_secs,
                new = self.bucket_secs,
                "monitor bucket width changed; snapshot not used"
            );
            false
        }
    }

    /// Count one request.
    pub fn add(&mut self, o: &Observation<'_>) {
        let start = o.ts - o.ts % self.bucket_secs;
        let is_new = !self
            .series
            .get(o.resource)
            .is_some_and(|r| r.contains_key(o.region));
        if is_new && self.count >= self.max_series {
            self.evict_oldest();
        }
        let s = self
            .series
            .entry(o.resource.to_string())
            .or_default()
            .entry(o.region.to_string())
            .or_default();
        if is_new {
            self.count += 1;
        }
        // The latest record's time, not the greatest seen: after the clock is set back, a
        // series touched while it ran ahead must not be the last to be evicted.
        s.touched = o.ts;
        if s.key == o.key {
            s.key_votes = s.key_votes.saturating_add(1);
        } else if s.key_votes <= 1 {
            s.key = o.key.to_string();
            s.key_votes = 1;
        } else {
            s.key_votes -= 1;
        }
        if let Some(seg) = o.segment {
            let seg = if s.segments.len() < MAX_SEGMENTS || s.segments.contains_key(seg) {
                seg
            } else {
                OTHER_SEGMENT
            };
            *s.segments.entry(seg.to_string()).or_default() += 1;
        }
        match s.buckets.iter_mut().rev().find(|b| b.start == start) {
            Some(b) => {
                b.requests = b.requests.saturating_add(1);
                b.bytes = b.bytes.saturating_add(o.bytes);
                b.hits += u64::from(o.hit);
                b.sized += u64::from(o.object_bytes.is_some());
                b.object_bytes = b.object_bytes.saturating_add(o.object_bytes.unwrap_or(0));
            }
            None => {
                let b = Bucket {
                    start,
                    requests: 1,
                    bytes: o.bytes,
                    hits: u64::from(o.hit),
                    sized: u64::from(o.object_bytes.is_some()),
                    object_bytes: o.object_bytes.unwrap_or(0),
                };
                // Records arrive almost in order; keep the deque sorted.
                let pos = s
                    .buckets
                    .iter()
                    .rposition(|x| x.start < start)
                    .map_or(0, |p| p + 1);
                s.buckets.insert(pos, b);
                self.buckets += 1;
                // Over retention, buckets later than this one (kept from before the clock was
                // set back) go first: dropping the oldest would drop the one just added.
                while s.buckets.len() > self.retention {
                    if s.buckets.back().is_some_and(|x| x.start > start) {
                        s.buckets.pop_back();
                    } else {
                        s.buckets.pop_front();
                    }
                    self.buckets -= 1;
                }
                if self.buckets > self.max_buckets {
                    self.evict_oldest();
                }
            }
        }
    }

    /// Make room: drop the least recently updated series until at most 99% of `max_series`
    /// and of `max_buckets` are held (and fewer than `max_series` in any case), starting with
    /// the hosts holding more than an even share of the series: one tenant's flood of new
    /// paths evicts its own history before anyone else's. One pass pays for many new series
    /// or buckets, so a flood costs amortised O(log n) per request, not a scan each.
    fn evict_oldest(&mut self) {
        let host = host_of;
        let keep_series = (self.max_series - self.max_series / 100).min(self.max_series - 1);
        let keep_buckets = self.max_buckets - self.max_buckets / 100;
        if self.count <= keep_series && self.buckets <= keep_buckets {
            return;
        }
        let mut per_host: HashMap<&str, usize> = HashMap::new();
        for (resource, regions) in &self.series {
            *per_host.entry(host(resource)).or_default() += regions.len();
        }
        let share = (keep_series / per_host.len().max(1)).max(1);
        let heavy: HashSet<String> = per_host
            .into_iter()
            .filter(|(_, n)| *n > share)
            .map(|(h, _)| h.to_string())
            .collect();
        // Heavy hosts' series first (rank 0), then by age: (rank, touched, buckets), the cut
        // where both budgets fit.
        let rank = |resource: &str| u8::from(!heavy.contains(host(resource)));
        let mut all: Vec<(u8, u64, usize)> = self
            .series
            .iter()
            .flat_map(|(resource, regions)| {
                let r = rank(resource);
                regions
                    .values()
                    .map(move |s| (r, s.touched, s.buckets.len()))
            })
            .collect();
        all.sort_unstable();
        let (mut count, mut buckets, mut drop) = (self.count, self.buckets, 0);
        while count > keep_series || buckets > keep_buckets {
            count -= 1;
            buckets -= all[drop].2;
            drop += 1;
        }
        let cutoff = (all[drop - 1].0, all[drop - 1].1);
        // Before the cutoff all go; of those exactly at it, only as many as needed.
        let mut at_cutoff = drop
            - all[..drop]
                .iter()
                .filter(|(r, t, _)| (*r, *t) < cutoff)
                .count();
        let (mut dropped, mut dropped_buckets) = (0, 0);
        self.series.retain(|resource, regions| {
            let r = rank(resource);
            regions.retain(|_, s| {
                let at = (r, s.touched);
                let go = at < cutoff || (at == cutoff && at_cutoff > 0);
                if at == cutoff && go {
                    at_cutoff -= 1;
                }
                if go {
                    dropped += 1;
                    dropped_buckets += s.buckets.len();
                }
                !go
            });
            !regions.is_empty()
        });
        self.count -= dropped;
        self.buckets -= dropped_buckets;
    }

    /// The start of the bucket holding `secs` (seconds since the epoch).
    pub fn bucket_of(&self, secs: u64) -> u64 {
        secs - secs % self.bucket_secs
    }

    /// Drop every series of the resources under `prefix` (`host/` of a deleted host, whose
    /// next owner must not see or be planned from this history); how many went.
    pub fn forget_prefix(&mut self, prefix: &str) -> usize {
        let mut dropped = 0;
        let mut dropped_buckets = 0;
        self.series.retain(|resource, regions| {
            let go = resource.starts_with(prefix);
            if go {
                dropped += regions.len();
                dropped_buckets += regions.values().map(|s| s.buckets.len()).sum::<usize>();
            }
            !go
        });
        self.count -= dropped;
        self.buckets -= dropped_buckets;
        dropped
    }

    /// The series of a resource, by region.
    pub fn query(&self, resource: &str) -> Option<&HashMap<String, Series>> {
        self.series.get(resource)
    }

    /// Every (resource, region, series), for the planner.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &Series)> {
        self.series.iter().flat_map(|(res, regions)| {
            regions
                .iter()
                .map(move |(reg, s)| (res.as_str(), reg.as_str(), s))
        })
    }

    /// Bucket width in seconds.
    pub fn bucket_secs(&self) -> u64 {
        self.bucket_secs
    }

    /// Number of buckets held, over all series.
    pub fn bucket_count(&self) -> usize {
        self.buckets
    }

    /// Number of series held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Total requests counted for a resource in a region (retained window).
    pub fn total(&self, resource: &str, region: &str) -> u64 {
        self.series
            .get(resource)
            .and_then(|r| r.get(region))
            .map_or(0, |s| s.buckets.iter().map(|b| b.requests).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs<'a>(res: &'a str, reg: &'a str, ts: u64) -> Observation<'a> {
        Observation {
            resource: res,
            key: res,
            region: reg,
            segment: Some("mobile"),
            ts,
            bytes: 10,
            object_bytes: Some(10),
            hit: ts.is_multiple_of(2),
        }
    }

    #[test]
    fn the_object_size_counts_what_a_shadow_holds_not_what_a_request_fetched() {
        let mut s = SeriesStore::new(60, 10, 100);
        // A 10 MB file: one whole download, HEADs and ranges that say its size, 304s that
        // do not.
        for (bytes, object) in [
            (10_000_000, Some(10_000_000)),
            (0, Some(10_000_000)),
            (2_000_000, Some(10_000_000)),
            (0, None),
            (0, None),
        ] {
            s.add(&Observation {
                bytes,
                object_bytes: object,
                ..obs("h/big", "eu", 5)
            });
        }
        let series = &s.query("h/big").unwrap()["eu"];
        assert_eq!(series.mean_bytes(), Some(10_000_000));
        // A store from before sizes were recorded falls back to the mean response.
        let mut old = series.clone();
        for b in &mut old.buckets {
            b.sized = 0;
            b.object_bytes = 0;
        }
        assert_eq!(old.mean_bytes(), Some(12_000_000 / 5));
    }

    #[test]
    fn buckets_and_retention() {
        let mut s = SeriesStore::new(60, 3, 100);
        for ts in [0, 30, 61, 130, 190, 250] {
            s.add(&obs("h/a", "eu", ts));
        }
        let b = &s.query("h/a").unwrap()["eu"].buckets;
        assert_eq!(b.len(), 3);
        assert_eq!(b[0].start, 120);
        assert_eq!(s.total("h/a", "eu"), 3);
        // A late record for a retained bucket lands in order.
        s.add(&obs("h/a", "eu", 125));
        assert_eq!(s.query("h/a").unwrap()["eu"].buckets[0].requests, 2);
        assert_eq!(s.query("h/a").unwrap()["eu"].segments["mobile"], 7);
    }

    #[test]
    fn rebucketing() {
        let mut s = SeriesStore::new(60, 100, 10);
        for ts in [0, 60, 899, 900, 1850] {
            s.add(&obs("r", "eu", ts));
        }
        let series = &s.query("r").unwrap()["eu"];
        assert_eq!(series.counts(900, 3, 1850), vec![3, 1, 1]);
        assert_eq!(series.counts(900, 2, 1850), vec![1, 1]);
        assert_eq!(series.mean_bytes(), Some(10));
    }

    #[test]
    fn the_shadowed_key_is_the_majority_not_the_latest() {
        let mut s = SeriesStore::new(60, 10, 10);
        let mut add = |key: &str, ts| {
            s.add(&Observation {
                key,
                ..obs("h/a", "eu", ts)
            })
        };
        for ts in 0..5 {
            add("h/a?v=2", ts);
        }
        add("h/a?junk=1", 6);
        add("h/a?junk=2", 7);
        assert_eq!(s.query("h/a").unwrap()["eu"].key, "h/a?v=2");
        // A new version that takes over the traffic takes over the key.
        for ts in 10..20 {
            s.add(&Observation {
                key: "h/a?v=3",
                ..obs("h/a", "eu", ts)
            });
        }
        assert_eq!(s.query("h/a").unwrap()["eu"].key, "h/a?v=3");
    }

    #[test]
    fn segments_beyond_the_cap_count_as_other() {
        let mut s = SeriesStore::new(60, 10, 10);
        let names: Vec<String> = (0..100).map(|i| format!("seg-{i}")).collect();
        for n in &names {
            s.add(&Observation {
                segment: Some(n),
                ..obs("h/a", "eu", 1)
            });
        }
        let segs = &s.query("h/a").unwrap()["eu"].segments;
        assert_eq!(segs.len(), MAX_SEGMENTS + 1);
        assert_eq!(segs[OTHER_SEGMENT], (100 - MAX_SEGMENTS) as u64);
    }

    #[test]
    fn a_full_store_evicts_the_oldest_hundredth_at_once() {
        let mut s = SeriesStore::new(60, 10, 1000);
        for i in 0..1000u64 {
            s.add(&obs(&format!("r{i}"), "eu", i));
        }
        assert_eq!(s.len(), 1000);
        s.add(&obs("new", "eu", 5000));
        assert_eq!(s.len(), 991);
        assert!(s.query("r9").is_none() && s.query("r10").is_some());
        assert!(s.query("new").is_some());
    }

    #[test]
    fn a_deleted_hosts_history_goes_and_a_new_owner_sees_only_its_own() {
        let mut st = SeriesStore::new(60, 100, 100);
        st.add(&obs("a.com/x", "eu", 60));
        st.add(&obs("a.com/x", "eu", 180));
        st.add(&obs("a.com/x", "us", 60));
        st.add(&obs("a.com.evil/x", "eu", 60));
        let s = &st.query("a.com/x").unwrap()["eu"];
        let later = s.since(120);
        assert_eq!(later.buckets.len(), 1);
        assert_eq!(later.buckets[0].start, 180);
        assert!(
            later.segments.is_empty() && later.key.is_empty(),
            "tallies predate 120"
        );
        let all = s.since(60);
        assert_eq!(all.buckets.len(), 2);
        assert_eq!(all.segments["mobile"], 2);
        assert_eq!(all.key, s.key);
        assert_eq!(st.forget_prefix("a.com/"), 2);
        assert!(st.query("a.com/x").is_none());
        assert_eq!(st.len(), 1, "another host's series stays");
    }

    /// A flood of busy series is held to the bucket budget: the least recently updated
    /// series go, the totals stay exact, and a snapshot restored under a smaller budget fits.
    #[test]
    fn the_bucket_budget_bounds_the_store() {
        let mut st = SeriesStore::new(60, 50, 1_000).with_max_buckets(1_000);
        for minute in 0..40u64 {
            for path in 0..100 {
                let res = format!("h/{path}");
                st.add(&obs(&res, "eu", minute * 60 + path));
            }
        }
        assert!(st.bucket_count() <= 1_000, "{}", st.bucket_count());
        let held: usize = st.iter().map(|(_, _, s)| s.buckets.len()).sum();
        assert_eq!(held, st.bucket_count());
        assert_eq!(st.iter().count(), st.len());
        assert!(st.query("h/99").is_some(), "the most recent series stays");
        assert!(st.query("h/0").is_none(), "the least recent went");
        let mut small = SeriesStore::new(60, 50, 1_000).with_max_buckets(100);
        assert!(small.restore(st.clone(), 40 * 60));
        assert!(small.bucket_count() <= 100);
        let held: usize = small.iter().map(|(_, _, s)| s.buckets.len()).sum();
        assert_eq!(held, small.bucket_count());
        let n = small.len();
        assert_eq!(small.forget_prefix("h/"), n);
        assert_eq!(small.bucket_count(), 0);
    }

    #[test]
    fn a_snapshot_from_ahead_of_the_clock_is_kept_with_its_update_times_clamped() {
        let mut st = SeriesStore::new(60, 100, 1_000);
        st.add(&obs("h/a", "eu", 100));
        st.add(&obs("h/a", "eu", 5_000));
        st.add(&obs("h/b", "eu", 5_000));
        let mut restored = SeriesStore::new(60, 100, 1_000);
        assert!(restored.restore(st, 130));
        assert_eq!(
            (restored.len(), restored.bucket_count()),
            (2, 3),
            "nothing is lost"
        );
        let a = &restored.query("h/a").unwrap()["eu"];
        assert_eq!(
            a.touched, 130,
            "an update time ahead of the clock is clamped"
        );
        restored.add(&obs("h/a", "eu", 140));
        assert_eq!(
            restored.query("h/a").unwrap()["eu"].counts(60, 2, 140),
            vec![1, 1]
        );
        // Once the clock reaches the later bucket, a count joins it.
        restored.add(&obs("h/a", "eu", 5_010));
        let a = &restored.query("h/a").unwrap()["eu"];
        assert_eq!(
            a.buckets.back().map(|b| (b.start, b.requests)),
            Some((4_980, 2))
        );
        // A series at full retention still records the present: the later buckets make room.
        let mut full = SeriesStore::new(60, 3, 1_000);
        for t in [6_000, 6_060, 6_120] {
            full.add(&obs("h/c", "eu", t));
        }
        let mut back = SeriesStore::new(60, 3, 1_000);
        assert!(back.restore(full, 200));
        back.add(&obs("h/c", "eu", 200));
        let c = &back.query("h/c").unwrap()["eu"];
        assert_eq!(c.counts(60, 1, 200), vec![1]);
        assert_eq!(c.buckets.len(), 3);
        assert_eq!(back.bucket_count(), 3);
    }

    #[test]
    fn one_hosts_flood_of_new_paths_evicts_its_own_series_first() {
        let mut s = SeriesStore::new(60, 10, 2_000);
        for i in 0..500u64 {
            s.add(&obs(&format!("a.com/page{i}"), "eu", i));
        }
        // Later, another tenant requests thousands of unique paths.
        for i in 0..5_000u64 {
            s.add(&obs(&format!("evil.com/x{i}"), "eu", 10_000 + i));
        }
        assert!(s.len() <= 2_000);
        let kept = (0..500)
            .filter(|i| s.query(&format!("a.com/page{i}")).is_some())
            .count();
        assert_eq!(kept, 500, "the quiet tenant's history stays");
        assert!(s.query("evil.com/x4999").is_some());
    }

    #[test]
    fn series_cap_evicts_least_recent() {
        let mut s = SeriesStore::new(60, 10, 2);
        s.add(&obs("a", "eu", 10));
        s.add(&obs("b", "eu", 20));
        s.add(&obs("c", "eu", 30));
        assert_eq!(s.len(), 2);
        assert!(s.query("a").is_none());
        assert!(s.query("c").is_some());
    }
}
