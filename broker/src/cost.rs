//! What shadowing spends and what it earns, and the tuner that keeps it worth it.
//!
//! Every shadow order is remembered with who it was for (provider, region, priority class)
//! and how sure the forecast was. When the edge reports how the shadow ended (over QUIC,
//! [`ShadowOutcome`]), it is priced:
//!
//! - spend: the fill's transfer (origin egress, or inter-edge when a peer supplied it), the
//!   storage it occupied for as long as it was held, and a per-fill compute charge;
//! - savings: when a request found it, the origin fetch that request would otherwise have
//!   caused (origin egress) and the origin latency that user did not wait.
//!
//! A used shadow filled from the origin thus only earns its latency (the origin fetch moved
//! earlier, it did not disappear); a peer fill also saves the egress; a wasted shadow is pure
//! spend. The tuner moves the confidence threshold of each (region, priority class) to keep
//! the rolling net benefit positive: up when shadows lose money, down when they are
//! profitable with precision clearly above break-even (a quarter of the way from break-even
//! to perfect), so it settles where the marginal shadow just pays for itself. Every move is logged with its reason.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use edge_node::sync::protocol::ShadowOutcome;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::bounded::push_bounded;
use crate::metrics::BrokerMetrics;

/// `[cost]`: prices (USD) and tuner bounds. Defaults are public list prices, cited per field.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CostSection {
    /// Per GB sent by the origin: AWS data transfer out to the internet, first 10 TB/month,
    /// US regions, $0.09/GB (EC2 on-demand pricing page).
    #[serde(default = "default_egress")]
    pub origin_egress_per_gb: f64,
    /// Per GB between edges: AWS inter-region data transfer, $0.02/GB.
    #[serde(default = "default_inter_edge")]
    pub inter_edge_per_gb: f64,
    /// Per GB-hour of edge storage: EBS gp3 at $0.08/GB-month ÷ 730 hours.
    #[serde(default = "default_storage")]
    pub storage_per_gb_hour: f64,
    /// Per shadow fill (request handling): CloudFront HTTP requests, $0.0075 per 10,000.
    #[serde(default = "default_fill")]
    pub fill_cost: f64,
    /// Value of one second of user waiting avoided, per request. A business assumption, not a
    /// list price: the default, $0.00005, values a 100 ms saving at $5 per million requests.
    #[serde(default = "default_latency_value")]
    pub latency_value_per_sec: f64,
    /// Origin fetch time the first request of a shadow does not wait, in seconds.
    #[serde(default = "default_origin_latency")]
    pub origin_latency_secs: f64,
    /// Whether the tuner moves thresholds (off: the planner's threshold everywhere).
    #[serde(default = "default_true")]
    pub tune: bool,
    /// Lowest threshold the tuner may set.
    #[serde(default = "default_min_threshold")]
    pub min_threshold: f32,
    /// Highest threshold the tuner may set.
    #[serde(default = "default_max_threshold")]
    pub max_threshold: f32,
    /// Size of one threshold move.
    #[serde(default = "default_step")]
    pub step: f32,
}

impl Default for CostSection {
    fn default() -> Self {
        CostSection {
            origin_egress_per_gb: default_egress(),
            inter_edge_per_gb: default_inter_edge(),
            storage_per_gb_hour: default_storage(),
            fill_cost: default_fill(),
            latency_value_per_sec: default_latency_value(),
            origin_latency_secs: default_origin_latency(),
            tune: true,
            min_threshold: default_min_threshold(),
            max_threshold: default_max_threshold(),
            step: default_step(),
        }
    }
}

fn default_egress() -> f64 {
    0.09
}
fn default_inter_edge() -> f64 {
    0.02
}
fn default_storage() -> f64 {
    0.08 / 730.0
}
fn default_fill() -> f64 {
    0.0075 / 10_000.0
}
fn default_latency_value() -> f64 {
    0.000_05
}
fn default_origin_latency() -> f64 {
    0.1
}
fn default_true() -> bool {
    true
}
fn default_min_threshold() -> f32 {
    0.05
}
fn default_max_threshold() -> f32 {
    0.95
}
fn default_step() -> f32 {
    0.05
}

/// Priority classes the threshold is tuned for separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Priority 0–3.
    Low,
    /// Priority 4–6.
    Normal,
    /// Priority 7–10.
    High,
}

impl Class {
    /// The class of a provider priority.
    pub fn of(priority: u8) -> Class {
        match priority {
            0..=3 => Class::Low,
            4..=6 => Class::Normal,
            _ => Class::High,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Class::Low => "low",
            Class::Normal => "normal",
            Class::High => "high",
        }
    }
}

/// One shadow's money, in USD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Priced {
    /// Fill transfer from the origin.
    pub fill_origin: f64,
    /// Fill transfer from a peer edge.
    pub fill_peer: f64,
    /// Storage while held.
    pub storage: f64,
    /// Per-fill compute.
    pub compute: f64,
    /// Origin egress avoided.
    pub saved_egress: f64,
    /// Latency avoided, valued.
    pub saved_latency: f64,
}

impl Priced {
    /// Spend.
    pub fn spend(&self) -> f64 {
        self.fill_origin + self.fill_peer + self.storage + self.compute
    }

    /// Savings.
    pub fn savings(&self) -> f64 {
        self.saved_egress + self.saved_latency
    }

    /// Savings − spend.
    pub fn net(&self) -> f64 {
        self.savings() - self.spend()
    }

    fn add(&mut self, o: &Priced) {
        self.fill_origin += o.fill_origin;
        self.fill_peer += o.fill_peer;
        self.storage += o.storage;
        self.compute += o.compute;
        self.saved_egress += o.saved_egress;
        self.saved_latency += o.saved_latency;
    }
}

/// Price one ended shadow.
pub fn price(cfg: &CostSection, o: &ShadowOutcome) -> Priced {
    let gb = o.bytes as f64 / 1e9;
    let used = o.hits > 0;
    Priced {
        fill_origin: if o.peer_filled {
            0.0
        } else {
            gb * cfg.origin_egress_per_gb
        },
        fill_peer: if o.peer_filled {
            gb * cfg.inter_edge_per_gb
        } else {
            0.0
        },
        storage: gb * o.held_secs as f64 / 3600.0 * cfg.storage_per_gb_hour,
        compute: cfg.fill_cost,
        saved_egress: if used {
            gb * cfg.origin_egress_per_gb
        } else {
            0.0
        },
        saved_latency: if used {
            cfg.latency_value_per_sec * cfg.origin_latency_secs
        } else {
            0.0
        },
    }
}

/// What the planner knew when it ordered a shadow.
#[derive(Debug, Clone)]
pub struct OrderInfo {
    /// Owning provider (`-` for unregistered resources).
    pub provider: String,
    /// Region index.
    pub region: usize,
    /// Priority class.
    pub class: Class,
}

/// A threshold move and why.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// Seconds since the epoch.
    pub at: u64,
    /// Region.
    pub region: String,
    /// Priority class.
    pub class: Class,
    /// Threshold before.
    pub from: f32,
    /// Threshold after.
    pub to: f32,
    /// Why.
    pub reason: String,
}

/// Rolling state of one (region, class).
#[derive(Debug, Clone)]
struct Tuner {
    threshold: f32,
    /// Smoothed mean net benefit per settled shadow.
    net: Option<f64>,
    /// Smoothed precision (used / settled).
    precision: Option<f64>,
    /// Smoothed mean loss of a wasted shadow and gain of a used one (break-even inputs).
    wasted_loss: Option<f64>,
    used_gain: Option<f64>,
    /// Settled since the last tick: (count, used, net sum, wasted loss sum, used gain sum).
    pending: (u64, u64, f64, f64, f64),
    last_reason: Option<String>,
}

fn smooth(prev: Option<f64>, now: f64) -> f64 {
    prev.map_or(now, |p| 0.5 * p + 0.5 * now)
}

/// Totals of one (provider, region, class).
#[derive(Debug, Clone, Default, Serialize)]
struct Rollup {
    /// Orders whose fill failed on the edge (not counted in `shadows`, never priced).
    failed: u64,
    shadows: u64,
    used: u64,
    bytes: u64,
    used_bytes: u64,
    money: Priced,
}

/// The cost ledger and threshold tuner.
pub struct Ledger {
    cfg: CostSection,
    base_threshold: f32,
    regions: Vec<String>,
    orders: Mutex<HashMap<(String, usize), (OrderInfo, Instant)>>,
    tuners: Mutex<HashMap<(usize, Class), Tuner>>,
    rollups: Mutex<HashMap<(String, usize, Class), Rollup>>,
    changes: Mutex<VecDeque<Change>>,
    /// (key, edge) of shadows reported ended or failed since the planner last looked.
    ended: Mutex<VecDeque<(String, usize)>>,
    metrics: BrokerMetrics,
}

/// Threshold changes kept for the report.
const CHANGE_LOG: usize = 200;
/// Ended shadows kept for the planner between its ticks; beyond this the oldest go (the
/// planner then forgets them only when their TTL runs out).
const ENDED_LOG: usize = 100_000;

impl Ledger {
    /// A ledger starting every (region, class) at `base_threshold`.
    pub fn new(
        cfg: CostSection,
        base_threshold: f32,
        regions: Vec<String>,
        metrics: BrokerMetrics,
    ) -> Self {
        Ledger {
            cfg,
            base_threshold,
            regions,
            orders: Mutex::new(HashMap::new()),
            tuners: Mutex::new(HashMap::new()),
            rollups: Mutex::new(HashMap::new()),
            changes: Mutex::new(VecDeque::new()),
            ended: Mutex::new(VecDeque::new()),
            metrics,
        }
    }

    /// The shadows edges reported as ended (expired, evicted, unshadowed) or never filled
    /// since the last call, so the planner stops counting them as live.
    pub fn take_ended(&self) -> Vec<(String, usize)> {
        self.ended.lock().drain(..).collect()
    }

    fn tuner<'a>(
        &self,
        t: &'a mut HashMap<(usize, Class), Tuner>,
        region: usize,
        class: Class,
    ) -> &'a mut Tuner {
        t.entry((region, class)).or_insert_with(|| Tuner {
            threshold: self.base_threshold,
            net: None,
            precision: None,
            wasted_loss: None,
            used_gain: None,
            pending: (0, 0, 0.0, 0.0, 0.0),
            last_reason: None,
        })
    }

    /// The threshold in force for `region` and `priority`, and the reason of its last move.
    pub fn threshold(&self, region: usize, priority: u8) -> (f32, Option<String>) {
        let mut t = self.tuners.lock();
        let tuner = self.tuner(&mut t, region, Class::of(priority));
        (tuner.threshold, tuner.last_reason.clone())
    }

    /// Remember an order placed on `edge`, until its outcome arrives (or long after its TTL).
    pub fn record_order(&self, key: &str, edge: usize, info: OrderInfo, ttl: Duration) {
        let mut orders = self.orders.lock();
        let now = Instant::now();
        if orders.len() > 100_000 {
            orders.retain(|_, (_, until)| *until > now);
        }
        orders.insert(
            (key.to_string(), edge),
            (info, now + ttl + Duration::from_secs(600)),
        );
    }

    /// Price the shadows `edge` reports as ended; outcomes of orders we did not place (an
    /// operator's, or from before a broker restart) are priced as unattributed.
    pub fn settle(&self, edge: usize, outcomes: &[ShadowOutcome]) {
        if outcomes.is_empty() {
            return;
        }
        let mut ended = self.ended.lock();
        let mut orders = self.orders.lock();
        let mut tuners = self.tuners.lock();
        let mut rollups = self.rollups.lock();
        for o in outcomes {
            push_bounded(&mut ended, (o.key.clone(), edge), ENDED_LOG);
            let info = orders.remove(&(o.key.clone(), edge)).map(|(i, _)| i);
            if o.failed {
                // Nothing was held: no storage, no hits, and no evidence about the forecast.
                if let Some(i) = &info {
                    rollups
                        .entry((i.provider.clone(), i.region, i.class))
                        .or_default()
                        .failed += 1;
                }
                continue;
            }
            // Edges measure holding time on the wall; prices are per clock hour.
            let held = ShadowOutcome {
                held_secs: crate::clock::clock_secs(o.held_secs),
                ..o.clone()
            };
            let p = price(&self.cfg, &held);
            let (provider, region, class) = match &info {
                Some(i) => (i.provider.clone(), Some(i.region), i.class),
                None => ("-".to_string(), None, Class::Normal),
            };
            let region_label = region.map_or("-", |r| self.regions[r].as_str());
            let labels = [provider.as_str(), region_label, class.label()];
            for (category, v) in [
                ("fill_origin", p.fill_origin),
                ("fill_peer", p.fill_peer),
                ("storage", p.storage),
                ("compute", p.compute),
            ] {
                self.metrics
                    .shadow_spend
                    .with_label_values(&[category, labels[0], labels[1], labels[2]])
                    .inc_by(v);
            }
            for (category, v) in [("egress", p.saved_egress), ("latency", p.saved_latency)] {
                self.metrics
                    .shadow_savings
                    .with_label_values(&[category, labels[0], labels[1], labels[2]])
                    .inc_by(v);
            }
            let r = rollups
                .entry((provider.clone(), region.unwrap_or(usize::MAX), class))
                .or_default();
            r.shadows += 1;
            r.bytes += o.bytes;
            if o.hits > 0 {
                r.used += 1;
                r.used_bytes += o.bytes;
            }
            r.money.add(&p);
            if let Some(region) = region {
                let t = self.tuner(&mut tuners, region, class);
                t.pending.0 += 1;
                t.pending.2 += p.net();
                if o.hits > 0 {
                    t.pending.1 += 1;
                    t.pending.4 += p.net();
                } else {
                    t.pending.3 += -p.net();
                }
            }
        }
        drop(rollups);
        drop(tuners);
        drop(orders);
        drop(ended);
        self.publish();
    }

    fn publish(&self) {
        let rollups = self.rollups.lock();
        let mut by_region: HashMap<&str, (f64, u64, u64)> = HashMap::new();
        for ((_, region, _), r) in rollups.iter() {
            let name = self.regions.get(*region).map_or("-", |s| s.as_str());
            for key in [name, "all"] {
                let e = by_region.entry(key).or_default();
                e.0 += r.money.net();
                e.1 += r.bytes;
                e.2 += r.used_bytes;
            }
        }
        for (region, (net, bytes, used_bytes)) in by_region {
            self.metrics
                .net_benefit
                .with_label_values(&[region])
                .set(net);
            if bytes > 0 {
                self.metrics
                    .shadow_precision
                    .with_label_values(&[region])
                    .set(used_bytes as f64 / bytes as f64);
            }
        }
    }

    /// One tuning step per (region, class) that settled shadows since the last step.
    pub fn tune(&self, now_secs: u64) {
        let mut tuners = self.tuners.lock();
        let mut changes = Vec::new();
        for ((region, class), t) in tuners.iter_mut() {
            let (n, used, net_sum, loss_sum, gain_sum) = std::mem::take(&mut t.pending);
            if n > 0 {
                t.net = Some(smooth(t.net, net_sum / n as f64));
                t.precision = Some(smooth(t.precision, used as f64 / n as f64));
                if n > used {
                    t.wasted_loss = Some(smooth(t.wasted_loss, loss_sum / (n - used) as f64));
                }
                if used > 0 {
                    t.used_gain = Some(smooth(t.used_gain, gain_sum / used as f64));
                }
            }
            self.metrics
                .threshold
                .with_label_values(&[self.regions[*region].as_str(), class.label()])
                .set(f64::from(t.threshold));
            if !self.cfg.tune || n == 0 {
                continue;
            }
            let (Some(net), Some(precision)) = (t.net, t.precision) else {
                continue;
            };
            let loss = t.wasted_loss.unwrap_or(0.0).max(0.0);
            let gain = t.used_gain.unwrap_or(0.0);
            // Precision at which a shadow pays for itself on average.
            let break_even = if gain <= 0.0 {
                1.0
            } else {
                loss / (loss + gain)
            };
            let (to, reason) = if net < 0.0 {
                (
                    t.threshold + self.cfg.step,
                    format!(
                        "net ${net:.3e} per shadow < 0: precision {precision:.2} below break-even {break_even:.4}"
                    ),
                )
            } else if precision > break_even + 0.25 * (1.0 - break_even) {
                (
                    t.threshold - self.cfg.step,
                    format!(
                        "net ${net:.3e} per shadow > 0 with precision {precision:.2} above break-even {break_even:.4}: admit less certain forecasts"
                    ),
                )
            } else {
                continue;
            };
            let to = to.clamp(self.cfg.min_threshold, self.cfg.max_threshold);
            if (to - t.threshold).abs() < f32::EPSILON {
                continue;
            }
            let change = Change {
                at: now_secs,
                region: self.regions[*region].clone(),
                class: *class,
                from: t.threshold,
                to,
                reason,
            };
            tracing::info!(region = %change.region, class = class.label(), from = change.from, to, reason = %change.reason, "shadow threshold moved");
            self.metrics
                .threshold
                .with_label_values(&[change.region.as_str(), class.label()])
                .set(f64::from(to));
            self.metrics
                .threshold_changes
                .with_label_values(&[
                    change.region.as_str(),
                    class.label(),
                    if to > t.threshold { "up" } else { "down" },
                ])
                .inc();
            t.threshold = to;
            t.last_reason = Some(change.reason.clone());
            changes.push(change);
        }
        drop(tuners);
        let mut log = self.changes.lock();
        for c in changes {
            push_bounded(&mut log, c, CHANGE_LOG);
        }
    }

    /// The ledger as JSON for `GET /v1/cost`.
    pub fn report(&self) -> serde_json::Value {
        let region = |r: usize| self.regions.get(r).map_or("-", |s| s.as_str()).to_string();
        let mut rollups: Vec<serde_json::Value> = self
            .rollups
            .lock()
            .iter()
            .map(|((provider, r, class), v)| {
                serde_json::json!({
                    "provider": provider, "region": region(*r), "class": class,
                    "shadows": v.shadows, "failed": v.failed, "used": v.used, "bytes": v.bytes, "used_bytes": v.used_bytes,
                    "spend": v.money.spend(), "savings": v.money.savings(), "net": v.money.net(),
                    "detail": v.money,
                })
            })
            .collect();
        rollups.sort_by_key(|v| v.to_string());
        let mut thresholds: Vec<serde_json::Value> = self
            .tuners
            .lock()
            .iter()
            .map(|((r, class), t)| {
                serde_json::json!({
                    "region": region(*r), "class": class, "threshold": t.threshold,
                    "rolling_net_per_shadow": t.net, "rolling_precision": t.precision,
                    "last_reason": t.last_reason,
                })
            })
            .collect();
        thresholds.sort_by_key(|v| v.to_string());
        serde_json::json!({
            "prices": self.cfg,
            "rollups": rollups,
            "thresholds": thresholds,
            "changes": self.changes.lock().iter().collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(bytes: u64, hits: u64, peer: bool) -> ShadowOutcome {
        ShadowOutcome {
            key: "h/a".into(),
            bytes,
            hits,
            held_secs: 3600,
            peer_filled: peer,
            evicted: false,
            failed: false,
        }
    }

    #[test]
    fn pricing_follows_the_fill_source_and_use() {
        let cfg = CostSection::default();
        let gb = 1_000_000_000;
        let wasted = price(&cfg, &outcome(gb, 0, false));
        assert!((wasted.fill_origin - 0.09).abs() < 1e-12);
        assert_eq!(wasted.savings(), 0.0);
        assert!(wasted.net() < -0.09);
        // Used, origin-filled: the fetch moved earlier, only latency is earned.
        let used = price(&cfg, &outcome(gb, 3, false));
        assert!((used.saved_egress - used.fill_origin).abs() < 1e-12);
        assert!((used.net() - (used.saved_latency - used.storage - used.compute)).abs() < 1e-12);
        // Used, peer-filled: the origin egress is saved for the inter-edge price.
        let peer = price(&cfg, &outcome(gb, 1, true));
        assert!(peer.net() > 0.06, "{peer:?}");
    }

    fn ledger() -> Ledger {
        let reg = prometheus::Registry::new();
        Ledger::new(
            CostSection::default(),
            0.5,
            vec!["eu".into(), "us".into()],
            BrokerMetrics::register(&reg).unwrap(),
        )
    }

    fn settle_batch(l: &Ledger, used: usize, wasted: usize) {
        let info = OrderInfo {
            provider: "p".into(),
            region: 0,
            class: Class::Normal,
        };
        let mut outs = Vec::new();
        for i in 0..used + wasted {
            let key = format!("h/{i}");
            l.record_order(&key, 0, info.clone(), Duration::from_secs(60));
            let mut o = outcome(10_000_000, u64::from(i < used), false);
            o.key = key;
            outs.push(o);
        }
        l.settle(0, &outs);
    }

    #[test]
    fn losing_shadows_raise_the_threshold_and_winning_ones_lower_it_within_bounds() {
        let l = ledger();
        for tick in 0..3 {
            settle_batch(&l, 1, 9);
            l.tune(tick);
        }
        let (up, reason) = l.threshold(0, 5);
        assert!(up > 0.6, "{up}");
        assert!(reason.unwrap().contains("below break-even"));
        // A workload shift: now almost everything is used; the threshold comes back down.
        for tick in 3..30 {
            settle_batch(&l, 10, 0);
            l.tune(tick);
        }
        let (down, _) = l.threshold(0, 5);
        assert!(down < up, "{down} {up}");
        assert!(down >= CostSection::default().min_threshold);
        // Other classes and regions are untouched.
        assert_eq!(l.threshold(1, 5).0, 0.5);
        assert_eq!(l.threshold(0, 9).0, 0.5);
        let report = l.report();
        assert!(!report["changes"].as_array().unwrap().is_empty());
        assert_eq!(report["rollups"][0]["provider"], "p");
    }

    #[test]
    fn a_failed_fill_ends_the_order_unpriced_and_tells_the_planner() {
        let l = ledger();
        let info = OrderInfo {
            provider: "p".into(),
            region: 1,
            class: Class::Normal,
        };
        l.record_order("h/x", 1, info, Duration::from_secs(60));
        l.settle(1, &[ShadowOutcome::failed("h/x".into())]);
        assert_eq!(l.take_ended(), vec![("h/x".to_string(), 1)]);
        assert!(l.take_ended().is_empty());
        assert!(l.orders.lock().is_empty());
        let r = &l.report()["rollups"][0];
        assert_eq!(
            (r["failed"].as_u64(), r["shadows"].as_u64()),
            (Some(1), Some(0))
        );
        assert_eq!(r["spend"].as_f64(), Some(0.0));
        // No evidence about the forecast: the tuner has nothing to act on.
        l.tune(0);
        assert_eq!(l.threshold(1, 5), (0.5, None));
    }
}
