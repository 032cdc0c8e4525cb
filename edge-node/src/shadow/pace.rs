//! Bandwidth pacing of shadow fills: prefetches must not crowd out the traffic they are
//! meant to speed up, on the origin's link or on a peer's.
//!
//! A fill's size is only known once it is done, so the pacer works on debt: each finished
//! fill pushes the earliest start of the next one back by `bytes / rate`. Over any stretch
//! of time the fills average at most `rate`, after an initial burst of at most
//! `fill_concurrency` fills.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Paces shadow fills to a byte rate; unlimited when built without one.
#[derive(Debug)]
pub struct FillPacer {
    bytes_per_sec: Option<f64>,
    next_start: Mutex<Instant>,
}

impl FillPacer {
    /// A pacer for `bytes_per_sec` (`None` or 0: unlimited).
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        FillPacer {
            bytes_per_sec: bytes_per_sec.filter(|r| *r > 0).map(|r| r as f64),
            next_start: Mutex::new(Instant::now()),
        }
    }

    /// How long a fill that wants to start at `now` must wait.
    pub fn wait(&self, now: Instant) -> Duration {
        self.next_start.lock().saturating_duration_since(now)
    }

    /// Charge a finished fill of `bytes` at `now`.
    pub fn charge(&self, bytes: u64, now: Instant) {
        if let Some(rate) = self.bytes_per_sec {
            let mut next = self.next_start.lock();
            *next = (*next).max(now) + Duration::from_secs_f64(bytes as f64 / rate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_are_spaced_by_their_size_over_the_rate() {
        let p = FillPacer::new(Some(1_000_000));
        let t0 = Instant::now();
        assert_eq!(p.wait(t0), Duration::ZERO);
        p.charge(500_000, t0);
        assert_eq!(p.wait(t0), Duration::from_millis(500));
        // Debt adds up; time pays it back.
        p.charge(1_000_000, t0);
        assert_eq!(p.wait(t0), Duration::from_millis(1500));
        assert_eq!(
            p.wait(t0 + Duration::from_secs(1)),
            Duration::from_millis(500)
        );
        // Idle time is not banked: after a long pause the next fill waits only for its own.
        let later = t0 + Duration::from_secs(10);
        p.charge(100_000, later);
        assert_eq!(p.wait(later), Duration::from_millis(100));
    }

    #[test]
    fn no_rate_means_no_waiting() {
        for p in [FillPacer::new(None), FillPacer::new(Some(0))] {
            let t0 = Instant::now();
            p.charge(u64::MAX, t0);
            assert_eq!(p.wait(t0), Duration::ZERO);
        }
    }
}
