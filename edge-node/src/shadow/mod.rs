//! Shadowing on the edge: marks with TTLs ([`table`]) and the fill worker ([`fill`]).

mod fill;
mod pace;
mod table;

pub(crate) use fill::split_key;
pub use fill::{FillError, FillRequest, Filler, InvalidShadow, ShadowService};
pub use pace::FillPacer;
pub use table::{Ending, Expired, FillSource, FillTags, FillUnderWay, Mark, Order, ShadowTable};

use std::collections::VecDeque;

use crate::storage::{FoyerStorage, NotDurable};
use crate::sync::protocol::ShadowOutcome;

/// Outcomes of ended shadows waiting for the broker's next stats poll. Bounded: when the
/// broker does not poll, the oldest are dropped (and counted) rather than growing forever.
///
/// A broker that acknowledges gets them in numbered batches ([`Self::batch`]): a batch stays
/// here until the broker says it has it, so a reply lost on the way (a timed-out poll) is
/// sent again rather than its outcomes lost.
#[derive(Default)]
pub struct OutcomeLog {
    inner: parking_lot::Mutex<(VecDeque<ShadowOutcome>, u64)>,
    /// The batch sent and not yet acknowledged, with its number.
    sent: parking_lot::Mutex<Option<(u64, Vec<ShadowOutcome>)>>,
}

impl OutcomeLog {
    /// Most outcomes kept between polls.
    pub const CAPACITY: usize = 20_000;

    /// Record one ended shadow.
    pub fn push(&self, o: ShadowOutcome) {
        let mut g = self.inner.lock();
        if g.0.len() >= Self::CAPACITY {
            g.0.pop_front();
            g.1 += 1;
        }
        g.0.push_back(o);
    }

    /// Take the oldest outcomes whose encoding fits about `budget` bytes (at least one); the
    /// rest wait for the next poll. A reply must fit one frame, and after a long gap between
    /// polls the log holds far more than that.
    pub fn drain_within(&self, budget: usize) -> Vec<ShadowOutcome> {
        let mut g = self.inner.lock();
        let mut used = 0;
        let n =
            g.0.iter()
                .take_while(|o| {
                    // Escaping can double a key; the other fields take at most 256 bytes
                    // (every number at u64::MAX).
                    used += 2 * o.key.len() + 256;
                    used <= budget
                })
                .count()
                .max(1)
                .min(g.0.len());
        g.0.drain(..n).collect()
    }

    /// Outcomes dropped because nobody polled.
    pub fn dropped(&self) -> u64 {
        self.inner.lock().1
    }

    /// The batch for a stats reply and its number, for a broker that acknowledged batch
    /// `ack` (the last one it received; batches are numbered from `first_seq`, which differs
    /// per process so a restarted edge's numbers are new). The unacknowledged batch is sent
    /// again; otherwise the next outcomes within `budget` bytes form a new one. `(0, [])`
    /// when there is nothing to send. A broker that does not acknowledge (`ack` `None`) gets
    /// the outcomes drained, unnumbered, as before.
    pub fn batch(
        &self,
        ack: Option<u64>,
        first_seq: u64,
        budget: usize,
    ) -> (u64, Vec<ShadowOutcome>) {
        let Some(ack) = ack else {
            return (0, self.drain_within(budget));
        };
        let mut sent = self.sent.lock();
        match &*sent {
            Some((seq, _)) if *seq == ack => *sent = None,
            Some((seq, batch)) => return (*seq, batch.clone()),
            None => {}
        }
        if self.inner.lock().0.is_empty() {
            return (0, Vec::new());
        }
        let batch = self.drain_within(budget);
        let seq = if ack >= first_seq { ack + 1 } else { first_seq };
        *sent = Some((seq, batch.clone()));
        (seq, batch)
    }
}

/// Header (value: the per-process internal secret) on the edge's own shadow-fill requests,
/// so they are not counted as user hits and may name a peer to fill from.
pub const FILL_HEADER: &str = "x-shadowcdn-shadow-fill";
/// Header on a shadow fill (honoured only with [`FILL_HEADER`]) that revalidates a held copy
/// with the origin before it is re-marked.
pub const REFRESH_HEADER: &str = "x-shadowcdn-refresh";

/// Drop the shadow mark of `key`; an object no client asked for goes with it (it was only
/// there as a prediction), one a client asked for, or that the edge held before the order,
/// stays as a normal cache entry (as when the mark expires).
pub fn unshadow(table: &ShadowTable, storage: &FoyerStorage, key: &str) -> Option<Mark> {
    let m = table.remove(key)?;
    if m.purge_with_mark() {
        storage.purge_key(key);
    }
    Some(m)
}

/// Purge the objects of `keys` (every variant) and end their marks (reported removed);
/// whether any was there. Returns once the purge is final: the tombstones are written to the
/// disk tier (one wait for all the keys), or a key ban stands in for them when they are late,
/// and no lookup can bring the objects back — or an error when neither is durable (the purge
/// holds in memory; it must be asked again to be final).
pub async fn purge(
    storage: &FoyerStorage,
    table: &ShadowTable,
    keys: &[&str],
) -> Result<bool, NotDurable> {
    let before = storage.purge_baseline();
    let mut found = false;
    for key in keys {
        // Both, whatever the first finds.
        found |= storage.invalidate_key(key) | table.remove(key).is_some();
    }
    if found || storage.tombstones_owed() || storage.closing() {
        storage.settle_purge(keys, before).await?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch stays until the broker acknowledges it: a lost reply is sent again whole,
    /// and the next batch comes only after the acknowledgement.
    #[test]
    fn outcome_batches_wait_for_their_acknowledgement() {
        let log = OutcomeLog::default();
        let first = 1_000;
        assert_eq!(
            log.batch(Some(0), first, 1 << 20),
            (0, vec![]),
            "nothing yet"
        );
        log.push(outcome("h/a".into()));
        log.push(outcome("h/b".into()));
        let (seq, batch) = log.batch(Some(0), first, 1 << 20);
        assert_eq!((seq, batch.len()), (first, 2));
        log.push(outcome("h/c".into()));
        assert_eq!(
            log.batch(Some(0), first, 1 << 20),
            (seq, batch),
            "the reply was lost"
        );
        let (next, batch) = log.batch(Some(seq), first, 1 << 20);
        assert_eq!((next, batch.len()), (first + 1, 1));
        assert_eq!(batch[0].key, "h/c");
        assert_eq!(log.batch(Some(next), first, 1 << 20), (0, vec![]));
        // A broker that does not acknowledge drains, unnumbered.
        log.push(outcome("h/d".into()));
        assert_eq!(log.batch(None, first, 1 << 20).0, 0);
        assert_eq!(log.batch(Some(next), first, 1 << 20), (0, vec![]));
    }

    fn outcome(key: String) -> ShadowOutcome {
        ShadowOutcome {
            key,
            bytes: 1,
            hits: 0,
            held_secs: 1,
            peer_filled: false,
            evicted: false,
            failed: false,
            held_before: false,
            removed: false,
            ended_ms: 0,
            head_start_ms: None,
            order: None,
            fill_paid: false,
        }
    }

    #[test]
    fn a_backlog_drains_oldest_first_in_replies_that_fit_a_frame() {
        use crate::sync::protocol::MAX_FRAME;
        let log = OutcomeLog::default();
        for i in 0..OutcomeLog::CAPACITY {
            log.push(outcome(format!("h/{i:05}/{}", "x".repeat(100))));
        }
        let mut seen = 0;
        while seen < OutcomeLog::CAPACITY {
            let batch = log.drain_within(MAX_FRAME / 2);
            assert!(!batch.is_empty());
            assert!(
                batch[0].key.starts_with(&format!("h/{seen:05}/")),
                "oldest first"
            );
            let encoded = serde_json::to_vec(&batch).unwrap().len();
            assert!(encoded < MAX_FRAME / 2, "{encoded} bytes");
            seen += batch.len();
        }
        assert_eq!(seen, OutcomeLog::CAPACITY);
        assert!(log.drain_within(MAX_FRAME / 2).is_empty());
    }
}
