//! The shadow planner: every tick, forecast the monitored (resource, region) series, and
//! pre-position ("shadow") the resources whose demand is predicted on the edge that owns them
//! in that region, within each edge's shadow budget.
//!
//! Decision rule: shadow R in region G when P(any request in the next hour) ≥ the threshold
//! and the provider's policy allows G; candidates are ranked by expected benefit
//! `p50 × mean bytes × (1 + priority)` and admitted while the edge's budget lasts; the rest
//! are dropped least valuable first. Every decision, taken or not, is kept for
//! `GET /v1/shadows/explain`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use models::features::{History, DEFAULT_PRIORITY};
use models::reload::ReloadingForecaster;
use models::Forecaster;
use parking_lot::{Mutex, RwLock};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::{Deserialize, Serialize};

use crate::metrics::BrokerMetrics;
use crate::monitor::{now_secs, SeriesStore};
use crate::registry::Registry;
use crate::routing::{Fleet, Health};
use crate::sync::EdgeSync;

/// Bucket width the forecaster was trained on.
const FORECAST_BUCKET: u64 = 900;
/// History handed to the forecaster: 7 days.
const HISTORY_BUCKETS: usize = 7 * 96;

/// Planner settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerSection {
    /// Whether the planner runs.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds between planning ticks.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Minimum P(any request in the horizon) to shadow.
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// The ONNX model (its `.json` metadata beside it); the seasonal-naive baseline answers
    /// while it cannot be loaded.
    #[serde(default = "default_model")]
    pub model: std::path::PathBuf,
    /// Shadow bytes each edge may hold.
    #[serde(default = "default_budget")]
    pub budget_bytes_per_edge: u64,
    /// Shadow TTL for resources no provider registered.
    #[serde(default = "default_ttl")]
    pub default_ttl_secs: u64,
}

impl Default for PlannerSection {
    fn default() -> Self {
        PlannerSection {
            enabled: true,
            interval_secs: default_interval(),
            threshold: default_threshold(),
            model: default_model(),
            budget_bytes_per_edge: default_budget(),
            default_ttl_secs: default_ttl(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_interval() -> u64 {
    60
}
fn default_threshold() -> f32 {
    0.5
}
fn default_model() -> std::path::PathBuf {
    "models/lstm.onnx".into()
}
fn default_budget() -> u64 {
    256 * 1024 * 1024
}
fn default_ttl() -> u64 {
    1800
}

/// Why a candidate was or was not shadowed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decision {
    /// Region of the forecast.
    pub region: String,
    /// Forecaster that produced it.
    pub forecaster: String,
    /// Predicted requests in the next hour at 0.1/0.5/0.9.
    pub quantiles: [f32; 3],
    /// P(any request in the next hour).
    pub p_any: f32,
    /// Threshold in force.
    pub threshold: f32,
    /// Expected benefit used for ranking.
    pub benefit: f64,
    /// Target edge, if the region has a usable one.
    pub edge: Option<String>,
    /// `shadowed`, `kept` (already shadowed), `below_threshold`, `policy`, `budget`,
    /// `no_edge`, `send_failed`.
    pub outcome: &'static str,
    /// Seconds since the epoch of the tick.
    pub at: u64,
}

struct Candidate {
    key: String,
    region: String,
    region_idx: usize,
    counts: Vec<u32>,
    priority: u8,
    bytes: u64,
    ttl: u64,
    allowed: bool,
}

/// The verdict on one candidate.
#[derive(Debug, Clone, PartialEq)]
struct Verdict {
    candidate: usize,
    benefit: f64,
    edge: Option<usize>,
    outcome: &'static str,
}

/// The decision rule, free of I/O: rank candidates by expected benefit, then admit them in
/// that order while each edge's byte budget lasts (so the least valuable are dropped first).
fn decide(
    cands: &[Candidate],
    forecasts: &[models::Forecast],
    edge_of: impl Fn(&Candidate) -> Option<usize>,
    is_live: impl Fn(&str, usize) -> bool,
    threshold: f32,
    budget: u64,
) -> Vec<Verdict> {
    let mut ranked: Vec<(usize, f64)> = forecasts
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let c = &cands[i];
            let demand = f64::from(f.p50().max(f.p_any));
            (i, demand * c.bytes as f64 * (1.0 + f64::from(c.priority)))
        })
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut used: HashMap<usize, u64> = HashMap::new();
    ranked
        .into_iter()
        .map(|(i, benefit)| {
            let (c, f) = (&cands[i], &forecasts[i]);
            let edge = edge_of(c);
            let outcome = if f.p_any < threshold {
                "below_threshold"
            } else if !c.allowed {
                "policy"
            } else if let Some(e) = edge {
                if is_live(&c.key, e) {
                    "kept"
                } else if used.get(&e).copied().unwrap_or(0) + c.bytes > budget {
                    "budget"
                } else {
                    *used.entry(e).or_default() += c.bytes;
                    "shadowed"
                }
            } else {
                "no_edge"
            };
            Verdict {
                candidate: i,
                benefit,
                edge,
                outcome,
            }
        })
        .collect()
}

/// Planner state shared with the explain endpoint.
#[derive(Default)]
pub struct PlannerState {
    decisions: RwLock<HashMap<String, Vec<Decision>>>,
    /// (key, edge) → when our shadow there expires.
    live: Mutex<HashMap<(String, usize), Instant>>,
}

impl PlannerState {
    /// Forget the shadows of `key`, or of every key under `prefix*`, after a purge removed
    /// them from the edges, so the next tick may place them again.
    pub fn forget(&self, target: &str) {
        let mut live = self.live.lock();
        match target.strip_suffix('*') {
            Some(prefix) => live.retain(|(k, _), _| !k.starts_with(prefix)),
            None => live.retain(|(k, _), _| k != target),
        }
    }

    /// Edges holding a live shadow of `key`.
    pub fn live_edges(&self, key: &str) -> Vec<usize> {
        let now = Instant::now();
        self.live
            .lock()
            .iter()
            .filter(|((k, _), exp)| k == key && **exp > now)
            .map(|((_, e), _)| *e)
            .collect()
    }

    /// Record a shadow placed outside the planner's tick (modification events).
    pub fn record(&self, key: &str, edge: usize, ttl: Duration) {
        self.live
            .lock()
            .insert((key.to_string(), edge), Instant::now() + ttl);
    }

    /// The latest decisions about `key` (`host/path`).
    pub fn explain(&self, key: &str) -> Option<Vec<Decision>> {
        self.decisions.read().get(key).cloned()
    }
}

/// The planner background service.
pub struct Planner {
    cfg: PlannerSection,
    fleet: Arc<Fleet>,
    health: Arc<Health>,
    registry: Arc<Registry>,
    series: Arc<RwLock<SeriesStore>>,
    sync: Arc<EdgeSync>,
    state: Arc<PlannerState>,
    metrics: BrokerMetrics,
}

impl Planner {
    /// Assemble the planner.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: PlannerSection,
        fleet: Arc<Fleet>,
        health: Arc<Health>,
        registry: Arc<Registry>,
        series: Arc<RwLock<SeriesStore>>,
        sync: Arc<EdgeSync>,
        state: Arc<PlannerState>,
        metrics: BrokerMetrics,
    ) -> Self {
        Planner {
            cfg,
            fleet,
            health,
            registry,
            series,
            sync,
            state,
            metrics,
        }
    }

    fn candidates(&self, now: u64) -> Vec<Candidate> {
        let store = self.series.read();
        let mut out = Vec::new();
        for (resource, region, s) in store.iter() {
            let Some(region_idx) = self.fleet.region_index(region) else {
                continue;
            };
            let counts = s.counts(FORECAST_BUCKET, HISTORY_BUCKETS, now);
            if counts.iter().all(|c| *c == 0) {
                continue;
            }
            let (host, path) = resource
                .split_once('/')
                .map_or((resource, ""), |(h, p)| (h, p));
            let reg = self.registry.resource_for(host, &format!("/{path}"));
            let allowed = reg.as_ref().is_none_or(|r| {
                r.policy.allowed_regions.is_empty()
                    || r.policy.allowed_regions.iter().any(|x| x == region)
            });
            out.push(Candidate {
                key: resource.to_string(),
                region: region.to_string(),
                region_idx,
                counts,
                priority: reg.as_ref().map_or(DEFAULT_PRIORITY, |r| r.priority),
                bytes: s.mean_bytes().unwrap_or(0).max(1),
                ttl: reg
                    .as_ref()
                    .map_or(self.cfg.default_ttl_secs, |r| r.shadow_ttl_secs),
                allowed,
            });
        }
        out
    }

    async fn tick(&self, forecaster: &Arc<ReloadingForecaster>) {
        let now = now_secs();
        let cands = self.candidates(now);
        if cands.is_empty() {
            return;
        }
        let last = (now - now % FORECAST_BUCKET) as i64;
        // Inference is CPU work: keep it off the async workers.
        let fc = forecaster.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let hs: Vec<History<'_>> = cands
                .iter()
                .map(|c| History {
                    counts: &c.counts,
                    last_bucket_start: last,
                    bucket_secs: FORECAST_BUCKET as i64,
                    priority: c.priority,
                })
                .collect();
            let forecasts = fc.forecast(&hs);
            (cands, forecasts, fc.name().to_string())
        })
        .await;
        let (cands, forecasts, name) = match joined {
            Ok((c, Ok(f), n)) => (c, f, n),
            Ok((_, Err(e), _)) => {
                tracing::warn!(error = %e, "planner forecast failed");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "planner forecast task failed");
                return;
            }
        };
        let mut live = self.state.live.lock().clone();
        let tick_now = Instant::now();
        live.retain(|_, exp| *exp > tick_now);
        let verdicts = decide(
            &cands,
            &forecasts,
            |c| {
                self.fleet
                    .edge_in_region(&c.key, c.region_idx, &self.health)
            },
            |key, e| live.contains_key(&(key.to_string(), e)),
            self.cfg.threshold,
            self.cfg.budget_bytes_per_edge,
        );
        let mut decisions: HashMap<String, Vec<Decision>> = HashMap::new();
        let mut sends = Vec::new();
        for v in verdicts {
            let (c, f) = (&cands[v.candidate], forecasts[v.candidate]);
            if v.outcome == "shadowed" {
                if let Some(e) = v.edge {
                    sends.push((c.key.clone(), e, c.ttl, c.priority));
                }
            }
            self.metrics
                .planner_decisions
                .with_label_values(&[v.outcome])
                .inc();
            decisions.entry(c.key.clone()).or_default().push(Decision {
                region: c.region.clone(),
                forecaster: name.clone(),
                quantiles: f.quantiles,
                p_any: f.p_any,
                threshold: self.cfg.threshold,
                benefit: v.benefit,
                edge: v.edge.map(|e| self.fleet.edges[e].id.clone()),
                outcome: v.outcome,
                at: now,
            });
        }
        for (key, e, ttl, priority) in sends {
            let ok = self.sync.shadow(e, &key, ttl, priority).await;
            if ok {
                live.insert((key.clone(), e), tick_now + Duration::from_secs(ttl));
            } else if let Some(d) = decisions.get_mut(&key).and_then(|v| {
                v.iter_mut()
                    .find(|d| d.edge.as_deref() == Some(self.fleet.edges[e].id.as_str()))
            }) {
                d.outcome = "send_failed";
            }
            self.metrics
                .shadows_issued
                .with_label_values(&[if ok { "ok" } else { "failed" }])
                .inc();
        }
        *self.state.live.lock() = live;
        *self.state.decisions.write() = decisions;
    }
}

#[async_trait]
impl BackgroundService for Planner {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if !self.cfg.enabled {
            return;
        }
        let model = self.cfg.model.clone();
        let forecaster = match tokio::task::spawn_blocking(move || {
            ReloadingForecaster::new(&model, 1, Duration::from_secs(10))
        })
        .await
        {
            Ok(f) => Arc::new(f),
            Err(e) => {
                tracing::error!(error = %e, "planner could not start its forecaster");
                return;
            }
        };
        let status = forecaster.status();
        let mut tick = tokio::time::interval(Duration::from_secs(self.cfg.interval_secs.max(1)));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.metrics.forecaster_fallback.set(i64::from(
                status.fallback.load(std::sync::atomic::Ordering::Relaxed),
            ));
            self.tick(&forecaster).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use models::Forecast;

    fn cand(key: &str, bytes: u64, priority: u8, allowed: bool) -> Candidate {
        Candidate {
            key: key.into(),
            region: "eu".into(),
            region_idx: 0,
            counts: vec![1],
            priority,
            bytes,
            ttl: 60,
            allowed,
        }
    }

    fn fc(p50: f32, p_any: f32) -> Forecast {
        Forecast {
            quantiles: [0.0, p50, p50 * 2.0],
            p_any,
        }
    }

    #[test]
    fn budget_is_never_exceeded_and_least_valuable_are_dropped() {
        let cands = vec![
            cand("a", 600, 5, true),
            cand("b", 600, 9, true),
            cand("c", 300, 0, true),
            cand("d", 100, 5, true),
        ];
        let forecasts = vec![fc(10.0, 0.9), fc(10.0, 0.9), fc(1.0, 0.9), fc(1.0, 0.9)];
        let v = decide(&cands, &forecasts, |_| Some(0), |_, _| false, 0.5, 1000);
        let shadowed: Vec<&str> = v
            .iter()
            .filter(|v| v.outcome == "shadowed")
            .map(|v| cands[v.candidate].key.as_str())
            .collect();
        let bytes: u64 = v
            .iter()
            .filter(|v| v.outcome == "shadowed")
            .map(|v| cands[v.candidate].bytes)
            .sum();
        assert!(bytes <= 1000, "{bytes}");
        // Ranked b (priority 9) > a > d > c; a no longer fits after b; d and c still do.
        assert_eq!(shadowed, vec!["b", "d", "c"]);
        assert_eq!(
            v.iter()
                .find(|v| cands[v.candidate].key == "a")
                .unwrap()
                .outcome,
            "budget"
        );
    }

    #[test]
    fn threshold_policy_live_and_missing_edges() {
        let cands = vec![
            cand("low", 10, 5, true),
            cand("forbidden", 10, 5, false),
            cand("live", 10, 5, true),
            cand("orphan", 10, 5, true),
        ];
        let forecasts = vec![fc(1.0, 0.1), fc(1.0, 0.9), fc(1.0, 0.9), fc(1.0, 0.9)];
        let v = decide(
            &cands,
            &forecasts,
            |c| (c.key != "orphan").then_some(0),
            |k, _| k == "live",
            0.5,
            1 << 20,
        );
        let outcome = |k: &str| {
            v.iter()
                .find(|v| cands[v.candidate].key == k)
                .unwrap()
                .outcome
        };
        assert_eq!(outcome("low"), "below_threshold");
        assert_eq!(outcome("forbidden"), "policy");
        assert_eq!(outcome("live"), "kept");
        assert_eq!(outcome("orphan"), "no_edge");
    }
}
