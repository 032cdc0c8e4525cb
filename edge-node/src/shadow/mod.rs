//! Shadowing on the edge: marks with TTLs ([`table`]) and the fill worker ([`fill`]).

mod fill;
mod pace;
mod table;

pub(crate) use fill::split_key;
pub use fill::{FillError, FillRequest, Filler, InvalidShadow, ShadowService};
pub use pace::FillPacer;
pub use table::{Expired, FillSource, Mark, ShadowTable};

use std::collections::VecDeque;

use crate::storage::FoyerStorage;
use crate::sync::protocol::ShadowOutcome;

/// Outcomes of ended shadows waiting for the broker's next stats poll. Bounded: when the
/// broker does not poll, the oldest are dropped (and counted) rather than growing forever.
#[derive(Default)]
pub struct OutcomeLog {
    inner: parking_lot::Mutex<(VecDeque<ShadowOutcome>, u64)>,
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

    /// Take every recorded outcome.
    pub fn drain(&self) -> Vec<ShadowOutcome> {
        self.inner.lock().0.drain(..).collect()
    }

    /// Outcomes dropped because nobody polled.
    pub fn dropped(&self) -> u64 {
        self.inner.lock().1
    }
}

/// Header (value: the per-process internal secret) on the edge's own shadow-fill requests,
/// so they are not counted as user hits and may name a peer to fill from.
pub const FILL_HEADER: &str = "x-shadowcdn-shadow-fill";
/// Header on a shadow fill (honoured only with [`FILL_HEADER`]) that revalidates a held copy
/// with the origin before it is re-marked.
pub const REFRESH_HEADER: &str = "x-shadowcdn-refresh";

/// Drop the shadow mark of `key`; an object that never served a request goes with it (it
/// was only there as a prediction), one that did stays as a normal cache entry.
pub fn unshadow(table: &ShadowTable, storage: &FoyerStorage, key: &str) -> Option<Mark> {
    let m = table.remove(key)?;
    if m.hits == 0 {
        storage.purge_key(key);
    }
    Some(m)
}
