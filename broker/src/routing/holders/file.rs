//! Peer holders kept across a broker restart.
//!
//! Without them a restarted broker hints no peer until the edges serve each key again: for up
//! to `[peer_fill] max_age_secs` a miss of a key another region holds goes to the origin. So
//! the broker writes what it remembers (holders with their purge counts, the purge floors, and
//! each edge's cache id) at a graceful stop and every `[peer_fill] snapshot_secs`, and reads
//! it back at start.
//!
//! Edges are named by id, so a reordered or edited `[[edges]]` list maps holders to the same
//! edges, and those no longer listed are dropped; regions come from the new list. An edge whose
//! cache id at the broker's first poll is not the one it had when its holders were written
//! (it restarted empty while the broker was away) loses them, as after a restart the broker
//! sees ([`Holders::edge_heard_again`]).
//!
//! The file is MessagePack: a [`Header`], then one array of keys per shard, each shard copied
//! under its lock and written after it (a request waits for a copy, never for the disk). It is
//! only a hint: one that cannot be read is logged and left for the next write to replace.

use std::io::{BufReader, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{at_or_after, Entry, Floor, Holder, Holders, Slots};

/// The layout written; another is not read.
const VERSION: u32 = 1;

/// How far ahead of the broker's clock a kept second may be and still read as its own (a
/// wall clock corrected by a few seconds since the write).
const FUTURE_SLACK_SECS: u64 = 60;

/// Why holders could not be kept or read back.
#[derive(Debug, thiserror::Error)]
pub enum HoldersFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not holders this broker wrote.
    #[error("{path}: not a holders file of this version: {detail}")]
    Format {
        /// The file.
        path: String,
        /// What did not decode.
        detail: String,
    },
}

/// A purge floor: its count and broker second.
type SavedFloor = (u32, u64);

/// What comes first in the file.
#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    purges: u32,
    edges: Vec<SavedEdge>,
    hosts: Vec<(String, SavedFloor)>,
    /// Arrays of [`SavedKey`] that follow.
    shards: u32,
}

/// An edge as the file names it; holders refer to it by its place in [`Header::edges`].
#[derive(Serialize, Deserialize)]
struct SavedEdge {
    id: String,
    /// Its cache id at the last stats poll before the write (0: not known).
    cache_id: u64,
    /// When it was last seen restarting empty ([`Holders::forget_edge`]).
    emptied: Option<SavedFloor>,
}

/// A key: its hash, its own purge floor, and its holders as (edge, purge count, second).
#[derive(Serialize, Deserialize)]
struct SavedKey(u64, Option<SavedFloor>, Vec<(u16, u32, u64)>);

/// What a read brought back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Restored {
    /// Keys with a holder still in age.
    pub keys: usize,
    /// Holders dropped: of edges no longer configured, or past `max_age_secs`.
    pub dropped: usize,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> HoldersFileError + '_ {
    move |source| HoldersFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn format_error(path: &Path, e: impl std::fmt::Display) -> HoldersFileError {
    HoldersFileError::Format {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

fn saved(f: Floor) -> SavedFloor {
    (f.count, f.at)
}

fn floor((count, at): SavedFloor) -> Floor {
    Floor { count, at }
}

impl Holders {
    /// Write what is remembered to `path` (atomically), edge `e` named `ids[e]` with cache id
    /// `cache_of(e)`; returns the keys written. One write at a time.
    pub fn save(
        &self,
        path: &Path,
        ids: &[&str],
        cache_of: impl Fn(usize) -> u64,
    ) -> Result<usize, HoldersFileError> {
        let _one = self.saving.lock();
        // Cache ids before the floors: a poll that finds an edge emptied raises its floor
        // before it keeps the new id, so the file never pairs the new id with the old holders.
        // An edge not polled yet keeps the id its holders were read back with.
        let caches: Vec<u64> = {
            let pending = self.saved_caches.read();
            (0..ids.len())
                .map(|e| match cache_of(e) {
                    0 => u16::try_from(e)
                        .ok()
                        .and_then(|e| pending.get(&e).copied())
                        .unwrap_or(0),
                    id => id,
                })
                .collect()
        };
        let emptied = self.emptied.read().clone();
        let edges = ids
            .iter()
            .zip(caches)
            .enumerate()
            .map(|(e, (id, cache_id))| SavedEdge {
                id: id.to_string(),
                cache_id,
                emptied: u16::try_from(e)
                    .ok()
                    .and_then(|e| emptied.get(&e))
                    .map(|f| saved(*f)),
            })
            .collect();
        let hosts = self
            .purged
            .read()
            .iter()
            .map(|(h, f)| (h.to_string(), saved(*f)))
            .collect();
        let header = Header {
            version: VERSION,
            purges: self.purges.load(std::sync::atomic::Ordering::Acquire),
            edges,
            hosts,
            shards: self.shards.len() as u32,
        };
        let mut written = 0;
        edge_node::durable::write_atomic_with(path, |w| {
            encode(w, &header)?;
            for shard in self.shards.iter() {
                // Copied under the lock, converted after it. The older generation first: read
                // back into a smaller map, the newer one is what stays.
                let copied: Vec<(u64, Entry)> = {
                    let s = shard.lock();
                    let previous = s
                        .previous
                        .iter()
                        .filter(|(k, _)| !s.current.contains_key(k));
                    previous
                        .chain(s.current.iter())
                        .map(|(k, e)| (*k, *e))
                        .collect()
                };
                let keys: Vec<SavedKey> = copied.iter().map(saved_key).collect();
                written += keys.len();
                encode(w, &keys)?;
            }
            Ok(())
        })
        .map_err(io_error(path))?;
        Ok(written)
    }

    /// Read back holders `path` kept, edges mapped by id onto `edges` (this configuration's
    /// ids, in order, and their regions), at broker second `now`. Nothing to read (no file)
    /// restores nothing. Call before any request is recorded.
    pub fn restore(
        &self,
        path: &Path,
        edges: &[(&str, usize)],
        now: u64,
    ) -> Result<Restored, HoldersFileError> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Restored::default()),
            Err(e) => return Err(io_error(path)(e)),
        };
        let mut r = BufReader::new(file);
        let header: Header = decode(&mut r).map_err(|e| format_error(path, e))?;
        if header.version != VERSION {
            return Err(format_error(path, format!("version {}", header.version)));
        }
        // The file's edge number → this configuration's (edge, region).
        let mapped: Vec<Option<(u16, u16)>> = header
            .edges
            .iter()
            .map(|s| {
                let e = edges.iter().position(|(id, _)| *id == s.id)?;
                Some((u16::try_from(e).ok()?, u16::try_from(edges[e].1).ok()?))
            })
            .collect();
        // Purges count on from the latest count the file names: the header's is read before the
        // shards were copied, and a purge may have come in between.
        let mut purges = header.purges;
        let mut count = |c: u32| {
            if !at_or_after(purges, c) {
                purges = c;
            }
        };
        // Seconds ahead of `now` are another clock's (a replay's, or a wall clock stepped
        // back): such holders and floors are not this broker's past.
        let fresh =
            |at: u64| at <= now + FUTURE_SLACK_SECS && now.saturating_sub(at) <= self.max_age;
        let mut restored = Restored::default();
        for _ in 0..header.shards {
            let shard: Vec<SavedKey> = decode(&mut r).map_err(|e| format_error(path, e))?;
            for SavedKey(key, key_floor, holders) in shard {
                let mut slots = Slots::default();
                let mut n = 0;
                for (edge, purges, at) in holders {
                    let to = mapped.get(usize::from(edge)).copied().flatten();
                    match to {
                        Some((edge, region)) if n < slots.len() && fresh(at) => {
                            count(purges);
                            slots[n] = Some(Holder {
                                edge,
                                region,
                                purges,
                                at,
                            });
                            n += 1;
                        }
                        _ => restored.dropped += 1,
                    }
                }
                let key_floor = key_floor.map(floor).filter(|f| fresh(f.at));
                if n == 0 && key_floor.is_none() {
                    continue;
                }
                if let Some(f) = key_floor {
                    count(f.count);
                }
                restored.keys += usize::from(n > 0);
                let mut s = self.shard(key).lock();
                *s.entry(key, self.per_shard) = Entry {
                    holders: slots,
                    floor: key_floor,
                };
            }
        }
        let hosts: Vec<(Box<str>, Floor)> = header
            .hosts
            .into_iter()
            .map(|(h, f)| (h.into_boxed_str(), floor(f)))
            .filter(|(_, f)| fresh(f.at))
            .collect();
        let edge_floors: Vec<(u16, Option<Floor>, u64)> = header
            .edges
            .iter()
            .zip(&mapped)
            .filter_map(|(s, to)| {
                let (edge, _) = (*to)?;
                Some((
                    edge,
                    s.emptied.map(floor).filter(|f| fresh(f.at)),
                    s.cache_id,
                ))
            })
            .collect();
        for f in hosts
            .iter()
            .map(|(_, f)| f)
            .chain(edge_floors.iter().filter_map(|(_, f, _)| f.as_ref()))
        {
            count(f.count);
        }
        self.purges
            .store(purges, std::sync::atomic::Ordering::Release);
        self.purged.write().extend(hosts);
        let mut emptied = self.emptied.write();
        let mut caches = self.saved_caches.write();
        for (edge, f, cache_id) in edge_floors {
            if let Some(f) = f {
                emptied.insert(edge, f);
            }
            caches.insert(edge, cache_id);
        }
        Ok(restored)
    }

    /// Edge `e` answered its first stats poll since this broker started, with cache id
    /// `cache_id` (0: it does not say) and `memory_only` as it reports; at broker second
    /// `now`. Its holders are dropped when the broker cannot tell that its cache still holds
    /// what they name: for holders read back, unless its cache id is the one they were kept
    /// with; else (holders recorded since the start only) when it has no disk tier, since a
    /// process before this one may have served them while the broker could not reach it.
    /// Returns whether they were dropped.
    pub fn edge_heard_again(&self, e: usize, cache_id: u64, memory_only: bool, now: u64) -> bool {
        let Ok(edge) = u16::try_from(e) else {
            return false;
        };
        let kept_with = self.saved_caches.read().get(&edge).copied();
        let stale = match kept_with {
            Some(kept) => kept == 0 || cache_id == 0 || kept != cache_id,
            None => memory_only,
        };
        // Floored before they are released to hints, so no hint goes to them in between.
        if stale {
            self.forget_edge(e, now);
        }
        self.saved_caches.write().remove(&edge);
        stale
    }
}

fn saved_key((key, entry): &(u64, Entry)) -> SavedKey {
    let holders = entry
        .holders
        .iter()
        .flatten()
        .map(|h| (h.edge, h.purges, h.at))
        .collect();
    SavedKey(*key, entry.floor.map(saved), holders)
}

fn encode<T: Serialize>(w: &mut dyn Write, value: &T) -> std::io::Result<()> {
    rmp_serde::encode::write(w, value).map_err(std::io::Error::other)
}

fn decode<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::decode::from_read(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::PeerFillSection;

    fn holders() -> Holders {
        Holders::new(&PeerFillSection {
            enabled: true,
            max_age_secs: 100,
            max_keys: 1000,
            snapshot_secs: 0,
        })
    }

    const ANY: fn(usize) -> bool = |_| true;

    #[test]
    fn holders_come_back_on_the_same_edges_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holders");
        let h = holders();
        h.record(1, 0, 0, 10, h.epoch());
        h.record(1, 2, 1, 11, h.epoch());
        h.record(2, 1, 0, 12, h.epoch());
        assert_eq!(
            h.save(&path, &["a", "b", "c"], |e| 100 + e as u64).unwrap(),
            2
        );
        // Reordered, "b" gone, "d" new.
        let back = holders();
        let restored = back
            .restore(&path, &[("c", 1), ("d", 0), ("a", 0)], 20)
            .unwrap();
        assert_eq!(
            restored,
            Restored {
                keys: 1,
                dropped: 1
            }
        );
        assert_eq!(
            back.peer_for(1, 1, 20, ANY),
            None,
            "not before c's first poll"
        );
        assert!(!back.edge_heard_again(0, 102, false, 20), "c, same cache");
        assert!(!back.edge_heard_again(2, 100, false, 20), "a, same cache");
        assert_eq!(
            back.peer_for(1, 1, 20, ANY),
            Some(0),
            "c, the latest holder"
        );
        assert_eq!(back.peer_for(1, 0, 20, ANY), Some(2), "a");
        assert_eq!(back.peer_for(2, 1, 20, ANY), None, "b is gone");
    }

    #[test]
    fn holders_past_their_age_and_purged_ones_stay_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holders");
        let h = holders();
        h.record(1, 0, 0, 10, h.epoch());
        h.record(2, 0, 0, 90, h.epoch());
        h.record(3, 0, 0, 90, h.epoch());
        h.forget(3, 95);
        h.forget_host("purged.example", 95);
        let old = h.epoch();
        h.forget_edge(1, 96);
        h.record(4, 1, 0, 90, old);
        h.save(&path, &["a", "b"], |_| 7).unwrap();
        let back = holders();
        back.restore(&path, &[("a", 0), ("b", 0)], 150).unwrap();
        for e in 0..2 {
            assert!(!back.edge_heard_again(e, 7, false, 150));
        }
        assert_eq!(back.peer_for(1, 9, 150, ANY), None, "past max_age");
        assert_eq!(back.peer_for(2, 9, 150, ANY), Some(0));
        assert_eq!(back.peer_for(3, 9, 150, ANY), None, "purged key");
        assert_eq!(back.peer_for(4, 9, 150, ANY), None, "edge emptied after it");
        let host_floor = || back.purged.read().get("purged.example")?.in_force(150, 100);
        assert_eq!(
            back.latest(2, 9, 150, host_floor, ANY),
            None,
            "host purged after it"
        );
        // A request that began before the key's purge still does not make a holder of it.
        back.record(3, 0, 0, 151, old - 2);
        assert_eq!(back.peer_for(3, 9, 151, ANY), None);
        // New purges count on from the saved ones.
        assert!(super::super::at_or_after(back.epoch(), old));
    }

    #[test]
    fn an_edge_keeps_its_holders_only_with_the_cache_they_were_kept_with() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holders");
        let h = holders();
        for e in 0..3 {
            h.record(e as u64, e, 0, 10, h.epoch());
        }
        h.save(&path, &["a", "b", "c"], |e| [5, 6, 0][e]).unwrap();
        let back = holders();
        back.restore(&path, &[("a", 0), ("b", 0), ("c", 0), ("d", 0)], 20)
            .unwrap();
        back.record(3, 3, 0, 20, back.epoch());
        assert!(!back.edge_heard_again(0, 5, true, 21), "same cache");
        assert!(back.edge_heard_again(1, 9, false, 21), "another cache");
        assert!(back.edge_heard_again(2, 4, false, 21), "cache not known");
        assert!(
            !back.edge_heard_again(3, 4, false, 21),
            "none kept; disk tier"
        );
        assert_eq!(back.peer_for(0, 9, 22, ANY), Some(0));
        assert_eq!(back.peer_for(1, 9, 22, ANY), None);
        assert_eq!(back.peer_for(2, 9, 22, ANY), None);
        assert_eq!(back.peer_for(3, 9, 22, ANY), Some(3));
    }

    #[test]
    fn an_edge_not_polled_yet_is_written_with_the_cache_id_it_was_read_back_with() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holders");
        let h = holders();
        h.record(1, 0, 0, 10, h.epoch());
        h.save(&path, &["a"], |_| 5).unwrap();
        let back = holders();
        back.restore(&path, &[("a", 0)], 20).unwrap();
        back.save(&path, &["a"], |_| 0).unwrap();
        let again = holders();
        again.restore(&path, &[("a", 0)], 30).unwrap();
        assert!(!again.edge_heard_again(0, 5, false, 30));
        assert_eq!(again.peer_for(1, 9, 30, ANY), Some(0));
    }

    #[test]
    fn seconds_ahead_of_the_clock_are_another_clocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holders");
        let h = holders();
        h.record(1, 0, 0, 5_000, h.epoch());
        h.record(2, 0, 0, 1_050, h.epoch());
        h.save(&path, &["a"], |_| 5).unwrap();
        let back = holders();
        let restored = back.restore(&path, &[("a", 0)], 1_000).unwrap();
        assert_eq!(
            restored,
            Restored {
                keys: 1,
                dropped: 1
            }
        );
    }

    #[test]
    fn purges_count_on_from_the_latest_count_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holders");
        let h = holders();
        h.record(1, 0, 0, 10, h.epoch());
        h.forget_host("x.example", 10);
        h.save(&path, &["a"], |_| 5).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        // The header's count as a purge during the write would leave it: behind the floor.
        let header: Header = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(header.purges, 1);
        let behind = Header {
            purges: 0,
            ..header
        };
        let mut rest = bytes.split_off(rmp_serde::to_vec(&behind).unwrap().len());
        bytes = rmp_serde::to_vec(&behind).unwrap();
        bytes.append(&mut rest);
        std::fs::write(&path, bytes).unwrap();
        let back = holders();
        back.restore(&path, &[("a", 0)], 20).unwrap();
        assert_eq!(back.epoch(), 1);
    }

    #[test]
    fn no_file_restores_nothing_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holders");
        assert_eq!(
            holders().restore(&path, &[], 0).unwrap(),
            Restored::default()
        );
        std::fs::write(&path, b"not msgpack").unwrap();
        let e = holders().restore(&path, &[], 0).unwrap_err();
        assert!(e.to_string().contains("not a holders file"), "{e}");
        let h = holders();
        h.record(1, 0, 0, 10, h.epoch());
        h.save(&path, &["a"], |_| 1).unwrap();
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 3]).unwrap();
        assert!(
            holders().restore(&path, &[("a", 0)], 10).is_err(),
            "cut short"
        );
    }
}
