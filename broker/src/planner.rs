//! The shadow planner: every tick, forecast the monitored (resource, region) series, and
//! pre-position ("shadow") the resources whose demand is predicted on the edge that owns them
//! in that region, within each edge's shadow budget.
//!
//! Decision rule: shadow R in region G when P(any request in the next hour) ≥ the tuned
//! threshold, ≥ R's own break-even probability (its [`Stake`]: what a used shadow earns
//! against what a wasted one costs, by its size and whether a peer edge can supply it) and ≥
//! the byte-precision floor (`[cost] min_precision`: a shadow the forecast itself expects to
//! be wasted more often than the floor allows cannot help keep precision above it), and the
//! provider's policy allows G; candidates are ranked by expected net benefit
//! `(P·used + (1−P)·wasted) × (1 + priority)` and admitted while the edge's budget lasts; the
//! rest are dropped least valuable first. An edge's budget is a share of its cache capacity (as it
//! reports over QUIC) times a safety factor that shrinks when the forecasts are uncertain
//! (wide p10–p90 intervals); each shadow takes its body plus the edge's per-entry overhead
//! ([`EDGE_ENTRY_OVERHEAD`]) of it. Orders go out earliest expected arrival first, each naming the
//! nearest edge that likely holds the object so the edge can fill from it instead of the
//! origin. Every decision, taken or not, is kept for `GET /v1/shadows/explain`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use edge_node::drain::InflightCounter;
use edge_node::sync::protocol::{PeerRef, ShadowOrder};
use futures::stream::{self, StreamExt};
use models::baseline::{Ewma, SeasonalNaive};
use models::calibration::Calibrator;
use models::features::{History, DEFAULT_PRIORITY};
use models::guard::{GuardConfig, SeriesGuard};
use models::reload::{ModelStatus, ReloadingForecaster};
use models::Forecaster;
use parking_lot::{Mutex, RwLock};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::{Deserialize, Serialize};

use crate::bounded::push_bounded;
use crate::cost::{Accepted, Class, Ledger, Odds, OrderInfo, Signal, Stake};
use crate::metrics::BrokerMetrics;
use crate::monitor::{now_secs, SeriesStore};
use crate::registry::Registry;
use crate::routing::{host_of, Fleet, Health};
use crate::signals::anomaly::{Detector, Standing};
use crate::signals::AnomalySection;
use crate::sync::EdgeSync;

/// Shortest planning tick and stats poll: a shorter one is a busy loop, not a plan.
pub const MIN_INTERVAL_SECS: f64 = 0.05;
/// Orders a tick has in flight at once: an edge that stopped answering costs the tick one
/// order timeout, not one per order.
const SEND_CONCURRENCY: usize = 16;
/// Longest TTL a shadow an edge lists is adopted with (an edge's own default ceiling).
const MAX_ADOPTED_TTL_SECS: u64 = 7 * 86_400;
/// Longest the first tick waits for the edges' first stats poll (each call of which has its
/// own timeout): past it, the planner plans without the edges that did not answer.
const FIRST_POLL_WAIT: Duration = Duration::from_secs(15);
/// Anomaly events kept for `GET /v1/anomalies`.
const ANOMALY_LOG: usize = 200;

/// Bucket width the forecaster was trained on.
pub const FORECAST_BUCKET: u64 = models::features::BUCKET_SECS;
/// History handed to the forecaster: 7 days.
pub(crate) const HISTORY_BUCKETS: usize = 7 * 96;

/// Start of the latest complete forecast bucket at `now`. The model was trained on complete
/// buckets only; the bucket still filling would read as a drop in demand (one minute in, a
/// steady 100 requests per bucket shows as 7). Its requests count once it completes.
fn last_complete_bucket(now: u64) -> u64 {
    (now - now % FORECAST_BUCKET).saturating_sub(FORECAST_BUCKET)
}

/// Which forecaster answered a series: the guard's choice (`GUARD_ANSWERS`), and for the
/// model, its serving wrapper hands windows without a request to the seasonal-naive baseline,
/// which `explain` should say.
fn answered_by<'a>(serving: &'a str, answer: usize, counts: &[u32]) -> &'a str {
    match answer {
        0 if serving == models::onnx::NAME && models::features::window_is_silent(counts) => {
            "seasonal_naive"
        }
        0 => serving,
        k => GUARD_ANSWERS.get(k).copied().unwrap_or(serving),
    }
}

/// The forecasters the per-series guard chooses from, in its order: the serving model, then
/// the baselines.
const GUARD_ANSWERS: [&str; 3] = ["model", "seasonal_naive", "ewma"];

/// The guard's identity of a series.
fn series_id(resource: &str, region_idx: usize) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(resource.as_bytes(), region_idx as u64)
}

/// Every forecaster's forecast of one series, in `GUARD_ANSWERS` order: the serving model's,
/// then the baselines'.
type Options = [models::Forecast; 3];

/// The serving model's forecasts with the baselines' beside them.
fn with_baselines(model: Vec<models::Forecast>, hs: &[History<'_>]) -> Vec<Options> {
    let ewma = Ewma::default();
    model
        .into_iter()
        .zip(hs)
        .map(|(m, h)| [m, SeasonalNaive::one(h), ewma.one(h)])
        .collect()
}

/// The forecasts the planner acts on, and which forecaster answered each (an index into
/// `GUARD_ANSWERS`): the model's, or where the guard says so, a baseline's.
fn guarded(
    guard: Option<&Mutex<SeriesGuard>>,
    serving: u64,
    cands: &[Candidate],
    hs: &[History<'_>],
    options: &[Options],
) -> (Vec<models::Forecast>, Vec<usize>) {
    let Some(guard) = guard else {
        return (
            options.iter().map(|o| o[0]).collect(),
            vec![0; options.len()],
        );
    };
    let mut g = guard.lock();
    g.serving(serving);
    let mut answers = Vec::with_capacity(options.len());
    let forecasts = options
        .iter()
        .zip(cands.iter().zip(hs))
        .map(|(o, (c, h))| {
            let k = g.choose(c.series, h, &o.map(|f| f.p50()));
            answers.push(k);
            o[k]
        })
        .collect();
    g.end_tick();
    (forecasts, answers)
}

/// Each acted-on forecast's P(any request) made what its forecaster's forecasts at that P came
/// to (`models::calibration`), every forecaster's forecast of every series being scored;
/// returns the forecasters' own P, for `explain`. `name` is the serving forecaster, `version`
/// the model's (its loads).
fn calibrated(
    cal: Option<&Mutex<Calibrator>>,
    (name, version): (&str, u64),
    cands: &[Candidate],
    hs: &[History<'_>],
    options: &[Options],
    (forecasts, answers): (&mut [models::Forecast], &[usize]),
) -> Vec<f32> {
    let raw: Vec<f32> = forecasts.iter().map(|f| f.p_any).collect();
    let Some(cal) = cal else {
        return raw;
    };
    let mut c = cal.lock();
    c.model_version(models::onnx::NAME, version);
    for (i, f) in forecasts.iter_mut().enumerate() {
        let (cand, o) = (&cands[i], &options[i]);
        let names = [
            answered_by(name, 0, &cand.counts),
            GUARD_ANSWERS[1],
            GUARD_ANSWERS[2],
        ];
        let each: [(&str, f32); 3] = std::array::from_fn(|k| (names[k], o[k].p_any));
        f.p_any = c.calibrate(cand.series, &hs[i], &each, answers[i]);
    }
    if let Some(h) = hs.first() {
        c.end_tick(h.last_bucket_start, h.bucket_secs);
    }
    raw
}

/// Planner settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerSection {
    /// Whether the planner runs.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Seconds between planning ticks (fractions allowed: a time-compressed replay keeps a
    /// tick per trace hour at high speed-ups).
    #[serde(default = "default_interval")]
    pub interval_secs: f64,
    /// Minimum P(any request in the horizon) to shadow: the starting point of every
    /// (region, priority class) threshold, which the cost tuner then moves.
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// The ONNX model (its `.json` metadata beside it); the seasonal-naive baseline answers
    /// while it cannot be loaded.
    #[serde(default = "default_model")]
    pub model: std::path::PathBuf,
    /// Whether a baseline (seasonal naive, EWMA) answers a series on which it has lately been
    /// clearly better than the model (`models::guard`): a model is badly wrong on a regime it
    /// never saw, and persistence is not.
    #[serde(default = "default_true")]
    pub guard: bool,
    /// Whether each forecaster's P(any request in the horizon) is calibrated online against
    /// what its forecasts at that P came to (`models::calibration`) before it is thresholded
    /// and priced. Seasonal naive on a broker younger than a week understates P (the days
    /// before it started read as silence); EWMA's Poisson P overstates it.
    #[serde(default = "default_true")]
    pub calibrate: bool,
    /// Shadow bytes an edge may hold when it does not report its capacity (HTTP-only edges).
    #[serde(default = "default_budget")]
    pub budget_bytes_per_edge: u64,
    /// Share of an edge's reported cache capacity (memory + disk) shadows may use.
    #[serde(default = "default_budget_share")]
    pub budget_share: f64,
    /// Floor of the uncertainty safety factor applied to every budget.
    #[serde(default = "default_min_safety")]
    pub min_safety: f32,
    /// Shadow TTL for resources no provider registered (default 3600, the forecast horizon:
    /// at 1800 a shadow expired before the second half of the hour its forecast spoke for).
    #[serde(default = "default_ttl")]
    pub default_ttl_secs: u64,
}

impl PlannerSection {
    /// Shadow bytes edge `e` may hold (before the planner's safety factor): a share of the
    /// capacity it reports, or the fixed budget when it reports none.
    pub fn edge_budget(&self, sync: &EdgeSync, e: usize) -> u64 {
        match sync.capacity(e) {
            Some(cap) => (cap as f64 * self.budget_share) as u64,
            None => self.budget_bytes_per_edge,
        }
    }
}

impl Default for PlannerSection {
    fn default() -> Self {
        PlannerSection {
            enabled: true,
            interval_secs: default_interval(),
            threshold: default_threshold(),
            model: default_model(),
            guard: true,
            calibrate: true,
            budget_bytes_per_edge: default_budget(),
            budget_share: default_budget_share(),
            min_safety: default_min_safety(),
            default_ttl_secs: default_ttl(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_interval() -> f64 {
    60.0
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
    crate::registry::model::DEFAULT_SHADOW_TTL_SECS
}
fn default_budget_share() -> f64 {
    0.1
}
fn default_min_safety() -> f32 {
    0.5
}

/// Seconds of the forecast horizon (4 buckets of 15 minutes).
const HORIZON_SECS: f64 = 3600.0;

/// When the first request is expected, in seconds from now: Poisson arrivals with the mean
/// count `λ = max(−ln(1 − p_any), p50)` over the horizon `H`; the mean first arrival given
/// one falls in the horizon is `1/r − H·e^(−λ)/(1 − e^(−λ))` with `r = λ/H`.
fn expected_arrival_secs(f: &models::Forecast) -> f64 {
    let p = f64::from(f.p_any).clamp(1e-6, 1.0 - 1e-6);
    let lambda = (-(1.0 - p).ln()).max(f64::from(f.p50())).max(1e-6);
    let tail = (-lambda).exp();
    (HORIZON_SECS / lambda - HORIZON_SECS * tail / (1.0 - tail)).clamp(0.0, HORIZON_SECS)
}

/// Uncertainty of a forecast in [0, 1): the p10–p90 width relative to p90.
fn interval_width(f: &models::Forecast) -> f32 {
    let [q10, _, q90] = f.quantiles;
    ((q90 - q10) / (q90 + 1.0)).clamp(0.0, 1.0)
}

/// Why a candidate was or was not shadowed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decision {
    /// Region of the forecast; for a widening, the region widened into.
    pub region: String,
    /// Forecaster that produced it.
    pub forecaster: String,
    /// Predicted requests in the next hour at 0.1/0.5/0.9 (for a widening: in the surging
    /// region).
    pub quantiles: [f32; 3],
    /// P(any request in the next hour) in this decision's region, as calibrated (what the
    /// forecaster's forecasts at its P came to).
    pub p_any: f32,
    /// The forecaster's own P, before calibration (none for a widening, whose `p_any` is the
    /// calibrated P of the series in the region widened into).
    pub p_any_forecast: Option<f32>,
    /// Threshold in force for this region and priority class.
    pub threshold: f32,
    /// Why the cost tuner last moved that threshold.
    pub threshold_reason: Option<String>,
    /// Net (USD) if the shadow is used / wasted, at its size and fill source.
    pub stake: Stake,
    /// The P(any request) it must reach to break even (0 with the gate off; infinite, null
    /// in JSON, when even a used shadow would not pay).
    pub break_even: f32,
    /// The P(any request) every shadow must reach: the byte-precision floor.
    pub precision_floor: f32,
    /// Expected net benefit (USD, × (1 + priority)) used for ranking.
    pub benefit: f64,
    /// Target edge, if the region has a usable one.
    pub edge: Option<String>,
    /// Shadow budget of that edge this tick (capacity share × safety factor).
    pub budget_bytes: Option<u64>,
    /// The safety factor in force.
    pub safety: f32,
    /// Seconds until the first request is expected.
    pub expected_in_secs: f64,
    /// The series' standing against its forecast band (`normal`, `surge`, `drop`).
    pub anomaly: Standing,
    /// Edge that would supply the object (peer fill), if one likely holds it; the stake
    /// assumes it.
    pub peer: Option<String>,
    /// `shadowed`, `kept` (already shadowed), `dropped` (live, but no longer fits the
    /// budget or the copy limit: unshadowed), `below_threshold`, `below_break_even` (above
    /// the threshold, but not likely enough to pay for itself), `below_precision_floor`
    /// (likelier wasted than the precision floor allows), `policy` (region not
    /// allowed), `max_copies` (the policy's copies went to more valuable regions),
    /// `size_unknown` (only bodiless responses seen: nothing to price), `budget`,
    /// `no_edge`, `send_failed`; a surge elsewhere adds `widened` (shadowed ahead of the
    /// surge, budget, break-even and floor aside) or `widen_below_threshold` (the anomaly
    /// source's tuned threshold held it back).
    pub outcome: &'static str,
    /// Seconds since the epoch of the tick.
    pub at: u64,
}

struct Candidate {
    /// The series' identity for the forecaster guard: its resource and region (the cache
    /// key below is the one requests use most, which can change).
    series: u64,
    key: String,
    region: String,
    region_idx: usize,
    counts: Vec<u32>,
    priority: u8,
    /// Mean response size (1 when unknown).
    bytes: u64,
    /// Whether any response of the series carried a size: one answered only without a body
    /// (304s, HEADs) cannot be priced, and 1 byte would put it under every bar.
    size_known: bool,
    ttl: u64,
    allowed: bool,
    /// Requests in the last hour: its owner in this region likely holds it.
    recent: bool,
    /// Owning provider (`-` when unregistered).
    provider: String,
    /// Regions the provider's policy allows (empty: all).
    allowed_regions: Vec<String>,
    /// Most regions the provider's policy lets hold a copy.
    max_copies: u32,
    /// Requests in the last planning interval (anomaly detection).
    window: (u32, f64),
}

/// An order a tick will send: target edge, the order, its attribution and the signal behind it.
type PlannedOrder = (usize, ShadowOrder, OrderInfo, Signal);

/// What a tick knew of a surging series when it widened it: the explain fields a widening
/// shares with its forecast.
struct Surging<'a> {
    forecaster: &'a str,
    quantiles: [f32; 3],
    safety: f32,
    at: u64,
}

/// A surge's widening into one more region, ordered or held back by its source's threshold.
struct Widening {
    region: usize,
    edge: usize,
    peer: Option<PeerRef>,
    signal: Signal,
    admitted: bool,
}

/// P(any request) of every forecast series by (key, region): the score of widening a surge
/// into a region.
fn p_any_by_series<'a>(
    cands: &'a [Candidate],
    forecasts: &[models::Forecast],
) -> HashMap<(&'a str, usize), f32> {
    cands
        .iter()
        .zip(forecasts)
        .map(|(c, f)| ((c.key.as_str(), c.region_idx), f.p_any))
        .collect()
}

/// What one candidate stands to earn, and the odds it must clear besides its threshold.
#[derive(Debug, Clone, Copy)]
struct Bar {
    stake: Stake,
    odds: Odds,
    /// The series is in a drop anomaly: its shadows are being released, none is placed.
    dropping: bool,
    /// Its last fills on the target edge failed, and the wait before the next is not over.
    backoff: bool,
    /// Live copies of its key that no candidate of this tick stands for (placed by an event,
    /// a widening or an earlier broker, or on an edge that no longer owns the key): they take
    /// copies of the policy's limit.
    held_elsewhere: u32,
}

/// The verdict on one candidate.
#[derive(Debug, Clone, PartialEq)]
struct Verdict {
    candidate: usize,
    benefit: f64,
    edge: Option<usize>,
    outcome: &'static str,
}

/// The decision rule, free of I/O: rank candidates by expected net benefit, then admit them
/// in that order while each edge's byte budget lasts, so the least valuable are dropped
/// first. `bars` holds each candidate's stake and the odds it must clear.
/// Shadows already live count against the budget and the copy limit like new ones, whether
/// or not they still pass the checks (they hold the bytes until their TTL): a live shadow
/// that no longer fits (the budget shrank, better candidates arrived) or that its policy no
/// longer allows is `dropped` (unshadowed); one that fits but fails the forecast's checks is
/// `expiring` (left to its TTL, not renewed). A series in a drop anomaly gets
/// `drop_anomaly`: the tick releases its shadows and places none.
#[allow(clippy::too_many_arguments)]
fn decide(
    cands: &[Candidate],
    forecasts: &[models::Forecast],
    bars: &[Bar],
    edge_of: impl Fn(usize) -> Option<usize>,
    is_live: impl Fn(&str, usize) -> bool,
    threshold_of: impl Fn(usize) -> f32,
    budget_of: impl Fn(usize) -> u64,
    overhead: u64,
) -> Vec<Verdict> {
    let mut ranked: Vec<(usize, f64)> = forecasts
        .iter()
        .enumerate()
        .map(|(i, f)| {
            // A live shadow's fill is paid: keeping it is worth what a hit saves, and it
            // yields its place only to a candidate worth more than that, not to one whose
            // forecast is a hair higher (which would drop, purge and refill the two in turn).
            let live = edge_of(i).is_some_and(|e| is_live(&cands[i].key, e));
            let stake = &bars[i].stake;
            let value = if live {
                stake.keep_value(f.p_any)
            } else {
                stake.value(f.p_any)
            };
            // Priority raises a gain and shrinks a loss (a loss made larger would rank the
            // important candidates last when the break-even gate is off).
            let weight = 1.0 + f64::from(cands[i].priority);
            let ranked = if value >= 0.0 {
                value * weight
            } else {
                value / weight
            };
            (i, ranked)
        })
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut used: HashMap<usize, u64> = HashMap::new();
    let mut copies: HashMap<&str, u32> = HashMap::new();
    ranked
        .into_iter()
        .map(|(i, benefit)| {
            let (c, f) = (&cands[i], &forecasts[i]);
            let edge = edge_of(i);
            let failed = if f.p_any < threshold_of(i) {
                Some("below_threshold")
            } else if !c.size_known {
                Some("size_unknown")
            } else if let Some(why) = bars[i].odds.holds_back(f64::from(f.p_any)) {
                Some(why)
            } else if bars[i].backoff {
                Some("fill_backoff")
            } else if !c.allowed {
                Some("policy")
            } else {
                None
            };
            let live = edge.filter(|e| is_live(&c.key, *e));
            let outcome = if bars[i].dropping {
                "drop_anomaly"
            } else if let Some(e) = edge.filter(|_| failed.is_none() || live.is_some()) {
                let n = copies.entry(c.key.as_str()).or_default();
                let takes = c.bytes.saturating_add(overhead);
                let fits = used.get(&e).copied().unwrap_or(0) + takes <= budget_of(e);
                let room = *n + bars[i].held_elsewhere < c.max_copies;
                let admitted = fits && room && c.allowed;
                if admitted {
                    *used.entry(e).or_default() += takes;
                    *n += 1;
                }
                match (live.is_some(), admitted, failed, room) {
                    (true, true, None, _) => "kept",
                    (true, true, Some(_), _) => "expiring",
                    (true, false, _, _) => "dropped",
                    (false, _, _, false) => "max_copies",
                    (false, true, _, _) => "shadowed",
                    (false, false, _, true) => "budget",
                }
            } else {
                failed.unwrap_or("no_edge")
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

/// What each cached object takes of an edge's memory beside its body: its metadata and the
/// response header the edge keeps decoded for hits (edge-node's `StoredObject::weight`;
/// about 3 KB for a typical header).
pub const EDGE_ENTRY_OVERHEAD: u64 = 3072;

/// What a shadow of a `bytes` body takes of its edge's shadow budget: small objects cost
/// their entry's overhead too, or a budget of them would fill several times its share.
pub fn footprint(bytes: u64) -> u64 {
    bytes.saturating_add(EDGE_ENTRY_OVERHEAD)
}

/// Drop the live shadows that expired by `now`, and keys left with none.
fn sweep(live: &mut HashMap<String, Vec<(usize, Instant)>>, now: Instant) {
    live.retain(|_, held| {
        held.retain(|(_, exp)| *exp > now);
        !held.is_empty()
    });
}

/// Planner state shared with the explain endpoint.
#[derive(Default)]
pub struct PlannerState {
    decisions: RwLock<HashMap<String, Vec<Decision>>>,
    /// key → the edges holding our shadow of it, and when each expires. By key, because
    /// co-access asks per follower and purges forget per key, each with the lock held.
    live: Mutex<HashMap<String, Vec<(usize, Instant)>>>,
    /// Smoothed safety factor (`None` before the first tick).
    safety: Mutex<Option<f32>>,
    /// Forecast bands of the monitored series.
    detector: Mutex<Detector>,
    /// Recent anomaly flags and clears, newest last.
    anomalies: Mutex<VecDeque<AnomalyEvent>>,
    /// Edges whose shadows (placed before this broker started) were listed and adopted.
    adopted: Mutex<HashSet<usize>>,
    /// (key, edge) whose last fills failed, and until when no order is sent for it.
    backoff: Mutex<HashMap<(String, usize), Backoff>>,
    /// Keys with live shadows left after the last sweep in [`Self::record`].
    swept_at_len: Mutex<usize>,
    /// What the last tick left of each edge's shadow budget (see [`Taken`]).
    taken: Mutex<Option<Taken>>,
    /// The last forgets (purges, restarts), for placements that were in flight across one.
    forgotten: Mutex<Forgotten>,
}

/// Forgets of live shadows lately, so that an order in flight while a purge forgot its key
/// (the edge took the order, then the purge removed its copy) is not recorded live after the
/// purge: the broker would then count a shadow the edge no longer has against the budget,
/// and not order it again until its TTL ran out.
#[derive(Debug, Default)]
struct Forgotten {
    /// Forgets so far.
    generation: u64,
    /// (generation, what) of the last [`FORGETS_KEPT`], oldest first.
    recent: VecDeque<(u64, Forget)>,
}

/// What a forget covered.
#[derive(Debug)]
enum Forget {
    /// A key, or every key under a prefix ending in `*`.
    Target(String),
    /// Every shadow of an edge.
    Edge(usize),
}

/// Forgets [`Forgotten`] keeps; an order in flight across more of them is not recorded.
const FORGETS_KEPT: usize = 4096;

impl Forgotten {
    fn note(&mut self, what: Forget) {
        self.generation += 1;
        if self.recent.len() >= FORGETS_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back((self.generation, what));
    }

    /// Whether a forget since generation `since` covered `key` on `edge`.
    fn covers(&self, key: &str, edge: usize, since: u64) -> bool {
        if self.generation == since {
            return false;
        }
        // Forgets after `since` that are no longer kept may have covered it.
        if self.recent.front().is_none_or(|(g, _)| *g > since + 1) {
            return true;
        }
        self.recent
            .iter()
            .filter(|(g, _)| *g > since)
            .any(|(_, f)| match f {
                Forget::Target(t) => match t.strip_suffix('*') {
                    Some(prefix) => key.starts_with(prefix),
                    None => t == key,
                },
                Forget::Edge(e) => *e == edge,
            })
    }
}

/// Per edge, a tick's shadow budget (its safety factor applied) and the bytes its shadows
/// take (kept, expiring, shadowed, and those no candidate stood for), plus what co-access
/// placed since. Good until the next tick replaces it; a stale one (the planner off, or its
/// ticks ending early) is not used.
#[derive(Debug)]
struct Taken {
    at: Instant,
    budgets: Vec<u64>,
    bytes: Vec<u64>,
}

/// Fills of one key on one edge that failed in a row (the origin forbids caching, the body
/// outgrows the edge's object limit, the origin fails): each doubles the wait before the
/// next order, from one planning interval up to [`MAX_BACKOFF_INTERVALS`], so a forecast
/// that keeps clearing its bar does not cost the origin a fetch every tick.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    until: Instant,
}

/// Longest wait after failed fills, in planning intervals.
const MAX_BACKOFF_INTERVALS: u32 = 64;
/// How long a key's failures are remembered after its wait ended.
const BACKOFF_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// A series entering or leaving an anomaly.
#[derive(Debug, Clone, Serialize)]
pub struct AnomalyEvent {
    /// Seconds since the epoch.
    pub at: u64,
    /// Resource key.
    pub key: String,
    /// Region.
    pub region: String,
    /// New standing.
    pub standing: Standing,
    /// Requests seen in the window and the band they were held against.
    pub detail: String,
}

impl PlannerState {
    /// The shadows the ledger settled since the last call are no longer live, and a failed
    /// fill among them backs its key off on that edge. Not one whose key has an order open on
    /// that edge again: an order is settled as its shadow ends, so an open one was recorded
    /// since, and stands for a newer shadow (co-access may place one between two ticks).
    pub fn end_settled(&self, ledger: &Ledger, interval: Duration, now: Instant) {
        self.forget_old_backoffs(now);
        for e in ledger.take_ended() {
            if ledger.has_order(&e.key, e.edge) {
                continue;
            }
            self.remove(&e.key, e.edge);
            self.ended(e.key, e.edge, e.failed, interval, now);
        }
    }

    /// Forget everything about `host`'s keys (live shadows and the decisions `explain` shows)
    /// when its owner deletes it: whoever registers it next sees none of it.
    pub fn forget_host(&self, host: &str) {
        let prefix = format!("{host}/");
        self.forget(&format!("{prefix}*"));
        self.backoff
            .lock()
            .retain(|(k, _), _| !k.starts_with(&prefix));
        self.decisions
            .write()
            .retain(|k, _| !k.starts_with(&prefix));
    }

    /// Forget the shadows of `key`, or of every key under `prefix*`, after a purge removed
    /// them from the edges, so the next tick may place them again. Returns the generation
    /// this forget made, for an order sent right after it ([`Self::record_placed`]).
    pub fn forget(&self, target: &str) -> u64 {
        let mut forgotten = self.forgotten.lock();
        forgotten.note(Forget::Target(target.to_string()));
        let since = forgotten.generation;
        let mut live = self.live.lock();
        match target.strip_suffix('*') {
            Some(prefix) => live.retain(|k, _| !k.starts_with(prefix)),
            None => {
                live.remove(target);
            }
        }
        since
    }

    /// Forget every shadow edge `edge` held (it restarted and lost them).
    pub fn forget_edge(&self, edge: usize) {
        let mut forgotten = self.forgotten.lock();
        forgotten.note(Forget::Edge(edge));
        self.live.lock().retain(|_, held| {
            held.retain(|(e, _)| *e != edge);
            !held.is_empty()
        });
    }

    /// Set each edge's budget and what its shadows take, as a tick left them.
    fn set_taken(&self, budgets: Vec<u64>, bytes: Vec<u64>) {
        *self.taken.lock() = Some(Taken {
            at: Instant::now(),
            budgets,
            bytes,
        });
    }

    /// Take `bytes` for a placement outside a tick (co-access) on `edge`, whose whole shadow
    /// budget is `budget`, if they fit what a tick of the last `fresh_for` left; whether they
    /// did. Without such a tick (the planner off, its ticks ending early) they must fit beside
    /// `held`, the shadow bytes the edge last reported (its reports lag by a stats poll).
    pub fn take_budget(
        &self,
        edge: usize,
        bytes: u64,
        budget: u64,
        fresh_for: Duration,
        held: u64,
    ) -> bool {
        let mut taken = self.taken.lock();
        let Some(t) = taken.as_mut().filter(|t| t.at.elapsed() < fresh_for) else {
            return held.saturating_add(bytes) <= budget;
        };
        let room = t.budgets.get(edge).map_or(budget, |b| (*b).min(budget));
        let Some(used) = t.bytes.get_mut(edge) else {
            return bytes <= room;
        };
        let fits = used.saturating_add(bytes) <= room;
        if fits {
            *used += bytes;
        }
        fits
    }

    /// Give back `bytes` [`Self::take_budget`] took on `edge` for an order the edge did not
    /// take: an edge that keeps refusing would otherwise hold co-access off it until the next
    /// tick.
    pub fn return_budget(&self, edge: usize, bytes: u64) {
        if let Some(used) = self
            .taken
            .lock()
            .as_mut()
            .and_then(|t| t.bytes.get_mut(edge))
        {
            *used = used.saturating_sub(bytes);
        }
    }

    /// Edges holding a live shadow of `key`.
    pub fn live_edges(&self, key: &str) -> Vec<usize> {
        let now = Instant::now();
        self.live.lock().get(key).map_or_else(Vec::new, |held| {
            held.iter()
                .filter(|(_, exp)| *exp > now)
                .map(|(e, _)| *e)
                .collect()
        })
    }

    /// Forgets so far: taken before an order is sent, for [`Self::record_placed`].
    pub fn generation(&self) -> u64 {
        self.forgotten.lock().generation
    }

    /// [`Self::record`] a shadow whose order was sent when [`Self::generation`] was
    /// `since`, unless a purge or restart forgot it meanwhile: the edge may have taken the
    /// order before the purge removed its copy. (One that took it after holds a shadow the
    /// broker does not count; the edge ends it at its TTL, and the next order finds it held.)
    /// Whether it was recorded.
    pub fn record_placed(&self, key: &str, edge: usize, ttl: Duration, since: u64) -> bool {
        let forgotten = self.forgotten.lock();
        if forgotten.covers(key, edge, since) {
            return false;
        }
        // Recorded with the forgets locked, so none comes between the check and the record.
        self.record(key, edge, ttl);
        drop(forgotten);
        true
    }

    /// Record a shadow the edge accepted, live for `ttl` (wall time). Expired entries are
    /// swept here too once the map has doubled since the last sweep: co-access places
    /// shadows with the planner off, when no tick sweeps them.
    pub fn record(&self, key: &str, edge: usize, ttl: Duration) {
        let now = Instant::now();
        let mut live = self.live.lock();
        let held = live.entry(key.to_string()).or_default();
        match held.iter_mut().find(|(e, _)| *e == edge) {
            Some(h) => h.1 = now + ttl,
            None => held.push((edge, now + ttl)),
        }
        let mut swept = self.swept_at_len.lock();
        if live.len() >= (*swept).max(1024) * 2 {
            sweep(&mut live, now);
            *swept = live.len();
        }
    }

    /// Forget one live shadow (unshadowed).
    fn remove(&self, key: &str, edge: usize) {
        let mut live = self.live.lock();
        if let Some(held) = live.get_mut(key) {
            held.retain(|(e, _)| *e != edge);
            if held.is_empty() {
                live.remove(key);
            }
        }
    }

    /// Drop expired shadows and return a copy of the live ones for a tick's decisions.
    fn live_now(&self, now: Instant) -> HashMap<(String, usize), Instant> {
        self.forget_old_backoffs(now);
        let mut live = self.live.lock();
        sweep(&mut live, now);
        live.iter()
            .flat_map(|(k, held)| held.iter().map(|(e, exp)| ((k.clone(), *e), *exp)))
            .collect()
    }

    /// Forget backoffs over for [`BACKOFF_MEMORY`]; run by every tick, the planner's or, with
    /// it off, co-access's settling loop.
    fn forget_old_backoffs(&self, now: Instant) {
        self.backoff
            .lock()
            .retain(|_, b| now.saturating_duration_since(b.until) < BACKOFF_MEMORY);
    }

    /// An edge reported how a shadow of `key` ended: a failed fill puts the pair in backoff
    /// (twice as long as the last time), any other ending clears it.
    fn ended(&self, key: String, edge: usize, failed: bool, interval: Duration, now: Instant) {
        let mut backoff = self.backoff.lock();
        if !failed {
            backoff.remove(&(key, edge));
            return;
        }
        let b = backoff.entry((key, edge)).or_insert(Backoff {
            failures: 0,
            until: now,
        });
        b.failures = b.failures.saturating_add(1);
        let intervals = 1u32
            .checked_shl(b.failures - 1)
            .unwrap_or(u32::MAX)
            .min(MAX_BACKOFF_INTERVALS);
        b.until = now + interval * intervals;
    }

    /// Whether orders for `key` on `edge` wait after failed fills (every source's: a
    /// co-access follower or a widening that cannot be cached fails the same way).
    pub fn backed_off(&self, key: &str, edge: usize, now: Instant) -> bool {
        self.backoff
            .lock()
            .get(&(key.to_string(), edge))
            .is_some_and(|b| b.until > now)
    }

    /// Fold this tick's forecast uncertainty into the safety factor and return it: the mean
    /// interval width of the `admitted` forecasts (those that clear their bars), smoothed over
    /// ticks, shrinks the budget from 1 down to `floor`.
    fn update_safety<'a>(
        &self,
        admitted: impl Iterator<Item = &'a models::Forecast>,
        floor: f32,
    ) -> f32 {
        let widths: Vec<f32> = admitted.map(interval_width).collect();
        let mut s = self.safety.lock();
        if widths.is_empty() {
            return s.unwrap_or(1.0);
        }
        let now =
            (1.0 - widths.iter().sum::<f32>() / widths.len() as f32).max(floor.clamp(0.0, 1.0));
        let next = s.map_or(now, |prev| 0.7 * prev + 0.3 * now);
        *s = Some(next);
        next
    }

    /// Recent anomaly events (newest last).
    pub fn anomalies(&self) -> Vec<AnomalyEvent> {
        self.anomalies.lock().iter().cloned().collect()
    }

    /// The latest decisions about `key` (`host/path`).
    pub fn explain(&self, key: &str) -> Option<Vec<Decision>> {
        self.decisions.read().get(key).cloned()
    }
}

/// Send a shadow order to `edge`; once the edge accepted it, remember the shadow as live (so
/// later ticks keep it instead of re-sending; not if a purge forgot its key while the order
/// was in flight, [`PlannerState::record_placed`]) and as ours in the cost ledger, placed by
/// `signal` (so its outcome is attributed to the provider, region, class and source, and tunes
/// that source's threshold). Every placement — planner, modification events, co-access,
/// anomaly widening — goes through here.
pub async fn place_with(
    sync: &EdgeSync,
    state: &PlannerState,
    ledger: &Ledger,
    edge: usize,
    mut order: ShadowOrder,
    info: OrderInfo,
    signal: Signal,
) -> bool {
    // The lifetime the edge gives it: whole wall seconds, at least one ([`EdgeSync::shadow`]);
    // on a fast clock the exact one would be swept here (and priced) before the edge drops it.
    let ttl = Duration::from_secs(crate::clock::wall_secs(order.ttl_secs));
    let key = order.key.clone();
    order.deadline_ms = ledger.order_id(&key, edge, order.deadline_ms);
    let id = (order.deadline_ms != 0).then_some(order.deadline_ms);
    let placed_ms = edge_node::sync::protocol::unix_ms_now();
    let since = state.generation();
    let peer = order.peer.is_some();
    let accepted_by = sync.shadow(edge, order).await;
    if let Some(boot_id) = accepted_by {
        if !state.record_placed(&key, edge, ttl, since) {
            tracing::debug!(%key, edge, "purged while its order was in flight: not recorded live");
        }
        let accepted = Accepted { peer, boot_id };
        ledger.record_order(&key, edge, info, signal, ttl, placed_ms, id, accepted);
    }
    accepted_by.is_some()
}

/// [`place_with`] for a provider's `created` event: unscored, attributed to
/// [`Signal::EVENT`].
pub async fn place(
    sync: &EdgeSync,
    state: &PlannerState,
    ledger: &Ledger,
    edge: usize,
    order: ShadowOrder,
    info: OrderInfo,
) -> bool {
    place_with(sync, state, ledger, edge, order, info, Signal::EVENT).await
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
    ledger: Arc<Ledger>,
    anomaly: AnomalySection,
    metrics: BrokerMetrics,
    /// Work the shutdown drain waits for: a tick's orders are sent whole or not at all.
    inflight: InflightCounter,
    /// Which forecaster answers each series (`[planner] guard`; `None`: always the model).
    guard: Option<Arc<Mutex<SeriesGuard>>>,
    /// Calibration of every forecaster's P (`[planner] calibrate`; `None`: P as forecast).
    calibration: Option<Arc<Mutex<Calibrator>>>,
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
        (ledger, anomaly): (Arc<Ledger>, AnomalySection),
        metrics: BrokerMetrics,
    ) -> Self {
        let guard = cfg.guard.then(|| {
            Arc::new(Mutex::new(SeriesGuard::new(
                GUARD_ANSWERS.len(),
                GuardConfig::default(),
            )))
        });
        let calibration = cfg
            .calibrate
            .then(|| Arc::new(Mutex::new(Calibrator::new())));
        Planner {
            calibration,
            ledger,
            anomaly,
            cfg,
            fleet,
            health,
            registry,
            series,
            sync,
            state,
            metrics,
            inflight: InflightCounter::default(),
            guard,
        }
    }

    /// Count each planning tick in `inflight`, so a graceful shutdown waits for its orders
    /// (the broker exits once its in-flight work is done).
    pub fn counting_in(mut self, inflight: InflightCounter) -> Self {
        self.inflight = inflight;
        self
    }

    fn candidates(&self, now: u64) -> Vec<Candidate> {
        let store = self.series.read();
        let width = store.bucket_secs().max(1);
        let interval = crate::clock::clock_secs_f64(self.cfg.interval_secs);
        // The buckets that cover the whole last interval, from the one it began in (counted
        // whole) to the one filling now: without that first one, a tick one second into a
        // bucket would judge one second of traffic.
        let k = interval.div_ceil(width).max(1) as usize + 1;
        let window_secs = ((k as u64 - 1) * width + now % width + 1) as f64;
        let mut out = Vec::new();
        for (resource, region, s) in store.iter() {
            let Some(region_idx) = self.fleet.region_index(region) else {
                continue;
            };
            // Only registered hosts: records of a deleted host's last requests may land
            // after its series were forgotten. A host registered again plans from its new
            // registration's history only.
            let host = host_of(resource);
            if self.registry.origin(host).is_none() {
                continue;
            }
            let since = store.bucket_of(self.registry.registered_since(host));
            let owned;
            let s = if s.buckets.front().is_some_and(|b| b.start < since) {
                owned = s.since(since);
                &owned
            } else {
                s
            };
            let counts = s.counts(FORECAST_BUCKET, HISTORY_BUCKETS, last_complete_bucket(now));
            if counts.iter().all(|c| *c == 0) {
                continue;
            }
            let recent = models::features::asked_lately(&counts);
            let seen = s
                .counts(width, k, now)
                .iter()
                .fold(0u32, |a, c| a.saturating_add(*c));
            let window = (seen, window_secs);
            let reg = self.registry.resource_for_key(resource);
            let mean_bytes = s.mean_bytes();
            let allowed = reg.as_ref().is_none_or(|r| {
                r.policy.allowed_regions.is_empty()
                    || r.policy.allowed_regions.iter().any(|x| x == region)
            });
            // Shadow under the cache key requests use (it carries their query string), and
            // place it where the broker routes that key.
            let key = if s.key.is_empty() { resource } else { &s.key };
            out.push(Candidate {
                series: series_id(resource, region_idx),
                key: key.to_string(),
                region: region.to_string(),
                region_idx,
                counts,
                priority: reg.as_ref().map_or(DEFAULT_PRIORITY, |r| r.priority),
                bytes: mean_bytes.unwrap_or(0).max(1),
                size_known: mean_bytes.is_some(),
                ttl: reg
                    .as_ref()
                    .map_or(self.cfg.default_ttl_secs, |r| r.shadow_ttl_secs),
                allowed,
                recent,
                provider: reg
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |r| r.provider.clone()),
                allowed_regions: reg
                    .as_ref()
                    .map_or_else(Vec::new, |r| r.policy.allowed_regions.clone()),
                max_copies: reg.as_ref().map_or(u32::MAX, |r| r.policy.max_copies),
                window,
            });
        }
        out
    }

    /// Hold each series' recent requests against the band its previous forecast predicted,
    /// log standings that change, and return every candidate's standing.
    fn anomalies(
        &self,
        cands: &[Candidate],
        forecasts: &[models::Forecast],
        now: u64,
    ) -> Vec<Standing> {
        let mut detector = self.state.detector.lock();
        let mut events = Vec::new();
        let out = cands
            .iter()
            .zip(forecasts)
            .map(|(c, f)| {
                let band = (
                    f64::from(f.quantiles[0]) / HORIZON_SECS,
                    f64::from(f.quantiles[2]) / HORIZON_SECS,
                );
                if let Some(s) =
                    detector.observe(&c.key, c.region_idx, c.window, band, &self.anomaly)
                {
                    events.push(AnomalyEvent {
                        at: now,
                        key: c.key.clone(),
                        region: c.region.clone(),
                        standing: s,
                        detail: format!(
                            "{} requests in {:.0} s against a p10–p90 band of {:.2}–{:.2} per hour",
                            c.window.0, c.window.1, f.quantiles[0], f.quantiles[2]
                        ),
                    });
                }
                detector.standing(&c.key, c.region_idx)
            })
            .collect();
        let seen: HashSet<(&str, usize)> = cands
            .iter()
            .map(|c| (c.key.as_str(), c.region_idx))
            .collect();
        detector.retain(|k, r| seen.contains(&(k, r)));
        let (surges, drops) = detector.census();
        drop(detector);
        self.metrics
            .anomalies
            .with_label_values(&["surge"])
            .set(surges as i64);
        self.metrics
            .anomalies
            .with_label_values(&["drop"])
            .set(drops as i64);
        let mut log = self.state.anomalies.lock();
        for e in events {
            tracing::warn!(key = %e.key, region = %e.region, standing = e.standing.label(), detail = %e.detail, "demand anomaly");
            self.metrics
                .anomaly_events
                .with_label_values(&[e.standing.label()])
                .inc();
            push_bounded(&mut log, e, ANOMALY_LOG);
        }
        out
    }

    /// Edges likely holding each key this tick: where it is shadowed, and the owner edge
    /// (`edges`, by candidate) of every region that requested it in the last hour.
    fn holders<'a>(
        cands: &'a [Candidate],
        edges: &[Option<usize>],
        live: &'a HashMap<(String, usize), Instant>,
    ) -> HashMap<&'a str, Vec<usize>> {
        let mut out: HashMap<&str, Vec<usize>> = HashMap::new();
        for (k, e) in live.keys() {
            out.entry(k.as_str()).or_default().push(*e);
        }
        for (c, e) in cands.iter().zip(edges) {
            if let (true, Some(e)) = (c.recent, e) {
                out.entry(c.key.as_str()).or_default().push(*e);
            }
        }
        out
    }

    /// Live shadows no candidate of this tick stands for: copies per key, and the bytes they
    /// hold per edge where their size is known (the key is a candidate elsewhere). They are
    /// not ranked (no forecast speaks for them there) but hold their copy and bytes until
    /// their TTL.
    fn held_elsewhere<'a>(
        cands: &'a [Candidate],
        edges: &[Option<usize>],
        live: &'a HashMap<(String, usize), Instant>,
        n_edges: usize,
        overhead: u64,
    ) -> (HashMap<&'a str, u32>, Vec<u64>) {
        let owned: HashSet<(&str, usize)> = cands
            .iter()
            .zip(edges)
            .filter_map(|(c, e)| e.map(|e| (c.key.as_str(), e)))
            .collect();
        let size: HashMap<&str, u64> = cands
            .iter()
            .map(|c| (c.key.as_str(), c.bytes.saturating_add(overhead)))
            .collect();
        let mut copies: HashMap<&str, u32> = HashMap::new();
        let mut bytes = vec![0u64; n_edges];
        for (key, e) in live.keys() {
            if owned.contains(&(key.as_str(), *e)) {
                continue;
            }
            *copies.entry(key.as_str()).or_default() += 1;
            if let (Some(b), Some(slot)) = (size.get(key.as_str()), bytes.get_mut(*e)) {
                *slot += b;
            }
        }
        (copies, bytes)
    }

    /// The nearest usable edge among `holders` of `key` to supply a fill on `target` (not
    /// one whose origin table routes the key's host otherwise: its copy may be another
    /// origin's).
    fn peer_for(&self, target: usize, key: &str, holders: &[usize]) -> Option<PeerRef> {
        let host = host_of(key);
        let usable =
            |e: &usize| *e != target && self.health.is_up(*e) && self.health.serves_host(*e, host);
        self.fleet
            .regions_by_distance(self.fleet.edge_region(target))
            .into_iter()
            .find_map(|r| {
                holders
                    .iter()
                    .filter(|e| usable(e) && self.fleet.edge_region(**e) == r)
                    .find_map(|e| {
                        self.fleet.addresses.get(*e).sync.map(|addr| PeerRef {
                            id: self.fleet.edges[*e].id.clone(),
                            addr,
                        })
                    })
            })
    }

    /// Shadow bytes edge `e` may hold before the safety factor.
    /// Wall time between planning ticks.
    fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.cfg.interval_secs.max(MIN_INTERVAL_SECS))
    }

    fn base_budget(&self, e: usize) -> u64 {
        self.cfg.edge_budget(&self.sync, e)
    }

    /// Adopt the shadows edges still hold from before this broker started, once per edge:
    /// they count against the budget (instead of being ordered again) and their outcomes
    /// are attributed to their provider, region and class.
    async fn adopt(&self) {
        let pending: Vec<usize> = {
            let done = self.state.adopted.lock();
            (0..self.fleet.edges.len())
                .filter(|e| !done.contains(e))
                .collect()
        };
        for e in pending {
            let since = self.state.generation();
            let Some((shadows, boot_id)) = self.sync.live_shadows(e).await else {
                continue;
            };
            let region = self.fleet.edge_region(e);
            for s in &shadows {
                // An edge's word, bounded like an order's TTL would be.
                let ttl = Duration::from_secs(s.ttl_secs.min(MAX_ADOPTED_TTL_SECS));
                // Listed before a purge that removed it: not live any more.
                if !self.state.record_placed(&s.key, e, ttl, since) {
                    continue;
                }
                // After a restart, a shadow the new process lists that this broker ordered
                // since (before the restart was seen) keeps its order: the signal that placed
                // it, which its outcome tunes.
                if self.ledger.has_order_of(&s.key, e, boot_id) {
                    continue;
                }
                let provider = s
                    .key
                    .split_once('/')
                    .and_then(|(host, _)| self.registry.origin(host))
                    .map_or_else(|| "-".to_string(), |o| o.provider);
                // Its size is not listed; filled already, it is not what a loss would price.
                let info = OrderInfo {
                    provider,
                    region,
                    class: Class::of(s.priority),
                    bytes: 0,
                };
                let now_ms = edge_node::sync::protocol::unix_ms_now();
                let ledger = &self.ledger;
                // Its outcome comes from the process that listed it.
                let by = Accepted {
                    peer: false,
                    boot_id,
                };
                ledger.record_order(&s.key, e, info, Signal::ADOPTED, ttl, now_ms, None, by);
            }
            self.state.adopted.lock().insert(e);
            if !shadows.is_empty() {
                let edge = &self.fleet.edges[e].id;
                tracing::info!(%edge, shadows = shadows.len(), "adopted the live shadows an edge holds");
            }
        }
    }

    /// Order a surging candidate into the nearest other regions its policy allows, up to its
    /// copy limit, where the anomaly threshold admits it: a widening is a bet that the surge
    /// spreads, scored by the target region's own P(any request) (0 where it has no history),
    /// and held to the outcomes of earlier widenings there (`widen_below_threshold`).
    fn widen(
        &self,
        c: &Candidate,
        live: &HashMap<(String, usize), Instant>,
        holders: &HashMap<&str, Vec<usize>>,
        p_any: &HashMap<(&str, usize), f32>,
        now_ms: u64,
        orders: &mut Vec<PlannedOrder>,
    ) -> Vec<Widening> {
        let mut out = Vec::new();
        // Ungated by break-even, a widening still needs a size to charge to the budget.
        if !c.size_known {
            return out;
        }
        let targets = self
            .fleet
            .regions_by_distance(c.region_idx)
            .into_iter()
            .skip(1)
            .take(self.anomaly.widen_regions);
        for r in targets {
            let name = &self.fleet.regions[r];
            if !c.allowed_regions.is_empty() && !c.allowed_regions.contains(name) {
                continue;
            }
            let held = live.keys().filter(|(k, _)| k == &c.key).count()
                + orders.iter().filter(|(_, o, _, _)| o.key == c.key).count();
            if held >= c.max_copies as usize {
                break;
            }
            let Some(e) = self.fleet.edge_in_region(&c.key, r, &self.health) else {
                continue;
            };
            if live.contains_key(&(c.key.clone(), e))
                || orders
                    .iter()
                    .any(|(oe, o, _, _)| *oe == e && o.key == c.key)
            {
                continue;
            }
            if self.state.backed_off(&c.key, e, Instant::now()) {
                self.metrics
                    .planner_decisions
                    .with_label_values(&["widen_fill_backoff"])
                    .inc();
                continue;
            }
            let signal = Signal::anomaly(p_any.get(&(c.key.as_str(), r)).copied().unwrap_or(0.0));
            let admitted = self.ledger.admits(signal, r, c.priority);
            self.metrics
                .planner_decisions
                .with_label_values(&[if admitted {
                    "widened"
                } else {
                    "widen_below_threshold"
                }])
                .inc();
            let held = holders.get(c.key.as_str()).map_or(&[][..], Vec::as_slice);
            let peer = self.peer_for(e, &c.key, held);
            out.push(Widening {
                region: r,
                edge: e,
                peer: peer.clone(),
                signal,
                admitted,
            });
            if !admitted {
                continue;
            }
            let order = ShadowOrder {
                key: c.key.clone(),
                ttl_secs: c.ttl,
                priority: c.priority,
                deadline_ms: now_ms,
                peer,
                refresh: false,
            };
            let info = OrderInfo {
                provider: c.provider.clone(),
                region: r,
                class: Class::of(c.priority),
                bytes: c.bytes,
            };
            orders.push((e, order, info, signal));
        }
        out
    }

    /// The explain entry of one widening of surging candidate `c`, in the region widened into.
    fn widening_decision(
        &self,
        c: &Candidate,
        surge: &Surging<'_>,
        w: Widening,
        budget: u64,
    ) -> Decision {
        let (threshold, threshold_reason) =
            self.ledger
                .threshold_for(w.signal.source, w.region, c.priority);
        let stake = self.ledger.stake(c.bytes, w.peer.is_some(), c.ttl);
        let p = w.signal.score;
        Decision {
            region: self.fleet.regions[w.region].clone(),
            forecaster: surge.forecaster.to_string(),
            quantiles: surge.quantiles,
            p_any: p,
            p_any_forecast: None,
            threshold,
            threshold_reason,
            stake,
            break_even: 0.0,
            precision_floor: 0.0,
            benefit: stake.value(p) * (1.0 + f64::from(c.priority)),
            edge: Some(self.fleet.edges[w.edge].id.clone()),
            budget_bytes: Some(budget),
            safety: surge.safety,
            expected_in_secs: 0.0,
            anomaly: Standing::Surge,
            peer: w.peer.map(|p| p.id),
            outcome: if w.admitted {
                "widened"
            } else {
                "widen_below_threshold"
            },
            at: surge.at,
        }
    }

    /// A restarted edge lost its marks (they live in its memory): what it held is no longer
    /// live, and whatever it lists now is adopted. Run as soon as a restart is seen, not at
    /// the next tick, which would also forget the orders that tick's predecessor placed on
    /// the new process; and at every tick, for edges not yet adopted.
    async fn catch_up_with_restarts(&self) {
        for e in self.sync.take_restarted() {
            self.state.forget_edge(e);
            self.state.adopted.lock().remove(&e);
        }
        self.adopt().await;
    }

    /// Settle the shadows that ended and tune the thresholds. Every tick does, whether or not
    /// any series is due a forecast (a quiet hour still prices the shadows it saw end), and
    /// so does a disabled planner's loop: co-access places shadows without it.
    async fn settle(&self, now: u64) {
        self.catch_up_with_restarts().await;
        let (wall, interval) = (Instant::now(), self.interval());
        self.state.end_settled(&self.ledger, interval, wall);
        self.ledger.tune(now);
    }

    /// Series per forecaster the guard let answer this tick (`answers`, indices into
    /// `GUARD_ANSWERS`), in `shadowcdn_broker_forecaster_series`.
    fn count_answers(&self, answers: &[usize]) {
        if self.guard.is_none() {
            return;
        }
        for (k, label) in GUARD_ANSWERS.iter().enumerate() {
            let n = answers.iter().filter(|a| **a == k).count();
            self.metrics
                .forecaster_series
                .with_label_values(&[label])
                .set(n as i64);
        }
    }

    /// Forecasts scored by the calibration since the last tick, in
    /// `shadowcdn_broker_forecast_outcomes_total`.
    fn count_outcomes(&self) {
        let Some(cal) = &self.calibration else {
            return;
        };
        let scored = cal.lock().take_scored();
        for ((forecaster, recent, band), (came, not)) in scored {
            let band = format!("{:.1}", band as f64 / models::calibration::BANDS as f64);
            let last_hour = if recent { "asked" } else { "quiet" };
            for (outcome, n) in [("came", came), ("did_not", not)] {
                self.metrics
                    .forecast_outcomes
                    .with_label_values(&[&forecaster, last_hour, &band, outcome])
                    .inc_by(n);
            }
        }
    }

    async fn tick(&self, forecaster: &Arc<ReloadingForecaster>) {
        let now = now_secs();
        self.settle(now).await;
        let wall = Instant::now();
        let cands = self.candidates(now);
        if cands.is_empty() {
            // Nothing to forecast, but a replaced model (or one back after a failure) is
            // still picked up, and the fallback gauge follows.
            let fc = forecaster.clone();
            let _ = tokio::task::spawn_blocking(move || fc.check_reload()).await;
            self.count_answers(&[]);
            // Nothing is anomalous or decided now: the gauges and the explain endpoint say so
            // rather than show the last busy tick for good (the last host deleted, say).
            self.anomalies(&[], &[], now);
            self.state.decisions.write().clear();
            return;
        }
        let last = last_complete_bucket(now) as i64;
        // Inference is CPU work: keep it off the async workers.
        let fc = forecaster.clone();
        let guard = self.guard.clone();
        let cal = self.calibration.clone();
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
            // Which model serves: a reload, or a model that cannot load (the baseline serving),
            // starts the guard's records afresh; a reload, the calibration of the model's P. One
            // batch the model failed (its answers replaced by the baseline's) does not: it says
            // nothing of the series the guard judged.
            let loads = fc.status().loads.load(std::sync::atomic::Ordering::Relaxed);
            let model = if fc.model_loaded() {
                "model"
            } else {
                "fallback"
            };
            let serving = xxhash_rust::xxh3::xxh3_64_with_seed(model.as_bytes(), loads);
            let name = fc.name().to_string();
            let forecasts = forecasts.map(|f| {
                let options = with_baselines(f, &hs);
                let (mut f, answers) = guarded(guard.as_deref(), serving, &cands, &hs, &options);
                let raw = calibrated(
                    cal.as_deref(),
                    (&name, loads),
                    &cands,
                    &hs,
                    &options,
                    (&mut f, &answers),
                );
                (f, answers, raw)
            });
            (cands, forecasts, name)
        })
        .await;
        let (cands, (forecasts, answers, raw_p), name) = match joined {
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
        self.count_answers(&answers);
        self.count_outcomes();
        // A snapshot for this tick's decisions; every change goes to the shared state at
        // once, so shadows that events or co-access place while the tick sends are kept.
        let live = self.state.live_now(Instant::now());
        let standings = self.anomalies(&cands, &forecasts, now);
        let thresholds: Vec<(f32, Option<String>)> = cands
            .iter()
            .map(|c| self.ledger.threshold(c.region_idx, c.priority))
            .collect();
        // Each candidate's target edge and the peer that would fill it there: a peer fill
        // costs inter-edge transfer instead of origin egress, which sets its break-even.
        let edges: Vec<Option<usize>> = cands
            .iter()
            .map(|c| {
                self.fleet
                    .edge_in_region(&c.key, c.region_idx, &self.health)
            })
            .collect();
        let holders = Self::holders(&cands, &edges, &live);
        let peers: Vec<Option<PeerRef>> = cands
            .iter()
            .zip(&edges)
            .map(|(c, e)| {
                let held = holders.get(c.key.as_str()).map_or(&[][..], Vec::as_slice);
                e.and_then(|e| self.peer_for(e, &c.key, held))
            })
            .collect();
        let (elsewhere, held) = Self::held_elsewhere(
            &cands,
            &edges,
            &live,
            self.fleet.edges.len(),
            EDGE_ENTRY_OVERHEAD,
        );
        let bars: Vec<Bar> = cands
            .iter()
            .zip(&peers)
            .zip(&standings)
            .zip(&edges)
            .map(|(((c, p), standing), edge)| {
                let stake = self.ledger.stake(c.bytes, p.is_some(), c.ttl);
                Bar {
                    stake,
                    odds: self.ledger.odds(Some(&stake)),
                    dropping: self.anomaly.enabled && *standing == Standing::Drop,
                    backoff: edge.is_some_and(|e| self.state.backed_off(&c.key, e, wall)),
                    held_elsewhere: elsewhere.get(c.key.as_str()).copied().unwrap_or(0),
                }
            })
            .collect();
        // The uncertainty of the forecasts that could be placed (their threshold, break-even
        // and precision floor cleared) sizes the budgets: wide intervals of forecasts no bar
        // admits would only shrink the room of those that are.
        let admitted = forecasts
            .iter()
            .zip(&thresholds)
            .zip(&bars)
            .filter(|((f, t), bar)| {
                f.p_any >= t.0 && bar.odds.holds_back(f64::from(f.p_any)).is_none()
            });
        let safety = self
            .state
            .update_safety(admitted.map(|((f, _), _)| f), self.cfg.min_safety);
        self.metrics.planner_safety.set(f64::from(safety));
        let budgets: Vec<u64> = (0..self.fleet.edges.len())
            .map(|e| (self.base_budget(e) as f64 * f64::from(safety)) as u64)
            .collect();
        let verdicts = decide(
            &cands,
            &forecasts,
            &bars,
            |i| edges[i],
            |key, e| live.contains_key(&(key.to_string(), e)),
            |i| thresholds[i].0,
            |e| budgets[e].saturating_sub(held[e]),
            EDGE_ENTRY_OVERHEAD,
        );
        // What each edge's shadows take after this tick, for co-access to place within.
        let mut taken = held.clone();
        for v in &verdicts {
            if let (Some(e), "kept" | "expiring" | "shadowed") = (v.edge, v.outcome) {
                taken[e] += footprint(cands[v.candidate].bytes);
            }
        }
        self.state.set_taken(budgets.clone(), taken);
        let now_ms = now * 1000;
        let mut decisions: HashMap<String, Vec<Decision>> = HashMap::new();
        let mut orders = Vec::new();
        let mut drops = Vec::new();
        for v in verdicts {
            let (c, f) = (&cands[v.candidate], forecasts[v.candidate]);
            let expected = expected_arrival_secs(&f);
            let peer = peers[v.candidate].clone();
            if let ("dropped", Some(e)) = (v.outcome, v.edge) {
                drops.push((e, c.key.clone()));
            }
            if let ("shadowed", Some(e)) = (v.outcome, v.edge) {
                let order = ShadowOrder {
                    key: c.key.clone(),
                    ttl_secs: c.ttl,
                    priority: c.priority,
                    deadline_ms: now_ms + (expected * 1000.0) as u64,
                    peer: peer.clone(),
                    refresh: false,
                };
                let info = OrderInfo {
                    provider: c.provider.clone(),
                    region: c.region_idx,
                    class: Class::of(c.priority),
                    bytes: c.bytes,
                };
                orders.push((e, order, info, Signal::forecast(f.p_any)));
            }
            self.metrics
                .planner_decisions
                .with_label_values(&[v.outcome])
                .inc();
            decisions.entry(c.key.clone()).or_default().push(Decision {
                region: c.region.clone(),
                forecaster: answered_by(&name, answers[v.candidate], &c.counts).to_string(),
                quantiles: f.quantiles,
                p_any: f.p_any,
                p_any_forecast: Some(raw_p[v.candidate]),
                threshold: thresholds[v.candidate].0,
                threshold_reason: thresholds[v.candidate].1.clone(),
                stake: bars[v.candidate].stake,
                break_even: bars[v.candidate].odds.break_even,
                precision_floor: bars[v.candidate].odds.floor,
                benefit: v.benefit,
                edge: v.edge.map(|e| self.fleet.edges[e].id.clone()),
                budget_bytes: v.edge.map(|e| budgets[e]),
                safety,
                expected_in_secs: expected,
                anomaly: standings[v.candidate],
                peer: peer.map(|p| p.id),
                outcome: v.outcome,
                at: now,
            });
        }
        // Anomalies: a surge widens shadowing to the nearest other regions (budget aside:
        // the surge is the demand), a drop releases the region's shadows before their TTL.
        let surging = self.anomaly.enabled && standings.contains(&Standing::Surge);
        let p_any = if surging {
            p_any_by_series(&cands, &forecasts)
        } else {
            HashMap::new()
        };
        for (i, c) in cands.iter().enumerate() {
            match standings[i] {
                Standing::Surge if self.anomaly.enabled => {
                    let widenings = self.widen(c, &live, &holders, &p_any, now_ms, &mut orders);
                    let surge = Surging {
                        forecaster: answered_by(&name, answers[i], &c.counts),
                        quantiles: forecasts[i].quantiles,
                        safety,
                        at: now,
                    };
                    decisions
                        .entry(c.key.clone())
                        .or_default()
                        .extend(widenings.into_iter().map(|w| {
                            let budget = budgets[w.edge];
                            self.widening_decision(c, &surge, w, budget)
                        }));
                }
                Standing::Drop if self.anomaly.enabled => {
                    let region_edges: Vec<usize> = live
                        .keys()
                        .filter(|(k, e)| k == &c.key && self.fleet.edge_region(*e) == c.region_idx)
                        .map(|(_, e)| *e)
                        .collect();
                    for e in region_edges {
                        self.metrics
                            .planner_decisions
                            .with_label_values(&["released"])
                            .inc();
                        drops.push((e, c.key.clone()));
                    }
                }
                _ => {}
            }
        }
        // Forgotten only once the edge let go: one that did not answer still holds the copy
        // (and the budget it takes), and the next tick asks again.
        let dropped: Vec<(usize, String, bool)> = stream::iter(drops)
            .map(|(e, key)| async move {
                let ok = self.sync.unshadow(e, &key).await;
                (e, key, ok)
            })
            .buffer_unordered(SEND_CONCURRENCY)
            .collect()
            .await;
        for (e, key, ok) in dropped {
            if ok {
                self.state.remove(&key, e);
            } else {
                tracing::debug!(edge = %self.fleet.edges[e].id, %key, "unshadow not confirmed; retried next tick");
            }
        }
        // Earliest expected arrival first: with a bounded send rate, the objects needed
        // soonest must not wait behind ones needed in an hour.
        orders.sort_by_key(|(_, o, _, _)| o.deadline_ms);
        let sent: Vec<(usize, String, bool)> = stream::iter(orders)
            .map(|(e, order, info, signal)| async move {
                let key = order.key.clone();
                let ok = place_with(
                    &self.sync,
                    &self.state,
                    &self.ledger,
                    e,
                    order,
                    info,
                    signal,
                )
                .await;
                (e, key, ok)
            })
            .buffered(SEND_CONCURRENCY)
            .collect()
            .await;
        for (e, key, ok) in sent {
            if !ok {
                if let Some(d) = decisions.get_mut(&key).and_then(|v| {
                    v.iter_mut().find(|d| {
                        d.edge.as_deref() == Some(self.fleet.edges[e].id.as_str())
                            && matches!(d.outcome, "shadowed" | "widened")
                    })
                }) {
                    d.outcome = "send_failed";
                }
            }
            self.metrics
                .shadows_issued
                .with_label_values(&[if ok { "ok" } else { "failed" }])
                .inc();
        }
        *self.state.decisions.write() = decisions;
    }
}

/// Mirror the forecaster's state and counters into the broker's metrics: whether the
/// baseline answered the last batch, and how many loads were made, rejected (a replaced model
/// that failed validation leaves the previous one serving, visible only here), batches
/// failed and series the baseline answered within batches the model served.
fn export_model_status(m: &BrokerMetrics, status: &ModelStatus) {
    use std::sync::atomic::Ordering::Relaxed;
    m.forecaster_fallback
        .set(i64::from(status.fallback.load(Relaxed)));
    for (event, n) in [
        ("load", &status.loads),
        ("load_failure", &status.load_failures),
        ("batch_failure", &status.batch_failures),
        ("series_failure", &status.series_failures),
    ] {
        let c = m.forecaster_events.with_label_values(&[event]);
        let (n, seen) = (n.load(Relaxed), c.get());
        if n > seen {
            c.inc_by(n - seen);
        }
    }
}

#[async_trait]
impl BackgroundService for Planner {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if !self.cfg.enabled {
            // No forecasts, but the shadows other signals place are still settled and their
            // thresholds tuned.
            let mut tick = tokio::time::interval(self.interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    _ = tick.tick() => self.settle(now_secs()).await,
                }
            }
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
        export_model_status(&self.metrics, &status);
        // A broker that just started adopts the shadows the edges still hold before it plans:
        // listing them needs each edge's first stats report, and without it the first tick
        // would order again what they hold. Bounded: the poll itself times out per edge.
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            polled = tokio::time::timeout(FIRST_POLL_WAIT, self.sync.first_stats_polled()) => {
                if polled.is_err() {
                    tracing::warn!(
                        wait_secs = FIRST_POLL_WAIT.as_secs(),
                        "the edges' first stats poll has not ended: planning without adopting what they hold"
                    );
                }
            }
        }
        let interval = self.interval();
        let mut tick = tokio::time::interval(interval);
        // A round that overran is not followed by a burst of catch-up rounds.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let restart = tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                _ = self.sync.restart_seen() => true,
                _ = tick.tick() => false,
            };
            let Some(_busy) = self.inflight.enter_unless_shutdown(&shutdown) else {
                return;
            };
            if restart {
                self.catch_up_with_restarts().await;
                continue;
            }
            let started = Instant::now();
            self.tick(&forecaster).await;
            export_model_status(&self.metrics, &status);
            let took = started.elapsed();
            self.metrics.planner_tick.observe(took.as_secs_f64());
            if took > interval {
                tracing::warn!(
                    took_ms = took.as_millis() as u64,
                    interval_secs = interval.as_secs_f64(),
                    "planning tick overran its interval"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use models::Forecast;

    fn cand(key: &str, bytes: u64, priority: u8, allowed: bool) -> Candidate {
        Candidate {
            series: series_id(key, 0),
            key: key.into(),
            region: "eu".into(),
            region_idx: 0,
            counts: vec![1],
            priority,
            bytes,
            size_known: true,
            ttl: 60,
            allowed,
            recent: true,
            provider: "-".into(),
            allowed_regions: Vec::new(),
            max_copies: 2,
            window: (0, 60.0),
        }
    }

    /// The outcome `decide` gave the candidate keyed `k`.
    fn outcome_of(v: &[Verdict], cands: &[Candidate], k: &str) -> &'static str {
        v.iter()
            .find(|v| cands[v.candidate].key == k)
            .unwrap()
            .outcome
    }

    fn fc(p50: f32, p_any: f32) -> Forecast {
        Forecast {
            quantiles: [0.0, p50, p50 * 2.0],
            p_any,
        }
    }

    /// Stakes that pay whenever used and cost nothing wasted, no odds to clear: ranking by
    /// P(any request) and priority alone.
    fn even(n: usize) -> Vec<Bar> {
        let stake = Stake {
            used: 1.0,
            wasted: 0.0,
        };
        let odds = Odds {
            break_even: 0.0,
            floor: 0.0,
        };
        let bar = Bar {
            stake,
            odds,
            dropping: false,
            backoff: false,
            held_elsewhere: 0,
        };
        vec![bar; n]
    }

    #[test]
    fn placements_outside_a_tick_fit_what_the_tick_left() {
        let state = PlannerState::default();
        let fresh = Duration::from_secs(60);
        assert!(
            state.take_budget(1, 600, 1000, fresh, 0),
            "no tick yet: the whole budget"
        );
        assert!(!state.take_budget(1, 1001, 1000, fresh, 0));
        // ...beside what the edge says it holds.
        assert!(!state.take_budget(1, 400, 1000, fresh, 700));
        assert!(state.take_budget(1, 300, 1000, fresh, 700));
        // The tick's budget has its safety factor applied: 800 of 1000 here.
        state.set_taken(vec![1000, 800], vec![0, 500]);
        assert!(!state.take_budget(1, 400, 1000, fresh, 0));
        assert!(state.take_budget(1, 300, 1000, fresh, 0));
        assert!(
            !state.take_budget(1, 1, 1000, fresh, 0),
            "its own placement counts too"
        );
        // An order the edge did not take gives its bytes back.
        state.return_budget(1, 300);
        assert!(state.take_budget(1, 300, 1000, fresh, 0));
        assert!(state.take_budget(0, 1000, 1000, fresh, 0));
        // A stale tick says nothing: the budget beside what the edge holds again.
        assert!(state.take_budget(1, 900, 1000, Duration::ZERO, 0));
        assert!(!state.take_budget(1, 900, 1000, Duration::ZERO, 200));
    }

    /// An order in flight while a purge forgot its key (or a restart its edge) is not
    /// recorded live when it comes back; one for another key is.
    #[test]
    fn a_placement_in_flight_across_a_purge_is_not_recorded() {
        let state = PlannerState::default();
        let minute = Duration::from_secs(60);
        let since = state.generation();
        state.forget("h/page/app*");
        assert!(!state.record_placed("h/page/app.js", 3, minute, since));
        assert!(state.record_placed("h/page/style.css", 3, minute, since));
        assert!(state.live_edges("h/page/app.js").is_empty());
        let since = state.generation();
        assert!(state.record_placed("h/page/app.js", 3, minute, since));
        assert_eq!(state.live_edges("h/page/app.js"), vec![3]);
        let since = state.generation();
        state.forget_edge(1);
        assert!(state.record_placed("h/x", 3, minute, since));
        assert!(!state.record_placed("h/x", 1, minute, since));
        // More forgets than are kept: whether one covered it is unknown, so it is not.
        let since = state.generation();
        for i in 0..=FORGETS_KEPT {
            state.forget(&format!("h/other/{i}"));
        }
        assert!(!state.record_placed("h/y", 0, minute, since));
    }

    #[test]
    fn live_shadows_are_kept_per_key_and_edge() {
        let state = PlannerState::default();
        let minute = Duration::from_secs(60);
        state.record("h/a", 0, minute);
        state.record("h/a", 2, minute);
        state.record("h/a", 2, minute);
        state.record("h/ab", 1, minute);
        state.record("h/b", 2, Duration::ZERO);
        let mut a = state.live_edges("h/a");
        a.sort();
        assert_eq!(a, vec![0, 2], "a renewal is one entry");
        assert!(state.live_edges("h/b").is_empty(), "expired");
        state.remove("h/a", 0);
        assert_eq!(state.live_edges("h/a"), vec![2]);
        state.forget_edge(2);
        assert!(state.live_edges("h/a").is_empty());
        assert_eq!(state.live_edges("h/ab"), vec![1]);
        state.record("h/a", 0, minute);
        state.forget("h/a");
        assert!(state.live_edges("h/a").is_empty());
        assert_eq!(
            state.live_edges("h/ab"),
            vec![1],
            "an exact purge is not a prefix"
        );
        state.forget("h/a*");
        assert!(state.live_edges("h/ab").is_empty());
        assert!(state.live_now(Instant::now()).is_empty());
    }

    #[test]
    fn recording_sweeps_expired_shadows_without_a_tick() {
        let state = PlannerState::default();
        for i in 0..5000 {
            state.record(&format!("h/{i}"), 0, Duration::ZERO);
        }
        assert!(
            state.live.lock().len() < 2048,
            "{}",
            state.live.lock().len()
        );
        state.record("h/kept", 0, Duration::from_secs(60));
        assert_eq!(state.live_edges("h/kept"), vec![0]);
    }

    /// Two series' histories, both the 700 buckets of `counts` before `end`.
    fn two_histories(counts: &[u32], end: usize) -> Vec<History<'_>> {
        let h = History {
            counts: &counts[end - 700..end],
            last_bucket_start: end as i64 * 900,
            bucket_secs: 900,
            priority: 5,
        };
        vec![h; 2]
    }

    #[test]
    fn the_guard_hands_a_series_the_model_keeps_missing_to_a_baseline() {
        // Two series at 100 requests a bucket; the model says 5 an hour for the first and is
        // right about the second.
        let cands = vec![cand("h/busy", 1, 5, true), cand("h/fine", 1, 5, true)];
        let guard = Mutex::new(SeriesGuard::new(
            GUARD_ANSWERS.len(),
            GuardConfig::default(),
        ));
        let counts = vec![100u32; 2000];
        let mut answers = Vec::new();
        for end in 1000..1012 {
            let hs = two_histories(&counts, end);
            let options = with_baselines(vec![fc(5.0, 1.0), fc(400.0, 1.0)], &hs);
            let (f, a) = guarded(Some(&guard), 1, &cands, &hs, &options);
            assert_eq!(f[1].p50(), 400.0);
            answers = a;
            if answers[0] != 0 {
                // Persistence: seasonal naive and EWMA both say 400; the first baseline wins ties.
                assert_eq!(f[0].p50(), 400.0);
            }
        }
        assert_eq!(answers, vec![1, 0]);
        assert_eq!(answered_by("lstm", answers[0], &counts), "seasonal_naive");
        // Off, the model answers everything.
        let (f, a) = guarded(None, 1, &cands[..1], &[], &[[fc(5.0, 1.0); 3]]);
        assert_eq!((f[0].p50(), a), (5.0, vec![0]));
    }

    #[test]
    fn calibration_raises_the_p_of_series_that_keep_coming_true() {
        // Seasonal naive on a young broker says 2/7 for series asked every bucket.
        let cands = vec![cand("h/a", 1, 5, true), cand("h/b", 1, 5, true)];
        let cal = Mutex::new(Calibrator::new());
        let counts = vec![1u32; 2000];
        let said = 2.0 / 7.0;
        let mut last = (Vec::new(), Vec::new());
        for end in 1000..1100 {
            let hs = two_histories(&counts, end);
            // The model is not loaded: seasonal naive serves, and EWMA is scored beside it.
            let options = [[fc(1.0, said), fc(1.0, said), fc(1.0, 0.95)]; 2];
            let mut f = vec![fc(1.0, said), fc(1.0, said)];
            let raw = calibrated(
                Some(&cal),
                ("seasonal_naive", 0),
                &cands,
                &hs,
                &options,
                (&mut f, &[0, 0]),
            );
            last = (f, raw);
        }
        let (f, raw) = last;
        assert_eq!(
            raw,
            vec![said, said],
            "explain keeps the forecaster's own P"
        );
        // Pooled with the higher bands, still at their own P (0.35 to 0.95), it is not 1.
        assert!(f.iter().all(|f| f.p_any > 0.8), "{f:?}");
        let scored = cal.lock().take_scored();
        assert_eq!(scored.len(), 2, "{scored:?}");
        assert!(scored[&("ewma".to_string(), true, 9)].0 > 0, "{scored:?}");
        // Off, P is as forecast.
        let mut f = vec![fc(1.0, said)];
        assert_eq!(
            calibrated(
                None,
                ("lstm", 1),
                &cands[..1],
                &[],
                &[[fc(1.0, said); 3]],
                (&mut f, &[0])
            ),
            vec![said]
        );
        assert_eq!(f[0].p_any, said);
    }

    #[test]
    fn explain_names_the_baseline_for_silent_windows_and_the_guards_choice() {
        let mut counts = vec![0u32; 100];
        assert_eq!(answered_by("lstm", 0, &counts), "seasonal_naive");
        counts[99] = 1;
        assert_eq!(answered_by("lstm", 0, &counts), "lstm");
        assert_eq!(answered_by("seasonal_naive", 0, &counts), "seasonal_naive");
        assert_eq!(answered_by("lstm", 2, &counts), "ewma");
        assert_eq!(answered_by("lstm", 1, &counts), "seasonal_naive");
    }

    /// A shadow's end, drained at the next tick, does not end a newer shadow of its key that
    /// co-access placed on the edge in between.
    #[test]
    fn an_ended_shadow_leaves_a_newer_one_of_its_key_live() {
        let ledger = Ledger::new(
            crate::cost::CostSection::default(),
            0.5,
            vec!["eu".into()],
            crate::metrics::BrokerMetrics::register(&prometheus::Registry::new()).unwrap(),
        );
        let state = PlannerState::default();
        let (ttl, interval, t0) = (
            Duration::from_secs(60),
            Duration::from_secs(10),
            Instant::now(),
        );
        let info = || crate::cost::OrderInfo {
            provider: "p".into(),
            region: 0,
            class: crate::cost::Class::of(5),
            bytes: 1000,
        };
        let order = |key: &str| {
            state.record(key, 0, ttl);
            let by = crate::cost::Accepted::default();
            let (signal, now) = (
                Signal::coaccess(0.9),
                edge_node::sync::protocol::unix_ms_now(),
            );
            ledger.record_order(key, 0, info(), signal, ttl, now, None, by);
        };
        let failed = |key: &str| edge_node::sync::protocol::ShadowOutcome::failed(key.into());
        order("h/a");
        order("h/b");
        ledger.settle(0, &[failed("h/a"), failed("h/b")]);
        // Before the tick, h/a is placed again.
        order("h/a");
        state.end_settled(&ledger, interval, t0);
        assert_eq!(
            state.live_edges("h/a"),
            vec![0],
            "the newer shadow stays live"
        );
        assert!(
            !state.backed_off("h/a", 0, t0),
            "and its key is not backed off"
        );
        assert!(state.live_edges("h/b").is_empty());
        assert!(state.backed_off("h/b", 0, t0));
    }

    #[test]
    fn failed_fills_back_off_doubling_and_a_held_shadow_clears_it() {
        let state = PlannerState::default();
        let (interval, t0) = (Duration::from_secs(10), Instant::now());
        assert!(!state.backed_off("h/a", 0, t0));
        state.ended("h/a".into(), 0, true, interval, t0);
        assert!(state.backed_off("h/a", 0, t0 + Duration::from_secs(9)));
        assert!(!state.backed_off("h/a", 1, t0), "per edge");
        assert!(!state.backed_off("h/a", 0, t0 + Duration::from_secs(10)));
        state.ended("h/a".into(), 0, true, interval, t0);
        assert!(state.backed_off("h/a", 0, t0 + Duration::from_secs(19)));
        assert!(!state.backed_off("h/a", 0, t0 + Duration::from_secs(20)));
        for _ in 0..40 {
            state.ended("h/a".into(), 0, true, interval, t0);
        }
        let cap = interval * MAX_BACKOFF_INTERVALS;
        assert!(state.backed_off("h/a", 0, t0 + cap - Duration::from_secs(1)));
        assert!(!state.backed_off("h/a", 0, t0 + cap));
        state.ended("h/a".into(), 0, false, interval, t0);
        state.ended("h/a".into(), 0, true, interval, t0);
        assert!(
            !state.backed_off("h/a", 0, t0 + interval),
            "a fill that held started the count again"
        );
        state.forget_host("h");
        assert!(state.backoff.lock().is_empty());
        // A candidate in backoff is not placed.
        let cands = vec![cand("h/b", 10, 5, true)];
        let mut bars = even(1);
        bars[0].backoff = true;
        let v = decide(
            &cands,
            &[fc(1.0, 0.9)],
            &bars,
            |_| Some(0),
            |_, _| false,
            |_| 0.5,
            |_| 1000,
            0,
        );
        assert_eq!(v[0].outcome, "fill_backoff");
    }

    #[test]
    fn the_forecasters_counters_are_exported_as_they_grow() {
        use std::sync::atomic::Ordering::Relaxed;
        let m = BrokerMetrics::register(&prometheus::Registry::new()).unwrap();
        let status = ModelStatus::default();
        status.loads.store(1, Relaxed);
        export_model_status(&m, &status);
        status.load_failures.store(2, Relaxed);
        status.fallback.store(true, Relaxed);
        export_model_status(&m, &status);
        export_model_status(&m, &status);
        let events = |e: &str| m.forecaster_events.with_label_values(&[e]).get();
        assert_eq!(
            (
                events("load"),
                events("load_failure"),
                events("batch_failure")
            ),
            (1, 2, 0)
        );
        assert_eq!(m.forecaster_fallback.get(), 1);
    }

    /// Small objects take their entry's overhead of the budget too: a budget that would hold
    /// ten 1 KB bodies holds two when each costs 4 KB more on the edge.
    #[test]
    fn each_shadow_takes_its_entry_overhead_of_the_budget() {
        let cands: Vec<Candidate> = (0..10)
            .map(|i| cand(&format!("k{i}"), 1000, 5, true))
            .collect();
        let forecasts = vec![fc(10.0, 0.9); 10];
        let placed = |overhead| {
            let v = decide(
                &cands,
                &forecasts,
                &even(10),
                |_| Some(0),
                |_, _| false,
                |_| 0.5,
                |_| 10_000,
                overhead,
            );
            v.iter().filter(|v| v.outcome == "shadowed").count()
        };
        assert_eq!(placed(0), 10);
        assert_eq!(placed(4000), 2);
        assert_eq!(footprint(1000), 1000 + EDGE_ENTRY_OVERHEAD);
    }

    #[test]
    fn budget_is_never_exceeded_and_least_valuable_are_dropped() {
        let cands = vec![
            cand("a", 600, 5, true),
            cand("b", 600, 9, true),
            cand("c", 300, 0, true),
            cand("d", 100, 5, true),
        ];
        let forecasts = vec![fc(10.0, 0.9), fc(10.0, 0.9), fc(1.0, 0.9), fc(1.0, 0.8)];
        let v = decide(
            &cands,
            &forecasts,
            &even(4),
            |_| Some(0),
            |_, _| false,
            |_| 0.5,
            |_| 1000,
            0,
        );
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
    fn threshold_break_even_policy_live_and_missing_edges() {
        let no_size = Candidate {
            size_known: false,
            ..cand("unsized", 1, 5, true)
        };
        let cands = vec![
            cand("low", 10, 5, true),
            cand("forbidden", 10, 5, false),
            cand("live", 10, 5, true),
            cand("orphan", 10, 5, true),
            cand("big", 1_000_000, 5, true),
            cand("big-from-peer", 1_000_000, 5, true),
            cand("unsure", 10, 5, true),
            no_size,
        ];
        let forecasts = vec![fc(1.0, 0.1), fc(1.0, 0.9), fc(1.0, 0.9), fc(1.0, 0.9)]
            .into_iter()
            .chain([fc(1.0, 0.9), fc(1.0, 0.9), fc(1.0, 0.55), fc(1.0, 0.99)])
            .collect::<Vec<_>>();
        // At list prices a wasted 1 MB origin fill costs ~12 used shadows' latency: 0.9 is
        // not enough. From a peer it costs inter-edge transfer and saves the egress when used.
        let cfg = crate::cost::CostSection::default();
        let bars: Vec<Bar> = cands
            .iter()
            .map(|c| {
                let stake = Stake::of(&cfg, c.bytes, c.key == "big-from-peer", c.ttl);
                let odds = Odds {
                    break_even: stake.break_even(),
                    floor: 0.6,
                };
                Bar {
                    stake,
                    odds,
                    dropping: false,
                    backoff: false,
                    held_elsewhere: 0,
                }
            })
            .collect();
        let v = decide(
            &cands,
            &forecasts,
            &bars,
            |i| (cands[i].key != "orphan").then_some(0),
            |k, _| k == "live",
            |_| 0.5,
            |_| 1 << 20,
            0,
        );
        let outcome = |k: &str| outcome_of(&v, &cands, k);
        assert_eq!(outcome("low"), "below_threshold");
        assert_eq!(outcome("forbidden"), "policy");
        assert_eq!(outcome("live"), "kept");
        assert_eq!(outcome("orphan"), "no_edge");
        assert_eq!(outcome("big"), "below_break_even");
        assert_eq!(outcome("big-from-peer"), "shadowed");
        // Above the threshold and break-even, but likelier wasted than the floor allows.
        assert_eq!(outcome("unsure"), "below_precision_floor");
        // Sure to be asked for, but only ever answered without a body: nothing to price.
        assert_eq!(outcome("unsized"), "size_unknown");
    }

    #[test]
    fn copies_go_to_the_most_valuable_regions_up_to_the_policy_limit() {
        let mut cands = vec![
            cand("k", 10, 5, true),
            cand("k", 10, 5, true),
            cand("k", 10, 5, true),
        ];
        for (i, c) in cands.iter_mut().enumerate() {
            c.region_idx = i;
        }
        let forecasts = vec![fc(1.0, 0.6), fc(9.0, 0.9), fc(5.0, 0.8)];
        let v = decide(
            &cands,
            &forecasts,
            &even(3),
            |i| Some(cands[i].region_idx),
            |_, _| false,
            |_| 0.5,
            |_| 1 << 20,
            0,
        );
        let by_region = |r: usize| v.iter().find(|v| v.candidate == r).unwrap().outcome;
        assert_eq!(by_region(1), "shadowed");
        assert_eq!(by_region(2), "shadowed");
        assert_eq!(by_region(0), "max_copies");
    }

    #[test]
    fn live_shadows_count_against_the_budget_and_the_least_valuable_is_dropped() {
        let cands = vec![cand("old", 600, 0, true), cand("new", 600, 9, true)];
        let forecasts = vec![fc(1.0, 0.9), fc(10.0, 0.9)];
        let v = decide(
            &cands,
            &forecasts,
            &even(2),
            |_| Some(0),
            |k, _| k == "old",
            |_| 0.5,
            |_| 1000,
            0,
        );
        let outcome = |k: &str| outcome_of(&v, &cands, k);
        assert_eq!(outcome("new"), "shadowed");
        assert_eq!(outcome("old"), "dropped");
    }

    #[test]
    fn a_live_shadow_is_not_swapped_for_a_hair_likelier_one() {
        // A is live, B a hair likelier; both 600 bytes in a 1,000-byte budget. Placed anew
        // B would win, but A's fill is paid: A stays, and nothing is purged and refilled.
        let cands = vec![cand("a", 600, 5, true), cand("b", 600, 5, true)];
        let forecasts = vec![fc(1.0, 0.79), fc(1.0, 0.80)];
        let mut bars = even(2);
        for b in &mut bars {
            b.stake = Stake {
                used: 1.0,
                wasted: -0.5,
            };
        }
        let v = decide(
            &cands,
            &forecasts,
            &bars,
            |_| Some(0),
            |k, _| k == "a",
            |_| 0.5,
            |_| 1000,
            0,
        );
        let outcome = |k: &str| outcome_of(&v, &cands, k);
        assert_eq!((outcome("a"), outcome("b")), ("kept", "budget"));
    }

    #[test]
    fn live_shadows_that_fail_the_checks_still_hold_their_bytes_and_copies() {
        let mut cands = vec![
            cand("old", 600, 9, true),
            cand("new", 600, 0, true),
            cand("k", 10, 9, true),
            cand("k", 10, 1, true),
        ];
        cands[2].max_copies = 1;
        cands[3].max_copies = 1;
        cands[3].region_idx = 1;
        // "old" and the first "k" are live but now below the threshold, and each ranks
        // before the candidate it competes with.
        let forecasts = vec![fc(50.0, 0.4), fc(10.0, 0.9), fc(1.0, 0.45), fc(1.0, 0.9)];
        let v = decide(
            &cands,
            &forecasts,
            &even(4),
            |i| Some(cands[i].region_idx),
            |k, e| k == "old" || (k == "k" && e == 0),
            |_| 0.5,
            |_| 1000,
            0,
        );
        let outcome = |i: usize| v.iter().find(|v| v.candidate == i).unwrap().outcome;
        assert_eq!(outcome(0), "expiring", "left to its TTL");
        assert_eq!(
            outcome(1),
            "budget",
            "600 + 600 B would pass the 1000 B budget"
        );
        assert_eq!(outcome(2), "expiring");
        assert_eq!(outcome(3), "max_copies", "the live copy is the one allowed");
        // A live shadow its policy no longer allows is released, not left to expire.
        cands[0].allowed = false;
        let v = decide(
            &cands,
            &forecasts,
            &even(4),
            |i| Some(cands[i].region_idx),
            |k, _| k == "old",
            |_| 0.5,
            |_| 1000,
            0,
        );
        assert_eq!(
            v.iter().find(|v| v.candidate == 0).unwrap().outcome,
            "dropped"
        );
        assert_eq!(
            v.iter().find(|v| v.candidate == 1).unwrap().outcome,
            "shadowed"
        );
    }

    #[test]
    fn copies_placed_outside_this_ticks_candidates_take_the_policys_copies_and_budget() {
        // An event shadowed "k" on edges 0 and 1 (regions without traffic, so without a
        // candidate); demand appears in region 2, owned by edge 2.
        let mut k = cand("k", 300, 5, true);
        k.region_idx = 2;
        let cands = vec![k, cand("other", 300, 5, true)];
        let edges = vec![Some(2), Some(0)];
        let soon = Instant::now() + Duration::from_secs(60);
        let live: HashMap<(String, usize), Instant> = [
            (("k".to_string(), 0), soon),
            (("k".to_string(), 1), soon),
            (("other".to_string(), 0), soon),
        ]
        .into();
        let (copies, held) = Planner::held_elsewhere(&cands, &edges, &live, 3, 0);
        assert_eq!(copies.get("k"), Some(&2));
        assert_eq!(copies.get("other"), None, "its candidate stands for it");
        assert_eq!(held, vec![300, 300, 0]);
        let mut bars = even(2);
        bars[0].held_elsewhere = 2;
        let v = decide(
            &cands,
            &[fc(5.0, 0.9), fc(5.0, 0.9)],
            &bars,
            |i| edges[i],
            |key, e| live.contains_key(&(key.to_string(), e)),
            |_| 0.5,
            |e| (1000u64).saturating_sub(held[e]),
            0,
        );
        assert_eq!(
            v.iter().find(|v| v.candidate == 0).unwrap().outcome,
            "max_copies"
        );
        assert_eq!(v.iter().find(|v| v.candidate == 1).unwrap().outcome, "kept");
    }

    #[test]
    fn a_series_in_a_drop_is_not_shadowed_again_after_its_release() {
        let cands = vec![cand("k", 10, 5, true)];
        let forecasts = vec![fc(5.0, 0.99)];
        let mut bars = even(1);
        bars[0].dropping = true;
        for live in [true, false] {
            let v = decide(
                &cands,
                &forecasts,
                &bars,
                |_| Some(0),
                |_, _| live,
                |_| 0.5,
                |_| 1 << 20,
                0,
            );
            assert_eq!(v[0].outcome, "drop_anomaly", "live: {live}");
        }
    }

    #[test]
    fn a_widening_is_scored_by_the_target_regions_own_forecast() {
        let mut us = cand("k", 10, 5, true);
        us.region_idx = 1;
        let cands = vec![cand("k", 10, 5, true), us, cand("other", 10, 5, true)];
        let forecasts = vec![fc(5.0, 0.99), fc(0.1, 0.2), fc(1.0, 0.7)];
        let p = p_any_by_series(&cands, &forecasts);
        assert_eq!(p.get(&("k", 1)), Some(&0.2));
        assert_eq!(p.get(&("k", 0)), Some(&0.99));
        // No history in the target region: no entry, scored 0 by `widen`.
        assert_eq!(p.get(&("other", 1)), None);
    }

    #[test]
    fn likelier_demand_is_expected_sooner() {
        let sure = expected_arrival_secs(&fc(20.0, 0.99));
        let even = expected_arrival_secs(&fc(0.0, 0.5));
        let rare = expected_arrival_secs(&fc(0.0, 0.05));
        assert!(sure < even && even < rare, "{sure} {even} {rare}");
        assert!((0.0..=HORIZON_SECS).contains(&rare));
        // p = 0.5: λ = ln 2, mean first arrival ≈ 0.443 H.
        assert!((even / HORIZON_SECS - 0.4427).abs() < 1e-3, "{even}");
    }

    #[test]
    fn uncertain_forecasts_shrink_the_safety_factor_down_to_its_floor() {
        let state = PlannerState::default();
        let tight = Forecast {
            quantiles: [9.0, 10.0, 11.0],
            p_any: 0.9,
        };
        let wide = Forecast {
            quantiles: [0.0, 10.0, 100.0],
            p_any: 0.9,
        };
        let s1 = state.update_safety([tight].iter(), 0.5);
        assert!(s1 > 0.8, "{s1}");
        let mut s = s1;
        for _ in 0..20 {
            s = state.update_safety([wide].iter(), 0.5);
        }
        assert!(s < s1 && (s - 0.5).abs() < 0.01, "{s}");
        // A tick admitting no forecast leaves it as it was.
        assert_eq!(state.update_safety([].iter(), 0.5), s);
    }
}
