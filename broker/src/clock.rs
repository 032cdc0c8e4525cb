//! The broker's notion of time. Normally the wall clock. For trace replays it is a scaled
//! clock: it starts at the trace's first timestamp and runs `speedup` times faster than the
//! wall, so the monitor's buckets, the forecaster's calendar features and shadow lifetimes all
//! live in trace time while the replay takes minutes instead of days. Edges keep wall time:
//! durations sent to them (shadow TTLs) are converted at the one place orders leave the
//! broker.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// `[clock]`: leave it out in production.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClockSection {
    /// Trace seconds per wall second.
    #[serde(default = "default_speedup")]
    pub speedup: f64,
    /// Unix time the clock shows at start-up (default: now).
    #[serde(default)]
    pub start_unix: Option<u64>,
}

impl Default for ClockSection {
    fn default() -> Self {
        ClockSection {
            speedup: 1.0,
            start_unix: None,
        }
    }
}

fn default_speedup() -> f64 {
    1.0
}

/// The wall clock in ms since the epoch, whatever the broker's clock: for times sent to edges
/// (registration times), which read them against their own wall clock.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Clock {
    wall0: Instant,
    start: f64,
    speedup: f64,
}

static CLOCK: OnceLock<Clock> = OnceLock::new();

fn wall_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Install a scaled clock; only the first call counts (one broker per process).
pub fn init(cfg: &ClockSection) {
    if cfg.speedup == 1.0 && cfg.start_unix.is_none() {
        return;
    }
    let _ = CLOCK.set(Clock {
        wall0: Instant::now(),
        start: cfg.start_unix.map_or_else(wall_unix, |s| s as f64),
        speedup: cfg.speedup.max(f64::MIN_POSITIVE),
    });
}

/// Seconds since the epoch on the broker's clock.
pub fn now_secs() -> u64 {
    match CLOCK.get() {
        Some(c) => (c.start + c.wall0.elapsed().as_secs_f64() * c.speedup) as u64,
        None => wall_unix() as u64,
    }
}

/// Trace seconds per wall second.
pub fn speedup() -> f64 {
    CLOCK.get().map_or(1.0, |c| c.speedup)
}

/// How long `secs` of clock time last on the wall.
pub fn wall(secs: u64) -> Duration {
    Duration::from_secs_f64(secs as f64 / speedup())
}

/// `secs` of clock time in whole wall seconds, at least one (edges take TTLs in seconds).
pub fn wall_secs(secs: u64) -> u64 {
    ((secs as f64 / speedup()).round() as u64).max(1)
}

/// The broker-clock time (seconds since the epoch) of wall time `ms`, found by how long ago
/// it was on the wall: a registration time (wall clock, for the edges) against the monitor's
/// buckets (broker clock). A time before a replay's clock started maps to before its first
/// bucket.
pub fn clock_secs_at_wall_ms(ms: u64) -> u64 {
    let ago = wall_ms().saturating_sub(ms) as f64 / 1000.0;
    (now_secs() as f64 - ago * speedup()).max(0.0) as u64
}

/// `secs` of wall time in clock seconds.
pub fn clock_secs(wall_secs: u64) -> u64 {
    clock_secs_f64(wall_secs as f64)
}

/// `secs` (fractions allowed) of wall time in whole clock seconds.
pub fn clock_secs_f64(wall_secs: f64) -> u64 {
    (wall_secs * speedup()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wall_clock_is_the_default() {
        // No clock installed in unit tests: conversions are the identity.
        assert_eq!(wall_secs(30), 30);
        assert_eq!(clock_secs(30), 30);
        assert_eq!(wall(2), Duration::from_secs(2));
        let now = wall_unix() as u64;
        assert!(now_secs().abs_diff(now) <= 1);
        let hour_ago = wall_ms() - 3_600_000;
        assert!(clock_secs_at_wall_ms(hour_ago).abs_diff(now - 3600) <= 1);
        assert_eq!(clock_secs_at_wall_ms(0), 0);
    }
}
