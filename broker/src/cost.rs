//! What shadowing spends and what it earns, and the tuners that keep it worth it.
//!
//! Every shadow order is remembered with who it was for (provider, region, priority class),
//! which signal placed it ([`Source`]: forecast, co-access, anomaly widening, a provider's
//! event, or adopted after a restart) and how strong that signal was (its score). When the
//! edge reports how the shadow ended (over QUIC, [`ShadowOutcome`]), it is priced:
//!
//! - spend: the fill's transfer (origin egress, or inter-edge when a peer supplied it), the
//!   storage it occupied for as long as it was held, and a per-fill compute charge;
//! - savings: when a request found it, the origin fetch that request would otherwise have
//!   caused (origin egress) and the origin latency that user did not wait.
//!
//! A used shadow filled from the origin thus only earns its latency (the origin fetch moved
//! earlier, it did not disappear); a peer fill also saves the egress; a wasted shadow is pure
//! spend.
//!
//! Each signal that is gated has its own threshold per (region, priority class), tuned on its
//! own settled outcomes (`tuner`): the forecast's gates the planner's P(any request), the
//! co-access one a follower's P(follows its leader), the anomaly one the P(any request) of the
//! region a surge would widen into. A source that wastes is thus held back without starving
//! the others, and the rollups say which one it was. Events and adopted shadows are not gated
//! (a provider asked, or an earlier broker decided); their outcomes count as evidence for the
//! region's forecast threshold, as they always have. Every move is logged with its reason.

mod config;
mod pricing;
mod tuner;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use edge_node::sync::protocol::ShadowOutcome;
use parking_lot::Mutex;
use serde::Serialize;

use crate::bounded::push_bounded;
use crate::metrics::BrokerMetrics;
use tuner::{Settled, Tuner};

pub use config::{CostSection, Fraction, NotAFraction};
pub use pricing::{price, Class, Odds, Priced, Stake};

/// What the planner knew when it ordered a shadow.
#[derive(Debug, Clone)]
pub struct OrderInfo {
    /// Owning provider (`-` for unregistered resources).
    pub provider: String,
    /// Region index.
    pub region: usize,
    /// Priority class.
    pub class: Class,
    /// The object's expected size in bytes (0: not known): what its order is priced at if
    /// the edge loses it unreported ([`Ledger::lost`]).
    pub bytes: u64,
}

/// The signal that placed a shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The planner's forecast; its score is P(any request in the horizon).
    Forecast,
    /// A co-access follower; its score is P(it follows its leader within the window).
    Coaccess,
    /// Anomaly widening into a region next to a surge; its score is that region's P(any
    /// request), 0 where it has no history.
    Anomaly,
    /// A provider's `created` event for high-priority content (shadowed at once, unscored).
    Event,
    /// Held by an edge from before this broker started (its signal is not known).
    Adopted,
    /// An outcome of no order of this broker's (an operator's, or settled before adoption).
    Unattributed,
}

impl Source {
    /// Every source, in report order.
    pub const ALL: [Source; 6] = [
        Source::Forecast,
        Source::Coaccess,
        Source::Anomaly,
        Source::Event,
        Source::Adopted,
        Source::Unattributed,
    ];

    /// Label for metrics, logs and the report.
    pub fn label(self) -> &'static str {
        match self {
            Source::Forecast => "forecast",
            Source::Coaccess => "coaccess",
            Source::Anomaly => "anomaly",
            Source::Event => "event",
            Source::Adopted => "adopted",
            Source::Unattributed => "unattributed",
        }
    }

    /// The source whose threshold this source's outcomes tune: a gated source its own.
    /// Ungated placements (events, adopted shadows, whose score is 1 and passes every
    /// threshold) tune none: a provider's events wasting would otherwise push the region's
    /// forecast threshold to its ceiling, holding back forecasts that were right.
    fn tuned(self) -> Option<Source> {
        match self {
            Source::Forecast | Source::Coaccess | Source::Anomaly => Some(self),
            Source::Event | Source::Adopted | Source::Unattributed => None,
        }
    }
}

/// Why a shadow was placed: its source and how strong that source's evidence was, in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Signal {
    /// The source.
    pub source: Source,
    /// Its score (1 for unscored placements, which every threshold admits).
    pub score: f32,
}

impl Signal {
    /// A provider's `created` event.
    pub const EVENT: Signal = Signal {
        source: Source::Event,
        score: 1.0,
    };
    /// A shadow adopted from an edge.
    pub const ADOPTED: Signal = Signal {
        source: Source::Adopted,
        score: 1.0,
    };

    /// A forecast with P(any request) `p_any`.
    pub fn forecast(p_any: f32) -> Signal {
        Signal {
            source: Source::Forecast,
            score: p_any,
        }
    }

    /// A co-access follower with P(follows) `probability`.
    pub fn coaccess(probability: f64) -> Signal {
        Signal {
            source: Source::Coaccess,
            score: probability as f32,
        }
    }

    /// A widening into a region whose P(any request) is `p_any`.
    pub fn anomaly(p_any: f32) -> Signal {
        Signal {
            source: Source::Anomaly,
            score: p_any,
        }
    }
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
    /// The signal whose threshold moved.
    pub source: Source,
    /// Threshold before.
    pub from: f32,
    /// Threshold after.
    pub to: f32,
    /// Why.
    pub reason: String,
}

/// Outcome totals a tuner judges by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Stats {
    shadows: u64,
    used: u64,
    bytes: u64,
    used_bytes: u64,
    /// Savings − spend, USD.
    net: f64,
    /// Spend, USD.
    spend: f64,
    /// −net summed over the wasted shadows.
    wasted_loss: f64,
    /// net summed over the used shadows.
    used_gain: f64,
}

impl Stats {
    fn of(settled: impl Iterator<Item = Settled>) -> Stats {
        settled.fold(Stats::default(), |mut s, o| {
            s.shadows += 1;
            s.bytes += o.bytes;
            s.net += o.net;
            s.spend += o.spend;
            if o.used {
                s.used += 1;
                s.used_bytes += o.bytes;
                s.used_gain += o.net;
            } else {
                s.wasted_loss -= o.net;
            }
            s
        })
    }

    /// Used / settled.
    fn precision(&self) -> f64 {
        self.used as f64 / self.shadows.max(1) as f64
    }

    /// Used bytes / settled bytes (1 when nothing was held).
    fn byte_precision(&self) -> f64 {
        if self.bytes == 0 {
            return 1.0;
        }
        self.used_bytes as f64 / self.bytes as f64
    }

    fn net_per_shadow(&self) -> f64 {
        self.net / self.shadows.max(1) as f64
    }

    /// Net / spend: the share of what shadowing cost that it earned back beyond its cost.
    fn return_on_spend(&self) -> f64 {
        if self.spend > 0.0 {
            self.net / self.spend
        } else {
            0.0
        }
    }

    /// Precision at which a shadow pays for itself on average: the mean loss of a wasted one
    /// against the mean gain of a used one.
    fn break_even(&self) -> f64 {
        let wasted = self.shadows - self.used;
        let loss = if wasted > 0 {
            (self.wasted_loss / wasted as f64).max(0.0)
        } else {
            0.0
        };
        let gain = if self.used > 0 {
            self.used_gain / self.used as f64
        } else {
            0.0
        };
        if gain <= 0.0 {
            1.0
        } else {
            loss / (loss + gain)
        }
    }
}

/// Totals of one (provider, region, class, source).
#[derive(Debug, Clone, Default, Serialize)]
struct Rollup {
    /// Orders whose fill failed on the edge (not counted in `shadows`, never priced).
    failed: u64,
    /// Orders for objects the edge already held (no bytes moved; not counted in `shadows`,
    /// never priced, not in precision).
    held_before: u64,
    /// Orders an edge process took with it ([`Ledger::lost`]); counted in `shadows` too, as
    /// unused.
    lost: u64,
    shadows: u64,
    used: u64,
    bytes: u64,
    used_bytes: u64,
    money: Priced,
}

impl Rollup {
    fn add(&mut self, o: &Rollup) {
        self.failed += o.failed;
        self.held_before += o.held_before;
        self.lost += o.lost;
        self.shadows += o.shadows;
        self.used += o.used;
        self.bytes += o.bytes;
        self.used_bytes += o.used_bytes;
        self.money.add(&o.money);
    }

    fn json(&self) -> serde_json::Value {
        let precision = (self.bytes > 0).then(|| self.used_bytes as f64 / self.bytes as f64);
        serde_json::json!({
            "shadows": self.shadows, "failed": self.failed, "already_held": self.held_before,
            "lost": self.lost,
            "used": self.used,
            "bytes": self.bytes, "used_bytes": self.used_bytes, "byte_precision": precision,
            "spend": self.money.spend(), "savings": self.money.savings(), "net": self.money.net(),
            "detail": self.money,
        })
    }
}

/// An order awaiting its outcome.
#[derive(Debug, Clone)]
struct Order {
    info: OrderInfo,
    signal: Signal,
    /// Forgotten after this even without an outcome.
    until: Instant,
    /// When it was placed, Unix milliseconds.
    placed_ms: u64,
    /// The edge process that accepted it (0: not told): its outcome comes from that one, or
    /// is lost with it ([`Ledger::lost`]).
    boot_id: u64,
    /// Its tuner's epoch then (0 for ungated placements).
    epoch: u64,
    /// Its name, which the edge echoes in the outcome ([`ShadowOutcome::order`]); `None`
    /// when it named none.
    id: Option<u64>,
    /// Names of the orders of this key and edge it replaced, latest last (at most
    /// [`RETIRED_NAMES`]): their outcomes may still arrive, so no new order takes them.
    retired: Vec<u64>,
    /// Its lifetime on the edge.
    ttl: Duration,
    /// It named a peer to fill from.
    peer: bool,
}

/// How an edge took an order ([`Ledger::record_order`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Accepted {
    /// The order named a peer to fill from.
    pub peer: bool,
    /// The edge process that accepted it (its stats' `boot_id`; 0 when not told).
    pub boot_id: u64,
}

/// How many replaced orders' names an order remembers. A replaced order's shadow is
/// renamed or ended by the edge at once, so only outcomes already on their way carry an
/// old name; a few replacements cover them.
const RETIRED_NAMES: usize = 4;

impl Order {
    /// The names a new order of its key must not take: its own and those it retired.
    fn names(&self) -> Vec<u64> {
        let mut names = self.retired.clone();
        names.extend(self.id);
        let excess = names.len().saturating_sub(RETIRED_NAMES);
        names.drain(..excess);
        names
    }
}

/// The names of settled orders (see [`Order::names`]), kept until a late outcome of theirs or
/// of an order they replaced can no longer arrive, for the next order of their key.
#[derive(Default)]
struct SettledNames {
    by: HashMap<(String, usize), (Vec<u64>, Instant)>,
    /// Entries at which [`Self::keep`] next sweeps expired ones.
    sweep_at: usize,
}

impl SettledNames {
    fn keep(&mut self, k: (String, usize), order: &Order, now: Instant) {
        let names = order.names();
        if names.is_empty() {
            return;
        }
        if self.by.len() > self.sweep_at.max(ORDER_SWEEP) {
            self.by.retain(|_, (_, until)| *until > now);
            self.sweep_at = self.by.len() * 2;
        }
        self.by.insert(k, (names, order.until));
    }

    /// The names kept for `k`, now handed to its new order.
    fn take(&mut self, k: &(String, usize), now: Instant) -> Vec<u64> {
        self.by
            .remove(k)
            .filter(|(_, until)| *until > now)
            .map(|(names, _)| names)
            .unwrap_or_default()
    }

    fn taken(&self, k: &(String, usize), id: u64) -> bool {
        self.by.get(k).is_some_and(|(names, _)| names.contains(&id))
    }
}

/// How far an edge's clock may run behind the broker's before an outcome that ended just
/// after an order was placed reads as older than it.
const CLOCK_SLACK_MS: u64 = 1_000;

/// Open orders that a newer order of their key and edge replaced after the edge restarted
/// ([`Ledger::record_order`]), until their outcome comes, their process is told lost, or long
/// after their TTL.
#[derive(Default)]
struct Superseded {
    by: HashMap<(String, usize), Vec<Order>>,
    /// Entries at which [`Self::keep`] next sweeps expired ones.
    sweep_at: usize,
}

impl Superseded {
    fn keep(&mut self, k: (String, usize), order: Order, now: Instant) {
        // Swept when it has doubled since the last sweep, as the open orders are.
        if self.by.len() > self.sweep_at.max(ORDER_SWEEP) {
            self.by.retain(|_, held| {
                held.retain(|o| o.until > now);
                !held.is_empty()
            });
            self.sweep_at = self.by.len() * 2;
        }
        self.by.entry(k).or_default().push(order);
    }

    /// The order of `k` named `name`, taken.
    fn take(&mut self, k: &(String, usize), name: u64) -> Option<Order> {
        let held = self.by.get_mut(k)?;
        let i = held.iter().position(|o| o.id == Some(name))?;
        let order = held.swap_remove(i);
        if held.is_empty() {
            self.by.remove(k);
        }
        Some(order)
    }

    /// Every order of `edge` that process `boot_id` accepted, taken.
    fn take_accepted_by(&mut self, edge: usize, boot_id: u64) -> Vec<((String, usize), Order)> {
        let mut taken = Vec::new();
        self.by.retain(|k, held| {
            if k.1 == edge {
                for o in held.extract_if(.., |o| o.boot_id == boot_id) {
                    taken.push((k.clone(), o));
                }
            }
            !held.is_empty()
        });
        taken
    }
}

/// Tuners by (region, class, tuned source), and the weakest score each source offered.
#[derive(Default)]
struct Tuners {
    by: HashMap<(usize, Class, Source), Tuner>,
    weakest: HashMap<Source, f32>,
}

/// The cost ledger and threshold tuners.
pub struct Ledger {
    cfg: CostSection,
    base_threshold: f32,
    regions: Vec<String>,
    orders: Mutex<HashMap<(String, usize), Order>>,
    /// Orders at which [`Ledger::record_order`] next sweeps expired ones.
    orders_sweep_at: Mutex<usize>,
    /// Names of orders settled lately, which the next order of their key avoids.
    settled_names: Mutex<SettledNames>,
    /// Open orders a newer one of their key replaced after the edge restarted (another
    /// process accepted it): their outcomes may still come, or their process be told lost.
    superseded: Mutex<Superseded>,
    /// Named outcomes that came before their order was recorded (a fill that failed at once
    /// can be reported by a stats poll before the reply accepting its order is handled),
    /// with when they came: [`Ledger::record_order`] settles its order with one at once;
    /// after [`EARLY_WAIT`] one is priced unattributed.
    early: Mutex<Early>,
    tuners: Mutex<Tuners>,
    rollups: Mutex<HashMap<(String, usize, Class, Source), Rollup>>,
    changes: Mutex<VecDeque<Change>>,
    /// Shadows reported ended or failed since the planner last looked.
    ended: Mutex<VecDeque<Ended>>,
    metrics: BrokerMetrics,
}

/// A shadow an edge reported as ended, or as never filled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Cache key.
    pub key: String,
    /// Edge index.
    pub edge: usize,
    /// The fill failed: the edge holds nothing for it.
    pub failed: bool,
}

impl Ended {
    /// The end `edge` reported in `o`.
    fn of(o: &ShadowOutcome, edge: usize) -> Ended {
        Ended {
            key: o.key.clone(),
            edge,
            // A fill a purge or unshadow overtook did not fail.
            failed: o.failed && !o.removed,
        }
    }
}

/// Threshold changes kept for the report.
const CHANGE_LOG: usize = 200;
/// Ended shadows kept for the planner between its ticks; beyond this the oldest go (the
/// planner then forgets them only when their TTL runs out).
const ENDED_LOG: usize = 100_000;
/// Orders awaiting an outcome before expired ones are swept.
const ORDER_SWEEP: usize = 100_000;
/// Outcomes waiting for their orders ([`Ledger::early`]), by (key, edge), and how many.
#[derive(Default)]
struct Early {
    by_key: HashMap<(String, usize), Vec<(ShadowOutcome, Instant)>>,
    count: usize,
}

impl Early {
    /// Keep `o` for its order; whether there was room.
    fn keep(&mut self, k: (String, usize), o: ShadowOutcome, now: Instant) -> bool {
        if self.count >= MAX_EARLY {
            return false;
        }
        self.by_key.entry(k).or_default().push((o, now));
        self.count += 1;
        true
    }

    /// The outcome of `k` that names order `name`, taken out.
    fn take(&mut self, k: &(String, usize), name: u64) -> Option<ShadowOutcome> {
        let waiting = self.by_key.get_mut(k)?;
        let i = waiting.iter().position(|(o, _)| o.order == Some(name))?;
        let (o, _) = waiting.swap_remove(i);
        if waiting.is_empty() {
            self.by_key.remove(k);
        }
        self.count -= 1;
        Some(o)
    }

    /// Every outcome that waited `wait` or longer, taken out.
    fn overdue(&mut self, wait: Duration) -> Vec<((String, usize), ShadowOutcome)> {
        let mut out = Vec::new();
        self.by_key.retain(|k, waiting| {
            for (o, _) in waiting.extract_if(.., |(_, at)| at.elapsed() >= wait) {
                out.push((k.clone(), o));
            }
            !waiting.is_empty()
        });
        self.count -= out.len();
        out
    }
}

/// How long an outcome waits for its order to be recorded ([`Ledger::early`]): far longer
/// than an order's reply takes to be handled.
const EARLY_WAIT: Duration = Duration::from_secs(30);
/// Outcomes that may wait so at once; past it they are priced unattributed at once.
const MAX_EARLY: usize = 4096;

impl Ledger {
    /// A ledger starting every (region, class) forecast threshold at `base_threshold`.
    pub fn new(
        cfg: CostSection,
        base_threshold: f32,
        regions: Vec<String>,
        metrics: BrokerMetrics,
    ) -> Self {
        // Exported at zero from the start: `increase()` over a series that appears with its
        // first loss reads that loss as none.
        for region in &regions {
            metrics.shadows_lost.with_label_values(&[region]);
        }
        Ledger {
            cfg,
            base_threshold,
            regions,
            orders: Mutex::new(HashMap::new()),
            orders_sweep_at: Mutex::new(0),
            settled_names: Mutex::default(),
            superseded: Mutex::default(),
            early: Mutex::default(),
            tuners: Mutex::new(Tuners::default()),
            rollups: Mutex::new(HashMap::new()),
            changes: Mutex::new(VecDeque::new()),
            ended: Mutex::new(VecDeque::new()),
            metrics,
        }
    }

    /// `source` offers no score below `lowest` (co-access: its own `min_probability`;
    /// anomalies: 0): its tuners start there, not at the first score offered, which may be
    /// far above it and would hold back everything between until outcomes arrived.
    pub fn offering_from(self, source: Source, lowest: f32) -> Self {
        self.tuners.lock().weakest.insert(source, lowest);
        self
    }

    /// The shadows edges reported as ended (expired, evicted, unshadowed) or never filled
    /// since the last call, so the planner stops counting them as live.
    pub fn take_ended(&self) -> Vec<Ended> {
        self.ended.lock().drain(..).collect()
    }

    /// Lowest threshold of a source's tuners: `min_threshold`, or the weakest score the source
    /// offered when that is higher, or the byte-precision floor its placements are held to
    /// (forecasts and co-access: [`Self::odds`]). Co-access only offers followers above its
    /// own `min_probability`; a threshold below either would admit nothing more, show a bar
    /// that is not the one in force, and only delay the next rise.
    fn lower(&self, t: &Tuners, source: Source) -> f32 {
        let floor = match source {
            Source::Forecast | Source::Coaccess => self.cfg.min_precision.get() as f32,
            _ => 0.0,
        };
        t.weakest
            .get(&source)
            .map_or(self.cfg.min_threshold, |w| w.max(self.cfg.min_threshold))
            .max(floor)
    }

    /// The tuner of (region, class, source), created at the source's start: the planner's
    /// threshold for forecasts; the lower bound for co-access and anomalies, so they place what
    /// they did before tuning until their own outcomes say otherwise.
    fn tuner<'a>(
        &self,
        t: &'a mut Tuners,
        region: usize,
        class: Class,
        source: Source,
    ) -> &'a mut Tuner {
        let lower = self.lower(t, source);
        let start = match source {
            Source::Forecast => self.base_threshold,
            _ => lower,
        };
        let tuner =
            t.by.entry((region, class, source))
                .or_insert_with(|| Tuner::new(start, &self.cfg));
        tuner.threshold = tuner.threshold.max(lower).min(self.cfg.max_threshold);
        tuner
    }

    /// The forecast threshold in force for `region` and `priority`, and the reason of its last
    /// move.
    pub fn threshold(&self, region: usize, priority: u8) -> (f32, Option<String>) {
        self.threshold_for(Source::Forecast, region, priority)
    }

    /// The threshold in force for `source`'s placements in `region` at `priority`, and the
    /// reason of its last move. Ungated sources answer with the forecast threshold.
    pub fn threshold_for(
        &self,
        source: Source,
        region: usize,
        priority: u8,
    ) -> (f32, Option<String>) {
        let mut t = self.tuners.lock();
        let gated = source.tuned().unwrap_or(Source::Forecast);
        let tuner = self.tuner(&mut t, region, Class::of(priority), gated);
        (tuner.threshold, tuner.last_reason.clone())
    }

    /// What a shadow of `bytes`, held `ttl_secs` and filled from a peer or the origin, stands
    /// to earn or lose at this ledger's prices.
    pub fn stake(&self, bytes: u64, peer_filled: bool, ttl_secs: u64) -> Stake {
        Stake::of(&self.cfg, bytes, peer_filled, ttl_secs)
    }

    /// The odds a placement with `stake` (`None`: its size is unknown) must reach on its own:
    /// its break-even probability, unless `break_even_gate` is off, and the byte-precision
    /// floor.
    pub fn odds(&self, stake: Option<&Stake>) -> Odds {
        let break_even = match stake {
            Some(s) if self.cfg.break_even_gate => s.break_even(),
            _ => 0.0,
        };
        Odds {
            break_even,
            floor: self.cfg.min_precision.get() as f32,
        }
    }

    /// Whether `signal` clears its source's threshold in `region` at `priority`. Co-access and
    /// anomaly placements ask before ordering: each is held to the evidence of its own
    /// outcomes. Remembers the weakest score each source offers (its lower bound).
    pub fn admits(&self, signal: Signal, region: usize, priority: u8) -> bool {
        let mut t = self.tuners.lock();
        let weakest = t.weakest.entry(signal.source).or_insert(signal.score);
        *weakest = weakest.min(signal.score);
        let Some(gated) = signal.source.tuned() else {
            // Ungated: events and adopted shadows are placed whatever the thresholds.
            return true;
        };
        let tuner = self.tuner(&mut t, region, Class::of(priority), gated);
        !self.cfg.tune || signal.score >= tuner.threshold
    }

    /// Remember an order placed on `edge` by `signal` at `placed_ms` (Unix ms, taken before
    /// it was sent: the edge may end the shadow, a failed fill say, before it answers) and
    /// named `id` ([`Self::order_id`]) and `accepted` as it says, until its outcome arrives
    /// (or long after its TTL). A placement of a gated source tells its tuner it still admits
    /// (see `Tuner::admitted`). An order it replaces that another process of the edge
    /// accepted is kept aside: that process may be told lost later ([`Self::lost`]), or its
    /// outcome come from the next one.
    #[allow(clippy::too_many_arguments)]
    pub fn record_order(
        &self,
        key: &str,
        edge: usize,
        info: OrderInfo,
        signal: Signal,
        ttl: Duration,
        placed_ms: u64,
        id: Option<u64>,
        accepted: Accepted,
    ) {
        let epoch = signal.source.tuned().map_or(0, |source| {
            let mut t = self.tuners.lock();
            let tuner = self.tuner(&mut t, info.region, info.class, source);
            tuner.admitted();
            tuner.epoch()
        });
        let mut orders = self.orders.lock();
        let now = Instant::now();
        // Swept when it has doubled since the last sweep (at least ORDER_SWEEP): with more
        // orders live than that, a sweep on every insert would be quadratic.
        let mut sweep_at = self.orders_sweep_at.lock();
        if orders.len() > (*sweep_at).max(ORDER_SWEEP) {
            orders.retain(|_, o| o.until > now);
            *sweep_at = orders.len() * 2;
        }
        let until = now + ttl + Duration::from_secs(600);
        let k = (key.to_string(), edge);
        let retired = match orders.get(&k) {
            Some(replaced) => replaced.names(),
            None => self.settled_names.lock().take(&k, now),
        };
        let replaced = orders.insert(
            k.clone(),
            Order {
                info,
                signal,
                until,
                placed_ms,
                boot_id: accepted.boot_id,
                epoch,
                id,
                retired,
                ttl,
                peer: accepted.peer,
            },
        );
        // Kept aside only when named: an unnamed outcome (or an unnamed order) could not be
        // told from the new order's, and would be priced once as unattributed and again
        // when its process is told lost.
        if let Some(replaced) = replaced.filter(|r| {
            r.id.is_some()
                && r.boot_id != 0
                && accepted.boot_id != 0
                && r.boot_id != accepted.boot_id
        }) {
            self.superseded.lock().keep(k.clone(), replaced, now);
        }
        drop(sweep_at);
        drop(orders);
        self.settle_early(&k, id);
    }

    /// The order of `k` kept aside ([`Self::record_order`]) that the edge names `name`.
    fn take_superseded(&self, k: &(String, usize), name: Option<u64>) -> Option<Order> {
        self.superseded.lock().take(k, name?)
    }

    /// Whether an order of `key` on `edge` awaits its outcome.
    pub fn has_order(&self, key: &str, edge: usize) -> bool {
        self.orders.lock().contains_key(&(key.to_string(), edge))
    }

    /// Whether an order of `key` on `edge` that process `boot_id` accepted (or one whose
    /// process is not known) awaits its outcome.
    pub fn has_order_of(&self, key: &str, edge: usize, boot_id: u64) -> bool {
        self.orders
            .lock()
            .get(&(key.to_string(), edge))
            .is_some_and(|o| o.boot_id == boot_id || o.boot_id == 0)
    }

    /// A name for a new order of `key` on `edge` whose deadline is `deadline_ms` (0: none):
    /// the deadline itself, which the edge echoes in the outcome, moved on a millisecond at a
    /// time while the order it replaces (or the last one settled), or one that order replaced,
    /// has that name, so that a late outcome of theirs cannot settle the new one.
    pub fn order_id(&self, key: &str, edge: usize, deadline_ms: u64) -> u64 {
        if deadline_ms == 0 {
            return 0;
        }
        let orders = self.orders.lock();
        let settled = self.settled_names.lock();
        let k = (key.to_string(), edge);
        let current = orders.get(&k);
        let taken = |id: u64| {
            current.is_some_and(|c| c.id == Some(id) || c.retired.contains(&id))
                || settled.taken(&k, id)
        };
        let mut id = deadline_ms;
        while taken(id) {
            id += 1;
        }
        id
    }

    /// Price the shadows `edge` reports as ended; outcomes of orders we did not place (an
    /// operator's) are priced as unattributed.
    pub fn settle(&self, edge: usize, outcomes: &[ShadowOutcome]) {
        if outcomes.is_empty() {
            return;
        }
        let mut ended = self.ended.lock();
        let mut orders = self.orders.lock();
        let mut tuners = self.tuners.lock();
        let mut rollups = self.rollups.lock();
        for o in outcomes {
            let k = (o.key.clone(), edge);
            // An outcome that ended before the key's current order was placed (it reached us
            // late, after the key was ordered again) is the older order's, whose attribution
            // that order replaced: priced unattributed, and the current order and the live
            // shadow it stands for stay.
            // Where both name their orders, the names say it; else the edge's clock does.
            let older = orders.get(&k).is_some_and(|ord| match (o.order, ord.id) {
                (Some(theirs), Some(ours)) => theirs != ours,
                _ => o.ended_ms > 0 && ord.placed_ms > o.ended_ms.saturating_add(CLOCK_SLACK_MS),
            });
            // An older order a restart's re-placement replaced is found by its name.
            let order = if older {
                self.take_superseded(&k, o.order)
            } else {
                let order = orders.remove(&k);
                if let Some(order) = &order {
                    self.settled_names
                        .lock()
                        .keep(k.clone(), order, Instant::now());
                }
                // One kept aside after a restart is not the shadow the planner counts live
                // (that is its replacement's, or none): nothing to end there.
                let aside = match order {
                    Some(_) => None,
                    None => self.take_superseded(&k, o.order),
                };
                if order.is_none()
                    && aside.is_none()
                    && o.order.is_some()
                    && self.early.lock().keep(k, o.clone(), Instant::now())
                {
                    continue;
                }
                if aside.is_none() {
                    push_bounded(&mut ended, Ended::of(o, edge), ENDED_LOG);
                }
                order.or(aside)
            };
            self.book(edge, order.as_ref(), o, &mut tuners, &mut rollups);
        }
        drop(rollups);
        drop(tuners);
        drop(orders);
        drop(ended);
        self.publish();
    }

    /// Price the outcomes that waited [`EARLY_WAIT`] for an order that never came, as
    /// unattributed (as any outcome of an order the ledger does not know).
    fn settle_overdue_early(&self) {
        let overdue = self.early.lock().overdue(EARLY_WAIT);
        if overdue.is_empty() {
            return;
        }
        let mut ended = self.ended.lock();
        let mut tuners = self.tuners.lock();
        let mut rollups = self.rollups.lock();
        for ((_, edge), o) in overdue {
            push_bounded(&mut ended, Ended::of(&o, edge), ENDED_LOG);
            self.book(edge, None, &o, &mut tuners, &mut rollups);
        }
        drop(rollups);
        drop(tuners);
        drop(ended);
        self.publish();
    }

    /// Settle the order just recorded as `k` with the outcome that came before it, if one
    /// that names it waits ([`Self::early`]).
    fn settle_early(&self, k: &(String, usize), id: Option<u64>) {
        let Some(name) = id else {
            return;
        };
        let mut ended = self.ended.lock();
        let mut orders = self.orders.lock();
        // Still the order named so (not one recorded since, nor taken by `lost` meanwhile).
        if orders.get(k).is_none_or(|order| order.id != Some(name)) {
            return;
        }
        let Some(o) = self.early.lock().take(k, name) else {
            return;
        };
        let Some(order) = orders.remove(k) else {
            return;
        };
        self.settled_names
            .lock()
            .keep(k.clone(), &order, Instant::now());
        let mut tuners = self.tuners.lock();
        let mut rollups = self.rollups.lock();
        push_bounded(&mut ended, Ended::of(&o, k.1), ENDED_LOG);
        self.book(k.1, Some(&order), &o, &mut tuners, &mut rollups);
        drop(rollups);
        drop(tuners);
        drop(orders);
        drop(ended);
        self.publish();
    }

    /// Price one ended shadow `o` of `edge`, placed by `order` (none: unattributed), into the
    /// rollups, the money counters and its signal's tuner.
    fn book(
        &self,
        edge: usize,
        order: Option<&Order>,
        o: &ShadowOutcome,
        tuners: &mut Tuners,
        rollups: &mut HashMap<(String, usize, Class, Source), Rollup>,
    ) {
        if o.failed {
            // Nothing was held: no storage, no hits, and no evidence about the signal. A
            // fill a purge or unshadow overtook (`removed`) is not a failure either.
            if let Some(order) = order.filter(|_| !o.removed) {
                rollups.entry(rollup_key(order)).or_default().failed += 1;
            }
            // What it spent is spent all the same: a fill that ran (every failure; an
            // overtaken one that moved bytes) cost its compute and the bytes its attempts
            // moved (`bytes`, 0 from older edges), from where the edge says (a failure's
            // attempts count as the origin's).
            if !o.removed || o.bytes > 0 {
                let failed = ShadowOutcome {
                    hits: 0,
                    held_secs: 0,
                    ..o.clone()
                };
                let p = price(&self.cfg, &failed);
                let key = order.map_or_else(unattributed, rollup_key);
                self.count_money(&key, &p);
                rollups.entry(key).or_default().money.add(&p);
            }
            return;
        }
        if o.held_before {
            // The edge had the object anyway: the order moved no bytes and pre-positioned
            // nothing, so it neither costs a fill nor earns, and says nothing about what
            // prefetching is worth (precision and the tuners count real prefetches).
            if let Some(order) = order {
                rollups.entry(rollup_key(order)).or_default().held_before += 1;
            }
            return;
        }
        // Edges measure holding time (and a fill's head start) on the wall; prices are
        // per clock hour.
        let held = ShadowOutcome {
            held_secs: crate::clock::clock_secs(o.held_secs),
            head_start_ms: o
                .head_start_ms
                .map(|ms| (ms as f64 * crate::clock::speedup()) as u64),
            ..o.clone()
        };
        let p = price(&self.cfg, &held);
        tracing::debug!(edge, key = %o.key, source = order.map_or("-", |o| o.signal.source.label()),
            bytes = o.bytes, hits = o.hits, held_secs = held.held_secs, evicted = o.evicted,
            removed = o.removed, net = p.net(), "shadow settled");
        let key = order.map_or_else(unattributed, rollup_key);
        self.count_money(&key, &p);
        let r = rollups.entry(key).or_default();
        r.shadows += 1;
        // Edge-reported: a number near the top of u64 saturates, it does not wrap or panic.
        r.bytes = r.bytes.saturating_add(o.bytes);
        if o.hits > 0 {
            r.used += 1;
            r.used_bytes = r.used_bytes.saturating_add(o.bytes);
        }
        r.money.add(&p);
        // A shadow removed before its TTL (unshadowed for the budget, purged, evicted) was
        // not given the term the signal bet on: priced, but no evidence about the signal,
        // used or not (keeping only the used ones would flatter the precision whenever
        // drops and evictions run high).
        let cut_short = o.removed || o.evicted;
        let tuned = order
            .filter(|_| !cut_short)
            .and_then(|order| Some((order, order.signal.source.tuned()?)));
        if let Some((order, source)) = tuned {
            let settled = Settled {
                score: order.signal.score,
                epoch: order.epoch,
                bytes: o.bytes,
                used: o.hits > 0,
                net: p.net(),
                spend: p.spend(),
            };
            self.tuner(tuners, order.info.region, order.info.class, source)
                .settle(settled, &self.cfg);
        }
    }

    /// Price the orders of `edge` whose outcomes will never come: those still open (or kept
    /// aside, [`Self::record_order`]) that its process `boot_id` accepted, when the edge says
    /// that process ended without reporting them (its
    /// [`edge_node::sync::protocol::StatsReport::lost_boots`]: it crashed, or its stop came
    /// before fills it had accepted ended). Left open they would be forgotten unpriced after
    /// their TTL, and their fills' spend with them. Each is priced as filled as ordered (its
    /// expected size, from the origin or its peer) and held unused until `now_ms` (at most its
    /// TTL): whether a request found it went unrecorded, and its copy, if the disk kept it, is
    /// no longer a shadow. It is counted `lost` in its rollup and, its term cut short, tunes no
    /// threshold. Asked again it finds nothing more; returns how many it settled.
    pub fn lost(&self, edge: usize, boot_id: u64, now_ms: u64) -> usize {
        if boot_id == 0 {
            return 0;
        }
        let mut ended = self.ended.lock();
        let mut orders = self.orders.lock();
        let mut tuners = self.tuners.lock();
        let mut rollups = self.rollups.lock();
        let now = Instant::now();
        let mut lost: Vec<((String, usize), Order)> = orders
            .extract_if(|(_, e), o| *e == edge && o.boot_id == boot_id)
            .collect();
        for (k, order) in &lost {
            self.settled_names.lock().keep(k.clone(), order, now);
            let e = Ended {
                key: k.0.clone(),
                edge,
                failed: false,
            };
            push_bounded(&mut ended, e, ENDED_LOG);
        }
        lost.extend(self.superseded.lock().take_accepted_by(edge, boot_id));
        for (k, order) in &lost {
            rollups.entry(rollup_key(order)).or_default().lost += 1;
            let region = self.region_name(order.info.region);
            self.metrics.shadows_lost.with_label_values(&[region]).inc();
            let o = ShadowOutcome {
                key: k.0.clone(),
                bytes: order.info.bytes,
                hits: 0,
                held_secs: (now_ms.saturating_sub(order.placed_ms) / 1000).min(order.ttl.as_secs()),
                peer_filled: order.peer,
                evicted: false,
                failed: false,
                held_before: false,
                removed: true,
                ended_ms: now_ms,
                head_start_ms: None,
                order: order.id,
                fill_paid: false,
            };
            self.book(edge, Some(order), &o, &mut tuners, &mut rollups);
        }
        drop(rollups);
        drop(tuners);
        drop(orders);
        drop(ended);
        if !lost.is_empty() {
            tracing::warn!(
                edge,
                process = boot_id,
                orders = lost.len(),
                "shadow orders lost with an edge process that ended without reporting them: \
                 priced as filled and unused"
            );
            self.publish();
        }
        lost.len()
    }

    /// Region `r`'s name for metrics and the report (`-` for unattributed outcomes).
    fn region_name(&self, r: usize) -> &str {
        self.regions.get(r).map_or("-", |s| s.as_str())
    }

    /// Spend and savings counters of one priced shadow (by region, class and source; the
    /// provider is in the roll-ups only).
    fn count_money(&self, (_, region, class, source): &(String, usize, Class, Source), p: &Priced) {
        let region = self.region_name(*region);
        let labels = [region, class.label(), source.label()];
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
    }

    fn publish(&self) {
        let rollups = self.rollups.lock();
        let mut by_region: HashMap<&str, (f64, u64, u64)> = HashMap::new();
        for ((_, region, _, _), r) in rollups.iter() {
            let name = self.region_name(*region);
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

    /// One planning tick of every tuner: each decides once its evidence is due (see `tuner`).
    /// The forecast thresholds are the ones in the threshold metrics; every move of any source
    /// is logged with its reason and kept for the report.
    pub fn tune(&self, now_secs: u64) {
        self.settle_overdue_early();
        let mut tuners = self.tuners.lock();
        let lowers: HashMap<Source, f32> = [Source::Forecast, Source::Coaccess, Source::Anomaly]
            .into_iter()
            .map(|s| (s, self.lower(&tuners, s)))
            .collect();
        let mut changes = Vec::new();
        for ((region, class, source), t) in tuners.by.iter_mut() {
            let moved = t.tick(&self.cfg, lowers[source]);
            let region = self.regions[*region].as_str();
            self.metrics
                .threshold
                .with_label_values(&[region, class.label(), source.label()])
                .set(f64::from(t.threshold));
            let Some(m) = moved else {
                continue;
            };
            let change = Change {
                at: now_secs,
                region: region.to_string(),
                class: *class,
                source: *source,
                from: m.from,
                to: m.to,
                reason: m.reason,
            };
            self.log_change(&change);
            changes.push(change);
        }
        drop(tuners);
        let mut log = self.changes.lock();
        for c in changes {
            push_bounded(&mut log, c, CHANGE_LOG);
        }
    }

    fn log_change(&self, c: &Change) {
        let (class, source) = (c.class.label(), c.source.label());
        tracing::info!(region = %c.region, class, source, from = c.from, to = c.to, reason = %c.reason, "shadow threshold moved");
        let direction = if c.to > c.from { "up" } else { "down" };
        self.metrics
            .threshold_changes
            .with_label_values(&[c.region.as_str(), class, source, direction])
            .inc();
    }

    /// The ledger as JSON for `GET /v1/cost`: rollups per (provider, region, class, source),
    /// totals per source, the forecast thresholds (`thresholds`, as the planner uses them),
    /// the co-access and anomaly ones (`signal_thresholds`) and the recent moves.
    pub fn report(&self) -> serde_json::Value {
        let region = |r: usize| self.region_name(r).to_string();
        let rollups = self.rollups.lock();
        let mut rows: Vec<serde_json::Value> = rollups
            .iter()
            .map(|((provider, r, class, source), v)| {
                let mut row = v.json();
                row["provider"] = serde_json::json!(provider);
                row["region"] = serde_json::json!(region(*r));
                row["class"] = serde_json::json!(class);
                row["source"] = serde_json::json!(source);
                row
            })
            .collect();
        rows.sort_by_key(|v| v.to_string());
        let by_source: Vec<serde_json::Value> = Source::ALL
            .iter()
            .map(|s| {
                let mut total = Rollup::default();
                for r in rollups.iter().filter(|(k, _)| k.3 == *s).map(|(_, r)| r) {
                    total.add(r);
                }
                let mut row = total.json();
                row["source"] = serde_json::json!(s);
                row
            })
            .collect();
        drop(rollups);
        let (mut thresholds, mut signal_thresholds) = (Vec::new(), Vec::new());
        for ((r, class, source), t) in self.tuners.lock().by.iter() {
            let judged = t.judged.as_ref();
            let row = serde_json::json!({
                "region": region(*r), "class": class, "source": source, "threshold": t.threshold,
                "rolling_net_per_shadow": judged.map(Stats::net_per_shadow),
                "rolling_precision": judged.map(Stats::precision),
                "rolling_byte_precision": judged.map(Stats::byte_precision),
                "judged": judged,
                "last_reason": t.last_reason,
            });
            match source {
                Source::Forecast => thresholds.push(row),
                _ => signal_thresholds.push(row),
            }
        }
        thresholds.sort_by_key(|v| v.to_string());
        signal_thresholds.sort_by_key(|v| v.to_string());
        serde_json::json!({
            "prices": self.cfg,
            "rollups": rows,
            "by_source": by_source,
            "thresholds": thresholds,
            "signal_thresholds": signal_thresholds,
            "changes": self.changes.lock().iter().collect::<Vec<_>>(),
        })
    }
}

/// Where an outcome no order of ours stands for (an operator's) is rolled up.
fn unattributed() -> (String, usize, Class, Source) {
    (
        "-".to_string(),
        usize::MAX,
        Class::Normal,
        Source::Unattributed,
    )
}

/// Where an order's outcome is rolled up.
fn rollup_key(o: &Order) -> (String, usize, Class, Source) {
    (
        o.info.provider.clone(),
        o.info.region,
        o.info.class,
        o.signal.source,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_node::sync::protocol::unix_ms_now;

    fn outcome(bytes: u64, hits: u64, peer: bool) -> ShadowOutcome {
        ShadowOutcome {
            key: "h/a".into(),
            bytes,
            hits,
            held_secs: 3600,
            peer_filled: peer,
            evicted: false,
            failed: false,
            held_before: false,
            removed: false,
            ended_ms: 0,
            head_start_ms: None,
            order: None,
            fill_paid: false,
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
        // A copy an earlier, dropped order's fill fetched and paid for: this order pays its
        // storage only, and earns what it saved.
        let paid = ShadowOutcome {
            fill_paid: true,
            ..outcome(gb, 3, false)
        };
        let paid = price(&cfg, &paid);
        assert_eq!(
            (paid.fill_origin, paid.fill_peer, paid.compute),
            (0.0, 0.0, 0.0)
        );
        assert_eq!(
            (paid.storage, paid.savings()),
            (used.storage, used.savings())
        );
        // Its first client came 10 ms into the fill: it waited for the rest, and the shadow
        // saved it those 10 ms, not the whole fetch.
        let joined = ShadowOutcome {
            head_start_ms: Some(10),
            ..outcome(gb, 3, false)
        };
        let joined = price(&cfg, &joined);
        assert!((joined.saved_latency - cfg.latency_value_per_sec * 0.01).abs() < 1e-12);
        assert!(joined.saved_latency < used.saved_latency);
        assert_eq!(joined.saved_egress, used.saved_egress);
        let early = ShadowOutcome {
            head_start_ms: Some(3_600_000),
            ..outcome(gb, 3, false)
        };
        assert_eq!(
            price(&cfg, &early).saved_latency,
            used.saved_latency,
            "capped at the whole wait"
        );
    }

    /// With demand misses filled from peers, a shadow a peer filled saved its first request a
    /// peer fetch, not an origin fetch: it earns the transfer between edges and the peer's
    /// round trip, and so pays only at high odds.
    #[test]
    fn with_demand_peer_fill_a_peer_filled_shadow_earns_only_the_peer_fetch() {
        let cfg = CostSection {
            demand_peer_fill: true,
            ..CostSection::default()
        };
        let gb = 1_000_000_000;
        let peer = price(&cfg, &outcome(gb, 1, true));
        assert!(
            (peer.saved_egress - peer.fill_peer).abs() < 1e-12,
            "{peer:?}"
        );
        assert!(
            (peer.saved_latency - cfg.peer_latency_secs * cfg.latency_value_per_sec).abs() < 1e-12
        );
        // An origin-filled one still saved an origin fetch.
        let origin = price(&cfg, &outcome(gb, 1, false));
        assert_eq!(
            origin,
            price(&CostSection::default(), &outcome(gb, 1, false))
        );
        let be = Stake::of(&cfg, 1_000_000, true, 3600).break_even();
        assert!((0.9..0.95).contains(&be), "{be}");
    }

    #[test]
    fn break_even_grows_with_size_and_falls_with_a_peer_fill() {
        let cfg = CostSection::default();
        let be = |bytes, peer| Stake::of(&cfg, bytes, peer, 3600).break_even();
        let (small, medium, large) = (be(10_000, false), be(100_000, false), be(1_000_000, false));
        assert!(small < medium && medium < large, "{small} {medium} {large}");
        // 10 kB pays at modest odds; 1 MB from the origin needs a near-certain forecast.
        assert!(small < 0.35, "{small}");
        assert!(large > 0.9, "{large}");
        // From a peer, while demand misses are not filled from peers, a used copy saves the
        // origin egress: large objects pay at ~0.22.
        let peer = be(1_000_000, true);
        assert!(peer < 0.3 && peer < large, "{peer}");
        // At the break-even probability the expected net is zero.
        let s = Stake::of(&cfg, 100_000, false, 3600);
        assert!(s.value(s.break_even()).abs() < 1e-12, "{s:?}");
        assert!(s.value(s.break_even() + 0.05) > 0.0);
        // Waste that pays needs no odds; use that does not pay is never worth it.
        let free = Stake {
            used: 1.0,
            wasted: 0.0,
        };
        assert_eq!(free.break_even(), 0.0);
        let hopeless = Stake {
            used: -1.0,
            wasted: -2.0,
        };
        assert!(hopeless.break_even() > 1.0);
    }

    #[test]
    fn a_used_shadow_saves_the_round_trip_and_the_slow_origin_transfer() {
        let cfg = CostSection::default();
        // Small: the round trip alone.
        assert!((cfg.wait_avoided_secs(1_000) - 0.1).abs() < 1e-3);
        // 50 MB at 100 Mbit/s from the origin vs 250 Mbit/s to the user: 4 s − 1.6 s more.
        assert!((cfg.wait_avoided_secs(50_000_000) - 2.5).abs() < 1e-9);
        // A user slower than the origin paces both alike: the round trip only.
        let slow_user = CostSection {
            client_mbit_per_sec: 10.0,
            ..CostSection::default()
        };
        assert_eq!(slow_user.wait_avoided_secs(50_000_000), 0.1);
        let used = price(&cfg, &outcome(50_000_000, 1, false));
        assert!((used.saved_latency - 2.5 * cfg.latency_value_per_sec).abs() < 1e-12);
    }

    #[test]
    fn prices_and_bounds_that_cannot_work_are_refused_by_name() {
        assert_eq!(CostSection::default().check(), Ok(()));
        let bad = |c: CostSection| c.check().unwrap_err();
        let e = bad(CostSection {
            origin_egress_per_gb: -0.09,
            ..CostSection::default()
        });
        assert!(e.contains("cost.origin_egress_per_gb"), "{e}");
        let e = bad(CostSection {
            origin_mbit_per_sec: 0.0,
            ..CostSection::default()
        });
        assert!(e.contains("cost.origin_mbit_per_sec"), "{e}");
        let e = bad(CostSection {
            min_threshold: 0.9,
            max_threshold: 0.5,
            ..CostSection::default()
        });
        assert!(e.contains("cost.min_threshold"), "{e}");
        let e = bad(CostSection {
            min_step: 0.0,
            ..CostSection::default()
        });
        assert!(e.contains("cost.min_step"), "{e}");
    }

    /// A ledger with the default costs but no byte-precision floor, so thresholds move over
    /// their whole range (the floor's own tests set one).
    fn ledger() -> Ledger {
        ledger_with(CostSection {
            min_precision: Fraction(0.0),
            ..CostSection::default()
        })
    }

    fn ledger_with(cfg: CostSection) -> Ledger {
        let reg = prometheus::Registry::new();
        Ledger::new(
            cfg,
            0.5,
            vec!["eu".into(), "us".into()],
            BrokerMetrics::register(&reg).unwrap(),
        )
    }

    fn info(region: usize, priority: u8) -> OrderInfo {
        OrderInfo {
            provider: "p".into(),
            region,
            class: Class::of(priority),
            bytes: 1_000_000,
        }
    }

    /// Record an order for `key` on `edge` (in the region of the same index) at `priority`,
    /// placed now and live for 60 s.
    fn place(l: &Ledger, key: &str, edge: usize, priority: u8, signal: Signal) {
        l.record_order(
            key,
            edge,
            info(edge, priority),
            signal,
            Duration::from_secs(60),
            unix_ms_now(),
            None,
            Accepted::default(),
        );
    }

    /// Settle `used` then `wasted` 10 MB origin-filled shadows placed by `source` in region 0,
    /// class normal, scored evenly over [0.5, 1).
    fn settle_from(l: &Ledger, source: Source, used: usize, wasted: usize) {
        let n = used + wasted;
        let mut outs = Vec::new();
        for i in 0..n {
            let key = format!("h/{}/{i}", source.label());
            let signal = Signal {
                source,
                score: 0.5 + 0.5 * i as f32 / n as f32,
            };
            place(l, &key, 0, 5, signal);
            let mut o = outcome(10_000_000, u64::from(i < used), false);
            o.key = key;
            outs.push(o);
        }
        l.settle(0, &outs);
    }

    fn settle_batch(l: &Ledger, used: usize, wasted: usize) {
        settle_from(l, Source::Forecast, used, wasted);
    }

    #[test]
    fn losing_shadows_raise_the_threshold_and_winning_ones_lower_it_within_bounds() {
        let l = ledger();
        for tick in 0..3 {
            settle_batch(&l, 2, 18);
            l.tune(tick);
        }
        let (up, reason) = l.threshold(0, 5);
        assert!(up > 0.6, "{up}");
        assert!(reason.unwrap().contains("below"));
        // A workload shift: now everything is used; the threshold comes back down.
        for tick in 3..30 {
            settle_batch(&l, 20, 0);
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
        assert_eq!(report["rollups"][0]["source"], "forecast");
    }

    /// When an edge says a process of it ended without reporting its orders, the orders that
    /// process accepted are priced as filled as ordered and held unused until then (at most
    /// their TTL), once, counted lost; they tune nothing, and the planner is told. Another
    /// edge's orders, and orders another process of the edge accepted, stay open.
    #[test]
    fn orders_an_edge_process_took_with_it_are_priced_once_as_lost() {
        let l = ledger();
        let signal = Signal::forecast(0.9);
        let hour = Duration::from_secs(7_200);
        let (crashed, next) = (11, 12);
        let by = |boot_id, peer| Accepted { peer, boot_id };
        let now = unix_ms_now();
        let placed = now - 3_600_000;
        l.record_order(
            "h/a",
            0,
            info(0, 5),
            signal,
            hour,
            placed,
            None,
            by(crashed, false),
        );
        let short = Duration::from_secs(60);
        let b = by(crashed, true);
        l.record_order("h/b", 0, info(0, 5), signal, short, placed, Some(7), b);
        l.record_order(
            "h/a",
            1,
            info(1, 5),
            signal,
            hour,
            placed,
            None,
            by(crashed, false),
        );
        l.record_order(
            "h/c",
            0,
            info(0, 5),
            signal,
            hour,
            placed,
            None,
            by(next, false),
        );

        assert_eq!(l.lost(0, crashed, now), 2);
        assert_eq!(l.lost(0, crashed, now), 0, "settled once");
        assert_eq!(l.lost(0, 0, now), 0, "an unnamed process names no order");
        assert!(!l.has_order("h/a", 0) && !l.has_order("h/b", 0));
        assert!(l.has_order("h/a", 1) && l.has_order("h/c", 0));
        let mut ended = l.take_ended();
        ended.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(ended.len(), 2);
        assert!(ended.iter().all(|e| e.edge == 0 && !e.failed), "{ended:?}");

        let as_lost = |held_secs, peer_filled| ShadowOutcome {
            held_secs,
            peer_filled,
            ..outcome(1_000_000, 0, peer_filled)
        };
        let spend = price(&l.cfg, &as_lost(3_600, false)).spend()
            + price(&l.cfg, &as_lost(60, true)).spend();
        let report = l.report();
        let row = &report["by_source"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["source"] == "forecast")
            .unwrap()
            .clone();
        assert_eq!(row["lost"], 2);
        assert_eq!(row["shadows"], 2);
        assert_eq!(row["used"], 0);
        assert_eq!(row["bytes"], 2_000_000);
        let priced = row["spend"].as_f64().unwrap();
        assert!((priced - spend).abs() < 1e-12, "{priced} against {spend}");
        assert!(
            report["thresholds"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["judged"].is_null()),
            "cut short: no evidence for the tuner"
        );
        assert_eq!(l.metrics.shadows_lost.with_label_values(&["eu"]).get(), 2);
    }

    /// An order the planner placed again after the edge restarted replaces the one the old
    /// process accepted; that one is kept aside, and priced when its outcome comes from the
    /// next process (attributed to it, not unattributed) or when the old process is told lost.
    #[test]
    fn an_order_replaced_after_a_restart_is_still_settled_or_lost() {
        let l = ledger();
        let signal = Signal::forecast(0.9);
        let ttl = Duration::from_secs(3_600);
        let now = unix_ms_now();
        let by = |boot_id| Accepted {
            peer: false,
            boot_id,
        };
        for key in ["h/saved", "h/lost"] {
            l.record_order(key, 0, info(0, 5), signal, ttl, now, Some(1), by(1));
            l.record_order(key, 0, info(0, 5), signal, ttl, now, Some(2), by(2));
        }
        // Unnamed, it could not be told from its replacement's: not kept aside.
        l.record_order("h/unnamed", 0, info(0, 5), signal, ttl, now, None, by(1));
        l.record_order("h/unnamed", 0, info(0, 5), signal, ttl, now, None, by(2));
        // The old process's outcome, saved at its stop, names its order.
        let saved = ShadowOutcome {
            key: "h/saved".into(),
            order: Some(1),
            ..outcome(1_000_000, 1, false)
        };
        l.settle(0, &[saved]);
        assert!(l.has_order("h/saved", 0), "the new order stays");
        assert_eq!(l.lost(0, 1, now), 1, "h/lost's old order");
        assert!(l.has_order("h/lost", 0));
        let report = l.report();
        let rows = report["rollups"].as_array().unwrap();
        assert!(
            rows.iter().all(|r| r["source"] != "unattributed"),
            "{rows:?}"
        );
        let forecast = rows.iter().find(|r| r["source"] == "forecast").unwrap();
        assert_eq!(forecast["shadows"], 2);
        assert_eq!(forecast["used"], 1);
        assert_eq!(forecast["lost"], 1);
    }

    #[test]
    fn a_failed_fill_ends_the_order_with_what_it_spent_and_tells_the_planner() {
        let l = ledger();
        let signal = Signal::forecast(0.9);
        place(&l, "h/x", 1, 5, signal);
        assert!(l.has_order("h/x", 1) && !l.has_order("h/x", 0));
        l.settle(1, &[ShadowOutcome::failed("h/x".into())]);
        assert_eq!(
            l.take_ended(),
            vec![Ended {
                key: "h/x".to_string(),
                edge: 1,
                failed: true
            }]
        );
        assert!(l.take_ended().is_empty());
        assert!(l.orders.lock().is_empty());
        assert!(!l.has_order("h/x", 1));
        // A fill a purge or unshadow overtook ends the order too, but is no failure (the
        // planner backs off only after real ones).
        place(&l, "h/y", 1, 5, signal);
        let dropped = ShadowOutcome {
            removed: true,
            ..ShadowOutcome::failed("h/y".into())
        };
        l.settle(1, &[dropped]);
        assert_eq!(
            l.take_ended(),
            vec![Ended {
                key: "h/y".to_string(),
                edge: 1,
                failed: false
            }]
        );
        let r = &l.report()["rollups"][0];
        assert_eq!(
            (r["failed"].as_u64(), r["shadows"].as_u64()),
            (Some(1), Some(0))
        );
        // The failure ran a fill: its compute is spent. The dropped one never fetched.
        let cfg = CostSection::default();
        let spend = |l: &Ledger| l.report()["rollups"][0]["spend"].as_f64().unwrap();
        assert!((spend(&l) - cfg.fill_cost).abs() < 1e-12, "{}", l.report());
        // Bytes a failed fill moved, and those of a fill a purge overtook once it had
        // fetched, are paid as origin transfer; neither is a shadow or evidence.
        place(&l, "h/z", 1, 5, signal);
        place(&l, "h/w", 1, 5, signal);
        let partial = ShadowOutcome {
            bytes: 1_000_000_000,
            ..ShadowOutcome::failed("h/z".into())
        };
        let overtaken = ShadowOutcome {
            bytes: 1_000_000_000,
            removed: true,
            ..ShadowOutcome::failed("h/w".into())
        };
        l.settle(1, &[partial, overtaken]);
        let want = 3.0 * cfg.fill_cost + 2.0 * cfg.origin_egress_per_gb;
        assert!((spend(&l) - want).abs() < 1e-9, "{}", l.report());
        // Bytes a peer supplied are paid at the inter-edge price.
        place(&l, "h/v", 1, 5, signal);
        let from_peer = ShadowOutcome {
            bytes: 1_000_000_000,
            removed: true,
            peer_filled: true,
            ..ShadowOutcome::failed("h/v".into())
        };
        l.settle(1, &[from_peer]);
        let want = want + cfg.fill_cost + cfg.inter_edge_per_gb;
        assert!((spend(&l) - want).abs() < 1e-9, "{}", l.report());
        let r = &l.report()["rollups"][0];
        assert_eq!(
            (r["failed"].as_u64(), r["shadows"].as_u64()),
            (Some(2), Some(0))
        );
        // No evidence about the forecast: the tuner has nothing to act on.
        for tick in 0..10 {
            l.tune(tick);
        }
        assert_eq!(l.threshold(1, 5), (0.5, None));
    }

    /// A fill that fails at once can be reported before the reply accepting its order is
    /// handled: the outcome waits for the order, which it then settles as ordered, leaving
    /// nothing open (nor anything for a crash of that process to price again).
    #[test]
    fn an_outcome_that_comes_before_its_order_settles_it() {
        let l = ledger();
        let now = unix_ms_now();
        let id = l.order_id("h/x", 1, now + 500);
        let early = ShadowOutcome {
            order: Some(id),
            ..ShadowOutcome::failed("h/x".into())
        };
        l.settle(1, std::slice::from_ref(&early));
        assert!(l.take_ended().is_empty(), "waits for its order");
        assert_eq!(l.report()["rollups"].as_array().unwrap().len(), 0);
        let by = Accepted {
            peer: false,
            boot_id: 7,
        };
        let ttl = Duration::from_secs(60);
        let signal = Signal::forecast(0.9);
        l.record_order("h/x", 1, info(1, 5), signal, ttl, now, Some(id), by);
        assert!(!l.has_order("h/x", 1), "settled as it was recorded");
        assert_eq!(
            l.take_ended(),
            vec![Ended {
                key: "h/x".into(),
                edge: 1,
                failed: true
            }]
        );
        let r = &l.report()["rollups"][0];
        assert_eq!(
            (r["source"].as_str(), r["failed"].as_u64()),
            (Some("forecast"), Some(1)),
            "{r}"
        );
        assert_eq!(
            l.lost(1, 7, now + 1_000),
            0,
            "nothing left for a crash to price"
        );
        // One whose order never comes is still priced, unattributed, once it waited enough.
        let stray = ShadowOutcome {
            order: Some(id + 40),
            ..ShadowOutcome::failed("h/y".into())
        };
        l.settle(1, &[stray]);
        l.early
            .lock()
            .by_key
            .values_mut()
            .flatten()
            .for_each(|(_, at)| *at -= EARLY_WAIT);
        l.tune(0);
        assert_eq!(l.take_ended().len(), 1);
        assert_eq!(l.early.lock().count, 0);
        let unattributed = l.report()["rollups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["source"] == "unattributed");
        assert!(unattributed, "{}", l.report());
    }

    #[test]
    fn an_outcome_older_than_the_keys_current_order_leaves_that_order_live() {
        let l = ledger();
        let now = unix_ms_now();
        place(&l, "h/x", 1, 5, Signal::coaccess(0.9));
        // The previous shadow of h/x ended 5 s before this order; its outcome arrives now.
        let mut late = outcome(1000, 0, false);
        (late.key, late.ended_ms) = ("h/x".into(), now - 5_000);
        l.settle(1, &[late]);
        assert!(l.take_ended().is_empty(), "the live shadow stays live");
        assert_eq!(l.orders.lock().len(), 1, "and so does its order");
        let r = &l.report()["rollups"][0];
        assert_eq!(r["source"], "unattributed", "{r}");
        // The current order's own outcome ends it.
        let mut own = outcome(1000, 1, false);
        (own.key, own.ended_ms) = ("h/x".into(), now + 10);
        l.settle(1, &[own]);
        assert_eq!(l.take_ended().len(), 1);
        assert!(l.orders.lock().is_empty());
    }

    /// Where outcome and order both carry the order's name, the name decides which order an
    /// outcome settles, not the edge's clock.
    #[test]
    fn an_outcome_naming_its_order_settles_that_order_whatever_the_clocks() {
        let l = ledger();
        let now = unix_ms_now();
        let ttl = Duration::from_secs(60);
        let id = l.order_id("h/x", 1, now + 500);
        assert_eq!(id, now + 500);
        let signal = Signal::forecast(0.9);
        let place = |id| {
            let by = Accepted::default();
            l.record_order("h/x", 1, info(1, 5), signal, ttl, now, Some(id), by);
        };
        place(id);
        // The next order of the key gets another name, even with the same deadline.
        assert_eq!(l.order_id("h/x", 1, id), id + 1);
        // And so does one after that which goes back to the first deadline (A, B, A).
        place(id + 1);
        assert_eq!(l.order_id("h/x", 1, id), id + 2);
        assert_eq!(l.order_id("h/x", 1, id + 5), id + 5);
        for later in 2..=RETIRED_NAMES as u64 + 1 {
            place(id + later);
        }
        assert_eq!(
            l.order_id("h/x", 1, id),
            id,
            "only the last few names are kept"
        );
        place(id);
        assert_eq!(l.order_id("h/x", 0, id), id, "per edge");
        assert_eq!(l.order_id("h/x", 1, 0), 0, "no deadline, no name");
        // A previous order's outcome, stamped by a clock running ahead: still not this one's.
        let mut late = outcome(1000, 0, false);
        (late.key, late.ended_ms, late.order) = ("h/x".into(), now + 5_000, Some(id - 100));
        l.settle(1, &[late]);
        assert!(l.take_ended().is_empty(), "the live shadow stays live");
        assert_eq!(l.orders.lock().len(), 1);
        // Its own outcome, stamped by a clock running 5 s behind: settles it.
        let mut own = outcome(1000, 1, false);
        (own.key, own.ended_ms, own.order) = ("h/x".into(), now - 5_000, Some(id));
        l.settle(1, &[own]);
        assert_eq!(l.take_ended().len(), 1);
        assert!(l.orders.lock().is_empty());
        let rollups = l.report()["rollups"].clone();
        let forecast = rollups
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["source"] == "forecast")
            .cloned()
            .unwrap();
        assert_eq!(forecast["used"], 1, "{rollups}");
        // Settled, its name and the ones it retired stay taken for the key's next order
        // (an outcome of an order it replaced may still be on its way)...
        assert_eq!(l.order_id("h/x", 1, id), id + 1);
        assert_eq!(l.order_id("h/x", 1, id + 3), id + 6);
        assert_eq!(l.order_id("h/x", 0, id), id, "per edge");
        // ...and pass to that order.
        l.record_order(
            "h/x",
            1,
            info(1, 5),
            signal,
            ttl,
            now,
            Some(id + 1),
            Accepted::default(),
        );
        assert_eq!(l.order_id("h/x", 1, id), id + 2);
    }

    #[test]
    fn an_order_for_an_object_already_held_is_counted_apart_and_unpriced() {
        let l = ledger();
        place(&l, "h/x", 1, 5, Signal::forecast(0.9));
        let o = ShadowOutcome {
            held_before: true,
            removed: false,
            ended_ms: 0,
            head_start_ms: None,
            ..outcome(1_000_000, 0, false)
        };
        l.settle(
            1,
            &[ShadowOutcome {
                key: "h/x".into(),
                ..o
            }],
        );
        assert!(l.orders.lock().is_empty());
        let r = &l.report()["rollups"][0];
        assert_eq!(
            (r["already_held"].as_u64(), r["shadows"].as_u64()),
            (Some(1), Some(0))
        );
        assert_eq!(r["spend"].as_f64(), Some(0.0));
        assert_eq!(r["byte_precision"], serde_json::Value::Null);
    }

    #[test]
    fn spend_savings_precision_and_thresholds_are_split_by_source() {
        // The default byte-precision floor (0.6), which forecasts and co-access are held to.
        let l = ledger_with(CostSection::default());
        // The learner offers followers from 0.5 up; those under the floor are not admitted.
        assert!(!l.admits(Signal::coaccess(0.5), 0, 5));
        assert!(l.admits(Signal::coaccess(0.6), 0, 5));
        for tick in 0..3 {
            settle_from(&l, Source::Forecast, 20, 0);
            settle_from(&l, Source::Coaccess, 2, 18);
            l.tune(tick);
        }
        let report = l.report();
        let source = |s: &str| {
            report["by_source"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["source"] == s)
                .cloned()
                .unwrap()
        };
        let (forecast, coaccess) = (source("forecast"), source("coaccess"));
        assert_eq!(forecast["shadows"], 60);
        assert_eq!(forecast["byte_precision"].as_f64(), Some(1.0));
        assert!(forecast["net"].as_f64().unwrap() > 0.0, "{report}");
        assert_eq!(coaccess["used"], 6);
        assert!((coaccess["byte_precision"].as_f64().unwrap() - 0.1).abs() < 1e-9);
        assert!(coaccess["spend"].as_f64().unwrap() > coaccess["savings"].as_f64().unwrap());
        assert_eq!(source("anomaly")["shadows"], 0);
        // Co-access waste raises co-access's threshold, not the forecast's. Profitable
        // forecasts bring theirs down, to the floor and no lower: no placement below it is
        // admitted, so a lower bar would only be a bar not in force.
        assert_eq!(l.threshold(0, 5).0, 0.6, "{report}");
        assert!(l.threshold_for(Source::Coaccess, 0, 5).0 > 0.6, "{report}");
        let signal = report["signal_thresholds"].as_array().unwrap();
        assert!(signal.iter().all(|t| t["source"] == "coaccess"), "{report}");
        assert!(report["thresholds"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["source"] == "forecast"));
        let changes = report["changes"].as_array().unwrap();
        assert!(changes
            .iter()
            .any(|c| c["source"] == "coaccess" && c["reason"].as_str().unwrap().contains("floor")));
    }

    #[test]
    fn only_a_gated_sources_full_term_outcomes_tune_its_threshold() {
        // Wasted events, adopted shadows and shadows cut short leave the forecast threshold
        // where it was (and are still priced).
        let l = ledger();
        for tick in 0..3 {
            settle_from(&l, Source::Event, 0, 20);
            settle_from(&l, Source::Adopted, 0, 20);
            let mut outs = Vec::new();
            for i in 0..20 {
                let key = format!("h/cut/{tick}/{i}");
                let signal = Signal::forecast(0.9);
                place(&l, &key, 0, 5, signal);
                let mut o = outcome(10_000_000, 0, false);
                o.key = key;
                (o.removed, o.evicted) = (i % 2 == 0, i % 2 == 1);
                outs.push(o);
            }
            l.settle(0, &outs);
            l.tune(tick);
        }
        assert_eq!(l.threshold(0, 5).0, 0.5);
        let report = l.report();
        let events = report["by_source"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["source"] == "event")
            .map(|r| r["shadows"].clone());
        assert_eq!(events, Some(serde_json::json!(60)), "{report}");
        assert!(l.admits(Signal::EVENT, 0, 5), "ungated");
        // Full-term waste of the forecast's own placements does move it.
        for tick in 3..6 {
            settle_batch(&l, 2, 18);
            l.tune(tick);
        }
        assert!(l.threshold(0, 5).0 > 0.5);
    }

    #[test]
    fn a_sources_tuners_start_at_the_lowest_score_it_offers() {
        let l = ledger().offering_from(Source::Coaccess, 0.6);
        assert!(l.admits(Signal::coaccess(0.8), 0, 5));
        assert_eq!(l.threshold_for(Source::Coaccess, 0, 5).0, 0.6);
        assert!(l.admits(Signal::coaccess(0.65), 1, 5));
    }

    #[test]
    fn a_co_access_follower_must_clear_its_own_tuned_threshold() {
        let l = ledger();
        // Starts at the weakest follower offered: the learner's own minimum probability.
        assert!(l.admits(Signal::coaccess(0.5), 0, 5));
        assert!(l.admits(Signal::coaccess(0.8), 0, 5));
        assert_eq!(l.threshold_for(Source::Coaccess, 0, 5).0, 0.5);
        for tick in 0..3 {
            settle_from(&l, Source::Coaccess, 2, 18);
            l.tune(tick);
        }
        let (raised, reason) = l.threshold_for(Source::Coaccess, 0, 5);
        assert!(raised > 0.6, "{raised}");
        assert!(reason.is_some());
        assert!(!l.admits(Signal::coaccess(0.55), 0, 5));
        assert!(l.admits(Signal::coaccess(0.99), 0, 5));
        // Other regions and classes keep their own.
        assert!(l.admits(Signal::coaccess(0.55), 1, 5));
        // Once co-access pays it comes back down, but never below the weakest follower.
        for tick in 3..60 {
            settle_from(&l, Source::Coaccess, 20, 0);
            l.tune(tick);
        }
        assert_eq!(l.threshold_for(Source::Coaccess, 0, 5).0, 0.5);
    }

    #[test]
    fn anomaly_widening_is_gated_by_the_anomaly_threshold_from_its_own_outcomes() {
        let l = ledger();
        // A neighbour with no history for the resource scores 0: never widened into.
        assert!(!l.admits(Signal::anomaly(0.0), 1, 5));
        assert!(l.admits(Signal::anomaly(0.1), 1, 5));
        let start = l.threshold_for(Source::Anomaly, 0, 5).0;
        assert_eq!(start, CostSection::default().min_threshold);
        for tick in 0..3 {
            settle_from(&l, Source::Anomaly, 0, 20);
            l.tune(tick);
        }
        assert!(l.threshold_for(Source::Anomaly, 0, 5).0 > start);
        assert_eq!(l.threshold(0, 5).0, 0.5, "the forecast's is untouched");
    }

    #[test]
    fn ungated_placements_are_priced_but_tune_no_threshold() {
        let l = ledger();
        let mut outs = Vec::new();
        for (i, signal) in [Signal::EVENT, Signal::ADOPTED].into_iter().enumerate() {
            let key = format!("h/{i}");
            place(&l, &key, 1, 9, signal);
            let mut o = outcome(10_000_000, 0, false);
            o.key = key;
            outs.push(o);
        }
        l.settle(1, &outs);
        let max_wait = u64::from(CostSection::default().max_wait_ticks);
        for tick in 0..max_wait {
            l.tune(tick);
        }
        assert_eq!(l.threshold(1, 9).0, 0.5);
        let report = l.report();
        let sources: Vec<&str> = report["rollups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["source"].as_str().unwrap())
            .collect();
        assert_eq!(sources, ["adopted", "event"]);
    }

    #[test]
    fn tuner_settings_parse_with_documented_defaults_and_reject_bad_fractions() {
        let cfg: CostSection = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(cfg.min_precision.get(), 0.6);
        assert_eq!(cfg.dead_band.get(), 0.05);
        assert_eq!((cfg.step, cfg.min_step), (0.05, 0.01));
        assert_eq!((cfg.min_settled, cfg.max_wait_ticks), (20, 5));
        let off: CostSection =
            serde_json::from_value(serde_json::json!({"min_precision": 0.0})).unwrap();
        assert_eq!(off.min_precision.get(), 0.0);
        let bad = serde_json::from_value::<CostSection>(serde_json::json!({"min_precision": 1.5}));
        assert!(bad.unwrap_err().to_string().contains("not a fraction"));
    }
}
