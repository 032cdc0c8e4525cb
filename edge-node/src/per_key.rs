//! Things held open, counted per key, each given back when its slot drops: the bound on
//! connections one QUIC peer or one client address may hold.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// Open counts by key; clones share the counts.
pub struct PerKey<K>(Arc<parking_lot::Mutex<HashMap<K, usize>>>);

impl<K> Clone for PerKey<K> {
    fn clone(&self) -> Self {
        PerKey(self.0.clone())
    }
}

impl<K> Default for PerKey<K> {
    fn default() -> Self {
        PerKey(Arc::default())
    }
}

/// One open thing's place under its key, given back when dropped.
pub struct Slot<K: Hash + Eq> {
    counts: PerKey<K>,
    key: K,
}

impl<K: Hash + Eq + Clone> PerKey<K> {
    /// A place for one more under `key`, unless it holds `max` already.
    pub fn admit(&self, key: K, max: usize) -> Option<Slot<K>> {
        let mut open = self.0.lock();
        let n = open.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: self.clone(),
            key,
        })
    }

    /// How many are open under `key`.
    pub fn open(&self, key: &K) -> usize {
        self.0.lock().get(key).copied().unwrap_or(0)
    }
}

impl<K: Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self.counts.0.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_bound_and_gets_places_back() {
        let counts = PerKey::default();
        let held: Vec<_> = (0..3).map(|_| counts.admit("a", 3).unwrap()).collect();
        assert!(counts.admit("a", 3).is_none());
        assert!(counts.admit("b", 3).is_some(), "others are not affected");
        drop(held);
        assert_eq!(counts.open(&"a"), 0);
        assert!(counts.0.lock().is_empty(), "no key left behind");
        assert!(counts.admit("a", 3).is_some());
    }
}
