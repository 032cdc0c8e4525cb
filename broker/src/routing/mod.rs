//! Where a request goes: client region, then weighted rendezvous among the region's healthy
//! active edges, then its standby, then neighbouring regions, then the origin.

mod address;
mod health;
mod holders;
mod region;
pub mod rendezvous;

pub use address::{Addresses, Resolved};
pub use health::{Health, HealthChecker};
pub use holders::{Holders, HoldersFileError, PeerFillSection, Restored};
pub use region::RegionResolver;

use crate::config::{BrokerConfig, EdgeEntry, Role};

/// Why a route was chosen; edges receive it in `x-shadowcdn-route` and split metrics by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The key's rendezvous owner in the client's region.
    Primary,
    /// Another active edge of the region: the owner is down.
    Failover,
    /// The region's warm standby: no active edge is healthy.
    Standby,
    /// An edge of a neighbouring region.
    Neighbour,
    /// No edge is usable: straight to the origin.
    Origin,
}

impl Reason {
    /// Label for headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Primary => "primary",
            Reason::Failover => "failover",
            Reason::Standby => "standby",
            Reason::Neighbour => "neighbour",
            Reason::Origin => "origin",
        }
    }
}

/// One choice in a request's ordered plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Edge index, `None` for the origin.
    pub edge: Option<usize>,
    /// Region index of the edge (the client's region for the origin).
    pub region: usize,
    /// Why.
    pub reason: Reason,
}

/// The fleet as configured, indexed.
#[derive(Debug)]
pub struct Fleet {
    /// Edges in configuration order.
    pub edges: Vec<EdgeEntry>,
    /// Region names; indices are region ids.
    pub regions: Vec<String>,
    /// Region index of each edge.
    edge_region: Vec<usize>,
    /// Neighbour region indices of each region, nearest first.
    neighbours: Vec<Vec<usize>>,
    /// Where each edge is now (names resolved).
    pub addresses: Addresses,
}

impl Fleet {
    /// Index the configured regions and edges.
    pub fn new(cfg: &BrokerConfig) -> Self {
        let regions: Vec<String> = cfg.regions.iter().map(|r| r.name.clone()).collect();
        let idx = |name: &str| regions.iter().position(|r| r == name);
        let neighbours = cfg
            .regions
            .iter()
            .map(|r| r.neighbours.iter().filter_map(|n| idx(n)).collect())
            .collect();
        let edge_region = cfg.edges.iter().filter_map(|e| idx(&e.region)).collect();
        Fleet {
            addresses: Addresses::new(&cfg.edges),
            edges: cfg.edges.clone(),
            regions,
            edge_region,
            neighbours,
        }
    }

    /// Region index by name.
    pub fn region_index(&self, name: &str) -> Option<usize> {
        self.regions
            .iter()
            .position(|r| r.eq_ignore_ascii_case(name))
    }

    /// Region index of an edge.
    pub fn edge_region(&self, edge: usize) -> usize {
        self.edge_region[edge]
    }

    /// Usable edges of `region` in `role` for `key`, best first: up, not in `failed`, serving
    /// the key's host (see [`Health::set_hosts_off`]), and with a proxy address (a name that never resolved has none; such an edge must not keep
    /// its region's standby out of the plan).
    fn ranked(&self, region: usize, role: Role, key: &str, usable: &Usable<'_>) -> Vec<usize> {
        rendezvous::rank(
            self.edges
                .iter()
                .enumerate()
                .filter(|(i, e)| {
                    self.edge_region[*i] == region
                        && e.role == role
                        && usable.is(*i)
                        && self.addresses.get(*i).proxy.is_some()
                })
                .map(|(i, e)| (i, e.id.as_str(), e.weight)),
            key,
        )
    }

    /// The key's owner among all active edges of a region, healthy or not.
    pub fn owner(&self, region: usize, key: &str) -> Option<usize> {
        rendezvous::rank(
            self.edges
                .iter()
                .enumerate()
                .filter(|(i, e)| self.edge_region[*i] == region && e.role == Role::Active)
                .map(|(i, e)| (i, e.id.as_str(), e.weight)),
            key,
        )
        .first()
        .copied()
    }

    /// The edge that should hold `key` in `region` now (its first healthy choice there), if
    /// the region has a usable edge; where shadows of `key` go.
    pub fn edge_in_region(&self, key: &str, region: usize, health: &Health) -> Option<usize> {
        self.plan(key, region, health)
            .into_iter()
            .find(|c| c.region == region)
            .and_then(|c| c.edge)
    }

    /// Region indices by distance from `region`: itself, its neighbours nearest first, then
    /// every other region.
    pub fn regions_by_distance(&self, region: usize) -> Vec<usize> {
        let mut order = vec![region];
        order.extend(self.neighbours[region].iter().copied());
        order.extend(0..self.regions.len());
        let mut seen = vec![false; self.regions.len()];
        order.retain(|r| !std::mem::replace(&mut seen[*r], true));
        order
    }

    /// The ordered choices for `key` from a client in `region`.
    pub fn plan(&self, key: &str, region: usize, health: &Health) -> Vec<Choice> {
        self.plan_after(key, region, health, &[])
    }

    /// [`Self::plan`] for a request whose attempts on the `failed` edges did not answer: those
    /// count as down for it, so a region whose actives all failed it offers its standby
    /// before a neighbour — also when the health checks still see them up (an edge whose
    /// connects time out is not marked down by one request).
    pub fn plan_after(
        &self,
        key: &str,
        region: usize,
        health: &Health,
        failed: &[usize],
    ) -> Vec<Choice> {
        let host = host_of(key);
        let usable = Usable {
            health,
            failed,
            host,
        };
        let mut plan = Vec::with_capacity(4);
        let owner = self.owner(region, key);
        self.region_choices(key, region, &usable, owner, false, &mut plan);
        for &n in &self.neighbours[region] {
            let owner = self.owner(n, key);
            self.region_choices(key, n, &usable, owner, true, &mut plan);
        }
        plan.push(Choice {
            edge: None,
            region,
            reason: Reason::Origin,
        });
        plan
    }

    fn region_choices(
        &self,
        key: &str,
        region: usize,
        usable: &Usable<'_>,
        owner: Option<usize>,
        neighbour: bool,
        plan: &mut Vec<Choice>,
    ) {
        let actives = self.ranked(region, Role::Active, key, usable);
        let edges = if actives.is_empty() {
            self.ranked(region, Role::Standby, key, usable)
        } else {
            actives
        };
        for e in edges {
            let reason = if neighbour {
                Reason::Neighbour
            } else if self.edges[e].role == Role::Standby {
                Reason::Standby
            } else if Some(e) == owner {
                Reason::Primary
            } else {
                Reason::Failover
            };
            plan.push(Choice {
                edge: Some(e),
                region,
                reason,
            });
        }
    }
}

/// The host of a key or resource (`host/path`): what origin tables, an edge's hosts kept off
/// and a series' owner are keyed by.
pub fn host_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(host, _)| host)
}

/// Which edges a plan may choose: up, not already failed by the request, and routing its
/// host as the registry does.
struct Usable<'a> {
    health: &'a Health,
    failed: &'a [usize],
    host: &'a str,
}

impl Usable<'_> {
    fn is(&self, edge: usize) -> bool {
        self.health.is_up(edge)
            && !self.failed.contains(&edge)
            && self.health.serves_host(edge, self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::SAMPLE;

    fn fleet() -> (Fleet, Health) {
        let cfg = BrokerConfig::from_toml(SAMPLE).unwrap();
        let f = Fleet::new(&cfg);
        let h = Health::new(f.edges.len(), 2, 2);
        (f, h)
    }

    #[test]
    fn owner_first_then_other_active_then_neighbour_then_origin() {
        let (f, h) = fleet();
        let p = f.plan("host/x", 0, &h);
        assert_eq!(p[0].reason, Reason::Primary);
        assert_eq!(p[1].reason, Reason::Failover);
        assert_eq!(p[2].reason, Reason::Neighbour);
        assert_eq!(p[2].edge, Some(3));
        assert_eq!(p[3].reason, Reason::Origin);
        // The standby is not used while an active edge is up.
        assert!(p.iter().all(|c| c.edge != Some(2)));
    }

    #[test]
    fn failed_owner_moves_key_to_next_active_and_standby_takes_over_last() {
        let (f, h) = fleet();
        let key = "host/y";
        let owner = f.plan(key, 0, &h)[0].edge.unwrap();
        h.mark_down(owner);
        let p = f.plan(key, 0, &h);
        assert_eq!(p[0].reason, Reason::Failover);
        assert_ne!(p[0].edge, Some(owner));
        h.mark_down(0);
        h.mark_down(1);
        let p = f.plan(key, 0, &h);
        assert_eq!(
            p[0],
            Choice {
                edge: Some(2),
                region: 0,
                reason: Reason::Standby
            }
        );
        h.mark_down(2);
        h.mark_down(3);
        let p = f.plan(key, 0, &h);
        assert_eq!(
            p,
            vec![Choice {
                edge: None,
                region: 0,
                reason: Reason::Origin
            }]
        );
    }

    #[test]
    fn a_request_whose_actives_failed_it_gets_the_standby_before_a_neighbour() {
        let (f, h) = fleet();
        // Both actives of region 0 still count as up (their connects timed out, say).
        let p = f.plan_after("host/z", 0, &h, &[0, 1]);
        assert_eq!(
            p[0],
            Choice {
                edge: Some(2),
                region: 0,
                reason: Reason::Standby
            }
        );
        assert_eq!((p[1].edge, p[1].reason), (Some(3), Reason::Neighbour));
        // One active left untried: it is still the region's answer, not the standby.
        let p = f.plan_after("host/z", 0, &h, &[0]);
        assert_eq!(p[0].edge, Some(1));
        assert!(p.iter().all(|c| c.edge != Some(2)));
    }

    /// A host kept off an edge (its origin table routes it otherwise) goes to the next edge
    /// that serves it, the standby when no active does; other hosts keep their owners.
    #[test]
    fn a_host_kept_off_edges_goes_to_those_that_serve_it() {
        let (f, h) = fleet();
        let owner = f.plan("other/z", 0, &h)[0].edge;
        let off = |hosts: &[&str]| hosts.iter().map(|s| s.to_string()).collect();
        assert!(h.set_hosts_off(0, off(&["host"])));
        assert!(!h.set_hosts_off(0, off(&["host"])), "unchanged");
        assert!(h.set_hosts_off(1, off(&["host", "third"])));
        let p = f.plan("host/z", 0, &h);
        assert_eq!((p[0].edge, p[0].reason), (Some(2), Reason::Standby));
        assert!(p.iter().all(|c| !matches!(c.edge, Some(0 | 1))));
        assert_eq!(f.plan("other/z", 0, &h)[0].edge, owner);
        assert_eq!(f.edge_in_region("host/z", 0, &h), Some(2));
        h.set_hosts_off(0, off(&[]));
        assert_eq!(f.plan("host/z", 0, &h)[0].edge, Some(0));
        assert_eq!(h.hosts_off(1), 2);
    }
}
