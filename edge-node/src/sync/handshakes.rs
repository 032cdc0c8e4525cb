//! Bounds on QUIC handshakes in progress. A handshake costs the endpoint's thread TLS work
//! before the client has proved anything beyond its address, so a host could keep every
//! slot busy with handshakes it never finishes and lock the broker and peers out: slots are
//! capped per source as well as in total, and each handshake is given a deadline. A source
//! is an IPv4 address or an IPv6 /64: one host is usually given a whole /64, and could
//! otherwise take every slot from addresses of its own. Addresses that completed a handshake
//! with a cluster certificate (the broker, peer edges) within [`KNOWN_FOR`] are held to a cap
//! of their own exact address instead of their source's, and may take the last
//! [`RESERVED_FOR_KNOWN`] slots, so a host sharing the broker's /64, or a flood from
//! elsewhere, cannot lock the fleet out once it has connected. An address stops being known
//! when a handshake of its is refused over its certificate, or after [`KNOWN_FAILURES`]
//! handshakes in a row fail otherwise (time out, or exceed the peer's connection cap): a node
//! whose certificate was revoked keeps those slots for a few rounds at most whether refused or
//! stalling, while one slow handshake (an edge busy with a flood) does not demote the broker.
//! When more addresses are known than are kept, the source with the most loses its oldest: one
//! host with many addresses cannot push the broker out. The known addresses are saved in the
//! cache directory ([`KNOWN_ADDRESSES_FILE`]) when one is added, dropped or renewed by
//! [`RESAVE_AFTER`], at most every [`SAVE_EVERY`], and at shutdown, so the fleet keeps its
//! slots through an edge restart (a flood that starts with the restart does not lock the
//! broker out).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Handshakes in progress at once. A cluster's broker and peers connect once and stay
/// connected, far below this.
pub const MAX_HANDSHAKES: usize = 128;
/// Handshakes in progress from one source ([`source_of`]), or from one exact address known to
/// the fleet: a broker or a peer opens one connection.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;
/// Slots only addresses known to the fleet may take.
pub const RESERVED_FOR_KNOWN: usize = 16;
/// How long an address stays known after its last completed handshake: a pod address reused
/// by a stranger later is not trusted for long.
pub const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);
/// Addresses remembered at most (the fleet, many times over).
const KNOWN_ADDRESSES: usize = 1024;
/// Failed handshakes in a row (not certificate refusals) after which a known address is a
/// stranger again.
pub const KNOWN_FAILURES: u8 = 3;
/// The file in the edge's cache directory that keeps the known addresses across restarts.
pub const KNOWN_ADDRESSES_FILE: &str = "quic-known-addresses.json";
/// How often changed known addresses are saved.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);

/// The saved form: each known address and when (Unix seconds) it last completed a handshake.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    known: BTreeMap<IpAddr, u64>,
}

/// An address that completed a handshake with a cluster certificate.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// Until when it is known: [`KNOWN_FOR`] after its last handshake. A deadline rather than
    /// the handshake's time, because an `Instant` cannot go back before the host's boot and
    /// a saved handshake may be older than that.
    until: Instant,
    /// Its handshakes that failed since.
    failures: u8,
}

/// Known addresses are saved again when one is added or renewed by this much: not on every
/// reconnect of the fleet.
const RESAVE_AFTER: Duration = Duration::from_secs(3600);
/// A saved handshake time this far ahead of the clock is not believed (a clock set wrong, or
/// a forged entry that would otherwise be renewed at every start).
const FUTURE_SLACK: u64 = 300;
/// Longest a handshake may take before its slot is freed (loopback or a data centre
/// completes one in milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Default)]
struct Taken {
    total: usize,
    /// Handshakes in progress by source ([`source_of`]).
    by_source: HashMap<IpAddr, usize>,
    /// Handshakes in progress by exact address.
    by_address: HashMap<IpAddr, usize>,
    /// Addresses that completed a handshake.
    known: HashMap<IpAddr, Known>,
    /// `known` changed since it was last saved.
    changed: bool,
}

impl Taken {
    fn count(map: &mut HashMap<IpAddr, usize>, key: IpAddr, up: bool) {
        let n = map.entry(key).or_default();
        if up {
            *n += 1;
        } else {
            *n -= 1;
            if *n == 0 {
                map.remove(&key);
            }
        }
    }
}

/// The source a handshake from `ip` counts against: the IPv4 address (also when written as
/// an IPv4-mapped IPv6 one), or the IPv6 address's /64.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// The slots of one endpoint.
#[derive(Clone, Default)]
pub struct HandshakeSlots(Arc<parking_lot::Mutex<Taken>>);

/// One handshake's slot, freed when dropped.
pub struct Slot {
    slots: HandshakeSlots,
    /// The exact address.
    from: IpAddr,
}

impl HandshakeSlots {
    /// Slots that know the addresses saved at `path` ([`Self::save`]) whose last handshake
    /// is younger than [`KNOWN_FOR`]; none when there is no file, and none, with a warning,
    /// when it cannot be read (the fleet's next handshakes make them known again).
    pub fn remembered(path: &Path) -> Self {
        let slots = HandshakeSlots::default();
        let saved: Saved = match crate::durable::read_json(path) {
            Ok(saved) => saved.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "known QUIC addresses not read: the fleet's next handshakes are held to the caps of strangers");
                return slots;
            }
        };
        let (now, unix) = (Instant::now(), unix_now());
        let mut t = slots.0.lock();
        for (addr, at) in saved.known {
            if at > unix + FUTURE_SLACK {
                continue;
            }
            let age = Duration::from_secs(unix.saturating_sub(at));
            if let Some(left) = KNOWN_FOR.checked_sub(age).filter(|l| !l.is_zero()) {
                let until = now + left;
                t.known.insert(addr, Known { until, failures: 0 });
            }
        }
        drop(t);
        slots
    }

    /// Write the known addresses to `path` if they changed since the last save; whether it
    /// wrote. Blocking (a synced file): call it off the async workers.
    pub fn save(&self, path: &Path) -> std::io::Result<bool> {
        let saved = {
            let mut t = self.0.lock();
            if !std::mem::take(&mut t.changed) {
                return Ok(false);
            }
            let (now, unix) = (Instant::now(), unix_now());
            let known = t
                .known
                .iter()
                .filter(|(_, k)| k.until > now)
                .map(|(a, k)| {
                    let age = KNOWN_FOR.saturating_sub(k.until.saturating_duration_since(now));
                    (*a, unix.saturating_sub(age.as_secs()))
                })
                .collect();
            Saved { known }
        };
        // Readable by the edge's user only: it says which addresses the fleet connects from.
        let how = crate::durable::Replacing {
            mode: Some(0o600),
            installed: false,
        };
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::durable::replace(path, &bytes, how));
        if written.is_err() {
            // Tried again at the next save.
            self.0.lock().changed = true;
        }
        written.map(|()| true)
    }

    /// A slot for a handshake from `from`, unless the endpoint or its source (for an address
    /// known to the fleet: the address itself) is at its limit.
    pub fn admit(&self, from: IpAddr) -> Option<Slot> {
        let now = Instant::now();
        let source = source_of(from);
        let mut t = self.0.lock();
        let known = t.known.get(&from).is_some_and(|k| now < k.until);
        let full = if known {
            t.total >= MAX_HANDSHAKES
                || t.by_address.get(&from).copied().unwrap_or(0) >= MAX_HANDSHAKES_PER_ADDRESS
        } else {
            t.total >= MAX_HANDSHAKES - RESERVED_FOR_KNOWN
                || t.by_source.get(&source).copied().unwrap_or(0) >= MAX_HANDSHAKES_PER_ADDRESS
        };
        if full {
            return None;
        }
        t.total += 1;
        Taken::count(&mut t.by_source, source, true);
        Taken::count(&mut t.by_address, from, true);
        Some(Slot {
            slots: self.clone(),
            from,
        })
    }
}

impl Slot {
    /// The handshake completed with a cluster certificate: its address is the fleet's for
    /// [`KNOWN_FOR`] from now.
    pub fn authenticated(&self) {
        let until = Instant::now() + KNOWN_FOR;
        let mut t = self.slots.0.lock();
        let before = t.known.insert(self.from, Known { until, failures: 0 });
        if t.known.len() > KNOWN_ADDRESSES {
            if let Some(a) = crowded_oldest(&t.known, self.from) {
                t.known.remove(&a);
            }
        }
        // New, or renewed by an hour or more: worth a save.
        if before.is_none_or(|k| until.saturating_duration_since(k.until) >= RESAVE_AFTER) {
            t.changed = true;
        }
    }

    /// The handshake was refused over its certificate (foreign, expired, revoked): the
    /// address is a stranger again, however recently it was the fleet's.
    pub fn refused(&self) {
        let mut t = self.slots.0.lock();
        if t.known.remove(&self.from).is_some() {
            t.changed = true;
        }
    }

    /// The handshake failed otherwise (timed out, abandoned) or its peer may open no more
    /// connections: after [`KNOWN_FAILURES`] in a row the address is a stranger again — a
    /// revoked node that stalls its handshakes keeps no slots kept for the fleet.
    pub fn failed(&self) {
        let mut t = self.slots.0.lock();
        let Some(k) = t.known.get_mut(&self.from) else {
            return;
        };
        k.failures = k.failures.saturating_add(1);
        if k.failures >= KNOWN_FAILURES {
            t.known.remove(&self.from);
            t.changed = true;
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The known address to forget for room: the oldest of the source ([`source_of`]) with the
/// most known addresses (among equals, the source whose oldest is oldest), never `keep`.
fn crowded_oldest(known: &HashMap<IpAddr, Known>, keep: IpAddr) -> Option<IpAddr> {
    // Per source: (addresses, its oldest address and when).
    let mut per_source: HashMap<IpAddr, (usize, IpAddr, Instant)> = HashMap::new();
    for (a, k) in known.iter().filter(|(a, _)| **a != keep) {
        let e = per_source.entry(source_of(*a)).or_insert((0, *a, k.until));
        e.0 += 1;
        if k.until < e.2 {
            (e.1, e.2) = (*a, k.until);
        }
    }
    per_source
        .into_values()
        .max_by(|x, y| x.0.cmp(&y.0).then(y.2.cmp(&x.2)))
        .map(|(_, a, _)| a)
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.slots.0.lock();
        t.total -= 1;
        Taken::count(&mut t.by_source, source_of(self.from), false);
        Taken::count(&mut t.by_address, self.from, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_cannot_take_every_slot() {
        let slots = HandshakeSlots::default();
        let greedy: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<Slot> = std::iter::from_fn(|| slots.admit(greedy)).collect();
        assert_eq!(held.len(), MAX_HANDSHAKES_PER_ADDRESS);
        let broker: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(
            slots.admit(broker).is_some(),
            "another address still gets in"
        );
        drop(held);
        assert!(
            slots.admit(greedy).is_some(),
            "freed when the handshakes end"
        );
        let t = slots.0.lock();
        assert!(t.by_address.is_empty() && t.by_source.is_empty());
    }

    #[test]
    fn an_ipv6_host_counts_as_one_source_across_its_64() {
        let slots = HandshakeSlots::default();
        let held: Vec<Slot> = (1..=64u16)
            .flat_map(|i| slots.admit(format!("2001:db8:0:1::{i:x}").parse().unwrap()))
            .collect();
        assert_eq!(held.len(), MAX_HANDSHAKES_PER_ADDRESS);
        let next_64: IpAddr = "2001:db8:0:2::1".parse().unwrap();
        assert!(slots.admit(next_64).is_some());
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_of(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_endpoint_has_a_total_limit() {
        let slots = HandshakeSlots::default();
        let held: Vec<Slot> = (0..=255u8)
            .flat_map(|i| slots.admit(IpAddr::from([10, 0, 0, i])))
            .collect();
        assert_eq!(held.len(), MAX_HANDSHAKES - RESERVED_FOR_KNOWN);
        assert!(slots.admit("10.0.1.1".parse().unwrap()).is_none());
    }

    /// An address that completed a handshake before gets in while strangers fill the
    /// endpoint, and while another host of its /64 fills that source.
    #[test]
    fn the_fleet_keeps_slots_of_its_own() {
        let slots = HandshakeSlots::default();
        let broker: IpAddr = "2001:db8::b".parse().unwrap();
        slots.admit(broker).unwrap().authenticated();
        let neighbour: Vec<Slot> = (1..=16u16)
            .flat_map(|i| slots.admit(format!("2001:db8::{i:x}0").parse().unwrap()))
            .collect();
        assert_eq!(neighbour.len(), MAX_HANDSHAKES_PER_ADDRESS);
        let strangers: Vec<Slot> = (0..=255u8)
            .flat_map(|i| slots.admit(IpAddr::from([10, 0, 0, i])))
            .chain((0..=255u8).flat_map(|i| slots.admit(IpAddr::from([10, 0, 1, i]))))
            .collect();
        assert_eq!(
            strangers.len() + neighbour.len(),
            MAX_HANDSHAKES - RESERVED_FOR_KNOWN
        );
        let held: Vec<Slot> = std::iter::from_fn(|| slots.admit(broker)).collect();
        assert_eq!(
            held.len(),
            MAX_HANDSHAKES_PER_ADDRESS,
            "capped as one address"
        );
        let peer: IpAddr = "192.0.2.9".parse().unwrap();
        slots.0.lock().known.insert(
            peer,
            Known {
                until: Instant::now() + KNOWN_FOR,
                failures: 0,
            },
        );
        let more: Vec<Slot> = std::iter::from_fn(|| slots.admit(peer)).collect();
        assert_eq!(more.len(), RESERVED_FOR_KNOWN - MAX_HANDSHAKES_PER_ADDRESS);
        // Known long ago is a stranger again.
        let stale: IpAddr = "192.0.2.10".parse().unwrap();
        let until = Instant::now();
        slots
            .0
            .lock()
            .known
            .insert(stale, Known { until, failures: 0 });
        assert!(slots.admit(stale).is_none(), "the stranger slots are full");
    }

    /// Known addresses outlive a restart: saved when they change, read back with their age,
    /// those past [`KNOWN_FOR`] and those demoted since left out.
    #[test]
    fn known_addresses_are_kept_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KNOWN_ADDRESSES_FILE);
        let slots = HandshakeSlots::remembered(&path);
        assert!(!slots.save(&path).unwrap(), "nothing changed");
        let (broker, peer, revoked): (IpAddr, IpAddr, IpAddr) = (
            "192.0.2.1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            "192.0.2.3".parse().unwrap(),
        );
        for a in [broker, peer, revoked] {
            slots.admit(a).unwrap().authenticated();
        }
        slots.admit(revoked).unwrap().refused();
        assert!(slots.save(&path).unwrap());
        assert!(!slots.save(&path).unwrap(), "saved once per change");
        slots.admit(broker).unwrap().authenticated();
        assert!(!slots.save(&path).unwrap(), "a reconnect renews, unsaved");
        // Written an hour ago, and one address known two days before that.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut saved: Saved = serde_json::from_str(&text).unwrap();
        for at in saved.known.values_mut() {
            *at -= 3600;
        }
        saved
            .known
            .insert("192.0.2.4".parse().unwrap(), unix_now() - 2 * 86_400);
        // And one from a clock set ahead (or written by someone else): not believed.
        saved
            .known
            .insert("192.0.2.5".parse().unwrap(), unix_now() + 3600);
        std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();

        let restarted = HandshakeSlots::remembered(&path);
        let t = restarted.0.lock();
        let mut known: Vec<IpAddr> = t.known.keys().copied().collect();
        known.sort();
        assert_eq!(known, vec![broker, peer]);
        let left = t.known[&broker]
            .until
            .saturating_duration_since(Instant::now());
        let age = KNOWN_FOR - left;
        assert!(
            age >= Duration::from_secs(3599) && age < Duration::from_secs(3700),
            "{age:?}"
        );
        drop(t);
        // An unreadable file: nothing known, and the next save replaces it.
        std::fs::write(&path, "{").unwrap();
        let blank = HandshakeSlots::remembered(&path);
        assert!(blank.0.lock().known.is_empty());
        blank.admit(peer).unwrap().authenticated();
        assert!(blank.save(&path).unwrap());
        assert_eq!(HandshakeSlots::remembered(&path).0.lock().known.len(), 1);
    }

    /// One host's many addresses fill the known set; the broker's stays known.
    #[test]
    fn the_crowded_source_loses_its_oldest_known_address() {
        let slots = HandshakeSlots::default();
        let broker: IpAddr = "192.0.2.2".parse().unwrap();
        slots.admit(broker).unwrap().authenticated();
        for i in 1..=(KNOWN_ADDRESSES as u16 + 50) {
            let a: IpAddr = format!("2001:db8:0:1::{i:x}").parse().unwrap();
            slots.admit(a).unwrap().authenticated();
        }
        let t = slots.0.lock();
        assert_eq!(t.known.len(), KNOWN_ADDRESSES);
        assert!(t.known.contains_key(&broker));
        assert!(!t
            .known
            .contains_key(&"2001:db8:0:1::1".parse::<IpAddr>().unwrap()));
    }

    /// A handshake refused over its certificate forgets its address at once; handshakes that
    /// time out (a revoked node that stalls rather than shows its certificate) after a few in
    /// a row, and a success in between starts the count again.
    #[test]
    fn an_address_whose_handshakes_fail_is_a_stranger_again() {
        let slots = HandshakeSlots::default();
        let (revoked, stalling): (IpAddr, IpAddr) =
            ("192.0.2.11".parse().unwrap(), "192.0.2.12".parse().unwrap());
        slots.admit(revoked).unwrap().authenticated();
        slots.admit(stalling).unwrap().authenticated();
        let strangers: Vec<Slot> = (0..=255u8)
            .flat_map(|i| slots.admit(IpAddr::from([10, 0, 0, i])))
            .collect();
        assert_eq!(strangers.len(), MAX_HANDSHAKES - RESERVED_FOR_KNOWN);
        slots
            .admit(revoked)
            .expect("a known address takes a kept slot")
            .refused();
        assert!(slots.admit(revoked).is_none(), "no longer known");
        for _ in 1..KNOWN_FAILURES {
            slots.admit(stalling).unwrap().failed();
        }
        slots.admit(stalling).unwrap().authenticated();
        for _ in 1..KNOWN_FAILURES {
            slots.admit(stalling).unwrap().failed();
        }
        assert!(slots.admit(stalling).is_some(), "still known");
        slots.admit(stalling).unwrap().failed();
        assert!(slots.admit(stalling).is_none(), "no longer known");
    }
}
