//! Host ownership: what an edge cached for a host belongs to whoever owned the host then.
//!
//! The broker purges `host/*` everywhere when a host is deleted and again when it is
//! registered anew, but an edge down (or unreachable from the broker) at both times still
//! holds the previous owner's objects. So the broker pushes every origin row with the time
//! its owner registered the host (`registered_at_ms`) and the push with its own clock's
//! reading (`sent_at_ms`), and the edge raises the host's floor (objects stored before it are
//! absent, see [`crate::storage::BanList`]) in two steps around the swap of its origin table:
//!
//! - **before**: a registration this edge has not applied raises the floor to the
//!   registration time, translated to the edge's clock by the age the broker gives it
//!   (`sent_at_ms - registered_at_ms`), so an offset between the two clocks does not move it
//!   (the push's transit time does, by milliseconds); never past now, and recorded, so later
//!   pushes of the same registration change nothing;
//! - **after**: a registration that replaces another one this edge applied means the edge
//!   kept the old row past the new registration (it missed the delete's push while serving)
//!   and may have fetched from the previous owner's upstream since: the floor goes to now,
//!   once the new row is in place, and fetches still in flight are refused by the floor too
//!   ([`crate::storage::FoyerStorage::purged_during`]). Only then is it recorded, so a crash
//!   between the steps repeats this one.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::storage::OwnerChange;

/// One pushed row's registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The host's key scope (`host/`, the host as keys spell it).
    pub scope: String,
    /// The broker's `registered_at_ms`.
    pub registered_ms: u64,
}

/// The floor changes one push calls for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Applied before the pushed table.
    pub before: Vec<OwnerChange>,
    /// Registrations replacing one applied earlier: floored at now after the table swap.
    pub replaced: Vec<Registration>,
}

impl Plan {
    /// The changes of the second step, floored at `now`.
    pub fn after(&self, now: SystemTime) -> Vec<OwnerChange> {
        self.replaced
            .iter()
            .map(|r| OwnerChange {
                scope: r.scope.clone(),
                floor: now,
                registered_ms: Some(r.registered_ms),
            })
            .collect()
    }
}

/// What a push of `regs`, sent at `sent_at_ms` on the broker's clock (`None`: a broker that
/// does not say; its clock is taken as the edge's), changes given the registrations
/// `applied` so far, at `now` on the edge's clock.
pub fn plan(
    regs: &[Registration],
    applied: impl Fn(&str) -> Option<u64>,
    sent_at_ms: Option<u64>,
    now: SystemTime,
) -> Plan {
    let mut plan = Plan::default();
    // A scope's first row decides: were a later row with another time to count once the
    // first is applied, every push would change the owner back and forth, flooring the host
    // each time.
    let mut seen = HashSet::new();
    for r in regs {
        if !seen.insert(r.scope.as_str()) {
            continue;
        }
        let previous = applied(&r.scope);
        if previous == Some(r.registered_ms) {
            continue;
        }
        let floor = match sent_at_ms {
            Some(sent) => now
                .checked_sub(Duration::from_millis(sent.saturating_sub(r.registered_ms)))
                .unwrap_or(UNIX_EPOCH),
            None => UNIX_EPOCH
                .checked_add(Duration::from_millis(r.registered_ms))
                .unwrap_or(now),
        }
        .min(now)
        .max(UNIX_EPOCH);
        let first = previous.is_none();
        plan.before.push(OwnerChange {
            scope: r.scope.clone(),
            floor,
            registered_ms: first.then_some(r.registered_ms),
        });
        if !first {
            plan.replaced.push(r.clone());
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(scope: &str, registered_ms: u64) -> Registration {
        Registration {
            scope: scope.into(),
            registered_ms,
        }
    }

    const NOW_MS: u64 = 1_800_000_000_000;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn a_new_registration_floors_at_its_age_on_this_edges_clock() {
        let now = at(NOW_MS);
        // Registered 10 s before the push, whether the broker's clock runs an hour ahead,
        // an hour behind, or with the edge's.
        for offset in [3_600_000i64, -3_600_000, 0] {
            let sent = (NOW_MS as i64 + offset) as u64;
            let p = plan(&[reg("h/", sent - 10_000)], |_| None, Some(sent), now);
            assert_eq!(
                p.before,
                vec![OwnerChange {
                    scope: "h/".into(),
                    floor: at(NOW_MS - 10_000),
                    registered_ms: Some(sent - 10_000),
                }],
                "offset {offset}"
            );
            assert!(p.replaced.is_empty());
        }
    }

    #[test]
    fn an_applied_registration_changes_nothing_and_a_replaced_one_floors_twice() {
        let now = at(NOW_MS);
        let applied = |s: &str| (s == "h/").then_some(5);
        let p = plan(&[reg("h/", 5)], applied, Some(NOW_MS), now);
        assert_eq!(p, Plan::default());
        let p = plan(&[reg("h/", NOW_MS - 1_000)], applied, Some(NOW_MS), now);
        assert_eq!(p.before.len(), 1);
        assert_eq!(p.before[0].floor, at(NOW_MS - 1_000));
        assert_eq!(p.before[0].registered_ms, None, "recorded after the swap");
        let later = at(NOW_MS + 3);
        assert_eq!(
            p.after(later),
            vec![OwnerChange {
                scope: "h/".into(),
                floor: later,
                registered_ms: Some(NOW_MS - 1_000),
            }]
        );
    }

    #[test]
    fn never_past_now_and_unreadable_times_are_safe() {
        let now = at(NOW_MS);
        let p = plan(&[reg("a/", u64::MAX)], |_| None, None, now);
        assert_eq!(p.before[0].floor, now);
        let p = plan(&[reg("a/", NOW_MS + 60_000)], |_| None, None, now);
        assert_eq!(p.before[0].floor, now, "a registration ahead of the edge");
        let p = plan(&[reg("a/", NOW_MS + 60_000)], |_| None, Some(NOW_MS), now);
        assert_eq!(p.before[0].floor, now, "registered after the push was sent");
        let p = plan(&[reg("a/", 0)], |_| None, Some(u64::MAX), now);
        assert_eq!(p.before[0].floor, UNIX_EPOCH, "older than the clock");
    }

    #[test]
    fn a_host_in_two_rows_is_planned_once() {
        let p = plan(&[reg("h/", 1), reg("h/", 2)], |_| None, None, at(NOW_MS));
        assert_eq!(p.before.len(), 1);
        assert_eq!(p.before[0].registered_ms, Some(1));
        // Once the first is applied, the push changes nothing: not the second row's time.
        let applied = |s: &str| (s == "h/").then_some(1);
        let p = plan(&[reg("h/", 1), reg("h/", 2)], applied, None, at(NOW_MS));
        assert_eq!(p, Plan::default());
    }
}
