//! Weighted rendezvous (highest random weight) hashing.
//!
//! Every (edge, key) pair gets a score `weight / -ln(u)` with `u` uniform in (0, 1) from a
//! stable hash; the key goes to the highest score. Adding an edge only takes the keys it now
//! wins, removing one only moves its own keys, and an edge of weight 2 wins twice as often.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Score of `edge_id` for `key`; higher wins.
pub fn score(edge_id: &str, weight: f64, key: &str) -> f64 {
    let seed = xxh3_64_with_seed(edge_id.as_bytes(), 0x5348_4144_4f57);
    let h = xxh3_64_with_seed(key.as_bytes(), seed);
    // 53 high bits → (0, 1]; never 0 so ln is finite.
    let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    weight / -u.ln()
}

/// Indices of `candidates` ordered by descending score for `key`.
pub fn rank<'a, I>(candidates: I, key: &str) -> Vec<usize>
where
    I: IntoIterator<Item = (usize, &'a str, f64)>,
{
    let mut scored: Vec<(f64, usize)> = candidates
        .into_iter()
        .map(|(i, id, w)| (score(id, w, key), i))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(ids: &[(&str, f64)], key: &str) -> usize {
        rank(ids.iter().enumerate().map(|(i, (id, w))| (i, *id, *w)), key)[0]
    }

    #[test]
    fn deterministic_and_spread() {
        let ids = [("a", 1.0), ("b", 1.0), ("c", 1.0)];
        let mut counts = [0usize; 3];
        for k in 0..30_000 {
            let key = format!("host/obj/{k}");
            let o = owner(&ids, &key);
            assert_eq!(o, owner(&ids, &key));
            counts[o] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn adding_an_edge_moves_only_its_share() {
        let before = [("a", 1.0), ("b", 1.0), ("c", 1.0)];
        let after = [("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0)];
        let mut moved = 0;
        for k in 0..20_000 {
            let key = format!("k{k}");
            let (x, y) = (owner(&before, &key), owner(&after, &key));
            if x != y {
                assert_eq!(y, 3, "a key may only move to the new edge");
                moved += 1;
            }
        }
        assert!((4_000..6_000).contains(&moved), "{moved}");
    }

    #[test]
    fn weight_scales_share() {
        let ids = [("a", 2.0), ("b", 1.0)];
        let a = (0..30_000)
            .filter(|k| owner(&ids, &format!("k{k}")) == 0)
            .count();
        assert!((19_000..21_000).contains(&a), "{a}");
    }
}
