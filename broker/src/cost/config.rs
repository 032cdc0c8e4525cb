//! `[cost]`: the prices shadowing is judged by, with their sources, and the tuners' bounds.

use serde::{Deserialize, Serialize};

/// A share in `[0, 1]`, checked when the config is parsed.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Fraction(pub(super) f64);

/// A number that is not a share in `[0, 1]`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0} is not a fraction in [0, 1]")]
pub struct NotAFraction(f64);

impl TryFrom<f64> for Fraction {
    type Error = NotAFraction;

    fn try_from(v: f64) -> Result<Self, NotAFraction> {
        if (0.0..=1.0).contains(&v) {
            Ok(Fraction(v))
        } else {
            Err(NotAFraction(v))
        }
    }
}

impl From<Fraction> for f64 {
    fn from(f: Fraction) -> f64 {
        f.0
    }
}

impl Fraction {
    /// The share.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// `[cost]`: prices (USD) and tuner settings. Defaults are public list prices, cited per
/// field, and tuner settings chosen against the replay in `bench/RESULTS.md`.
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
    /// Origin round trip the first request of a shadow does not wait, in seconds.
    #[serde(default = "default_origin_latency")]
    pub origin_latency_secs: f64,
    /// Round trip to a peer edge, in seconds (default 0.05: between cloud regions of one
    /// continent): what the first request of a used shadow filled from a peer does not wait
    /// when demand misses are filled from peers, as it would have been (`[peer_fill]`).
    #[serde(default = "default_peer_latency")]
    pub peer_latency_secs: f64,
    /// Whether demand misses are filled from peer edges (`[peer_fill] enabled`, copied in
    /// when the broker's config loads, not a `[cost]` setting). Then a shadow a peer filled
    /// saves its first request a fetch from that peer, not from the origin: what it earns is
    /// the transfer between edges and the peer's round trip, not origin egress. Shown with
    /// the prices (`GET /v1/cost`), never read from `[cost]`.
    #[serde(skip_deserializing)]
    pub demand_peer_fill: bool,
    /// Rate one origin fetch streams at, Mbit/s (default 100: a single long-haul TCP flow).
    /// A miss reaches its user no faster than this; with `client_mbit_per_sec` it prices the
    /// transfer time a used shadow saves besides the round trip, which for a 50 MB file is
    /// seconds, not the round trip's 0.1 s.
    #[serde(default = "default_origin_mbit")]
    pub origin_mbit_per_sec: f64,
    /// Rate a user downloads at, Mbit/s (default 250: roughly the median fixed-broadband
    /// download speed in the US, Ookla Speedtest Global Index 2024). A hit is paced by it, so
    /// only an origin slower than the user's own link costs transfer time.
    #[serde(default = "default_client_mbit")]
    pub client_mbit_per_sec: f64,
    /// Whether the tuners move thresholds (off: the planner's threshold for forecasts, and
    /// every follower or widening the co-access and anomaly signals offer; forecasts and
    /// followers still held to `min_precision`).
    #[serde(default = "default_true")]
    pub tune: bool,
    /// Lowest threshold a tuner may set (default 0.05); forecast and co-access tuners go no
    /// lower than `min_precision` either.
    #[serde(default = "default_min_threshold")]
    pub min_threshold: f32,
    /// Highest threshold a tuner may set (default 0.95).
    #[serde(default = "default_max_threshold")]
    pub max_threshold: f32,
    /// Largest threshold move, and the first (default 0.05). The step grows by half while the
    /// direction holds and halves on each reversal, between `min_step` and this.
    #[serde(default = "default_step")]
    pub step: f32,
    /// Smallest threshold move (default 0.01): how finely an oscillation settles.
    #[serde(default = "default_min_step")]
    pub min_step: f32,
    /// Settled shadows a tuner waits for before it decides (default 20): with fewer, one large
    /// wasted shadow decides the direction. Also the evidence the precision floor needs.
    #[serde(default = "default_min_settled")]
    pub min_settled: u64,
    /// Planning ticks a tuner with fewer than `min_settled` new outcomes waits before it
    /// decides on what it has (default 5), so quiet regions still tune.
    #[serde(default = "default_max_wait_ticks")]
    pub max_wait_ticks: u32,
    /// Loss, as a share of spend, the tuner tolerates before raising a threshold
    /// (default 0.05): around zero net a few cents either way are noise, not a trend.
    #[serde(default = "default_dead_band")]
    pub dead_band: Fraction,
    /// Floor on the byte precision (shadowed bytes hit before expiry / shadowed bytes) of each
    /// (region, class, source), treated as a constraint: while the rolling precision, over at
    /// least `min_settled` shadows, is below it the threshold only goes up, even when the
    /// shadows pay; and it never goes down unless the precision clears the floor by
    /// `dead_band`. Default 0.6, the precision target of issue 6: below it most shadowed bytes
    /// are extra origin and storage load for nothing, which prices at list rates undercount
    /// (cache pollution, fill bandwidth). Each forecast and co-access placement must also
    /// reach it with its own score (P(any request), P(follows)): a shadow its signal expects
    /// to be wasted more often than that cannot help keep precision above it, and without
    /// this a tuner that saw good outcomes would lower the threshold into such shadows. 0
    /// disables it.
    #[serde(default = "default_min_precision")]
    pub min_precision: Fraction,
    /// Whether each forecast candidate and co-access follower is held to its own break-even
    /// probability on top of its tuned threshold (default on): at these prices a wasted origin fill of
    /// 1 MB costs what 12 used shadows earn in latency, so a large object needs a near-certain
    /// forecast while a small one, or one a peer edge can supply, pays at modest odds. One
    /// threshold per (region, class) cannot say that.
    #[serde(default = "default_true")]
    pub break_even_gate: bool,
}

impl CostSection {
    /// What the first request of a used shadow of `bytes` does not wait: the origin round trip,
    /// plus the time an origin slower than the user's link would have added to the transfer.
    pub fn wait_avoided_secs(&self, bytes: u64) -> f64 {
        let bits = bytes as f64 * 8.0;
        let transfer =
            bits / (self.origin_mbit_per_sec * 1e6) - bits / (self.client_mbit_per_sec * 1e6);
        self.origin_latency_secs + transfer.max(0.0)
    }

    /// Why these prices and bounds cannot be used, naming the field: a negative price would
    /// turn waste into profit and a threshold range that is empty would stop the tuners.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("origin_egress_per_gb", self.origin_egress_per_gb),
            ("inter_edge_per_gb", self.inter_edge_per_gb),
            ("storage_per_gb_hour", self.storage_per_gb_hour),
            ("fill_cost", self.fill_cost),
            ("latency_value_per_sec", self.latency_value_per_sec),
            ("peer_latency_secs", self.peer_latency_secs),
            ("origin_latency_secs", self.origin_latency_secs),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("cost.{name} must be a number ≥ 0, not {v}"));
            }
        }
        for (name, v) in [
            ("origin_mbit_per_sec", self.origin_mbit_per_sec),
            ("client_mbit_per_sec", self.client_mbit_per_sec),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("cost.{name} must be a positive number, not {v}"));
            }
        }
        if !(0.0 <= self.min_threshold
            && self.min_threshold <= self.max_threshold
            && self.max_threshold <= 1.0)
        {
            return Err(format!(
                "cost.min_threshold ({}) and cost.max_threshold ({}) must satisfy 0 ≤ min ≤ max ≤ 1",
                self.min_threshold, self.max_threshold
            ));
        }
        if !(0.0 < self.min_step && self.min_step <= self.step && self.step <= 1.0) {
            return Err(format!(
                "cost.min_step ({}) and cost.step ({}) must satisfy 0 < min_step ≤ step ≤ 1",
                self.min_step, self.step
            ));
        }
        Ok(())
    }
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
            peer_latency_secs: default_peer_latency(),
            demand_peer_fill: false,
            origin_mbit_per_sec: default_origin_mbit(),
            client_mbit_per_sec: default_client_mbit(),
            tune: true,
            min_threshold: default_min_threshold(),
            max_threshold: default_max_threshold(),
            step: default_step(),
            min_step: default_min_step(),
            min_settled: default_min_settled(),
            max_wait_ticks: default_max_wait_ticks(),
            dead_band: default_dead_band(),
            min_precision: default_min_precision(),
            break_even_gate: true,
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
fn default_peer_latency() -> f64 {
    0.05
}
fn default_origin_mbit() -> f64 {
    100.0
}
fn default_client_mbit() -> f64 {
    250.0
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
fn default_min_step() -> f32 {
    0.01
}
fn default_min_settled() -> u64 {
    20
}
fn default_max_wait_ticks() -> u32 {
    5
}
fn default_dead_band() -> Fraction {
    Fraction(0.05)
}
fn default_min_precision() -> Fraction {
    Fraction(0.6)
}
