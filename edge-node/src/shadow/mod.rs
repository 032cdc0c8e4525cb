//! Shadowing on the edge: marks with TTLs ([`table`]) and the fill worker ([`fill`]).

mod fill;
mod table;

pub(crate) use fill::split_key;
pub use fill::{FillError, FillRequest, Filler, InvalidShadow, ShadowService};
pub use table::{Expired, Mark, ShadowTable};

use crate::storage::FoyerStorage;

/// Header (value: the per-process internal secret) on the edge's own shadow-fill requests,
/// so they are not counted as user hits and may name a peer to fill from.
pub const FILL_HEADER: &str = "x-shadowcdn-shadow-fill";

/// Drop the shadow mark of `key`; an object that never served a request goes with it (it
/// was only there as a prediction), one that did stays as a normal cache entry.
pub fn unshadow(table: &ShadowTable, storage: &FoyerStorage, key: &str) -> Option<Mark> {
    let m = table.remove(key)?;
    if m.hits == 0 {
        storage.purge_key(key);
    }
    Some(m)
}
