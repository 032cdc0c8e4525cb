//! Bounds on open QUIC connections per peer. A handshake proves the peer holds a cluster
//! certificate; it does not stop one peer (a bug, or a compromised node until it is revoked)
//! from opening connections without end, each holding buffers and stream state here. The
//! broker and each peer edge use one connection at a time, a few more around a restart until
//! the old ones time out; a peer is known by the name its certificate is issued for, so a
//! renewed certificate counts with the old one.

use rustls::pki_types::CertificateDer;

use crate::per_key::{PerKey, Slot};

/// Open connections from one peer.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;

/// The open connections of one endpoint, by peer.
#[derive(Clone, Default)]
pub struct PeerConnections(PerKey<String>);

/// One open connection's place, given back when dropped.
pub type Held = Slot<String>;

impl PeerConnections {
    /// A place for one more connection from `peer`, unless it has [`MAX_CONNECTIONS_PER_PEER`].
    pub fn admit(&self, peer: &str) -> Option<Held> {
        self.0.admit(peer.to_string(), MAX_CONNECTIONS_PER_PEER)
    }

    /// Connections open from `peer`.
    #[cfg(test)]
    fn open(&self, peer: &str) -> usize {
        self.0.open(&peer.to_string())
    }
}

/// Who the authenticated peer of `conn` is: the first DNS name its certificate is issued for
/// (`broker.shadowcdn`, `<id>.edge.shadowcdn`), else its subject.
pub fn peer_name(conn: &quinn::Connection) -> String {
    super::trust::peer_leaf(conn)
        .map(|leaf| name_of(&leaf))
        .unwrap_or_default()
}

fn name_of(cert: &CertificateDer<'_>) -> String {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(cert) else {
        return String::new();
    };
    let dns = c.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
    });
    dns.unwrap_or_else(|| c.subject().to_string())
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::sync::pki::{create_ca, issue, NodeRole};

    #[test]
    fn a_peer_holds_a_bounded_number_of_connections() {
        let conns = PeerConnections::default();
        let held: Vec<Held> = (0..MAX_CONNECTIONS_PER_PEER)
            .map(|_| conns.admit("e1.edge.shadowcdn").unwrap())
            .collect();
        assert!(conns.admit("e1.edge.shadowcdn").is_none());
        assert!(
            conns.admit("broker.shadowcdn").is_some(),
            "others are not affected"
        );
        drop(held);
        assert_eq!(conns.open("e1.edge.shadowcdn"), 0);
        assert!(conns.admit("e1.edge.shadowcdn").is_some());
    }

    #[test]
    fn a_peer_is_named_by_its_certificates_dns_name() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        for (name, role, want) in [
            ("e1", NodeRole::Edge, "e1.edge.shadowcdn"),
            ("b", NodeRole::Broker, "broker.shadowcdn"),
        ] {
            let p = issue(dir.path(), name, role, dir.path()).unwrap();
            let cert = CertificateDer::from_pem_file(&p.cert).unwrap();
            assert_eq!(name_of(&cert), want);
        }
    }
}
