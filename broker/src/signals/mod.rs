//! Demand signals besides the forecast: co-access (a request for A announces B) and
//! anomalies (a series leaving its forecast band).

pub mod anomaly;
pub mod calibration;
pub mod coaccess;

use std::sync::Arc;

use async_trait::async_trait;
use edge_node::drain::InflightCounter;
use edge_node::sync::protocol::{PeerRef, ShadowOrder};
use models::features::DEFAULT_PRIORITY;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::cost::{Class, Ledger, OrderInfo, Signal};
use crate::metrics::BrokerMetrics;
use crate::monitor::now_secs;
use crate::planner::{place_with, PlannerSection, PlannerState};
use crate::registry::Registry;
use crate::routing::{Fleet, Health, Holders};
use crate::sync::EdgeSync;

pub use anomaly::AnomalySection;
pub use coaccess::{CoAccess, CoAccessSection, Follower};

/// `[signals]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SignalsSection {
    /// Co-access shadowing.
    #[serde(default)]
    pub coaccess: CoAccessSection,
    /// Anomaly detection.
    #[serde(default)]
    pub anomaly: AnomalySection,
}

/// A request for `leader` in `region` whose followers should be on their edge.
#[derive(Debug)]
pub struct Trigger {
    /// Region index.
    pub region: usize,
    /// The requested resource.
    pub leader: String,
    /// Its likely followers.
    pub followers: Vec<Follower>,
}

/// Issues co-access shadows: each follower on the edge that owns it in the leader's region,
/// due at its typical gap, unless already shadowed there, larger than that edge's shadow
/// budget, the provider's policy forbids the region, its probability is below its break-even
/// odds (its origin fill against the latency a used copy saves, [`crate::cost::Stake`]) or
/// the byte-precision floor, or below the co-access threshold of that region and priority
/// class.
///
/// That threshold is co-access's own, tuned on the outcomes of co-access shadows alone (see
/// [`crate::cost`]): P(B follows A) and the forecast's P(any request in the hour) are
/// different measures, so holding a follower to the forecast threshold would gate it on a
/// number it is not comparable with, and its waste would move a threshold it does not use. It
/// starts at the weakest follower the learner offers (its `min_probability`), so co-access
/// places what it did untuned until its own outcomes say it wastes.
pub struct CoAccessService {
    rx: parking_lot::Mutex<Option<mpsc::Receiver<Trigger>>>,
    fleet: Arc<Fleet>,
    health: Arc<Health>,
    registry: Arc<Registry>,
    sync: Arc<EdgeSync>,
    planner: Arc<PlannerState>,
    ledger: Arc<Ledger>,
    planner_cfg: PlannerSection,
    metrics: BrokerMetrics,
    holders: Option<Arc<Holders>>,
    /// Work the shutdown drain waits for (a trigger's orders are sent whole).
    inflight: InflightCounter,
}

/// What [`CoAccessService`] acts with.
pub struct CoAccessParts {
    /// The fleet.
    pub fleet: Arc<Fleet>,
    /// Edge health.
    pub health: Arc<Health>,
    /// Resource policies.
    pub registry: Arc<Registry>,
    /// Orders to edges.
    pub sync: Arc<EdgeSync>,
    /// Live shadows.
    pub planner: Arc<PlannerState>,
    /// Cost attribution.
    pub ledger: Arc<Ledger>,
    /// The planner's settings: shadow TTL of unregistered resources, edge shadow budgets.
    pub planner_cfg: PlannerSection,
    /// The edges that served each key lately (`None`: demand peer fill is off): a follower
    /// one of them holds is filled from it, as a demand miss would be.
    pub holders: Option<Arc<Holders>>,
    /// Metrics.
    pub metrics: BrokerMetrics,
}

impl CoAccessService {
    /// The service, fed by the monitor through the other end of `rx`.
    pub fn new(parts: CoAccessParts, rx: mpsc::Receiver<Trigger>) -> Self {
        CoAccessService {
            rx: parking_lot::Mutex::new(Some(rx)),
            fleet: parts.fleet,
            health: parts.health,
            registry: parts.registry,
            sync: parts.sync,
            planner: parts.planner,
            ledger: parts.ledger,
            planner_cfg: parts.planner_cfg,
            metrics: parts.metrics,
            holders: parts.holders,
            inflight: InflightCounter::default(),
        }
    }

    /// Count each trigger's placement in `inflight`, so a graceful shutdown waits for it.
    pub fn counting_in(mut self, inflight: InflightCounter) -> Self {
        self.inflight = inflight;
        self
    }

    /// Another edge that served `key` lately and can supply it to `edge` over QUIC: the peer
    /// the broker would hint to `edge`'s own miss of it.
    fn holder_of(&self, key: &str, edge: usize) -> Option<PeerRef> {
        let holders = self.holders.as_ref()?;
        let (hash, host) = (Holders::key_of(key), crate::routing::host_of(key));
        let (fleet, health) = (&self.fleet, &self.health);
        let e = holders.hint(hash, host, edge, fleet, health, now_secs())?;
        Some(PeerRef {
            id: self.fleet.edges[e].id.clone(),
            addr: self.fleet.addresses.get(e).sync?,
        })
    }

    async fn handle(&self, t: Trigger) {
        for f in t.followers {
            let Some(edge) = self.fleet.edge_in_region(&f.key, t.region, &self.health) else {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["no_edge"])
                    .inc();
                continue;
            };
            let held = self.planner.live_edges(&f.key);
            if held.contains(&edge) {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["shadowed"])
                    .inc();
                continue;
            }
            // Its fills there failed lately (an uncacheable follower, say): ordering it again
            // on every visit of the leader would fetch it from the origin each time.
            if self
                .planner
                .backed_off(&f.key, edge, std::time::Instant::now())
            {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["fill_backoff"])
                    .inc();
                continue;
            }
            // A follower only ever answered without a body (304s, HEADs) has no size to price
            // its fill by or charge to the budget: no bet is placed on it.
            let Some(bytes) = f.bytes else {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["size_unknown"])
                    .inc();
                continue;
            };
            let budget = self.planner_cfg.edge_budget(&self.sync, edge);
            if crate::planner::footprint(bytes) > budget {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["too_large"])
                    .inc();
                continue;
            }
            let reg = self.registry.resource_for_key(&f.key);
            let region = &self.fleet.regions[t.region];
            if reg.as_ref().is_some_and(|r| {
                !r.policy.allowed_regions.is_empty() && !r.policy.allowed_regions.contains(region)
            }) {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["policy"])
                    .inc();
                continue;
            }
            if reg
                .as_ref()
                .is_some_and(|r| held.len() >= r.policy.max_copies as usize)
            {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["max_copies"])
                    .inc();
                continue;
            }
            let ttl = reg
                .as_ref()
                .map_or(self.planner_cfg.default_ttl_secs, |r| r.shadow_ttl_secs);
            let priority = reg.as_ref().map_or(DEFAULT_PRIORITY, |r| r.priority);
            // From an edge that served it lately, as the follower's own miss would be filled
            // (and priced so); else from the origin, where a large follower must be near
            // certain to follow before its fill pays for itself.
            let peer = self.holder_of(&f.key, edge);
            let stake = self.ledger.stake(bytes, peer.is_some(), ttl);
            if let Some(why) = self.ledger.odds(Some(&stake)).holds_back(f.probability) {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&[why])
                    .inc();
                continue;
            }
            let signal = Signal::coaccess(f.probability);
            if !self.ledger.admits(signal, t.region, priority) {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["below_threshold"])
                    .inc();
                continue;
            }
            // Within what the planner's shadows leave: placed over them, a follower would
            // make the next tick drop (and purge) a forecast shadow to make room.
            // A tick older than three intervals is stale: the planner is off or failing.
            let fresh_for =
                std::time::Duration::from_secs_f64(self.planner_cfg.interval_secs.max(0.05) * 3.0);
            let taken = crate::planner::footprint(bytes);
            let held = self.sync.shadow_bytes(edge);
            if !self
                .planner
                .take_budget(edge, taken, budget, fresh_for, held)
            {
                self.metrics
                    .coaccess_shadows
                    .with_label_values(&["budget"])
                    .inc();
                continue;
            }
            let order = ShadowOrder {
                key: f.key.clone(),
                ttl_secs: ttl,
                priority,
                deadline_ms: now_secs() * 1000 + (f.gap_secs * 1000.0) as u64,
                peer,
                refresh: false,
            };
            let info = OrderInfo {
                provider: reg.map_or_else(|| "-".to_string(), |r| r.provider),
                region: t.region,
                class: Class::of(priority),
                bytes,
            };
            let ok = place_with(
                &self.sync,
                &self.planner,
                &self.ledger,
                edge,
                order,
                info,
                signal,
            )
            .await;
            if !ok {
                self.planner.return_budget(edge, taken);
            }
            tracing::debug!(leader = %t.leader, follower = %f.key, p = f.probability, ok, "co-access shadow");
            self.metrics
                .coaccess_shadows
                .with_label_values(&[if ok { "ok" } else { "failed" }])
                .inc();
        }
    }
}

#[async_trait]
impl BackgroundService for CoAccessService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = self.rx.lock().take() else {
            return;
        };
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                t = rx.recv() => match t {
                    Some(t) => {
                        let Some(_busy) = self.inflight.enter_unless_shutdown(&shutdown) else {
                            return;
                        };
                        self.handle(t).await;
                    }
                    None => return,
                },
            }
        }
    }
}
