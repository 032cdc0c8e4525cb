//! The origin table: which upstream serves a request, chosen by Host and longest path prefix.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use http::Uri;
use parking_lot::{Mutex, RwLock};

use crate::config::OriginEntry;

/// A resolved upstream origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The Host this origin was registered for (lower-case, no port).
    pub host: String,
    /// Path prefix of the row, `/` when none was given.
    pub path_prefix: String,
    /// Socket address the upstream URL resolved to at load time.
    pub addr: SocketAddr,
    /// Whether to speak TLS to the origin.
    pub tls: bool,
    /// Host name for SNI.
    pub authority: String,
    /// The `Host` header the origin gets ([`host_header`]).
    pub host_header: String,
}

/// The `Host` an origin is asked with: its upstream URL's own `host[:port]`, or with
/// `forward_host` the site's host (port-free, as in the cache key). Edges and the broker's
/// direct-to-origin fallback both use it.
pub fn host_header(upstream: &Uri, site_host: &str, forward_host: bool) -> String {
    match (forward_host, upstream.host(), upstream.port_u16()) {
        (false, Some(h), Some(p)) => format!("{h}:{p}"),
        (false, Some(h), None) => h.to_string(),
        _ => site_host.to_string(),
    }
}

/// Why a row of the origin table is unusable.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The upstream is not an absolute http(s) URL.
    #[error("origins[{index}].upstream: {reason} ({value:?})")]
    BadUpstream {
        /// Row index in the table.
        index: usize,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The host is empty or has characters a Host header cannot have.
    #[error("origins[{index}].host: invalid host {value:?}")]
    BadHost {
        /// Row index.
        index: usize,
        /// The offending value.
        value: String,
    },
    /// The path prefix does not start with `/`.
    #[error("origins[{index}].path_prefix: must start with '/' ({value:?})")]
    BadPrefix {
        /// Row index.
        index: usize,
        /// The offending value.
        value: String,
    },
    /// Two rows claim the same host and prefix.
    #[error("origins[{index}]: duplicate host {host:?} with prefix {prefix:?}")]
    Duplicate {
        /// Row index of the second claim.
        index: usize,
        /// Host of both rows.
        host: String,
        /// Prefix of both rows.
        prefix: String,
    },
}

/// Host → prefixes (longest first) → origin.
#[derive(Debug, Default, Clone)]
pub struct OriginTable {
    by_host: HashMap<String, Vec<Arc<Origin>>>,
}

impl OriginTable {
    /// Validate and resolve every row. Upstream names are resolved once here, as nginx does,
    /// so the request path never blocks on DNS.
    pub fn build(entries: &[OriginEntry]) -> Result<Self, OriginError> {
        let mut by_host: HashMap<String, Vec<Arc<Origin>>> = HashMap::new();
        for (index, e) in entries.iter().enumerate() {
            let origin = Arc::new(parse_entry(index, e)?);
            let rows = by_host.entry(origin.host.clone()).or_default();
            if rows.iter().any(|o| o.path_prefix == origin.path_prefix) {
                return Err(OriginError::Duplicate {
                    index,
                    host: origin.host.clone(),
                    prefix: origin.path_prefix.clone(),
                });
            }
            rows.push(origin);
            rows.sort_by_key(|o| std::cmp::Reverse(o.path_prefix.len()));
        }
        Ok(OriginTable { by_host })
    }

    /// The origin for a request's Host header and path, if any row matches.
    pub fn select(&self, host: &str, path: &str) -> Option<&Arc<Origin>> {
        let host = normalize_host(host);
        self.by_host
            .get(host.as_ref())?
            .iter()
            .find(|o| path.starts_with(o.path_prefix.as_str()))
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.by_host.values().map(Vec::len).sum()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }
}

/// The live origin table: rows from the configuration plus rows pushed by the broker
/// (`PUT /origins` on the admin API). A pushed row replaces a configured row with the same
/// host and prefix. Requests read an `Arc` snapshot, so a push never blocks them.
#[derive(Debug)]
pub struct SharedOrigins {
    table: RwLock<Arc<OriginTable>>,
    configured: Vec<OriginEntry>,
    pushed: Mutex<Vec<OriginEntry>>,
}

impl SharedOrigins {
    /// Start from the configured rows.
    pub fn new(configured: Vec<OriginEntry>) -> Result<Self, OriginError> {
        let table = OriginTable::build(&configured)?;
        Ok(SharedOrigins {
            table: RwLock::new(Arc::new(table)),
            configured,
            pushed: Mutex::new(Vec::new()),
        })
    }

    /// The table requests use now.
    pub fn current(&self) -> Arc<OriginTable> {
        self.table.read().clone()
    }

    /// Replace the pushed rows; on error nothing changes. Returns the table's row count.
    pub fn replace_pushed(&self, rows: Vec<OriginEntry>) -> Result<usize, OriginError> {
        let mut pushed = self.pushed.lock();
        let key = |e: &OriginEntry| {
            (
                normalize_host(e.host.trim()).into_owned(),
                e.path_prefix.clone().unwrap_or_else(|| "/".into()),
            )
        };
        let overridden: Vec<_> = rows.iter().map(key).collect();
        let mut all: Vec<OriginEntry> = self
            .configured
            .iter()
            .filter(|e| !overridden.contains(&key(e)))
            .cloned()
            .collect();
        all.extend(rows.iter().cloned());
        let table = OriginTable::build(&all)?;
        let n = table.len();
        *self.table.write() = Arc::new(table);
        *pushed = rows;
        Ok(n)
    }

    /// Configured and pushed rows.
    pub fn rows(&self) -> (Vec<OriginEntry>, Vec<OriginEntry>) {
        (self.configured.clone(), self.pushed.lock().clone())
    }
}

/// Lower-case the host and strip a `:port` suffix (IPv6 literals keep their brackets).
pub fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let h = if host.starts_with('[') {
        host.split_once(']')
            .map(|(h, _)| &host[..=h.len()])
            .unwrap_or(host)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(h.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(h)
    }
}

fn parse_entry(index: usize, e: &OriginEntry) -> Result<Origin, OriginError> {
    let bad = |reason: &str| OriginError::BadUpstream {
        index,
        value: e.upstream.clone(),
        reason: reason.to_string(),
    };
    let host = normalize_host(e.host.trim()).into_owned();
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
    {
        return Err(OriginError::BadHost {
            index,
            value: e.host.clone(),
        });
    }
    let path_prefix = e.path_prefix.clone().unwrap_or_else(|| "/".into());
    if !path_prefix.starts_with('/') {
        return Err(OriginError::BadPrefix {
            index,
            value: path_prefix,
        });
    }
    let uri: Uri = e.upstream.parse().map_err(|_| bad("not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad("scheme must be http or https")),
    };
    let authority = uri.host().ok_or_else(|| bad("missing host"))?.to_string();
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad("upstream URL must not have a path"));
    }
    let host_header = host_header(&uri, &host, e.forward_host);
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr = (authority.trim_matches(|c| c == '[' || c == ']'), port)
        .to_socket_addrs()
        .map_err(|err| bad(&format!("cannot resolve: {err}")))?
        .next()
        .ok_or_else(|| bad("resolves to no address"))?;
    Ok(Origin {
        host,
        path_prefix,
        addr,
        tls,
        authority,
        host_header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host: &str, prefix: Option<&str>, up: &str) -> OriginEntry {
        OriginEntry {
            host: host.into(),
            path_prefix: prefix.map(Into::into),
            upstream: up.into(),
            forward_host: false,
        }
    }

    #[test]
    fn longest_prefix_wins_and_host_is_normalized() {
        let t = OriginTable::build(&[
            entry("Example.com", None, "http://127.0.0.1:9000"),
            entry("example.com", Some("/static"), "http://127.0.0.1:9001"),
        ])
        .unwrap();
        assert_eq!(
            t.select("EXAMPLE.com:8080", "/static/a")
                .unwrap()
                .addr
                .port(),
            9001
        );
        assert_eq!(t.select("example.com", "/index").unwrap().addr.port(), 9000);
        assert!(t.select("other.com", "/").is_none());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn rejects_bad_rows() {
        assert!(OriginTable::build(&[entry("a", None, "ftp://x")]).is_err());
        assert!(OriginTable::build(&[entry("a", None, "http://127.0.0.1:1/p")]).is_err());
        assert!(OriginTable::build(&[entry("a b", None, "http://127.0.0.1:1")]).is_err());
        assert!(OriginTable::build(&[entry("a", Some("x"), "http://127.0.0.1:1")]).is_err());
        let dup = [
            entry("a", None, "http://127.0.0.1:1"),
            entry("A", None, "http://127.0.0.1:2"),
        ];
        assert!(matches!(
            OriginTable::build(&dup),
            Err(OriginError::Duplicate { .. })
        ));
    }

    #[test]
    fn pushed_rows_override_and_bad_pushes_change_nothing() {
        let shared = SharedOrigins::new(vec![entry("a", None, "http://127.0.0.1:1")]).unwrap();
        let n = shared
            .replace_pushed(vec![
                entry("A", None, "http://127.0.0.1:2"),
                entry("b", None, "http://127.0.0.1:3"),
            ])
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(shared.current().select("a", "/").unwrap().addr.port(), 2);
        assert!(shared
            .replace_pushed(vec![entry("c", None, "ftp://x")])
            .is_err());
        assert_eq!(shared.current().select("b", "/").unwrap().addr.port(), 3);
        shared.replace_pushed(vec![]).unwrap();
        assert_eq!(shared.current().select("a", "/").unwrap().addr.port(), 1);
        assert!(shared.current().select("b", "/").is_none());
    }

    #[test]
    fn https_defaults_to_443() {
        let t = OriginTable::build(&[entry("a", None, "https://127.0.0.1")]).unwrap();
        let o = t.select("a", "/").unwrap();
        assert!(o.tls);
        assert_eq!(o.addr.port(), 443);
    }
}
