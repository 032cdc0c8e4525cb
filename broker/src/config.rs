//! Broker configuration: TOML file, `SHADOWCDN_BROKER_*` environment overrides, CLI flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Everything a broker needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// User-facing HTTP listener.
    pub listen: SocketAddr,
    /// Worker threads of the proxy.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Seconds in-flight requests get to finish on SIGTERM.
    #[serde(default = "default_drain")]
    pub drain_timeout_secs: u64,
    /// Seconds a read from an edge may stall (default 60). Longer than an edge's own wait for
    /// a slow origin (its cache-lock wait, connect and read timeouts), so that the edge, not
    /// the broker, gives up on a slow origin; a stall this long is answered 504 and replayed
    /// nowhere, since another edge would wait on the same origin.
    #[serde(default = "default_edge_read_timeout")]
    pub edge_read_timeout_secs: u64,
    /// HTTPS listener for clients (absent: plain HTTP only).
    #[serde(default)]
    pub tls: Option<crate::tls::TlsSection>,
    /// Where each client request's access line goes (one JSON object per line): a file path,
    /// created if missing and reopened when rotated away, or `stdout`. Absent: no access log.
    #[serde(default)]
    pub access_log: Option<String>,
    /// Provider API, metrics and health listener.
    pub admin: AdminSection,
    /// Where the durable registry and monitor snapshots live.
    pub data_dir: PathBuf,
    /// How a client's region is found.
    #[serde(default)]
    pub client_region: ClientRegion,
    /// Header carrying the user segment (e.g. `X-User-Segment`); absent means no segment.
    #[serde(default)]
    pub segment_header: Option<String>,
    /// Regions, each with its spill-over order.
    pub regions: Vec<RegionEntry>,
    /// The edge fleet.
    pub edges: Vec<EdgeEntry>,
    /// Active health checks of edges.
    #[serde(default)]
    pub health: HealthSection,
    /// Filling a miss from another edge that recently served the key.
    #[serde(default)]
    pub peer_fill: crate::routing::PeerFillSection,
    /// Request monitoring.
    #[serde(default)]
    pub monitor: MonitorSection,
    /// Shadow planning.
    #[serde(default)]
    pub planner: crate::planner::PlannerSection,
    /// Co-access and anomaly signals.
    #[serde(default)]
    pub signals: crate::signals::SignalsSection,
    /// Scaled clock for trace replays (absent: wall clock).
    #[serde(default)]
    pub clock: crate::clock::ClockSection,
    /// Prices of shadowing and the threshold tuner's bounds.
    #[serde(default)]
    pub cost: crate::cost::CostSection,
    /// QUIC control channel to the edges (required for edges with a `sync` address).
    #[serde(default)]
    pub control: Option<crate::control::ControlSection>,
}

/// Admin listener and tokens.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the provider API. Its `/metrics` answers the operator token only: the
    /// metrics carry every provider's spend and call counts.
    pub listen: SocketAddr,
    /// Address of an unauthenticated `/metrics` and `/healthz` listener for Prometheus
    /// (absent: none). Bind it to a network only the scraper reaches.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Operator bearer token: creates providers and issues their tokens.
    pub operator_token: String,
    /// Bearer token of the edges' admin APIs (purge fan-out, origin push).
    pub edge_token: String,
    /// Largest accepted request body in bytes.
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: usize,
    /// Whether providers may register origins on loopback or private addresses (default
    /// false: edges would fetch from the operator's own network on their behalf). On for a
    /// cluster whose origins are local, as in deploy/local.
    #[serde(default)]
    pub allow_private_upstreams: bool,
    /// Whether providers may register local or reserved host names: `localhost`, single-label
    /// names, `.local`, `.internal`, `.test`, … (default false: a site's host must be a public
    /// DNS name). On for a cluster whose sites are local, as in deploy/local.
    #[serde(default)]
    pub allow_local_hosts: bool,
    /// Whether a host new to the registry waits for the operator's approval before it is
    /// served (default false: first come, first served). A provider's claim is kept apart
    /// (`GET /v1/host-claims`) until `POST /v1/host-claims/{host}/approve`: the broker cannot
    /// check that a provider owns a name, and a host whose DNS still points at this CDN after
    /// its owner left could otherwise be taken by anyone with a provider token.
    #[serde(default)]
    pub approve_new_hosts: bool,
    /// Most resources one provider may register (default 100,000): each is kept in memory and
    /// matched by the planner, so one tenant cannot grow the registry without bound.
    #[serde(default = "default_max_resources")]
    pub max_resources_per_provider: usize,
    /// Most hosts one provider may register (default 1,000): every edge receives and resolves
    /// the whole origin table, so one tenant cannot grow it without bound.
    #[serde(default = "default_max_origins")]
    pub max_origins_per_provider: usize,
    /// Per-provider budgets of purges, events and origin/resource writes (`[admin.rate_limits]`).
    #[serde(default)]
    pub rate_limits: crate::registry::limits::RateLimits,
}

/// Client region resolution: trusted header, then CIDR table, then default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRegion {
    /// Header naming the client's region (e.g. set by a trusted load balancer).
    #[serde(default = "default_region_header")]
    pub header: String,
    /// Whether to believe that header (default false: any client could pick its region, and
    /// with it which edges serve it and whose demand it counts as; turn it on only behind a
    /// load balancer that sets the header and strips the clients'). With `trusted_proxies`
    /// set, it is believed only on requests that come from one of them (a client reaching the
    /// broker past the load balancer cannot pick its region), and its last value is the one
    /// read (a balancer that appends rather than replaces).
    #[serde(default)]
    pub trust_header: bool,
    /// Client address ranges and their regions; the most specific match wins.
    #[serde(default)]
    pub cidrs: Vec<CidrEntry>,
    /// Region of clients that match nothing.
    #[serde(default)]
    pub default: Option<String>,
    /// Proxies in front of the broker (load balancers) whose `X-Forwarded-For` names the
    /// client: from them, the client is the nearest address in that chain outside these
    /// ranges. Its address picks the region by `cidrs` and tells clients apart for co-access,
    /// which behind a load balancer would otherwise see every user as one client. Default:
    /// none (the peer is the client; the header is not believed).
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for ClientRegion {
    fn default() -> Self {
        ClientRegion {
            header: default_region_header(),
            trust_header: false,
            cidrs: Vec::new(),
            default: None,
            trusted_proxies: Vec::new(),
        }
    }
}

/// One row of the CIDR → region table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CidrEntry {
    /// Address range.
    pub cidr: IpNet,
    /// Region name.
    pub region: String,
}

/// A region and its neighbours, nearest (lowest latency) first.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionEntry {
    /// Region name.
    pub name: String,
    /// Regions to spill over to, nearest first.
    #[serde(default)]
    pub neighbours: Vec<String>,
}

/// Role of an edge in its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves its rendezvous share of keys.
    Active,
    /// Warm standby: promoted only when the region has no healthy active edge.
    Standby,
}

/// One edge node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeEntry {
    /// Stable identity (rendezvous hashing uses it).
    pub id: String,
    /// Region name.
    pub region: String,
    /// The edge's HTTP address.
    pub addr: EdgeAddr,
    /// The edge's admin address (health, purge, origin push).
    pub admin: EdgeAddr,
    /// Active or standby.
    #[serde(default = "default_role")]
    pub role: Role,
    /// Capacity weight in rendezvous hashing.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// The edge's QUIC address (control and peer fills); absent: its admin API is used.
    #[serde(default)]
    pub sync: Option<EdgeAddr>,
}

/// Where an edge listens: `ip:port`, or `name:port` with a DNS name the broker resolves at
/// start and again before every health probe — a Kubernetes pod keeps its name across
/// restarts, not its IP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct EdgeAddr {
    host: String,
    port: u16,
    /// The address itself when `host` is an IP literal: never resolved.
    literal: Option<SocketAddr>,
}

impl EdgeAddr {
    /// The host part (an IP literal or a DNS name).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address when the host is an IP literal.
    pub fn literal(&self) -> Option<SocketAddr> {
        self.literal
    }

    /// Whether `other` spells the same address: the same IP and port, or the same name and
    /// port, an absolute name (`edge.`) and its relative spelling counted as one.
    pub fn same_place(&self, other: &EdgeAddr) -> bool {
        match (self.literal, other.literal) {
            (Some(a), Some(b)) => a == b,
            (None, None) => {
                let name = |h: &str| h.strip_suffix('.').unwrap_or(h).to_string();
                self.port == other.port && name(&self.host) == name(&other.host)
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for EdgeAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            // Port 0 or an unspecified address (`0.0.0.0` dials this host) names no edge.
            if a.port() == 0 || a.ip().is_unspecified() {
                return Err(format!("{s:?} is not ip:port or name:port of an edge"));
            }
            return Ok(EdgeAddr {
                host: a.ip().to_string(),
                port: a.port(),
                literal: Some(a),
            });
        }
        let bad = || format!("{s:?} is not ip:port or name:port");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        // A trailing dot (an absolute name, no search domains) is kept for the resolver.
        let labels = host.strip_suffix('.').unwrap_or(host);
        // All-digit last label: a malformed IP the resolver would read as an address.
        let numeric = labels
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
        if port == 0 || labels.len() > 253 || numeric || !labels.split('.').all(label_ok) {
            return Err(bad());
        }
        Ok(EdgeAddr {
            host: host.to_ascii_lowercase(),
            port,
            literal: None,
        })
    }
}

impl TryFrom<String> for EdgeAddr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<EdgeAddr> for String {
    fn from(a: EdgeAddr) -> String {
        a.to_string()
    }
}

impl std::fmt::Display for EdgeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.literal {
            Some(a) => a.fmt(f),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// Active probing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// Milliseconds between probes.
    #[serde(default = "default_probe_interval")]
    pub interval_ms: u64,
    /// Probe timeout in milliseconds.
    #[serde(default = "default_probe_timeout")]
    pub timeout_ms: u64,
    /// Consecutive failures that mark an edge down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Consecutive successes that mark it up again.
    #[serde(default = "default_rise")]
    pub rise: u32,
}

impl Default for HealthSection {
    fn default() -> Self {
        HealthSection {
            interval_ms: default_probe_interval(),
            timeout_ms: default_probe_timeout(),
            fall: default_fall(),
            rise: default_rise(),
        }
    }
}

/// Request monitoring.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorSection {
    /// Whether requests are recorded at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Bucket width in seconds.
    #[serde(default = "default_bucket")]
    pub bucket_secs: u64,
    /// Buckets kept per series.
    #[serde(default = "default_retention")]
    pub retention_buckets: usize,
    /// Most series kept; the least recently updated are dropped beyond it.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
    /// Most buckets kept over all series (48 bytes each, up to twice that with the per-series
    /// queues' slack): the memory bound, since a series busy every bucket holds
    /// `retention_buckets` of them. The least recently updated series are dropped beyond it.
    #[serde(default = "default_max_buckets")]
    pub max_buckets: usize,
    /// Capacity of the lock-free record queue.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Seconds between snapshots to disk.
    #[serde(default = "default_snapshot")]
    pub snapshot_secs: u64,
}

impl Default for MonitorSection {
    fn default() -> Self {
        MonitorSection {
            enabled: true,
            bucket_secs: default_bucket(),
            retention_buckets: default_retention(),
            max_series: default_max_series(),
            max_buckets: default_max_buckets(),
            queue_capacity: default_queue(),
            snapshot_secs: default_snapshot(),
        }
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl BrokerConfig {
    /// Load from an optional TOML file, then `SHADOWCDN_BROKER_` variables (`__` between
    /// sections, e.g. `SHADOWCDN_BROKER_ADMIN__OPERATOR_TOKEN`).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::new();
        if let Some(p) = path {
            fig = fig.merge(edge_node::config::config_file(p).map_err(ConfigError)?);
        }
        fig = edge_node::config::merge_env(
            fig,
            "SHADOWCDN_BROKER_",
            &["admin__operator_token", "admin__edge_token"],
        )
        .map_err(ConfigError)?;
        Self::finish(fig)
    }

    /// Parse a TOML string.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::finish(Figment::from(Toml::string(text)))
    }

    fn finish(fig: Figment) -> Result<Self, ConfigError> {
        let mut cfg: BrokerConfig = fig.extract().map_err(|e| {
            ConfigError(
                e.into_iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        cfg.cost.demand_peer_fill = cfg.peer_fill.enabled;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        // The operator token guards the API listener; the edge token is only sent to the
        // edges, which judge it themselves: of the shipped tokens only the manifests'
        // placeholder is refused for it. A token read from a file often keeps its trailing
        // newline: the operator's could never match (requests' tokens are trimmed), and the
        // edge token is no valid header value, so every push and purge to the edges would
        // fail as "unreachable".
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        for (field, token, listen, min_len) in [
            (
                "admin.operator_token",
                &self.admin.operator_token,
                self.admin.listen,
                16,
            ),
            ("admin.edge_token", &self.admin.edge_token, loopback, 8),
        ] {
            if let Some(why) = edge_node::config::token_refusal(token, listen, min_len) {
                return bad(format!("{field} {why}"));
            }
        }
        // Every TCP listener, named by its field: two on one port (or a wildcard address
        // covering the other's) would leave the proxy unbound while the admin API and its
        // health check answered.
        let mut listeners = vec![("listen", self.listen), ("admin.listen", self.admin.listen)];
        listeners.extend(self.tls.as_ref().map(|t| ("tls.listen", t.listen)));
        listeners.extend(
            self.admin
                .metrics_listen
                .map(|m| ("admin.metrics_listen", m)),
        );
        for (i, (field, addr)) in listeners.iter().enumerate() {
            if let Some((other, at)) = listeners[..i]
                .iter()
                .find(|(_, o)| edge_node::config::listeners_overlap(*o, *addr))
            {
                return bad(format!(
                    "{field} ({addr}) must not share a port with {other} ({at})"
                ));
            }
        }
        let max_drain = edge_node::config::MAX_STOP_SECS;
        if self.drain_timeout_secs > max_drain {
            return bad(format!(
                "drain_timeout_secs must be at most {max_drain} (1 hour)"
            ));
        }
        // Every write call's body is a few hundred bytes; below 1 KiB each would get 413.
        if self.admin.max_body_bytes < 1024 {
            return bad("admin.max_body_bytes must be at least 1024".into());
        }
        if let Some(field) = self.admin.rate_limits.zero_field() {
            return bad(format!("{field} must be at least 1"));
        }
        // Zero would refuse every provider's first host or resource with a 409 that reads as
        // the tenant's own doing.
        if self.admin.max_resources_per_provider == 0 {
            return bad("admin.max_resources_per_provider must be at least 1".into());
        }
        if self.admin.max_origins_per_provider == 0 {
            return bad("admin.max_origins_per_provider must be at least 1".into());
        }
        // Below a few MiB the map would forget everything on every request (a value meant in
        // KiB, say), silently turning co-access off.
        if self.signals.coaccess.max_bytes < 4 << 20 {
            return bad("signals.coaccess.max_bytes must be at least 4 MiB (4194304)".into());
        }
        if let Some(tls) = &self.tls {
            if tls.certs.is_empty() {
                return bad("tls.certs: at least one certificate (cert and key files)".into());
            }
            if tls.h2_idle_timeout_secs == 0 {
                return bad("tls.h2_idle_timeout_secs must be at least 1".into());
            }
        }
        if self.edge_read_timeout_secs == 0 {
            return bad("edge_read_timeout_secs must be at least 1".into());
        }
        if !(self.clock.speedup.is_finite() && self.clock.speedup >= 1e-3) {
            return bad("clock.speedup must be a finite number of at least 0.001".into());
        }
        let names: Vec<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
        if names.is_empty() {
            return bad("regions: at least one region is required".into());
        }
        for (i, r) in self.regions.iter().enumerate() {
            // Sent to edges and origins in request headers, and read from clients' region
            // header: a name no header value can carry would fail every request routed there.
            if !valid_region_name(&r.name) {
                return bad(format!(
                    "regions[{i}].name {:?} must be {REGION_NAME_RULE}",
                    r.name
                ));
            }
            // Client headers and the API name regions case-insensitively.
            if names[..i].iter().any(|n| n.eq_ignore_ascii_case(&r.name)) {
                return bad(format!("regions[{i}].name: duplicate region {:?}", r.name));
            }
            for n in &r.neighbours {
                if !names.contains(&n.as_str()) || n == &r.name {
                    return bad(format!(
                        "regions[{i}].neighbours: unknown or self region {n:?}"
                    ));
                }
            }
        }
        for (i, e) in self.edges.iter().enumerate() {
            if !names.contains(&e.region.as_str()) {
                return bad(format!("edges[{i}].region: unknown region {:?}", e.region));
            }
            if !(e.weight.is_finite() && e.weight > 0.0) {
                return bad(format!("edges[{i}].weight: must be a positive number"));
            }
            // The id travels to every edge (peer lists) and names the edge's QUIC
            // certificate: one an edge would refuse turns peer fill off everywhere.
            if !edge_node::config::valid_node_id(&e.id) {
                return bad(format!(
                    "edges[{i}].id {:?} must be {}",
                    e.id,
                    edge_node::config::NODE_ID_RULE
                ));
            }
            if self.edges[..i].iter().any(|o| o.id == e.id) {
                return bad(format!("edges[{i}].id: duplicate edge id {:?}", e.id));
            }
            if e.sync.is_some() && self.control.is_none() {
                return bad(format!(
                    "edges[{i}].sync: a QUIC address needs the [control] section (certificates)"
                ));
            }
        }
        for (i, c) in self.client_region.cidrs.iter().enumerate() {
            if !names.contains(&c.region.as_str()) {
                return bad(format!(
                    "client_region.cidrs[{i}].region: unknown region {:?}",
                    c.region
                ));
            }
        }
        if let Some(d) = &self.client_region.default {
            if !names.contains(&d.as_str()) {
                return bad(format!("client_region.default: unknown region {d:?}"));
            }
        }
        if self.monitor.bucket_secs == 0 || self.monitor.retention_buckets == 0 {
            return bad(
                "monitor.bucket_secs and monitor.retention_buckets must be positive".into(),
            );
        }
        if self.monitor.queue_capacity == 0 || self.monitor.max_series == 0 {
            return bad("monitor.queue_capacity and monitor.max_series must be positive".into());
        }
        // The queue is allocated whole at start (about 160 bytes a slot).
        if self.monitor.queue_capacity > MAX_QUEUE_CAPACITY {
            return bad(format!(
                "monitor.queue_capacity must be at most {MAX_QUEUE_CAPACITY} (allocated at start)"
            ));
        }
        if self.monitor.max_buckets < self.monitor.retention_buckets {
            return bad(
                "monitor.max_buckets must be at least monitor.retention_buckets (one full series)"
                    .into(),
            );
        }
        // The forecaster reads 15-minute buckets over 7 days, ending at the last complete
        // one: a stored bucket must fall in one of them, and the store must reach back that
        // far from the bucket filling now (7 days, the quarter hour in progress, and the
        // current bucket).
        let forecast = crate::planner::FORECAST_BUCKET;
        if !forecast.is_multiple_of(self.monitor.bucket_secs) {
            return bad(format!(
                "monitor.bucket_secs must divide {forecast} (the forecaster's bucket)"
            ));
        }
        let kept = self
            .monitor
            .bucket_secs
            .saturating_mul(self.monitor.retention_buckets as u64);
        let needed = FORECAST_HISTORY_SECS + forecast + self.monitor.bucket_secs;
        if self.planner.enabled && kept < needed {
            return bad(format!(
                "monitor.retention_buckets × monitor.bucket_secs must cover 7 days (the \
                 forecaster's history) plus 15 minutes and one bucket, {needed} s, while the \
                 planner is enabled"
            ));
        }
        let min = crate::planner::MIN_INTERVAL_SECS;
        let max = MAX_INTERVAL_SECS;
        let interval = |v: f64| v.is_finite() && (min..=max).contains(&v);
        if !interval(self.planner.interval_secs) {
            return bad(format!(
                "planner.interval_secs must be a number of seconds between {min} and {max}"
            ));
        }
        // As a resource's own shadow TTL (the provider API's bound).
        if !(1..=30 * 24 * 3600).contains(&self.planner.default_ttl_secs) {
            return bad("planner.default_ttl_secs must be between 1 and 2592000 (30 days)".into());
        }
        if let Some(c) = &self.control {
            if !interval(c.stats_interval_secs) {
                return bad(format!(
                    "control.stats_interval_secs must be a number of seconds between {min} and {max}"
                ));
            }
        }
        // 0 would silently mean 1 (fall, rise) or 1 s (snapshots).
        for (field, v) in [
            ("health.interval_ms", self.health.interval_ms),
            ("health.timeout_ms", self.health.timeout_ms),
            ("health.fall", u64::from(self.health.fall)),
            ("health.rise", u64::from(self.health.rise)),
            ("monitor.snapshot_secs", self.monitor.snapshot_secs),
        ] {
            if v == 0 {
                return bad(format!("{field} must be at least 1"));
            }
        }
        // A probe every hour, or one waiting that long, would leave a dead edge in routing.
        for (field, v) in [
            ("health.interval_ms", self.health.interval_ms),
            ("health.timeout_ms", self.health.timeout_ms),
        ] {
            if v > MAX_HEALTH_MS {
                return bad(format!(
                    "{field} must be at most {MAX_HEALTH_MS} (one minute)"
                ));
            }
        }
        // Shares and probabilities: `10` meant as 10% would let shadows take ten caches.
        for (field, v) in [
            ("planner.threshold", f64::from(self.planner.threshold)),
            ("planner.budget_share", self.planner.budget_share),
            ("planner.min_safety", f64::from(self.planner.min_safety)),
            (
                "signals.coaccess.min_probability",
                self.signals.coaccess.min_probability,
            ),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{field} must be between 0 and 1"));
            }
        }
        if self.threads == 0 {
            return bad("threads must be at least 1".into());
        }
        if self.threads as u64 > edge_node::config::MAX_THREADS {
            return bad(format!(
                "threads must be at most {}",
                edge_node::config::MAX_THREADS
            ));
        }
        // A threshold outside the tuner's bounds would be clamped into them in silence.
        let threshold = self.planner.threshold;
        if threshold < self.cost.min_threshold || threshold > self.cost.max_threshold {
            return bad(format!(
                "planner.threshold ({threshold}) must be between cost.min_threshold ({}) and \
                 cost.max_threshold ({})",
                self.cost.min_threshold, self.cost.max_threshold
            ));
        }
        // A header name that cannot be one would never match, and the setting would be off.
        for (field, name) in [
            ("client_region.header", Some(&self.client_region.header)),
            ("segment_header", self.segment_header.as_ref()),
        ] {
            if let Some(name) = name {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return bad(format!("{field}: {name:?} is not a header name"));
                }
            }
        }
        // A longer period loses more to a crash than the holders are worth; and an unbounded
        // one would overflow the timer.
        if self.peer_fill.snapshot_secs > 86_400 {
            return bad(format!(
                "peer_fill.snapshot_secs ({}) must be at most 86400 (a day); 0 writes only at a \
                 graceful stop",
                self.peer_fill.snapshot_secs
            ));
        }
        self.cost.check().map_err(ConfigError)
    }
}

/// Most records the monitor's queue may hold: 4 Mi slots, about 640 MiB allocated at start.
const MAX_QUEUE_CAPACITY: usize = 1 << 22;

/// Longest planning or stats interval: a day between ticks is already no planning.
const MAX_INTERVAL_SECS: f64 = 86_400.0;

fn default_threads() -> usize {
    2
}
fn default_drain() -> u64 {
    30
}
fn default_edge_read_timeout() -> u64 {
    60
}
fn default_max_resources() -> usize {
    100_000
}
fn default_max_origins() -> usize {
    1_000
}
fn default_body_limit() -> usize {
    64 * 1024
}
fn default_region_header() -> String {
    "x-client-region".into()
}
fn default_true() -> bool {
    true
}
fn default_role() -> Role {
    Role::Active
}
fn default_weight() -> f64 {
    1.0
}
/// What [`valid_region_name`] accepts, for the error that refuses a name.
const REGION_NAME_RULE: &str = "1-63 characters of letters, digits, '-', '_' and '.'";

/// Whether `name` can name a region.
fn valid_region_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Longest health probe interval or timeout accepted.
const MAX_HEALTH_MS: u64 = 60_000;

fn default_probe_interval() -> u64 {
    500
}
fn default_probe_timeout() -> u64 {
    300
}
fn default_fall() -> u32 {
    2
}
fn default_rise() -> u32 {
    2
}
fn default_bucket() -> u64 {
    60
}
/// The history the forecaster reads, in seconds (7 days).
const FORECAST_HISTORY_SECS: u64 =
    crate::planner::HISTORY_BUCKETS as u64 * crate::planner::FORECAST_BUCKET;

/// 7 days of 60-second buckets, plus the quarter hour in progress and the current bucket
/// (see the check in `validate`).
fn default_retention() -> usize {
    ((FORECAST_HISTORY_SECS + crate::planner::FORECAST_BUCKET) / default_bucket() + 1) as usize
}
fn default_max_series() -> usize {
    100_000
}
/// 10 million buckets: at most about 1 GB, about 1,000 series busy every minute for 7 days.
fn default_max_buckets() -> usize {
    10_000_000
}
fn default_queue() -> usize {
    1 << 16
}
fn default_snapshot() -> u64 {
    60
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"
        listen = "127.0.0.1:8000"
        data_dir = "/tmp/broker"
        [admin]
        listen = "127.0.0.1:8001"
        operator_token = "operator-token-0123456789"
        edge_token = "edge-token"
        [client_region]
        default = "eu"
        cidrs = [{ cidr = "10.1.0.0/16", region = "us" }]
        [[regions]]
        name = "eu"
        neighbours = ["us"]
        [[regions]]
        name = "us"
        neighbours = ["eu"]
        [[edges]]
        id = "eu-a"
        region = "eu"
        addr = "127.0.0.1:9001"
        admin = "127.0.0.1:9101"
        [[edges]]
        id = "eu-b"
        region = "eu"
        addr = "127.0.0.1:9002"
        admin = "127.0.0.1:9102"
        [[edges]]
        id = "eu-s"
        region = "eu"
        role = "standby"
        addr = "127.0.0.1:9003"
        admin = "127.0.0.1:9103"
        [[edges]]
        id = "us-a"
        region = "us"
        addr = "127.0.0.1:9004"
        admin = "127.0.0.1:9104"
    "#;

    #[test]
    fn sample_parses() {
        let c = BrokerConfig::from_toml(SAMPLE).unwrap();
        assert_eq!(c.edges.len(), 4);
        assert_eq!(c.edges[2].role, Role::Standby);
    }

    #[test]
    fn unknown_region_is_named() {
        let bad = SAMPLE.replace(
            "region = \"us\"\n        addr",
            "region = \"mars\"\n        addr",
        );
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("mars"), "{e}");
    }

    #[test]
    fn planner_ticks_may_be_fractions_of_a_second_but_not_zero() {
        let with = |v: &str| {
            SAMPLE.replace(
                "[admin]",
                &format!("[planner]\ninterval_secs = {v}\n[admin]"),
            )
        };
        let c = BrokerConfig::from_toml(&with("0.25")).unwrap();
        assert_eq!(c.planner.interval_secs, 0.25);
        assert_eq!(
            BrokerConfig::from_toml(&with("60"))
                .unwrap()
                .planner
                .interval_secs,
            60.0
        );
        let e = BrokerConfig::from_toml(&with("0")).unwrap_err().to_string();
        assert!(e.contains("planner.interval_secs"), "{e}");
    }

    #[test]
    fn a_negative_price_is_refused_by_name() {
        let bad = SAMPLE.replace("[admin]", "[cost]\ninter_edge_per_gb = -0.02\n[admin]");
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("cost.inter_edge_per_gb"), "{e}");
        // How peer fills are priced follows `[peer_fill]`; `[cost]` cannot say otherwise.
        let set = SAMPLE.replace("[admin]", "[cost]\ndemand_peer_fill = false\n[admin]");
        let e = BrokerConfig::from_toml(&set).unwrap_err().to_string();
        assert!(e.contains("demand_peer_fill"), "{e}");
        assert!(
            BrokerConfig::from_toml(SAMPLE)
                .unwrap()
                .cost
                .demand_peer_fill
        );
    }

    #[test]
    fn a_zero_provider_limit_is_refused_by_name() {
        for field in ["max_resources_per_provider", "max_origins_per_provider"] {
            let bad = SAMPLE.replace("[admin]\n", &format!("[admin]\n{field} = 0\n"));
            let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
            assert!(e.contains(&format!("admin.{field}")), "{e}");
        }
    }

    #[test]
    fn values_that_would_break_routing_or_the_clock_are_refused_by_name() {
        for (extra, field) in [
            ("[clock]\nspeedup = 0\n", "clock.speedup"),
            ("[clock]\nspeedup = -3.0\n", "clock.speedup"),
            ("[clock]\nspeedup = inf\n", "clock.speedup"),
            (
                "[[regions]]\nname = \"EU\"\nneighbours = []\n",
                "duplicate region",
            ),
            (
                "[[regions]]\nname = \"eu\\nwest\"\nneighbours = []\n",
                "regions[0].name",
            ),
            (
                "[[regions]]\nname = \"\"\nneighbours = []\n",
                "regions[0].name",
            ),
            (
                "[planner]\ndefault_ttl_secs = 0\n",
                "planner.default_ttl_secs",
            ),
            (
                "[planner]\ndefault_ttl_secs = 9999999999\n",
                "planner.default_ttl_secs",
            ),
            ("[planner]\ninterval_secs = 1e20\n", "planner.interval_secs"),
            ("[planner]\nbudget_share = 10\n", "planner.budget_share"),
            ("[planner]\nmin_safety = 50\n", "planner.min_safety"),
            ("[health]\nfall = 0\n", "health.fall"),
            ("[health]\ninterval_ms = 3600000\n", "health.interval_ms"),
            (
                "[health]\ntimeout_ms = 9223372036854775807\n",
                "health.timeout_ms",
            ),
            (
                "[signals.coaccess]\nmin_probability = 50\n",
                "signals.coaccess.min_probability",
            ),
        ] {
            let bad = SAMPLE.replace("[admin]", &format!("{extra}[admin]"));
            let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
            assert!(e.contains(field), "{extra}: {e}");
        }
        let many = SAMPLE.replace("[admin]", "threads = 100000\n[admin]");
        let e = BrokerConfig::from_toml(&many).unwrap_err().to_string();
        assert!(e.contains("threads must be at most"), "{e}");
        // A token no request could carry (HTTP fields are ASCII) would lock the API.
        let accented = SAMPLE.replace("operator-token-0123456789", "opérateur-jeton-0123456789");
        let e = BrokerConfig::from_toml(&accented).unwrap_err().to_string();
        assert!(
            e.contains("admin.operator_token must hold only printable ASCII"),
            "{e}"
        );
        for (monitor, field) in [
            ("bucket_secs = 7", "monitor.bucket_secs"),
            ("bucket_secs = 3600", "monitor.bucket_secs"),
            ("retention_buckets = 1440", "7 days"),
            ("max_buckets = 100", "monitor.max_buckets"),
            ("snapshot_secs = 0", "monitor.snapshot_secs"),
        ] {
            let bad = SAMPLE.replace("[admin]", &format!("[monitor]\n{monitor}\n[admin]"));
            let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
            assert!(e.contains(field), "{monitor}: {e}");
        }
        let bad = SAMPLE.replace("data_dir", "edge_read_timeout_secs = 0\n        data_dir");
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("edge_read_timeout_secs"), "{e}");
        let bad = SAMPLE.replace("127.0.0.1:8001", "127.0.0.1:8000");
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("admin.listen"), "{e}");
        // A wildcard address takes the port on every address.
        let bad = SAMPLE.replace("listen = \"127.0.0.1:8000\"", "listen = \"0.0.0.0:8001\"");
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("admin.listen"), "{e}");
        for id in ["eu-b.fra", "broker"] {
            let bad = SAMPLE.replace("id = \"eu-b\"", &format!("id = \"{id}\""));
            let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
            assert!(e.contains("edges[1].id"), "{e}");
        }
        let bad = SAMPLE.replace("data_dir", "drain_timeout_secs = 99999\n        data_dir");
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("drain_timeout_secs"), "{e}");
        let with_tls = SAMPLE.replace(
            "[admin]",
            "[tls]\nlisten = \"127.0.0.1:8443\"\ncerts = [{ cert = \"c.pem\", key = \"k.pem\" }]\n[admin]",
        );
        for clash in ["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8443"] {
            let bad = with_tls.replace(
                "listen = \"127.0.0.1:8001\"",
                &format!("listen = \"127.0.0.1:8001\"\nmetrics_listen = \"{clash}\""),
            );
            let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
            assert!(e.contains("admin.metrics_listen"), "{e}");
        }
        for (from, to, field) in [
            (
                "\"operator-token-0123456789\"",
                "\"operator-token-0123456789\\n\"",
                "admin.operator_token",
            ),
            ("\"edge-token\"", "\" edge-token\"", "admin.edge_token"),
        ] {
            let e = BrokerConfig::from_toml(&SAMPLE.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains("whitespace"), "{e}");
        }
        let bad = SAMPLE.replace("[admin]", "[signals.coaccess]\nmax_bytes = 1024\n[admin]");
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("signals.coaccess.max_bytes"), "{e}");
        let bad = SAMPLE.replace("[admin]", "[admin]\nmax_body_bytes = 0");
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("admin.max_body_bytes"), "{e}");
        let bad = SAMPLE.replace(
            "[admin]",
            "[admin.rate_limits]\npurges_per_minute = 0\n[admin]",
        );
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("admin.rate_limits.purges_per_minute"), "{e}");
        let ok = SAMPLE.replace("[admin]", "[clock]\nspeedup = 3600.0\n[admin]");
        assert!(BrokerConfig::from_toml(&ok).is_ok());
    }

    #[test]
    fn edges_may_be_named_by_ip_or_dns_name_and_bad_addresses_are_refused_by_field() {
        let named = SAMPLE.replace(
            "addr = \"127.0.0.1:9004\"",
            "addr = \"Edge-US-0.shadowcdn-edge.default.svc.cluster.local.:8080\"",
        );
        let c = BrokerConfig::from_toml(&named).unwrap();
        let a = &c.edges[3].addr;
        assert_eq!(
            a.host(),
            "edge-us-0.shadowcdn-edge.default.svc.cluster.local."
        );
        assert_eq!((a.port(), a.literal()), (8080, None));
        assert_eq!(
            c.edges[0].addr.literal(),
            Some("127.0.0.1:9001".parse().unwrap())
        );
        assert_eq!(
            "[::1]:80".parse::<EdgeAddr>().unwrap().to_string(),
            "[::1]:80"
        );
        for bad in [
            "edge-0",
            "edge-0:",
            "edge-0:0",
            "edge-0:70000",
            "-edge:80",
            "edge_0:80",
            "edge..x:80",
            "http://edge:80",
            ":80",
            "edge:+80",
            "010.0.0.1:80",
            "10.0.0.256:80",
            "127.1:80",
            "10.0.0.5:0",
            "0.0.0.0:80",
            "[::]:80",
        ] {
            let cfg = SAMPLE.replace("127.0.0.1:9104", bad);
            let e = BrokerConfig::from_toml(&cfg).unwrap_err().to_string();
            assert!(e.contains("admin") && e.contains("name:port"), "{bad}: {e}");
        }
    }

    #[test]
    fn settings_that_would_silently_mean_something_else_are_named() {
        for (section, line, field) in [
            ("[planner]", "threshold = 0.02", "planner.threshold"),
            ("[planner]", "threshold = 0.99", "planner.threshold"),
            (
                "[monitor]",
                "queue_capacity = 1000000000",
                "monitor.queue_capacity",
            ),
            (
                "[client_region]",
                "header = \"x region\"",
                "client_region.header",
            ),
        ] {
            let bad = if SAMPLE.contains(section) {
                SAMPLE.replacen(section, &format!("{section}\n{line}"), 1)
            } else {
                format!("{SAMPLE}\n{section}\n{line}\n")
            };
            let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
            assert!(e.contains(field), "{line}: {e}");
        }
        let bad = format!("segment_header = \"x user\"\n{SAMPLE}");
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("segment_header"), "{e}");
    }

    #[test]
    fn unknown_field_is_named() {
        let bad = SAMPLE.replace("[admin]", "[admin]\nlistn = 1");
        let e = BrokerConfig::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("listn"), "{e}");
    }
}
