//! What a node trusts: the cluster CA, minus the certificates the CA's revocation list (CRL)
//! names. Both sides of every handshake verify the peer through [`Trust`], and when the list
//! changes on disk (read again every 30 s with the node's own certificate) each open
//! connection is checked again at its next use ([`Checked`]): a revoked node is cut off
//! within one reload, not at its next reconnect, which on a long-lived QUIC connection may
//! never come.
//!
//! Without a configured list this is the plain cluster-CA verification it always was.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};

use super::tls::{pem_error, provider, TlsError};

/// Application close code of a connection whose peer's certificate was revoked.
pub const REVOKED_CLOSE_CODE: u32 = 0x5256;

/// The verifiers a handshake uses now, built from the CA and the list as last read.
struct Verifiers {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
    /// Certificates the list revokes (0 without a list).
    revoked: usize,
}

/// Which side of a connection this node is, so its peer is verified again as it was at the
/// handshake.
#[derive(Debug, Clone)]
enum Side {
    /// The peer dialled us: checked as a client certificate.
    Accepted,
    /// We dialled the peer by this name: checked as a server certificate.
    Dialled(String),
}

struct Inner {
    roots: Arc<RootCertStore>,
    /// The subjects of `roots`: what a server names to a client as acceptable issuers.
    hints: Vec<DistinguishedName>,
    crl: Option<PathBuf>,
    current: parking_lot::RwLock<Verifiers>,
    /// (modification time, length) of the list when last read.
    stamp: parking_lot::Mutex<Option<(SystemTime, u64)>>,
    /// Bumped at every change of the list in use.
    generation: AtomicU64,
}

/// The cluster CA and its revocation list as this node enforces them; cheap to clone (all
/// clones share one list). It is the certificate verifier of both QUIC sides.
#[derive(Clone)]
pub struct Trust {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("crl", &self.inner.crl)
            .field("revoked", &self.inner.current.read().revoked)
            .finish()
    }
}

fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The verifiers for `roots` with the lists in the PEM file `crl`, if any.
fn build(roots: &Arc<RootCertStore>, crl: Option<&Path>) -> Result<Verifiers, TlsError> {
    let lists = match crl {
        Some(path) => {
            let lists: Vec<CertificateRevocationListDer<'static>> =
                CertificateRevocationListDer::pem_file_iter(path)
                    .map_err(|e| pem_error(path, e))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| pem_error(path, e))?;
            if lists.is_empty() {
                return Err(pem_error(path, "no X509 CRL in the file"));
            }
            lists
        }
        None => Vec::new(),
    };
    let revoked = lists
        .iter()
        .filter_map(|l| x509_parser::parse_x509_crl(l).ok())
        .map(|(_, l)| l.iter_revoked_certificates().count())
        .sum();
    let bad_list = |e: rustls::server::VerifierBuilderError| match crl {
        Some(path) => pem_error(path, e),
        None => TlsError::Verifier(e.to_string()),
    };
    // Only the leaf is looked up: the cluster CA issues node certificates directly, and a
    // production PKI's intermediates are revoked by replacing the CA file.
    let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(lists.clone())
        .only_check_end_entity_revocation()
        .build()
        .map_err(bad_list)?;
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(lists)
        .only_check_end_entity_revocation()
        .build()
        .map_err(bad_list)?;
    Ok(Verifiers {
        client,
        server,
        revoked,
    })
}

impl Trust {
    /// Trust the CA certificates in `roots`, minus what the list at `crl` revokes. The list
    /// must be one `own` (this node's certificate chain) can be checked against — a list of
    /// another CA would make every handshake fail — and must not revoke `own`.
    pub(crate) fn load(
        roots: RootCertStore,
        crl: Option<&Path>,
        own: &[CertificateDer<'static>],
    ) -> Result<Self, TlsError> {
        let roots = Arc::new(roots);
        let stamp = crl.and_then(stamp_of);
        let verifiers = build(&roots, crl)?;
        if let Some(path) = crl {
            check_own(&verifiers, path, own)?;
        }
        Ok(Trust {
            inner: Arc::new(Inner {
                hints: roots.subjects(),
                roots,
                crl: crl.map(Path::to_path_buf),
                current: parking_lot::RwLock::new(verifiers),
                stamp: parking_lot::Mutex::new(stamp),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// Certificates the list in use revokes.
    pub fn revoked(&self) -> usize {
        self.inner.current.read().revoked
    }

    /// Whether `chain` (this node's certificate, maybe a renewal) would pass a peer's check:
    /// issued by the cluster CA, valid now, not revoked.
    pub(crate) fn verify_own(&self, chain: &[CertificateDer<'static>]) -> Result<(), TlsError> {
        let (leaf, rest) = chain
            .split_first()
            .ok_or_else(|| TlsError::Verifier("no certificate in the chain".into()))?;
        self.inner
            .current
            .read()
            .client
            .verify_client_cert(leaf, rest, UnixTime::now())
            .map(|_| ())
            .map_err(TlsError::from)
    }

    /// Read the list again if its file changed; whether the list in use was replaced. One
    /// that cannot be read, or cannot be checked against `own`, keeps the previous one in use
    /// (a half-written file must not lift a revocation). One that revokes `own` is used —
    /// the peers enforce it anyway — and logged as the error it is.
    pub(crate) fn reload_if_changed(
        &self,
        own: &[CertificateDer<'static>],
    ) -> Result<bool, TlsError> {
        let Some(path) = &self.inner.crl else {
            return Ok(false);
        };
        let now = stamp_of(path);
        let mut stamp = self.inner.stamp.lock();
        if now == *stamp {
            return Ok(false);
        }
        if now.is_none() {
            return Err(pem_error(
                path,
                "the revocation list is gone; the last one read stays in use",
            ));
        }
        let verifiers = build(&self.inner.roots, Some(path))?;
        match check_own(&verifiers, path, own) {
            Err(TlsError::Revoked(file)) => {
                tracing::error!(file = %file.display(),
                    "the revocation list revokes this node's own certificate: peers refuse it")
            }
            other => other?,
        }
        *self.inner.current.write() = verifiers;
        self.inner.generation.fetch_add(1, Ordering::Release);
        *stamp = now;
        Ok(true)
    }

    /// How a connection about to be accepted is kept checked: take it before the handshake.
    pub fn accepting(&self) -> Checked {
        self.checked(Side::Accepted)
    }

    /// How a connection about to be dialled to `server_name` is kept checked: take it before
    /// the handshake.
    pub fn dialling(&self, server_name: &str) -> Checked {
        self.checked(Side::Dialled(server_name.to_string()))
    }

    fn checked(&self, side: Side) -> Checked {
        Checked {
            trust: self.clone(),
            generation: self.inner.generation.load(Ordering::Acquire),
            side,
        }
    }
}

/// One connection's standing against the revocation list: the list's generation its peer
/// was last verified under. Taken before the handshake, so a list replaced during the
/// handshake is checked at the first use.
#[derive(Debug)]
pub struct Checked {
    trust: Trust,
    generation: u64,
    side: Side,
}

impl Checked {
    /// Whether `conn` may still be used: after a change of the list its peer is verified
    /// again, and a revoked one's connection is closed. Otherwise one atomic load.
    pub fn still_trusted(&mut self, conn: &quinn::Connection) -> bool {
        let now = self.trust.inner.generation.load(Ordering::Acquire);
        if now == self.generation {
            return true;
        }
        self.generation = now;
        if self.revoked(conn) {
            tracing::warn!(peer = %conn.remote_address(),
                "QUIC connection closed: the peer's certificate is revoked");
            conn.close(REVOKED_CLOSE_CODE.into(), b"certificate revoked");
            return false;
        }
        true
    }

    /// Whether the list in use revokes the certificate `conn`'s peer presented. Only a
    /// revocation counts: an expiry since the handshake is the next handshake's business,
    /// as TLS has it.
    fn revoked(&self, conn: &quinn::Connection) -> bool {
        let Some(chain) = conn
            .peer_identity()
            .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        else {
            return false;
        };
        let Some((leaf, rest)) = chain.split_first() else {
            return false;
        };
        let now = UnixTime::now();
        let v = self.trust.inner.current.read();
        let verdict = match &self.side {
            Side::Accepted => v.client.verify_client_cert(leaf, rest, now).map(|_| ()),
            Side::Dialled(name) => match ServerName::try_from(name.as_str()) {
                Ok(name) => v
                    .server
                    .verify_server_cert(leaf, rest, &name, &[], now)
                    .map(|_| ()),
                Err(_) => Ok(()),
            },
        };
        matches!(
            verdict,
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        )
    }
}

/// Check this node's own chain against `v`, built with the list at `path`.
fn check_own(v: &Verifiers, path: &Path, own: &[CertificateDer<'static>]) -> Result<(), TlsError> {
    let Some((leaf, rest)) = own.split_first() else {
        return Ok(());
    };
    match v.client.verify_client_cert(leaf, rest, UnixTime::now()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)) => {
            Err(TlsError::Revoked(path.to_path_buf()))
        }
        Err(
            e @ (rustls::Error::InvalidCertificate(CertificateError::UnknownRevocationStatus)
            | rustls::Error::InvalidCertRevocationList(_)),
        ) => Err(pem_error(
            path,
            format!("not a revocation list of the CA that issued this node's certificate ({e})"),
        )),
        // The certificate's own dates are reported where it is read (and renewed).
        Err(rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        )) => Ok(()),
        Err(e) => Err(pem_error(
            path,
            format!("this node's certificate cannot be checked against it: {e}"),
        )),
    }
}

impl ClientCertVerifier for Trust {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.inner.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let client = self.inner.current.read().client.clone();
        client.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let client = self.inner.current.read().client.clone();
        client.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let client = self.inner.current.read().client.clone();
        client.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.current.read().client.supported_verify_schemes()
    }
}

impl ServerCertVerifier for Trust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let server = self.inner.current.read().server.clone();
        server.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let server = self.inner.current.read().server.clone();
        server.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let server = self.inner.current.read().server.clone();
        server.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.current.read().server.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::path::PathBuf;

    use super::*;
    use crate::sync::link::client_endpoint;
    use crate::sync::pki::{create_ca, issue, revoke, NodeRole};
    use crate::sync::tls::{edge_name, NodeIdentity, TlsPaths};

    /// A cluster CA with an (empty) revocation list in `dir`, and the files of `names`
    /// (`b` is the broker).
    fn cluster(dir: &Path, names: &[&str]) -> Vec<TlsPaths> {
        create_ca(dir).unwrap();
        revoke(dir, &[]).unwrap();
        names
            .iter()
            .map(|&n| {
                let role = if n == "b" {
                    NodeRole::Broker
                } else {
                    NodeRole::Edge
                };
                let p = issue(dir, n, role, dir).unwrap();
                assert!(p.crl.is_some(), "issue names the CA's list");
                p
            })
            .collect()
    }

    fn server(identity: &NodeIdentity) -> quinn::Endpoint {
        quinn::Endpoint::new(
            identity.endpoint_config(),
            Some(identity.server_config().unwrap()),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            Arc::new(quinn::TokioRuntime),
        )
        .unwrap()
    }

    /// Dial `server` (edge `e1`) from `client`: (what the server got, what the client got),
    /// each side's standing taken before the handshake as the nodes take it.
    async fn handshake(
        server: &quinn::Endpoint,
        server_id: &NodeIdentity,
        client: &NodeIdentity,
    ) -> (
        Option<(quinn::Connection, Checked)>,
        Option<(quinn::Connection, Checked)>,
    ) {
        let addr = server.local_addr().unwrap();
        let endpoint = client_endpoint(client, addr).unwrap();
        let (accepting, dialling) = (
            server_id.trust().accepting(),
            client.trust().dialling(&edge_name("e1")),
        );
        let dial = endpoint.connect(addr, &edge_name("e1")).unwrap();
        let (accepted, dialled) =
            tokio::join!(async { server.accept().await.unwrap().await.ok() }, dial);
        // TLS 1.3: the client is done before the server has judged its certificate.
        let dialled = match (&accepted, dialled) {
            (Some(_), Ok(c)) => Some(c),
            _ => None,
        };
        (
            accepted.map(|c| (c, accepting)),
            dialled.map(|c| (c, dialling)),
        )
    }

    fn revoke_files(dir: &Path, certs: &[&TlsPaths]) {
        let files: Vec<PathBuf> = certs.iter().map(|p| p.cert.clone()).collect();
        revoke(dir, &files).unwrap();
    }

    #[tokio::test]
    async fn a_revoked_node_is_refused_at_the_handshake_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let p = cluster(dir.path(), &["e1", "e2", "b"]);
        let [e1, e2, b] = [&p[0], &p[1], &p[2]].map(|p| NodeIdentity::load(p).unwrap());
        let e1_server = server(&e1);
        assert!(handshake(&e1_server, &e1, &e2).await.0.is_some());

        revoke_files(dir.path(), &[&p[1]]);
        assert!(e1.reload_revocations().unwrap());
        assert!(!e1.reload_revocations().unwrap(), "read once per change");
        assert_eq!(e1.trust().revoked(), 1);
        assert!(
            handshake(&e1_server, &e1, &e2).await.0.is_none(),
            "e1 refuses the revoked e2 as a client"
        );
        assert!(handshake(&e1_server, &e1, &b).await.0.is_some());

        // As a server: e2 still presents its certificate, and a client with the new list
        // refuses it.
        let (e2_paths, b_paths) = (p[1].clone(), p[2].clone());
        let mut e2_as_e1 = e2_paths.clone();
        e2_as_e1.crl = None;
        drop(e2);
        let e2_server = server(&NodeIdentity::load(&e2_as_e1).unwrap());
        let b = NodeIdentity::load(&b_paths).unwrap();
        let endpoint = client_endpoint(&b, e2_server.local_addr().unwrap()).unwrap();
        let dial = endpoint
            .connect(e2_server.local_addr().unwrap(), &edge_name("e2"))
            .unwrap();
        let (_, dialled) = tokio::join!(async { e2_server.accept().await.unwrap().await }, dial);
        let refused = dialled.unwrap_err().to_string();
        assert!(refused.to_lowercase().contains("revoked"), "{refused}");
    }

    #[tokio::test]
    async fn an_open_connection_is_closed_at_its_first_use_after_a_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let p = cluster(dir.path(), &["e1", "b"]);
        let [e1, b] = [&p[0], &p[1]].map(|p| NodeIdentity::load(p).unwrap());
        let e1_server = server(&e1);
        let (Some((on_e1, mut e1_side)), Some((on_b, mut b_side))) =
            handshake(&e1_server, &e1, &b).await
        else {
            panic!("handshake failed");
        };
        assert!(e1_side.still_trusted(&on_e1) && b_side.still_trusted(&on_b));
        // The broker is revoked: its own list says so (logged, used), and e1's read of the
        // list cuts the connection at its next use.
        revoke_files(dir.path(), &[&p[1]]);
        assert!(
            b.reload_revocations().unwrap(),
            "a list revoking this node is used"
        );
        assert!(
            b_side.still_trusted(&on_b),
            "the broker's peer, e1, is not revoked"
        );
        assert!(
            e1_side.still_trusted(&on_e1),
            "e1 has not read the list yet"
        );
        assert!(e1.reload_revocations().unwrap());
        assert!(!e1_side.still_trusted(&on_e1));
        let closed = on_b.closed().await;
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == REVOKED_CLOSE_CODE.into()),
            "{closed:?}"
        );
    }

    #[tokio::test]
    async fn a_dialled_peer_revoked_later_is_cut_by_the_dialler() {
        let dir = tempfile::tempdir().unwrap();
        let p = cluster(dir.path(), &["e1", "b"]);
        let [e1, b] = [&p[0], &p[1]].map(|p| NodeIdentity::load(p).unwrap());
        let e1_server = server(&e1);
        let (Some((on_e1, _)), Some((on_b, mut b_side))) = handshake(&e1_server, &e1, &b).await
        else {
            panic!("handshake failed");
        };
        revoke_files(dir.path(), &[&p[0]]);
        assert!(b.reload_revocations().unwrap());
        assert!(
            !b_side.still_trusted(&on_b),
            "e1, which b dialled, is revoked"
        );
        assert!(matches!(
            on_e1.closed().await,
            quinn::ConnectionError::ApplicationClosed(_)
        ));
    }

    #[test]
    fn a_list_that_cannot_be_used_is_refused_at_start_and_kept_out_at_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (cluster_dir, other) = (dir.path().join("cluster"), dir.path().join("other"));
        for d in [&cluster_dir, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        let p = cluster(&cluster_dir, &["e1", "e2"]);
        create_ca(&other).unwrap();
        revoke(&other, &[]).unwrap();

        // Another CA's list: every handshake would fail with it.
        let mut wrong = p[0].clone();
        wrong.crl = Some(other.join("ca.crl"));
        let e = NodeIdentity::load(&wrong).err().unwrap().to_string();
        assert!(e.contains("not a revocation list of the CA"), "{e}");
        // A list revoking the node itself: it could not talk to anyone.
        revoke_files(&cluster_dir, &[&p[1]]);
        let e = NodeIdentity::load(&p[1]).err().unwrap().to_string();
        assert!(e.contains("revokes this node's own certificate"), "{e}");

        // At a reload, a half-written or vanished list keeps the one in use.
        let e1 = NodeIdentity::load(&p[0]).unwrap();
        assert_eq!(e1.trust().revoked(), 1);
        let list = p[0].crl.clone().unwrap();
        let good = std::fs::read(&list).unwrap();
        std::fs::write(&list, "-----BEGIN X509 CRL-----\n").unwrap();
        assert!(e1.reload_revocations().is_err());
        std::fs::remove_file(&list).unwrap();
        let e = e1.reload_revocations().unwrap_err().to_string();
        assert!(e.contains("gone"), "{e}");
        std::fs::copy(other.join("ca.crl"), &list).unwrap();
        assert!(e1.reload_revocations().is_err(), "another CA's list");
        assert_eq!(e1.trust().revoked(), 1, "the list in use stays");
        std::fs::write(&list, good).unwrap();
        assert!(e1.reload_revocations().unwrap());
    }
}
