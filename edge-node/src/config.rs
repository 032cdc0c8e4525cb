//! Edge configuration: a TOML file, overridden by `SHADOWCDN_EDGE_*` environment variables,
//! overridden by command-line flags.
//!
//! Parsing is strict (`deny_unknown_fields`, typed sizes and URLs) so that a typo is an error
//! naming the bad field at start-up rather than a silently ignored setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::origin::{OriginError, OriginTable};

/// Everything an edge needs to run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Identity of this edge in logs and metrics (e.g. `eu-1a`).
    #[serde(default = "default_node_id")]
    pub node_id: String,
    /// The user-facing HTTP listener and worker settings.
    pub server: ServerSection,
    /// The operator listener: purge, metrics, health.
    pub admin: AdminSection,
    /// The foyer-backed HTTP cache.
    pub cache: CacheSection,
    /// Host (and optional path prefix) → upstream origin.
    #[serde(default)]
    pub origins: Vec<OriginEntry>,
    /// Shadow (pre-positioning) fills.
    #[serde(default)]
    pub shadow: ShadowSection,
    /// QUIC with the broker (control) and peer edges (peer fills); absent: the edge takes
    /// shadows and purges over its admin API only and never fills from peers.
    #[serde(default)]
    pub sync: Option<SyncSection>,
}

/// The QUIC listener and this node's identity in the cluster PKI.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    /// UDP address of the QUIC listener.
    pub listen: SocketAddr,
    /// The cluster CA certificate (PEM); peers must chain to it.
    pub ca_cert: PathBuf,
    /// This edge's certificate (PEM), issued for `<node_id>.edge.shadowcdn`.
    pub cert: PathBuf,
    /// This edge's private key (PEM).
    pub key: PathBuf,
    /// The cluster CA's revocation list (PEM; `edge-node certs ca` makes it, `certs revoke`
    /// adds to it), read again every 30 s: nodes it names are refused at the handshake, their
    /// connections to this edge are closed at the read, and this edge's connections to them
    /// at their next message.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

impl SyncSection {
    /// The PEM paths as the TLS layer takes them.
    pub fn tls_paths(&self) -> crate::sync::TlsPaths {
        crate::sync::TlsPaths {
            ca_cert: self.ca_cert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            crl: self.crl.clone(),
        }
    }
}

/// Limits on shadow fills, so they never starve user traffic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSection {
    /// Shadow fills running at once.
    #[serde(default = "default_fill_concurrency")]
    pub fill_concurrency: usize,
    /// Shadow requests waiting to be filled; beyond it requests are refused (503).
    #[serde(default = "default_fill_queue")]
    pub fill_queue: usize,
    /// Longest shadow TTL accepted.
    #[serde(default = "default_max_ttl")]
    pub max_ttl_secs: u64,
    /// Bytes per second shadow fills may average (unset: unlimited), so prefetching never
    /// saturates the origin's or a peer's link.
    #[serde(default)]
    pub fill_bandwidth: Option<ByteSize>,
}

impl Default for ShadowSection {
    fn default() -> Self {
        ShadowSection {
            fill_concurrency: default_fill_concurrency(),
            fill_queue: default_fill_queue(),
            max_ttl_secs: default_max_ttl(),
            fill_bandwidth: None,
        }
    }
}

/// User-facing listener settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address the HTTP proxy listens on.
    pub listen: SocketAddr,
    /// Worker threads for the proxy service.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Whether the proxy's worker threads share one work-stealing runtime (`true`) or each
    /// run a runtime of its own, with every connection pinned to one thread (`false`, the
    /// default: a cache hit then never wakes another thread; 9% less CPU per 1 KiB hit, no
    /// difference at 100 KiB, in bench/RESULTS.md).
    #[serde(default)]
    pub work_stealing: bool,
    /// On SIGTERM the listeners stop accepting at once and in-flight requests get up to this
    /// many seconds to finish; the edge exits as soon as none is left.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
    /// Seconds the runtimes get to finish in-flight work after the grace period.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u64,
    /// Seconds to wait for an origin TCP connection.
    #[serde(default = "default_connect_timeout")]
    pub origin_connect_timeout_secs: u64,
    /// Seconds an origin read may stall before the fetch fails.
    #[serde(default = "default_read_timeout")]
    pub origin_read_timeout_secs: u64,
    /// The brokers in front of the edge: their `X-Forwarded-Proto` is passed on to the origin
    /// and their peer hints and route tags are taken. From any other address the header is
    /// replaced with this listener's scheme and hints are ignored, so a client that reaches
    /// the edge directly can neither claim to have arrived over HTTPS nor send its misses to
    /// a peer. Default: loopback and the private ranges (RFC 1918, RFC 4193), where brokers
    /// normally run; brokers elsewhere (a CGNAT pod range, say) must be listed.
    #[serde(default = "default_trusted_proxies")]
    pub trusted_proxies: Vec<IpNet>,
    /// Where each request's access line goes (one JSON object per line): a file path, created
    /// if missing and reopened when rotated away, or `stdout`. Absent: no access log.
    #[serde(default)]
    pub access_log: Option<String>,
    /// Compression level (1–9, fastest to smallest; `0` turns it off) for text responses sent
    /// to clients that accept gzip, brotli or zstd (see [`crate::compression`]). Default 1,
    /// the level whose CPU cost per byte is lowest.
    #[serde(default = "default_compression_level")]
    pub compression_level: u32,
}

/// The tokens the project's own files carry: the manifests' placeholder for the value a
/// Secret sets, and the local cluster's demo tokens. Anyone can read them, so an admin API
/// reachable beyond loopback must not take them (a missing env file or Secret key would
/// otherwise leave one quietly in force).
pub const SHIPPED_TOKENS: [&str; 3] = [
    "set-by-env",
    "local-admin-token",
    "local-operator-token-change-me",
];

/// Why `token`, guarding a listener on `listen`, must not be used: the placeholder never;
/// a demo token off loopback. `None`: it may.
pub fn shipped_token(token: &str, listen: SocketAddr) -> Option<&'static str> {
    let token = token.trim();
    if token == SHIPPED_TOKENS[0] {
        return Some("is the shipped placeholder: set it (from the environment or a Secret)");
    }
    (SHIPPED_TOKENS.contains(&token) && !listen.ip().is_loopback())
        .then_some("is a demo token from this project's files: anyone can read it; set your own")
}

/// Operator listener settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the admin HTTP listener (keep it off the public interface).
    pub listen: SocketAddr,
    /// Bearer token every admin route needs but `/metrics`, `/healthz` and `/readyz`, open so that
    /// scrapers and probes need no secret.
    pub token: String,
}

/// Cache sizing and HTTP caching defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Directory of the disk tier (created if missing). Survives restarts.
    pub dir: PathBuf,
    /// Memory tier capacity. Entries are weighed by all they hold: body, serialized
    /// metadata, and the header kept decoded for hits (about 3 KB for a typical response).
    #[serde(default = "default_memory")]
    pub memory_capacity: ByteSize,
    /// Disk tier capacity.
    #[serde(default = "default_disk")]
    pub disk_capacity: ByteSize,
    /// Bodies larger than this are proxied without being cached.
    #[serde(default = "default_max_object")]
    pub max_object_size: ByteSize,
    /// Memory all bodies being filled from origins or peers may keep for the cache together.
    /// Beyond it a fill still streams to its clients but is not cached (the next miss tries
    /// again), and while it is in use every fill passing through holds at most a 4 MiB window
    /// for its slowest client (a client further behind is cut off): a burst of large misses
    /// costs about this plus 4 MiB per such miss, not a whole object each.
    #[serde(default = "default_max_fill_memory")]
    pub max_fill_memory: ByteSize,
    /// Shards of the memory tier. More shards mean less lock contention between worker
    /// threads, but each shard holds `memory_capacity / memory_shards`, and storing an object
    /// larger than its shard (or reading one back from disk) empties that shard. Unset: the
    /// most of 8, 4, 2, 1 whose shards each hold two `max_object_size` objects
    /// ([`CacheSection::memory_shards`]).
    #[serde(default)]
    pub memory_shards: Option<usize>,
    /// How long a request waits behind another request filling the same object before it
    /// goes to the origin itself.
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout_secs: u64,
    /// Freshness given to cacheable responses (200, 301, 404…) that carry no explicit
    /// lifetime. `0` (the default) caches only what the origin explicitly allows.
    #[serde(default)]
    pub default_ttl_secs: u64,
    /// Default stale-while-revalidate window when the origin states none.
    #[serde(default)]
    pub stale_while_revalidate_secs: u32,
    /// Default stale-if-error window when the origin states none.
    #[serde(default)]
    pub stale_if_error_secs: u32,
    /// How long purge-by-prefix bans are kept. Objects stored before the oldest retained ban
    /// horizon are treated as misses, so a ban can never be forgotten while it still matters.
    #[serde(default = "default_ban_retention")]
    pub ban_retention_secs: u64,
    /// How long a write and fsync in `dir` may take before the disk counts as stalled and the
    /// edge answers not ready (`GET /readyz`, which the broker's health checks ask), so its
    /// clients go to another edge rather than wait on the disk with their reads; also the
    /// longest a read of the disk tier is waited for before it counts as a miss.
    #[serde(default = "default_disk_stall")]
    pub disk_stall_secs: u64,
}

/// The fields of an [`OriginEntry`]. A pushed row's other fields are options of a newer
/// broker: the edge leaves them out and says so (see [`crate::admin`]), rather than refusing
/// the push. A row in the config file must not have any (a typo there is an error).
pub const ORIGIN_ENTRY_FIELDS: [&str; 7] = [
    "host",
    "path_prefix",
    "upstream",
    "forward_host",
    "strip_set_cookie",
    "cache_key_ignore_query",
    "registered_at_ms",
];

/// One row of the origin table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OriginEntry {
    /// Host header value this row serves (case-insensitive, port ignored).
    pub host: String,
    /// Optional path prefix; the longest matching prefix wins.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// `http://` or `https://` URL of the origin.
    pub upstream: String,
    /// Send the client's Host (port stripped, as in the cache key) to the origin instead of
    /// the upstream URL's host (default false: an origin shared by many sites, such as an
    /// object-store bucket, only answers to its own name).
    #[serde(default)]
    pub forward_host: bool,
    /// Remove `Set-Cookie` from the origin's responses (default false). A response that sets a
    /// cookie is never cached, so a site whose origin sets one on every response (analytics,
    /// a load balancer's affinity cookie) would get no caching; with this the edge drops the
    /// cookies and caches the rest. Only for sites whose clients need none of them.
    #[serde(default)]
    pub strip_set_cookie: bool,
    /// Query parameters left out of the cache key (`utm_*`, `fbclid`; `*` for the whole
    /// query): requests that differ only in them share one cached copy. See
    /// [`crate::cache_key`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache_key_ignore_query: Vec<String>,
    /// When the host's current owner registered it (ms since the Unix epoch, on the clock of
    /// the broker that pushed the row; refused in the config file). Objects the edge cached
    /// for the host before then belong to a previous owner (an edge down through that owner's
    /// delete and this registration still holds them) and are never served: see
    /// [`crate::ownership`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_at_ms: Option<u64>,
}

/// Longest drain or runtime shutdown a config may ask for (the broker's drain too): the
/// grace period and the drain's deadline are computed from it.
pub const MAX_STOP_SECS: u64 = 3600;

/// Whether two TCP listen addresses would take the same port: equal ports (not 0, which the
/// system picks) on the same IP, or where either is a wildcard (a dual-stack `[::]` covers
/// IPv4 too).
pub fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Command-line overrides; each one that is set wins over file and environment.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    /// `server.listen`
    pub listen: Option<SocketAddr>,
    /// `admin.listen`
    pub admin_listen: Option<SocketAddr>,
    /// `cache.dir`
    pub cache_dir: Option<PathBuf>,
    /// `server.threads`
    pub threads: Option<usize>,
    /// `node_id`
    pub node_id: Option<String>,
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, an environment variable or a flag has a bad or missing field.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The origin table has a bad row.
    #[error("invalid configuration: {0}")]
    Origin(#[from] OriginError),
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        // figment names the offending key path (e.g. `cache.memory_capacity`) and its source.
        let msgs: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
        ConfigError::Invalid(msgs.join("; "))
    }
}

/// Merge the environment variables `prefix`* into `fig` (`__` separates sections:
/// `SHADOWCDN_EDGE_CACHE__DIR` is `cache.dir`; `<prefix>CONFIG` names the file, not a key).
/// The string settings `verbatim` (tokens, ids; `admin__token`) are taken as written: figment
/// reads `31415926535` or `0123` from the environment as a number, which a string setting
/// refuses with an error that prints the secret, or would keep as `123`.
/// A variable of those that is not UTF-8 is an error naming it (figment would read the others
/// lossily; a token read so could never match).
pub fn merge_env(mut fig: Figment, prefix: &str, verbatim: &[&str]) -> Result<Figment, String> {
    let mut skipped = vec!["config"];
    skipped.extend_from_slice(verbatim);
    fig = fig.merge(Env::prefixed(prefix).ignore(&skipped).split("__"));
    for key in verbatim {
        // Names match regardless of case, as figment matches the others.
        let var = format!("{prefix}{key}");
        let value = std::env::vars_os().find_map(|(k, v)| {
            let name = k.to_str()?;
            name.eq_ignore_ascii_case(&var)
                .then(|| v.into_string().map_err(|_| name.to_string()))
        });
        match value {
            Some(Ok(value)) => fig = fig.merge(Serialized::default(&key.replace("__", "."), value)),
            Some(Err(name)) => {
                return Err(format!("environment variable {name} is not valid UTF-8"))
            }
            None => {}
        }
    }
    Ok(fig)
}

/// The file a `--config` names, as figment reads it: exactly that path (figment's `file`
/// would look for a relative one in every parent directory, and read a directory as no
/// settings at all).
pub fn config_file(path: &Path) -> Result<figment::providers::Data<Toml>, String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(Toml::file_exact(path)),
        Ok(_) => Err(format!("config file {} is not a file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("config file {} does not exist", path.display()))
        }
        Err(e) => Err(format!("config file {}: {e}", path.display())),
    }
}

/// Why a configured bearer token guarding a listener on `listen` cannot be used, if it
/// cannot: shorter than `min_len`, one of this project's own ([`shipped_token`]), or one no
/// request could carry ([`token_problem`]).
pub fn token_refusal(token: &str, listen: SocketAddr, min_len: usize) -> Option<String> {
    if token.trim().len() < min_len {
        return Some(format!("must be at least {min_len} characters"));
    }
    shipped_token(token, listen)
        .or_else(|| token_problem(token))
        .map(str::to_string)
}

/// What is wrong with `token` as a bearer token an operator configured, if anything. A request's
/// token is read as ASCII (HTTP field values) and trimmed, so one with spaces around it, a
/// control character or a non-ASCII letter could never match: every call would be refused.
pub fn token_problem(token: &str) -> Option<&'static str> {
    if token.trim() != token {
        Some("must not begin or end with whitespace")
    } else if !token.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        Some("must hold only printable ASCII characters (no control characters, no letters outside ASCII)")
    } else {
        None
    }
}

impl EdgeConfig {
    /// Load from an optional TOML file, then `SHADOWCDN_EDGE_` environment variables
    /// (`__` separates sections: `SHADOWCDN_EDGE_CACHE__DIR`), then `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut fig = Figment::new();
        if let Some(p) = path {
            fig = fig.merge(config_file(p).map_err(ConfigError::Invalid)?);
        }
        fig = merge_env(fig, "SHADOWCDN_EDGE_", &["admin__token", "node_id"])
            .map_err(ConfigError::Invalid)?;
        fig = fig.merge(Serialized::defaults(OverrideTree::from(overrides)));
        let cfg: EdgeConfig = fig.extract()?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Parse a TOML string (used by tests and embedded defaults).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: EdgeConfig = Figment::from(Toml::string(text)).extract()?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Cross-field rules that types alone cannot express.
    fn check(&self) -> Result<(), ConfigError> {
        if self.server.compression_level > crate::compression::MAX_LEVEL {
            return Err(ConfigError::Invalid(format!(
                "server.compression_level must be between 0 (off) and {}",
                crate::compression::MAX_LEVEL
            )));
        }
        let c = &self.cache;
        // Empty, the cache (disk tier, ban log, pushed origins) would land in whatever the
        // working directory happens to be.
        if c.dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "cache.dir must not be empty: the directory of the disk tier and the edge's state"
                    .into(),
            ));
        }
        if c.memory_capacity.as_u64() < 1024 * 1024 {
            return Err(ConfigError::Invalid(
                "cache.memory_capacity must be at least 1 MiB".into(),
            ));
        }
        let disk = c.disk_capacity.as_u64();
        if disk != 0 && disk < 4 * BLOCK_FLOOR {
            return Err(ConfigError::Invalid(format!(
                "cache.disk_capacity must be 0 (memory only) or at least {}",
                ByteSize(4 * BLOCK_FLOOR)
            )));
        }
        if c.max_object_size.as_u64() == 0 {
            return Err(ConfigError::Invalid(
                "cache.max_object_size must be greater than 0".into(),
            ));
        }
        if c.max_fill_memory < c.max_object_size {
            return Err(ConfigError::Invalid(
                "cache.max_fill_memory must be at least cache.max_object_size".into(),
            ));
        }
        if c.memory_shards.is_some_and(|n| n == 0 || n > 1024) {
            return Err(ConfigError::Invalid(
                "cache.memory_shards must be between 1 and 1024".into(),
            ));
        }
        // An object's body must fit one memory shard: a larger one could not be held beside
        // anything at all (one of exactly a shard, whose metadata then overflows it, is held
        // until the shard's next insert). One over half a shard may be wanted (a memory-only
        // cache measured against offline policies, which admit anything up to the cache size)
        // but evicts most of its shard whenever it is stored or read back from disk: allowed,
        // and warned about at start ([`CacheSection::large_objects_crowd_shards`]).
        let shard = c.memory_shard_bytes();
        if c.max_object_size > c.memory_capacity {
            return Err(ConfigError::Invalid(format!(
                "cache.max_object_size ({}) must be at most cache.memory_capacity ({})",
                c.max_object_size, c.memory_capacity
            )));
        }
        if c.max_object_size.as_u64() > shard {
            return Err(ConfigError::Invalid(format!(
                "cache.max_object_size ({}) must be at most a memory shard, \
                 cache.memory_capacity / cache.memory_shards ({}): use fewer shards or leave \
                 memory_shards unset",
                c.max_object_size,
                ByteSize(shard)
            )));
        }
        if disk != 0 && c.max_object_size.as_u64() > disk / 4 {
            return Err(ConfigError::Invalid(
                "cache.max_object_size must be at most a quarter of cache.disk_capacity".into(),
            ));
        }
        if c.max_object_size.as_u64() > MAX_OBJECT_BYTES {
            return Err(ConfigError::Invalid(format!(
                "cache.max_object_size must be at most {} (the stored body's length field)",
                ByteSize(MAX_OBJECT_BYTES)
            )));
        }
        let at_least_one = [
            (
                "server.origin_connect_timeout_secs",
                self.server.origin_connect_timeout_secs,
            ),
            (
                "server.origin_read_timeout_secs",
                self.server.origin_read_timeout_secs,
            ),
            // 0 would turn request coalescing off: every concurrent miss to the origin.
            ("cache.lock_timeout_secs", c.lock_timeout_secs),
            // 0 would call every probe a stall.
            ("cache.disk_stall_secs", c.disk_stall_secs),
            // 0 would silently mean 1.
            (
                "shadow.fill_concurrency",
                self.shadow.fill_concurrency as u64,
            ),
            ("shadow.fill_queue", self.shadow.fill_queue as u64),
            // A pace of 0 would mean no limit, the opposite of what it says: unset is that.
            (
                "shadow.fill_bandwidth",
                self.shadow.fill_bandwidth.map_or(1, |b| b.as_u64()),
            ),
            ("shadow.max_ttl_secs", self.shadow.max_ttl_secs),
        ];
        for (field, v) in at_least_one {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{field} must be at least 1")));
            }
        }
        // Bounds past any real need: larger values would overflow a count or a semaphore
        // after start-up instead of failing here.
        for (field, v, max) in [
            ("server.threads", self.server.threads as u64, MAX_THREADS),
            (
                "shadow.fill_concurrency",
                self.shadow.fill_concurrency as u64,
                MAX_FILL_CONCURRENCY,
            ),
            (
                "shadow.fill_queue",
                self.shadow.fill_queue as u64,
                MAX_FILL_QUEUE,
            ),
        ] {
            if v > max {
                return Err(ConfigError::Invalid(format!(
                    "{field} must be at most {max}"
                )));
            }
        }
        for (field, v) in [
            ("cache.default_ttl_secs", c.default_ttl_secs),
            ("shadow.max_ttl_secs", self.shadow.max_ttl_secs),
            ("cache.ban_retention_secs", c.ban_retention_secs),
        ] {
            if v > MAX_TTL_SECS {
                return Err(ConfigError::Invalid(format!(
                    "{field} must be at most {MAX_TTL_SECS} (10 years)"
                )));
            }
        }
        // An expired ban becomes a floor for its whole host (objects stored before it count
        // as absent), so a short retention turns every prefix purge into a host purge.
        if c.ban_retention_secs < MIN_BAN_RETENTION_SECS {
            return Err(ConfigError::Invalid(format!(
                "cache.ban_retention_secs must be at least {MIN_BAN_RETENTION_SECS} (1 hour)"
            )));
        }
        if let Some(why) = token_refusal(&self.admin.token, self.admin.listen, 8) {
            return Err(ConfigError::Invalid(format!("admin.token {why}")));
        }
        // Shadow and peer fills go through the edge's own proxy at this address: a port the
        // system picks would leave them knocking on port 0.
        if self.server.listen.port() == 0 {
            return Err(ConfigError::Invalid(
                "server.listen needs a port (not 0): the edge's own fills connect to it".into(),
            ));
        }
        // The proxy binds after the admin listener: on the same port (or a wildcard address
        // covering the other's), it would fail to bind while the admin API answered on it.
        if listeners_overlap(self.server.listen, self.admin.listen) {
            return Err(ConfigError::Invalid(format!(
                "admin.listen ({}) must not share a port with server.listen ({})",
                self.admin.listen, self.server.listen
            )));
        }
        if self.server.threads == 0 {
            return Err(ConfigError::Invalid(
                "server.threads must be at least 1".into(),
            ));
        }
        // The grace period and the drain's deadline are computed from these.
        for (field, secs) in [
            ("server.drain_timeout_secs", self.server.drain_timeout_secs),
            (
                "server.shutdown_timeout_secs",
                self.server.shutdown_timeout_secs,
            ),
        ] {
            if secs > MAX_STOP_SECS {
                return Err(ConfigError::Invalid(format!(
                    "{field} must be at most {MAX_STOP_SECS} (1 hour)"
                )));
            }
        }
        let id = &self.node_id;
        if !valid_node_id(id) {
            return Err(ConfigError::Invalid(format!(
                "node_id {id:?} must be {NODE_ID_RULE}"
            )));
        }
        if let Some(i) = self
            .origins
            .iter()
            .position(|o| o.registered_at_ms.is_some())
        {
            return Err(ConfigError::Invalid(format!(
                "origins[{i}].registered_at_ms is set by the broker's pushes, not in the config file"
            )));
        }
        OriginTable::build(&self.origins)?;
        Ok(())
    }

    /// Size of a foyer disk block: large enough for the largest admitted object plus its
    /// metadata, never below foyer's default.
    pub fn block_size(&self) -> usize {
        let need = self.cache.max_object_size.as_u64() + 256 * 1024;
        need.max(BLOCK_FLOOR) as usize
    }
}

/// Largest body the stored object format can hold (a u32 length).
const MAX_OBJECT_BYTES: u64 = u32::MAX as u64;
/// Longest lifetime a config may give: beyond it deadlines overflow, and no CDN object needs it.
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
/// Most worker threads a server may be given.
pub const MAX_THREADS: u64 = 1024;
/// Most shadow fills at once.
const MAX_FILL_CONCURRENCY: u64 = 4096;
/// Most shadow orders queued.
const MAX_FILL_QUEUE: u64 = 1 << 20;
/// Shortest prefix-ban retention (see `check`).
const MIN_BAN_RETENTION_SECS: u64 = 3600;

/// foyer's default block size; also the smallest we use.
const BLOCK_FLOOR: u64 = 16 * 1024 * 1024;

/// Nested shape of [`Overrides`] so figment merges it by key path.
#[derive(Serialize)]
struct OverrideTree {
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<String>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    server: serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    admin: serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    cache: serde_json::Map<String, serde_json::Value>,
}

impl From<&Overrides> for OverrideTree {
    fn from(o: &Overrides) -> Self {
        let mut t = OverrideTree {
            node_id: o.node_id.clone(),
            server: Default::default(),
            admin: Default::default(),
            cache: Default::default(),
        };
        if let Some(l) = o.listen {
            t.server.insert("listen".into(), l.to_string().into());
        }
        if let Some(n) = o.threads {
            t.server.insert("threads".into(), n.into());
        }
        if let Some(l) = o.admin_listen {
            t.admin.insert("listen".into(), l.to_string().into());
        }
        if let Some(d) = &o.cache_dir {
            t.cache
                .insert("dir".into(), d.to_string_lossy().into_owned().into());
        }
        t
    }
}

/// What [`valid_node_id`] accepts, for the errors that refuse an id.
pub const NODE_ID_RULE: &str =
    "1-63 characters of letters, digits, '-' and '_', not \"broker\", \"origin\" or \"none\"";

/// Whether `id` can name a node: it appears in certificates (`<id>.edge.shadowcdn`) and
/// response headers, and in `Via` as `shadowcdn-<id>`, where `broker` is the broker's name
/// (an edge of that name would take every routed request for a loop). `origin` and `none` are
/// what the broker's `x-shadowcdn-edge` header and metric labels say when no edge served (the
/// direct-to-origin fallback, a refused request): an edge so named would pass for them.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && !["broker", "origin", "none"]
            .iter()
            .any(|r| id.eq_ignore_ascii_case(r))
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl CacheSection {
    /// The memory tier's shards: as configured, else the most of 8, 4, 2, 1 whose shards each
    /// hold two `max_object_size` objects (1 when none does).
    pub fn memory_shards(&self) -> usize {
        self.memory_shards.unwrap_or_else(|| {
            let (memory, largest) = (self.memory_capacity.as_u64(), self.max_object_size.as_u64());
            [8, 4, 2]
                .into_iter()
                .find(|n| memory / n / 2 >= largest)
                .unwrap_or(1) as usize
        })
    }

    /// Whether an object at `max_object_size` takes over half a memory shard, so that storing
    /// it (or reading it back from disk) evicts most of the shard's other objects.
    pub fn large_objects_crowd_shards(&self) -> bool {
        self.max_object_size.as_u64() > self.memory_shard_bytes() / 2
    }

    /// Bytes one memory shard holds.
    pub fn memory_shard_bytes(&self) -> u64 {
        self.memory_capacity.as_u64() / self.memory_shards() as u64
    }
}

fn default_node_id() -> String {
    "edge".into()
}
fn default_trusted_proxies() -> Vec<IpNet> {
    [
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    ]
    .iter()
    .map(|n| n.parse().expect("a valid network"))
    .collect()
}
fn default_compression_level() -> u32 {
    1
}
fn default_threads() -> usize {
    2
}
fn default_drain_timeout() -> u64 {
    30
}
fn default_shutdown_timeout() -> u64 {
    10
}
fn default_connect_timeout() -> u64 {
    3
}
fn default_read_timeout() -> u64 {
    30
}
fn default_memory() -> ByteSize {
    ByteSize::mib(256)
}
fn default_disk() -> ByteSize {
    ByteSize::gib(4)
}
fn default_max_object() -> ByteSize {
    ByteSize::mib(64)
}
fn default_max_fill_memory() -> ByteSize {
    ByteSize::gib(1)
}
fn default_lock_timeout() -> u64 {
    10
}
fn default_fill_concurrency() -> usize {
    4
}
fn default_fill_queue() -> usize {
    10_000
}
/// The longest TTL the broker's provider API accepts (30 days): a lower default made every
/// order for a resource registered with a longer TTL fail on every edge.
fn default_max_ttl() -> u64 {
    30 * 24 * 3600
}
fn default_disk_stall() -> u64 {
    10
}
fn default_ban_retention() -> u64 {
    30 * 24 * 3600
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [server]
        listen = "127.0.0.1:8080"
        [admin]
        listen = "127.0.0.1:9080"
        token = "secret-token"
        [cache]
        dir = "/tmp/x"
        [[origins]]
        host = "example.com"
        upstream = "http://127.0.0.1:9000"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = EdgeConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.cache.memory_capacity, ByteSize::mib(256));
        assert_eq!(c.cache.max_object_size, ByteSize::mib(64));
        assert_eq!(c.block_size(), 64 * 1024 * 1024 + 256 * 1024);
        assert_eq!(c.cache.max_fill_memory, ByteSize::gib(1));
    }

    #[test]
    fn an_empty_cache_dir_is_refused() {
        let e = EdgeConfig::from_toml(&MINIMAL.replace("dir = \"/tmp/x\"", "dir = \"\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache.dir must not be empty"), "{e}");
    }

    /// The list of row fields names every field of the struct.
    #[test]
    fn origin_entry_fields_are_listed() {
        let full = OriginEntry {
            host: "h".into(),
            path_prefix: Some("/".into()),
            upstream: "http://127.0.0.1:1".into(),
            forward_host: true,
            strip_set_cookie: true,
            cache_key_ignore_query: vec!["utm_*".into()],
            registered_at_ms: Some(1),
        };
        let v = serde_json::to_value(&full).unwrap();
        let mut names: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        names.sort_unstable();
        let mut listed = ORIGIN_ENTRY_FIELDS.to_vec();
        listed.sort_unstable();
        assert_eq!(names, listed);
    }

    #[test]
    fn listeners_sharing_a_port_are_refused() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listeners_overlap(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(listeners_overlap(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(listeners_overlap(a("[::]:80"), a("10.0.0.1:80")));
        assert!(!listeners_overlap(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!listeners_overlap(a("0.0.0.0:80"), a("0.0.0.0:81")));
        assert!(!listeners_overlap(a("127.0.0.1:0"), a("127.0.0.1:0")));
    }

    #[test]
    fn compression_is_on_at_level_one_and_bounded() {
        assert_eq!(
            EdgeConfig::from_toml(MINIMAL)
                .unwrap()
                .server
                .compression_level,
            1
        );
        let with = |level: u32| {
            MINIMAL.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\ncompression_level = {level}"),
            )
        };
        assert_eq!(
            EdgeConfig::from_toml(&with(0))
                .unwrap()
                .server
                .compression_level,
            0
        );
        assert!(EdgeConfig::from_toml(&with(9)).is_ok());
        let err = EdgeConfig::from_toml(&with(10)).unwrap_err().to_string();
        assert!(err.contains("server.compression_level"), "{err}");
    }

    #[test]
    fn fill_memory_must_hold_one_object() {
        let with = |v: &str| {
            MINIMAL.replace(
                "dir = \"/tmp/x\"",
                &format!("dir = \"/tmp/x\"\nmax_fill_memory = \"{v}\""),
            )
        };
        assert!(EdgeConfig::from_toml(&with("64 MiB")).is_ok());
        let err = EdgeConfig::from_toml(&with("63 MiB"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.max_fill_memory"), "{err}");
    }

    #[test]
    fn a_zero_disk_makes_a_memory_only_cache_with_objects_that_fit_in_memory() {
        let mem_only = MINIMAL.replace(
            "dir = \"/tmp/x\"",
            "dir = \"/tmp/x\"\nmemory_capacity = \"4 MiB\"\ndisk_capacity = 0\nmax_object_size = \"512 KiB\"",
        );
        assert!(EdgeConfig::from_toml(&mem_only).is_ok());
        // 1 MiB objects want shards of 2 MiB: unset, the shards are 2 of 2 MiB.
        let mid = mem_only.replace("\"512 KiB\"", "\"1 MiB\"");
        let derived = EdgeConfig::from_toml(&mid).unwrap();
        assert_eq!(derived.cache.memory_shards(), 2);
        assert!(!derived.cache.large_objects_crowd_shards());
        // Objects up to the whole cache in one shard (as offline cache policies admit): allowed,
        // flagged for the start-up warning.
        let whole = mem_only.replace("\"512 KiB\"", "\"4 MiB\"");
        let whole = EdgeConfig::from_toml(&whole).unwrap();
        assert_eq!(whole.cache.memory_shards(), 1);
        assert!(whole.cache.large_objects_crowd_shards());
        let eight = mid.replace("disk_capacity = 0", "disk_capacity = 0\nmemory_shards = 8");
        let err = EdgeConfig::from_toml(&eight).unwrap_err().to_string();
        assert!(err.contains("memory_shards"), "{err}");
        // A disk tier does not change it: a disk hit puts the object back in memory.
        let with_disk = eight.replace("disk_capacity = 0", "disk_capacity = \"64 MiB\"");
        let err = EdgeConfig::from_toml(&with_disk).unwrap_err().to_string();
        assert!(err.contains("memory_shards"), "{err}");
        let too_big = mem_only.replace("\"512 KiB\"", "\"8 MiB\"");
        let err = EdgeConfig::from_toml(&too_big).unwrap_err().to_string();
        assert!(err.contains("memory_capacity"), "{err}");
        let tiny_disk = mem_only.replace("disk_capacity = 0", "disk_capacity = \"1 MiB\"");
        let no_shards =
            mem_only.replace("disk_capacity = 0", "disk_capacity = 0\nmemory_shards = 0");
        assert!(EdgeConfig::from_toml(&no_shards).is_err());
        assert!(EdgeConfig::from_toml(&tiny_disk).is_err());
    }

    #[test]
    fn node_id_must_fit_certificate_names_and_headers() {
        let with_id = |id: &str| format!("node_id = {id:?}\n{MINIMAL}");
        assert!(EdgeConfig::from_toml(&with_id("eu-standby_2")).is_ok());
        for bad in ["", "eu 1", "eu.1", "é", &"x".repeat(64), "origin", "None"] {
            let err = EdgeConfig::from_toml(&with_id(bad))
                .unwrap_err()
                .to_string();
            assert!(err.contains("node_id"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn values_that_would_break_serving_are_refused_by_name() {
        let with = |section: &str, line: &str| {
            let text = if section == "[cache]" {
                MINIMAL.replace("dir = \"/tmp/x\"", &format!("dir = \"/tmp/x\"\n{line}"))
            } else if !MINIMAL.contains(section) {
                format!("{MINIMAL}\n{section}\n{line}")
            } else {
                MINIMAL.replace(section, &format!("{section}\n{line}"))
            };
            EdgeConfig::from_toml(&text)
        };
        for (section, line, field) in [
            ("[server]", "origin_connect_timeout_secs = 0", "origin_connect_timeout_secs"),
            ("[server]", "origin_read_timeout_secs = 0", "origin_read_timeout_secs"),
            ("[cache]", "lock_timeout_secs = 0", "lock_timeout_secs"),
            ("[cache]", "default_ttl_secs = 18446744073709551615", "default_ttl_secs"),
            ("[cache]", "ban_retention_secs = 0", "ban_retention_secs"),
            ("[cache]", "ban_retention_secs = 18446744073709552", "ban_retention_secs"),
            ("[server]", "threads = 100000", "server.threads"),
            ("[shadow]", "fill_concurrency = 3000000000000000000", "shadow.fill_concurrency"),
            ("[shadow]", "fill_queue = 3000000000000000000", "shadow.fill_queue"),
            ("[cache]", "max_object_size = \"5 GiB\"\ndisk_capacity = \"40 GiB\"\nmax_fill_memory = \"8 GiB\"", "max_object_size"),
        ] {
            let err = with(section, line).unwrap_err().to_string();
            assert!(err.contains(field), "{line}: {err}");
        }
        assert!(with("[cache]", "default_ttl_secs = 86400").is_ok());
        assert!(with("[cache]", "ban_retention_secs = 3600").is_ok());
    }

    #[test]
    fn a_token_no_request_could_carry_is_refused() {
        for (token, why) in [
            ("pässwort-geheim", "printable ASCII"),
            ("secret\ttoken", "printable ASCII"),
            (" secret-token", "whitespace"),
        ] {
            let text = MINIMAL.replace("token = \"secret-token\"", &format!("token = {token:?}"));
            let err = EdgeConfig::from_toml(&text).unwrap_err().to_string();
            assert!(
                err.contains("admin.token") && err.contains(why),
                "{token:?}: {err}"
            );
        }
        assert_eq!(token_problem("s3cret token~!"), None);
    }

    #[test]
    fn a_config_path_must_name_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = config_file(dir.path()).err().unwrap();
        assert!(err.contains("is not a file"), "{err}");
        let err = config_file(&dir.path().join("absent.toml")).err().unwrap();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn stop_timeouts_past_an_hour_are_named() {
        for field in ["drain_timeout_secs", "shutdown_timeout_secs"] {
            let bad = MINIMAL.replace("[server]", &format!("[server]\n{field} = 99999"));
            let err = EdgeConfig::from_toml(&bad).unwrap_err().to_string();
            assert!(err.contains(&format!("server.{field}")), "{err}");
        }
    }

    #[test]
    fn zeros_that_would_silently_mean_something_else_are_named() {
        for (section, field) in [
            ("shadow", "fill_concurrency = 0"),
            ("shadow", "fill_queue = 0"),
            ("shadow", "fill_bandwidth = \"0\""),
            ("shadow", "max_ttl_secs = 0"),
        ] {
            let bad = format!("{MINIMAL}\n[{section}]\n{field}\n");
            let err = EdgeConfig::from_toml(&bad).unwrap_err().to_string();
            let name = field.split(' ').next().unwrap();
            assert!(err.contains(&format!("{section}.{name}")), "{err}");
        }
    }

    #[test]
    fn a_proxy_port_the_system_picks_is_refused() {
        let bad = MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0");
        let err = EdgeConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let bad = MINIMAL.replace("dir = \"/tmp/x\"", "dir = \"/tmp/x\"\nmemory_capasity = 5");
        let err = EdgeConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("memory_capasity"), "{err}");
    }

    #[test]
    fn bad_size_is_named() {
        let bad = MINIMAL.replace(
            "dir = \"/tmp/x\"",
            "dir = \"/tmp/x\"\nmemory_capacity = \"lots\"",
        );
        let err = EdgeConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("memory_capacity"), "{err}");
    }

    #[test]
    fn trusted_proxies_default_to_private_ranges_and_bad_ones_are_named() {
        let c = EdgeConfig::from_toml(MINIMAL).unwrap();
        let trusted = |ip: &str| {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            c.server.trusted_proxies.iter().any(|n| n.contains(&ip))
        };
        assert!(trusted("127.0.0.1") && trusted("10.1.2.3") && trusted("fd00::1"));
        assert!(!trusted("203.0.113.9") && !trusted("2001:db8::1"));
        let bad = MINIMAL.replace("[server]", "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]");
        let err = EdgeConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("trusted_proxies"), "{err}");
    }

    #[test]
    fn bad_upstream_is_named() {
        let bad = MINIMAL.replace("http://127.0.0.1:9000", "ftp://x");
        let err = EdgeConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("upstream"), "{err}");
    }

    #[test]
    fn a_registration_time_in_the_file_is_refused_by_name() {
        let bad = MINIMAL.replace(
            "upstream = \"http://127.0.0.1:9000\"",
            "upstream = \"http://127.0.0.1:9000\"\nregistered_at_ms = 5",
        );
        let err = EdgeConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("origins[0].registered_at_ms"), "{err}");
    }

    #[test]
    fn tokens_from_this_projects_files_are_refused_where_others_can_reach() {
        let with = |token: &str| MINIMAL.replace("secret-token", token);
        let err = EdgeConfig::from_toml(&with("set-by-env"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("admin.token is the shipped placeholder"),
            "{err}"
        );
        // The local cluster's demo token, on its loopback admin listener: taken.
        assert!(EdgeConfig::from_toml(&with("local-admin-token")).is_ok());
        let public = with("local-admin-token").replace("127.0.0.1:9080", "0.0.0.0:9080");
        let err = EdgeConfig::from_toml(&public).unwrap_err().to_string();
        assert!(err.contains("demo token"), "{err}");
    }

    #[test]
    fn short_token_rejected() {
        let bad = MINIMAL.replace("secret-token", "x");
        let err = EdgeConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("admin.token"), "{err}");
    }
}
