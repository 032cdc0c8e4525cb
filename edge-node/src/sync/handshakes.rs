//! Bounds on QUIC handshakes in progress. A handshake costs the endpoint's thread TLS work
//! before the client has proved anything beyond its address, so a host could keep every
//! slot busy with handshakes it never finishes and lock the broker and peers out: slots are
//! capped per source as well as in total, and each handshake is given a deadline. A source
//! is an IPv4 address or an IPv6 /64: one host is usually given a whole /64, and could
//! otherwise take every slot from addresses of its own. Addresses that have completed a
//! handshake with a cluster certificate (the broker, peer edges) are remembered: they are
//! held to neither that per-source cap nor the last [`RESERVED_FOR_KNOWN`] slots, so a host
//! sharing the broker's /64, or a flood from elsewhere, cannot lock the fleet out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Handshakes in progress at once. A cluster's broker and peers connect once and stay
/// connected, far below this.
pub const MAX_HANDSHAKES: usize = 128;
/// Handshakes in progress from one source ([`source_of`]): a broker or a peer opens one
/// connection.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;
/// Slots only addresses that completed a handshake before may take.
pub const RESERVED_FOR_KNOWN: usize = 16;
/// Addresses remembered as having completed a handshake (the fleet, many times over).
const KNOWN_ADDRESSES: usize = 1024;
/// Longest a handshake may take before its slot is freed (loopback or a data centre
/// completes one in milliseconds).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Default)]
struct Taken {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
    /// Exact addresses that completed a handshake, oldest first.
    known: HashSet<IpAddr>,
    known_order: VecDeque<IpAddr>,
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
    /// The source it counts against ([`source_of`]).
    ip: IpAddr,
    /// The exact address.
    from: IpAddr,
}

impl HandshakeSlots {
    /// A slot for a handshake from `from`, unless the endpoint or that source is at its
    /// limit (an address known to the fleet is held only to the endpoint's).
    pub fn admit(&self, from: IpAddr) -> Option<Slot> {
        let ip = source_of(from);
        let mut t = self.0.lock();
        let from_ip = t.by_address.get(&ip).copied().unwrap_or(0);
        let full = if t.known.contains(&from) {
            t.total >= MAX_HANDSHAKES
        } else {
            t.total >= MAX_HANDSHAKES - RESERVED_FOR_KNOWN || from_ip >= MAX_HANDSHAKES_PER_ADDRESS
        };
        if full {
            return None;
        }
        t.total += 1;
        t.by_address.insert(ip, from_ip + 1);
        Some(Slot {
            slots: self.clone(),
            ip,
            from,
        })
    }
}

impl Slot {
    /// The handshake completed with a cluster certificate: its address is the fleet's.
    pub fn authenticated(&self) {
        let mut t = self.slots.0.lock();
        if t.known.insert(self.from) {
            t.known_order.push_back(self.from);
            if t.known_order.len() > KNOWN_ADDRESSES {
                if let Some(old) = t.known_order.pop_front() {
                    t.known.remove(&old);
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.slots.0.lock();
        t.total -= 1;
        if let Some(n) = t.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.by_address.remove(&self.ip);
            }
        }
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
        assert!(slots.0.lock().by_address.is_empty());
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
        assert_eq!(held.len(), RESERVED_FOR_KNOWN);
    }
}
