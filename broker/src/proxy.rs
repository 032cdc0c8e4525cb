//! The broker's Pingora phases: resolve the client's region, plan the route, try the plan in
//! order (retrying idempotent requests on the next choice when an edge fails), tag requests
//! for the edges, and record every request for the monitor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use edge_node::drain::{InflightCounter, InflightGuard};
use edge_node::proxy::{
    client_ip, error_status, forwarded_for, no_host_error, primary_key, refused_method,
    request_host, respond_json_error, strip_unvouched_forwarding, CLIENT_REGION_HEADER,
    FORWARDED_PROTO, PROBE_PATH, ROUTE_HEADER, VIA_NAME,
};
use edge_node::sync::PEER_HINT_HEADER;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::metrics::BrokerMetrics;
use crate::monitor::{is_demand, now_secs, object_size, Record, Recorder, Start};
use crate::origin_addrs::OriginAddrs;
use crate::registry::Registry;
use crate::routing::{Choice, Fleet, Health, Holders, Reason, RegionResolver};
use edge_node::access_log::{AccessLog, RequestFields};
use serde::Serialize;

/// The broker proxy.
pub struct BrokerProxy {
    fleet: Arc<Fleet>,
    health: Arc<Health>,
    regions: RegionResolver,
    registry: Arc<Registry>,
    recorder: Recorder,
    segment_header: Option<String>,
    metrics: BrokerMetrics,
    inflight: InflightCounter,
    /// Recent holders of keys, for peer hints; `None` when peer fill is off.
    holders: Option<Arc<Holders>>,
    /// The origin fallback's resolved upstreams (private addresses refused unless allowed).
    origin_addrs: OriginAddrs,
    /// How long a read from an edge may stall (`edge_read_timeout_secs`).
    edge_read_timeout: Duration,
    /// Where each request's access line goes.
    access_log: Option<AccessLog>,
}

/// One client request's access-log line.
#[derive(Serialize)]
struct AccessLine<'a> {
    #[serde(flatten)]
    request: RequestFields<'a>,
    /// The client's region.
    region: &'a str,
    /// The edge that answered (`origin` for the direct fallback, `none` before routing).
    edge: &'a str,
    /// Why that route: `primary`, or the failover that led to it.
    route: &'a str,
    /// What the edge's cache did (its `X-Cache`), `origin` or `none`.
    cache: &'static str,
    segment: Option<&'a str>,
    /// The client a trusted proxy (the peer, `client`) forwarded the request for, by its
    /// `X-Forwarded-For`: who routing and co-access took the client to be.
    #[serde(skip_serializing_if = "Option::is_none")]
    forwarded_for: Option<std::net::IpAddr>,
}

/// Per-request state.
pub struct BrokerCtx {
    _inflight: InflightGuard,
    started: Instant,
    region: usize,
    /// Cache key the route is planned for; empty until the request is routable.
    key: String,
    /// Hash of `key`, for the holder map.
    key_hash: u64,
    /// The holder map's count of purges as the request began ([`Holders::epoch`]).
    holders_epoch: u32,
    /// Some attempt carried a peer hint (counted once per request, at its end).
    peer_hinted: bool,
    /// Edges already tried for this request.
    tried: Vec<usize>,
    origin_tried: bool,
    /// Origin addresses connected to so far, and how many the origin's name resolved to: a
    /// connect that fails moves to the next address ([`MAX_ORIGIN_ADDRS`] at most).
    origin_addrs_tried: Vec<SocketAddr>,
    origin_addr_count: usize,
    /// The origin address connected to last, and the lookup it came from.
    origin_addr: Option<(SocketAddr, std::sync::Arc<ResolvedUpstream>)>,
    /// Retries on the same route after a pooled connection failed ([`MAX_POOLED_RETRIES`]).
    pooled_retries: u8,
    /// Edges that dropped this request before answering: it goes to one other route, not
    /// to every edge in turn.
    drops: Drops,
    chosen: Option<Choice>,
    resource: String,
    segment: Option<String>,
    cache_status: &'static str,
    /// Hash of the client address.
    client: u64,
    /// The client's address: the peer's, or the one a trusted proxy forwarded for.
    client_addr: Option<std::net::IpAddr>,
    /// When the request arrived, wall clock ms: its start and its record carry the same.
    started_ms: u64,
    /// Its start went to the monitor ([`Recorder::announce`]).
    announced: bool,
}

/// Longest request target (path and query, in bytes) the broker routes; longer ones get 414.
/// Request records, series and co-access pairs keep keys and their caps count entries, so a
/// key's size needs a bound of its own (8 KiB, as nginx's default request-line buffer).
pub const MAX_TARGET_BYTES: usize = 8192;

/// Longest user segment recorded; a longer header value is recorded as no segment.
const MAX_SEGMENT_BYTES: usize = 64;

impl BrokerProxy {
    /// Assemble the proxy.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        fleet: Arc<Fleet>,
        health: Arc<Health>,
        regions: RegionResolver,
        registry: Arc<Registry>,
        recorder: Recorder,
        segment_header: Option<String>,
        metrics: BrokerMetrics,
        inflight: InflightCounter,
        holders: Option<Arc<Holders>>,
    ) -> Self {
        BrokerProxy {
            fleet,
            health,
            regions,
            registry,
            recorder,
            segment_header: segment_header.map(|h| h.to_ascii_lowercase()),
            metrics,
            inflight,
            holders,
            origin_addrs: OriginAddrs::new(false, ORIGIN_LOOKUP_TIMEOUT),
            edge_read_timeout: Duration::from_secs(60),
            access_log: None,
        }
    }

    /// Write an access line for every client request to `log`.
    pub fn with_access_log(mut self, log: AccessLog) -> Self {
        self.access_log = Some(log);
        self
    }

    /// How long a read from an edge may stall before the request fails with 504.
    pub fn with_edge_read_timeout(mut self, timeout: Duration) -> Self {
        self.edge_read_timeout = timeout;
        self
    }

    /// Let the origin fallback connect to providers' origins on loopback and private
    /// addresses (`[admin] allow_private_upstreams`); otherwise an origin name that resolves
    /// there is refused, as the edges refuse it.
    pub fn allowing_private_upstreams(mut self, allow: bool) -> Self {
        self.origin_addrs = OriginAddrs::new(allow, ORIGIN_LOOKUP_TIMEOUT);
        self
    }

    /// A passive failure took `edge` out of routing: the gauge says so now, not at the next
    /// probe round.
    fn edge_marked_down(&self, edge: usize) {
        self.metrics
            .edge_up
            .with_label_values(&[&self.fleet.edges[edge].id])
            .set(0);
    }

    /// The direct-to-origin fallback asks the origin as an edge would: under the upstream's
    /// own `host[:port]`, or the site's host without port with `forward_host`.
    fn address_origin(
        &self,
        session: &Session,
        upstream_request: &mut RequestHeader,
    ) -> Result<()> {
        let Some(host) = host_of(session.req_header()) else {
            return Ok(());
        };
        let Some(origin) = self.registry.origin(&host) else {
            return Ok(());
        };
        let uri: http::Uri = origin.upstream.parse().map_err(|_| {
            Error::explain(ErrorType::InternalError, "registered upstream is not a URL")
        })?;
        let header = edge_node::origin::host_header(&uri, &host, origin.forward_host);
        edge_node::proxy::address_origin(upstream_request, header)
    }

    /// The id of another edge that recently served this request's key, for a GET routed to
    /// an edge: that edge's miss asks the peer before the origin.
    fn peer_hint(&self, req: &RequestHeader, ctx: &BrokerCtx) -> Option<&str> {
        let holders = self.holders.as_ref()?;
        let serving = ctx.chosen?.edge?;
        if req.method != http::Method::GET {
            return None;
        }
        let host = crate::routing::host_of(&ctx.key);
        let (fleet, health) = (&self.fleet, &self.health);
        let peer = holders.hint(ctx.key_hash, host, serving, fleet, health, now_secs())?;
        Some(self.fleet.edges[peer].id.as_str())
    }

    /// Whether the request reached a trusted proxy (a TLS-terminating load balancer) over
    /// HTTPS, as that proxy says in the last `X-Forwarded-Proto` line: the origin must hear
    /// `https` for such clients, or a site that redirects http to https would loop and one that
    /// builds absolute links would cache `http://` links. Anyone else's claim is ignored.
    fn https_behind_proxy(&self, session: &Session) -> bool {
        self.regions.is_trusted_proxy(client_ip(session))
            && session
                .req_header()
                .headers
                .get_all(FORWARDED_PROTO)
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
    }
}

/// Whether an edge's answer with this cache status came from, or went into, its cache: it
/// holds the object now.
fn stored_on_edge(cache_status: &str) -> bool {
    matches!(
        cache_status,
        "hit" | "miss" | "stale" | "stale-updating" | "expired" | "revalidated"
    )
}

fn host_of(req: &RequestHeader) -> Option<String> {
    request_host(req).map(|h| edge_node::origin::normalize_host(h).into_owned())
}

/// Longest a connection to an edge waits in the pool: under the 60 s after which an edge
/// (pingora) closes an idle client connection.
const EDGE_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// Longest a connection to an origin (the direct fallback) waits in the pool: under the 5 s
/// after which many servers (Apache, Node) close an idle one.
const ORIGIN_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Longest the direct-to-origin fallback waits for an origin's name to resolve.
const ORIGIN_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// An origin URL's host, scheme and the addresses its name resolves to.
#[derive(Debug)]
pub(crate) struct ResolvedUpstream {
    /// The URL's host, without IPv6 brackets.
    pub host: String,
    /// Whether it is `https`.
    pub tls: bool,
    /// Never empty, and never private unless private addresses were allowed.
    pub addrs: Vec<SocketAddr>,
    /// Addresses a connect failed to since this lookup: tried last by later requests, so a
    /// dead address costs one request a connect timeout, not every request while the
    /// lookup is kept.
    pub failed: parking_lot::Mutex<Vec<SocketAddr>>,
}

impl ResolvedUpstream {
    /// The address a request's next origin connection goes to, after the ones it `tried`:
    /// the ones a connect failed to last, IPv4 ones first otherwise (a host without an IPv6
    /// route would fail on an IPv6-first answer), then the resolver's order; the first again
    /// once all were tried.
    pub fn next_addr(&self, tried: &[SocketAddr]) -> SocketAddr {
        let failed = self.failed.lock();
        let rank = |a: &SocketAddr| (failed.contains(a), !a.is_ipv4());
        let mut ordered = self.addrs.clone();
        ordered.sort_by_key(rank);
        ordered
            .iter()
            .find(|a| !tried.contains(a))
            .copied()
            .unwrap_or(ordered[0])
    }

    /// A connect to `addr` failed.
    pub fn connect_failed(&self, addr: SocketAddr) {
        let mut failed = self.failed.lock();
        if !failed.contains(&addr) && self.addrs.contains(&addr) {
            failed.push(addr);
        }
    }
}

/// Why an origin URL gives no usable address.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamLookupError {
    /// Not `http(s)://host[:port]`.
    #[error("registered upstream is not a URL with a host")]
    NotAUrl,
    /// The lookup outlasted its bound.
    #[error("{host} did not resolve within {secs} s")]
    TimedOut { host: String, secs: u64 },
    /// The lookup failed.
    #[error("{host} does not resolve ({source})")]
    Failed {
        host: String,
        source: std::io::Error,
    },
    /// The lookup answered no address.
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    /// One of its addresses is loopback or private.
    #[error("{host} resolves to {addr}, a loopback or private address")]
    Private {
        host: String,
        addr: std::net::IpAddr,
    },
}

/// Resolve an origin URL (`http(s)://host[:port]`) within `timeout` (a provider's slow
/// resolver must not hold the caller; the lookup itself goes on in the blocking pool, which
/// is why the request path shares lookups through [`OriginAddrs`]), refusing
/// loopback and private addresses unless `allow_private` (a provider's name could otherwise
/// point the broker or the edges at the operator's network, its own admin API included). One
/// private address among public ones is as good as a private name.
pub(crate) async fn resolve_upstream(
    upstream: &str,
    allow_private: bool,
    timeout: Duration,
) -> std::result::Result<ResolvedUpstream, UpstreamLookupError> {
    let uri: http::Uri = upstream.parse().map_err(|_| UpstreamLookupError::NotAUrl)?;
    let tls = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .ok_or(UpstreamLookupError::NotAUrl)?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let lookup = tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port)))
        .await
        .map(|found| found.map(Iterator::collect::<Vec<SocketAddr>>));
    let addrs = match lookup {
        Err(_) => {
            let secs = timeout.as_secs();
            return Err(UpstreamLookupError::TimedOut { host, secs });
        }
        Ok(Err(source)) => return Err(UpstreamLookupError::Failed { host, source }),
        Ok(Ok(addrs)) => addrs,
    };
    if addrs.is_empty() {
        return Err(UpstreamLookupError::NoAddress { host });
    }
    if let Some(private) = addrs
        .iter()
        .find(|a| !allow_private && edge_node::origin::is_private_ip(a.ip()))
    {
        let addr = private.ip();
        return Err(UpstreamLookupError::Private { host, addr });
    }
    Ok(ResolvedUpstream {
        host,
        tls,
        addrs,
        failed: parking_lot::Mutex::new(Vec::new()),
    })
}

/// Most of an origin's addresses one request connects to before giving up.
pub const MAX_ORIGIN_ADDRS: usize = 3;

/// Resolve an origin URL to a peer ([`resolve_upstream`], through `addrs`): its `attempt`-th
/// address after the ones `tried` ([`ResolvedUpstream::next_addr`]) and the lookup it came
/// from.
async fn origin_peer(
    addrs: &OriginAddrs,
    upstream: &str,
    tried: &[SocketAddr],
) -> Result<(HttpPeer, SocketAddr, std::sync::Arc<ResolvedUpstream>)> {
    let resolved = addrs.resolve(upstream).await.map_err(|e| {
        let kind = match *e {
            UpstreamLookupError::NotAUrl => ErrorType::InternalError,
            UpstreamLookupError::TimedOut { .. } => ErrorType::ConnectTimedout,
            _ => ErrorType::ConnectError,
        };
        Error::explain(kind, format!("origin: {e}"))
    })?;
    let addr = resolved.next_addr(tried);
    let peer = HttpPeer::new(addr, resolved.tls, resolved.host.clone());
    Ok((peer, addr, resolved))
}

#[async_trait]
impl ProxyHttp for BrokerProxy {
    type CTX = BrokerCtx;

    fn new_ctx(&self) -> Self::CTX {
        BrokerCtx {
            _inflight: self.inflight.enter(),
            started: Instant::now(),
            region: 0,
            key: String::new(),
            key_hash: 0,
            holders_epoch: 0,
            peer_hinted: false,
            tried: Vec::new(),
            origin_tried: false,
            origin_addrs_tried: Vec::new(),
            origin_addr_count: 0,
            origin_addr: None,
            pooled_retries: 0,
            drops: Drops::default(),
            chosen: None,
            resource: String::new(),
            segment: None,
            cache_status: "none",
            client: 0,
            client_addr: None,
            started_ms: crate::clock::wall_ms(),
            announced: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        // Who and where the client is comes first, so a refused request's access line says so.
        let req = session.req_header();
        let peer = client_ip(session);
        let header_region = self
            .regions
            .header_name(peer)
            .and_then(|h| req.headers.get_all(h).iter().next_back())
            .and_then(|v| v.to_str().ok());
        let forwarded = req
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        let ip = self.regions.client_addr(peer, forwarded);
        ctx.client_addr = ip;
        ctx.region = self.regions.resolve(&self.fleet, header_region, ip);
        ctx.client = match ip {
            Some(std::net::IpAddr::V4(a)) => xxhash_rust::xxh3::xxh3_64(&a.octets()),
            Some(std::net::IpAddr::V6(a)) => xxhash_rust::xxh3::xxh3_64(&a.octets()),
            None => 0,
        };
        ctx.segment = self
            .segment_header
            .as_deref()
            .and_then(|h| req.headers.get(h))
            .and_then(|v| v.to_str().ok())
            .filter(|s| s.len() <= MAX_SEGMENT_BYTES)
            .map(str::to_owned);
        let target = req.uri.path_and_query().map_or(0, |p| p.as_str().len());
        if target > MAX_TARGET_BYTES {
            let msg = format!("request target of {target} bytes; at most {MAX_TARGET_BYTES}");
            respond_json_error(session, 414, "uri_too_long", &msg).await?;
            return Ok(true);
        }
        if let Some(msg) = refused_method(req) {
            respond_json_error(session, 405, "method_not_allowed", msg).await?;
            return Ok(true);
        }
        // The edges' health probe is theirs: a client asking it through the broker would get
        // the edge's own 204 instead of the site's path, counted as demand.
        if req.uri.path() == PROBE_PATH {
            let msg = "this path is the CDN's health probe";
            respond_json_error(session, 404, "not_found", msg).await?;
            return Ok(true);
        }
        let Some(host) = host_of(req) else {
            let (code, msg) = no_host_error(req);
            respond_json_error(session, 400, code, msg).await?;
            return Ok(true);
        };
        if !self.registry.has_origin(&host) {
            let msg = format!("no provider has registered host {host:?}");
            respond_json_error(session, 404, "unknown_host", &msg).await?;
            return Ok(true);
        }
        // Edges name themselves in `Via` on the way to an origin (and so does the broker): a
        // request that already carries that name comes from an origin that points back at the
        // CDN, and would circle broker → edge → "origin" until a timeout (RFC 8586's loop).
        if let Some(via) = session
            .req_header()
            .headers
            .get_all(http::header::VIA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.contains(VIA_NAME))
        {
            let msg = format!(
                "the request already passed through this CDN (Via: {via}): the origin of {host:?} points back at it"
            );
            respond_json_error(session, 508, "loop_detected", &msg).await?;
            return Ok(true);
        }
        let req = session.req_header();
        let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
        ctx.key = self.registry.cache_key(&host, pq);
        ctx.key_hash = Holders::key_of(&ctx.key);
        ctx.holders_epoch = self.holders.as_ref().map_or(0, |h| h.epoch());
        ctx.resource = primary_key(&host, req.uri.path());
        // A read's followers are shadowed as it starts, while it is still being answered.
        if self.recorder.announcing()
            && (req.method == http::Method::GET || req.method == http::Method::HEAD)
        {
            ctx.announced = self.recorder.announce(Start {
                key: ctx.key.clone(),
                region: ctx.region as u16,
                client: ctx.client,
                ts: now_secs(),
                started_ms: ctx.started_ms,
            });
        }
        // Idempotent requests can be replayed on the next edge if one fails mid-request.
        if req.method.is_idempotent() {
            session.as_mut().enable_retry_buffering();
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        // Plan afresh on every attempt: a failure just marked an edge down, which can promote
        // the region's standby or move the key to the next edge.
        let choice = self
            .fleet
            .plan_after(&ctx.key, ctx.region, &self.health, &ctx.tried)
            .into_iter()
            .find_map(|c| match c.edge {
                // An edge whose name stopped resolving is skipped like a failed one.
                Some(e) => self.fleet.addresses.get(e).proxy.map(|a| (c, Some(a))),
                None => (!ctx.origin_tried).then_some((c, None)),
            })
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "every route failed"))?;
        let (choice, edge_addr) = choice;
        match choice.edge {
            Some(e) => ctx.tried.push(e),
            None => ctx.origin_tried = true,
        }
        ctx.chosen = Some(choice);
        let mut peer = match edge_addr {
            Some(a) => HttpPeer::new(a, false, String::new()),
            None => {
                let host = host_of(session.req_header()).unwrap_or_default();
                let origin = self.registry.origin(&host).ok_or_else(|| {
                    Error::explain(ErrorType::ConnectNoRoute, "host was unregistered")
                })?;
                let tried = ctx.origin_addrs_tried.as_slice();
                let (peer, addr, resolved) =
                    origin_peer(&self.origin_addrs, &origin.upstream, tried).await?;
                ctx.origin_addrs_tried.push(addr);
                ctx.origin_addr_count = resolved.addrs.len();
                ctx.origin_addr = Some((addr, resolved));
                peer
            }
        };
        peer.options.connection_timeout = Some(std::time::Duration::from_secs(1));
        peer.options.total_connection_timeout = Some(std::time::Duration::from_secs(2));
        peer.options.read_timeout = Some(self.edge_read_timeout);
        // A request body sent to an upstream that stopped reading (wedged workers, a slow
        // origin) would otherwise block without end: the response read, and its timeout,
        // wait behind the write.
        peer.options.write_timeout = Some(self.edge_read_timeout);
        // Dropped from the pool before the other end closes it: a request sent on a connection
        // being closed fails, and one that cannot be replayed (a POST) is lost. Origins often
        // close idle connections after 5 s (Apache, Node).
        peer.options.idle_timeout = Some(if edge_addr.is_some() {
            EDGE_IDLE_TIMEOUT
        } else {
            ORIGIN_IDLE_TIMEOUT
        });
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // This CDN's own request headers are the broker's and the edges' to set: a client's
        // (a peer hint, a shadow-fill or peer-fetch marker, a region) never reaches an edge or
        // the origin. Those the route needs are set below.
        let internal: Vec<http::HeaderName> = upstream_request
            .headers
            .keys()
            .filter(|n| n.as_str().starts_with("x-shadowcdn-"))
            .cloned()
            .collect();
        for name in internal {
            upstream_request.remove_header(&name);
        }
        // The origin learns who asked and how. The client's address ends any chain it brought
        // (an origin trusts only the last entries, which its own proxies added); the scheme is
        // the listener's, never the client's claim.
        strip_unvouched_forwarding(upstream_request);
        if let Some(ip) = client_ip(session) {
            forwarded_for(upstream_request, ip)?;
        }
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let proto = if tls || self.https_behind_proxy(session) {
            "https"
        } else {
            "http"
        };
        upstream_request.insert_header(FORWARDED_PROTO, proto)?;
        upstream_request.append_header(http::header::VIA, format!("1.1 {VIA_NAME}broker"))?;
        if let Some(peer) = self.peer_hint(session.req_header(), ctx) {
            upstream_request.insert_header(PEER_HINT_HEADER, peer)?;
            ctx.peer_hinted = true;
        }
        if let Some(c) = ctx.chosen {
            if c.edge.is_none() {
                // The origin gets what an edge would send it: none of this CDN's own headers
                // (a peer hint is for edges only).
                upstream_request.remove_header(PEER_HINT_HEADER);
                self.address_origin(session, upstream_request)?;
            } else {
                let tag = format!(
                    "region={}; reason={}",
                    self.fleet.regions[c.region],
                    c.reason.as_str()
                );
                upstream_request.insert_header(ROUTE_HEADER, tag)?;
                upstream_request
                    .insert_header(CLIENT_REGION_HEADER, &self.fleet.regions[ctx.region])?;
            }
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let gone = edge_is_gone(e.etype());
        if let Some(Choice {
            edge: Some(edge), ..
        }) = ctx.chosen
        {
            if gone && self.health.mark_down(edge) {
                self.edge_marked_down(edge);
                tracing::warn!(edge = %self.fleet.edges[edge].id, error = %e, "edge unreachable: marked down");
            }
            if gone && ctx.drops.refused(edge) {
                tracing::warn!(edge = %self.fleet.edges[edge].id,
                    "a second edge went away with this request: not sent on");
                e.set_retry(false);
                return e;
            }
        }
        if !ctx.origin_tried {
            self.metrics.retries.inc();
            e.set_retry(true);
        } else if ctx.chosen.is_some_and(|c| c.edge.is_none()) {
            if let Some((addr, resolved)) = &ctx.origin_addr {
                resolved.connect_failed(*addr);
            }
            if ctx.origin_addrs_tried.len() < ctx.origin_addr_count.min(MAX_ORIGIN_ADDRS) {
                // Nothing was sent: the origin's next address gets the request.
                ctx.origin_tried = false;
                self.metrics.retries.inc();
                e.set_retry(true);
            }
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
        // Pingora reports the client's side here too (a client that hangs up before the
        // response): that is no evidence against the edge, and retrying it on the next edge
        // would only fail there as well.
        let from_client = *e.esource() == ErrorSource::Downstream;
        // A stall is a slow origin behind the edge far more often than a dead edge (the
        // probes catch those): another edge would wait on the same origin.
        let stalled = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        // Only a connection that failed is a reason to send the request again: an answer
        // the edge sent that this proxy cannot take (an origin's header block past pingora's
        // limits, say) would come back the same from every edge, and must not mark them
        // down one after another.
        let replayable = !from_client
            && !stalled
            && connection_failed(e.etype())
            && session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        let edge = ctx.chosen.and_then(|c| c.edge);
        let pooled = client_reused && ctx.chosen.is_some();
        let upstream = *e.esource() == ErrorSource::Upstream;
        let second_edge = match edge {
            Some(edge) if upstream => ctx.drops.dropped(edge, pooled),
            _ => false,
        };
        let replayable = replayable && !second_edge;
        let dropped = edge.is_some() && upstream && !pooled;
        match retry_after_error(
            replayable,
            pooled && ctx.pooled_retries < MAX_POOLED_RETRIES,
            ctx.origin_tried,
        ) {
            Retry::SameRoute => {
                // A pooled connection the edge (or, with every edge down, the origin) had
                // already closed (keep-alive race): no evidence against it, and it gets the
                // request again.
                match edge {
                    Some(_) => ctx.tried.retain(|t| Some(*t) != edge),
                    None => ctx.origin_tried = false,
                }
                ctx.pooled_retries += 1;
                self.metrics.retries.inc();
                e.set_retry(true);
            }
            Retry::NextRoute => {
                // The edge is not marked down for it: a request that makes edges drop it
                // would otherwise take them out of routing one retry after another. An edge
                // that died refuses the next connect (marked down there) and fails its probes.
                if let Some(edge) = edge.filter(|_| dropped) {
                    tracing::warn!(edge = %self.fleet.edges[edge].id, error = %e,
                        "edge dropped a request before answering: trying the next route");
                }
                self.metrics.retries.inc();
                e.set_retry(true);
            }
            Retry::Never => e.set_retry(false),
        }
        e
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let from_origin = ctx.chosen.is_some_and(|c| c.edge.is_none());
        // An origin's own `X-Cache` (a Varnish or another CDN in front of it) says nothing
        // about this CDN's edges.
        let x_cache = resp
            .headers
            .get("x-cache")
            .filter(|_| !from_origin)
            .and_then(|v| v.to_str().ok());
        ctx.cache_status = match x_cache {
            Some(s) if s.eq_ignore_ascii_case("hit") => "hit",
            Some(s) if s.eq_ignore_ascii_case("miss") => "miss",
            Some(s) if s.eq_ignore_ascii_case("stale") => "stale",
            Some(s) if s.eq_ignore_ascii_case("stale-updating") => "stale-updating",
            Some(s) if s.eq_ignore_ascii_case("expired") => "expired",
            Some(s) if s.eq_ignore_ascii_case("revalidated") => "revalidated",
            Some(_) => "other",
            None if from_origin => "origin",
            None => "none",
        };
        if let Some(c) = ctx.chosen {
            let edge = c.edge.map_or("origin", |e| self.fleet.edges[e].id.as_str());
            resp.insert_header("x-shadowcdn-edge", edge)?;
            // The direct-to-origin fallback drops what an edge would have dropped: the
            // origin's per-connection fields and its own cache's status, cache tags always,
            // cookies when the site asked.
            if c.edge.is_none() {
                edge_node::response_fields::strip_hop_by_hop(resp);
                resp.remove_header("x-cache");
                resp.remove_header("cache-status");
                edge_node::tags::strip(resp);
                let strip = host_of(session.req_header())
                    .and_then(|h| self.registry.origin(&h))
                    .is_some_and(|o| o.strip_set_cookie);
                if strip {
                    resp.remove_header(&http::header::SET_COOKIE);
                }
            }
        }
        Ok(())
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
        let stalled = *e.esource() == ErrorSource::Upstream
            && matches!(
                e.etype(),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout
            );
        // Every route failing is a gateway error here, not an internal one.
        let (status, kind) = error_status(e);
        let code = match status {
            _ if stalled => 504,
            _ if kind == "internal" => 502,
            code => code,
        };
        if code > 0 && session.response_written().is_none() {
            let (kind, msg) = if stalled {
                let secs = self.edge_read_timeout.as_secs();
                ("upstream_timeout", format!("no answer within {secs} s"))
            } else if kind == "request_timeout" {
                let msg = "the request body did not arrive in time".to_string();
                ("request_timeout", msg)
            } else if kind == "bad_request" {
                // The client's own request failed (a malformed body, say): not a routing error.
                (
                    "bad_request",
                    format!("the request could not be read: {}", e.etype().as_str()),
                )
            } else {
                let attempts = ctx.tried.len() + ctx.origin_addrs_tried.len();
                let msg =
                    format!("no edge or origin could serve the request after {attempts} attempts");
                ("no_route", msg)
            };
            if let Err(err) = respond_json_error(session, code, kind, &msg).await {
                tracing::debug!(error = %err, "could not send error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let (edge, reason) = match ctx.chosen {
            Some(c) => (
                c.edge.map_or("origin", |e| self.fleet.edges[e].id.as_str()),
                c.reason,
            ),
            None => ("none", Reason::Origin),
        };
        let region = &self.fleet.regions[ctx.region];
        if let Some(log) = &self.access_log {
            let request = RequestFields::of(session, ctx.started);
            let peer = request.client.map(|ip| ip.to_canonical());
            log.log(&AccessLine {
                forwarded_for: ctx.client_addr.filter(|ip| Some(*ip) != peer),
                request,
                region: region.as_str(),
                edge,
                route: ctx.chosen.map_or("none", |c| c.reason.as_str()),
                cache: ctx.cache_status,
                segment: ctx.segment.as_deref(),
            });
        }
        if ctx.key.is_empty() {
            // Refused before routing (no or unknown host, a target too long, a loop): counted
            // too, or a flood of them would show only in the access log.
            self.metrics
                .requests
                .with_label_values(&[region.as_str(), "none", "refused", status_label(status)])
                .inc();
            return;
        }
        self.metrics
            .requests
            .with_label_values(&[region.as_str(), edge, reason.as_str(), status_label(status)])
            .inc();
        if reason != Reason::Primary {
            self.metrics
                .failovers
                .with_label_values(&[reason.as_str()])
                .inc();
        }
        // Before `request_seconds`, whose count tests wait on (`wait_logged_past`) to read the
        // hints of the requests they made.
        if ctx.peer_hinted {
            self.metrics.peer_hints.inc();
        }
        if let (Some(h), Some(Choice { edge: Some(e), .. })) = (&self.holders, ctx.chosen) {
            // The edge stored what it answered from or into its cache.
            if status == 200 && stored_on_edge(ctx.cache_status) {
                let region = self.fleet.edge_region(e);
                h.record(ctx.key_hash, e, region, now_secs(), ctx.holders_epoch);
            }
        }
        let elapsed = ctx.started.elapsed();
        self.metrics
            .request_seconds
            .with_label_values(&[reason.as_str()])
            .observe(elapsed.as_secs_f64());
        if self.recorder.enabled() && is_demand(&session.req_header().method, status) {
            self.recorder.record(Record {
                resource: std::mem::take(&mut ctx.resource),
                key: std::mem::take(&mut ctx.key),
                ts: now_secs(),
                region: ctx.region as u16,
                segment: ctx.segment.take(),
                bytes: session.body_bytes_sent() as u64,
                object_bytes: session
                    .response_written()
                    .and_then(|r| object_size(r.status.as_u16(), &r.headers)),
                cache_status: ctx.cache_status,
                latency_us: elapsed.as_micros() as u64,
                client: ctx.client,
                started_ms: ctx.started_ms,
                announced: ctx.announced,
            });
        }
    }
}

/// The `status` label of a response: the code itself for the ones a CDN commonly answers, its
/// class (`2xx`…) for the rest. Origins choose the code, and any of 100–999 would otherwise
/// be a series of its own per region, edge and reason.
fn status_label(status: u16) -> &'static str {
    const COMMON: [(u16, &str); 26] = [
        (0, "0"),
        (200, "200"),
        (204, "204"),
        (206, "206"),
        (301, "301"),
        (302, "302"),
        (304, "304"),
        (307, "307"),
        (308, "308"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (408, "408"),
        (410, "410"),
        (412, "412"),
        (413, "413"),
        (414, "414"),
        (416, "416"),
        (429, "429"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
        (508, "508"),
    ];
    if let Some((_, label)) = COMMON.iter().find(|(code, _)| *code == status) {
        return label;
    }
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

/// What to do after an error once the request reached an upstream ([`retry_after_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Send it again to the same edge (or origin) on a fresh connection.
    SameRoute,
    /// Send it to the next route of the plan.
    NextRoute,
    /// Answer the client with the error.
    Never,
}

/// The edges that dropped one request before answering. A second edge's drop is the
/// request's doing (a query of death), not the edges': sending it on would take it to every
/// edge. A drop on a kept-alive connection looks like a keep-alive race (the edge closed it
/// idle, or restarted gracefully), so it only counts once the same edge fails it again: it
/// refuses the reconnect, or drops the request on a fresh connection too.
#[derive(Debug, Clone, Copy, Default)]
struct Drops {
    /// The first edge whose drop counted.
    by: Option<usize>,
    /// The last edge that dropped the request on a kept-alive connection.
    suspect: Option<usize>,
}

impl Drops {
    /// `edge` dropped the request, on a kept-alive connection if `pooled`; whether that
    /// makes it the second edge to (not to be sent on).
    fn dropped(&mut self, edge: usize, pooled: bool) -> bool {
        if pooled {
            self.suspect = Some(edge);
            false
        } else {
            self.counted(edge)
        }
    }

    /// `edge` refused a connect (or reset it): whether that confirms it dropped the request
    /// and makes it the second edge to.
    fn refused(&mut self, edge: usize) -> bool {
        self.suspect == Some(edge) && self.counted(edge)
    }

    fn counted(&mut self, edge: usize) -> bool {
        match self.by {
            Some(first) => first != edge,
            None => {
                self.by = Some(edge);
                false
            }
        }
    }
}

/// Retries on the same route after pooled connections failed, per request: enough for a
/// keep-alive race or two, not a retry per idle connection in the pool.
pub(crate) const MAX_POOLED_RETRIES: u8 = 2;

/// Whether an error on the way to or from an upstream is its connection failing (refused,
/// closed, reset, unwritable), as opposed to an answer this proxy rejects or a timeout.
fn connection_failed(kind: &ErrorType) -> bool {
    matches!(
        kind,
        ErrorType::ConnectionClosed
            | ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::SocketError
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectTimedout
            | ErrorType::ConnectError
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::HandshakeError
    )
}

/// Whether a failed connect says the edge is gone, so it leaves routing at once: a refused
/// or reset connection, no route. A connect that timed out may be one lost SYN (the 1 s
/// connect timeout is the kernel's first SYN retransmit): the request goes elsewhere and the
/// health probes decide. Nor does a failure on this side (no file descriptor, no local port:
/// pingora's `InternalError`) say anything of the edge: it would fail every edge of the plan
/// in turn and take a whole region out of routing.
fn edge_is_gone(etype: &ErrorType) -> bool {
    !matches!(
        etype,
        ErrorType::ConnectTimedout
            | ErrorType::InternalError
            | ErrorType::SocketError
            | ErrorType::BindError
    )
}

/// The retry policy of [`ProxyHttp::error_while_proxy`], apart from the session so it can be
/// tested. `replayable`: the request can be sent again unchanged and nothing was answered yet
/// (idempotent method, whole body buffered, not the client's error, not a stall). Anything else
/// is never retried: a replayed POST could run twice at the origin, and a truncated body would
/// be sent half. `pooled`: the error came on a pooled connection of a chosen route.
fn retry_after_error(replayable: bool, pooled: bool, origin_tried: bool) -> Retry {
    if !replayable {
        Retry::Never
    } else if pooled {
        Retry::SameRoute
    } else if !origin_tried {
        Retry::NextRoute
    } else {
        // Every edge and the origin were tried: another try would find no route and answer
        // that instead of the origin's own failure.
        Retry::Never
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origins_connections_go_round_its_addresses_ipv4_first_failed_last() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let addrs = vec![a("[2001:db8::1]:80"), a("192.0.2.1:80"), a("192.0.2.2:80")];
        let r = ResolvedUpstream {
            host: "o.test".into(),
            tls: false,
            addrs: addrs.clone(),
            failed: parking_lot::Mutex::new(Vec::new()),
        };
        let walk = || {
            let mut tried = Vec::new();
            for _ in 0..4 {
                tried.push(r.next_addr(&tried));
            }
            tried
        };
        assert_eq!(walk(), [addrs[1], addrs[2], addrs[0], addrs[1]]);
        // A request whose first address failed goes on to the next, not past it.
        r.connect_failed(addrs[1]);
        assert_eq!(r.next_addr(&[addrs[1]]), addrs[2]);
        // Later requests start with the ones that did not fail.
        r.connect_failed(a("198.51.100.1:80"));
        assert_eq!(walk(), [addrs[2], addrs[0], addrs[1], addrs[2]]);
        assert_eq!(
            r.failed.lock().len(),
            1,
            "only its own addresses are remembered"
        );
    }

    #[test]
    fn status_labels_are_a_bounded_set() {
        let labels: std::collections::HashSet<_> = (0..=1000).map(status_label).collect();
        assert!(labels.len() < 40, "{}", labels.len());
        assert_eq!(status_label(404), "404");
        assert_eq!(status_label(418), "4xx");
        assert_eq!(status_label(299), "2xx");
        assert_eq!(status_label(999), "other");
    }

    #[test]
    fn only_the_edges_side_of_a_failed_connect_marks_it_down() {
        for gone in [
            ErrorType::ConnectRefused,
            ErrorType::ConnectNoRoute,
            ErrorType::ConnectError,
            ErrorType::TLSHandshakeFailure,
        ] {
            assert!(edge_is_gone(&gone), "{gone:?}");
        }
        // pingora's names for a lost SYN, and for no descriptor or port on this side
        for ours in [
            ErrorType::ConnectTimedout,
            ErrorType::InternalError,
            ErrorType::SocketError,
            ErrorType::BindError,
        ] {
            assert!(!edge_is_gone(&ours), "{ours:?}");
        }
    }

    #[test]
    fn a_request_that_cannot_be_replayed_is_never_retried() {
        for pooled in [false, true] {
            for origin_tried in [false, true] {
                assert_eq!(retry_after_error(false, pooled, origin_tried), Retry::Never);
            }
        }
    }

    #[test]
    fn only_a_failed_connection_is_worth_another_try() {
        for kind in [
            ErrorType::ConnectionClosed,
            ErrorType::ReadError,
            ErrorType::ConnectRefused,
        ] {
            assert!(connection_failed(&kind), "{kind:?}");
        }
        for kind in [
            ErrorType::InvalidHTTPHeader,
            ErrorType::H1Error,
            ErrorType::ReadTimedout,
            ErrorType::HTTPStatus(502),
        ] {
            assert!(!connection_failed(&kind), "{kind:?}");
        }
    }

    #[test]
    fn a_request_goes_on_after_one_edge_drops_it_not_two() {
        // Fresh connections: the first edge's drop counts, the second's stops it.
        let mut d = Drops::default();
        assert!(!d.dropped(0, false));
        assert!(!d.dropped(0, false), "the same edge again");
        assert!(d.dropped(1, false));
        // Kept-alive connections closed by two edges (a graceful restart of both): a race.
        let mut d = Drops::default();
        assert!(!d.dropped(0, true));
        assert!(!d.dropped(1, true));
        assert!(!d.refused(2), "refused by an edge that never had it");
        // An edge that crashed with it refuses the reconnect: then it counts.
        let mut d = Drops::default();
        assert!(!d.dropped(0, true));
        assert!(!d.refused(0));
        assert!(!d.dropped(1, true));
        assert!(d.refused(1));
        // Or drops it on a fresh connection too.
        let mut d = Drops::default();
        assert!(!d.dropped(0, true));
        assert!(!d.dropped(0, false));
        assert!(!d.dropped(1, true));
        assert!(d.dropped(1, false));
    }

    #[test]
    fn a_replayable_request_retries_by_where_it_failed() {
        assert_eq!(retry_after_error(true, true, false), Retry::SameRoute);
        assert_eq!(retry_after_error(true, true, true), Retry::SameRoute);
        assert_eq!(retry_after_error(true, false, false), Retry::NextRoute);
        assert_eq!(retry_after_error(true, false, true), Retry::Never);
    }
}
