//! Edge metrics, registered in a registry the caller owns (`shadowcdn_edge_*`).

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::RwLock;
use prometheus::{
    Counter, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Distinct region labels of `shadowcdn_edge_routed_requests_total`.
pub const MAX_ROUTE_REGIONS: usize = 64;

/// What the edge did with a request: the `cache_status` label of the request metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served fresh from cache.
    Hit,
    /// Served stale (stale-if-error).
    Stale,
    /// Served stale while a background revalidation runs.
    StaleUpdating,
    /// Fetched from the origin.
    Miss,
    /// Held but expired; fetched again.
    Expired,
    /// Held, revalidated with the origin (304).
    Revalidated,
    /// Not cacheable; proxied.
    Bypass,
    /// The edge's own shadow fill.
    ShadowFill,
    /// Another edge's peer fetch (answered from cache only, or refused): not a client's.
    PeerFetch,
    /// Refused before proxying (no Host, unknown host).
    Rejected,
    /// Failed while proxying.
    Error,
}

impl CacheStatus {
    /// Every status, in discriminant order.
    pub const ALL: [CacheStatus; 11] = [
        CacheStatus::Hit,
        CacheStatus::Stale,
        CacheStatus::StaleUpdating,
        CacheStatus::Miss,
        CacheStatus::Expired,
        CacheStatus::Revalidated,
        CacheStatus::Bypass,
        CacheStatus::ShadowFill,
        CacheStatus::PeerFetch,
        CacheStatus::Rejected,
        CacheStatus::Error,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Stale => "stale",
            CacheStatus::StaleUpdating => "stale-updating",
            CacheStatus::Miss => "miss",
            CacheStatus::Expired => "expired",
            CacheStatus::Revalidated => "revalidated",
            CacheStatus::Bypass => "bypass",
            CacheStatus::ShadowFill => "shadow_fill",
            CacheStatus::PeerFetch => "peer_fetch",
            CacheStatus::Rejected => "rejected",
            CacheStatus::Error => "error",
        }
    }
}

/// The request metrics of one cache status, resolved once at start-up so the request path
/// does not hash label values under the metric family's lock on every request.
#[derive(Clone)]
pub struct StatusMetrics {
    /// `shadowcdn_edge_requests_total{cache_status}`
    pub requests: IntCounter,
    /// `shadowcdn_edge_served_bytes_total{cache_status}`
    pub bytes_served: IntCounter,
    /// `shadowcdn_edge_request_duration_seconds{cache_status}`
    pub seconds: Histogram,
}

/// Request-path metrics of one edge.
#[derive(Clone)]
pub struct EdgeMetrics {
    /// Requests by cache status (`hit`, `miss`, `stale`, `revalidated`, `expired`, `bypass`, …).
    pub requests: IntCounterVec,
    /// Body bytes sent to clients, by cache status.
    pub bytes_served: IntCounterVec,
    /// Origin fetches by outcome (`ok`, `error`).
    pub origin_fetches: IntCounterVec,
    /// Time from the upstream request until the response header arrived.
    pub origin_latency: Histogram,
    /// Requests that waited behind the cache lock for another request's fill.
    pub lock_waits: IntCounter,
    /// How long those requests waited.
    pub lock_wait_seconds: Histogram,
    /// Access-log lines lost (queue full or write failed).
    pub access_log_dropped: IntCounter,
    /// Requests rejected before proxying, by reason (`unknown_host`, …).
    pub rejected: IntCounterVec,
    /// Whole-request latency by cache status.
    pub request_seconds: HistogramVec,
    /// Requests routed by a broker, by the region and reason it tagged them with; use
    /// [`EdgeMetrics::count_routed`].
    pub routed: IntCounterVec,
    /// Region labels `routed` has used: a client can send any route tag, so past
    /// [`MAX_ROUTE_REGIONS`] new names count as `other`.
    route_regions: Arc<RwLock<HashSet<String>>>,
    /// Requests served from a valid shadow.
    pub shadow_hits: IntCounter,
    /// Shadow fills by outcome (`filled`, `failed`, `refused`).
    pub shadow_fills: IntCounterVec,
    /// Expired shadows by outcome (`used`: demoted, `wasted`: purged unrequested).
    pub shadows_expired: IntCounterVec,
    /// Requests that were the first to find their shadow (recall's numerator).
    pub shadow_first_hits: IntCounter,
    /// Shadow fills by the source that served them (peer edge or origin).
    pub shadow_fill_sources: IntCounterVec,
    /// Bytes fetched by shadow fills.
    pub shadow_fill_bytes: IntCounter,
    /// Demand misses the broker hinted a peer for, by outcome (`hit`: its copy arrived whole,
    /// `miss`: it did not hold a usable copy, `error`: it could not be asked or failed, or the
    /// copy's body broke; misses and errors before the body go to the origin).
    pub demand_peer_fills: IntCounterVec,
    /// Misses whose peer hint came from an address outside `server.trusted_proxies` and was
    /// ignored: nonzero when the brokers' addresses are missing from it.
    pub peer_hints_untrusted: IntCounter,
    /// Seconds fill workers waited to stay within `shadow.fill_bandwidth`.
    pub shadow_fill_paced_seconds: Counter,
    /// Open QUIC connections by peer role.
    pub sync_connections: IntGaugeVec,
    /// QUIC messages handled, by type and outcome.
    pub sync_messages: IntCounterVec,
    /// QUIC handshakes refused (no, foreign or revoked certificate, wrong ALPN, too many at
    /// once, too many connections open from the peer).
    pub sync_handshake_failures: IntCounter,
    /// Live shadow marks (refreshed on scrape).
    pub shadows: IntGauge,
    /// Bytes held by live shadows (refreshed on scrape).
    pub shadow_bytes: IntGauge,
    /// Purges by kind (`key`, `prefix`, `tag`) and outcome (`disk_stalled`: answered 503 for a
    /// stalled disk; one applied goes on and is counted again by how it ends).
    pub purges: IntCounterVec,
    /// Stored copies removed because a request that may change them succeeded (RFC 9111 §4.4).
    pub unsafe_method_invalidations: IntCounter,
    /// Fields of the last origin push this edge did not know (a newer broker's options).
    pub origin_push_ignored_fields: IntGauge,
    /// Responses compressed on the way out, by algorithm.
    pub compressed: IntCounterVec,
    /// Body bytes into and out of the compressor, by algorithm and `stage` (`in`, `out`).
    pub compression_bytes: IntCounterVec,
    /// Bytes held by the memory tier (refreshed on scrape).
    pub memory_bytes: IntGauge,
    /// Bytes held by bodies being filled (set at scrape time).
    pub fill_bytes: IntGauge,
    /// Prefix, tag and key bans in force (refreshed on scrape).
    pub bans: IntGauge,
    /// 1 while the cache disk answers its probes, 0 while it stalls or fails them (set at
    /// scrape time, [`crate::storage::DiskHealth`]).
    pub disk_ready: IntGauge,
    /// The disk probe's own metrics.
    pub disk_probe: crate::storage::ProbeMetrics,
    /// The request metrics per status, indexed by `CacheStatus as usize`.
    by_status: Vec<StatusMetrics>,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl EdgeMetrics {
    /// Create and register every metric in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let mut m = EdgeMetrics {
            requests: IntCounterVec::new(
                Opts::new("shadowcdn_edge_requests_total", "Requests by cache status"),
                &["cache_status"],
            )?,
            bytes_served: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_edge_served_bytes_total",
                    "Response body bytes sent to clients",
                ),
                &["cache_status"],
            )?,
            origin_fetches: IntCounterVec::new(
                Opts::new("shadowcdn_edge_origin_fetches_total", "Origin fetches"),
                &["outcome"],
            )?,
            origin_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "shadowcdn_edge_origin_fetch_duration_seconds",
                    "Time to the origin's response header",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            lock_waits: IntCounter::new(
                "shadowcdn_edge_cache_lock_waits_total",
                "Requests that waited for another request's fill",
            )?,
            access_log_dropped: IntCounter::new(
                "shadowcdn_edge_access_log_dropped_total",
                "Access-log lines lost: the writer's queue was full or a write failed",
            )?,
            lock_wait_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "shadowcdn_edge_cache_lock_wait_seconds",
                    "Time spent waiting on the cache lock",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_edge_rejected_requests_total",
                    "Requests answered with an error before proxying",
                ),
                &["reason"],
            )?,
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "shadowcdn_edge_request_duration_seconds",
                    "Whole-request latency at the edge",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["cache_status"],
            )?,
            route_regions: Arc::default(),
            routed: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_edge_routed_requests_total",
                    "Requests a broker routed here, by its route tag",
                ),
                &["region", "reason"],
            )?,
            shadow_hits: IntCounter::new(
                "shadowcdn_edge_shadow_hits_total",
                "Requests served from a valid shadow",
            )?,
            shadow_fills: IntCounterVec::new(
                Opts::new("shadowcdn_edge_shadow_fills_total", "Shadow fills"),
                &["outcome"],
            )?,
            shadows_expired: IntCounterVec::new(
                Opts::new("shadowcdn_edge_shadows_expired_total", "Expired shadows"),
                &["outcome"],
            )?,
            shadow_first_hits: IntCounter::new(
                "shadowcdn_edge_shadow_first_hits_total",
                "Requests that were the first to find their shadow",
            )?,
            shadow_fill_sources: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_edge_shadow_fill_sources_total",
                    "Completed shadow fills by source (peer edge over QUIC, or origin)",
                ),
                &["source"],
            )?,
            demand_peer_fills: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_edge_demand_peer_fills_total",
                    "Cache misses first tried on the peer edge the broker hinted, by outcome: hit (its copy arrived whole), miss (it held no usable copy), error (it could not be asked or failed, or the copy's body broke)",
                ),
                &["outcome"],
            )?,
            peer_hints_untrusted: IntCounter::new(
                "shadowcdn_edge_peer_hints_untrusted_total",
                "Cache misses whose peer hint came from an address outside server.trusted_proxies and was ignored",
            )?,
            shadow_fill_bytes: IntCounter::new(
                "shadowcdn_edge_shadow_fill_bytes_total",
                "Body bytes fetched by shadow fills",
            )?,
            shadow_fill_paced_seconds: Counter::new(
                "shadowcdn_edge_shadow_fill_paced_seconds_total",
                "Seconds shadow fills waited to stay within the fill bandwidth",
            )?,
            sync_connections: IntGaugeVec::new(
                Opts::new("shadowcdn_edge_quic_connections", "Open QUIC connections"),
                &["role"],
            )?,
            sync_messages: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_edge_quic_messages_total",
                    "QUIC messages handled by type and outcome",
                ),
                &["type", "outcome"],
            )?,
            sync_handshake_failures: IntCounter::new(
                "shadowcdn_edge_quic_handshake_failures_total",
                "QUIC handshakes refused (missing, foreign or revoked certificate, too many at once, \
                 or too many connections open from the peer)",
            )?,
            shadows: IntGauge::new("shadowcdn_edge_shadows", "Live shadow marks")?,
            shadow_bytes: IntGauge::new(
                "shadowcdn_edge_shadow_bytes",
                "Bytes held by live shadows",
            )?,
            purges: IntCounterVec::new(
                Opts::new("shadowcdn_edge_purges_total", "Purge requests"),
                &["kind", "outcome"],
            )?,
            unsafe_method_invalidations: IntCounter::new(
                "shadowcdn_edge_unsafe_method_invalidations_total",
                "Stored copies removed after a successful POST, PUT, DELETE or PATCH to their URL",
            )?,
            origin_push_ignored_fields: IntGauge::new(
                "shadowcdn_edge_origin_push_ignored_fields",
                "Fields of the last origin push this edge does not know (upgrade the edge)",
            )?,
            compressed: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_edge_compressed_responses_total",
                    "Responses compressed for the client, by algorithm",
                ),
                &["algorithm"],
            )?,
            compression_bytes: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_edge_compression_bytes_total",
                    "Body bytes into (stage=in) and out of (stage=out) the compressor",
                ),
                &["algorithm", "stage"],
            )?,
            memory_bytes: IntGauge::new(
                "shadowcdn_edge_cache_memory_bytes",
                "Bytes held by the memory tier",
            )?,
            fill_bytes: IntGauge::new(
                "shadowcdn_edge_fill_bytes",
                "Bytes held by bodies being filled, bounded by cache.max_fill_memory",
            )?,
            disk_ready: IntGauge::new(
                "shadowcdn_edge_disk_ready",
                "1 while the cache disk answers its write-and-fsync probe within \
                 cache.disk_stall_secs, 0 while it stalls or fails it (the edge then answers \
                 not ready and the broker routes around it)",
            )?,
            disk_probe: crate::storage::ProbeMetrics {
                seconds: Histogram::with_opts(
                    HistogramOpts::new(
                        "shadowcdn_edge_disk_probe_seconds",
                        "Time of each finished write-and-fsync probe of the cache disk",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
                failures: IntCounter::new(
                    "shadowcdn_edge_disk_probe_failures_total",
                    "Write-and-fsync probes of the cache disk that failed (a device error, a \
                     read-only remount)",
                )?,
            },
            bans: IntGauge::new(
                "shadowcdn_edge_purge_bans",
                "Prefix, tag and key purge bans in force",
            )?,
            by_status: Vec::new(),
        };
        m.by_status = CacheStatus::ALL
            .iter()
            .map(|s| {
                let l = [s.label()];
                StatusMetrics {
                    requests: m.requests.with_label_values(&l),
                    bytes_served: m.bytes_served.with_label_values(&l),
                    seconds: m.request_seconds.with_label_values(&l),
                }
            })
            .collect();
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.bytes_served.clone()))?;
        registry.register(Box::new(m.origin_fetches.clone()))?;
        registry.register(Box::new(m.origin_latency.clone()))?;
        registry.register(Box::new(m.lock_waits.clone()))?;
        registry.register(Box::new(m.access_log_dropped.clone()))?;
        registry.register(Box::new(m.lock_wait_seconds.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.request_seconds.clone()))?;
        registry.register(Box::new(m.routed.clone()))?;
        registry.register(Box::new(m.shadow_hits.clone()))?;
        registry.register(Box::new(m.shadow_fills.clone()))?;
        registry.register(Box::new(m.shadows_expired.clone()))?;
        registry.register(Box::new(m.shadow_first_hits.clone()))?;
        registry.register(Box::new(m.shadow_fill_sources.clone()))?;
        registry.register(Box::new(m.shadow_fill_bytes.clone()))?;
        registry.register(Box::new(m.demand_peer_fills.clone()))?;
        registry.register(Box::new(m.peer_hints_untrusted.clone()))?;
        registry.register(Box::new(m.shadow_fill_paced_seconds.clone()))?;
        registry.register(Box::new(m.sync_connections.clone()))?;
        registry.register(Box::new(m.sync_messages.clone()))?;
        registry.register(Box::new(m.sync_handshake_failures.clone()))?;
        registry.register(Box::new(m.shadows.clone()))?;
        registry.register(Box::new(m.shadow_bytes.clone()))?;
        registry.register(Box::new(m.purges.clone()))?;
        registry.register(Box::new(m.unsafe_method_invalidations.clone()))?;
        registry.register(Box::new(m.compressed.clone()))?;
        registry.register(Box::new(m.origin_push_ignored_fields.clone()))?;
        registry.register(Box::new(m.compression_bytes.clone()))?;
        registry.register(Box::new(m.memory_bytes.clone()))?;
        registry.register(Box::new(m.fill_bytes.clone()))?;
        registry.register(Box::new(m.bans.clone()))?;
        registry.register(Box::new(m.disk_ready.clone()))?;
        registry.register(Box::new(m.disk_probe.seconds.clone()))?;
        registry.register(Box::new(m.disk_probe.failures.clone()))?;
        // The failures alerts watch exist at zero from the start: `increase()` over a series
        // that appears with its first failure reads that failure as no increase.
        for outcome in ["ok", "error"] {
            m.origin_fetches.with_label_values(&[outcome]);
        }
        for kind in ["key", "prefix", "tag"] {
            for outcome in ["error", "disk_stalled"] {
                m.purges.with_label_values(&[kind, outcome]);
            }
        }
        Ok(m)
    }

    /// Count a request a broker routed here, with a bounded set of region labels.
    pub fn count_routed(&self, region: &str, reason: &str) {
        let known = self.route_regions.read().contains(region);
        let region = if known {
            region
        } else {
            let mut seen = self.route_regions.write();
            if seen.len() < MAX_ROUTE_REGIONS {
                seen.insert(region.to_string());
                region
            } else {
                "other"
            }
        };
        self.routed.with_label_values(&[region, reason]).inc();
    }

    /// The request metrics of `status`.
    pub fn status(&self, status: CacheStatus) -> &StatusMetrics {
        &self.by_status[status as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::core::Collector;

    #[test]
    fn route_region_labels_are_bounded() {
        let m = EdgeMetrics::register(&Registry::new()).unwrap();
        for i in 0..(MAX_ROUTE_REGIONS + 10) {
            m.count_routed(&format!("r{i}"), "primary");
        }
        m.count_routed("r0", "primary");
        let regions: HashSet<String> = m
            .routed
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .flat_map(|mm| mm.get_label().to_vec())
            .filter(|l| l.name() == "region")
            .map(|l| l.value().to_string())
            .collect();
        assert_eq!(regions.len(), MAX_ROUTE_REGIONS + 1);
        assert!(regions.contains("other") && regions.contains("r0"));
    }
}
