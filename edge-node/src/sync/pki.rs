//! Cluster certificates: a CA and the node certificates it issues, for the local cluster and
//! tests (`edge-node certs`). Production clusters may use their own PKI instead: nodes only
//! need PEM files whose names follow [`super::tls`].

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::tls::{edge_name, TlsPaths, BROKER_NAME};

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating or signing failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What a node certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    /// The broker: may send control messages.
    Broker,
    /// An edge: serves and asks for peer fills.
    Edge,
}

fn write(path: &Path, contents: &str) -> Result<(), PkiError> {
    std::fs::write(path, contents).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Write a private key readable by its owner only (whoever reads `ca.key` can mint a broker
/// certificate), created so from the start rather than narrowed after.
fn write_key(path: &Path, pem: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A key left from an earlier run keeps its mode on open: narrow it before writing.
    if path.exists() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .map_err(io)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Create `ca.pem` and `ca.key` in `dir`.
pub fn create_ca(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "shadowcdn cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    write(&dir.join("ca.pem"), &cert.pem())?;
    write_key(&dir.join("ca.key"), &key.serialize_pem())
}

/// Issue a certificate for node `name` with `role` from the CA in `ca_dir`; writes
/// `<name>.pem` and `<name>.key` to `out` and returns the paths a node config needs.
pub fn issue(ca_dir: &Path, name: &str, role: NodeRole, out: &Path) -> Result<TlsPaths, PkiError> {
    let ca_cert = ca_dir.join("ca.pem");
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert)?, ca_key)?;
    let dns = match role {
        NodeRole::Broker => BROKER_NAME.to_string(),
        NodeRole::Edge => edge_name(name),
    };
    let mut params = CertificateParams::new(vec![dns])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(|source| PkiError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let paths = TlsPaths {
        ca_cert,
        cert: out.join(format!("{name}.pem")),
        key: out.join(format!("{name}.key")),
    };
    write(&paths.cert, &cert.pem())?;
    write_key(&paths.key, &key.serialize_pem())?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_keys_are_readable_by_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
        let stale = dir.path().join("edge-1.key");
        std::fs::write(&stale, "old").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        let paths = issue(dir.path(), "edge-1", NodeRole::Edge, dir.path()).unwrap();
        assert_eq!(mode(&paths.key), 0o600, "an earlier key's mode is narrowed");
        assert!(std::fs::read_to_string(&paths.key)
            .unwrap()
            .contains("PRIVATE KEY"));
    }
}
