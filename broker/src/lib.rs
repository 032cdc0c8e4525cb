//! shadowcdn broker: the front door. Routes each user request to the best edge (client
//! region, weighted rendezvous hashing, health, standby promotion, neighbour spill-over,
//! origin as last resort), hosts the provider API, and records every request for demand
//! prediction.
//!
//! Entry type: [`server::Broker`]. Modules: [`routing`], [`proxy`], [`registry`],
//! [`monitor`], [`planner`], [`control`] (QUIC to the edges), [`cost`] (shadow ledger and threshold tuner), [`signals`] (co-access, anomalies), [`sync`] (orders to edges over
//! QUIC or their admin API), [`redelivery`] (purges an edge missed), [`config`], [`metrics`].

mod bounded;
pub mod clock;
pub mod config;
pub mod control;
pub mod cost;
pub mod edge_certs;
pub mod kept_holders;
pub mod metrics;
pub mod monitor;
mod origin_addrs;
pub mod origin_gaps;
pub mod planner;
pub mod proxy;
pub mod redelivery;
pub mod registry;
pub mod routing;
pub mod server;
pub mod signals;
pub mod sync;
pub mod taken_tables;
pub mod tls;

pub use config::BrokerConfig;
pub use server::Broker;
