//! The edge's Pingora `ProxyHttp` phases: origin selection, cache policy, cache key, Vary,
//! cache-status headers, metrics and JSON error bodies.
//!
//! A miss whose request carries the broker's peer hint is first filled from that peer edge
//! (through the QUIC bridge, from the peer's cache only); when the peer does not hold a usable
//! copy the attempt fails before anything reaches the client and pingora retries it on the
//! origin.
//!
//! HTTP caching semantics (freshness, revalidation, stale serving, ranges, locking) are
//! pingora-cache's; this module only configures them.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use ipnet::IpNet;
use pingora_cache::cache_control::{CacheControl, InterpretCacheControl};
use pingora_cache::filters::{
    calculate_fresh_until, calculate_serve_stale_durations, request_cacheable,
};
use pingora_cache::key::{hash_key, HashBinary};
use pingora_cache::lock::CacheKeyLockImpl;
use pingora_cache::predictor::Predictor;
use pingora_cache::{
    CacheKey, CacheMeta, CacheMetaDefaults, CacheOptionOverrides, CachePhase, NoCacheReason,
    RespCacheable, VarianceBuilder,
};
use pingora_core::modules::http::compression::ResponseCompressionBuilder;
use pingora_core::modules::http::HttpModules;
use pingora_core::protocols::http::conditional_filter::not_modified_filter;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{range_header_filter, FailToProxy, ProxyHttp, RangeType, Session};
use serde::Serialize;

use crate::accept_encoding;
use crate::access_log::{AccessLog, RequestFields};
use crate::compression;
use crate::drain::{InflightCounter, InflightGuard};
use crate::lifetime::{self, Lifetime};
use crate::metrics::{CacheStatus, EdgeMetrics};
use crate::origin::{normalize_host, Origin, OriginTable, SharedOrigins};
use crate::range;
use crate::response_fields;
use crate::shadow::{ShadowTable, FILL_HEADER, REFRESH_HEADER};
use crate::storage::{
    FoyerStorage, CREDENTIALED_REQUEST, ERROR_ON_REVALIDATION, ORIGIN_SERVER_ERROR,
    PEER_LACKS_OBJECT, PURGED_DURING_FETCH, REDIRECT_TO_ITS_OWN_KEY, UNASKED_PART,
};
use crate::sync::protocol::PeerRef;
use crate::sync::{
    format_peer_via, PeerDirectory, PEER_ADMITTED_HEADER, PEER_FETCH_HEADER, PEER_HINT_HEADER,
    PEER_VIA_HEADER,
};
use crate::tags;

/// A random per-process value that authenticates the edge's requests to its own listener
/// (shadow fills, peer fetches), so a client cannot pass for them.
#[derive(Clone)]
pub struct InternalSecret(Arc<str>);

impl InternalSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        let v: u128 = rand::random();
        InternalSecret(format!("{v:032x}").into())
    }

    /// The header value to send.
    pub fn value(&self) -> &str {
        &self.0
    }

    /// Whether a received header value is this secret.
    pub fn matches(&self, v: &http::HeaderValue) -> bool {
        token_matches(v.as_bytes(), self.0.as_bytes())
    }
}

/// Constant-time comparison so a secret cannot be guessed byte by byte from timing. The two
/// are compared as SHA-256 digests, of one length whatever the inputs': comparing the tokens
/// themselves would answer a guess of the wrong length sooner, telling the secret's length.
pub fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    use ring::digest::{digest, SHA256};
    let (given, expected) = (digest(&SHA256, given), digest(&SHA256, expected));
    given
        .as_ref()
        .iter()
        .zip(expected.as_ref())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// The edge's shadowing hooks in the request path.
pub struct ShadowHooks {
    /// Shadow marks (hit accounting).
    pub table: Arc<ShadowTable>,
    /// Authenticates the edge's own fill and peer-fetch requests.
    pub secret: InternalSecret,
    /// The peer-fill bridge, when QUIC sync is configured.
    pub bridge: Option<std::net::SocketAddr>,
    /// The peers a hinted miss may be filled from.
    pub peers: Arc<PeerDirectory>,
    /// The codings clients are served with, which shadow fills ask for.
    pub encodings: Arc<accept_encoding::Mix>,
}

/// Cache behaviour that the origin's headers do not decide.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// Freshness for cacheable responses without an explicit lifetime (zero: do not cache).
    pub default_ttl: Duration,
    /// Default stale-while-revalidate seconds.
    pub stale_while_revalidate_secs: u32,
    /// Default stale-if-error seconds.
    pub stale_if_error_secs: u32,
    /// Largest body that is cached.
    pub max_object_bytes: usize,
    /// Longest time a request waits on another request's fill.
    pub lock_timeout: Duration,
    /// Origin connect timeout.
    pub connect_timeout: Duration,
    /// Origin read timeout.
    pub read_timeout: Duration,
}

/// Components with `'static` lifetime, as pingora-cache requires.
pub struct CacheParts {
    /// The foyer-backed storage.
    pub storage: &'static FoyerStorage,
    /// The cache lock that coalesces concurrent misses.
    pub lock: &'static CacheKeyLockImpl,
    /// Remembers keys that turned out uncacheable so they bypass the lock next time.
    pub predictor: &'static Predictor<32>,
}

/// The edge proxy.
pub struct EdgeProxy {
    node_id: String,
    origins: Arc<SharedOrigins>,
    parts: CacheParts,
    policy: CachePolicy,
    metrics: EdgeMetrics,
    inflight: InflightCounter,
    hooks: ShadowHooks,
    /// `Cache-Status` values per status, built once (they name this node).
    cache_status_values: Vec<http::HeaderValue>,
    /// Peers whose `X-Forwarded-Proto` reaches the origin unchanged.
    trusted_proxies: Vec<IpNet>,
    /// Where each request's access line goes.
    access_log: Option<AccessLog>,
    /// Level of the downstream compression module (`0`: off).
    compression_level: u32,
}

/// One request's access-log line.
#[derive(Serialize)]
struct AccessLine<'a> {
    #[serde(flatten)]
    request: RequestFields<'a>,
    node: &'a str,
    /// What the cache did: the `cache_status` label of `shadowcdn_edge_requests_total` (the
    /// `X-Cache` value, lower-case, for clients' requests; `shadow_fill`, `peer_fetch`,
    /// `rejected` or `error` otherwise).
    cache: &'static str,
    /// The fill came from a peer edge instead of the origin.
    peer: bool,
    /// A background revalidation (stale-while-revalidate), not a client's request.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    background: bool,
}

/// Per-request state carried through the phases.
pub struct RequestCtx {
    _inflight: InflightGuard,
    origin: Option<Arc<Origin>>,
    started: Instant,
    upstream_started: Option<Instant>,
    /// When the first upstream request (peer or origin) left, on both clocks: an answer to a
    /// fetch that overlapped a purge of its key is not cached.
    fetch_started: Option<(Instant, SystemTime)>,
    upstream_responded: bool,
    status: CacheStatus,
    /// The cache's phase when the request went upstream (a miss, or a stale copy to
    /// revalidate): what an error's `Cache-Status` says it forwarded for.
    forwarded: Option<CacheStatus>,
    /// Primary cache key (`host/path?query`).
    key: String,
    /// This request is the edge's own shadow fill.
    shadow_fill: bool,
    /// This shadow fill comes from a peer edge through the bridge.
    peer_fill: bool,
    /// A peer fetch: answer from cache or not at all.
    only_if_cached: bool,
    /// The client's own `Cache-Control` (RFC 9111 §5.2.1): `no-store` keeps the response to
    /// it out of the cache; `only-if-cached` gets a 504 rather than a fetch.
    client_no_store: bool,
    client_only_if_cached: bool,
    /// The request came from `server.trusted_proxies` (a broker): its forwarded scheme, route
    /// tag and peer hint are taken.
    from_trusted: bool,
    /// A refresh fill: a held copy is revalidated with the origin.
    refresh: bool,
    /// The broker's peer hint was considered (once per request; a retry goes to the origin).
    hint_used: bool,
    /// The peer edge the current upstream attempt asks for this miss.
    demand_peer: Option<PeerRef>,
    /// The miss was filled from a peer edge.
    peer_served: bool,
    /// The `Age` the last upstream answer arrived with: pingora hands the cache filter a 304
    /// merged into the stored header without it, and serves a miss from the stored header,
    /// from which it is removed.
    upstream_age: Option<Duration>,
    /// A 304's own header: pingora merges only its validators and freshness into the stored
    /// header, and the rest (a new `Surrogate-Key`, a changed field) must update it too.
    not_modified: Option<Box<ResponseHeader>>,
    /// Fields of the upstream answer kept out of the stored copy that this request's client
    /// is still owed ([`response_fields::withheld`]).
    withheld: Vec<(http::HeaderName, http::HeaderValue)>,
    /// What compression may do to this response.
    compression: compression::Plan,
    /// The client's `Accept-Encoding` as sent (the request's is normalized, see
    /// [`accept_encoding`]), which pingora's compression module also reads.
    client_accept_encoding: Option<http::HeaderValue>,
    /// The origin's query filter left parameters of this request out of its key.
    query_filtered: bool,
    /// The broker's health probe ([`PROBE_PATH`]).
    probe: bool,
}

impl RequestCtx {
    /// When the fetch that brought the response started, on the wall (now, if none did):
    /// the stored copy's freshness counts from then, and a peer's copy is judged against it.
    fn fetched_at(&self) -> SystemTime {
        self.fetch_started
            .map_or_else(SystemTime::now, |(_, wall)| wall)
    }
}

impl EdgeProxy {
    /// Build the proxy over a shared, replaceable origin table.
    pub fn new(
        node_id: String,
        origins: Arc<SharedOrigins>,
        parts: CacheParts,
        policy: CachePolicy,
        metrics: EdgeMetrics,
        inflight: InflightCounter,
        hooks: ShadowHooks,
    ) -> Self {
        let cache_status_values = CacheStatus::ALL
            .iter()
            .map(|s| {
                let v = format!("shadowcdn-{node_id}; {}", cache_status_params(*s));
                http::HeaderValue::from_str(&v)
                    .unwrap_or_else(|_| http::HeaderValue::from_static("shadowcdn"))
            })
            .collect();
        EdgeProxy {
            node_id,
            origins,
            parts,
            policy,
            metrics,
            inflight,
            hooks,
            cache_status_values,
            trusted_proxies: Vec::new(),
            access_log: None,
            compression_level: 0,
        }
    }

    /// Compress text responses at `level` for clients that accept it (`0`: never).
    pub fn with_compression(mut self, level: u32) -> Self {
        self.compression_level = level;
        self
    }

    /// Write an access line for every request to `log`.
    pub fn with_access_log(mut self, log: AccessLog) -> Self {
        self.access_log = Some(log);
        self
    }

    /// Pass `X-Forwarded-Proto` on from these peers (the brokers); from any other address it
    /// is replaced with `http`, the scheme of the edge's own listener.
    pub fn with_trusted_proxies(mut self, nets: Vec<IpNet>) -> Self {
        self.trusted_proxies = nets;
        self
    }

    /// Whether `client` may tell the origin which scheme the request arrived over.
    fn trusts(&self, client: Option<std::net::IpAddr>) -> bool {
        client.is_some_and(|ip| within(&self.trusted_proxies, ip))
    }
}

/// Whether `ip` lies in one of `nets`; a dual-stack listener reports IPv4 peers as
/// `::ffff:a.b.c.d`, which is matched as the IPv4 address it is.
fn within(nets: &[IpNet], ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// Header a broker tags requests with: `region=<r>; reason=<primary|failover|…>`.
pub const ROUTE_HEADER: &str = "x-shadowcdn-route";
/// Header a broker sets to the client's region.
pub const CLIENT_REGION_HEADER: &str = "x-shadowcdn-client-region";
/// How this CDN's nodes name themselves in `Via` (`1.1 shadowcdn-<node>`): a request that
/// arrives with it has come round through an origin that points back at the CDN.
pub const VIA_NAME: &str = "shadowcdn-";

/// Known route reasons, so a client cannot blow up metric cardinality with made-up values.
const ROUTE_REASONS: [&str; 5] = ["primary", "failover", "standby", "neighbour", "origin"];

/// `(region, reason)` of a route tag, if well formed.
fn parse_route(tag: &str) -> Option<(&str, &'static str)> {
    let mut region = None;
    let mut reason = None;
    for part in tag.split(';') {
        match part.trim().split_once('=') {
            Some(("region", v)) if !v.is_empty() && v.len() <= 32 => region = Some(v),
            Some(("reason", v)) => reason = ROUTE_REASONS.iter().find(|r| **r == v).copied(),
            _ => {}
        }
    }
    Some((region?, reason?))
}

/// Address a request to an origin: `Host: host`, and an origin-form request line (an
/// absolute-form URI's authority would override Host at the origin). The broker's
/// direct-to-origin fallback uses it too, so both ask an origin alike.
pub fn address_origin(req: &mut RequestHeader, host: String) -> Result<()> {
    req.insert_header(header::HOST, host)?;
    // pingora keeps an absolute-form target's bytes for the wire (its `Uri` holds only the
    // path and query, anchored at `/`): they go unless the target is set anew.
    if req.uri.authority().is_some() || !req.raw_path().starts_with(b"/") {
        let pq = req
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let uri = pq
            .parse()
            .map_err(|_| Error::explain(ErrorType::InternalError, "request path is not a URI"))?;
        req.set_uri(uri);
    }
    Ok(())
}

/// The address of the client (or proxy) on the other end of `session`'s connection.
pub fn client_ip(session: &Session) -> Option<std::net::IpAddr> {
    session.client_addr()?.as_inet().map(|a| a.ip())
}

/// The scheme a client's request arrived over, as the broker tells the origin.
pub const FORWARDED_PROTO: &str = "x-forwarded-proto";

/// Add `client` to the request's `X-Forwarded-For` chain as one comma-separated line: an
/// origin that reads a single value (the first line) must still see the whole chain, whose
/// last entries are the ones proxies it trusts added, not only what the client wrote. An IPv4
/// client a dual-stack listener saw as `::ffff:a.b.c.d` is written in its IPv4 form, which an
/// origin's address rules and geolocation expect.
pub fn forwarded_for(req: &mut RequestHeader, client: std::net::IpAddr) -> Result<()> {
    let mut chain = req
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
    if !chain.is_empty() {
        chain.push_str(", ");
    }
    chain.push_str(&client.to_canonical().to_string());
    req.insert_header("x-forwarded-for", chain)?;
    Ok(())
}

/// Forwarding headers this CDN does not set and a client could forge: an origin that trusts
/// the CDN's addresses and reads them (many frameworks do) would take a forged client
/// address, scheme, host or path prefix, and what it builds from them (absolute links)
/// would be cached for everyone. The chain the CDN vouches for is `X-Forwarded-For` and
/// `X-Forwarded-Proto`, which it writes itself.
pub const UNVOUCHED_FORWARDING_HEADERS: [&str; 11] = [
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-prefix",
    "x-original-host",
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
];

/// Remove [`UNVOUCHED_FORWARDING_HEADERS`] from a request going upstream.
pub fn strip_unvouched_forwarding(req: &mut RequestHeader) {
    for name in UNVOUCHED_FORWARDING_HEADERS {
        req.remove_header(name);
    }
}

/// Whether `req`'s `Via` names the edge `node_id` (`1.1 shadowcdn-<id>`, as it writes it).
fn passed_through(req: &RequestHeader, node_id: &str) -> bool {
    req.headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| hop.split_whitespace().nth(1))
        .any(|by| by.strip_prefix(VIA_NAME) == Some(node_id))
}

/// A cache key from a host and the path and query it is keyed by (an origin's query filter
/// already applied, see [`crate::cache_key`]): `host/path?query`, host normalized.
pub fn primary_key(host: &str, path_and_query: &str) -> String {
    format!("{}{}", normalize_host(host), path_and_query)
}

/// The primary cache key of a request whose host is `host`, served by `origin`, and whether
/// the origin's query filter left parameters out of it.
fn request_key(req: &RequestHeader, host: &str, origin: &Origin) -> (String, bool) {
    let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let keyed = origin.query_filter.apply(pq);
    let filtered = keyed.len() != pq.len();
    (primary_key(host, &keyed), filtered)
}

/// Whether a redirect points at a URL this edge keys as `key`, the key it would be stored
/// under, over the same scheme: `/` to `/?lang=en` when the origin's query filter drops
/// `lang`. Stored, it would answer the URL it points to with itself, a loop until it expires.
/// (A redirect to the other scheme is stored: redirects vary by scheme, see
/// `cache_vary_filter`.) `Location` is resolved against the request.
fn redirects_to_its_own_key(
    origins: &OriginTable,
    req: &RequestHeader,
    resp: &ResponseHeader,
    key: &str,
) -> bool {
    let Some(location) = resp
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((host, _)) = key.split_once('/') else {
        return false;
    };
    let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let scheme = match req.headers.get(FORWARDED_PROTO) {
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"https") => "https",
        _ => "http",
    };
    let Ok(target) =
        url::Url::parse(&format!("{scheme}://{host}{pq}")).and_then(|b| b.join(location))
    else {
        return false;
    };
    let same_host = target
        .host_str()
        .is_some_and(|h| normalize_host(h) == normalize_host(host));
    if !same_host || target.scheme() != scheme {
        return false;
    }
    let target_pq = match target.query() {
        Some(q) => format!("{}?{q}", target.path()),
        None => target.path().to_string(),
    };
    origins.cache_key(host, &target_pq) == key
}

/// Normalize the host of a `host/path` key given by the broker (which applied the origin's
/// query filter already; see [`crate::origin::OriginTable::normalize_key`] for one that also
/// applies it).
pub fn normalize_key(key: &str) -> Option<String> {
    let (host, rest) = key.split_once('/')?;
    let host = crate::origin::checked_host(host).ok()?;
    Some(primary_key(&host, &format!("/{rest}")))
}

/// The request's host: the Host header, else the URI authority; `None` when empty.
pub fn request_host(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
        .filter(|h| !h.is_empty())
}

/// The code and message of the 400 answering a request [`request_host`] finds no host in:
/// none was sent, or the one sent is not text (a client or a tool encoding a name wrongly).
pub fn no_host_error(req: &RequestHeader) -> (&'static str, &'static str) {
    if req.headers.contains_key(header::HOST) {
        ("invalid_host", "the Host header is not a valid host name")
    } else {
        ("missing_host", "request has no Host header")
    }
}

/// Whether a request's method is refused before anything else, answered with the message
/// to say so: `TRACE` echoes the request back, headers and cookies included (cross-site
/// tracing), and `CONNECT` would make a tunnel of a cache; CDNs and most servers turn both
/// off. (Pingora lets `CONNECT` this far only when allowed, [`server_options`], so that the
/// answer is this JSON one.)
pub fn refused_method(req: &RequestHeader) -> Option<&'static str> {
    match req.method {
        http::Method::TRACE => Some("TRACE is not served"),
        http::Method::CONNECT => Some("CONNECT is not served: this is a cache, not a tunnel"),
        _ => None,
    }
}

/// The HTTP options of a proxy listener: `CONNECT` reaches the request filter, which refuses
/// it with a JSON 405 ([`refused_method`]), instead of Pingora's empty one with no log line.
pub fn server_options() -> pingora_core::apps::HttpServerOptions {
    let mut options = pingora_core::apps::HttpServerOptions::default();
    options.allow_connect_method_proxying = true;
    options
}

/// Write a JSON error response and end the request.
pub async fn respond_json_error(
    session: &mut Session,
    status: u16,
    code: &str,
    message: &str,
) -> Result<()> {
    respond_json_error_with(session, status, code, message, None).await
}

/// [`respond_json_error`] with the cache's `X-Cache` and `Cache-Status` for the failed request
/// (`cache_status`), so a client or operator reading the headers sees where it failed.
async fn respond_json_error_with(
    session: &mut Session,
    status: u16,
    code: &str,
    message: &str,
    cache_status: Option<http::HeaderValue>,
) -> Result<()> {
    // Once a response header is out, an error cannot be told to the client: the connection
    // is closed instead, so the client sees a cut-off body, never a "complete" one with JSON
    // appended.
    if session.response_written().is_some() {
        session.set_keepalive(None);
        return Ok(());
    }
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let mut resp = ResponseHeader::build(status, Some(3))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    if let Some(v) = cache_status {
        resp.insert_header("x-cache", "ERROR")?;
        resp.insert_header("cache-status", v)?;
    }
    session.set_keepalive(None);
    // A few bytes of JSON: not worth an encoder.
    compression::disable(session);
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

/// What a response's cache phase means for the client.
fn phase_status(phase: CachePhase) -> CacheStatus {
    match phase {
        CachePhase::Hit => CacheStatus::Hit,
        CachePhase::Stale => CacheStatus::Stale,
        CachePhase::StaleUpdating => CacheStatus::StaleUpdating,
        CachePhase::Miss => CacheStatus::Miss,
        CachePhase::Expired => CacheStatus::Expired,
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => CacheStatus::Revalidated,
        _ => CacheStatus::Bypass,
    }
}

/// The `X-Cache` value of a phase status.
fn x_cache_value(s: CacheStatus) -> &'static str {
    match s {
        CacheStatus::Hit => "HIT",
        CacheStatus::Stale => "STALE",
        CacheStatus::StaleUpdating => "STALE-UPDATING",
        CacheStatus::Miss => "MISS",
        CacheStatus::Expired => "EXPIRED",
        CacheStatus::Revalidated => "REVALIDATED",
        _ => "BYPASS",
    }
}

/// RFC 9211 `Cache-Status` parameters of a phase status.
fn cache_status_params(s: CacheStatus) -> &'static str {
    match s {
        CacheStatus::Hit => "hit",
        CacheStatus::Stale => "hit; detail=stale",
        CacheStatus::StaleUpdating => "hit; detail=stale-while-revalidate",
        CacheStatus::Miss => "fwd=miss",
        CacheStatus::Expired => "fwd=stale",
        CacheStatus::Revalidated => "fwd=stale; fwd-status=304",
        _ => "fwd=bypass",
    }
}

/// The status and error code a failed proxy attempt is answered with: the upstream's status
/// when it sent one, 502 for upstream failures, 400 for bad requests (408 for a body the
/// client stopped sending), 0 (no answer) when the client is already gone, 500 otherwise.
pub fn error_status(e: &Error) -> (u16, &'static str) {
    match e.etype() {
        ErrorType::HTTPStatus(code) => (*code, "http_status"),
        _ => match e.esource() {
            ErrorSource::Upstream => (502, "origin_unreachable"),
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                    (0, "client_gone")
                }
                // The client stopped sending its body: its own delay, not a malformed request.
                ErrorType::ReadTimedout => (408, "request_timeout"),
                _ => (400, "bad_request"),
            },
            ErrorSource::Internal | ErrorSource::Unset => (500, "internal"),
        },
    }
}

/// When the peer that answered a peer fetch admitted its copy ([`PEER_ADMITTED_HEADER`], on
/// its clock: edges' clocks are assumed synchronised, as for any CDN's purge ordering), or
/// when the fetch started (`fetch_wall`) if that is earlier: purges since the fetch started
/// are judged by the fetch itself. Every purge this edge applied since then is one the copy
/// may predate. `None` for a copy that cannot be judged that way: no time, one that does not
/// parse, or one past this edge's clock by more than [`PEER_CLOCK_ALLOWANCE`] (a peer clock
/// that far ahead says nothing of which purges the copy predates); such a copy is not used.
fn peer_admitted(resp: &ResponseHeader, fetch_wall: SystemTime) -> Option<SystemTime> {
    let ms: u64 = resp
        .headers
        .get(PEER_ADMITTED_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
    (at <= SystemTime::now() + PEER_CLOCK_ALLOWANCE).then(|| at.min(fetch_wall))
}

/// How far a peer's clock may run ahead of this edge's (NTP keeps them within milliseconds).
const PEER_CLOCK_ALLOWANCE: Duration = Duration::from_secs(1);

/// The `Age` a response arrived with: whole seconds (RFC 9111 §5.1); absent or malformed
/// counts as zero, and one past [`MAX_AGE_SECS`] as that (RFC 9111 §1.2.2).
fn upstream_age(resp: &ResponseHeader) -> Duration {
    resp.headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let v = v.trim();
            let digits = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
            digits.then(|| v.parse::<u64>().unwrap_or(MAX_AGE_SECS))
        })
        .map_or(Duration::ZERO, |s| Duration::from_secs(s.min(MAX_AGE_SECS)))
}

/// Whether `req` makes its answer depend on `If-Match` or `If-Unmodified-Since`. pingora-cache
/// neither answers these from a stored copy (412) nor passes them on to a fill, so such a
/// request goes to the origin uncached: a download resumed with `Range` and `If-Match` must
/// not splice bytes of a newer version onto those of the one it started.
fn asks_a_precondition(req: &RequestHeader) -> bool {
    req.headers.contains_key(header::IF_MATCH)
        || req.headers.contains_key(header::IF_UNMODIFIED_SINCE)
}

/// Whether a line of `resp`'s list field `field` holds the item `item` (compared without
/// case): for `Cache-Control`, a directive without a value.
fn lists(resp: &ResponseHeader, field: header::HeaderName, item: &str) -> bool {
    resp.headers
        .get_all(field)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case(item))
}

/// The largest delta-seconds a cache must handle (2^31, RFC 9111 §1.2.2); an `Age` beyond it
/// stands for it.
const MAX_AGE_SECS: u64 = 1 << 31;

/// Whether the cache phase is a revalidation of this edge's own stored copy, which only the
/// origin can answer: a peer's refusal would reach pingora as a server error, letting the
/// stale copy serve within its stale-if-error window however healthy the origin is.
fn revalidating(phase: CachePhase) -> bool {
    matches!(
        phase,
        CachePhase::Stale | CachePhase::StaleUpdating | CachePhase::Expired
    )
}

/// Says a response was filled from a peer edge (`peer`), to clients and to the shadow filler.
pub const FILLED_FROM_HEADER: &str = "x-shadowcdn-fill";

/// Path of the broker's health probe on the proxy port, answered `204` by the proxy's own
/// workers before any other check (and not counted or logged as a request): an edge whose
/// proxy stopped serving, while the kernel still accepts its connections and its admin API
/// still answers, fails the probe instead of holding its keys' requests until they time out.
pub const PROBE_PATH: &str = "/.well-known/shadowcdn-probe";

/// Error type of a hinted peer that does not hold a usable copy (retried on the origin).
const PEER_MISS: &str = "peer_miss";

/// Cache defaults are a `fn` pointer in pingora; our configurable TTL is applied after it.
const NO_HEURISTIC: CacheMetaDefaults = CacheMetaDefaults::new(|_| None, 0, 0);

/// Why an answer is not stored. To a request with credentials (`Authorization`, or a
/// `Cookie` for a key the edge holds a copy of) it describes that client (a `Set-Cookie`,
/// `private`, its own copy), not the key: remembered for the key, pingora's predictor would
/// send every later request for the URL past the cache, stored variants included, so any
/// logged-in client could turn a key's cache off with one request. The next anonymous answer
/// teaches the predictor what the key itself is. A key with nothing stored is remembered as
/// usual: most browsers send some cookie, and a page no one may cache would otherwise take the
/// cache lock on every request, each waiting for the one before it.
fn refused(credentials: bool) -> NoCacheReason {
    if credentials {
        NoCacheReason::Custom(CREDENTIALED_REQUEST)
    } else {
        NoCacheReason::OriginNotCache
    }
}

/// Status codes RFC 9110 §15.1 calls heuristically cacheable (a 206 only ever judged for a
/// bypassed request, see `response_cache_filter`).
fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

impl EdgeProxy {
    /// The peer the broker hinted for this request, when a miss may be filled from it: a plain
    /// GET relayed by a trusted address (`server.trusted_proxies`, the brokers': a client
    /// that reaches the edge directly could otherwise send its misses to a peer the broker
    /// holds out, or fill a peer's request slots), not one of the edge's own fills or peer
    /// fetches, without credentials, on an edge with a QUIC bridge, naming a peer the broker
    /// listed.
    fn hinted_peer(&self, session: &Session, ctx: &RequestCtx) -> Option<PeerRef> {
        let req = session.req_header();
        let id = req.headers.get(PEER_HINT_HEADER)?;
        if ctx.shadow_fill
            || ctx.only_if_cached
            || self.hooks.bridge.is_none()
            || req.method != http::Method::GET
            || req.headers.contains_key(header::AUTHORIZATION)
            // The peer's copy is whatever version it holds, and the bridge carries neither
            // the precondition nor the range: the origin judges these.
            || asks_a_precondition(req)
        {
            return None;
        }
        if !ctx.from_trusted {
            // Seen when the brokers' addresses are missing from `server.trusted_proxies`:
            // every hint is then ignored.
            self.metrics.peer_hints_untrusted.inc();
            let client = client_ip(session);
            tracing::debug!(?client, "peer hint from an untrusted address ignored");
            return None;
        }
        self.hooks.peers.resolve(id.to_str().ok()?)
    }

    /// The QUIC bridge this request goes through instead of the origin: a peer fill or a
    /// demand miss a peer may answer, on an edge that has a bridge.
    fn bridge_for(&self, ctx: &RequestCtx) -> Option<std::net::SocketAddr> {
        (ctx.peer_fill || ctx.demand_peer.is_some())
            .then_some(self.hooks.bridge)
            .flatten()
    }

    /// A request that may change its target (not GET, HEAD, OPTIONS or TRACE) answered with
    /// a success or a redirect makes the stored copy of that URL out of date (RFC 9111 §4.4):
    /// it is removed here, with its shadow mark. Not acknowledged to anyone, so not waited
    /// on to reach the disk tier's tombstones. A fill under way for the URL (which may predate
    /// the change) is cancelled with it: its readers get their answer, the cache does not
    /// keep it.
    fn invalidate_after_unsafe(
        &self,
        req: &RequestHeader,
        resp: &ResponseHeader,
        ctx: &RequestCtx,
    ) {
        let safe = matches!(
            req.method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
        );
        let changed = resp.status.is_success() || resp.status.is_redirection();
        if safe || !changed || ctx.key.is_empty() || ctx.shadow_fill || ctx.only_if_cached {
            return;
        }
        // Only a copy held or being filled is removed: most such requests are for URLs never
        // cached (API calls), and a purge of each would take the purge paths' locks and
        // bounded logs. A fill under way (registered once its answer's header arrived) is
        // cancelled and the removal recorded, so that it does not store its answer.
        if !self.parts.storage.holds_or_fills(&ctx.key) {
            return;
        }
        self.parts.storage.invalidate_key(&ctx.key);
        if self.hooks.table.is_marked(&ctx.key) {
            self.hooks.table.remove(&ctx.key);
        }
        self.metrics.unsafe_method_invalidations.inc();
    }

    /// `authorization`: the request carried `Authorization` (RFC 9111 §3.5); `credentials`:
    /// it or a `Cookie`, so a refusal may be about the client rather than the key.
    /// `fetched`: when the fetch that brought `resp` started, which its freshness counts from.
    /// `created`: the stored copy's admission time, that or earlier (a peer's copy); a purge
    /// from then on covers it at lookup, however late the copy is stored. `age`: how long the
    /// response had spent in other caches on its way here.
    fn cacheability(
        &self,
        resp: &ResponseHeader,
        authorization: bool,
        credentials: bool,
        fetched: SystemTime,
        created: SystemTime,
        age: Duration,
    ) -> RespCacheable {
        // `Vary: *` names something outside the request: no stored copy can ever match
        // (RFC 9111 §4.1).
        if lists(resp, header::VARY, "*") {
            return RespCacheable::Uncacheable(NoCacheReason::OriginNotCache);
        }
        let lifetime = lifetime::of(resp);
        let one_expires;
        let resp = if lifetime == Lifetime::RepeatedExpires {
            one_expires = lifetime::with_one_expires(resp);
            &one_expires
        } else {
            resp
        };
        let cc = CacheControl::from_resp_headers(resp);
        let mut header = resp.clone();
        if let Some(c) = &cc {
            c.strip_private_headers(&mut header);
        }
        // A `Set-Cookie` is one client's (a session, a login): storing it would hand it to
        // every later client. Such a response is never stored, whatever lifetime the origin
        // gave, unless the origin named the cookie as the part not to store
        // (`no-cache="set-cookie"`, `private="set-cookie"`; stripped above).
        if header.headers.contains_key(header::SET_COOKIE) {
            return RespCacheable::Uncacheable(refused(credentials));
        }
        // A response that already aged in another cache (a peer edge, a cache in front of
        // the origin) has that much less freshness left (RFC 9111 §4.2.3): freshness and the
        // `Age` served on hits count from when it was generated (pingora's epoch override),
        // while its admission time (`created`, what purges and Vary variants are judged by)
        // is when its fetch started, or a peer's copy's first admission.
        // Not before 1970 either: stored metadata cannot hold such a time.
        let now = fetched
            .checked_sub(age)
            .filter(|t| *t >= SystemTime::UNIX_EPOCH)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        // A lifetime the origin gave but wrote wrong (`max-age=-1`, `max-age=abc`) is not
        // the absence of one: such a response is stale from the start (RFC 9111 §4.2.1), kept
        // only when it can be revalidated.
        // A shared cache reads `s-maxage` and ignores `max-age` (§5.2.2.10), so a bad
        // `max-age` beside a good `s-maxage` is harmless.
        // pingora's parser keeps the last of a repeated directive: `no-cache` beside a later
        // `no-cache="…"` would read as the field list alone, and lose the revalidation every
        // use needs (RFC 9111 §4.2.1: a repeat is read as its first, or as stale). A lifetime
        // given twice differently is stale too (`lifetime`).
        let no_cache_repeated = lists(resp, header::CACHE_CONTROL, "no-cache")
            && cc.as_ref().is_some_and(|c| !c.no_cache());
        let miswritten = no_cache_repeated
            || lifetime == Lifetime::Conflicting
            || cc.as_ref().is_some_and(|c| match c.s_maxage() {
                Err(_) => true,
                Ok(s_maxage) => s_maxage.is_none() && c.max_age().is_err(),
            });
        // What refuses storage whatever the lifetime (RFC 9111 §3, §3.5).
        let by_response = cc.as_ref().is_some_and(|c| c.no_store() || c.private());
        // A bare `private` counts whatever a later `private="…"` says (which the parser kept).
        if !by_response && lists(resp, header::CACHE_CONTROL, "private") {
            return RespCacheable::Uncacheable(refused(credentials));
        }
        let by_authorization = authorization
            && cc
                .as_ref()
                .is_none_or(|c| !c.allow_caching_authorized_req());
        let explicit = if miswritten {
            let validators = resp.headers.contains_key(header::ETAG)
                || resp.headers.contains_key(header::LAST_MODIFIED);
            if by_response || by_authorization || !validators {
                return RespCacheable::Uncacheable(refused(credentials));
            }
            Some(now.checked_sub(Duration::from_secs(1)).unwrap_or(now))
        } else {
            calculate_fresh_until(now, cc.as_ref(), resp, authorization, &NO_HEURISTIC)
        };
        let fresh_until = match explicit {
            Some(t) => t,
            None => {
                let by_policy = self.policy.default_ttl.is_zero()
                    || !heuristically_cacheable(resp.status.as_u16());
                if by_response || by_authorization || by_policy {
                    // A server error (often `no-store`) says the origin is failing, not that
                    // the key can never be cached: the predictor must not send the key's
                    // next requests past the cache lock, all at once, to an origin that is
                    // recovering.
                    let reason = if resp.status.is_server_error() {
                        NoCacheReason::Custom(ORIGIN_SERVER_ERROR)
                    } else {
                        refused(credentials)
                    };
                    return RespCacheable::Uncacheable(reason);
                }
                now + self.policy.default_ttl
            }
        };
        // The configured stale windows are the operator's permission to serve stale; an
        // origin that demands validation first (no-cache, must-revalidate, proxy-revalidate,
        // s-maxage: RFC 9111 §5.2.2) only gets the windows it grants itself.
        let validate_first = miswritten
            || cc.as_ref().is_some_and(|c| {
                c.no_cache()
                    || c.must_revalidate()
                    || c.proxy_revalidate()
                    || c.s_maxage().ok().flatten().is_some()
            });
        let defaults = if validate_first {
            CacheMetaDefaults::new(|_| None, 0, 0)
        } else {
            CacheMetaDefaults::new(
                |_| None,
                self.policy.stale_while_revalidate_secs,
                self.policy.stale_if_error_secs,
            )
        };
        // A response to validate before every use (`no-cache`, or a lifetime given twice
        // differently) is never served stale, not even in windows it grants itself: RFC 9111
        // §4.2.4. (Pingora drops the origin's own windows for must-revalidate, proxy-revalidate
        // and s-maxage, not for no-cache.)
        let every_use = miswritten || cc.as_ref().is_some_and(|c| c.no_cache());
        let (swr, sie) = if every_use {
            (0, 0)
        } else {
            calculate_serve_stale_durations(cc.as_ref(), &defaults)
        };
        // A stale window the origin gave twice differently grants none (pingora kept the
        // later, maybe the longer).
        let granted = |name, secs| {
            if lifetime::conflicts(resp, name) {
                0
            } else {
                secs
            }
        };
        let swr = granted("stale-while-revalidate", swr);
        let sie = granted("stale-if-error", sie);
        // Pingora writes a hit's `Age` itself; a stored one would be counted again when a 304
        // merges into this header.
        header.remove_header(&header::AGE);
        header.remove_header(PEER_ADMITTED_HEADER);
        let mut meta = CacheMeta::new(fresh_until, created, swr, sie, header);
        if now != created {
            meta.set_epoch_override(now);
        }
        RespCacheable::Cacheable(meta)
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            _inflight: self.inflight.enter(),
            origin: None,
            started: Instant::now(),
            upstream_started: None,
            fetch_started: None,
            upstream_responded: false,
            status: CacheStatus::Bypass,
            forwarded: None,
            key: String::new(),
            shadow_fill: false,
            peer_fill: false,
            only_if_cached: false,
            client_no_store: false,
            client_only_if_cached: false,
            from_trusted: false,
            refresh: false,
            hint_used: false,
            demand_peer: None,
            peer_served: false,
            upstream_age: None,
            not_modified: None,
            withheld: Vec::new(),
            compression: compression::Plan::AsStored,
            client_accept_encoding: None,
            query_filtered: false,
            probe: false,
        }
    }

    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        modules.add_module(ResponseCompressionBuilder::enable(self.compression_level));
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        if session.req_header().uri.path() == PROBE_PATH {
            ctx.probe = true;
            let mut resp = ResponseHeader::build(204, Some(1))?;
            resp.insert_header(header::CACHE_CONTROL, "no-store")?;
            // Each probe opens its own connection: accepting one is part of what it checks.
            session.set_keepalive(None);
            compression::disable(session);
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(true);
        }
        // Replaced before anything reads the request, so that a `Vary: X-Forwarded-Proto`
        // variant is chosen by the scheme the origin is told, not by a client's claim.
        let trusted = self.trusts(client_ip(session));
        ctx.from_trusted = trusted;
        if !trusted {
            session
                .req_header_mut()
                .insert_header(FORWARDED_PROTO, "http")?;
        }
        // Kept as sent for the compression decisions (pingora's compression module read it
        // already); the request goes on with the one coding its variant stands for.
        ctx.client_accept_encoding = session
            .req_header()
            .headers
            .get(header::ACCEPT_ENCODING)
            .cloned();
        let coding = accept_encoding::normalize(session.req_header_mut());
        let req = session.req_header();
        if let Some(msg) = refused_method(req) {
            self.metrics.rejected.with_label_values(&["method"]).inc();
            ctx.status = CacheStatus::Rejected;
            respond_json_error(session, 405, "method_not_allowed", msg).await?;
            return Ok(true);
        }
        let Some(host) = request_host(req) else {
            self.metrics.rejected.with_label_values(&["no_host"]).inc();
            ctx.status = CacheStatus::Rejected;
            let (code, msg) = no_host_error(req);
            respond_json_error(session, 400, code, msg).await?;
            return Ok(true);
        };
        // This edge names itself in `Via` on the way upstream: a request that already carries
        // its name came back through an origin row pointing at the CDN, and would circle,
        // one more connection held at every turn, until the header block overflowed.
        if passed_through(req, &self.node_id) {
            self.metrics.rejected.with_label_values(&["loop"]).inc();
            ctx.status = CacheStatus::Rejected;
            let msg = format!(
                "the request already passed through this edge: the origin of {host:?} points back at the CDN"
            );
            respond_json_error(session, 508, "loop_detected", &msg).await?;
            return Ok(true);
        }
        // Counted from the broker only: a client's made-up regions would take the bounded
        // label slots the real ones need.
        if let Some((region, reason)) = req
            .headers
            .get(ROUTE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_route)
            .filter(|_| trusted)
        {
            self.metrics.count_routed(region, reason);
        }
        let secret = &self.hooks.secret;
        ctx.shadow_fill = req
            .headers
            .get(FILL_HEADER)
            .is_some_and(|v| secret.matches(v));
        ctx.peer_fill = ctx.shadow_fill
            && self.hooks.bridge.is_some()
            && req.headers.contains_key(PEER_VIA_HEADER);
        ctx.refresh = ctx.shadow_fill && req.headers.contains_key(REFRESH_HEADER);
        ctx.only_if_cached = req
            .headers
            .get(PEER_FETCH_HEADER)
            .is_some_and(|v| secret.matches(v));
        // A background revalidation copies its client's request: it is the cache's, not bound
        // by that client's directives.
        if session.subrequest_ctx.is_none() && req.headers.contains_key(header::CACHE_CONTROL) {
            let cc = CacheControl::from_req_headers(req);
            ctx.client_no_store = cc.as_ref().is_some_and(|c| c.no_store());
            ctx.client_only_if_cached = cc.as_ref().is_some_and(|c| c.only_if_cached());
        }
        // Copies for a peer or for the cache are stored, not shown, and a background
        // revalidation's answer goes nowhere: left as they are.
        ctx.compression = if self.compression_level == 0
            || ctx.shadow_fill
            || ctx.only_if_cached
            || session.subrequest_ctx.is_some()
        {
            compression::Plan::AsStored
        } else {
            compression::Plan::for_request(ctx.client_accept_encoding.as_ref(), req)
        };
        let path = req.uri.path();
        ctx.origin = self.origins.current().select(host, path).cloned();
        if let Some(origin) = &ctx.origin {
            if !(ctx.shadow_fill || ctx.only_if_cached || session.subrequest_ctx.is_some()) {
                self.hooks.encodings.sample(coding);
            }
            (ctx.key, ctx.query_filtered) = request_key(req, host, origin);
            if ctx.compression != compression::Plan::Compress {
                compression::disable(session);
            }
            return Ok(false);
        }
        let msg = format!("no origin is configured for host {host:?} and path {path:?}");
        self.metrics
            .rejected
            .with_label_values(&["unknown_host"])
            .inc();
        ctx.status = CacheStatus::Rejected;
        respond_json_error(session, 404, "unknown_host", &msg).await?;
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        ctx.forwarded
            .get_or_insert(phase_status(session.cache.phase()));
        if ctx.only_if_cached || ctx.client_only_if_cached {
            return Err(Error::explain(
                ErrorType::HTTPStatus(504),
                "not cached on this edge",
            ));
        }
        // A stale copy of this edge's own goes to the origin, whichever peer a shadow order
        // or the broker's hint named.
        let own_copy = revalidating(session.cache.phase());
        if own_copy {
            ctx.peer_fill = false;
        }
        ctx.demand_peer = if ctx.hint_used || own_copy {
            None
        } else {
            ctx.hint_used = true;
            self.hinted_peer(session, ctx)
        };
        if let Some(bridge) = self.bridge_for(ctx) {
            let mut peer = HttpPeer::new(bridge, false, String::new());
            peer.options.read_timeout = Some(self.policy.read_timeout);
            return Ok(Box::new(peer));
        }
        let origin = ctx
            .origin
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no origin selected"))?;
        let mut peer = HttpPeer::new(origin.addr, origin.tls, origin.authority.clone());
        peer.options.connection_timeout = Some(self.policy.connect_timeout);
        peer.options.total_connection_timeout = Some(self.policy.connect_timeout);
        peer.options.read_timeout = Some(self.policy.read_timeout);
        Ok(Box::new(peer))
    }

    async fn cache_hit_filter(
        &self,
        _session: &mut Session,
        _meta: &CacheMeta,
        _hit_handler: &mut pingora_cache::HitHandler,
        _is_fresh: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<pingora_cache::ForcedFreshness>> {
        // The origin changed: revalidate, while other readers keep the old copy until the
        // new one replaces it.
        Ok(ctx
            .refresh
            .then_some(pingora_cache::ForcedFreshness::ForceExpired))
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<()> {
        if !request_cacheable(session.req_header()) || asks_a_precondition(session.req_header()) {
            return Ok(());
        }
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(self.policy.lock_timeout);
        // A peer fetch answers from what is cached now and never waits on the lock: the fill
        // it would wait for may itself be asking this edge's peer for the object, and two
        // edges filling the same key from each other would wait on each other's locks.
        // Nor does a request that will not store what it fetches (its client's `no-store`) or
        // will not fetch (`only-if-cached`): waiters on its lock would get nothing from it.
        let lock = (!(ctx.only_if_cached || ctx.client_no_store || ctx.client_only_if_cached))
            .then_some(self.parts.lock);
        session.cache.enable(
            self.parts.storage,
            None,
            Some(self.parts.predictor),
            lock,
            Some(overrides),
        );
        session
            .cache
            .set_max_file_size_bytes(self.policy.max_object_bytes);
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, ctx: &mut Self::CTX) -> Result<CacheKey> {
        if ctx.key.is_empty() {
            let req = session.req_header();
            let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
            ctx.key = self
                .origins
                .current()
                .cache_key(request_host(req).unwrap_or(""), pq);
        }
        // The hash pingora-cache would compute (Blake2b of the primary key), computed once
        // here instead of again by the lock, the predictor and the storage lookup.
        let hash = hash_key(&ctx.key);
        let mut key = CacheKey::new(ctx.key.clone(), "");
        key.set_primary_bin_override(hash);
        Ok(key)
    }

    fn range_header_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut Self::CTX,
    ) -> RangeType {
        let req = session.req_header();
        match range::adjusted(req, resp) {
            Some(judged) => range_header_filter(&judged, resp, range::MAX_RANGES),
            None => range_header_filter(req, resp, range::MAX_RANGES),
        }
    }

    fn cache_not_modified_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<bool> {
        let req = session.req_header();
        let not_modified = not_modified_filter(req, resp);
        if not_modified {
            let ae = ctx.client_accept_encoding.as_ref();
            ctx.compression = compression::not_modified(ctx.compression, ae, resp);
        }
        Ok(not_modified)
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<RespCacheable> {
        if ctx.client_no_store {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                crate::storage::CLIENT_NO_STORE,
            )));
        }
        // A peer that lacks the object answers with an error of the bridge's, not the
        // origin's: never cache it.
        if ctx.peer_fill && !matches!(resp.status.as_u16(), 200 | 203 | 206) {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                PEER_LACKS_OBJECT,
            )));
        }
        // A purge that came while this answer was on its way found nothing to remove: the
        // answer is what it meant to remove. The client gets it; the cache does not keep it.
        // A peer's copy also must not predate a purge applied here since the peer admitted
        // it (on the wall clock: the copy may be older than this process): the peer may not
        // have applied that purge.
        let storage = self.parts.storage;
        let from_peer = ctx.demand_peer.is_some() || ctx.peer_fill;
        let fetched = ctx.fetched_at();
        let peer_at = from_peer.then(|| peer_admitted(resp, fetched));
        if peer_at.is_some_and(|a| a.is_none()) {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                PEER_LACKS_OBJECT,
            )));
        }
        let peer_at = peer_at.flatten();
        let purged = ctx.fetch_started.is_some_and(|(t, wall)| {
            storage.purged_during(&ctx.key, t, wall, &resp.headers)
                || peer_at
                    .is_some_and(|a| storage.purged_since_admitted(&ctx.key, a, &resp.headers))
        });
        if purged {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                PURGED_DURING_FETCH,
            )));
        }
        if resp.status.is_redirection()
            && (ctx.query_filtered
                || redirects_to_its_own_key(
                    &self.origins.current(),
                    session.req_header(),
                    resp,
                    &ctx.key,
                ))
        {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                REDIRECT_TO_ITS_OWN_KEY,
            )));
        }
        // A server error answering the revalidation of a stored copy (outside any
        // stale-if-error window, or it would have been served stale) is passed on but does
        // not replace the copy, whatever lifetime it carries: the next request revalidates
        // the copy again, and it serves again once the origin recovers.
        if resp.status.is_server_error() && session.cache.phase() == CachePhase::Stale {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                ERROR_ON_REVALIDATION,
            )));
        }
        // A part of the object answering a request for all of it (a fill never forwards the
        // client's `Range`): stored under the key, it would answer later requests with a part.
        // A bypassed request did forward its `Range`; its 206 is judged as before, so that a
        // key asked for mostly in ranges can be found cacheable again.
        if resp.status == http::StatusCode::PARTIAL_CONTENT && !session.cache.bypassing() {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(
                UNASKED_PART,
            )));
        }
        let headers = &session.req_header().headers;
        let authorization = headers.contains_key(header::AUTHORIZATION);
        let credentials = authorization
            || (headers.contains_key(header::COOKIE) && self.parts.storage.holds(&ctx.key));
        // A purge landing between the check above and the fill's registration in the
        // storage would find nothing to cancel: dated from the fetch's start, the copy is
        // older than that purge, which removes it at its first lookup. A peer's copy is dated
        // from when the peer admitted it, so that an edge filling from this one judges it by
        // every purge since, not only those since this fetch. Not a variant: pingora-cache
        // serves no variant created before its primary's copy, so a variant keeps its fetch's
        // time (and a copy handed on twice is judged from there).
        let created = match peer_at {
            Some(at) if !resp.headers.contains_key(header::VARY) => at,
            _ => fetched,
        };
        let age = ctx.upstream_age.unwrap_or_else(|| upstream_age(resp));
        let merged = ctx
            .not_modified
            .as_ref()
            .and_then(|nm| response_fields::merge_not_modified(resp, nm));
        let resp = merged.as_ref().unwrap_or(resp);
        Ok(self.cacheability(resp, authorization, credentials, fetched, created, age))
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut Self::CTX,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        let mut names: Vec<String> = meta
            .headers()
            .get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        // Origins commonly redirect plain-HTTP requests to https without `Vary:
        // X-Forwarded-Proto`; such a redirect served to an https client would send it round
        // in a loop. A redirect varies by the scheme the origin was told, whatever it says.
        if meta.response_header().status.is_redirection() {
            names.push(FORWARDED_PROTO.to_string());
        }
        if names.is_empty() {
            return None;
        }
        names.sort();
        names.dedup();
        let mut key = VarianceBuilder::new();
        for name in &names {
            // Every field line counts (RFC 9111 §4.1): HTTP/2 clients send each cookie on a
            // line of its own, and the first line alone would let users share a variant.
            let mut lines = req.headers.get_all(name.as_str()).iter();
            match (lines.next(), lines.next()) {
                (None, _) => key.add_value(name, &[]),
                (Some(only), None) => key.add_value(name, only.as_bytes()),
                (Some(first), Some(second)) => {
                    let all: Vec<&[u8]> = [first, second]
                        .into_iter()
                        .chain(lines)
                        .map(|v| v.as_bytes())
                        .collect();
                    key.add_owned_value(name, all.join(&b'\n'));
                }
            }
        }
        key.finalize()
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if ctx.demand_peer.is_none() {
            ctx.upstream_started = Some(Instant::now());
        }
        ctx.fetch_started
            .get_or_insert_with(|| (Instant::now(), SystemTime::now()));
        // Routing tags are between broker and edge; the origin never sees them.
        upstream_request.remove_header(ROUTE_HEADER);
        upstream_request.remove_header(PEER_HINT_HEADER);
        upstream_request.remove_header(CLIENT_REGION_HEADER);
        upstream_request.remove_header(FILL_HEADER);
        upstream_request.remove_header(PEER_FETCH_HEADER);
        upstream_request.remove_header(REFRESH_HEADER);
        // With an entity tag to match, the date is not asked too (RFC 9110 §13.1.3 has the
        // origin ignore it then): an origin that judges by date alone would answer a copy
        // changed within the same second 304 under its new tag, and the stored body would be
        // kept under a tag it does not carry (RFC 9111 §4.3.4). Without the date it sends the
        // new body.
        if upstream_request.headers.contains_key(header::IF_NONE_MATCH) {
            upstream_request.remove_header(&header::IF_MODIFIED_SINCE);
        }
        // A request `accept_encoding::normalize` left without `Accept-Encoding` is served
        // the stored copy as is, and clients that refused every coding share that copy: an
        // origin that compresses when the field is absent must not fill it compressed.
        if !upstream_request
            .headers
            .contains_key(header::ACCEPT_ENCODING)
        {
            upstream_request.insert_header(header::ACCEPT_ENCODING, "identity")?;
        }
        if let Some(p) = &ctx.demand_peer {
            upstream_request.insert_header(PEER_VIA_HEADER, format_peer_via(p))?;
        } else if !ctx.peer_fill {
            upstream_request.remove_header(PEER_VIA_HEADER);
        }
        // The origin gets its own name (or, with `forward_host`, the client's without the
        // port the cache key ignores); a peer edge behind the bridge needs the site's Host.
        if let (None, Some(origin)) = (self.bridge_for(ctx), &ctx.origin) {
            address_origin(upstream_request, origin.host_header.clone())?;
        }
        let via = format!("1.1 {VIA_NAME}{}", self.node_id);
        upstream_request.append_header(header::VIA, via)?;
        strip_unvouched_forwarding(upstream_request);
        if let Some(ip) = client_ip(session) {
            forwarded_for(upstream_request, ip)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // Before any cache decision: the site asked for its origin's cookies to be dropped, so
        // its responses are cached as if they set none (see `cacheability`).
        if ctx.origin.as_ref().is_some_and(|o| o.strip_set_cookie) {
            upstream_response.remove_header(&header::SET_COOKIE);
        }
        response_fields::strip_hop_by_hop(upstream_response);
        let not_modified = upstream_response.status == http::StatusCode::NOT_MODIFIED;
        ctx.upstream_age = Some(upstream_age(upstream_response));
        ctx.not_modified = not_modified.then(|| Box::new(upstream_response.clone()));
        ctx.withheld = response_fields::withheld(upstream_response);
        self.invalidate_after_unsafe(session.req_header(), upstream_response, ctx);
        // A body of unknown length that outgrows the object limit: pingora-cache would cut
        // the response off mid-body, so its limit is lifted for this fill and the storage
        // enforces the real one by passing the rest through uncached (see `storage`). Set
        // for every response, so an upstream retried after this one (a peer, then the origin)
        // is judged by its own. Bypassed requests keep pingora's limit: it decides whether
        // the key may be cached again from the size this response turns out to have.
        if session.cache.enabled() {
            let length = upstream_response
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<usize>().ok());
            session.cache.set_max_file_size_bytes(
                length.map_or(usize::MAX, |_| self.policy.max_object_bytes),
            );
            // Too large to store, as the length says: turned away here rather than by
            // pingora, which would also drop the client's Range (it removed the Range to fill
            // the cache) and send the whole object; the proxy still cuts the range out.
            if upstream_response.status == http::StatusCode::OK
                && length.is_some_and(|n| n > self.policy.max_object_bytes)
            {
                session
                    .cache
                    .response_became_uncacheable(NoCacheReason::ResponseTooLarge);
                session.cache.disable(NoCacheReason::ResponseTooLarge);
            }
        }
        if let Some(p) = &ctx.demand_peer {
            let fetched = ctx.fetched_at();
            // Only a whole, variant-free copy stands in for the origin's answer: a Vary'd
            // object would be stored under this request's variant while the peer picked its own.
            // Nor a copy older than a purge this edge applied (the peer may not have applied
            // it yet): this edge acknowledged that purge, and must not serve what it removed.
            let usable = matches!(upstream_response.status.as_u16(), 200 | 203)
                && !upstream_response.headers.contains_key(header::VARY)
                && peer_admitted(upstream_response, fetched).is_some_and(|a| {
                    !self.parts.storage.purged_since_admitted(
                        &ctx.key,
                        a,
                        &upstream_response.headers,
                    )
                });
            // A usable copy is counted when its body has arrived (`logging`); the bridge says
            // 404 when the peer holds no copy, anything else when it could not be asked or
            // failed.
            if !usable {
                let outcome = match upstream_response.status.as_u16() {
                    200..=299 | 404 => "miss",
                    _ => "error",
                };
                self.metrics
                    .demand_peer_fills
                    .with_label_values(&[outcome])
                    .inc();
                return Err(Error::explain(
                    ErrorType::Custom(PEER_MISS),
                    format!("peer {} holds no usable copy", p.id),
                ));
            }
            ctx.peer_served = true;
            return Ok(());
        }
        if let Some(t) = ctx.upstream_started {
            if !ctx.upstream_responded {
                ctx.upstream_responded = true;
                // A peer fill's answer came over the bridge, not from the origin.
                if !ctx.peer_fill {
                    self.metrics
                        .origin_latency
                        .observe(t.elapsed().as_secs_f64());
                    self.metrics.origin_fetches.with_label_values(&["ok"]).inc();
                }
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let phase = session.cache.phase();
        let status = phase_status(phase);
        ctx.status = if ctx.shadow_fill {
            CacheStatus::ShadowFill
        } else if ctx.only_if_cached {
            CacheStatus::PeerFetch
        } else {
            status
        };
        let from_cache = matches!(
            phase,
            CachePhase::Hit
                | CachePhase::Stale
                | CachePhase::StaleUpdating
                | CachePhase::Revalidated
        );
        let client = !ctx.shadow_fill && !ctx.only_if_cached;
        let shadow_hits = (from_cache && client)
            .then(|| self.hooks.table.hit(&ctx.key, Instant::now()))
            .flatten();
        if client && !from_cache {
            let stored = matches!(phase, CachePhase::Miss | CachePhase::Expired);
            self.hooks.table.touch(&ctx.key, stored);
        }
        if let Some(n) = shadow_hits {
            self.metrics.shadow_hits.inc();
            if n == 1 {
                self.metrics.shadow_first_hits.inc();
            }
            resp.insert_header("x-shadowcdn-shadow", "hit")?;
        }
        // Filled from a peer: a client's miss the peer answered, or a shadow fill the bridge
        // carried (one that met a stale copy here went to the origin instead).
        if ctx.peer_served || (ctx.peer_fill && ctx.upstream_responded) {
            resp.insert_header(FILLED_FROM_HEADER, "peer")?;
        }
        // Between edges only: a peer's admission time (see `response_cache_filter`) is not
        // passed on, and this edge states its own when another edge fetches from it.
        resp.remove_header(PEER_ADMITTED_HEADER);
        // A peer keeps the tags with its copy, so a tag purge reaches it there too; a shadow
        // fill reads them for its mark, so a tag purge ends that too.
        if client {
            tags::strip(resp);
        }
        if ctx.only_if_cached && from_cache {
            let created = session.cache.cache_meta().created();
            let ms = created
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            resp.insert_header(PEER_ADMITTED_HEADER, ms)?;
        }
        if client {
            // A miss and a revalidation are served from the stored header, which holds
            // neither the upstream `Age` (pingora writes a hit's own) nor the fields kept out
            // of the shared copy.
            response_fields::restore(resp, &ctx.withheld);
            if let Some(age) = ctx.upstream_age.filter(|a| !a.is_zero()) {
                if !resp.headers.contains_key(header::AGE) {
                    let waited = ctx
                        .fetch_started
                        .map_or(Duration::ZERO, |(t, _)| t.elapsed());
                    resp.insert_header(header::AGE, age.saturating_add(waited).as_secs())?;
                }
            }
        }
        let ae = ctx.client_accept_encoding.as_ref();
        compression::response_filter(ctx.compression, ae, session, resp)?;
        resp.insert_header("x-cache", x_cache_value(status))?;
        resp.insert_header(
            "cache-status",
            self.cache_status_values[status as usize].clone(),
        )?;
        Ok(())
    }

    fn should_serve_stale(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
        error: Option<&Error>,
    ) -> bool {
        // Another edge asking for this edge's copy gets a fresh one or none: a stale copy it
        // would store (or serve) as new. Its refusal to go to the origin is no origin failure.
        // Nor is the copy an answer to a refresh, which exists to replace it.
        if ctx.only_if_cached || ctx.refresh {
            return false;
        }
        // Within the windows the response allowed (RFC 5861): serve stale while revalidating,
        // and on origin failures (connection errors and 5xx alike).
        error.is_none_or(|e| {
            e.esource() == &ErrorSource::Upstream
                || matches!(e.etype(), ErrorType::HTTPStatus(s) if *s >= 500)
        })
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &Self::CTX,
        error: &Error,
        _context: pingora_proxy::ProxyWarnLogContext,
    ) -> bool {
        // A hinted peer without the object is routine: the origin answers instead.
        matches!(error.etype(), ErrorType::Custom(PEER_MISS))
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Self::CTX, error: &Error) -> bool {
        // A peer fetch of an object this edge does not hold is an answer, not a failure; so is
        // the 504 a client's `only-if-cached` asks for (RFC 9111 §5.2.1.7).
        (ctx.only_if_cached || ctx.client_only_if_cached)
            && matches!(error.etype(), ErrorType::HTTPStatus(504))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if ctx.demand_peer.take().is_some() {
            self.metrics
                .demand_peer_fills
                .with_label_values(&["error"])
                .inc();
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let asked_peer = ctx.demand_peer.take().is_some();
        if ctx.peer_served || ctx.upstream_responded {
            // A response header was accepted, so pingora-cache may hold a miss handler for it:
            // a retry would open a second one (a panic). A body that breaks after its header
            // fails the request.
            e.set_retry(false);
        } else if asked_peer {
            // The peer's answer was refused or never came, so nothing was cached or sent:
            // the origin answers instead.
            if !matches!(e.etype(), ErrorType::Custom(PEER_MISS)) {
                self.metrics
                    .demand_peer_fills
                    .with_label_values(&["error"])
                    .inc();
            }
            e.set_retry(true);
        } else if !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy
    where
        Self::CTX: Send + Sync,
    {
        let (code, kind) = error_status(e);
        // A peer fetch for a key this edge does not hold ends here too; it is no failure.
        ctx.status = match self.suppress_error_log(session, ctx, e) {
            true if ctx.only_if_cached => CacheStatus::PeerFetch,
            true => CacheStatus::Miss,
            false => CacheStatus::Error,
        };
        if code > 0 {
            let msg = match kind {
                "origin_unreachable" => {
                    // The origin's address stays in the edge's log: a CDN hides where its
                    // origins are, or clients could go around it.
                    if let Some(o) = &ctx.origin {
                        tracing::warn!(origin = %o.addr, error = %e, "origin unreachable");
                    }
                    format!(
                        "the origin failed and no usable cached copy exists: {}",
                        e.etype().as_str()
                    )
                }
                _ => e.etype().as_str().to_string(),
            };
            // RFC 9211: how the cache went to the next hop, and why it failed.
            let fwd = match ctx.forwarded {
                Some(CacheStatus::Miss) => "miss",
                Some(CacheStatus::Expired | CacheStatus::Stale | CacheStatus::StaleUpdating) => {
                    "stale"
                }
                _ => "bypass",
            };
            let status = format!("shadowcdn-{}; fwd={fwd}; detail={kind}", self.node_id);
            let status = http::HeaderValue::from_str(&status).ok();
            if let Err(err) = respond_json_error_with(session, code, kind, &msg, status).await {
                tracing::debug!(error = %err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        if ctx.probe {
            return;
        }
        if ctx.peer_served {
            // The peer's copy arrived whole, or its body broke on the way. An answer cut
            // short here (the client hung up, the cache failed) says nothing of the peer and
            // is not counted.
            let outcome = match e.map(|e| e.esource()) {
                None => Some("hit"),
                Some(ErrorSource::Upstream) => Some("error"),
                Some(_) => None,
            };
            if let Some(outcome) = outcome {
                self.metrics
                    .demand_peer_fills
                    .with_label_values(&[outcome])
                    .inc();
            }
        }
        let m = self.metrics.status(ctx.status);
        m.requests.inc();
        m.bytes_served.inc_by(session.body_bytes_sent() as u64);
        m.seconds.observe(ctx.started.elapsed().as_secs_f64());
        if ctx.upstream_started.is_some() && !ctx.upstream_responded && !ctx.peer_fill {
            self.metrics
                .origin_fetches
                .with_label_values(&["error"])
                .inc();
        }
        if let Some((algorithm, into, out, _)) = compression::outcome(session) {
            let m = &self.metrics;
            m.compressed.with_label_values(&[algorithm]).inc();
            let bytes = |stage| m.compression_bytes.with_label_values(&[algorithm, stage]);
            bytes("in").inc_by(into as u64);
            bytes("out").inc_by(out as u64);
        }
        if let Some(d) = session.cache.lock_duration() {
            self.metrics.lock_waits.inc();
            self.metrics.lock_wait_seconds.observe(d.as_secs_f64());
        }
        if let Some(log) = &self.access_log {
            log.log(&AccessLine {
                request: RequestFields::of(session, ctx.started),
                node: &self.node_id,
                cache: ctx.status.label(),
                peer: ctx.peer_served,
                background: session.subrequest_ctx.is_some(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_answered_by_whose_they_are() {
        let status = |e: Box<Error>| error_status(&e);
        assert_eq!(
            status(Error::new_down(ErrorType::ReadTimedout)),
            (408, "request_timeout")
        );
        assert_eq!(
            status(Error::new_down(ErrorType::InvalidHTTPHeader)),
            (400, "bad_request")
        );
        assert_eq!(
            status(Error::new_down(ErrorType::ConnectionClosed)),
            (0, "client_gone")
        );
        assert_eq!(
            status(Error::new_up(ErrorType::ReadTimedout)),
            (502, "origin_unreachable")
        );
    }

    /// A peer's copy is judged by when the peer admitted it (or the fetch started, if later):
    /// one that does not say, or says a time past this edge's clock by more than the clocks
    /// may disagree, cannot be judged against the purges applied here.
    #[test]
    fn a_peer_copy_needs_a_credible_admission_time() {
        let now = SystemTime::now();
        let with = |v: Option<String>| {
            let mut r = ResponseHeader::build(200, None).unwrap();
            if let Some(v) = v {
                r.insert_header(PEER_ADMITTED_HEADER, v).unwrap();
            }
            peer_admitted(&r, now)
        };
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        };
        let hour_ago = now - Duration::from_secs(3600);
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(ms(hour_ago) as u64);
        assert_eq!(with(Some(ms(hour_ago).to_string())), Some(at));
        let slightly_ahead = now + PEER_CLOCK_ALLOWANCE / 2;
        assert_eq!(with(Some(ms(slightly_ahead).to_string())), Some(now));
        assert!(with(None).is_none());
        assert!(with(Some("soon".into())).is_none());
        let ahead = now + PEER_CLOCK_ALLOWANCE * 2;
        assert!(with(Some(ms(ahead).to_string())).is_none());
    }

    #[test]
    fn the_origin_gets_an_origin_form_request_line() {
        for (target, line) in [
            ("http://a.test/x?y=1", "/x?y=1"),
            ("http://a.test?y=1", "/?y=1"),
            ("/x?y=1", "/x?y=1"),
        ] {
            let mut req = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
            address_origin(&mut req, "o.test".into()).unwrap();
            assert_eq!(req.raw_path(), line.as_bytes(), "{target}");
            assert_eq!(req.headers["host"], "o.test");
        }
    }

    #[test]
    fn only_this_edges_own_name_in_via_is_a_loop() {
        let with_via = |v: &str| {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            req.append_header("via", v).unwrap();
            req
        };
        assert!(passed_through(&with_via("1.1 shadowcdn-eu-a"), "eu-a"));
        assert!(passed_through(
            &with_via("1.1 shadowcdn-broker, HTTP/1.1 shadowcdn-eu-a (pingora)"),
            "eu-a"
        ));
        assert!(!passed_through(&with_via("1.1 shadowcdn-eu-ab"), "eu-a"));
        assert!(!passed_through(&with_via("1.1 shadowcdn-broker"), "eu-a"));
        assert!(!passed_through(&with_via("1.1 eu-a"), "eu-a"));
        let none = RequestHeader::build("GET", b"/", None).unwrap();
        assert!(!passed_through(&none, "eu-a"));
    }

    #[test]
    fn trusted_proxies_match_ipv4_peers_of_a_dual_stack_listener() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        for (ip, trusted) in [
            ("10.1.2.3", true),
            ("::ffff:10.1.2.3", true),
            ("fd00::1", true),
            ("::ffff:192.0.2.1", false),
            ("2001:db8::1", false),
        ] {
            assert_eq!(within(&nets, ip.parse().unwrap()), trusted, "{ip}");
        }
    }

    #[test]
    fn a_redirect_that_keys_as_its_own_request_is_seen() {
        let table = OriginTable::build(&[crate::config::OriginEntry {
            host: "h.test".into(),
            path_prefix: None,
            upstream: "http://127.0.0.1:9".into(),
            forward_host: false,
            strip_set_cookie: false,
            cache_key_ignore_query: vec!["lang".into()],
            registered_at_ms: None,
        }])
        .unwrap();
        let check = |path: &str, proto: Option<&str>, location: &str| {
            let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
            if let Some(p) = proto {
                req.insert_header(FORWARDED_PROTO, p).unwrap();
            }
            let mut resp = ResponseHeader::build(301, None).unwrap();
            resp.insert_header(header::LOCATION, location).unwrap();
            let (key, _) = request_key(&req, "h.test", table.select("h.test", "/").unwrap());
            redirects_to_its_own_key(&table, &req, &resp, &key)
        };
        for (path, proto, location) in [
            ("/", None, "/?lang=en"),
            ("/", None, "?lang=en"),
            ("/a/b", Some("https"), "https://H.test:443/a/b?lang=de"),
            ("/a/b", None, "b?lang=de"),
        ] {
            assert!(check(path, proto, location), "{path} -> {location}");
        }
        for (path, proto, location) in [
            ("/", None, "/?id=1"),
            ("/", None, "https://h.test/"),
            ("/", Some("https"), "http://h.test/?lang=en"),
            ("/", None, "http://other.test/"),
            ("/a", None, "/b"),
            ("/a", None, "mailto:x@h.test"),
        ] {
            assert!(!check(path, proto, location), "{path} -> {location}");
        }
    }

    #[test]
    fn a_bare_directive_is_found_on_any_line() {
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.append_header("cache-control", "private, max-age=60")
            .unwrap();
        r.append_header("cache-control", "private=\"x\"").unwrap();
        assert!(lists(&r, header::CACHE_CONTROL, "private"));
        assert!(!lists(&r, header::CACHE_CONTROL, "no-cache"));
        let cc = CacheControl::from_resp_headers(&r).unwrap();
        assert!(!cc.private(), "pingora keeps the later line's");
    }

    #[test]
    fn the_forwarded_chain_is_one_line_ending_with_the_client() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        forwarded_for(&mut req, [192, 0, 2, 1].into()).unwrap();
        assert_eq!(req.headers["x-forwarded-for"], "192.0.2.1");
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("x-forwarded-for", "203.0.113.9, 10.0.0.1")
            .unwrap();
        req.append_header("x-forwarded-for", " ").unwrap();
        req.append_header("x-forwarded-for", "10.0.0.2").unwrap();
        forwarded_for(&mut req, "2001:db8::1".parse().unwrap()).unwrap();
        let lines: Vec<_> = req.headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(lines, ["203.0.113.9, 10.0.0.1, 10.0.0.2, 2001:db8::1"]);
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        forwarded_for(&mut req, "::ffff:203.0.113.9".parse().unwrap()).unwrap();
        assert_eq!(req.headers["x-forwarded-for"], "203.0.113.9");
    }

    #[test]
    fn primary_key_normalizes_host() {
        assert_eq!(
            primary_key("Example.COM:8080", "/a?b=1"),
            "example.com/a?b=1"
        );
    }

    #[test]
    fn route_tags_parse_strictly() {
        assert_eq!(
            parse_route("region=eu; reason=failover"),
            Some(("eu", "failover"))
        );
        assert_eq!(parse_route("region=eu; reason=made-up"), None);
        assert_eq!(parse_route("reason=primary"), None);
    }

    #[test]
    fn age_of_a_response_from_another_cache() {
        let mut r = ResponseHeader::build(200, None).unwrap();
        assert_eq!(upstream_age(&r), Duration::ZERO);
        r.insert_header("age", "42").unwrap();
        assert_eq!(upstream_age(&r), Duration::from_secs(42));
        for bad in ["-3", "soon", "1.5", "", "+4"] {
            r.insert_header("age", bad).unwrap();
            assert_eq!(upstream_age(&r), Duration::ZERO, "{bad}");
        }
        for huge in ["18446744073709551615", "99999999999999999999999"] {
            r.insert_header("age", huge).unwrap();
            assert_eq!(upstream_age(&r), Duration::from_secs(1 << 31), "{huge}");
        }
    }

    #[test]
    fn heuristic_status_codes() {
        assert!(heuristically_cacheable(200));
        assert!(heuristically_cacheable(404));
        assert!(!heuristically_cacheable(500));
        assert!(!heuristically_cacheable(302));
    }
}
