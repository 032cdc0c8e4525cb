//! The cluster's other edges, as the broker last pushed them (`PUT /peers` on the admin API).
//!
//! A demand miss may be filled from a peer the broker names in [`super::PEER_HINT_HEADER`].
//! The header carries only a node id, and this directory is the only place the id becomes an
//! address, so a client that forges the header can at most make the edge ask a real member of
//! the cluster (whose certificate the QUIC link checks) — never an address of its choosing.

use std::collections::HashMap;
use std::net::SocketAddr;

use parking_lot::RwLock;

use super::protocol::PeerRef;

/// Most peers a push may list; a fleet is far smaller, a larger push is a mistake.
pub const MAX_PEERS: usize = 4096;

/// Why a push of peers was refused (nothing changes then).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerListError {
    /// Too many rows.
    #[error("at most {MAX_PEERS} peers may be pushed, got {0}")]
    TooMany(usize),
    /// A row's id cannot be a node id.
    #[error("peers[{0}].id: must be {rule}", rule = crate::config::NODE_ID_RULE)]
    BadId(usize),
    /// Two rows share an id.
    #[error("peers[{0}].id: duplicate id {1:?}")]
    Duplicate(usize, String),
}

/// Node ids the edge may fill from, and their QUIC addresses.
pub struct PeerDirectory {
    self_id: String,
    peers: RwLock<HashMap<String, SocketAddr>>,
}

impl PeerDirectory {
    /// An empty directory for the edge `self_id` (which is never its own peer).
    pub fn new(self_id: &str) -> Self {
        PeerDirectory {
            self_id: self_id.to_string(),
            peers: RwLock::new(HashMap::new()),
        }
    }

    /// Replace the whole directory; a bad row rejects the push. Returns how many peers it
    /// now holds (this edge's own row is dropped).
    pub fn replace(&self, rows: Vec<PeerRef>) -> Result<usize, PeerListError> {
        if rows.len() > MAX_PEERS {
            return Err(PeerListError::TooMany(rows.len()));
        }
        let mut next = HashMap::with_capacity(rows.len());
        for (i, p) in rows.into_iter().enumerate() {
            if !crate::config::valid_node_id(&p.id) {
                return Err(PeerListError::BadId(i));
            }
            if p.id == self.self_id {
                continue;
            }
            if next.insert(p.id.clone(), p.addr).is_some() {
                return Err(PeerListError::Duplicate(i, p.id));
            }
        }
        let n = next.len();
        *self.peers.write() = next;
        Ok(n)
    }

    /// The peer named `id`, if the broker listed it.
    pub fn resolve(&self, id: &str) -> Option<PeerRef> {
        self.peers.read().get(id).map(|addr| PeerRef {
            id: id.to_string(),
            addr: *addr,
        })
    }

    /// Every listed peer, by id.
    pub fn list(&self) -> Vec<PeerRef> {
        let mut v: Vec<PeerRef> = self
            .peers
            .read()
            .iter()
            .map(|(id, addr)| PeerRef {
                id: id.clone(),
                addr: *addr,
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, port: u16) -> PeerRef {
        PeerRef {
            id: id.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    #[test]
    fn resolves_listed_peers_only_and_never_itself() {
        let d = PeerDirectory::new("eu-1");
        assert_eq!(d.resolve("us-1"), None);
        let n = d.replace(vec![peer("eu-1", 1), peer("us-1", 2)]).unwrap();
        assert_eq!(n, 1);
        assert_eq!(d.resolve("us-1"), Some(peer("us-1", 2)));
        assert_eq!(d.resolve("eu-1"), None);
        assert_eq!(d.list(), vec![peer("us-1", 2)]);
    }

    #[test]
    fn a_bad_push_changes_nothing() {
        let d = PeerDirectory::new("eu-1");
        d.replace(vec![peer("us-1", 2)]).unwrap();
        assert_eq!(
            d.replace(vec![peer("us-2", 3), peer("bad id", 4)]),
            Err(PeerListError::BadId(1))
        );
        assert_eq!(
            d.replace(vec![peer("us-2", 3), peer("us-2", 4)]),
            Err(PeerListError::Duplicate(1, "us-2".into()))
        );
        assert_eq!(d.list(), vec![peer("us-1", 2)]);
        d.replace(Vec::new()).unwrap();
        assert_eq!(d.resolve("us-1"), None);
    }
}
