//! Content providers and what they register: origins (host → upstream) and resources (path
//! or prefix with priority, shadow TTL and shadow policy), durable in redb, served over the
//! provider API.

pub mod api;
pub mod limits;
pub mod model;
mod store;

pub use store::{hash_token, Claim, Registry, RegistryError};
