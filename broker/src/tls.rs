//! HTTPS for clients: the certificates the broker presents, chosen per connection by the name
//! the client asks for (SNI).
//!
//! One listener serves every provider's domains, so each configured certificate is offered for
//! the names it is valid for — its subject alternative names, wildcards included, matched by
//! webpki the way a client checks them; no list of names to keep in step with the files. The
//! first certificate is the default, for a client that sends no name or one nothing covers.
//! Renewed files are picked up while running ([`CertReloader`]); a renewal that cannot be loaded
//! keeps the certificates in use.

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
    keys: RwLock<Arc<Vec<Arc<CertifiedKey>>>>,
    /// Modification time and length of every file, as last loaded (or tried).
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl SniResolver {
    /// Load every certificate of `section`; any unusable file is an error naming it.
    pub fn load(section: &TlsSection) -> Result<Self, CertError> {
        let stamps = stamps(section);
        Ok(SniResolver {
            keys: RwLock::new(Arc::new(load_keys(section)?)),
            section: section.clone(),
            stamps: Mutex::new(stamps),
        })
    }

    /// Load the files again if any changed since the last look; whether new certificates
    /// are in use. A set that fails to load leaves the current one serving.
    pub fn reload_if_changed(&self) -> Result<bool, CertError> {
        let now = stamps(&self.section);
        {
            let mut seen = self.stamps.lock();
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let keys = load_keys(&self.section)?;
        *self.keys.write() = Arc::new(keys);
        Ok(true)
    }

    /// The certificate for server name `name`.
    fn for_name(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let keys = self.keys.read().clone();
        let covering = name
            .and_then(|n| ServerName::try_from(n.to_string()).ok())
            .and_then(|name| {
                keys.iter().find(|k| {
                    k.cert.first().is_some_and(|c| {
                        webpki::EndEntityCert::try_from(c)
                            .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
                    })
                })
            });
        covering.or(keys.first()).cloned()
    }
}

fn stamps(section: &TlsSection) -> Vec<Option<(SystemTime, u64)>> {
    section
        .certs
        .iter()
        .flat_map(|f| [&f.cert, &f.key])
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn load_keys(section: &TlsSection) -> Result<Vec<Arc<CertifiedKey>>, CertError> {
    let provider = rustls::crypto::ring::default_provider();
    let keys = section
        .certs
        .iter()
        .enumerate()
        .map(|(index, files)| {
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
            let key = PrivateKeyDer::from_pem_file(&files.key)
                .map_err(|e| fail(&files.key, e.to_string()))?;
            CertifiedKey::from_der(chain, key, &provider)
                .map(Arc::new)
                .map_err(|e| fail(&files.key, format!("does not fit the certificate: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(keys)
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.for_name(hello.server_name())
    }
}

/// Background service: looks for renewed certificate files every 30 s.
pub struct CertReloader(pub Arc<SniResolver>);

#[async_trait]
impl BackgroundService for CertReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tick.tick() => match self.0.reload_if_changed() {
                    Ok(true) => tracing::info!("HTTPS certificates reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "HTTPS certificates not reloaded; the previous ones stay in use"),
                },
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
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let files = CertFiles {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
        };
        std::fs::write(&files.cert, cert.pem() + &ca_cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    fn section(certs: Vec<CertFiles>) -> TlsSection {
        TlsSection {
            listen: "127.0.0.1:0".parse().unwrap(),
            certs,
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
        let r = SniResolver::load(&section(vec![files.clone()])).unwrap();
        assert!(!r.reload_if_changed().unwrap());
        let serving = |name| r.for_name(Some(name)).unwrap().cert[0].clone();
        let old = serving("old.test");

        // Renewed (for another name, so the test can tell): taken at the next look.
        let renewed = issue(dir.path(), "renewed", &["new.test", "old.test"]);
        std::fs::copy(&renewed.cert, &files.cert).unwrap();
        std::fs::copy(&renewed.key, &files.key).unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        for f in [&files.cert, &files.key] {
            let file = std::fs::File::options().write(true).open(f).unwrap();
            file.set_modified(later).unwrap();
        }
        assert!(r.reload_if_changed().unwrap());
        let new = serving("new.test");
        assert_ne!(new, old);
        assert_eq!(serving("old.test"), new);

        // A half-written renewal fails to load and the certificates in use stay.
        std::fs::write(&files.key, "garbage").unwrap();
        assert!(r.reload_if_changed().is_err());
        assert_eq!(serving("new.test"), new);
    }
}
