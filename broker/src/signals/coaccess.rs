//! Co-access: which resources follow which. A client that fetches A and then B within a
//! window counts one A→B transition in its region; `P(B follows A) = (transitions(A→B) + 1)
//! / (requests(A) + 2)`, the rule of succession, so a few sessions do not make a certainty.
//! A request for A then shadows its likely followers on the edge that will be
//! asked for them, due at their typical gap. Those P are then held to what the learner's own
//! offers did ([`super::calibration`]): among thousands of pairs, the few that followed in
//! their few trials are not as likely as their counts say. Memory is bounded by entries
//! (clients, pairs, counts) and by the bytes of the keys they hold (keys may be 2 KiB long,
//! and a client chooses them), and counts decay, so yesterday's page structure fades.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::calibration::Calibration;

/// `[signals.coaccess]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoAccessSection {
    /// Whether co-access shadows are issued.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds after A within which B counts as following it.
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// Smallest P(B follows A) that shadows B.
    #[serde(default = "default_min_prob")]
    pub min_probability: f64,
    /// Whether follow probabilities are held to what the learner's offers did
    /// ([`super::calibration`]); off, they are the counts' own (the offers are still scored,
    /// for the metrics).
    #[serde(default = "default_true")]
    pub calibrate: bool,
    /// Requests of A needed before its followers are trusted.
    #[serde(default = "default_support")]
    pub min_support: f64,
    /// Counts halve every this many seconds.
    #[serde(default = "default_half_life")]
    pub half_life_secs: u64,
    /// Most (region, A, B) pairs kept, and most (region, A) request counts; beyond either the
    /// weakest are forgotten.
    #[serde(default = "default_max_pairs")]
    pub max_pairs: usize,
    /// Most clients whose recent requests are remembered.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Most bytes of keys held (default 256 MiB, each entry's bookkeeping counted as 64 bytes
    /// more): half for the pairs, a quarter each for the request counts and the clients' recent
    /// requests, and a sixteenth more for offers waiting for their outcome (past it, new
    /// offers are not scored). Past a share, its weakest tenth is forgotten (the recent
    /// requests: those out of the window, then all).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
}

impl Default for CoAccessSection {
    fn default() -> Self {
        CoAccessSection {
            enabled: true,
            window_secs: default_window(),
            min_probability: default_min_prob(),
            calibrate: true,
            min_support: default_support(),
            half_life_secs: default_half_life(),
            max_pairs: default_max_pairs(),
            max_clients: default_max_clients(),
            max_bytes: default_max_bytes(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_window() -> u64 {
    30
}
fn default_min_prob() -> f64 {
    0.5
}
fn default_support() -> f64 {
    3.0
}
fn default_half_life() -> u64 {
    3600
}
fn default_max_pairs() -> usize {
    200_000
}
fn default_max_clients() -> usize {
    100_000
}
fn default_max_bytes() -> usize {
    256 << 20
}

/// Bytes an entry is charged beside its key: hash-table slot, counters, allocation header.
const ENTRY_BYTES: usize = 64;

/// What an entry keyed by `key` is charged.
fn charge(key: &str) -> usize {
    key.len() + ENTRY_BYTES
}

/// The share of `max_bytes` offers waiting for their outcome may hold (a sixteenth).
const OFFERS_SHARE: usize = 16;

/// Requests a client remembers for pairing.
const RECENT_PER_CLIENT: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
struct Pair {
    count: f64,
    /// Running mean of the A→B gap in seconds.
    gap: f64,
}

/// A likely follower of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Follower {
    /// Its key.
    pub key: String,
    /// P(it follows within the window).
    pub probability: f64,
    /// Typical seconds after the leader.
    pub gap_secs: f64,
    /// Mean response size of its resource, when the monitor has seen it: a follower larger
    /// than its edge's whole shadow budget is not shadowed (the planner's budget holds
    /// forecast shadows to the same limit).
    pub bytes: Option<u64>,
}

/// Picks the weakest tenth of a set of counts (at least one) for removal: everything below the
/// tenth's boundary count, and only as many entries *at* it as the tenth has room for. Dropping
/// every tie instead would empty a map whose counts are all equal (uniform traffic, or right
/// after a decay), and its learning would restart from nothing.
struct WeakestTenth {
    floor: f64,
    ties: usize,
}

impl WeakestTenth {
    fn of(mut counts: Vec<f64>) -> Self {
        if counts.is_empty() {
            return WeakestTenth {
                floor: 0.0,
                ties: 0,
            };
        }
        let cut = counts.len() / 10;
        counts.select_nth_unstable_by(cut, f64::total_cmp);
        let floor = counts[cut];
        // Everything strictly below the boundary sits before it.
        let below = counts[..cut].iter().filter(|c| **c < floor).count();
        WeakestTenth {
            floor,
            ties: cut + 1 - below,
        }
    }

    /// Whether an entry with `count` goes.
    fn goes(&mut self, count: f64) -> bool {
        if count < self.floor {
            return true;
        }
        if count == self.floor && self.ties > 0 {
            self.ties -= 1;
            return true;
        }
        false
    }
}

/// The learned transition map.
pub struct CoAccess {
    cfg: CoAccessSection,
    /// Per client, its recent requests as (key, ts, start), in order of start.
    recent: HashMap<u64, VecDeque<(String, u64, u64)>>,
    counts: HashMap<(u16, String), f64>,
    /// (region, A) → B → transitions, so a lookup touches only A's followers.
    pairs: HashMap<(u16, String), HashMap<String, Pair>>,
    n_pairs: usize,
    /// Bytes charged for `pairs`, `counts` and `recent` ([`charge`]).
    pair_bytes: usize,
    count_bytes: usize,
    recent_bytes: usize,
    last_decay: u64,
    /// How the offers made came out, and the P they give.
    calibration: Calibration,
}

impl CoAccess {
    /// An empty map.
    pub fn new(cfg: CoAccessSection) -> Self {
        CoAccess {
            cfg,
            recent: HashMap::new(),
            counts: HashMap::new(),
            pairs: HashMap::new(),
            n_pairs: 0,
            pair_bytes: 0,
            count_bytes: 0,
            recent_bytes: 0,
            last_decay: 0,
            calibration: Calibration::default(),
        }
    }

    /// Pairs currently kept.
    pub fn pairs(&self) -> usize {
        self.n_pairs
    }

    /// Bytes charged for what is kept (keys plus [`ENTRY_BYTES`] an entry).
    pub fn bytes(&self) -> usize {
        self.pair_bytes + self.count_bytes + self.recent_bytes + self.calibration.bytes()
    }

    /// Offers decided so far per band of P: (followed, not followed).
    pub fn outcomes(&self) -> &[(u64, u64); super::calibration::BANDS] {
        self.calibration.outcomes()
    }

    /// Learn from one request of `client` for `key` in `region` at `ts` (seconds), in the
    /// order requests are observed.
    pub fn observe(&mut self, client: u64, region: u16, key: &str, ts: u64) {
        self.observe_started(client, region, key, ts, 0);
    }

    /// [`Self::observe`] for a request that started at `started` (any clock, only compared
    /// between one client's requests; equal starts keep the order observed). Requests are
    /// recorded when they end, so a page whose body was still being sent when its assets'
    /// requests ended is observed after them: paired by start, it still leads them.
    pub fn observe_started(&mut self, client: u64, region: u16, key: &str, ts: u64, started: u64) {
        self.decay(ts);
        let count = self
            .counts
            .entry((region, key.to_string()))
            .or_insert_with(|| {
                self.count_bytes += charge(key);
                0.0
            });
        *count += 1.0;
        if self.counts.len() > self.cfg.max_pairs || self.count_bytes > self.cfg.max_bytes / 4 {
            // Every distinct key requested is counted (clients choose keys): the rarest tenth goes.
            let mut weakest = WeakestTenth::of(self.counts.values().copied().collect());
            self.counts.retain(|_, c| !weakest.goes(*c));
            self.count_bytes = self.counts.keys().map(|(_, k)| charge(k)).sum();
        }
        let new_client = !self.recent.contains_key(&client);
        if (self.recent.len() >= self.cfg.max_clients && new_client)
            || self.recent_bytes > self.cfg.max_bytes / 4
        {
            let window = self.cfg.window_secs;
            self.recent
                .retain(|_, q| q.iter().any(|(_, t, _)| ts.saturating_sub(*t) <= window));
            self.recent_bytes = self.recent_charge();
            if self.recent.len() >= self.cfg.max_clients
                || self.recent_bytes > self.cfg.max_bytes / 4
            {
                self.recent.clear();
                self.recent_bytes = 0;
            }
        }
        let q = self.recent.entry(client).or_default();
        // Where this request goes among the client's recent ones, by start: those before it
        // led to it, those after it (observed first, started later) followed it. Ends are not
        // in start order, so the window skips, rather than stops at, a request out of it.
        let at = q.partition_point(|(_, _, s)| *s <= started);
        let window = self.cfg.window_secs;
        let near = |t: u64| ts.abs_diff(t) <= window;
        // A repeat (a range, a reload) is not another transition: the client's requests are
        // counted as in start order, where each request counts every other key requested
        // since that key's own previous request, once.
        let mut leading: Vec<(String, String, u64)> = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        for (a, t, _) in q.range(..at).rev() {
            if !near(*t) {
                continue;
            }
            if a == key {
                break;
            }
            if seen.contains(&a.as_str()) {
                continue;
            }
            seen.push(a);
            leading.push((a.clone(), key.to_string(), ts.saturating_sub(*t)));
        }
        let mut led: Vec<(String, String, u64)> = Vec::new();
        let mut later_copy = false;
        let mut seen: Vec<&str> = Vec::new();
        for (b, t, s) in q.range(at..) {
            if !near(*t) {
                continue;
            }
            // A later request for `key` was counted by what follows it.
            if b == key {
                later_copy = true;
                break;
            }
            if seen.contains(&b.as_str()) {
                continue;
            }
            seen.push(b);
            // Counted already if an earlier request for `key` came after `b`'s previous one.
            let counted = q
                .range(..at)
                .rev()
                .filter(|(_, t, _)| near(*t))
                .find(|(x, _, _)| x == key || x == b)
                .is_some_and(|(x, _, _)| x == key);
            if counted {
                continue;
            }
            // Starts are wall milliseconds; gaps are clock seconds, like `ts`.
            let gap = crate::clock::clock_secs_f64(s.saturating_sub(started) as f64 / 1000.0);
            led.push((key.to_string(), b.clone(), gap));
        }
        // What led to a later request for `key` was counted for it.
        let mut transitions = led;
        if !later_copy {
            transitions.extend(leading);
        }
        q.insert(at, (key.to_string(), ts, started));
        self.recent_bytes += charge(key);
        if q.len() > RECENT_PER_CLIENT {
            if let Some((old, _, _)) = q.pop_front() {
                self.recent_bytes -= charge(&old);
            }
        }
        for (a, b, gap) in transitions {
            let followers = self.pairs.entry((region, a.clone())).or_insert_with(|| {
                self.pair_bytes += charge(&a);
                HashMap::new()
            });
            let p = followers.entry(b.clone()).or_insert_with(|| {
                self.n_pairs += 1;
                self.pair_bytes += charge(&b);
                Pair::default()
            });
            p.count += 1.0;
            p.gap += (gap as f64 - p.gap) / p.count.max(1.0);
        }
        if self.n_pairs > self.cfg.max_pairs || self.pair_bytes > self.cfg.max_bytes / 2 {
            self.prune();
        }
    }

    fn recent_charge(&self) -> usize {
        self.recent
            .values()
            .flat_map(|q| q.iter().map(|(k, _, _)| charge(k)))
            .sum()
    }

    /// Recount `n_pairs` and the bytes of `pairs` and `counts` after entries went.
    fn recount(&mut self) {
        self.n_pairs = self.pairs.values().map(HashMap::len).sum();
        self.pair_bytes = self
            .pairs
            .iter()
            .map(|((_, a), f)| charge(a) + f.keys().map(|b| charge(b)).sum::<usize>())
            .sum();
        self.count_bytes = self.counts.keys().map(|(_, k)| charge(k)).sum();
    }

    /// Halve every count once per half-life; forget what decays below one.
    fn decay(&mut self, ts: u64) {
        if self.last_decay == 0 {
            self.last_decay = ts;
        }
        let half = self.cfg.half_life_secs.max(1);
        while ts >= self.last_decay + half {
            self.last_decay += half;
            self.calibration.decay();
            self.counts.retain(|_, c| {
                *c *= 0.5;
                *c >= 0.5
            });
            for followers in self.pairs.values_mut() {
                followers.retain(|_, p| {
                    p.count *= 0.5;
                    p.count >= 0.5
                });
            }
            self.pairs.retain(|_, f| !f.is_empty());
            self.recount();
        }
    }

    /// Drop the weakest tenth of the pairs.
    fn prune(&mut self) {
        let mut weakest = WeakestTenth::of(
            self.pairs
                .values()
                .flat_map(|f| f.values().map(|p| p.count))
                .collect(),
        );
        for followers in self.pairs.values_mut() {
            followers.retain(|_, p| !weakest.goes(p.count));
        }
        self.pairs.retain(|_, f| !f.is_empty());
        self.recount();
    }

    /// Drop from `followers` those `client` asked for since its leader started (at
    /// `started`, within the window of `ts`): the request a follower's shadow is for has come.
    /// A leader whose start was queued triggers before the client can ask for anything
    /// more, so this drops nothing then; one whose start was not queued triggers at its
    /// record, when its response ends, often after its followers were asked (a page still
    /// being sent while its assets are fetched).
    /// Followers asked before the leader stay: a client may ask for them again (an API call,
    /// an asset its cache does not keep). How many went.
    fn drop_asked(
        &self,
        client: u64,
        started: u64,
        ts: u64,
        followers: &mut Vec<Follower>,
    ) -> usize {
        // An unknown start or client (0) cannot tell this visit's requests from others'.
        if started == 0 || client == 0 {
            return 0;
        }
        let Some(q) = self.recent.get(&client) else {
            return 0;
        };
        let window = self.cfg.window_secs;
        let before = followers.len();
        followers.retain(|f| {
            !q.iter()
                .any(|(k, t, s)| *k == f.key && *s >= started && ts.abs_diff(*t) <= window)
        });
        before - followers.len()
    }

    /// The likely followers of `key` in `region`, most likely first, at their calibrated P.
    pub fn followers(&self, region: u16, key: &str) -> Vec<Follower> {
        self.calibrate(self.candidates(region, key))
    }

    /// [`Self::followers`] of `key` requested by `client` in `region` at `ts`, its request
    /// started at `started`, less those the client asked for since then (how many: see
    /// [`Self::drop_asked`]). With `score`, each is an offer the learner then scores: followed
    /// if the client starts a request for it within the window ([`Self::asked`]). Only offers
    /// made as the leader starts are scored: one made at its end, after its followers were
    /// asked for and dropped, would leave out exactly the offers that came true.
    pub fn offer(
        &mut self,
        client: u64,
        region: u16,
        key: &str,
        ts: u64,
        started: u64,
        score: bool,
    ) -> (Vec<Follower>, usize) {
        let window = self.cfg.window_secs;
        self.calibration.expire(ts, window);
        let mut candidates = self.candidates(region, key);
        let asked = self.drop_asked(client, started, ts, &mut candidates);
        if score {
            let budget = self.cfg.max_bytes / OFFERS_SHARE;
            for f in &candidates {
                self.calibration
                    .offer(client, &f.key, f.probability, ts, started, budget);
            }
        }
        (self.calibrate(candidates), asked)
    }

    /// `client` started a request for `key` at `ts` (broker clock; `started` on the wall,
    /// ms): it follows the offers of it made within the window before.
    pub fn asked(&mut self, client: u64, key: &str, ts: u64, started: u64) {
        let window = self.cfg.window_secs;
        self.calibration.expire(ts, window);
        self.calibration.asked(client, key, ts, started, window);
    }

    /// `candidates` at their calibrated P, those still likely enough, most likely first.
    fn calibrate(&self, mut candidates: Vec<Follower>) -> Vec<Follower> {
        if self.cfg.calibrate {
            for f in &mut candidates {
                f.probability = self.calibration.calibrated(f.probability);
            }
        }
        candidates.retain(|f| f.probability >= self.cfg.min_probability);
        candidates.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        candidates
    }

    /// Followers of `key` in `region` whose counts put them at the minimum probability or
    /// above, at those counts' P.
    fn candidates(&self, region: u16, key: &str) -> Vec<Follower> {
        let n = self
            .counts
            .get(&(region, key.to_string()))
            .copied()
            .unwrap_or(0.0);
        if n < self.cfg.min_support {
            return Vec::new();
        }
        let Some(followers) = self.pairs.get(&(region, key.to_string())) else {
            return Vec::new();
        };
        followers
            .iter()
            .map(|(b, p)| Follower {
                key: b.clone(),
                // A uniform prior on P: a follower seen after each of A's first three
                // requests is likely (0.8), not certain, and the estimate tends to the observed
                // share as support grows. The bare share put 3-of-3 followers at 1.0, above any
                // break-even, and such shadows were wasted about as often as used (byte
                // precision 0.36–0.44 in some apache replays at 1%).
                // A pair can outlive its leader's count (counts are pruned on their own, and
                // a leader back after that starts again from 0): it never counts more
                // follows than the leader has requests.
                probability: ((p.count.min(n) + 1.0) / (n + 2.0)).min(1.0),
                gap_secs: p.gap,
                bytes: None,
            })
            .filter(|f| f.probability >= self.cfg.min_probability)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CoAccessSection {
        CoAccessSection {
            max_pairs: 50,
            max_clients: 4,
            ..CoAccessSection::default()
        }
    }

    #[test]
    fn a_page_then_its_assets_become_followers() {
        let mut c = CoAccess::new(cfg());
        for client in 0..4u64 {
            let t = 1000 + client * 100;
            c.observe(client, 0, "h/index.html", t);
            c.observe(client, 0, "h/app.js", t + 2);
            if client < 2 {
                c.observe(client, 0, "h/rare.png", t + 3);
            }
        }
        let f = c.followers(0, "h/index.html");
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].key, "h/app.js");
        // 4 of 4 and 2 of 4, shrunk towards 1/2.
        assert!((f[0].probability - 5.0 / 6.0).abs() < 1e-9);
        assert!((f[0].gap_secs - 2.0).abs() < 1e-9);
        assert!((f[1].probability - 0.5).abs() < 1e-9);
        // Other regions learned nothing; too little support gives nothing.
        assert!(c.followers(1, "h/index.html").is_empty());
        assert!(c.followers(0, "h/rare.png").is_empty());
    }

    /// A follower the client asked for after the page started (its page response ended
    /// later, so the page's record came last) is not shadowed for it; one asked on an
    /// earlier visit is.
    #[test]
    fn followers_asked_since_the_leader_started_are_not_offered() {
        let mut c = CoAccess::new(cfg());
        for client in 0..4u64 {
            let t = 1000 + client * 100;
            c.observe(client, 0, "h/index.html", t);
            c.observe(client, 0, "h/app.js", t + 2);
            c.observe(client, 0, "h/style.css", t + 2);
        }
        // Client 9: a visit, then a second one whose page ended after its script was asked.
        c.observe_started(9, 0, "h/index.html", 1990, 1_990_000);
        c.observe_started(9, 0, "h/style.css", 1990, 1_990_010);
        c.observe_started(9, 0, "h/app.js", 2000, 2_000_010);
        c.observe_started(9, 0, "h/index.html", 2000, 2_000_000);
        let mut f = c.followers(0, "h/index.html");
        assert_eq!(f.len(), 2);
        assert_eq!(c.drop_asked(9, 2_000_000, 2000, &mut f), 1);
        assert_eq!(f[0].key, "h/style.css", "asked on the visit before");
        let mut f = c.followers(0, "h/index.html");
        assert_eq!(
            c.drop_asked(42, 2_000_000, 2000, &mut f),
            0,
            "a client never seen"
        );
    }

    /// Leaders whose three visits each brought their script (P 0.8 by the counts) whose
    /// offers then go unfollowed: a new leader with the same record is no longer offered.
    #[test]
    fn followers_are_offered_at_what_such_offers_did() {
        let mut c = CoAccess::new(CoAccessSection {
            max_clients: 1000,
            max_pairs: 10_000,
            ..CoAccessSection::default()
        });
        let learn = |c: &mut CoAccess, page: &str, script: &str, t: u64| {
            for visitor in 0..3u64 {
                let client = 100_000 + t * 10 + visitor;
                c.observe(client, 0, page, t);
                c.observe(client, 0, script, t + 1);
            }
        };
        learn(&mut c, "h/p0", "h/s0", 100);
        let f = c.followers(0, "h/p0");
        assert!((f[0].probability - 0.8).abs() < 1e-9, "{f:?}");
        for i in 0..20u64 {
            let (page, script) = (format!("h/p{i}"), format!("h/s{i}"));
            let t = 200 + i;
            learn(&mut c, &page, &script, t);
            // A visitor who reads the page and leaves.
            let (offered, asked) = c.offer(7000 + i, 0, &page, t + 2, 0, true);
            assert_eq!((offered.len(), asked), (1, 0));
            c.observe(7000 + i, 0, &page, t + 2);
        }
        // Twice the window later every offer is decided.
        c.asked(1, "h/elsewhere", 600, 0);
        assert_eq!(c.outcomes()[8], (0, 20));
        learn(&mut c, "h/new", "h/new.js", 700);
        assert!(c.followers(0, "h/new").is_empty());
        // Calibration off: the counts' own P.
        c.cfg.calibrate = false;
        assert_eq!(c.followers(0, "h/new").len(), 1);
        c.cfg.calibrate = true;
        // Followed offers bring it back.
        for i in 0..40u64 {
            let t = 800 + i * 40;
            let (offered, _) = c.offer(8, 0, "h/p0", t, 0, true);
            assert!(offered.len() <= 1);
            c.observe(8, 0, "h/p0", t);
            c.asked(8, "h/s0", t + 1, 0);
            c.observe(8, 0, "h/s0", t + 1);
        }
        let followed: u64 = c.outcomes().iter().map(|(f, _)| f).sum();
        assert_eq!(followed, 40);
        assert_eq!(c.followers(0, "h/p0")[0].key, "h/s0");
    }

    #[test]
    fn a_pair_that_outlived_its_leaders_count_is_never_a_certainty() {
        let mut c = CoAccess::new(cfg());
        for client in 0..4u64 {
            let t = 1000 + client * 100;
            c.observe(client, 0, "h/index.html", t);
            c.observe(client, 0, "h/app.js", t + 2);
        }
        // The leader's count was pruned and it came back: 3 requests since, 4 follows kept.
        c.counts.insert((0, "h/index.html".to_string()), 3.0);
        let f = c.followers(0, "h/index.html");
        assert!((f[0].probability - 4.0 / 5.0).abs() < 1e-9, "{f:?}");
    }

    #[test]
    fn a_leader_observed_after_its_followers_still_leads_them() {
        let mut c = CoAccess::new(cfg());
        for client in 0..4u64 {
            let t = 1000 + client * 100;
            let ms = t * 1000;
            // The page started first, but its record (made as it ended) comes after the
            // script's, as when the page's body is still being sent.
            c.observe_started(client, 0, "h/app.js", t, ms + 50);
            c.observe_started(client, 0, "h/index.html", t, ms);
        }
        let f = c.followers(0, "h/index.html");
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].key, "h/app.js");
        assert!((f[0].probability - 5.0 / 6.0).abs() < 1e-9);
        assert!(
            c.followers(0, "h/app.js").is_empty(),
            "the script does not lead the page"
        );
        // A repeat of the leader observed late does not count its follower again.
        c.observe_started(9, 0, "h/index.html", 2000, 2_000_000);
        c.observe_started(9, 0, "h/app.js", 2000, 2_000_100);
        c.observe_started(9, 0, "h/index.html", 2001, 2_000_050);
        assert_eq!(
            c.pairs[&(0, "h/index.html".to_string())]["h/app.js"].count,
            5.0
        );
    }

    #[test]
    fn a_request_observed_late_beside_another_of_its_key_counts_nothing_twice() {
        let mut c = CoAccess::new(cfg());
        let count = |c: &CoAccess, a: &str, b: &str| {
            c.pairs
                .get(&(0, a.to_string()))
                .and_then(|f| f.get(b))
                .map_or(0.0, |p| p.count)
        };
        // A long range of the image ends after a later one: the page leads the image once.
        c.observe_started(1, 0, "h/page", 100, 0);
        c.observe_started(1, 0, "h/img", 100, 20);
        c.observe_started(1, 0, "h/img", 101, 10);
        assert_eq!(count(&c, "h/page", "h/img"), 1.0);
        // A repeat of the image between the first one and a script observed before it: the
        // first image led the script, the repeat adds nothing.
        c.observe_started(2, 0, "h/page", 100, 0);
        c.observe_started(2, 0, "h/img", 100, 10);
        c.observe_started(2, 0, "h/app.js", 100, 15);
        c.observe_started(2, 0, "h/img", 101, 12);
        assert_eq!(count(&c, "h/img", "h/app.js"), 1.0);
        assert_eq!(count(&c, "h/page", "h/img"), 2.0);
        assert_eq!(count(&c, "h/page", "h/app.js"), 1.0);
        // A second page view observed after its script still leads it, though an earlier
        // view led the earlier script: counted as in start order.
        c.observe_started(3, 0, "h/page", 200, 0);
        c.observe_started(3, 0, "h/app.js", 200, 10);
        c.observe_started(3, 0, "h/app.js", 201, 110);
        c.observe_started(3, 0, "h/page", 201, 100);
        assert_eq!(count(&c, "h/page", "h/app.js"), 3.0);
        assert_eq!(count(&c, "h/app.js", "h/page"), 1.0);
    }

    #[test]
    fn a_follower_requested_again_counts_once_per_leader() {
        let mut c = CoAccess::new(CoAccessSection {
            max_clients: 100,
            ..cfg()
        });
        for client in 0..10u64 {
            let t = 1000 + client * 100;
            c.observe(client, 0, "h/a", t);
            if client < 2 {
                for i in 1..=4 {
                    c.observe(client, 0, "h/b", t + i);
                }
            }
        }
        // 2 of 10 with the prior: 3/12, below the default minimum probability.
        assert!(c.followers(0, "h/a").is_empty());
        let pair = &c.pairs[&(0, "h/a".to_string())]["h/b"];
        assert_eq!(pair.count, 2.0);
        assert!((pair.gap - 1.0).abs() < 1e-9);
        // A new request for the leader counts the follower again.
        c.observe(0, 0, "h/a", 1010);
        c.observe(0, 0, "h/b", 1011);
        assert_eq!(c.pairs[&(0, "h/a".to_string())]["h/b"].count, 3.0);
    }

    #[test]
    fn outside_the_window_nothing_follows_and_counts_decay() {
        let mut c = CoAccess::new(cfg());
        for client in 0..4u64 {
            c.observe(client, 0, "h/a", 10);
            c.observe(client, 0, "h/b", 10 + 31);
        }
        assert!(c.followers(0, "h/a").is_empty());
        for client in 0..4u64 {
            c.observe(client, 0, "h/a", 100);
            c.observe(client, 0, "h/b", 101);
        }
        assert_eq!(c.followers(0, "h/a").len(), 1);
        // Two half-lives later the support has decayed below the minimum.
        c.observe(9, 0, "h/x", 100 + 2 * 3600);
        assert!(c.followers(0, "h/a").is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let mut c = CoAccess::new(cfg());
        for i in 0..500u64 {
            c.observe(i % 7, 0, &format!("h/{}", i % 40), 1000 + i);
        }
        assert!(c.pairs() <= 50);
        assert!(c.recent.len() <= 4);
    }

    #[test]
    fn a_flood_of_unique_keys_keeps_the_counts_bounded_and_the_popular_ones() {
        let mut c = CoAccess::new(cfg());
        for i in 0..5000u64 {
            if i % 10 == 0 {
                c.observe(1, 0, "h/index.html", 1000 + i);
                c.observe(1, 0, "h/app.js", 1000 + i);
            }
            c.observe(2, 0, &format!("h/x?cache-buster={i}"), 1000 + i);
        }
        assert!(c.counts.len() <= 51, "{}", c.counts.len());
        assert!(c.counts[&(0, "h/index.html".to_string())] > 10.0);
    }

    #[test]
    fn pruning_equal_counts_drops_a_tenth_not_everything() {
        let mut c = CoAccess::new(cfg());
        // 60 distinct pairs seen once each, past the cap of 50: a tenth goes each time.
        for i in 0..60u64 {
            c.observe(i, 0, "h/page", 1000);
            c.observe(i, 0, &format!("h/asset-{i}"), 1001);
        }
        assert!((40..=50).contains(&c.pairs()), "{}", c.pairs());
        let mut w = WeakestTenth::of(vec![1.0; 20]);
        assert_eq!((0..20).filter(|_| w.goes(1.0)).count(), 3);
        let mut w = WeakestTenth::of(vec![1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]);
        let gone: Vec<f64> = [1.0, 1.0, 2.0, 3.0]
            .into_iter()
            .filter(|c| w.goes(*c))
            .collect();
        assert_eq!(gone, [1.0, 1.0], "a tenth of 11 is the two weakest");
    }

    #[test]
    fn long_keys_are_held_within_the_byte_budget() {
        let budget = 200_000;
        let mut c = CoAccess::new(CoAccessSection {
            max_bytes: budget,
            ..CoAccessSection::default()
        });
        // Clients walking through 2 KiB keys: well under every entry cap, far over the bytes.
        for i in 0..20_000u64 {
            if i % 10 == 0 {
                c.observe(999, 0, "h/index.html", 1000 + i / 10);
                c.observe(999, 0, "h/app.js", 1000 + i / 10);
            }
            let key = format!("h/{}?{}", i % 300, "x".repeat(2000));
            c.observe(i % 50, 0, &key, 1000 + i / 10);
            assert!(
                c.bytes() <= budget + 3 * (2100 + ENTRY_BYTES),
                "{}",
                c.bytes()
            );
        }
        // The charges kept incrementally match a recount.
        let kept = c.bytes();
        c.recount();
        c.recent_bytes = c.recent_charge();
        assert_eq!(c.bytes(), kept);
        // What is popular survives the pruning.
        let followers = c.followers(0, "h/index.html");
        assert_eq!(followers[0].key, "h/app.js", "{followers:?}");
    }
}
