//! QUIC between nodes: the broker's control channel to each edge and the edge ↔ edge data
//! channel for peer fills, both over mutual TLS with certificates from the cluster CA.
//!
//! - [`protocol`] — the typed, versioned messages and their framing (the edge's wire API).
//! - [`tls`] / [`pki`] — node identities, and the CA, certificates and revocation list of a
//!   cluster.
//! - [`trust`] — the CA and its revocation list as both sides of a connection enforce them.
//! - [`link`] — the client side: reconnecting connection, backpressure, retries.
//! - [`server`] — the edge's QUIC listener: acts on control messages, serves peer fetches.
//! - [`bridge`] — a loopback HTTP upstream through which the proxy fills from a peer edge,
//!   so a peer fill goes through the ordinary cache path (locking, freshness, size limits).
//! - [`peers`] — the other edges the broker listed: the only peers a demand miss may use.

pub mod bridge;
mod connections;
mod handshakes;
pub mod link;
pub mod peers;
pub mod pki;
pub mod protocol;
pub mod server;
pub mod tls;
pub mod trust;

pub use bridge::{PeerBridge, PeerPool};
pub use handshakes::KNOWN_ADDRESSES_FILE;
pub use link::{client_endpoint, close_endpoint, ClientEndpoint, Link, LinkError, Rest};
pub use peers::PeerDirectory;
pub use server::{SyncParts, SyncService};
pub use tls::{NodeIdentity, TlsError, TlsPaths};
pub use trust::{Checked, Trust};

/// Header (value: the per-process internal secret) that asks the proxy for a cached copy
/// only: a miss answers 504 instead of going to the origin. Peer fetches use it, so a peer
/// fill never turns into an origin fetch on the peer.
pub const PEER_FETCH_HEADER: &str = "x-shadowcdn-peer-fetch";
/// Header on a peer fetch's answer: when the serving edge admitted its copy (unix ms). The
/// edge taking the copy judges it against the purges it has applied, which the peer may not
/// have yet; it never reaches clients or the cache.
pub const PEER_ADMITTED_HEADER: &str = "x-shadowcdn-admitted";
/// Header `id@addr` on the edge's own shadow fills: fill from that peer edge.
pub const PEER_VIA_HEADER: &str = "x-shadowcdn-peer";
/// Header (value: a node id from the [`PeerDirectory`]) the broker puts on a request when
/// another edge recently served the same key: on a miss, ask that edge before the origin.
pub const PEER_HINT_HEADER: &str = "x-shadowcdn-peer-hint";

/// Why the QUIC side could not start.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Certificates or keys are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot bind QUIC socket {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Parse a [`PEER_VIA_HEADER`] value.
pub fn parse_peer_via(v: &str) -> Option<protocol::PeerRef> {
    let (id, addr) = v.split_once('@')?;
    (!id.is_empty()).then_some(())?;
    Some(protocol::PeerRef {
        id: id.to_string(),
        addr: addr.parse().ok()?,
    })
}

/// Format a [`PEER_VIA_HEADER`] value.
pub fn format_peer_via(p: &protocol::PeerRef) -> String {
    format!("{}@{}", p.id, p.addr)
}

/// Response headers that describe one hop, not the object, and are not relayed.
pub(crate) fn is_hop_header(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-connection"
            | "x-cache"
            | "cache-status"
    ) || (name.starts_with("x-shadowcdn-") && name != PEER_ADMITTED_HEADER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_via_round_trips_and_rejects_garbage() {
        let p = parse_peer_via("eu-1@127.0.0.1:7000").unwrap();
        assert_eq!(p.id, "eu-1");
        assert_eq!(parse_peer_via(&format_peer_via(&p)), Some(p));
        assert_eq!(parse_peer_via("@127.0.0.1:1"), None);
        assert_eq!(parse_peer_via("eu-1@nowhere"), None);
        assert_eq!(parse_peer_via("eu-1"), None);
    }
}
