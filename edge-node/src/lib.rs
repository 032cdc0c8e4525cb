//! shadowcdn edge node: a Pingora HTTP cache over a foyer hybrid memory + disk store.
//!
//! An edge stands alone: give it a [`config::EdgeConfig`] naming its listeners, cache sizes and
//! origin table, and [`server::EdgeNode`] serves cached content with RFC 9111 semantics from
//! pingora-cache. [`storage::FoyerStorage`] is the pingora-cache `Storage` on foyer;
//! [`proxy::EdgeProxy`] holds the request phases; [`admin`] is the operator API.

pub mod accept_encoding;
pub mod access_log;
pub mod admin;
pub mod cache_key;
pub mod compression;
pub mod config;
pub mod drain;
pub mod durable;
pub mod http_service;
pub mod internal_http;
pub mod invalidate;
pub mod json_errors;
pub mod last_push;
pub mod lifetime;
pub mod metrics;
pub mod origin;
pub mod ownership;
pub mod per_key;
pub mod proxy;
pub mod range;
pub mod response_fields;
pub mod server;
pub mod shadow;
pub mod stop_signals;
pub mod storage;
pub mod sync;
pub mod tags;

pub use config::EdgeConfig;
pub use server::{EdgeNode, StartError};
