//! foyer's tombstone log, laid out at each start so that foyer resumes it where it should.
//!
//! foyer 0.22.6 keeps the disk tier's tombstones (what makes a purge outlast a restart:
//! recovery drops every entry older than a tombstone of its hash) in a ring of 16-byte slots,
//! 256 to a 4 KiB page, in its first partition file. Reopening it, foyer takes the newest
//! tombstone's offset *within its page* for its offset within the log, so once the newest
//! lies past the first page, the tombstones written after the restart go to the first page,
//! over older ones still needed: their objects' entries, still in their blocks, come back at
//! the restart after that (`purges_hold_across_two_restarts_past_a_page_of_tombstones`).
//!
//! Before foyer opens the log, [`normalize`] rewrites it (when the newest tombstone is past
//! the first page) into a layout that reading mistakes nothing in: the newest tombstone in the
//! first slot, so foyer resumes at the second, and every other one at the end of the ring,
//! oldest first, so that they are overwritten, oldest first, only when the ring comes round,
//! as foyer's own log would. The new file replaces the old one atomically. The layout is
//! foyer 0.22.6's (the workspace pins that version); a file that is not a whole number of
//! pages is left alone.

use std::io;
use std::path::Path;

/// The log's file in foyer's directory: its first partition, which its block engine creates
/// for the log before any block.
pub(super) const FILE: &str = "foyer-storage-direct-fs-00000000";

/// Bytes of one tombstone: its key hash and sequence, big-endian.
const SLOT: usize = 16;
/// foyer's page.
const PAGE: usize = 4096;

/// One tombstone as foyer stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tombstone {
    hash: u64,
    sequence: u64,
}

/// Rewrite the log at `path` (absent: nothing to do) so that foyer's recovery resumes it
/// after its newest tombstone; the tombstones it holds, when it was rewritten.
pub fn normalize(path: &Path) -> io::Result<Option<usize>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(laid_out) = relaid(&bytes) else {
        return Ok(None);
    };
    let held = laid_out
        .chunks_exact(SLOT)
        .filter(|s| sequence(s) != 0)
        .count();
    crate::durable::write_atomic(path, &laid_out)?;
    Ok(Some(held))
}

fn sequence(slot: &[u8]) -> u64 {
    u64::from_be_bytes(slot[8..16].try_into().expect("a slot"))
}

/// The log `bytes` laid out anew, or `None` when foyer resumes it rightly as it is (its
/// newest tombstone is on the first page, or it has none) or it is not a log of whole pages.
fn relaid(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(PAGE) {
        return None;
    }
    let mut held: Vec<(usize, Tombstone)> = bytes
        .chunks_exact(SLOT)
        .enumerate()
        .map(|(i, s)| {
            let hash = u64::from_be_bytes(s[..8].try_into().expect("a slot"));
            (
                i,
                Tombstone {
                    hash,
                    sequence: sequence(s),
                },
            )
        })
        .filter(|(_, t)| t.sequence != 0)
        .collect();
    let &(newest_at, _) = held.iter().max_by_key(|(_, t)| t.sequence)?;
    if newest_at < PAGE / SLOT {
        return None;
    }
    held.sort_by_key(|(_, t)| t.sequence);
    let (_, newest) = held.pop().expect("the newest is held");
    let slots = bytes.len() / SLOT;
    let mut out = vec![0u8; bytes.len()];
    let mut put = |slot: usize, t: &Tombstone| {
        let at = slot * SLOT;
        out[at..at + 8].copy_from_slice(&t.hash.to_be_bytes());
        out[at + 8..at + SLOT].copy_from_slice(&t.sequence.to_be_bytes());
    };
    put(0, &newest);
    let first = slots - held.len();
    for (i, (_, t)) in held.iter().enumerate() {
        put(first + i, t);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(pages: usize, at: &[(usize, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; pages * PAGE];
        for &(slot, hash, sequence) in at {
            b[slot * SLOT..slot * SLOT + 8].copy_from_slice(&hash.to_be_bytes());
            b[slot * SLOT + 8..(slot + 1) * SLOT].copy_from_slice(&sequence.to_be_bytes());
        }
        b
    }

    fn read(b: &[u8]) -> Vec<(usize, u64, u64)> {
        b.chunks_exact(SLOT)
            .enumerate()
            .filter(|(_, s)| sequence(s) != 0)
            .map(|(i, s)| {
                (
                    i,
                    u64::from_be_bytes(s[..8].try_into().unwrap()),
                    sequence(s),
                )
            })
            .collect()
    }

    #[test]
    fn a_log_whose_newest_tombstone_is_on_the_first_page_is_left_alone() {
        assert_eq!(relaid(&log(4, &[])), None);
        assert_eq!(
            relaid(&log(4, &[(0, 7, 1), (255, 8, 2), (300, 9, 1)])),
            None
        );
        assert_eq!(relaid(&[0u8; 100]), None, "not whole pages");
    }

    /// The newest goes first, so foyer resumes at the second slot; the others go to the end
    /// of the ring, oldest first, none lost.
    #[test]
    fn past_the_first_page_the_newest_goes_first_and_the_rest_to_the_ring_s_end() {
        let slots = 4 * PAGE / SLOT;
        let before = log(4, &[(3, 30, 3), (256, 10, 1), (300, 50, 5), (600, 40, 4)]);
        let after = relaid(&before).unwrap();
        assert_eq!(after.len(), before.len());
        assert_eq!(
            read(&after),
            vec![
                (0, 50, 5),
                (slots - 3, 10, 1),
                (slots - 2, 30, 3),
                (slots - 1, 40, 4)
            ]
        );
        assert_eq!(relaid(&after), None, "stable");
    }

    #[test]
    fn normalize_replaces_the_file_and_reports_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        assert_eq!(normalize(&path).unwrap(), None, "no file");
        std::fs::write(&path, log(2, &[(1, 1, 1), (257, 2, 2)])).unwrap();
        assert_eq!(normalize(&path).unwrap(), Some(2));
        assert_eq!(read(&std::fs::read(&path).unwrap())[0], (0, 2, 2));
        assert_eq!(normalize(&path).unwrap(), None);
    }
}
