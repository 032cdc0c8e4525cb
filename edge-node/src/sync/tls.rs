//! Mutual TLS for the QUIC channels: every node holds a certificate issued by the cluster CA,
//! servers demand a client certificate from the same CA, and a node's role is read off the
//! names its certificate is valid for (`broker.shadowcdn`, `<id>.edge.shadowcdn`).
//!
//! A node's own certificate and key are read again when their files change (checked every
//! 30 s), so a renewal (cert-manager, say) takes effect for the next handshake without a
//! restart; connections already open keep theirs. So is the CA's revocation list, when one
//! is configured ([`super::trust`]). The CA is read once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use ring::hmac;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};

use super::trust::Trust;

/// ALPN of protocol version 1; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"shadowcdn/1";
/// The name a broker certificate is issued for.
pub const BROKER_NAME: &str = "broker.shadowcdn";

/// The name edge `id`'s certificate is issued for (and that peers dial it by).
pub fn edge_name(id: &str) -> String {
    format!("{id}.edge.shadowcdn")
}

/// Where a node's PEM files are.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA certificate every peer must chain to.
    pub ca_cert: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
    /// The cluster CA's certificate revocation list (PEM, `edge-node certs revoke` writes
    /// it); absent: no certificate of the CA is refused before it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the certificate, key or CA.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA cannot verify certificates (or this node's own chain does not verify).
    #[error("certificate verifier: {0}")]
    Verifier(String),
    /// The revocation list at this path revokes this node's own certificate.
    #[error("{0}: the revocation list revokes this node's own certificate")]
    Revoked(PathBuf),
    /// quinn refused the rustls configuration.
    #[error("quic crypto: {0}")]
    Quic(String),
}

/// A node's certificate, key and the CA (and revocation list) it trusts.
pub struct NodeIdentity {
    trust: Trust,
    /// The key as first loaded: it seeds the endpoint's reset tokens, which must not change
    /// while the process lives.
    key: PrivateKeyDer<'static>,
    /// The certificate and key handshakes present, swapped when the files change.
    current: Arc<CurrentKey>,
}

/// This node's certificate and key as handshakes present them, for both sides of a channel.
#[derive(Debug)]
struct CurrentKey {
    paths: TlsPaths,
    /// The cluster CA and its revocation list: a renewal must pass them.
    trust: Trust,
    key: parking_lot::RwLock<Arc<CertifiedKey>>,
    /// The files' [`Stamp`] when last read.
    stamp: parking_lot::Mutex<Stamp>,
}

/// How often the certificate and key files are checked for a renewal.
const RELOAD_EVERY: Duration = Duration::from_secs(30);
/// A certificate this close to its end is warned about at every load.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// (modification time, length) of the certificate and key files.
type Stamp = [Option<(SystemTime, u64)>; 2];

fn stamp_of(p: &TlsPaths) -> Stamp {
    [&p.cert, &p.key].map(|f| {
        let m = std::fs::metadata(f).ok()?;
        Some((m.modified().ok()?, m.len()))
    })
}

impl CurrentKey {
    /// Read the files again if they changed; whether the key in use was replaced. A pair
    /// that cannot be used (half written, mismatched) keeps the previous one in use.
    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp_of(&self.paths);
        let mut stamp = self.stamp.lock();
        if now == *stamp {
            return Ok(false);
        }
        let (key, _) = certified_key(&self.paths)?;
        // One the cluster would refuse (another CA's, not yet or no longer valid, revoked)
        // would fail every handshake from now on: the one in use stays.
        self.trust.verify_own(&key.cert).map_err(|e| {
            pem_error(
                &self.paths.cert,
                format!("the cluster would refuse it: {e}"),
            )
        })?;
        *self.key.write() = key;
        *stamp = now;
        Ok(true)
    }

    /// Read the revocation list again if its file changed, checked against the certificate
    /// in use.
    fn reload_revocations(&self) -> Result<bool, TlsError> {
        let own = self.key.read().cert.clone();
        self.trust.reload_if_changed(&own)
    }

    /// Log the certificate in use if it has expired or ends soon.
    fn check_expiry(&self) {
        if let Some(leaf) = self.key.read().cert.first() {
            warn_if_expiring(&self.paths.cert, leaf);
        }
    }
}

impl rustls::server::ResolvesServerCert for CurrentKey {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.read().clone())
    }
}

impl rustls::client::ResolvesClientCert for CurrentKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.key.read().clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificate chain and key of `p`, checked to fit each other, and the key's DER.
fn certified_key(p: &TlsPaths) -> Result<(Arc<CertifiedKey>, PrivateKeyDer<'static>), TlsError> {
    let chain = certificates(&p.cert, "no certificate in the file")?;
    let key = PrivateKeyDer::from_pem_file(&p.key).map_err(|e| pem_error(&p.key, e))?;
    warn_if_expiring(&p.cert, &chain[0]);
    let certified = CertifiedKey::from_der(chain, key.clone_key(), &provider())
        .map_err(|e| pem_error(&p.key, format!("does not fit the certificate: {e}")))?;
    Ok((Arc::new(certified), key))
}

/// Log a certificate that has expired or ends within [`EXPIRY_WARNING`].
fn warn_if_expiring(path: &Path, cert: &CertificateDer<'_>) {
    let Some(end) = not_after(cert) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = end - now;
    if left <= 0 {
        tracing::error!(file = %path.display(), "QUIC certificate has expired");
    } else if left < EXPIRY_WARNING.as_secs() as i64 {
        tracing::warn!(file = %path.display(), days_left = left / 86_400,
            "QUIC certificate expires soon");
    }
}

/// Checks between two warnings about the certificate in use ending soon: daily.
const EXPIRY_CHECK_EVERY: u32 = (86_400 / RELOAD_EVERY.as_secs()) as u32;

/// Check `current`'s files every [`RELOAD_EVERY`] until it is dropped, and daily whether the
/// certificate in use ends soon (a renewal that silently stopped).
fn keep_current(current: Weak<CurrentKey>) {
    let spawned = std::thread::Builder::new()
        .name("quic-cert-reload".into())
        .spawn(move || {
            for round in 1u32.. {
                std::thread::sleep(RELOAD_EVERY);
                let Some(current) = current.upgrade() else {
                    return;
                };
                if round % EXPIRY_CHECK_EVERY == 0 {
                    current.check_expiry();
                }
                match current.reload_if_changed() {
                    Ok(true) => tracing::info!(file = %current.paths.cert.display(),
                    "QUIC certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e,
                    "QUIC certificate not reloaded; the previous one stays in use"),
                }
                match current.reload_revocations() {
                    Ok(true) => tracing::info!(
                        revoked = current.trust.revoked(),
                        "QUIC certificate revocation list reloaded"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e,
                    "QUIC revocation list not reloaded; the previous one stays in use"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "QUIC certificates will not be reloaded");
    }
}

/// The certificates of the PEM file at `path`; `missing` says what is wrong when it holds
/// none.
fn certificates(path: &Path, missing: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, missing));
    }
    Ok(certs)
}

pub(super) fn pem_error(path: &Path, what: impl ToString) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a node accepting connections receives: only requests, each one frame (bodies go the
/// other way). Windows sized to that keep a peer that opens many streams and sends more than
/// a frame on each without finishing from holding quinn's default buffers (1.25 MB a stream,
/// no bound a connection) on this node.
fn accepting_transport() -> Arc<quinn::TransportConfig> {
    const SLACK: u32 = 64 * 1024;
    let mut t = transport_config();
    t.stream_receive_window((super::protocol::MAX_FRAME as u32 + SLACK).into());
    t.receive_window((8u32 << 20).into());
    Arc::new(t)
}

/// What a node dialling receives: replies, peer bodies among them, in quinn's default windows,
/// and never a stream the other side opens (nothing here accepts one: a node that opened them
/// anyway would hold up to quinn's default window of this node's memory on each).
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = transport_config();
    t.max_concurrent_bidi_streams(0u32.into());
    Arc::new(t)
}

/// Keep-alives detect a dead peer quickly; the stream limit is the backpressure on a peer
/// that sends faster than this node handles.
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_concurrent_bidi_streams(64u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

impl NodeIdentity {
    /// Read the three PEM files.
    pub fn load(p: &TlsPaths) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in certificates(&p.ca_cert, "no CA certificate in the file")? {
            roots.add(ca)?;
        }
        // Stamped before reading: a renewal written meanwhile reads as a change at the next
        // check.
        let stamp = stamp_of(p);
        let (certified, key) = certified_key(p)?;
        let trust = Trust::load(roots, p.crl.as_deref(), &certified.cert)?;
        let current = Arc::new(CurrentKey {
            paths: p.clone(),
            trust: trust.clone(),
            key: parking_lot::RwLock::new(certified),
            stamp: parking_lot::Mutex::new(stamp),
        });
        keep_current(Arc::downgrade(&current));
        Ok(NodeIdentity {
            trust,
            key,
            current,
        })
    }

    /// What this node trusts; connections are handed to it to be cut if their peer's
    /// certificate is revoked later.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Read this node's certificate and key again if their files changed (as the
    /// background check does every 30 s); whether the pair in use was replaced.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.current.reload_if_changed()
    }

    /// Read the revocation list again if its file changed (as the background check does
    /// every 30 s); whether the list in use was replaced. Open connections to peers it now
    /// revokes are closed at their next use ([`super::trust::Checked`]).
    pub fn reload_revocations(&self) -> Result<bool, TlsError> {
        self.current.reload_revocations()
    }

    /// Keep the revocation list's CRL number in the state file `state` from now on, and fail
    /// if the list read at load is older than the number kept there by an earlier run (a
    /// restart must not accept a list the running node refused). Call right after
    /// [`NodeIdentity::load`]; without a list it does nothing.
    pub fn remember_list_number(&self, state: &Path) -> Result<(), TlsError> {
        self.trust.remember_number(state)
    }

    /// What [`NodeIdentity::remember_list_number`] would refuse, without keeping anything:
    /// for a check before a start (`--preflight`), which must not write a running node's state.
    pub fn check_list_number(&self, state: &Path) -> Result<(), TlsError> {
        self.trust.check_number(state).map(drop)
    }

    /// Server side: TLS 1.3, client certificate from the cluster CA required (and not
    /// revoked).
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(self.trust.clone()))
            .with_cert_resolver(self.current.clone());
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // A resumed session skips the certificate check, revocation included: every
        // handshake is a full one (connections are long-lived; reconnects are rare).
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(accepting_transport());
        Ok(cfg)
    }

    /// Endpoint settings keyed by this node's private key. Connection ids and stateless-reset
    /// tokens then survive a restart: a restarted node answers its predecessor's connections
    /// with a reset the peer can verify (RFC 9000 §10.3), so the peer drops the dead connection
    /// at once instead of timing out requests on it until the idle timeout.
    pub fn endpoint_config(&self) -> quinn::EndpointConfig {
        let secret = hmac::Key::new(hmac::HMAC_SHA256, self.key.secret_der());
        let reset = hmac::sign(&secret, b"shadowcdn/1 stateless reset");
        let ids = hmac::sign(&secret, b"shadowcdn/1 connection ids");
        let mut id_key = [0u8; 8];
        id_key.copy_from_slice(&ids.as_ref()[..8]);
        let id_key = u64::from_le_bytes(id_key);
        let mut cfg =
            quinn::EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
        cfg.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(id_key))
        });
        cfg
    }

    /// Client side: presents this node's certificate, trusts only the cluster CA (and what
    /// its revocation list does not name).
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self.trust.clone()))
            .with_client_cert_resolver(self.current.clone());
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.resumption = rustls::client::Resumption::disabled();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport());
        Ok(cfg)
    }
}

/// The names a node gives its identity's gauges (`shadowcdn_edge_…`, `shadowcdn_broker_…`).
#[derive(Debug, Clone, Copy)]
pub struct IdentityMetricNames {
    /// The end of the certificate in use.
    pub expiry: &'static str,
    /// Entries of the revocation list in use.
    pub revoked: &'static str,
    /// Whether the list's file is refused.
    pub list_refused: &'static str,
}

/// The identity's state as gauges, set at each scrape: when the certificate in use ends
/// (a renewal that stopped alerts days before handshakes fail) and what the revocation list
/// names.
struct IdentityCollector {
    current: Arc<CurrentKey>,
    expiry: prometheus::IntGauge,
    revoked: prometheus::IntGauge,
    refused: prometheus::IntGauge,
}

impl prometheus::core::Collector for IdentityCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.expiry.desc();
        d.extend(self.revoked.desc());
        d.extend(self.refused.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let leaf = self.current.key.read().cert.first().cloned();
        self.revoked
            .set(i64::try_from(self.current.trust.revoked()).unwrap_or(i64::MAX));
        self.refused
            .set(i64::from(self.current.trust.list_refused()));
        let mut m = self.revoked.collect();
        m.extend(self.refused.collect());
        // An end that cannot be read is left out, not exported as 0 (an alert would fire).
        if let Some(end) = leaf.as_ref().and_then(|c| not_after(c)) {
            self.expiry.set(end);
            m.extend(self.expiry.collect());
        }
        m
    }
}

/// The end of `cert`'s validity (Unix seconds).
pub(super) fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

impl NodeIdentity {
    /// Export gauges named `names.expiry` (the end of the certificate in use, Unix
    /// seconds), `names.revoked` (entries of the revocation list in use) and
    /// `names.list_refused` (1 while the list's file is refused and an older one enforced) to
    /// `registry`, read at each scrape.
    pub fn register_metrics(
        &self,
        registry: &prometheus::Registry,
        names: IdentityMetricNames,
    ) -> prometheus::Result<()> {
        registry.register(Box::new(IdentityCollector {
            current: self.current.clone(),
            expiry: prometheus::IntGauge::new(
                names.expiry,
                "End of validity of the QUIC certificate in use (Unix seconds)",
            )?,
            revoked: prometheus::IntGauge::new(
                names.revoked,
                "Certificates the QUIC revocation list in use names",
            )?,
            refused: prometheus::IntGauge::new(
                names.list_refused,
                "1 while the QUIC revocation list's file is refused (an older list is enforced)",
            )?,
        }))
    }
}

/// Whether the authenticated peer of `conn` holds a certificate valid for `name`. The chain
/// was verified against the cluster CA during the handshake; this reads its role.
pub fn peer_is(conn: &quinn::Connection, name: &str) -> bool {
    let Some(identity) = conn.peer_identity() else {
        return false;
    };
    let Ok(certs) = identity.downcast::<Vec<CertificateDer<'static>>>() else {
        return false;
    };
    let (Some(leaf), Ok(name)) = (certs.first(), ServerName::try_from(name)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .and_then(|c| c.verify_is_valid_for_subject_name(&name))
        .is_ok()
}
