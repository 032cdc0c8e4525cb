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
//! the first page, or the file is not the length foyer will give it: `disk_capacity` changed)
//! into a layout that reading mistakes nothing in: the newest tombstone in the first slot, so
//! foyer resumes at the second, and the others, as many as the ring holds, at its end, oldest
//! first, so that they are overwritten, oldest first, only when the ring comes round, as
//! foyer's own log would. The new file is written sparse (only those slots) and replaces the
//! old one atomically. The layout is foyer 0.22.6's (the workspace pins that version).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The log's file in foyer's directory: its first partition, which its block engine creates
/// for the log before any block.
pub(super) const FILE: &str = "foyer-storage-direct-fs-00000000";

/// Bytes of one tombstone: its key hash and sequence, big-endian.
const SLOT: usize = 16;
/// foyer's page.
const PAGE: usize = 4096;
/// Slots of a page.
const SLOTS_PER_PAGE: usize = PAGE / SLOT;
/// Bytes read at a time.
const CHUNK: usize = 256 * PAGE;

/// One tombstone as foyer stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tombstone {
    hash: u64,
    sequence: u64,
}

/// The length foyer gives its tombstone log for a disk tier of `disk_bytes`: a slot per page
/// of capacity, in whole pages.
fn log_len(disk_bytes: usize) -> usize {
    let entries = (disk_bytes - disk_bytes % PAGE) / PAGE;
    entries.div_ceil(SLOTS_PER_PAGE) * PAGE
}

/// Lay out the log at `path` (absent: nothing to do) for a disk tier of `disk_bytes`, so that
/// foyer's recovery resumes it after its newest tombstone; the tombstones it holds, when it
/// was rewritten.
pub fn normalize(path: &Path, disk_bytes: usize) -> io::Result<Option<usize>> {
    // A rewrite a crash cut short left its temporary; the log itself is whole.
    match std::fs::remove_file(temporary(path)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
    let held = read_held(&file, len)?;
    let expected = log_len(disk_bytes);
    let Some(laid) = layout(held, len, expected / SLOT) else {
        return Ok(None);
    };
    let n = laid.len();
    write_sparse(path, expected, &laid)?;
    Ok(Some(n))
}

/// The non-empty slots of the log, with their slot numbers; read a chunk at a time.
fn read_held(file: &File, len: usize) -> io::Result<Vec<(usize, Tombstone)>> {
    let mut held = Vec::new();
    let mut buf = vec![0u8; CHUNK.min(len)];
    let mut at = 0;
    while at + SLOT <= len {
        let n = (len - at).min(CHUNK) / SLOT * SLOT;
        file.read_exact_at(&mut buf[..n], at as u64)?;
        for (i, s) in buf[..n].chunks_exact(SLOT).enumerate() {
            let t = Tombstone {
                hash: u64::from_be_bytes(s[..8].try_into().expect("a slot")),
                sequence: u64::from_be_bytes(s[8..].try_into().expect("a slot")),
            };
            if t.sequence != 0 {
                held.push((at / SLOT + i, t));
            }
        }
        at += n;
    }
    Ok(held)
}

/// Where each tombstone goes in a ring of `slots`, or `None` when foyer resumes the log of
/// `len` bytes rightly as it is: its newest tombstone is on the first page (or it has none)
/// and it is the length foyer will give it.
fn layout(
    mut held: Vec<(usize, Tombstone)>,
    len: usize,
    slots: usize,
) -> Option<Vec<(usize, Tombstone)>> {
    if slots == 0 {
        return None;
    }
    let newest_at = held
        .iter()
        .max_by_key(|(_, t)| t.sequence)
        .map(|(at, _)| *at)?;
    if newest_at < SLOTS_PER_PAGE && len == slots * SLOT {
        return None;
    }
    held.sort_by_key(|(_, t)| t.sequence);
    let (_, newest) = held.pop().expect("the newest is held");
    // As many of the others as the ring holds beside the newest, the newest of them.
    let rest = &held[held.len().saturating_sub(slots.saturating_sub(1))..];
    let first = slots - rest.len();
    let mut laid = vec![(0, newest)];
    laid.extend(rest.iter().enumerate().map(|(i, (_, t))| (first + i, *t)));
    Some(laid)
}

/// Replace the log at `path` with one of `len` bytes holding `laid` (slots in ascending order,
/// the first alone, the rest contiguous), written sparse: a temporary beside it, synced,
/// renamed over it, the directory synced.
fn write_sparse(path: &Path, len: usize, laid: &[(usize, Tombstone)]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temporary(path);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.set_len(len as u64)?;
    let bytes = |ts: &[(usize, Tombstone)]| -> Vec<u8> {
        ts.iter()
            .flat_map(|(_, t)| {
                t.hash
                    .to_be_bytes()
                    .into_iter()
                    .chain(t.sequence.to_be_bytes())
            })
            .collect()
    };
    let (head, tail) = laid.split_at(1);
    f.write_all_at(&bytes(head), 0)?;
    if let Some((first, _)) = tail.first() {
        f.write_all_at(&bytes(tail), (first * SLOT) as u64)?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// The temporary a rewrite of the log at `path` writes first.
fn temporary(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.relayout.tmp"))
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
            .map(|(i, s)| {
                let h = u64::from_be_bytes(s[..8].try_into().unwrap());
                (i, h, u64::from_be_bytes(s[8..].try_into().unwrap()))
            })
            .filter(|(_, _, seq)| *seq != 0)
            .collect()
    }

    /// Normalize `before` in a file for a disk of `disk_bytes`: what it holds after, and
    /// whether it was rewritten.
    fn normalized(before: &[u8], disk_bytes: usize) -> (Vec<u8>, Option<usize>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        std::fs::write(&path, before).unwrap();
        let n = normalize(&path, disk_bytes).unwrap();
        (std::fs::read(&path).unwrap(), n)
    }

    /// A page of log for each 1 MiB of disk (256 pages of 4 KiB, a slot each).
    const MIB_PER_PAGE: usize = SLOTS_PER_PAGE * PAGE;

    #[test]
    fn foyer_s_log_length_is_a_slot_per_page_of_disk_in_whole_pages() {
        assert_eq!(log_len(4 * MIB_PER_PAGE), 4 * PAGE);
        assert_eq!(log_len(4 * MIB_PER_PAGE + 5000), 5 * PAGE);
        assert_eq!(
            log_len(4 * MIB_PER_PAGE + 100),
            4 * PAGE,
            "aligned down first"
        );
    }

    #[test]
    fn a_log_whose_newest_tombstone_is_on_the_first_page_is_left_alone() {
        let disk = 4 * MIB_PER_PAGE;
        assert_eq!(normalized(&log(4, &[]), disk).1, None);
        let kept = log(4, &[(0, 7, 1), (255, 8, 2), (300, 9, 1)]);
        assert_eq!(normalized(&kept, disk), (kept.clone(), None));
    }

    /// The newest goes first, so foyer resumes at the second slot; the others go to the end
    /// of the ring, oldest first, none lost; a second pass changes nothing.
    #[test]
    fn past_the_first_page_the_newest_goes_first_and_the_rest_to_the_ring_s_end() {
        let slots = 4 * SLOTS_PER_PAGE;
        let before = log(4, &[(3, 30, 3), (256, 10, 1), (300, 50, 5), (600, 40, 4)]);
        let (after, n) = normalized(&before, 4 * MIB_PER_PAGE);
        assert_eq!((after.len(), n), (before.len(), Some(4)));
        let want = [
            (0, 50, 5),
            (slots - 3, 10, 1),
            (slots - 2, 30, 3),
            (slots - 1, 40, 4),
        ];
        assert_eq!(read(&after), want);
        assert_eq!(normalized(&after, 4 * MIB_PER_PAGE), (after.clone(), None));
    }

    /// A smaller disk: foyer would cut the file to its new length, so the tombstones go to
    /// the end of the new ring (the newest of them, as many as it holds); a larger one: the end
    /// of the larger ring.
    #[test]
    fn a_resized_disk_gets_a_log_of_its_own_length_with_the_newest_tombstones() {
        let mut at: Vec<(usize, u64, u64)> =
            (0..600).map(|i| (i + 1, i as u64, i as u64 + 1)).collect();
        at.push((700, 999, 1000));
        let before = log(4, &at);
        let (smaller, n) = normalized(&before, 2 * MIB_PER_PAGE);
        let slots = 2 * SLOTS_PER_PAGE;
        assert_eq!((smaller.len(), n), (2 * PAGE, Some(slots)));
        let got = read(&smaller);
        assert_eq!(got[0], (0, 999, 1000));
        assert_eq!(
            got[1],
            (1, 89, 90),
            "the oldest kept: the newest 511 of the rest"
        );
        assert_eq!(got[slots - 1], (slots - 1, 599, 600));
        let (larger, n) = normalized(&log(1, &[(1, 5, 1)]), 2 * MIB_PER_PAGE);
        assert_eq!((larger.len(), n), (2 * PAGE, Some(1)));
        assert_eq!(read(&larger), vec![(0, 5, 1)]);
    }

    /// A log longer than a read (here 300 pages, the newest in the second chunk, a partial
    /// slot at the end) is read whole; no file, or a stale temporary, is no trouble.
    #[test]
    fn a_long_log_is_read_across_chunks_and_a_missing_one_is_left_alone() {
        let mut before = log(300, &[(5, 1, 1), (260 * SLOTS_PER_PAGE + 3, 2, 2)]);
        before.extend_from_slice(&[0u8; 7]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert_eq!(
            normalize(&path, 300 * MIB_PER_PAGE).unwrap(),
            None,
            "no file"
        );
        std::fs::write(temporary(&path), vec![1u8; 400 * PAGE]).unwrap();
        std::fs::write(&path, &before).unwrap();
        assert_eq!(normalize(&path, 300 * MIB_PER_PAGE).unwrap(), Some(2));
        let after = std::fs::read(&path).unwrap();
        let slots = 300 * SLOTS_PER_PAGE;
        assert_eq!(read(&after), vec![(0, 2, 2), (slots - 1, 1, 1)]);
        assert!(!temporary(&path).exists());
    }
}
