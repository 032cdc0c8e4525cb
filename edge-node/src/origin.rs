//! The origin table: which upstream serves a request, chosen by Host and longest path prefix.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Uri;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::cache_key::QueryFilter;
use crate::config::OriginEntry;
use crate::durable::FileError;
use crate::last_push::{LastPush, Saved};
use crate::proxy::primary_key;

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
    /// The name the TLS handshake checks the certificate for (and sends as SNI): an IPv6
    /// literal without its brackets, which rustls would refuse as a name.
    pub authority: String,
    /// The `Host` header the origin gets ([`host_header`]).
    pub host_header: String,
    /// Drop `Set-Cookie` from the origin's responses (`OriginEntry::strip_set_cookie`).
    pub strip_set_cookie: bool,
    /// Query parameters left out of the cache key (`OriginEntry::cache_key_ignore_query`).
    pub query_filter: QueryFilter,
}

impl Origin {
    /// Whether `other` serves the same requests (same host and prefix): two such rows cannot
    /// both be in a table, and a pushed one displaces a configured one.
    fn same_route(&self, other: &Origin) -> bool {
        self.host == other.host && self.path_prefix == other.path_prefix
    }
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
    /// The cache key's query filter is malformed.
    #[error("origins[{index}].cache_key_ignore_query: {reason}")]
    BadQueryFilter {
        /// Row index.
        index: usize,
        /// What is wrong.
        reason: String,
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
    /// The upstream's name does not resolve (now).
    #[error("origins[{index}].upstream: cannot resolve {value:?}: {reason}")]
    Unresolvable {
        /// Row index.
        index: usize,
        /// The upstream URL.
        value: String,
        /// The resolver's answer.
        reason: String,
    },
    /// A pushed upstream resolves to this machine or a private network.
    #[error(
        "origins[{index}].upstream: {value:?} resolves to {addr}, a loopback or private \
         address (a pushed origin may only when the broker allows private upstreams)"
    )]
    Private {
        /// Row index.
        index: usize,
        /// The upstream URL.
        value: String,
        /// What it resolved to.
        addr: IpAddr,
    },
}

/// Whether `ip` is this machine or a private network: loopback, RFC 1918, link-local,
/// carrier-grade NAT, unique local, unspecified or broadcast (also as IPv4-mapped IPv6).
/// A provider's origin must not point there, or the edges that fetch from it on every miss
/// would reach the operator's internal services for the provider.
pub fn is_private_ip(ip: IpAddr) -> bool {
    fn v4(ip: std::net::Ipv4Addr) -> bool {
        let [a, b, c, _] = ip.octets();
        ip.is_loopback()
            || ip.is_private()
            || ip.is_link_local()
            || ip.is_broadcast()
            || ip.is_multicast()
            || a == 0 // 0.0.0.0/8, "this network"
            || a >= 240 // reserved
            || (a == 100 && (b & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
            || (a == 198 && (b & 0xfe) == 18) // 198.18.0.0/15, benchmarking
            || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24, protocol assignments
    }
    match ip {
        IpAddr::V4(ip) => v4(ip),
        IpAddr::V6(ip) => {
            let seg = ip.segments();
            // IPv4 embedded by NAT64 (64:ff9b::/96) or 6to4 (2002::/16) reaches that IPv4
            // address through a translator.
            let nat64 =
                (seg[0], seg[1], seg[2], seg[3], seg[4], seg[5]) == (0x64, 0xff9b, 0, 0, 0, 0);
            let embedded = |hi: u16, lo: u16| {
                std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
            };
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link local
                || (seg[0] & 0xffc0) == 0xfec0 // site local (deprecated, still routed inside)
                || (seg[0], seg[1], seg[2]) == (0x64, 0xff9b, 1) // local-use NAT64, 64:ff9b:1::/48
                || (seg[0], seg[1]) == (0x2001, 0) // Teredo: an IPv4 tunnel endpoint inside
                // IPv4-mapped and IPv4-compatible (::a.b.c.d) addresses
                || ip.to_ipv4().is_some_and(v4)
                || (nat64 && v4(embedded(seg[6], seg[7])))
                || (seg[0] == 0x2002 && v4(embedded(seg[1], seg[2])))
        }
    }
}

/// A pushed row the edge could not use; the rest of the push still applies.
#[derive(Debug, Clone, Serialize)]
pub struct RejectedRow {
    /// Index in the pushed list.
    pub index: usize,
    /// The row's host.
    pub host: String,
    /// Why.
    pub error: String,
}

/// What a push left in force.
#[derive(Debug, Default, Serialize)]
pub struct PushReport {
    /// Rows of the table now (configured and pushed).
    pub origins: usize,
    /// Pushed rows left out.
    pub rejected: Vec<RejectedRow>,
    /// Fields of pushed rows this edge does not know (a newer broker's options), left out of
    /// the rows that apply.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignored: Vec<IgnoredFields>,
    /// Why the table, applied, could not be saved for a restart (which would restore the one
    /// before); absent when it was saved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_saved: Option<String>,
}

/// A pushed row's fields this edge does not know.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IgnoredFields {
    /// Index in the pushed list.
    pub index: usize,
    /// The row's host.
    pub host: String,
    /// The unknown field names.
    pub fields: Vec<String>,
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
        let origins = entries
            .iter()
            .enumerate()
            .map(|(index, e)| parse_entry(index, e, resolve).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_origins(origins)
    }

    /// A table of already resolved rows.
    fn from_origins(origins: Vec<Arc<Origin>>) -> Result<Self, OriginError> {
        let mut by_host: HashMap<String, Vec<Arc<Origin>>> = HashMap::new();
        for (index, origin) in origins.into_iter().enumerate() {
            let rows = by_host.entry(origin.host.clone()).or_default();
            if rows.iter().any(|o| o.same_route(&origin)) {
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

    /// The cache key of `host` and `path_and_query` (as the proxy keys a request): the
    /// selected row's query filter applied, the host normalized.
    pub fn cache_key(&self, host: &str, path_and_query: &str) -> String {
        let path = path_and_query.split('?').next().unwrap_or(path_and_query);
        match self.select(host, path) {
            Some(o) => primary_key(host, &o.query_filter.apply(path_and_query)),
            None => primary_key(host, path_and_query),
        }
    }

    /// A `host/path?query` key given by an operator or the broker as the proxy would key
    /// that request; `None` without a host.
    pub fn normalize_key(&self, key: &str) -> Option<String> {
        let (host, rest) = key.split_once('/')?;
        (!host.is_empty()).then(|| self.cache_key(host, &format!("/{rest}")))
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
///
/// Configured rows are the operator's and resolved once at start, as nginx does. Pushed rows
/// are providers': each is judged on its own (one provider's bad row must not hold back
/// everyone's origins); one that points at a private address is left out unless the broker
/// allows that; a name is looked up when its row is new or its last lookup — failed or not —
/// is older than [`RESOLVE_EVERY`] (the broker pushes every few seconds, and every push must
/// not cost a DNS query per row), all of a push's lookups together within [`RESOLVE_TIMEOUT`]
/// (one provider's unanswered names must not stall everyone's push; names they kept from
/// being asked in time are asked at the next push, not counted as failed); and one whose name stops
/// resolving keeps the address it last had for up to [`KEEP_UNRESOLVED`] (a resolver hiccup
/// must not take a site down, a name gone for good must not be served forever).
#[derive(Debug)]
pub struct SharedOrigins {
    table: RwLock<Arc<OriginTable>>,
    configured: Vec<(OriginEntry, Arc<Origin>)>,
    pushed: Mutex<Vec<PushedRow>>,
    /// Names whose last lookup failed: when, and why.
    failed: Mutex<HashMap<(String, u16), (Instant, String)>>,
    /// Where pushes are kept for the next start, if anywhere.
    last_push: Option<LastPush>,
    /// Held through one push's whole handling ([`Self::serialize`]).
    serial: tokio::sync::Mutex<()>,
}

/// A pushed row in force: when its name last resolved, and when it was last looked up.
#[derive(Debug)]
struct PushedRow {
    entry: OriginEntry,
    origin: Arc<Origin>,
    resolved: Instant,
    looked_up: Instant,
}

/// How long a name's lookup (answer or failure) stands before it is looked up again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(60);
/// How long a pushed row whose name stopped resolving keeps its last address.
pub const KEEP_UNRESOLVED: Duration = Duration::from_secs(3600);
/// How long all of one push's lookups may take (the broker waits 2 s for the answer).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_millis(1500);

/// What a push's lookups found, by `(host, port)`.
pub type Lookups = HashMap<(String, u16), Result<SocketAddr, String>>;

/// Resolve an upstream's name to its first address.
fn resolve(host: &str, port: u16) -> std::io::Result<Option<SocketAddr>> {
    Ok((host, port).to_socket_addrs()?.next())
}

impl SharedOrigins {
    /// Start from the configured rows.
    pub fn new(configured: Vec<OriginEntry>) -> Result<Self, OriginError> {
        let configured = configured
            .into_iter()
            .enumerate()
            .map(|(index, e)| {
                let origin = Arc::new(parse_entry(index, &e, resolve)?);
                Ok((e, origin))
            })
            .collect::<Result<Vec<_>, OriginError>>()?;
        let table = OriginTable::from_origins(configured.iter().map(|(_, o)| o.clone()).collect())?;
        Ok(SharedOrigins {
            table: RwLock::new(Arc::new(table)),
            configured,
            pushed: Mutex::new(Vec::new()),
            failed: Mutex::new(HashMap::new()),
            last_push: None,
            serial: tokio::sync::Mutex::new(()),
        })
    }

    /// One push at a time, from its first step to [`Self::remember`]: a broker retry that
    /// overlaps a slow push must not leave the table and the kept file holding different ones.
    pub async fn serialize(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.serial.lock().await
    }

    /// Keep a push that applied whole (its ownership floors made durable) for the next start.
    /// Only a changed push is written (a small file): the broker pushes every few seconds.
    /// A failure (the table applies, but a restart would restore the one before) is the
    /// caller's to report; nothing kept on this edge is no failure.
    pub fn remember(&self, rows: &[OriginEntry], allow_private: bool) -> std::io::Result<()> {
        let Some(last) = &self.last_push else {
            return Ok(());
        };
        let saved = Saved {
            origins: rows.to_vec(),
            allow_private_upstreams: allow_private,
        };
        last.save(&saved).inspect_err(|e| {
            tracing::warn!(error = %e, "the pushed origin table is not kept for a restart");
        })
    }

    /// Keep every push in `dir` ([`crate::last_push`]), for [`Self::restore`] after a restart.
    pub fn remembering_pushes(mut self, dir: &std::path::Path) -> Self {
        self.last_push = Some(LastPush::in_dir(dir));
        self
    }

    /// Apply the push saved before the last stop, as the broker sent it; how many rows it
    /// had (0 when there is none).
    pub async fn restore(&self) -> Result<usize, FileError> {
        let Some(saved) = self
            .last_push
            .as_ref()
            .map(LastPush::load)
            .transpose()?
            .flatten()
        else {
            return Ok(0);
        };
        let n = saved.origins.len();
        self.push(saved.origins, saved.allow_private_upstreams)
            .await;
        // Lookups that failed this early (a resolver not up yet) are tried again at the
        // broker's first push, not a minute later.
        self.failed.lock().clear();
        Ok(n)
    }

    /// Apply a push from the broker: look up the names it needs (concurrently, within
    /// [`RESOLVE_TIMEOUT`] together), then [`Self::apply_push`].
    pub async fn push(&self, rows: Vec<OriginEntry>, allow_private: bool) -> PushReport {
        let names = self.names_to_resolve(&rows);
        let found = lookup_all(names).await;
        self.apply_push(rows, allow_private, &found)
    }

    /// Apply a push with `found`, the lookups of (some of) [`Self::names_to_resolve`]: failures
    /// are remembered for [`RESOLVE_EVERY`], then the rows are judged.
    pub fn apply_push(
        &self,
        rows: Vec<OriginEntry>,
        allow_private: bool,
        found: &Lookups,
    ) -> PushReport {
        {
            let mut failed = self.failed.lock();
            failed.retain(|_, (at, _)| at.elapsed() < RESOLVE_EVERY);
            for (name, answer) in found {
                match answer {
                    Ok(_) => failed.remove(name),
                    Err(why) => failed.insert(name.clone(), (Instant::now(), why.clone())),
                };
            }
        }
        self.replace_pushed_with(rows, allow_private, |host, port| {
            let name = (host.to_string(), port);
            match found.get(&name) {
                Some(Ok(addr)) => Ok(Some(*addr)),
                Some(Err(why)) => Err(std::io::Error::other(why.clone())),
                None => Err(std::io::Error::other(
                    self.failed
                        .lock()
                        .get(&name)
                        .map_or("not looked up".to_string(), |(_, why)| why.clone()),
                )),
            }
        })
    }

    /// The table requests use now.
    pub fn current(&self) -> Arc<OriginTable> {
        self.table.read().clone()
    }

    /// The `(host, port)` names a push of `rows` needs looked up: those of new rows and of
    /// rows looked up more than [`RESOLVE_EVERY`] ago, except names that failed more recently.
    pub fn names_to_resolve(&self, rows: &[OriginEntry]) -> Vec<(String, u16)> {
        let pushed = self.pushed.lock();
        let failed = self.failed.lock();
        let fresh: HashSet<UpstreamKey<'_>> = pushed
            .iter()
            .filter(|p| p.looked_up.elapsed() < RESOLVE_EVERY)
            .map(|p| upstream_key(&p.entry))
            .collect();
        let mut names: Vec<(String, u16)> = rows
            .iter()
            .filter(|e| !fresh.contains(&upstream_key(e)))
            .filter_map(|e| upstream_target(&e.upstream))
            .filter(|name| {
                failed
                    .get(name)
                    .is_none_or(|(at, _)| at.elapsed() >= RESOLVE_EVERY)
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Replace the pushed rows with the usable ones of `rows`, resolving names here (blocking);
    /// see the type's rules.
    pub fn replace_pushed(&self, rows: Vec<OriginEntry>, allow_private: bool) -> PushReport {
        self.replace_pushed_with(rows, allow_private, resolve)
    }

    /// [`Self::replace_pushed`] with the names' addresses from `resolve` (for the names of
    /// [`Self::names_to_resolve`]; rows with a fresh address are not asked about).
    pub fn replace_pushed_with(
        &self,
        rows: Vec<OriginEntry>,
        allow_private: bool,
        resolve: impl Fn(&str, u16) -> std::io::Result<Option<SocketAddr>>,
    ) -> PushReport {
        let mut pushed = self.pushed.lock();
        let mut kept: Vec<PushedRow> = Vec::with_capacity(rows.len());
        // Indexes, not scans: a fleet's table may hold tens of thousands of rows, pushed every
        // few seconds.
        let mut routes: HashSet<(String, String)> = HashSet::with_capacity(rows.len());
        let by_upstream: HashMap<UpstreamKey<'_>, usize> = pushed
            .iter()
            .enumerate()
            .map(|(i, p)| (upstream_key(&p.entry), i))
            .collect();
        let mut rejected = Vec::new();
        for (index, entry) in rows.into_iter().enumerate() {
            // The same route to the same upstream, whatever its options: its address carries
            // over (an option changed alone must not make an unresolvable name drop the row).
            let previous = by_upstream.get(&upstream_key(&entry)).map(|i| &pushed[*i]);
            // This row's options at the previous row's address.
            let at_previous_address = |p: &PushedRow| -> Result<Arc<Origin>, OriginError> {
                if p.entry == entry {
                    return Ok(p.origin.clone());
                }
                parse_entry(index, &entry, |_: &str, _: u16| Ok(Some(p.origin.addr))).map(Arc::new)
            };
            let now = Instant::now();
            let resolved = match previous {
                Some(p) if p.looked_up.elapsed() < RESOLVE_EVERY => {
                    at_previous_address(p).map(|o| (o, p.resolved, p.looked_up))
                }
                _ => match parse_entry(index, &entry, &resolve) {
                    Ok(o) => Ok((Arc::new(o), now, now)),
                    Err(err @ OriginError::Unresolvable { .. }) => {
                        match previous.filter(|p| p.resolved.elapsed() < KEEP_UNRESOLVED) {
                            Some(p) => at_previous_address(p).map(|o| (o, p.resolved, now)),
                            None => Err(err),
                        }
                    }
                    Err(err) => Err(err),
                },
            };
            let checked = resolved.and_then(|(origin, resolved, looked_up)| {
                if !allow_private && is_private_ip(origin.addr.ip()) {
                    return Err(OriginError::Private {
                        index,
                        value: entry.upstream.clone(),
                        addr: origin.addr.ip(),
                    });
                }
                if !routes.insert((origin.host.clone(), origin.path_prefix.clone())) {
                    return Err(OriginError::Duplicate {
                        index,
                        host: origin.host.clone(),
                        prefix: origin.path_prefix.clone(),
                    });
                }
                Ok((origin, resolved, looked_up))
            });
            match checked {
                Ok((origin, resolved, looked_up)) => kept.push(PushedRow {
                    entry,
                    origin,
                    resolved,
                    looked_up,
                }),
                Err(err) => rejected.push(RejectedRow {
                    index,
                    host: entry.host,
                    error: err.to_string(),
                }),
            }
        }
        let overridden = |o: &Origin| routes.contains(&(o.host.clone(), o.path_prefix.clone()));
        let origins: Vec<Arc<Origin>> = self
            .configured
            .iter()
            .map(|(_, o)| o)
            .filter(|o| !overridden(o))
            .chain(kept.iter().map(|k| &k.origin))
            .cloned()
            .collect();
        match OriginTable::from_origins(origins) {
            Ok(table) => {
                let report = PushReport {
                    origins: table.len(),
                    rejected,
                    ignored: Vec::new(),
                    not_saved: None,
                };
                *self.table.write() = Arc::new(table);
                *pushed = kept;
                report
            }
            // Unreachable (configured rows were checked at start, pushed ones above, and a
            // pushed row displaces the configured one it matches); if it ever happens, the
            // table in force stays.
            Err(err) => {
                tracing::error!(error = %err, "pushed origins left the table inconsistent; kept the old one");
                PushReport {
                    origins: self.table.read().len(),
                    rejected: vec![RejectedRow {
                        index: 0,
                        host: String::new(),
                        error: format!("push not applied: {err}"),
                    }],
                    ignored: Vec::new(),
                    not_saved: None,
                }
            }
        }
    }

    /// Configured and pushed rows.
    pub fn rows(&self) -> (Vec<OriginEntry>, Vec<OriginEntry>) {
        let configured = self.configured.iter().map(|(e, _)| e.clone()).collect();
        let pushed = self.pushed.lock().iter().map(|p| p.entry.clone()).collect();
        (configured, pushed)
    }
}

/// Look `names` up concurrently, all within [`RESOLVE_TIMEOUT`]. A lookup that had at least
/// half of it and got no answer counts as failed (its resolver thread finishes on its own, and
/// the name is not asked again for [`RESOLVE_EVERY`]). One that started too late to be given
/// that, queued behind slow names, is left out: not looked up this time, it is asked again at
/// the next push, so a provider whose names never answer cannot keep everyone else's names
/// failing push after push.
async fn lookup_all(names: Vec<(String, u16)>) -> Lookups {
    lookup_all_with(names, |host, port| async move {
        Ok(tokio::net::lookup_host((host, port)).await?.next())
    })
    .await
}

/// [`lookup_all`] with `lookup` answering for the resolver.
async fn lookup_all_with<F, Fut>(names: Vec<(String, u16)>, lookup: F) -> Lookups
where
    F: Fn(String, u16) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Option<SocketAddr>>>,
{
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + RESOLVE_TIMEOUT;
    let lookup = &lookup;
    futures::stream::iter(names)
        .map(|(host, port)| async move {
            let fair = tokio::time::Instant::now() + RESOLVE_TIMEOUT / 2 <= deadline;
            let answer = tokio::time::timeout_at(deadline, lookup(host.clone(), port)).await;
            let addr = match answer {
                Ok(Ok(addr)) => addr.ok_or_else(|| "no address".to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) if !fair => return None,
                Err(_) => Err(format!("no answer within {RESOLVE_TIMEOUT:?}")),
            };
            Some(((host, port), addr))
        })
        .buffer_unordered(LOOKUPS_AT_ONCE)
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// Lookups one push runs at once.
const LOOKUPS_AT_ONCE: usize = 64;

/// Where an upstream URL connects: one reading for building the table and for the lookups a
/// push makes before it, so both name the same `(name, port)`.
struct Target {
    tls: bool,
    /// The host to resolve and to check the certificate for (brackets removed).
    name: String,
    port: u16,
}

impl Target {
    fn of(uri: &Uri) -> Result<Target, &'static str> {
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err("scheme must be http or https"),
        };
        let auth = uri.authority().ok_or("missing host")?;
        // Credentials would never be sent, and a query would be dropped: refused, not
        // silently ignored.
        if auth.as_str().contains('@') {
            return Err("credentials are not allowed in the URL");
        }
        if uri.query().is_some() {
            return Err("upstream URL must not have a query");
        }
        let name = auth
            .host()
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        // `http::Uri` keeps any port text; an unparsable one would silently mean 80 or 443.
        let port = match auth.as_str()[auth.host().len()..].strip_prefix(':') {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) => match p.parse::<u16>() {
                Ok(p @ 1..) => p,
                _ => return Err("port must be a number from 1 to 65535"),
            },
        };
        Ok(Target { tls, name, port })
    }
}

/// The `(name, port)` an upstream URL connects to, if it is a well-formed http(s) URL.
fn upstream_target(upstream: &str) -> Option<(String, u16)> {
    let t = Target::of(&upstream.parse().ok()?).ok()?;
    Some((t.name, t.port))
}

/// Lower-case the host and strip a `:port` suffix and a trailing dot (IPv6 literals keep
/// their brackets).
pub fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let h = if host.starts_with('[') {
        host.split_once(']')
            .map(|(h, _)| &host[..=h.len()])
            .unwrap_or(host)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    // `example.com.` is the same name, fully qualified (RFC 3986 §3.2.2).
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(h.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(h)
    }
}

/// `raw` normalized as the proxy does, if it is a host as a request's `Host` gives one: a
/// name or an IP literal, with an optional numeric port. Anything else names no host the edge
/// serves (a pasted URL's `https:`, user info, spaces), and a purge of it would match nothing
/// while answering as done; so would a host empty once normalized (`:80`, `.`).
pub fn checked_host(raw: &str) -> Result<String, String> {
    let (name_ok, port) = match raw.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, port)) => (
                !ip.is_empty()
                    && ip
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || b":.".contains(&b)),
                port,
            ),
            None => (false, ""),
        },
        None => {
            let (name, port) = raw.find(':').map_or((raw, ""), |i| raw.split_at(i));
            let name_ok = name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            (name_ok, port)
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    let host = normalize_host(raw);
    if !name_ok || !port_ok {
        return Err(format!(
            "{raw:?} is not a host (a name or IP literal, with an optional port; not a URL)"
        ));
    }
    if host.is_empty() {
        return Err("key has an empty host".into());
    }
    Ok(host.into_owned())
}

/// Whether two rows send the same route to the same upstream (their options aside): the
/// address one resolved to serves the other.
/// A row's route and upstream: rows equal in these share an address.
type UpstreamKey<'a> = (&'a str, Option<&'a str>, &'a str);

fn upstream_key(e: &OriginEntry) -> UpstreamKey<'_> {
    (&e.host, e.path_prefix.as_deref(), &e.upstream)
}

fn parse_entry(
    index: usize,
    e: &OriginEntry,
    resolve: impl Fn(&str, u16) -> std::io::Result<Option<SocketAddr>>,
) -> Result<Origin, OriginError> {
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
    let query_filter = QueryFilter::parse(&e.cache_key_ignore_query)
        .map_err(|reason| OriginError::BadQueryFilter { index, reason })?;
    let uri: Uri = e.upstream.parse().map_err(|_| bad("not a URL"))?;
    let Target { tls, name, port } = Target::of(&uri).map_err(bad)?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad("upstream URL must not have a path"));
    }
    let host_header = host_header(&uri, &host, e.forward_host);
    let unresolvable = |reason: String| OriginError::Unresolvable {
        index,
        value: e.upstream.clone(),
        reason,
    };
    let addr = resolve(&name, port)
        .map_err(|err| unresolvable(err.to_string()))?
        .ok_or_else(|| unresolvable("no address".into()))?;
    Ok(Origin {
        host,
        path_prefix,
        addr,
        tls,
        authority: name,
        host_header,
        strip_set_cookie: e.strip_set_cookie,
        query_filter,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names that never answer take every lookup slot for the whole push: they fail, and the
    /// names queued behind them are not counted as failed but left for the next push.
    #[tokio::test(start_paused = true)]
    async fn names_queued_behind_unanswered_ones_are_left_for_the_next_push() {
        let mut names: Vec<(String, u16)> = (0..LOOKUPS_AT_ONCE)
            .map(|i| (format!("a{i:03}.slow.test"), 80))
            .collect();
        names.push(("z.fine.test".to_string(), 80));
        let found = lookup_all_with(names, |host, _| async move {
            if host.ends_with(".slow.test") {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(Some(SocketAddr::from(([192, 0, 2, 1], 80))))
        })
        .await;
        assert_eq!(found.len(), LOOKUPS_AT_ONCE, "{found:?}");
        assert!(found.values().all(|a| a.is_err()));
        assert!(!found.contains_key(&("z.fine.test".to_string(), 80)));
        // With a free slot it answers.
        let found = lookup_all_with(vec![("z.fine.test".to_string(), 80)], |_, _| async {
            Ok(Some(SocketAddr::from(([192, 0, 2, 1], 80))))
        })
        .await;
        assert!(found[&("z.fine.test".to_string(), 80)].is_ok());
    }

    /// A push that cannot be written for a restart is an error, which the admin API reports
    /// in its answer (`not_saved`), not a silent success.
    #[test]
    fn a_push_not_kept_for_a_restart_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, b"x").unwrap();
        let rows = vec![entry("a", None, "http://127.0.0.1:1")];
        let lost = SharedOrigins::new(vec![])
            .unwrap()
            .remembering_pushes(&not_a_dir);
        assert!(lost.remember(&rows, false).is_err());
        let kept = SharedOrigins::new(vec![])
            .unwrap()
            .remembering_pushes(dir.path());
        assert!(kept.remember(&rows, false).is_ok());
        assert!(SharedOrigins::new(vec![])
            .unwrap()
            .remember(&rows, false)
            .is_ok());
    }

    /// A row's query filter shapes the keys of its requests only, and a malformed one is
    /// refused naming the field.
    #[test]
    fn rows_key_requests_with_their_query_filter() {
        let mut filtered = entry("q.test", Some("/shop/"), "http://127.0.0.1:1");
        filtered.cache_key_ignore_query = vec!["utm_*".into()];
        let table = OriginTable::build(&[
            filtered.clone(),
            entry("q.test", None, "http://127.0.0.1:1"),
        ])
        .unwrap();
        assert_eq!(
            table.cache_key("Q.test:8080", "/shop/a?utm_source=x&id=1"),
            "q.test/shop/a?id=1"
        );
        assert_eq!(
            table.cache_key("q.test", "/a?utm_source=x"),
            "q.test/a?utm_source=x"
        );
        assert_eq!(
            table.cache_key("other", "/a?utm_source=x"),
            "other/a?utm_source=x"
        );
        assert_eq!(
            table.normalize_key("q.test/shop/b?utm_medium=m").as_deref(),
            Some("q.test/shop/b")
        );
        assert_eq!(table.normalize_key("no-slash"), None);
        filtered.cache_key_ignore_query = vec!["a=b".into()];
        let err = OriginTable::build(&[filtered]).unwrap_err().to_string();
        assert!(err.contains("origins[0].cache_key_ignore_query"), "{err}");
    }

    fn entry(host: &str, prefix: Option<&str>, up: &str) -> OriginEntry {
        OriginEntry {
            host: host.into(),
            path_prefix: prefix.map(Into::into),
            upstream: up.into(),
            forward_host: false,
            strip_set_cookie: false,
            cache_key_ignore_query: Vec::new(),
            registered_at_ms: None,
        }
    }

    /// An upstream whose port, credentials or query would be silently dropped is refused,
    /// naming the field and why.
    #[test]
    fn upstream_urls_that_would_lose_a_part_are_refused() {
        for (up, why) in [
            ("http://127.0.0.1:80800", "port"),
            ("http://127.0.0.1:8o80", "port"),
            ("http://127.0.0.1:0", "port"),
            ("http://user:pass@127.0.0.1:9000", "credentials"),
            ("https://127.0.0.1:9000/?token=x", "query"),
        ] {
            let err = OriginTable::build(&[entry("example.com", None, up)])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("origins[0].upstream") && err.contains(why),
                "{up}: {err}"
            );
        }
        let t = OriginTable::build(&[entry("example.com", None, "https://127.0.0.1")]).unwrap();
        assert_eq!(t.select("example.com", "/").unwrap().addr.port(), 443);
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
        assert_eq!(
            t.select("example.com.:80", "/").unwrap().addr.port(),
            9000,
            "fully qualified"
        );
        assert!(t.select("other.com", "/").is_none());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn an_ipv6_origin_is_dialled_and_verified_without_brackets() {
        let t = OriginTable::build(&[entry("v6.test", None, "https://[::1]:9443")]).unwrap();
        let o = t.select("v6.test", "/").unwrap();
        assert_eq!(o.addr, "[::1]:9443".parse().unwrap());
        assert!(o.tls);
        assert_eq!(o.authority, "::1", "rustls refuses a bracketed server name");
        assert_eq!(o.host_header, "[::1]:9443");
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
    fn pushed_rows_override_and_bad_rows_are_left_out_alone() {
        let shared = SharedOrigins::new(vec![entry("a", None, "http://127.0.0.1:1")]).unwrap();
        let r = shared.replace_pushed(
            vec![
                entry("A", None, "http://127.0.0.1:2"),
                entry("b", None, "http://127.0.0.1:3"),
            ],
            true,
        );
        assert_eq!((r.origins, r.rejected.len()), (2, 0));
        assert_eq!(shared.current().select("a", "/").unwrap().addr.port(), 2);
        // One bad row, one duplicate: both reported, the good row still applies.
        let r = shared.replace_pushed(
            vec![
                entry("c", None, "ftp://x"),
                entry("b", None, "http://127.0.0.1:4"),
                entry("B", None, "http://127.0.0.1:5"),
            ],
            true,
        );
        let bad: Vec<_> = r
            .rejected
            .iter()
            .map(|x| (x.index, x.host.as_str()))
            .collect();
        assert_eq!(bad, [(0, "c"), (2, "B")]);
        assert!(
            r.rejected[1].error.contains("duplicate"),
            "{:?}",
            r.rejected
        );
        assert_eq!(shared.current().select("b", "/").unwrap().addr.port(), 4);
        assert_eq!(shared.current().select("a", "/").unwrap().addr.port(), 1);
        assert_eq!(shared.rows().1.len(), 1);
        shared.replace_pushed(vec![], true);
        assert_eq!(shared.current().select("a", "/").unwrap().addr.port(), 1);
        assert!(shared.current().select("b", "/").is_none());
    }

    #[test]
    fn pushed_rows_on_private_addresses_need_the_brokers_leave() {
        // The operator's own rows may point anywhere.
        let shared = SharedOrigins::new(vec![entry("a", None, "http://127.0.0.1:1")]).unwrap();
        let r = shared.replace_pushed(
            vec![
                entry("b", None, "http://10.1.2.3:80"),
                entry("c", None, "http://[::1]:80"),
                entry("d", None, "http://93.184.215.14"),
            ],
            false,
        );
        assert_eq!(r.rejected.len(), 2, "{:?}", r.rejected);
        assert!(r.rejected[0].error.contains("private"), "{:?}", r.rejected);
        let t = shared.current();
        assert!(t.select("b", "/").is_none() && t.select("c", "/").is_none());
        assert!(t.select("a", "/").is_some() && t.select("d", "/").is_some());
        // A name is judged by what it resolves to, not how it is spelled.
        let to_loopback = |_: &str, port: u16| Ok(Some(SocketAddr::from(([127, 0, 0, 1], port))));
        let r = shared.replace_pushed_with(
            vec![entry("e", None, "http://innocent.example")],
            false,
            to_loopback,
        );
        assert_eq!(r.rejected.len(), 1);
        let r = shared.replace_pushed_with(
            vec![entry("e", None, "http://innocent.example")],
            true,
            to_loopback,
        );
        assert!(r.rejected.is_empty());
        let private = "127.0.0.1 10.0.0.1 172.16.0.1 192.168.1.1 169.254.169.254 100.64.0.1 \
            0.0.0.0 0.1.2.3 198.18.0.1 192.0.0.8 224.0.0.1 240.0.0.1 255.255.255.255 ::1 :: \
            fd00::1 fe80::1 fec0::1 ff02::1 ::ffff:10.0.0.1 ::10.0.0.1 64:ff9b::a9fe:a9fe \
            64:ff9b:1::5db8:d70e 2002:a00:1::1 2001:0:4136:e378::1";
        for ip in private.split_whitespace() {
            assert!(is_private_ip(ip.parse().unwrap()), "{ip}");
        }
        let public = "93.184.215.14 100.128.0.1 198.20.0.1 192.0.2.1 2606:4700::1111 \
            64:ff9b::5db8:d70e 2002:5db8:d70e::1 2001:db8::1 ::ffff:93.184.215.14";
        for ip in public.split_whitespace() {
            assert!(!is_private_ip(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_fleet_sized_push_applies_whole_and_reuses_its_addresses() {
        // 20,000 rows twice (the second push reuses every address; rows are matched to the
        // table by index, not by a scan per row, which made this 4e8 comparisons a push).
        let shared = SharedOrigins::new(vec![]).unwrap();
        let rows = || {
            let mut rows: Vec<OriginEntry> = (0..20_000)
                .map(|i| entry(&format!("h{i}.example"), None, "http://origin.example"))
                .collect();
            rows.push(entry("h7.example", None, "http://other.example"));
            rows
        };
        let public = |_: &str, port: u16| Ok(Some(SocketAddr::from(([93, 184, 215, 14], port))));
        assert_eq!(shared.names_to_resolve(&rows()).len(), 2);
        for _ in 0..2 {
            let r = shared.replace_pushed_with(rows(), false, public);
            assert_eq!(r.rejected.len(), 1, "the duplicate route");
            assert_eq!(r.origins, 20_000);
        }
        // Only the refused row's name is asked again.
        assert_eq!(
            shared.names_to_resolve(&rows()),
            [("other.example".to_string(), 80)]
        );
    }

    #[test]
    fn pushed_names_are_resolved_once_a_minute_and_kept_through_an_hour_of_failures() {
        let shared = SharedOrigins::new(vec![]).unwrap();
        let row = || vec![entry("a", None, "http://origin.example:8080")];
        let public = |_: &str, port: u16| Ok(Some(SocketAddr::from(([93, 184, 215, 14], port))));
        let down = |_: &str, _: u16| Err(std::io::Error::other("temporary failure"));
        let unasked = |h: &str, _: u16| -> std::io::Result<Option<SocketAddr>> {
            panic!("{h} resolved again while its address is fresh")
        };
        let age = |by: Duration| {
            for p in shared.pushed.lock().iter_mut() {
                p.resolved = p.resolved.checked_sub(by).unwrap();
                p.looked_up = p.looked_up.checked_sub(by).unwrap();
            }
        };
        let addr = || shared.current().select("a", "/").map(|o| o.addr);
        let expected = SocketAddr::from(([93, 184, 215, 14], 8080));
        assert_eq!(
            shared.names_to_resolve(&row()),
            [("origin.example".to_string(), 8080)]
        );
        assert!(shared
            .replace_pushed_with(row(), false, public)
            .rejected
            .is_empty());
        // Pushed again within the minute: nothing to resolve.
        assert!(shared.names_to_resolve(&row()).is_empty());
        assert!(shared
            .replace_pushed_with(row(), false, unasked)
            .rejected
            .is_empty());
        // A minute on, it is resolved again; a failure keeps the last address.
        age(RESOLVE_EVERY);
        assert_eq!(shared.names_to_resolve(&row()).len(), 1);
        let r = shared.replace_pushed_with(row(), false, down);
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        assert_eq!(addr(), Some(expected));
        // The failed lookup stands for a minute too.
        assert!(shared.names_to_resolve(&row()).is_empty());
        // An option changed alone keeps the row, with the option, at its last address.
        let stripped = || {
            let mut rows = row();
            rows[0].strip_set_cookie = true;
            rows
        };
        assert!(shared.names_to_resolve(&stripped()).is_empty());
        let r = shared.replace_pushed_with(stripped(), false, down);
        assert!(r.rejected.is_empty(), "{:?}", r.rejected);
        let current = shared.current();
        let o = current.select("a", "/").unwrap();
        assert_eq!((o.addr, o.strip_set_cookie), (expected, true));
        // An hour of failures, and the row goes.
        age(KEEP_UNRESOLVED);
        let r = shared.replace_pushed_with(row(), false, down);
        assert!(
            r.rejected[0].error.contains("cannot resolve"),
            "{:?}",
            r.rejected
        );
        assert_eq!(addr(), None);
        // A row never resolved before is reported at once.
        let r =
            shared.replace_pushed_with(vec![entry("b", None, "http://new.example")], false, down);
        assert!(
            r.rejected[0].error.contains("cannot resolve"),
            "{:?}",
            r.rejected
        );
    }

    #[test]
    fn a_name_that_fails_is_not_looked_up_again_for_a_minute() {
        let shared = SharedOrigins::new(vec![]).unwrap();
        let rows = || {
            vec![
                entry("slow", None, "http://blackholed.example"),
                entry("ok", None, "http://fine.example"),
            ]
        };
        let names = shared.names_to_resolve(&rows());
        assert_eq!(names.len(), 2);
        let found: Lookups = [
            (
                ("blackholed.example".to_string(), 80),
                Err("no answer within 1.5s".to_string()),
            ),
            (
                ("fine.example".to_string(), 80),
                Ok(SocketAddr::from(([93, 184, 215, 14], 80))),
            ),
        ]
        .into();
        let r = shared.apply_push(rows(), false, &found);
        assert_eq!(r.rejected.len(), 1);
        assert!(
            r.rejected[0].error.contains("no answer"),
            "{:?}",
            r.rejected
        );
        // The next pushes within the minute ask for nothing and report the same reason.
        assert!(shared.names_to_resolve(&rows()).is_empty());
        let r = shared.apply_push(rows(), false, &Lookups::new());
        assert_eq!(r.rejected.len(), 1);
        assert!(
            r.rejected[0].error.contains("no answer"),
            "{:?}",
            r.rejected
        );
        assert!(shared.current().select("ok", "/").is_some());
    }

    #[test]
    fn https_defaults_to_443() {
        let t = OriginTable::build(&[entry("a", None, "https://127.0.0.1")]).unwrap();
        let o = t.select("a", "/").unwrap();
        assert!(o.tls);
        assert_eq!(o.addr.port(), 443);
    }
}
