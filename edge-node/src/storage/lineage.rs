//! Which cache content an edge process starts with: an id kept inside the disk tier's
//! directory, new whenever the cache starts empty (memory only, a disk tier created afresh or
//! laid out anew), so the broker can tell an edge that restarted with its copies from one
//! that lost them ([`crate::sync::protocol::StatsReport::cache_id`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::durable;

/// In the disk tier's directory (foyer's, which never lists it): its content's id.
pub const FILE: &str = "cache-id.json";

/// The id and the layout it was taken under: foyer keeps no manifest, and a smaller capacity
/// or another block size drops or truncates its block files as it recovers.
#[derive(Debug, Serialize, Deserialize)]
struct Lineage {
    id: u64,
    disk_bytes: u64,
    block_size: u64,
}

/// The id of the content the cache starts with, to be taken before foyer opens `disk_dir`
/// (its disk tier's directory; `None`: memory only). The id kept there stands while the
/// layout keeps what it describes (the same block size, no less capacity); otherwise, or
/// with no readable id, the content is new: a new id, written there first, so a start that
/// fails after it still leaves the new one. Never 0 ("not told").
pub fn content_id(disk_dir: Option<&Path>, disk_bytes: u64, block_size: u64) -> u64 {
    let fresh = || rand::random::<u64>().max(1);
    let Some(dir) = disk_dir else {
        return fresh();
    };
    let path = dir.join(FILE);
    let id = match durable::read_json::<Lineage>(&path) {
        Ok(Some(l)) if l.id != 0 && l.block_size == block_size && l.disk_bytes <= disk_bytes => {
            if l.disk_bytes == disk_bytes {
                return l.id;
            }
            // Grown: what it holds stays, and a later shrink is judged against the new size.
            l.id
        }
        Ok(_) => fresh(),
        Err(e) => {
            tracing::warn!(error = %e, "the cache's id is unreadable: a new one is taken");
            fresh()
        }
    };
    let kept = Lineage {
        id,
        disk_bytes,
        block_size,
    };
    let written = std::fs::create_dir_all(dir).and_then(|()| durable::write_json(&path, &kept));
    if let Err(e) = written {
        // An older id left in place would name this content at the next start: it goes, so
        // that start takes a new one (its copies then count as lost, which costs the broker
        // its peer hints to them, not correctness).
        let _ = std::fs::remove_file(&path);
        tracing::warn!(error = %e, path = %path.display(), "the cache's id could not be kept");
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovered_disk_tier_keeps_its_id_and_a_new_one_gets_a_new_id() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("foyer");
        let id = |disk, block| content_id(Some(&dir), disk, block);
        let first = id(1 << 30, 1 << 20);
        assert_ne!(first, 0);
        assert_eq!(id(1 << 30, 1 << 20), first, "recovered");
        // More capacity keeps every block; the id stands, and is kept for the new layout.
        assert_eq!(id(2 << 30, 1 << 20), first);
        // Less capacity, or another block size, drops or truncates blocks: new content.
        let shrunk = id(1 << 30, 1 << 20);
        assert_ne!(shrunk, first);
        let reblocked = id(1 << 30, 2 << 20);
        assert_ne!(reblocked, shrunk);
        assert_eq!(id(1 << 30, 2 << 20), reblocked);
        // The directory went (a wiped disk): new content.
        std::fs::remove_dir_all(&dir).unwrap();
        let wiped = id(1 << 30, 2 << 20);
        assert_ne!(wiped, reblocked);
        // A damaged id file: a new id.
        std::fs::write(dir.join(FILE), "not an id").unwrap();
        let fresh = id(1 << 30, 2 << 20);
        assert_ne!(fresh, wiped);
        assert_eq!(id(1 << 30, 2 << 20), fresh);
        // Memory only: new at every start.
        assert_ne!(content_id(None, 0, 0), content_id(None, 0, 0));
    }
}
