//! Shadowing on the edge: marks with TTLs ([`table`]) and the fill worker ([`fill`]).

mod fill;
mod table;

pub use fill::{FillRequest, Filler, ShadowService};
pub use table::{Expired, Mark, ShadowTable};

/// Header on the edge's own shadow-fill requests, so they are not counted as user hits.
pub const FILL_HEADER: &str = "x-shadowcdn-shadow-fill";
