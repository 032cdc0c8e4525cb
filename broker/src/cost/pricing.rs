//! What one shadow cost and earned, and what a prospective one stands to: the prices of
//! [`CostSection`] applied to a shadow's size, fill source and time held.

use edge_node::sync::protocol::ShadowOutcome;
use serde::Serialize;

use super::CostSection;

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

    pub(crate) fn label(self) -> &'static str {
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
    /// Transfer avoided: origin egress, or for a shadow a peer filled while demand misses are
    /// filled from peers ([`CostSection::demand_peer_fill`]), the transfer between edges the
    /// first request's peer fill would have made.
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

    pub(crate) fn add(&mut self, o: &Priced) {
        self.fill_origin += o.fill_origin;
        self.fill_peer += o.fill_peer;
        self.storage += o.storage;
        self.compute += o.compute;
        self.saved_egress += o.saved_egress;
        self.saved_latency += o.saved_latency;
    }
}

/// Price one ended shadow. One whose fill an earlier order's outcome paid for
/// ([`ShadowOutcome::fill_paid`]) costs its storage only. A used shadow earns what its first
/// request would otherwise have cost: a fetch from the origin, or from the peer that filled
/// it when demand misses are filled from peers.
pub fn price(cfg: &CostSection, o: &ShadowOutcome) -> Priced {
    let gb = o.bytes as f64 / 1e9;
    let used = o.hits > 0;
    let filled = if o.fill_paid { 0.0 } else { gb };
    let via_peer = o.peer_filled && cfg.demand_peer_fill;
    Priced {
        fill_origin: if o.peer_filled {
            0.0
        } else {
            filled * cfg.origin_egress_per_gb
        },
        fill_peer: if o.peer_filled {
            filled * cfg.inter_edge_per_gb
        } else {
            0.0
        },
        storage: gb * o.held_secs as f64 / 3600.0 * cfg.storage_per_gb_hour,
        compute: if o.fill_paid { 0.0 } else { cfg.fill_cost },
        saved_egress: match (used, via_peer) {
            (false, _) => 0.0,
            (true, false) => gb * cfg.origin_egress_per_gb,
            (true, true) => gb * cfg.inter_edge_per_gb,
        },
        saved_latency: if used {
            // A first client that came while the fill ran waited for the rest of it: the
            // shadow saved it only the head start.
            let avoided = if via_peer {
                cfg.peer_latency_secs
            } else {
                cfg.wait_avoided_secs(o.bytes)
            };
            let avoided = o
                .head_start_ms
                .map_or(avoided, |ms| avoided.min(ms as f64 / 1000.0));
            cfg.latency_value_per_sec * avoided
        } else {
            0.0
        },
    }
}

/// What one prospective shadow stands to earn or lose, priced like its outcome will be: the
/// planner's per-candidate economics, so a candidate is only worth placing when its chance of
/// use beats the odds its own size and fill source set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stake {
    /// Net if a request finds it before it expires.
    pub used: f64,
    /// Net if none does.
    pub wasted: f64,
}

impl Stake {
    /// The stake of a `bytes`-sized shadow held `ttl_secs`, filled from a peer edge or the
    /// origin. A used shadow is priced as held for its whole TTL too, which keeps the gate
    /// conservative. Next to an origin transfer the storage is a rounding error; for a
    /// peer-filled shadow with demand peer fill on, whose use earns only the peer's round
    /// trip, it decides: with default prices such a shadow of more than about 16 MB (a 1 h
    /// TTL) never pays, and is never placed.
    pub fn of(cfg: &CostSection, bytes: u64, peer_filled: bool, ttl_secs: u64) -> Stake {
        let outcome = |hits| ShadowOutcome {
            key: String::new(),
            bytes,
            hits,
            held_secs: ttl_secs,
            peer_filled,
            evicted: false,
            failed: false,
            held_before: false,
            removed: false,
            ended_ms: 0,
            head_start_ms: None,
            order: None,
            fill_paid: false,
        };
        Stake {
            used: price(cfg, &outcome(1)).net(),
            wasted: price(cfg, &outcome(0)).net(),
        }
    }

    /// Expected net of placing it when a request comes with probability `p`.
    pub fn value(&self, p: f32) -> f64 {
        let p = f64::from(p.clamp(0.0, 1.0));
        p * self.used + (1.0 - p) * self.wasted
    }

    /// Expected net of keeping it, already filled, when a request comes with probability
    /// `p`: the fill is paid either way, so only what a hit earns over a waste counts (the
    /// storage left is a rounding error next to it).
    pub fn keep_value(&self, p: f32) -> f64 {
        f64::from(p.clamp(0.0, 1.0)) * (self.used - self.wasted)
    }

    /// The probability of use at which it breaks even: 0 when even waste pays, above 1 when
    /// even use does not (never worth placing).
    pub fn break_even(&self) -> f32 {
        if self.wasted >= 0.0 {
            0.0
        } else if self.used <= 0.0 {
            f32::INFINITY
        } else {
            (-self.wasted / (self.used - self.wasted)) as f32
        }
    }
}

/// The odds a placement's own score must reach besides its source's tuned threshold; the
/// planner's forecasts and co-access's followers are held to the same two.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Odds {
    /// Its break-even probability (0 with `break_even_gate` off or its size unknown).
    pub break_even: f32,
    /// The byte-precision floor (`min_precision`; 0 when disabled).
    pub floor: f32,
}

impl Odds {
    /// Why a placement scored `p` is held back — `below_break_even` or
    /// `below_precision_floor` — or `None` when it clears both.
    pub fn holds_back(&self, p: f64) -> Option<&'static str> {
        if p < f64::from(self.break_even) {
            Some("below_break_even")
        } else if p < f64::from(self.floor) {
            Some("below_precision_floor")
        } else {
            None
        }
    }
}
