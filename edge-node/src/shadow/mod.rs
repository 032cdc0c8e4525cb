//! Shadowing on the edge: marks with TTLs ([`table`]) and the fill worker ([`fill`]).

mod fill;
mod outcomes;
mod pace;
mod table;

pub(crate) use fill::split_key;
pub use fill::{FillError, FillRequest, Filler, InvalidShadow, ShadowService, MAX_KEY_BYTES};
pub use outcomes::{
    crashed_processes, save_at_stop, OutcomeLog, RunningMark, SavedOutcomes, LOST_KEPT,
    OUTCOMES_FILE, RUNNING_FILE,
};
pub use pace::FillPacer;
pub use table::{Ending, Expired, FillSource, FillTags, FillUnderWay, Mark, Order, ShadowTable};

use crate::storage::{FoyerStorage, NotDurable};

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
