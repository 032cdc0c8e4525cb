//! The QUIC certificate each edge last presented to the broker, kept on disk. An edge is held
//! out of routing while the broker's revocation list names its certificate; judged only by
//! handshakes, a revoked edge that stops presenting its certificate (it drops the broker's
//! packets, or shows one of another CA) would take traffic again after a broker restart. So
//! the broker keeps the last certificate each edge showed, and judges an edge by it until a
//! handshake shows another.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edge_node::durable::{read_json, write_atomic, FileError};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// The state file's contents: edge id → DER of its certificate, in hex.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    edges: BTreeMap<String, String>,
}

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EdgeCertsError {
    /// Unreadable or not what this build writes.
    #[error("{0} (delete the file to start without the certificates it kept)")]
    File(#[from] FileError),
    /// An entry is not a hex DER.
    #[error("{path}: edge {edge}: not a hex-encoded certificate (delete the file to start without the certificates it kept)")]
    Entry {
        /// The file.
        path: PathBuf,
        /// The edge whose entry is bad.
        edge: String,
    },
}

/// The certificates, as last written.
#[derive(Debug)]
pub struct EdgeCertificates {
    path: PathBuf,
    saved: parking_lot::Mutex<Saved>,
}

impl EdgeCertificates {
    /// Read the state file at `path` (none yet: empty), keeping the entries of the edges in
    /// `edges` (the configured ones) only.
    pub fn open<'a>(
        path: &Path,
        edges: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, EdgeCertsError> {
        let mut saved: Saved = read_json(path)?.unwrap_or_default();
        let keep: std::collections::HashSet<&str> = edges.into_iter().collect();
        saved.edges.retain(|id, _| keep.contains(id.as_str()));
        if let Some((edge, _)) = saved.edges.iter().find(|(_, h)| hex::decode(h).is_err()) {
            return Err(EdgeCertsError::Entry {
                path: path.to_path_buf(),
                edge: edge.clone(),
            });
        }
        Ok(EdgeCertificates {
            path: path.to_path_buf(),
            saved: parking_lot::Mutex::new(saved),
        })
    }

    /// The certificate edge `id` last presented, if it was kept.
    pub fn get(&self, id: &str) -> Option<CertificateDer<'static>> {
        let hex = self.saved.lock().edges.get(id)?.clone();
        hex::decode(hex).ok().map(CertificateDer::from)
    }

    /// Whether `cert` is not what is kept for edge `id`.
    pub fn differs(&self, id: &str, cert: &CertificateDer<'_>) -> bool {
        self.saved.lock().edges.get(id) != Some(&hex::encode(cert.as_ref()))
    }

    /// Keep each `(id, cert)` as that edge's, writing the file once if anything changed; an
    /// error leaves the file as it was (the next call tries again). Blocking: call it off the
    /// async workers.
    pub fn note_all(&self, certs: &[(String, CertificateDer<'_>)]) -> std::io::Result<()> {
        let mut saved = self.saved.lock();
        let mut next = saved.clone();
        for (id, cert) in certs {
            next.edges.insert(id.clone(), hex::encode(cert.as_ref()));
        }
        if next == *saved {
            return Ok(());
        }
        write_atomic(&self.path, &serde_json::to_vec(&next)?)?;
        *saved = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_across_opens_for_configured_edges_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("certs.json");
        let certs = EdgeCertificates::open(&path, ["e1", "e2"]).unwrap();
        assert!(certs.get("e1").is_none());
        let a = CertificateDer::from(vec![1u8, 2, 3]);
        assert!(certs.differs("e1", &a));
        certs
            .note_all(&[
                ("e1".into(), a.clone()),
                ("e2".into(), CertificateDer::from(vec![9u8])),
            ])
            .unwrap();
        assert!(!certs.differs("e1", &a));
        let again = EdgeCertificates::open(&path, ["e1"]).unwrap();
        assert_eq!(again.get("e1").unwrap().as_ref(), a.as_ref());
        assert!(again.get("e2").is_none(), "no longer configured");
        let b = CertificateDer::from(vec![4u8]);
        again.note_all(&[("e1".into(), b.clone())]).unwrap();
        let third = EdgeCertificates::open(&path, ["e1"]).unwrap();
        assert_eq!(third.get("e1").unwrap().as_ref(), b.as_ref());
    }

    #[test]
    fn a_damaged_file_is_a_start_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("certs.json");
        std::fs::write(&path, "{ not json").unwrap();
        let e = EdgeCertificates::open(&path, ["e1"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("certs.json") && e.contains("delete the file"),
            "{e}"
        );
        std::fs::write(&path, r#"{"edges":{"e1":"zz"}}"#).unwrap();
        let e = EdgeCertificates::open(&path, ["e1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("edge e1"), "{e}");
    }
}
