//! Cluster certificates: a CA, the node certificates it issues and its revocation list
//! (`edge-node certs`). Production clusters may use their own PKI instead: nodes only need
//! PEM files whose names follow [`super::tls`], and a CRL of the CA if nodes are to be
//! revoked before their certificates end.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use time::{Duration, OffsetDateTime};

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
    /// A file holds no usable certificate or revocation list.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The certificate (or list) was issued by another CA than the one in the CA directory.
    #[error("{0}: not issued by this CA")]
    OtherCa(PathBuf),
    /// A node name that is no node id: it names the certificate's DNS name and its files.
    #[error("{0:?} is not a node name: 1 to 63 letters, digits, '-' or '_' (and not \"origin\" or \"none\", nor \"broker\" for an edge)")]
    BadName(String),
    /// A node named `ca` issued into the CA's own directory: its files would be the CA's.
    #[error("{0}: a node named \"ca\" would replace the CA's certificate and key; issue it into another directory (--out)")]
    CaFiles(PathBuf),
    /// The CA has no revocation list to add to.
    #[error("{0}: no revocation list (`certs ca` makes one with the CA; restore a lost one from a backup, or start an empty one with `certs revoke --init`, which lifts every revocation the lost one held)")]
    NoList(PathBuf),
    /// `--init` where a list exists.
    #[error("{0}: a revocation list exists already; add to it instead")]
    ListExists(PathBuf),
    /// `certs ca` where a CA is.
    #[error("{0} exists: a CA is here already; replacing it would leave the certificates it issued beyond revocation while nodes trust it (make a new CA in another directory; remove the old files first only if nothing trusts that CA)")]
    CaExists(PathBuf),
    /// Another run holds the list's lock.
    #[error("{0} is locked: another `edge-node certs` run is writing the list; try again when it is done")]
    Busy(PathBuf),
}

/// Validity of a node certificate unless told otherwise: a year. A renewal is another
/// `certs issue` into the same files; nodes pick it up within 30 s.
pub const NODE_DAYS: u32 = 365;
/// Validity of the cluster CA unless told otherwise: ten years.
pub const CA_DAYS: u32 = 3650;
/// The revocation list's file in the CA directory.
pub const CRL_FILE: &str = "ca.crl";
/// How long a revocation list says it holds before the next one. Nodes keep using a list past
/// it (a missed refresh must not lift every revocation); it tells other verifiers.
const CRL_DAYS: i64 = 365;

/// Valid from a few minutes ago (a peer whose clock lags this one's still accepts it) for
/// `days`.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days.into());
}

/// What a node certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    /// The broker: may send control messages.
    Broker,
    /// An edge: serves and asks for peer fills.
    Edge,
}

/// Write a certificate, replacing the file whole (a node reloading it reads the old or the
/// new one, never half of one).
fn write(path: &Path, contents: &str) -> Result<(), PkiError> {
    replace(path, contents.as_bytes(), 0o644)
}

/// Write a private key readable by its owner only (whoever reads `ca.key` can mint a broker
/// certificate), created so from the start rather than narrowed after.
fn write_key(path: &Path, pem: &str) -> Result<(), PkiError> {
    replace(path, pem.as_bytes(), 0o600)
}

/// Replace `path` with `contents` whole, created with `mode` ([`crate::durable::replace`]:
/// a crash leaves the old file or the new one; as an installed file, its owner is kept and a
/// symbolic link's target replaced; a killed run's temporaries are removed).
fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let how = crate::durable::Replacing {
        mode: Some(mode),
        installed: true,
    };
    crate::durable::replace(path, contents, how).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Create `ca.pem`, `ca.key` and an empty revocation list `ca.crl` in `dir`, the CA valid
/// for [`CA_DAYS`].
pub fn create_ca(dir: &Path) -> Result<(), PkiError> {
    create_ca_valid_for(dir, CA_DAYS)
}

/// Create `ca.pem`, `ca.key` and an empty revocation list `ca.crl` in `dir`, the CA valid
/// for `days`.
pub fn create_ca_valid_for(dir: &Path, days: u32) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    // A name of its own: verifiers find a CA's revocation list by the CA's name, so two CAs
    // trusted at once (a CA rotation) must not share one.
    let id = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    let id: String = id.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("shadowcdn cluster CA {id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    // Locked before the CA files change: a revoke under way reads the CA it started with,
    // and of two `certs ca` runs at once one finds the other's CA.
    let lock = ListLock::take(dir)?;
    // Replacing a CA in place would leave what it issued beyond revocation (its list is
    // gone, and `revoke` takes only the new CA's certificates) while nodes still trust it.
    if let Some(f) = ["ca.pem", "ca.key"]
        .map(|f| dir.join(f))
        .into_iter()
        .find(|f| f.exists())
    {
        return Err(PkiError::CaExists(f));
    }
    write(&dir.join("ca.pem"), &cert.pem())?;
    write_key(&dir.join("ca.key"), &key.serialize_pem())?;
    // A list left beside removed CA files is another CA's: the new CA starts its own.
    let crl = dir.join(CRL_FILE);
    if crl.exists() {
        std::fs::remove_file(&crl).map_err(|source| PkiError::Io { path: crl, source })?;
    }
    sign_list(dir, &[], lock).map(|_| ())
}

/// Issue a certificate valid for [`NODE_DAYS`] for node `name` with `role` from the CA in
/// `ca_dir` (see [`issue_valid_for`]).
pub fn issue(ca_dir: &Path, name: &str, role: NodeRole, out: &Path) -> Result<TlsPaths, PkiError> {
    issue_valid_for(ca_dir, name, role, out, NODE_DAYS)
}

/// Issue a certificate valid for `days` for node `name` with `role` from the CA in `ca_dir`;
/// writes `<name>.pem` and `<name>.key` to `out` and returns the paths a node config needs
/// (with the CA's revocation list when it has one).
pub fn issue_valid_for(
    ca_dir: &Path,
    name: &str,
    role: NodeRole,
    out: &Path,
    days: u32,
) -> Result<TlsPaths, PkiError> {
    // An edge's name becomes its certificate's DNS name (`*` would make a wildcard that
    // passes for every edge) and, for any node, its files' names (a `/` would write them
    // elsewhere).
    let named = match role {
        NodeRole::Edge => crate::config::valid_node_id(name),
        NodeRole::Broker => crate::config::valid_node_id(name) || name == "broker",
    };
    if !named {
        return Err(PkiError::BadName(name.to_string()));
    }
    let same_dir = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if name.eq_ignore_ascii_case("ca") && same_dir(out, ca_dir) {
        return Err(PkiError::CaFiles(ca_dir.join("ca.pem")));
    }
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
    set_validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(|source| PkiError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let crl = ca_dir.join(CRL_FILE);
    let paths = TlsPaths {
        ca_cert,
        cert: out.join(format!("{name}.pem")),
        key: out.join(format!("{name}.key")),
        crl: crl.exists().then_some(crl),
    };
    write(&paths.cert, &cert.pem())?;
    write_key(&paths.key, &key.serialize_pem())?;
    Ok(paths)
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Certificates added to the list now (one already listed is not added twice).
    pub added: usize,
    /// Certificates the list names.
    pub listed: usize,
    /// The list's file.
    pub path: PathBuf,
}

fn pem_error(path: &Path, what: impl ToString) -> PkiError {
    PkiError::Pem {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

/// Add the certificates in the PEM files `certs` (issued by the CA in `ca_dir`) to the CA's
/// revocation list `ca_dir/ca.crl` and sign it again with a higher CRL number (nodes refuse
/// a list older than theirs). With no certificates the list is signed again as it is. The
/// list must exist — [`create_ca`] makes it, [`init_revocations`] for a CA made before lists
/// were — so that a lost list is noticed instead of silently started again empty. The file is
/// replaced whole (written beside it, synced, then renamed), so a node never reads half a
/// list, and two runs at once cannot lose each other's revocations: the second is refused.
pub fn revoke(ca_dir: &Path, certs: &[PathBuf]) -> Result<Revoked, PkiError> {
    let lock = ListLock::take(ca_dir)?;
    let path = ca_dir.join(CRL_FILE);
    if !path.exists() {
        return Err(PkiError::NoList(path));
    }
    sign_list(ca_dir, certs, lock)
}

/// Start an empty revocation list for the CA in `ca_dir`, which must have none (a lost list
/// is better restored from a backup: a new one lifts every revocation the old one held).
pub fn init_revocations(ca_dir: &Path) -> Result<Revoked, PkiError> {
    let lock = ListLock::take(ca_dir)?;
    let path = ca_dir.join(CRL_FILE);
    if path.exists() {
        return Err(PkiError::ListExists(path));
    }
    sign_list(ca_dir, &[], lock)
}

/// The CA in `ca_dir`: its certificate (PEM) and signing key.
fn read_ca(ca_dir: &Path) -> Result<(String, Issuer<'static, KeyPair>), PkiError> {
    let ca_pem = read(&ca_dir.join("ca.pem"))?;
    let key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)?;
    Ok((ca_pem, issuer))
}

/// Write `ca.crl` in `ca_dir`, holding `lock`: the entries of the list there (if any) plus
/// `certs`.
fn sign_list(ca_dir: &Path, certs: &[PathBuf], lock: ListLock) -> Result<Revoked, PkiError> {
    let ca_path = ca_dir.join("ca.pem");
    let (ca_pem, issuer) = read_ca(ca_dir)?;
    let ca_der =
        CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| pem_error(&ca_path, e))?;
    let (_, ca) =
        x509_parser::parse_x509_certificate(&ca_der).map_err(|e| pem_error(&ca_path, e))?;
    let ca_key = ca.public_key();
    let now = OffsetDateTime::now_utc();

    let path = ca_dir.join(CRL_FILE);
    let mut listed: Vec<RevokedCertParams> = Vec::new();
    let mut number = 0u64;
    if path.exists() {
        let der =
            CertificateRevocationListDer::from_pem_file(&path).map_err(|e| pem_error(&path, e))?;
        let (_, old) = x509_parser::parse_x509_crl(&der).map_err(|e| pem_error(&path, e))?;
        if old.verify_signature(ca_key).is_err() {
            return Err(PkiError::OtherCa(path));
        }
        number = old
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        for r in old.iter_revoked_certificates() {
            listed.push(RevokedCertParams {
                serial_number: SerialNumber::from(r.serial().to_bytes_be()),
                revocation_time: r.revocation_date.to_datetime(),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    let mut added = 0;
    for file in certs {
        let der = CertificateDer::from_pem_file(file).map_err(|e| pem_error(file, e))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| pem_error(file, e))?;
        if cert.verify_signature(Some(ca_key)).is_err() {
            return Err(PkiError::OtherCa(file.clone()));
        }
        let serial = SerialNumber::from(cert.serial.to_bytes_be());
        if listed.iter().any(|r| r.serial_number == serial) {
            continue;
        }
        listed.push(RevokedCertParams {
            serial_number: serial,
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        });
        added += 1;
    }
    // Numbers follow the clock (microseconds) as well as the last list, so a list started
    // again after a loss still numbers above every list before it.
    let clock = u64::try_from(now.unix_timestamp_nanos() / 1_000).unwrap_or(0);
    let number = (number + 1).max(clock);
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(CRL_DAYS),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: listed,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let pem = params.signed_by(&issuer)?.pem()?;
    lock.commit(&path, &pem)?;
    Ok(Revoked {
        added,
        listed: params.revoked_certs.len(),
        path,
    })
}

/// One writer of the CA directory's list at a time: an advisory lock (`flock`) on
/// `.ca.crl.lock`, taken before the list is read, so two runs cannot both extend the same list
/// and lose one's revocations. The kernel releases it when the process ends, however it ends.
/// The new list replaces the old one whole ([`replace`]).
struct ListLock {
    /// Held locked until dropped.
    _lock: std::fs::File,
}

impl ListLock {
    fn take(dir: &Path) -> Result<Self, PkiError> {
        let path = dir.join(format!(".{CRL_FILE}.lock"));
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| PkiError::Io {
                path: path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(PkiError::Busy(path)),
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(PkiError::Io { path, source });
            }
        }
        Ok(ListLock { _lock: lock })
    }

    /// Replace the list at `path` by `contents` whole, still holding the lock.
    fn commit(self, path: &Path, contents: &str) -> Result<(), PkiError> {
        replace(path, contents.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// No temporary file of a replacement is left in `dir`.
    fn assert_no_temporaries(dir: &Path) {
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

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
        assert_eq!(mode(&paths.key), 0o600, "an earlier key's file is replaced");
        assert!(std::fs::read_to_string(&paths.key)
            .unwrap()
            .contains("PRIVATE KEY"));
    }

    #[test]
    fn a_renewal_through_a_symlink_replaces_its_target() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        let archive = dir.path().join("archive");
        std::fs::create_dir_all(&archive).unwrap();
        issue(dir.path(), "e1", NodeRole::Edge, &archive).unwrap();
        let live = dir.path().join("live");
        std::fs::create_dir_all(&live).unwrap();
        for f in ["e1.pem", "e1.key"] {
            std::os::unix::fs::symlink(archive.join(f), live.join(f)).unwrap();
        }
        let before = std::fs::read(archive.join("e1.pem")).unwrap();
        let paths = issue(dir.path(), "e1", NodeRole::Edge, &live).unwrap();
        for f in ["e1.pem", "e1.key"] {
            assert!(std::fs::symlink_metadata(live.join(f))
                .unwrap()
                .file_type()
                .is_symlink());
        }
        assert_ne!(std::fs::read(archive.join("e1.pem")).unwrap(), before);
        assert_eq!(
            std::fs::read(&paths.cert).unwrap(),
            std::fs::read(archive.join("e1.pem")).unwrap()
        );
        assert_eq!(mode(&archive.join("e1.key")), 0o600);
    }

    #[test]
    fn a_ca_is_not_replaced_in_place() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        let [pem, key, list] =
            ["ca.pem", "ca.key", CRL_FILE].map(|f| std::fs::read(dir.path().join(f)).unwrap());
        let e = create_ca(dir.path()).unwrap_err();
        assert!(matches!(&e, PkiError::CaExists(_)), "{e}");
        assert!(e.to_string().contains("beyond revocation"), "{e}");
        for (f, before) in [("ca.pem", pem), ("ca.key", key), (CRL_FILE, list)] {
            assert_eq!(std::fs::read(dir.path().join(f)).unwrap(), before, "{f}");
        }
        // Half of one (a key whose certificate was lost) is not overwritten either.
        std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
        assert!(matches!(create_ca(dir.path()), Err(PkiError::CaExists(_))));
    }

    fn parse_crl(path: &Path) -> (u64, usize) {
        let der = CertificateRevocationListDer::from_pem_file(path).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let number = u64::try_from(crl.crl_number().unwrap()).unwrap();
        (number, crl.iter_revoked_certificates().count())
    }

    #[test]
    fn a_name_that_is_no_node_id_gets_no_certificate() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        for bad in ["*", "../x", "a b", "", "broker"] {
            let e = issue(dir.path(), bad, NodeRole::Edge, dir.path()).unwrap_err();
            assert!(matches!(e, PkiError::BadName(_)), "{bad}: {e}");
        }
        assert!(issue(dir.path(), "../b", NodeRole::Broker, dir.path()).is_err());
        assert!(issue(dir.path(), "broker", NodeRole::Broker, dir.path()).is_ok());
        assert!(issue(dir.path(), "eu-1", NodeRole::Edge, dir.path()).is_ok());
    }

    #[test]
    fn a_node_named_ca_is_not_issued_over_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        let ca = std::fs::read(dir.path().join("ca.key")).unwrap();
        let spelled = dir.path().join(".");
        for role in [NodeRole::Edge, NodeRole::Broker] {
            let e = issue(dir.path(), "ca", role, &spelled).unwrap_err();
            assert!(matches!(e, PkiError::CaFiles(_)), "{e}");
        }
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), ca);
        let elsewhere = dir.path().join("nodes");
        assert!(issue(dir.path(), "ca", NodeRole::Edge, &elsewhere).is_ok());
    }

    #[test]
    fn certificates_end_after_their_days() {
        let dir = tempfile::tempdir().unwrap();
        create_ca_valid_for(dir.path(), 10).unwrap();
        let p = issue_valid_for(dir.path(), "e1", NodeRole::Edge, dir.path(), 30).unwrap();
        let now = OffsetDateTime::now_utc();
        for (file, days) in [(dir.path().join("ca.pem"), 10), (p.cert, 30)] {
            let der = CertificateDer::from_pem_file(&file).unwrap();
            let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
            let v = c.validity();
            assert!(v.not_before.to_datetime() < now);
            let left = v.not_after.to_datetime() - now;
            assert!(
                left > Duration::days(days) - Duration::minutes(1) && left <= Duration::days(days),
                "{file:?}: {left}"
            );
        }
        assert_eq!(p.crl, Some(dir.path().join(CRL_FILE)), "the CA's list");
    }

    #[test]
    fn revoking_lists_each_certificate_once_and_numbers_each_list_higher() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        let list = dir.path().join(CRL_FILE);
        let (first, n) = parse_crl(&list);
        assert_eq!(n, 0, "the CA starts with an empty list");
        let unix = OffsetDateTime::now_utc().unix_timestamp() as u64;
        assert!(
            first + 5 >= unix,
            "numbered from the clock: {first} vs {unix}"
        );
        let e1 = issue(dir.path(), "e1", NodeRole::Edge, dir.path()).unwrap();
        let e2 = issue(dir.path(), "e2", NodeRole::Edge, dir.path()).unwrap();
        let r = revoke(dir.path(), std::slice::from_ref(&e1.cert)).unwrap();
        assert_eq!((r.added, r.listed), (1, 1));
        let r = revoke(dir.path(), &[e1.cert.clone(), e2.cert.clone()]).unwrap();
        assert_eq!((r.added, r.listed), (1, 2));
        let (third, n) = parse_crl(&r.path);
        assert!(third >= first + 2, "{first} then {third}");
        assert_eq!(n, 2);
        assert_no_temporaries(dir.path());
    }

    #[test]
    fn a_lost_list_is_not_started_again_unasked_and_writers_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        let e1 = issue(dir.path(), "e1", NodeRole::Edge, dir.path()).unwrap();
        revoke(dir.path(), std::slice::from_ref(&e1.cert)).unwrap();
        let list = dir.path().join(CRL_FILE);
        let (before, _) = parse_crl(&list);
        assert!(matches!(
            init_revocations(dir.path()),
            Err(PkiError::ListExists(_))
        ));
        std::fs::remove_file(&list).unwrap();
        let e = revoke(dir.path(), &[]).unwrap_err();
        assert!(matches!(&e, PkiError::NoList(_)), "{e}");
        assert!(e.to_string().contains("--init"), "{e}");
        let r = init_revocations(dir.path()).unwrap();
        assert_eq!(r.listed, 0, "a new list holds nothing");
        assert!(
            parse_crl(&list).0 > before,
            "and numbers above the lost one"
        );
        // A writer at work (holding the lock) turns the next one away untouched; what an
        // interrupted one left behind does not.
        let held = ListLock::take(dir.path()).unwrap();
        let e = revoke(dir.path(), std::slice::from_ref(&e1.cert)).unwrap_err();
        assert!(matches!(e, PkiError::Busy(_)), "{e}");
        drop(held);
        let left = dir
            .path()
            .join(format!(".ca.crl.{}-0-0.tmp", std::process::id()));
        std::fs::write(&left, "left by a killed run").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&left)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
            .unwrap();
        revoke(dir.path(), &[]).unwrap();
        assert_eq!(parse_crl(&list).1, 0);
        assert_no_temporaries(dir.path());
    }

    #[test]
    fn revoking_another_cas_certificate_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, other) = (dir.path().join("ca"), dir.path().join("other"));
        for d in [&ca, &other] {
            std::fs::create_dir_all(d).unwrap();
            create_ca(d).unwrap();
        }
        let ours = issue(&ca, "e1", NodeRole::Edge, &ca).unwrap();
        let theirs = issue(&other, "e1", NodeRole::Edge, &other).unwrap();
        revoke(&ca, std::slice::from_ref(&ours.cert)).unwrap();
        let listed = std::fs::read(ca.join(CRL_FILE)).unwrap();
        let e = revoke(&ca, std::slice::from_ref(&theirs.cert)).unwrap_err();
        assert!(
            matches!(&e, PkiError::OtherCa(f) if *f == theirs.cert),
            "{e}"
        );
        assert_eq!(std::fs::read(ca.join(CRL_FILE)).unwrap(), listed);
        // A list signed by another CA in this CA's place is not extended either.
        std::fs::copy(other.join(CRL_FILE), ca.join(CRL_FILE)).unwrap();
        assert!(matches!(revoke(&ca, &[]), Err(PkiError::OtherCa(_))));
    }

    #[test]
    fn revocations_made_at_once_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path()).unwrap();
        let certs: Vec<PathBuf> = (0..6)
            .map(|i| {
                issue(dir.path(), &format!("e{i}"), NodeRole::Edge, dir.path())
                    .unwrap()
                    .cert
            })
            .collect();
        let ca = dir.path();
        std::thread::scope(|s| {
            for cert in &certs {
                s.spawn(move || loop {
                    match revoke(ca, std::slice::from_ref(cert)) {
                        Ok(r) => break assert_eq!(r.added, 1),
                        Err(PkiError::Busy(_)) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                });
            }
        });
        assert_eq!(parse_crl(&dir.path().join(CRL_FILE)).1, certs.len());
        assert_no_temporaries(dir.path());
    }
}
