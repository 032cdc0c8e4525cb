//! Broker metrics (`shadowcdn_broker_*`), registered in a registry the caller owns.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// All broker metrics.
#[derive(Clone)]
pub struct BrokerMetrics {
    /// Proxied requests by client region, serving edge (or `origin`), route reason and status.
    pub requests: IntCounterVec,
    /// Requests moved off their first choice, by reason of the choice that served them.
    pub failovers: IntCounterVec,
    /// Access-log lines lost (queue full or write failed).
    pub access_log_dropped: prometheus::IntCounter,
    /// Retries after a failed attempt.
    pub retries: IntCounter,
    /// Requests sent to an edge with a peer hint (another edge recently served the key).
    pub peer_hints: IntCounter,
    /// Standby promotions by region.
    pub standby_promotions: IntCounterVec,
    /// Edge health as seen by the broker (1 up, 0 down).
    pub edge_up: IntGaugeVec,
    /// Request latency at the broker by route reason.
    pub request_seconds: HistogramVec,
    /// Records dropped because the monitor queue was full.
    pub recorder_drops: IntCounter,
    /// Records not kept because their key is too long to hold in the monitor.
    pub recorder_long_keys: IntCounter,
    /// Request starts not queued for co-access (their records trigger instead).
    pub recorder_starts_skipped: IntCounter,
    /// Records aggregated by the monitor.
    pub recorded: IntCounter,
    /// Provider API calls by provider and status code.
    pub api_calls: IntCounterVec,
    /// Pushes to edges' admin APIs by table (`origins`, `peers`) and outcome.
    pub edge_pushes: IntCounterVec,
    /// 1 while an edge refuses the origin table for good (any refusal but busy, timed out or
    /// throttled): it routes by the one it last took.
    pub edge_origin_table_refused: IntGaugeVec,
    /// Hosts kept off each edge: its origin table routes them otherwise than the registry.
    pub edge_hosts_off: IntGaugeVec,
    /// Origin rows each edge left out of the last push.
    pub edge_rejected_origins: prometheus::IntGaugeVec,
    /// Hosts claimed by providers that await the operator's approval.
    pub host_claims: prometheus::IntGauge,
    /// Purges each edge has not confirmed; the edge takes no traffic while any is pending.
    pub edge_pending_purges: prometheus::IntGaugeVec,
    /// Redeliveries of missed purges, by outcome.
    pub purge_redeliveries: IntCounterVec,
    /// Writes of the pending-purge queues that failed (they still hold in memory).
    pub pending_purges_save_failures: prometheus::IntCounter,
    /// Writes of the origin tables the edges took that failed (they still hold in memory).
    pub taken_tables_save_failures: prometheus::IntCounter,
    /// Planner decisions by outcome.
    pub planner_decisions: IntCounterVec,
    /// Shadow commands sent to edges by outcome.
    pub shadows_issued: IntCounterVec,
    /// Time from a modification event's arrival until every edge answered.
    pub event_propagation: prometheus::HistogramVec,
    /// The planner's uncertainty safety factor on shadow budgets.
    pub planner_safety: prometheus::Gauge,
    /// How long each planning tick took (forecast, decisions and order sends): a tick that
    /// overruns its interval delays every shadow behind it.
    pub planner_tick: prometheus::Histogram,
    /// Shadow spend in USD by category, provider, region and priority class.
    pub shadow_spend: prometheus::CounterVec,
    /// Shadow savings in USD by category, provider, region and priority class.
    pub shadow_savings: prometheus::CounterVec,
    /// Cumulative net benefit (savings − spend) of settled shadows, by region and `all`.
    pub net_benefit: prometheus::GaugeVec,
    /// Shadowed bytes that served a request before expiry / shadowed bytes, by region.
    pub shadow_precision: prometheus::GaugeVec,
    /// Requests that found a shadow first / (those + every demand MISS on the edges): recall of
    /// the requests shadowing could have served; EXPIRED refetches are not counted.
    pub shadow_recall: prometheus::Gauge,
    /// Shadow orders an edge process took with it when it ended without a graceful stop,
    /// priced by the broker ([`crate::cost::Ledger::lost`]), by region.
    pub shadows_lost: IntCounterVec,
    /// Confidence threshold in force by region and priority class.
    pub threshold: prometheus::GaugeVec,
    /// Threshold moves by region, class and direction.
    pub threshold_changes: IntCounterVec,
    /// Series currently flagged as anomalous, by kind (`surge`, `drop`).
    pub anomalies: IntGaugeVec,
    /// When each HTTPS certificate stops being valid (Unix seconds), by its file.
    pub tls_cert_expiry: IntGaugeVec,
    /// Anomaly standings entered, by kind (`surge`, `drop`, `normal`).
    pub anomaly_events: IntCounterVec,
    /// Co-access shadows by outcome: each follower in `coaccess_followers` ends in one.
    pub coaccess_shadows: IntCounterVec,
    /// Followers offered at requests, each to be placed or turned down
    /// (`coaccess_shadows`): the two totals differ by the followers still on their way.
    pub coaccess_followers: prometheus::IntCounter,
    /// Co-access offers decided, by band of P (its lower bound) and outcome (`followed`,
    /// `not_followed`): how well the learner's counts predict, before calibration.
    pub coaccess_offers: IntCounterVec,
    /// Co-access pairs kept.
    pub coaccess_pairs: prometheus::IntGauge,
    /// Bytes charged to the co-access map.
    pub coaccess_bytes: prometheus::IntGauge,
    /// 1 while the QUIC control connection to an edge is up.
    pub quic_connected: IntGaugeVec,
    /// QUIC control messages by type and outcome.
    pub quic_messages: IntCounterVec,
    /// Each edge's last reported counters (`stat`: shadow_hits, shadows_wasted, …).
    pub edge_stats: IntGaugeVec,
    /// Edge processes seen replacing another (a new boot id in an edge's stats), by edge and
    /// whether its cache came back empty (`cache`: kept, emptied: either process had no disk
    /// tier, or the disk tier is new).
    pub edge_restarts: IntCounterVec,
    /// 1 while the forecaster falls back to the baseline (model not loadable).
    pub forecaster_fallback: prometheus::IntGauge,
    /// Model loads, rejected loads (the previous model or the baseline kept serving),
    /// batches the model failed on and series it answered outside the contract (`event`:
    /// load, load_failure, batch_failure, series_failure).
    pub forecaster_events: IntCounterVec,
    /// Series each forecaster answers under the per-series guard (`answer`: model,
    /// seasonal_naive, ewma): a baseline answers a series it has lately been clearly better on.
    pub forecaster_series: IntGaugeVec,
    /// Forecasts scored once their horizon passed, by forecaster, whether the series was
    /// asked in the hour before (`last_hour`: `asked`, `quiet`), the band of the forecaster's
    /// own P (lower bound) and whether a request came (`came`, `did_not`): what the planner's
    /// calibration learns from.
    pub forecast_outcomes: IntCounterVec,
}

impl BrokerMetrics {
    /// Create and register every metric.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = BrokerMetrics {
            requests: IntCounterVec::new(
                Opts::new("shadowcdn_broker_requests_total", "Proxied requests"),
                &["region", "edge", "reason", "status"],
            )?,
            access_log_dropped: prometheus::IntCounter::new(
                "shadowcdn_broker_access_log_dropped_total",
                "Access-log lines lost: the writer's queue was full or a write failed",
            )?,
            failovers: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_failovers_total",
                    "Requests served by other than the key's primary edge",
                ),
                &["reason"],
            )?,
            peer_hints: IntCounter::new(
                "shadowcdn_broker_peer_hints_total",
                "Requests sent with a hint naming another edge that recently served the key",
            )?,
            retries: IntCounter::new(
                "shadowcdn_broker_retries_total",
                "Attempts retried on the next choice after an edge failed",
            )?,
            standby_promotions: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_standby_promotions_total",
                    "Standby promotions",
                ),
                &["region"],
            )?,
            edge_up: IntGaugeVec::new(
                Opts::new("shadowcdn_broker_edge_up", "Whether the edge takes traffic (1): probed healthy, not held for purges it missed, QUIC certificate not revoked"),
                &["edge"],
            )?,
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "shadowcdn_broker_request_duration_seconds",
                    "Request latency at the broker",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["reason"],
            )?,
            recorder_drops: IntCounter::new(
                "shadowcdn_broker_recorder_drops_total",
                "Request records dropped because the monitor queue was full",
            )?,
            recorder_long_keys: IntCounter::new(
                "shadowcdn_broker_recorder_long_keys_total",
                "Request records not kept because their resource and key together exceed 2 KiB",
            )?,
            recorder_starts_skipped: IntCounter::new(
                "shadowcdn_broker_recorder_starts_skipped_total",
                "Request starts not queued for co-access (monitor queue half full, or stopping): their records trigger the followers instead",
            )?,
            recorded: IntCounter::new(
                "shadowcdn_broker_recorded_total",
                "Request records aggregated by the monitor",
            )?,
            api_calls: IntCounterVec::new(
                Opts::new("shadowcdn_broker_api_calls_total", "Provider API calls"),
                &["provider", "status"],
            )?,
            edge_pushes: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_edge_pushes_total",
                    "Origin table and peer list pushes to edges",
                ),
                &["table", "outcome"],
            )?,
            edge_origin_table_refused: IntGaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_edge_origin_table_refused",
                    "1 while the edge refuses the origin table (not busy: it would refuse it again), or takes it but applies none of it, and routes by the one it last took; purges it missed wait for a table it takes",
                ),
                &["edge"],
            )?,
            edge_hosts_off: IntGaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_edge_hosts_off",
                    "Hosts not routed to the edge because its origin table routes them otherwise \
                     than the registry (rows it left out, or changed since a table it refuses)",
                ),
                &["edge"],
            )?,
            edge_rejected_origins: prometheus::IntGaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_edge_rejected_origins",
                    "Pushed origin rows the edge left out at the last push (name does not \
                     resolve, private address, duplicate)",
                ),
                &["edge"],
            )?,
            host_claims: prometheus::IntGauge::new(
                "shadowcdn_broker_host_claims",
                "Hosts providers claimed that await the operator's approval \
                 ([admin] approve_new_hosts)",
            )?,
            edge_pending_purges: prometheus::IntGaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_edge_pending_purges",
                    "Purges the edge missed and has not confirmed yet; it takes no traffic \
                     until it has",
                ),
                &["edge"],
            )?,
            purge_redeliveries: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_purge_redeliveries_total",
                    "Missed purges delivered again to an edge, by outcome (confirmed; widened: refused, its host purged whole instead; refused: that refused too, the edge stays held; failed: tried again later)",
                ),
                &["outcome"],
            )?,
            pending_purges_save_failures: prometheus::IntCounter::new(
                "shadowcdn_broker_pending_purges_save_failures_total",
                "Writes of the pending-purge queues to disk that failed",
            )?,
            taken_tables_save_failures: prometheus::IntCounter::new(
                "shadowcdn_broker_taken_tables_save_failures_total",
                "Writes to disk of the origin tables the edges took that failed",
            )?,
            planner_decisions: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_planner_decisions_total",
                    "Shadow planner decisions",
                ),
                &["outcome"],
            )?,
            shadows_issued: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_shadows_issued_total",
                    "Shadow commands sent to edges",
                ),
                &["outcome"],
            )?,
            event_propagation: prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "shadowcdn_broker_event_propagation_seconds",
                    "Time for a modification event to reach every edge",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["kind"],
            )?,
            planner_safety: prometheus::Gauge::new(
                "shadowcdn_broker_planner_safety_factor",
                "Safety factor applied to shadow budgets (1: confident forecasts)",
            )?,
            planner_tick: prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "shadowcdn_broker_planner_tick_seconds",
                    "Duration of a planning tick, forecast to the last order sent",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
            )?,
            shadow_spend: prometheus::CounterVec::new(
                Opts::new(
                    "shadowcdn_broker_shadow_spend_dollars_total",
                    "What settled shadows cost (USD), by the signal that placed them",
                ),
                // No provider label: with a thousand providers the series would run to a
                // million; GET /v1/cost has the per-provider roll-up.
                &["category", "region", "class", "source"],
            )?,
            shadow_savings: prometheus::CounterVec::new(
                Opts::new(
                    "shadowcdn_broker_shadow_savings_dollars_total",
                    "What settled shadows saved (USD), by the signal that placed them",
                ),
                &["category", "region", "class", "source"],
            )?,
            net_benefit: prometheus::GaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_shadow_net_benefit_dollars",
                    "Savings minus spend of settled shadows (USD)",
                ),
                &["region"],
            )?,
            shadow_precision: prometheus::GaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_shadow_precision",
                    "Shadowed bytes that served a request before expiry / shadowed bytes",
                ),
                &["region"],
            )?,
            shadow_recall: prometheus::Gauge::new(
                "shadowcdn_broker_shadow_recall",
                "Requests that found a shadow first / (those + requests that missed: every MISS, a \
                 repeat after an eviction included; EXPIRED refetches not counted)",
            )?,
            shadows_lost: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_shadows_lost_total",
                    "Shadow orders whose edge process ended without a graceful stop, so their \
                     outcome never came: priced as filled and unused",
                ),
                &["region"],
            )?,
            threshold: prometheus::GaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_shadow_threshold",
                    "Confidence threshold in force, per signal that has one",
                ),
                &["region", "class", "source"],
            )?,
            threshold_changes: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_shadow_threshold_changes_total",
                    "Threshold moves by the cost tuner",
                ),
                &["region", "class", "source", "direction"],
            )?,
            tls_cert_expiry: IntGaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_tls_cert_expiry_timestamp_seconds",
                    "End of validity of each HTTPS certificate in use (Unix seconds)",
                ),
                &["file"],
            )?,
            anomalies: IntGaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_anomalous_series",
                    "Series outside their forecast band for a sustained interval",
                ),
                &["kind"],
            )?,
            anomaly_events: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_anomaly_events_total",
                    "Series entering a standing (surge, drop, normal)",
                ),
                &["kind"],
            )?,
            coaccess_shadows: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_coaccess_shadows_total",
                    "Shadows of likely followers of a requested resource",
                ),
                &["outcome"],
            )?,
            coaccess_followers: prometheus::IntCounter::new(
                "shadowcdn_broker_coaccess_followers_total",
                "Followers of requested resources offered for a co-access shadow; each ends in one \
                 shadowcdn_broker_coaccess_shadows_total outcome",
            )?,
            coaccess_offers: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_coaccess_offers_total",
                    "Followers offered at a request, by the band of their uncalibrated P and whether the same client then asked for them within the window",
                ),
                &["band", "outcome"],
            )?,
            coaccess_pairs: prometheus::IntGauge::new(
                "shadowcdn_broker_coaccess_pairs",
                "Co-access (leader, follower) pairs kept",
            )?,
            coaccess_bytes: prometheus::IntGauge::new(
                "shadowcdn_broker_coaccess_bytes",
                "Bytes the co-access map is charged for its keys and entries (bounded by signals.coaccess.max_bytes)",
            )?,
            quic_connected: IntGaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_quic_connected",
                    "QUIC control connection to the edge (1 up, 0 down)",
                ),
                &["edge"],
            )?,
            quic_messages: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_quic_messages_total",
                    "QUIC control messages by type and outcome",
                ),
                &["type", "outcome"],
            )?,
            edge_stats: IntGaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_edge_stats",
                    "Counters each edge reported over QUIC",
                ),
                &["edge", "stat"],
            )?,
            edge_restarts: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_edge_restarts_total",
                    "Edge processes seen replacing another (a new boot id in the edge's stats); \
                     cache=emptied: the new or the old process had no disk tier, or the new one \
                     started with other content (a new cache id), so what it held is gone",
                ),
                &["edge", "cache"],
            )?,
            forecaster_fallback: prometheus::IntGauge::new(
                "shadowcdn_broker_forecaster_fallback",
                "1 while the seasonal-naive baseline answers in the model's place: no model could be \
                 loaded, or the last batch failed on it (windows without a request always get \
                 the baseline, and are not counted here)",
            )?,
            forecaster_events: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_forecaster_events_total",
                    "Model loads, rejected loads, failed batches and failed series of the forecaster",
                ),
                &["event"],
            )?,
            forecaster_series: IntGaugeVec::new(
                Opts::new(
                    "shadowcdn_broker_forecaster_series",
                    "Series each forecaster answered at the last planning tick: the model, or a \
                     baseline that has lately been clearly better on the series",
                ),
                &["answer"],
            )?,
            forecast_outcomes: IntCounterVec::new(
                Opts::new(
                    "shadowcdn_broker_forecast_outcomes_total",
                    "Forecasts scored after their horizon, by forecaster, whether the series \
                     was asked in the hour before, the band of the forecaster's own P(any \
                     request) and whether a request came",
                ),
                &["forecaster", "last_hour", "band", "outcome"],
            )?,
        };
        registry.register(Box::new(m.planner_decisions.clone()))?;
        registry.register(Box::new(m.shadows_issued.clone()))?;
        registry.register(Box::new(m.forecaster_fallback.clone()))?;
        registry.register(Box::new(m.forecaster_events.clone()))?;
        registry.register(Box::new(m.forecaster_series.clone()))?;
        registry.register(Box::new(m.forecast_outcomes.clone()))?;
        registry.register(Box::new(m.planner_safety.clone()))?;
        registry.register(Box::new(m.planner_tick.clone()))?;
        registry.register(Box::new(m.quic_connected.clone()))?;
        registry.register(Box::new(m.anomalies.clone()))?;
        registry.register(Box::new(m.tls_cert_expiry.clone()))?;
        registry.register(Box::new(m.anomaly_events.clone()))?;
        registry.register(Box::new(m.coaccess_shadows.clone()))?;
        registry.register(Box::new(m.coaccess_followers.clone()))?;
        registry.register(Box::new(m.coaccess_offers.clone()))?;
        registry.register(Box::new(m.coaccess_pairs.clone()))?;
        registry.register(Box::new(m.coaccess_bytes.clone()))?;
        registry.register(Box::new(m.shadow_spend.clone()))?;
        registry.register(Box::new(m.shadow_savings.clone()))?;
        registry.register(Box::new(m.net_benefit.clone()))?;
        registry.register(Box::new(m.shadow_precision.clone()))?;
        registry.register(Box::new(m.shadow_recall.clone()))?;
        registry.register(Box::new(m.shadows_lost.clone()))?;
        registry.register(Box::new(m.threshold.clone()))?;
        registry.register(Box::new(m.threshold_changes.clone()))?;
        registry.register(Box::new(m.quic_messages.clone()))?;
        registry.register(Box::new(m.edge_stats.clone()))?;
        registry.register(Box::new(m.edge_restarts.clone()))?;
        registry.register(Box::new(m.event_propagation.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.failovers.clone()))?;
        registry.register(Box::new(m.access_log_dropped.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.peer_hints.clone()))?;
        registry.register(Box::new(m.standby_promotions.clone()))?;
        registry.register(Box::new(m.edge_up.clone()))?;
        registry.register(Box::new(m.edge_origin_table_refused.clone()))?;
        registry.register(Box::new(m.edge_hosts_off.clone()))?;
        registry.register(Box::new(m.request_seconds.clone()))?;
        registry.register(Box::new(m.recorder_drops.clone()))?;
        registry.register(Box::new(m.recorder_long_keys.clone()))?;
        registry.register(Box::new(m.recorder_starts_skipped.clone()))?;
        registry.register(Box::new(m.recorded.clone()))?;
        registry.register(Box::new(m.api_calls.clone()))?;
        registry.register(Box::new(m.edge_pushes.clone()))?;
        registry.register(Box::new(m.edge_rejected_origins.clone()))?;
        registry.register(Box::new(m.host_claims.clone()))?;
        registry.register(Box::new(m.edge_pending_purges.clone()))?;
        registry.register(Box::new(m.purge_redeliveries.clone()))?;
        registry.register(Box::new(m.pending_purges_save_failures.clone()))?;
        registry.register(Box::new(m.taken_tables_save_failures.clone()))?;
        // The failures alerts watch exist at zero from the start: `increase()` over a series
        // that appears with its first failure reads that failure as no increase.
        for outcome in ["ok", "rejected", "unreachable"] {
            m.edge_pushes.with_label_values(&["origins", outcome]);
        }
        Ok(m)
    }
}
