//! Per-provider rate limits on the provider API's costly calls.
//!
//! A purge reaches every edge, and a prefix purge leaves an fsynced ban there for the ban
//! retention (30 days by default); an event fans out refills; an origin write pushes the
//! origin table to every edge and may purge a host. One provider's script in a loop must not
//! cost every other tenant that, so each provider gets a budget per class of call: a burst of
//! a minute's allowance, refilled evenly over the minute (GCRA, from governor).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

/// Per-provider allowances, each per minute and also the largest burst.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// `POST /v1/purge` calls (default 120); a tag purge counts once per tag.
    #[serde(default = "default_purges")]
    pub purges_per_minute: u32,
    /// `POST /v1/events` calls (default 600).
    #[serde(default = "default_events")]
    pub events_per_minute: u32,
    /// Writes of origins and resources: `PUT`/`DELETE /v1/origins/…`, `POST`/`PUT`/`DELETE
    /// /v1/resources…` (default 300).
    #[serde(default = "default_writes")]
    pub writes_per_minute: u32,
}

fn default_purges() -> u32 {
    120
}
fn default_events() -> u32 {
    600
}
fn default_writes() -> u32 {
    300
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            purges_per_minute: default_purges(),
            events_per_minute: default_events(),
            writes_per_minute: default_writes(),
        }
    }
}

impl RateLimits {
    /// The name of the first allowance that is zero (a provider could never make that call).
    pub fn zero_field(&self) -> Option<&'static str> {
        [
            (
                "admin.rate_limits.purges_per_minute",
                self.purges_per_minute,
            ),
            (
                "admin.rate_limits.events_per_minute",
                self.events_per_minute,
            ),
            (
                "admin.rate_limits.writes_per_minute",
                self.writes_per_minute,
            ),
        ]
        .into_iter()
        .find_map(|(name, v)| (v == 0).then_some(name))
    }
}

/// A class of rate-limited call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallClass {
    /// Purges.
    Purge,
    /// Origin-change events.
    Event,
    /// Origin and resource writes.
    Write,
}

impl CallClass {
    /// Label value for metrics and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            CallClass::Purge => "purge",
            CallClass::Event => "event",
            CallClass::Write => "write",
        }
    }
}

/// The limiters, one per class, keyed by provider id (bounded by the providers that exist).
pub struct ApiLimits {
    purge: DefaultKeyedRateLimiter<String>,
    event: DefaultKeyedRateLimiter<String>,
    write: DefaultKeyedRateLimiter<String>,
    allowances: RateLimits,
}

impl ApiLimits {
    /// Limiters for `limits`; a zero allowance is read as one (the config check refuses it).
    pub fn new(limits: &RateLimits) -> Self {
        let per_minute = |n: u32| {
            RateLimiter::keyed(Quota::per_minute(
                NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN),
            ))
        };
        ApiLimits {
            purge: per_minute(limits.purges_per_minute),
            event: per_minute(limits.events_per_minute),
            write: per_minute(limits.writes_per_minute),
            allowances: *limits,
        }
    }

    /// Take one call of `class` from `provider`'s budget, or say how long until one is left.
    pub fn check(&self, class: CallClass, provider: &str) -> Result<(), Duration> {
        self.check_n(class, provider, 1)
    }

    /// Take `n` calls' worth of `class` (a purge of `n` tags costs `n`), at most a minute's
    /// allowance, so that a call never costs more than a full budget holds and the wait it
    /// is told always lets it pass.
    pub fn check_n(&self, class: CallClass, provider: &str, n: u32) -> Result<(), Duration> {
        let (limiter, allowance) = match class {
            CallClass::Purge => (&self.purge, self.allowances.purges_per_minute),
            CallClass::Event => (&self.event, self.allowances.events_per_minute),
            CallClass::Write => (&self.write, self.allowances.writes_per_minute),
        };
        let n = NonZeroU32::new(n.min(allowance)).unwrap_or(NonZeroU32::MIN);
        match limiter.check_key_n(&provider.to_string(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(limiter.clock().now())),
            // Unreachable with `n` at most the burst; read as "a minute".
            Err(_) => Err(Duration::from_secs(60)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_a_minutes_allowance_then_a_wait() {
        let limits = ApiLimits::new(&RateLimits {
            purges_per_minute: 3,
            ..RateLimits::default()
        });
        for _ in 0..3 {
            assert_eq!(limits.check(CallClass::Purge, "p-a"), Ok(()));
        }
        let wait = limits.check(CallClass::Purge, "p-a").unwrap_err();
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "one call comes back every 20 s: {wait:?}"
        );
        // Other providers and other classes have their own budgets.
        assert_eq!(limits.check(CallClass::Purge, "p-b"), Ok(()));
        assert_eq!(limits.check(CallClass::Write, "p-a"), Ok(()));
        assert_eq!(limits.check(CallClass::Event, "p-a"), Ok(()));
    }

    /// A purge of several tags costs one purge per tag, never more than the whole budget,
    /// and the wait a refusal names is enough for the same call to pass.
    #[test]
    fn a_call_may_cost_more_but_at_most_the_burst() {
        let limits = ApiLimits::new(&RateLimits {
            purges_per_minute: 4,
            ..RateLimits::default()
        });
        assert_eq!(limits.check_n(CallClass::Purge, "p-a", 3), Ok(()));
        let wait = limits.check_n(CallClass::Purge, "p-a", 2).unwrap_err();
        assert!(
            wait > Duration::from_secs(10) && wait <= Duration::from_secs(15),
            "one more purge comes back in 15 s: {wait:?}"
        );
        assert_eq!(limits.check(CallClass::Purge, "p-a"), Ok(()));
        assert!(limits.check(CallClass::Purge, "p-a").is_err(), "spent");
        assert_eq!(
            limits.check_n(CallClass::Purge, "p-b", 64),
            Ok(()),
            "a call larger than the budget takes all of it"
        );
        let wait = limits.check(CallClass::Purge, "p-b").unwrap_err();
        assert!(wait > Duration::from_secs(10), "{wait:?}");
    }

    #[test]
    fn a_zero_allowance_is_named() {
        let zero = RateLimits {
            events_per_minute: 0,
            ..RateLimits::default()
        };
        assert_eq!(
            zero.zero_field(),
            Some("admin.rate_limits.events_per_minute")
        );
        assert_eq!(RateLimits::default().zero_field(), None);
    }
}
