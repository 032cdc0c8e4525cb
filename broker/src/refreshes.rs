//! Refreshes the edges accepted lately. An edge queues an accepted refresh in memory; one that
//! crashes before running it keeps the version its origin replaced on disk and serves it as
//! fresh after its restart (a graceful stop purges such keys itself). So the broker keeps the
//! refreshes each edge accepted for a while and purges them there when it sees the restart.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long an accepted refresh is remembered: longer than an edge's fill queue usually holds
/// one (a fill times out after a minute), short enough that a planned restart (whose edge
/// purged its own queue) costs few refetches, since the broker cannot tell it from a crash.
pub const REFRESH_MEMORY: Duration = Duration::from_secs(120);
/// Refreshes remembered per edge; past it the oldest are forgotten.
pub const REFRESHES_PER_EDGE: usize = 10_000;

/// Accepted refreshes by edge, oldest first.
#[derive(Debug, Default)]
pub struct RecentRefreshes(parking_lot::Mutex<HashMap<usize, VecDeque<(String, Instant)>>>);

impl RecentRefreshes {
    /// Edge `edge` accepted a refresh of `key` at `now`.
    pub fn note(&self, edge: usize, key: &str, now: Instant) {
        let mut by_edge = self.0.lock();
        let q = by_edge.entry(edge).or_default();
        while q
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) > REFRESH_MEMORY)
            || q.len() >= REFRESHES_PER_EDGE
        {
            q.pop_front();
        }
        q.push_back((key.to_string(), now));
    }

    /// The keys edge `edge` accepted a refresh of within [`REFRESH_MEMORY`] before `now`,
    /// each once, forgotten from here.
    pub fn take(&self, edge: usize, now: Instant) -> Vec<String> {
        let Some(q) = self.0.lock().remove(&edge) else {
            return Vec::new();
        };
        let mut keys: Vec<String> = q
            .into_iter()
            .filter(|(_, at)| now.saturating_duration_since(*at) <= REFRESH_MEMORY)
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edges_recent_refreshes_are_taken_once() {
        let r = RecentRefreshes::default();
        let t0 = Instant::now();
        r.note(0, "h/old", t0);
        let later = t0 + REFRESH_MEMORY + Duration::from_secs(1);
        for key in ["h/b", "h/a", "h/b"] {
            r.note(0, key, later);
        }
        r.note(1, "h/other-edge", later);
        assert_eq!(r.take(0, later), ["h/a", "h/b"], "the old one forgotten");
        assert!(r.take(0, later).is_empty(), "taken once");
        assert_eq!(r.take(1, later), ["h/other-edge"]);
    }

    #[test]
    fn an_edge_keeps_at_most_its_share() {
        let r = RecentRefreshes::default();
        let now = Instant::now();
        for i in 0..REFRESHES_PER_EDGE + 5 {
            r.note(0, &format!("h/{i}"), now);
        }
        let kept = r.take(0, now);
        assert_eq!(kept.len(), REFRESHES_PER_EDGE);
        assert!(!kept.contains(&"h/0".to_string()), "the oldest went first");
    }
}
