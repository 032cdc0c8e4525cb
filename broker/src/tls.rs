//! HTTPS for clients: the certificates the broker presents, chosen per connection by the name
//! the client asks for (SNI).
//!
//! One listener serves every provider's domains, so each configured certificate is offered for
//! the names it is valid for — its subject alternative names, wildcards included, matched by
//! webpki the way a client checks them; no list of names to keep in step with the files. The
//! first certificate is the default, for a client that sends no name or one nothing covers.
//! Renewed files are picked up while running ([`CertReloader`]); a renewal that cannot be loaded
//! keeps the certificates in use.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

/// `[tls]`: an HTTPS listener for clients, beside the plain HTTP one.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Address of the HTTPS listener (HTTP/2 and HTTP/1.1 by ALPN).
    pub listen: SocketAddr,
    /// Certificate chains and keys (PEM files); the first is the default.
    pub certs: Vec<CertFiles>,
    /// Seconds an HTTP/2 connection may stay idle before it is closed (default 120).
    #[serde(default = "default_h2_idle")]
    pub h2_idle_timeout_secs: u64,
}

fn default_h2_idle() -> u64 {
    120
}

/// One certificate chain and its private key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    /// PEM file: the certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file is unreadable, holds no usable PEM, or the key does not fit the certificate.
    #[error("tls.certs[{index}]: {path}: {message}")]
    Load {
        /// Position in `tls.certs`.
        index: usize,
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// Picks the certificate for each handshake by the client's server name.
#[derive(Debug)]
pub struct SniResolver {
    section: TlsSection,
    /// One per `tls.certs` entry, in order.
    keys: RwLock<Arc<Vec<Arc<CertifiedKey>>>>,
    /// Per entry, the (modification time, length) of its two files when last loaded.
    stamps: Mutex<Vec<Stamp>>,
    /// Which entry serves a name, remembered per name (bounded; cleared on every reload):
    /// matching parses each certificate, which would otherwise cost every handshake
    /// O(certificates) parses.
    chosen: Mutex<HashMap<String, usize>>,
}

/// (modification time, length) of a cert file and its key file.
type Stamp = [Option<(SystemTime, u64)>; 2];

/// Names remembered in [`SniResolver::chosen`]; past it the memory starts over.
const MAX_CHOSEN: usize = 10_000;

impl SniResolver {
    /// Load every certificate of `section`; any unusable file is an error naming it.
    pub fn load(section: &TlsSection) -> Result<Self, CertError> {
        let provider = rustls::crypto::ring::default_provider();
        // Stamped before reading: a renewal written meanwhile is seen as a change later.
        let stamps = section.certs.iter().map(stamp).collect();
        let keys = (0..section.certs.len())
            .map(|i| load_entry(section, i, &provider))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SniResolver {
            keys: RwLock::new(Arc::new(keys)),
            stamps: Mutex::new(stamps),
            section: section.clone(),
            chosen: Mutex::default(),
        })
    }

    /// Load again every entry whose files changed since it was last loaded; how many were
    /// replaced, and the errors of those that could not be (they keep serving their previous
    /// certificate and are tried again at the next call).
    pub fn reload_if_changed(&self) -> (usize, Vec<CertError>) {
        let provider = rustls::crypto::ring::default_provider();
        let mut stamps = self.stamps.lock();
        let mut keys = self.keys.read().as_ref().clone();
        let (mut replaced, mut errors) = (0, Vec::new());
        for (i, files) in self.section.certs.iter().enumerate() {
            let now = stamp(files);
            if now == stamps[i] {
                continue;
            }
            match load_entry(&self.section, i, &provider) {
                Ok(k) => {
                    keys[i] = k;
                    stamps[i] = now;
                    replaced += 1;
                }
                Err(e) => errors.push(e),
            }
        }
        if replaced > 0 {
            *self.keys.write() = Arc::new(keys);
            self.chosen.lock().clear();
        }
        (replaced, errors)
    }

    /// Per `tls.certs` entry: its file and when the certificate in use stops being valid
    /// (Unix seconds; `None` if its validity cannot be read).
    pub fn expiries(&self) -> Vec<(&Path, Option<i64>)> {
        let keys = self.keys.read().clone();
        self.section
            .certs
            .iter()
            .zip(keys.iter())
            .map(|(files, k)| (files.cert.as_path(), k.cert.first().and_then(not_after)))
            .collect()
    }

    /// The certificate for server name `name`.
    fn for_name(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let keys = self.keys.read().clone();
        let Some(name) = name else {
            return keys.first().cloned();
        };
        let name = name.to_ascii_lowercase();
        let known = self.chosen.lock().get(&name).copied();
        let index = known.unwrap_or_else(|| {
            let i = covering(&keys, &name).unwrap_or(0);
            let mut chosen = self.chosen.lock();
            // A reload since `keys` was read cleared the memory; an answer about the old
            // certificates must not enter the new one.
            if Arc::ptr_eq(&keys, &self.keys.read()) {
                if chosen.len() >= MAX_CHOSEN {
                    chosen.clear();
                }
                chosen.insert(name, i);
            }
            i
        });
        keys.get(index).or(keys.first()).cloned()
    }
}

/// The first of `keys` whose certificate is valid for `name`.
fn covering(keys: &[Arc<CertifiedKey>], name: &str) -> Option<usize> {
    let name = ServerName::try_from(name.to_string()).ok()?;
    keys.iter().position(|k| {
        k.cert.first().is_some_and(|c| {
            webpki::EndEntityCert::try_from(c)
                .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
        })
    })
}

/// End of the validity of `cert` in Unix seconds.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

fn stamp(files: &CertFiles) -> Stamp {
    [&files.cert, &files.key].map(|p| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    })
}

/// Load entry `index` of `section.certs`.
fn load_entry(
    section: &TlsSection,
    index: usize,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, CertError> {
    let files = &section.certs[index];
    let fail = |path: &Path, message: String| CertError::Load {
        index,
        path: path.to_path_buf(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| fail(&files.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(fail(&files.cert, "no certificate in the file".into()));
    }
    webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| fail(&files.cert, format!("unusable certificate: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| fail(&files.key, e.to_string()))?;
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(|e| fail(&files.key, format!("does not fit the certificate: {e}")))
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.for_name(hello.server_name())
    }
}

/// Background service: looks for renewed certificate files every 30 s (a failed entry is
/// retried, and logged, every time) and publishes when each certificate in use expires.
pub struct CertReloader {
    resolver: Arc<SniResolver>,
    expiry: prometheus::IntGaugeVec,
}

/// A certificate this close to its end is warned about when it is loaded.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

impl CertReloader {
    /// Reload `resolver`'s files; expiry times go to `expiry` (labelled by certificate file).
    pub fn new(resolver: Arc<SniResolver>, expiry: prometheus::IntGaugeVec) -> Self {
        CertReloader { resolver, expiry }
    }

    /// Set the expiry gauges, warning about certificates that end within two weeks: a renewal
    /// that keeps failing (or was never set up) is found before clients see the error.
    fn publish(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for (file, end) in self.resolver.expiries() {
            let label = file.display().to_string();
            let Some(end) = end else {
                tracing::warn!(file = %label, "HTTPS certificate validity unreadable");
                continue;
            };
            self.expiry.with_label_values(&[&label]).set(end);
            let left = end - now;
            if left <= 0 {
                tracing::error!(file = %label, "HTTPS certificate has expired");
            } else if left < EXPIRY_WARNING.as_secs() as i64 {
                tracing::warn!(file = %label, days_left = left / 86_400, "HTTPS certificate expires soon");
            }
        }
    }
}

#[async_trait]
impl BackgroundService for CertReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.publish();
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let (replaced, errors) = self.resolver.reload_if_changed();
                    if replaced > 0 {
                        tracing::info!(replaced, "HTTPS certificates reloaded");
                        self.publish();
                    }
                    for e in errors {
                        tracing::error!(error = %e, "HTTPS certificate not reloaded; the previous one stays in use");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `names` from a throwaway CA, written to `dir`.
    fn issue(dir: &Path, file: &str, names: &[&str]) -> CertFiles {
        issue_until(dir, file, names, None)
    }

    /// [`issue`], valid until `not_after` if given (else rcgen's far-off default).
    fn issue_until(
        dir: &Path,
        file: &str,
        names: &[&str],
        not_after: Option<(i32, u8, u8)>,
    ) -> CertFiles {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some((y, m, d)) = not_after {
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let cert = params.signed_by(&key, &issuer).unwrap();
        let files = CertFiles {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
        };
        std::fs::write(&files.cert, cert.pem() + &ca_cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    /// Move the files' modification time `secs` into the future (a renewal the stamp sees
    /// whatever the file system's time resolution).
    fn touch(files: &[&Path], secs: u64) {
        let later = SystemTime::now() + Duration::from_secs(secs);
        for f in files {
            let file = std::fs::File::options().write(true).open(f).unwrap();
            file.set_modified(later).unwrap();
        }
    }

    fn section(certs: Vec<CertFiles>) -> TlsSection {
        TlsSection {
            listen: "127.0.0.1:0".parse().unwrap(),
            certs,
            h2_idle_timeout_secs: 120,
        }
    }

    #[test]
    fn each_name_gets_the_certificate_valid_for_it_else_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let default = issue(dir.path(), "default", &["www.example.test"]);
        let images = issue(dir.path(), "images", &["*.img.test", "img.test"]);
        let r = SniResolver::load(&section(vec![default, images])).unwrap();
        let first = |name: Option<&str>| r.for_name(name).unwrap().cert[0].clone();
        let keys = r.keys.read().clone();
        let (d, i) = (keys[0].cert[0].clone(), keys[1].cert[0].clone());
        assert_eq!(first(Some("www.example.test")), d);
        assert_eq!(first(Some("a.img.test")), i);
        assert_eq!(first(Some("IMG.test")), i);
        assert_eq!(
            first(Some("a.b.img.test")),
            d,
            "a wildcard covers one label"
        );
        assert_eq!(first(Some("elsewhere.test")), d);
        assert_eq!(first(None), d);
    }

    #[test]
    fn each_certificate_in_use_publishes_when_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let soon = issue_until(dir.path(), "soon", &["a.test"], Some((2031, 5, 17)));
        let later = issue_until(dir.path(), "later", &["b.test"], Some((2032, 1, 1)));
        let r = Arc::new(SniResolver::load(&section(vec![soon.clone(), later.clone()])).unwrap());
        let gauge =
            prometheus::IntGaugeVec::new(prometheus::Opts::new("t", "t"), &["file"]).unwrap();
        CertReloader::new(r.clone(), gauge.clone()).publish();
        let at = |f: &CertFiles| {
            gauge
                .with_label_values(&[&f.cert.display().to_string()])
                .get()
        };
        assert_eq!(at(&soon), 1_936_742_400, "2031-05-17T00:00:00Z");
        assert_eq!(at(&later), 1_956_528_000, "2032-01-01T00:00:00Z");
        // A renewal moves it.
        issue_until(dir.path(), "soon", &["a.test"], Some((2032, 1, 1)));
        touch(&[&soon.cert, &soon.key], 5);
        assert_eq!(r.reload_if_changed().0, 1);
        CertReloader::new(r, gauge.clone()).publish();
        assert_eq!(at(&soon), 1_956_528_000);
    }

    #[test]
    fn unusable_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let good = issue(dir.path(), "good", &["a.test"]);
        let other = issue(dir.path(), "other", &["b.test"]);
        let swapped = CertFiles {
            cert: good.cert.clone(),
            key: other.key.clone(),
        };
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        for (files, index, path, says) in [
            (swapped, 1, other.key.clone(), "does not fit"),
            (
                CertFiles {
                    cert: empty.clone(),
                    key: good.key.clone(),
                },
                1,
                empty.clone(),
                "no certificate",
            ),
            (
                CertFiles {
                    cert: dir.path().join("missing.pem"),
                    key: good.key.clone(),
                },
                1,
                dir.path().join("missing.pem"),
                "",
            ),
        ] {
            let e = SniResolver::load(&section(vec![good.clone(), files]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("tls.certs[{index}]"))
                    && e.contains(&path.display().to_string())
                    && e.contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn renewed_files_replace_the_certificates_and_broken_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let files = issue(dir.path(), "site", &["old.test"]);
        let other = issue(dir.path(), "other", &["other.test"]);
        let r = SniResolver::load(&section(vec![files.clone(), other.clone()])).unwrap();
        assert_eq!(r.reload_if_changed().0, 0);
        let serving = |name| r.for_name(Some(name)).unwrap().cert[0].clone();
        let old = serving("old.test");

        // Renewed (for another name, so the test can tell): taken at the next look.
        let renewed = issue(dir.path(), "renewed", &["new.test", "old.test"]);
        std::fs::copy(&renewed.cert, &files.cert).unwrap();
        std::fs::copy(&renewed.key, &files.key).unwrap();
        touch(&[&files.cert, &files.key], 5);
        assert_eq!(serving("old.test"), old, "a name's choice is remembered...");
        assert_eq!(r.reload_if_changed().0, 1);
        let new = serving("new.test");
        assert_ne!(new, old);
        assert_eq!(serving("old.test"), new, "...until a reload");

        // A half-written renewal of one entry fails to load: it keeps serving its previous
        // certificate, is tried again at every look, and the other entry still renews.
        std::fs::write(&files.key, "garbage").unwrap();
        let renewed_other = issue(dir.path(), "renewed-other", &["other.test"]);
        std::fs::copy(&renewed_other.cert, &other.cert).unwrap();
        std::fs::copy(&renewed_other.key, &other.key).unwrap();
        touch(&[&other.cert, &other.key], 10);
        let was_other = serving("other.test");
        let (replaced, errors) = r.reload_if_changed();
        assert_eq!((replaced, errors.len()), (1, 1));
        assert!(
            errors[0].to_string().contains("tls.certs[0]"),
            "{}",
            errors[0]
        );
        assert_eq!(serving("new.test"), new);
        assert_ne!(serving("other.test"), was_other);
        assert_eq!(r.reload_if_changed().1.len(), 1, "retried until fixed");
        std::fs::copy(&renewed.key, &files.key).unwrap();
        let (replaced, errors) = r.reload_if_changed();
        assert_eq!((replaced, errors.len()), (1, 0));
    }
}
