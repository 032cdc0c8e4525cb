//! What a node trusts: the cluster CA, minus the certificates the CA's revocation list (CRL)
//! names. Both sides of every handshake verify the peer through [`Trust`]. The list is read
//! again every 30 s with the node's own certificate; after a change, a connection already
//! open is checked again ([`Checked`]) — an accepted one at once, a dialled one at its next
//! message — and closed if its peer is now revoked: a long-lived QUIC connection may never
//! reconnect, so checking at the handshake alone would never cut it.
//!
//! Without a configured list this is the plain cluster-CA verification it always was.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use tokio::sync::watch;

use super::tls::{pem_error, provider, TlsError};
use crate::durable::{read_json, write_atomic, FileError};

/// A state file's read error as a TLS set-up error naming the file.
fn state_file<T>(r: Result<T, FileError>) -> Result<T, TlsError> {
    r.map_err(|e| match e {
        FileError::Io { path, source } => pem_error(&path, source),
        FileError::Format { path, source } => pem_error(
            &path,
            format!("{source} (delete the file to accept the revocation list as it is)"),
        ),
    })
}

/// The TLS alert this side raised when a handshake failed: quinn reports it as a transport
/// error with QUIC code 0x100 + alert.
pub(super) fn alert_raised(e: &quinn::ConnectionError) -> Option<u64> {
    match e {
        quinn::ConnectionError::TransportError(t) => {
            u64::from(t.code).checked_sub(0x100).filter(|a| *a <= 0xff)
        }
        _ => None,
    }
}

/// The certificate chain `conn`'s peer presented.
pub(super) fn peer_chain(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|chain| *chain)
}

/// The certificate `conn`'s peer presented (the first of its chain).
pub(super) fn peer_leaf(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    peer_chain(conn)?.into_iter().next()
}

/// Application close code of a connection whose peer's certificate was revoked.
pub const REVOKED_CLOSE_CODE: u32 = 0x5256;

/// Application close code of a connection whose peer's certificate ran out while it was open.
pub const EXPIRED_CLOSE_CODE: u32 = 0x4558;

/// The end of `leaf`'s validity (`None` when it cannot be read).
fn not_after(leaf: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let secs = u64::try_from(super::tls::not_after(leaf)?).ok()?;
    std::time::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// The verifiers a handshake uses now, built from the CA and the list as last read.
struct Verifiers {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
    /// Certificates the list revokes (0 without a list).
    revoked: usize,
    /// The list's CRL number (0 without a list): a list never gives way to an older one.
    number: u64,
    /// SHA-256 of the list's file: a change is a change of contents, whatever its dates.
    digest: Option<[u8; 32]>,
    /// Who issued the list ([`issuer_of`]; empty without one): numbers are compared between
    /// lists of one CA only.
    issuer: String,
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
    /// The crypto provider the verifiers are built with.
    provider: Arc<rustls::crypto::CryptoProvider>,
    crl: Option<PathBuf>,
    current: parking_lot::RwLock<Verifiers>,
    /// Serialises reloads.
    reloading: parking_lot::Mutex<()>,
    /// Counts the changes of the list in use; [`Checked`] holders watch it.
    changes: watch::Sender<u64>,
    /// The list's file was refused at the last read.
    refused: AtomicBool,
    /// Where the CRL number of the list in use is kept across restarts
    /// ([`Trust::remember_number`]).
    floor: parking_lot::Mutex<Option<PathBuf>>,
}

/// The state file of [`Trust::remember_number`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ListFloor {
    /// The highest CRL number this node has enforced.
    crl_number: u64,
    /// The issuer of the list it was read from ([`issuer_of`]): a list of another CA (a CA
    /// rotation) starts its own numbers.
    #[serde(default)]
    issuer: String,
}

/// A list's issuer, as hex of SHA-256 over its name and authority key id: two CAs of one
/// name (a production PKI's rotation) are told apart by their keys.
fn issuer_of(l: &x509_parser::revocation_list::CertificateRevocationList<'_>) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(l.issuer().as_raw());
    for ext in l.extensions() {
        if let x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) =
            ext.parsed_extension()
        {
            if let Some(id) = &aki.key_identifier {
                h.update(id.0);
            }
        }
    }
    h.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

/// The verifiers for `roots` with the lists in the PEM file `crl`, if any.
fn build(roots: &Arc<RootCertStore>, crl: Option<&Path>) -> Result<Verifiers, TlsError> {
    let (lists, digest) = match crl {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| pem_error(path, e))?;
            let lists: Vec<CertificateRevocationListDer<'static>> =
                CertificateRevocationListDer::pem_slice_iter(&bytes)
                    .collect::<Result<_, _>>()
                    .map_err(|e| pem_error(path, e))?;
            if lists.is_empty() {
                return Err(pem_error(path, "no X509 CRL in the file"));
            }
            // webpki enforces the first list of the CA it finds, while the number that keeps
            // an older list out would be read from any: with one list per file neither an
            // old list beside a new one nor a forged one beside a real one can lift a
            // revocation (`certs revoke` writes one).
            if lists.len() > 1 {
                return Err(pem_error(
                    path,
                    format!(
                        "{} lists in the file: one list, of the cluster CA, is expected",
                        lists.len()
                    ),
                ));
            }
            let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
            let mut d = [0u8; 32];
            d.copy_from_slice(digest.as_ref());
            (lists, Some(d))
        }
        None => (Vec::new(), None),
    };
    // The one list, if any (at most one per file, above).
    let parsed = lists
        .first()
        .and_then(|l| x509_parser::parse_x509_crl(l).ok().map(|(_, l)| l));
    let revoked = parsed
        .as_ref()
        .map_or(0, |l| l.iter_revoked_certificates().count());
    let number = parsed
        .as_ref()
        .and_then(|l| l.crl_number().and_then(|n| u64::try_from(n).ok()))
        .unwrap_or(0);
    let issuer = parsed.as_ref().map(issuer_of).unwrap_or_default();
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
        number,
        digest,
        issuer,
    })
}

/// A time inside `leaf`'s validity, as close to now as it gets: a check of revocation must
/// not stop at the certificate's dates (webpki reports an expiry before a revocation), or a
/// certificate that ended while its connection was open would never be found revoked.
fn within_validity(leaf: &CertificateDer<'_>) -> UnixTime {
    let now = UnixTime::now();
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return now;
    };
    let v = cert.validity();
    let (from, to) = (v.not_before.timestamp(), v.not_after.timestamp());
    let at = i64::try_from(now.as_secs())
        .unwrap_or(i64::MAX)
        .clamp(from, to.max(from));
    UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(at).unwrap_or(0)))
}

/// Verify `chain` as `side` would, at a time inside the leaf's validity.
fn verify(v: &Verifiers, side: &Side, chain: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
    let (leaf, rest) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let at = within_validity(leaf);
    match side {
        Side::Accepted => v.client.verify_client_cert(leaf, rest, at).map(|_| ()),
        Side::Dialled(name) => {
            let name = ServerName::try_from(name.as_str())
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            v.server
                .verify_server_cert(leaf, rest, &name, &[], at)
                .map(|_| ())
        }
    }
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
        let verifiers = build(&roots, crl)?;
        if let Some(path) = crl {
            check_own(&verifiers, path, own)?;
        }
        Ok(Trust {
            inner: Arc::new(Inner {
                hints: roots.subjects(),
                roots,
                provider: provider(),
                crl: crl.map(Path::to_path_buf),
                current: parking_lot::RwLock::new(verifiers),
                reloading: parking_lot::Mutex::new(()),
                changes: watch::Sender::new(0),
                refused: AtomicBool::new(false),
                floor: parking_lot::Mutex::new(None),
            }),
        })
    }

    /// Certificates the list in use revokes.
    pub fn revoked(&self) -> usize {
        self.inner.current.read().revoked
    }

    /// Keep the CRL number of the list in use in the state file at `state`, and refuse to
    /// start with a list older than the one kept there: a running node refuses an older list,
    /// and a restart must not accept what it refused (a reverted Secret, a restored backup).
    /// Without a configured list there is nothing to keep.
    pub(crate) fn remember_number(&self, state: &Path) -> Result<(), TlsError> {
        let Some((in_use, issuer)) = self.check_number(state)? else {
            return Ok(());
        };
        *self.inner.floor.lock() = Some(state.to_path_buf());
        self.keep_number(in_use, issuer)
            .map_err(|e| pem_error(state, format!("cannot keep the CRL number: {e}")))
    }

    /// [`Trust::remember_number`]'s refusal without its write: whether the list in use is
    /// at least as new as the one kept in `state`. Returns the list's number and issuer,
    /// `None` without a configured list.
    pub(crate) fn check_number(&self, state: &Path) -> Result<Option<(u64, String)>, TlsError> {
        let Some(crl) = &self.inner.crl else {
            return Ok(None);
        };
        let kept = state_file(read_json::<ListFloor>(state))?;
        let (in_use, issuer) = {
            let v = self.inner.current.read();
            (v.number, v.issuer.clone())
        };
        if let Some(kept) = kept.filter(|k| k.issuer == issuer && k.crl_number > in_use) {
            return Err(pem_error(
                crl,
                format!(
                    "CRL number {in_use} is older than the {} this node enforced before \
                     (kept in {}): a restored or recreated list would lift revocations; put \
                     the newer list back, or delete that file to accept this one",
                    kept.crl_number,
                    state.display()
                ),
            ));
        }
        Ok(Some((in_use, issuer)))
    }

    /// Write `number` of `issuer`'s list to the state file of [`Trust::remember_number`], if
    /// there is one.
    fn keep_number(&self, number: u64, issuer: String) -> std::io::Result<()> {
        let Some(state) = self.inner.floor.lock().clone() else {
            return Ok(());
        };
        if let Some(dir) = state.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let body = serde_json::to_vec(&ListFloor {
            crl_number: number,
            issuer,
        })?;
        write_atomic(&state, &body)
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

    /// Read the list again if its contents changed; whether the list in use was replaced.
    /// One that cannot be read or checked against `own`, or older (a lower CRL number) than
    /// the one in use, keeps the one in use: a half-written file, a lost one or a restored
    /// backup must not lift a revocation. One that revokes `own` is used — the peers enforce
    /// it anyway — and logged as the error it is.
    pub(crate) fn reload_if_changed(
        &self,
        own: &[CertificateDer<'static>],
    ) -> Result<bool, TlsError> {
        let Some(path) = &self.inner.crl else {
            return Ok(false);
        };
        let _one_at_a_time = self.inner.reloading.lock();
        let read = self.read_list(path, own);
        self.inner.refused.store(read.is_err(), Ordering::Relaxed);
        read
    }

    /// Whether the list's file, as last read, is refused (the one before stays in use): an
    /// operator's revocation the node does not enforce.
    pub fn list_refused(&self) -> bool {
        self.inner.refused.load(Ordering::Relaxed)
    }

    fn read_list(&self, path: &Path, own: &[CertificateDer<'static>]) -> Result<bool, TlsError> {
        let verifiers = build(&self.inner.roots, Some(path)).map_err(|e| match e {
            TlsError::Pem { what, .. } if !path.exists() => pem_error(
                path,
                format!("the revocation list is gone ({what}); the last one read stays in use"),
            ),
            e => e,
        })?;
        let in_use = self.inner.current.read().number;
        if verifiers.digest == self.inner.current.read().digest {
            return Ok(false);
        }
        if verifiers.number < in_use {
            return Err(pem_error(
                path,
                format!(
                    "CRL number {} is older than the list in use ({in_use}): a restored or \
                     recreated list would lift revocations",
                    verifiers.number
                ),
            ));
        }
        match check_own(&verifiers, path, own) {
            Err(TlsError::Revoked(file)) => {
                tracing::error!(file = %file.display(),
                    "the revocation list revokes this node's own certificate: peers refuse it")
            }
            other => other?,
        }
        let (number, issuer) = (verifiers.number, verifiers.issuer.clone());
        *self.inner.current.write() = verifiers;
        self.inner.changes.send_modify(|n| *n += 1);
        if let Err(e) = self.keep_number(number, issuer) {
            tracing::warn!(error = %e, "QUIC revocation list in use, but its CRL number is not kept: \
                a restart would accept an older list");
        }
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
            changes: self.inner.changes.subscribe(),
            side,
            expires: None,
        }
    }

    /// A handshake's refusal over the certificate's dates, made a refusal over its revocation
    /// when the list names it: webpki checks dates first, and a peer told "revoked" (alert
    /// 44) is one the other side can tell apart — the broker takes a revoked edge out of
    /// routing, an expired one only loses its QUIC link.
    fn revocation_first<T>(
        &self,
        verdict: Result<T, rustls::Error>,
        side: &Side,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<T, rustls::Error> {
        let dates = matches!(
            &verdict,
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. }
            ))
        );
        if dates && self.inner.crl.is_some() {
            let mut chain = vec![end_entity.clone()];
            chain.extend(intermediates.iter().cloned());
            let again = verify(&self.inner.current.read(), side, &chain);
            if matches!(
                again,
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            ) {
                return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
            }
        }
        verdict
    }

    /// The handshake's signature checks: the same for both sides, and unaffected by the list.
    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.inner.provider.signature_verification_algorithms
    }

    /// Whether the list in use names `leaf`, a certificate a peer dialled as `server_name`
    /// presented (dates aside): a node's standing is kept from the certificate it last showed,
    /// not only from handshakes it may no longer make.
    pub fn revokes_dialled(&self, server_name: &str, leaf: &CertificateDer<'_>) -> bool {
        matches!(
            verify(
                &self.inner.current.read(),
                &Side::Dialled(server_name.to_string()),
                std::slice::from_ref(leaf)
            ),
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        )
    }

    /// Whether the list in use refuses `chain` as `side` verifies it, dates aside.
    fn refuses(&self, side: &Side, chain: &[CertificateDer<'_>]) -> bool {
        verify(&self.inner.current.read(), side, chain).is_err()
    }
}

/// One connection's standing against the revocation list and its peer certificate's dates:
/// the changes of the list since its peer was last verified, and when that certificate ends
/// (keep-alives hold a connection open indefinitely, and a certificate left to expire must
/// not keep its rights on the connections it opened). Taken before the handshake, so a list
/// replaced during the handshake is checked at the first use.
#[derive(Debug)]
pub struct Checked {
    trust: Trust,
    changes: watch::Receiver<u64>,
    side: Side,
    /// When the peer's certificate ends, read once from the connection (outer `None`: not
    /// read yet; inner: unreadable).
    expires: Option<Option<std::time::SystemTime>>,
}

impl Checked {
    /// Whether `conn` may still be used: its peer's certificate has not ended (else `conn` is
    /// closed), and after a change of the list its peer is verified again, and a refused
    /// one's connection is closed. Otherwise a clock read and one atomic load.
    pub fn still_trusted(&mut self, conn: &quinn::Connection) -> bool {
        if self.cut_if_expired(conn) {
            return false;
        }
        if !self.changes.has_changed().unwrap_or(false) {
            return true;
        }
        self.changes.borrow_and_update();
        !self.cut_if_refused(conn)
    }

    /// Wait until a change of the list refuses `conn`'s peer, or its certificate ends, and
    /// close `conn`; pending for as long as neither happens. Cancel-safe.
    pub async fn cut_when_refused(&mut self, conn: &quinn::Connection) {
        let ends = self.expiry(conn);
        let ended = async {
            match ends.and_then(|t| t.duration_since(std::time::SystemTime::now()).ok()) {
                Some(left) => tokio::time::sleep(left).await,
                None if ends.is_some() => {}
                None => std::future::pending().await,
            }
        };
        tokio::pin!(ended);
        loop {
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        (&mut ended).await;
                        self.cut_if_expired(conn);
                        return;
                    }
                    if self.cut_if_refused(conn) {
                        return;
                    }
                }
                () = &mut ended => {
                    self.cut_if_expired(conn);
                    return;
                }
            }
        }
    }

    /// When `conn`'s peer certificate ends, read once.
    fn expiry(&mut self, conn: &quinn::Connection) -> Option<std::time::SystemTime> {
        *self
            .expires
            .get_or_insert_with(|| peer_leaf(conn).as_ref().and_then(not_after))
    }

    /// Close `conn` if its peer's certificate has ended; whether it did.
    fn cut_if_expired(&mut self, conn: &quinn::Connection) -> bool {
        let Some(ends) = self.expiry(conn) else {
            return false;
        };
        if std::time::SystemTime::now() < ends {
            return false;
        }
        tracing::warn!(peer = %conn.remote_address(),
            "QUIC connection closed: the peer's certificate ended while it was open");
        conn.close(EXPIRED_CLOSE_CODE.into(), b"certificate expired");
        true
    }

    /// Take `ends` as the end of the peer's certificate (tests: certificates last days).
    #[cfg(test)]
    fn ending_at(&mut self, ends: std::time::SystemTime) {
        self.expires = Some(Some(ends));
    }

    /// Close `conn` if the list in use refuses its peer's certificate; whether it did. Any
    /// refusal counts, not only a revocation, at a time inside the certificate's validity:
    /// a peer that adds a decoy to its chain must not turn a revocation into another error.
    fn cut_if_refused(&self, conn: &quinn::Connection) -> bool {
        let Some(chain) = peer_chain(conn) else {
            return false;
        };
        if !self.trust.refuses(&self.side, &chain) {
            return false;
        }
        tracing::warn!(peer = %conn.remote_address(),
            "QUIC connection closed: the revocation list refuses the peer's certificate");
        conn.close(REVOKED_CLOSE_CODE.into(), b"certificate revoked");
        true
    }
}

/// Check this node's own chain against `v`, built with the list at `path`, dates aside
/// (an expired certificate is reported where it is read, and must not hide a wrong list):
/// the list must be one of the CA that issued it, and must not revoke it.
fn check_own(v: &Verifiers, path: &Path, own: &[CertificateDer<'static>]) -> Result<(), TlsError> {
    if own.is_empty() {
        return Ok(());
    }
    match verify(v, &Side::Accepted, own) {
        Ok(()) => Ok(()),
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
        // The certificate's own fault (another CA's, say): the handshakes will say so, and
        // a renewal may mend it; the list cannot be judged by it.
        Err(e) => {
            tracing::warn!(error = %e, file = %path.display(),
                "this node's certificate does not pass its own CA; the revocation list is taken unchecked");
            Ok(())
        }
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
        let verdict = client.verify_client_cert(end_entity, intermediates, now);
        self.revocation_first(verdict, &Side::Accepted, end_entity, intermediates)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms().supported_schemes()
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
        let verdict =
            server.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        let side = Side::Dialled(server_name.to_str().into_owned());
        self.revocation_first(verdict, &side, end_entity, intermediates)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms().supported_schemes()
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

    /// A cluster CA with its (empty) revocation list in `dir`, and the files of `names`
    /// (`b` is the broker).
    fn cluster(dir: &Path, names: &[&str]) -> Vec<TlsPaths> {
        create_ca(dir).unwrap();
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
        let endpoint = client_endpoint(&e2, e1_server.local_addr().unwrap()).unwrap();
        let dial = endpoint
            .connect(e1_server.local_addr().unwrap(), &edge_name("e1"))
            .unwrap();
        let (accepted, _) = tokio::join!(async { e1_server.accept().await.unwrap().await }, dial);
        // e1 refuses the revoked e2 as a client, with a TLS alert (what the edge's handshake
        // slots take as a refused certificate).
        assert!(
            matches!(&accepted, Err(quinn::ConnectionError::TransportError(t))
                if (0x100..=0x1ff).contains(&u64::from(t.code))),
            "{accepted:?}"
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
    async fn a_connection_is_cut_when_its_peers_certificate_ends() {
        let dir = tempfile::tempdir().unwrap();
        let p = cluster(dir.path(), &["e1", "b"]);
        let [e1, b] = [&p[0], &p[1]].map(|p| NodeIdentity::load(p).unwrap());
        let e1_server = server(&e1);
        let (Some((on_e1, mut e1_side)), Some((on_b, mut b_side))) =
            handshake(&e1_server, &e1, &b).await
        else {
            panic!("handshake failed");
        };
        let real = e1_side
            .expiry(&on_e1)
            .expect("the certificate's end is read");
        assert!(real > std::time::SystemTime::now() + Duration::from_secs(86_400));
        assert!(e1_side.still_trusted(&on_e1), "not ended");
        e1_side.ending_at(std::time::SystemTime::now() + Duration::from_millis(300));
        tokio::time::timeout(Duration::from_secs(5), e1_side.cut_when_refused(&on_e1))
            .await
            .expect("cut once the certificate ends");
        let closed = tokio::time::timeout(Duration::from_secs(5), on_b.closed())
            .await
            .unwrap();
        assert!(
            matches!(&closed, quinn::ConnectionError::ApplicationClosed(c)
                if u64::from(c.error_code) == u64::from(EXPIRED_CLOSE_CODE)),
            "{closed:?}"
        );
        // A dialled connection whose peer's certificate ended is not used again.
        b_side.ending_at(std::time::SystemTime::now() - Duration::from_secs(1));
        assert!(!b_side.still_trusted(&on_b));
    }

    #[tokio::test]
    async fn an_idle_accepted_connection_is_cut_when_the_list_revokes_its_peer() {
        let dir = tempfile::tempdir().unwrap();
        let p = cluster(dir.path(), &["e1", "b", "e2"]);
        let [e1, b] = [&p[0], &p[1]].map(|p| NodeIdentity::load(p).unwrap());
        let e1_server = server(&e1);
        let (Some((on_e1, mut e1_side)), Some((on_b, _))) = handshake(&e1_server, &e1, &b).await
        else {
            panic!("handshake failed");
        };
        let cut = tokio::spawn(async move { e1_side.cut_when_refused(&on_e1).await });
        // A list revoking someone else leaves it open.
        revoke_files(dir.path(), &[&p[2]]);
        assert!(e1.reload_revocations().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!cut.is_finished());
        assert!(on_b.close_reason().is_none());
        revoke_files(dir.path(), &[&p[1]]);
        assert!(e1.reload_revocations().unwrap());
        tokio::time::timeout(Duration::from_secs(2), cut)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            on_b.closed().await,
            quinn::ConnectionError::ApplicationClosed(_)
        ));
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
        std::fs::write(&list, &good).unwrap();
        assert!(
            !e1.reload_revocations().unwrap(),
            "the same contents: no change"
        );
        // A newer list is taken; the older one put back (a restored backup) is not.
        revoke_files(&cluster_dir, &[&p[0]]);
        let newer = std::fs::read(&list).unwrap();
        assert!(
            e1.reload_revocations().unwrap(),
            "a list revoking e1 itself is used"
        );
        assert_eq!(e1.trust().revoked(), 2);
        std::fs::write(&list, &good).unwrap();
        let e = e1.reload_revocations().unwrap_err().to_string();
        assert!(e.contains("older than the list in use"), "{e}");
        assert_eq!(e1.trust().revoked(), 2);
        assert!(e1.trust().list_refused(), "exported, for an alert");
        std::fs::write(&list, newer).unwrap();
        assert!(!e1.reload_revocations().unwrap());
        assert!(!e1.trust().list_refused());
    }

    #[test]
    fn a_list_older_than_one_enforced_before_is_refused_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("cache").join("quic-crl-number.json");
        let p = cluster(dir.path(), &["e1", "e2"]);
        let list = p[0].crl.clone().unwrap();
        let first = std::fs::read(&list).unwrap();
        let e1 = NodeIdentity::load(&p[0]).unwrap();
        e1.remember_list_number(&state).unwrap();
        revoke_files(dir.path(), &[&p[1]]);
        assert!(e1.reload_revocations().unwrap());
        let newer = std::fs::read(&list).unwrap();
        drop(e1);
        // The list reverted (a Secret rolled back, a backup restored) while e1 was down.
        std::fs::write(&list, &first).unwrap();
        let restarted = NodeIdentity::load(&p[0]).unwrap();
        let kept = std::fs::read(&state).unwrap();
        // A check before a start refuses it alike, and writes nothing.
        let e = restarted.check_list_number(&state).unwrap_err().to_string();
        assert!(e.contains("older than"), "{e}");
        let e = restarted
            .remember_list_number(&state)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("older than") && e.contains("quic-crl-number.json"),
            "{e}"
        );
        assert_eq!(std::fs::read(&state).unwrap(), kept);
        let unkept = dir.path().join("unkept.json");
        restarted.check_list_number(&unkept).unwrap();
        assert!(!unkept.exists(), "a check keeps nothing");
        std::fs::write(&list, &newer).unwrap();
        let restarted = NodeIdentity::load(&p[0]).unwrap();
        restarted.remember_list_number(&state).unwrap();
        assert_eq!(restarted.trust().revoked(), 1);
        // A rotation to another CA, whose list numbers lower than the old CA's: its own.
        let rotated = dir.path().join("rotated");
        std::fs::create_dir_all(&rotated).unwrap();
        let q = cluster(&rotated, &["e1"]);
        let floor = |n: u64| {
            let mut kept: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
            kept["crl_number"] = n.into();
            std::fs::write(&state, kept.to_string()).unwrap();
        };
        floor(u64::MAX);
        assert!(NodeIdentity::load(&p[0])
            .unwrap()
            .remember_list_number(&state)
            .is_err());
        let moved = NodeIdentity::load(&q[0]).unwrap();
        moved.remember_list_number(&state).unwrap();
        // A damaged file says how to go on.
        std::fs::write(&state, "{").unwrap();
        let e = NodeIdentity::load(&q[0])
            .unwrap()
            .remember_list_number(&state)
            .unwrap_err()
            .to_string();
        assert!(e.contains("delete the file"), "{e}");
        // Without a list nothing is kept.
        let mut unlisted = p[0].clone();
        unlisted.crl = None;
        let other_state = dir.path().join("none.json");
        NodeIdentity::load(&unlisted)
            .unwrap()
            .remember_list_number(&other_state)
            .unwrap();
        assert!(!other_state.exists());
    }

    /// webpki enforces the first list of the CA in a file: an old list before a new one, or
    /// a forged one with a high number beside a real one, must not be taken.
    #[test]
    fn a_file_with_more_than_one_list_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = cluster(dir.path(), &["e1", "e2"]);
        let list = p[0].crl.clone().unwrap();
        let old = std::fs::read(&list).unwrap();
        revoke_files(dir.path(), &[&p[1]]);
        let new = std::fs::read(&list).unwrap();
        let e1 = NodeIdentity::load(&p[0]).unwrap();
        std::fs::write(&list, [old.clone(), new].concat()).unwrap();
        let e = e1.reload_revocations().unwrap_err().to_string();
        assert!(e.contains("2 lists in the file"), "{e}");
        assert_eq!(e1.trust().revoked(), 1, "the list in use stays");
        let e = NodeIdentity::load(&p[0]).err().unwrap().to_string();
        assert!(e.contains("2 lists in the file"), "{e}");
    }

    #[test]
    fn a_revoked_certificate_is_refused_after_it_expires_and_with_decoys_in_its_chain() {
        use rcgen::{CertificateParams, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let p = cluster(dir.path(), &["e1"]);
        let e1 = NodeIdentity::load(&p[0]).unwrap();
        // A certificate of the cluster CA that ended yesterday, as one that expired while
        // its connection was open.
        let ca = Issuer::from_ca_cert_pem(
            &std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
            KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca.key")).unwrap())
                .unwrap(),
        )
        .unwrap();
        let mut params = CertificateParams::new(vec!["b.edge.shadowcdn".into()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(30);
        params.not_after = now - time::Duration::days(1);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let old = params
            .signed_by(&KeyPair::generate().unwrap(), &ca)
            .unwrap();
        let old_file = dir.path().join("old.pem");
        std::fs::write(&old_file, old.pem()).unwrap();
        // A decoy "intermediate": a self-signed certificate with an expired validity.
        let mut decoy = CertificateParams::default();
        decoy.not_before = params.not_before;
        decoy.not_after = params.not_after;
        let decoy = decoy.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let chain = vec![old.der().clone(), decoy.der().clone()];
        let trust = e1.trust();
        let side = Side::Dialled("b.edge.shadowcdn".into());
        assert!(
            !trust.refuses(&Side::Accepted, &chain[..1]),
            "dates aside, it is valid"
        );
        assert!(!trust.refuses(&side, &chain[..1]));
        let at_handshake = || {
            trust
                .verify_client_cert(&chain[0], &[], UnixTime::now())
                .err()
        };
        assert!(
            matches!(
                at_handshake(),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                ))
            ),
            "{:?}",
            at_handshake()
        );
        revoke(dir.path(), &[old_file]).unwrap();
        assert!(e1.reload_revocations().unwrap());
        // A handshake says "revoked" rather than "expired" once the list names it.
        assert_eq!(
            at_handshake(),
            Some(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        );
        for s in [&Side::Accepted, &side] {
            assert!(trust.refuses(s, &chain[..1]));
            assert!(
                trust.refuses(s, &chain),
                "a decoy does not hide the revocation"
            );
        }
    }
}
