//! Where each edge is now: its configured addresses, with DNS names resolved.
//!
//! IP literals are used as they are. Names are resolved at start and again before every health
//! probe, so an edge that comes back at a new address (a pod restarted elsewhere) is followed
//! within one probe interval. Each host is looked up once per round for all of an edge's ports,
//! and one lookup per edge at most is under way: a slow resolver delays an update, it does not
//! pile up lookups. A lookup that fails or times out keeps the address in use (a resolver
//! outage must not take the fleet down; the probes judge the address). Among several addresses
//! of a name (sorted, as resolvers may shuffle them) the one in use is kept until a probe fails
//! there, then the next is tried.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::config::{EdgeAddr, EdgeEntry};

/// The current socket addresses of one edge; `None` where a name never resolved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The HTTP listener clients' requests go to.
    pub proxy: Option<SocketAddr>,
    /// The admin API (health, purge, origin push).
    pub admin: Option<SocketAddr>,
    /// The QUIC listener (control, peer fills), when the edge has one.
    pub sync: Option<SocketAddr>,
}

/// A name lookup: every address of a host.
type Lookup = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>
        + Send
        + Sync,
>;

/// One edge's resolution state.
#[derive(Debug, Default)]
struct Slot {
    now: RwLock<Resolved>,
    /// The address in use for each of the edge's host names.
    ips: Mutex<BTreeMap<String, IpAddr>>,
    /// The addresses a probe failed at since the last lookup: if they are still the ones in
    /// use, the lookup moves on to a name's next address. A failure of addresses already
    /// left behind (a probe that ran during a slow lookup) moves nothing.
    failed_at: Mutex<Option<Resolved>>,
    /// A lookup is under way.
    resolving: AtomicBool,
}

impl Slot {
    /// Look up every name of `entry` once and publish the addresses.
    async fn resolve(&self, entry: &EdgeEntry, lookup: &Lookup) {
        let mut hosts: Vec<&str> = endpoints(entry)
            .filter(|a| a.literal().is_none())
            .map(EdgeAddr::host)
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        let failed_at = self.failed_at.lock().take();
        let moving_on = failed_at.is_some_and(|f| f == *self.now.read());
        for host in hosts {
            let mut found = match lookup(host.to_string()).await {
                Ok(found) if !found.is_empty() => found,
                Ok(_) => {
                    tracing::warn!(edge = %entry.id, host, "edge name has no address; keeping the last");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(edge = %entry.id, host, error = %e, "edge name lookup failed; keeping the last address");
                    continue;
                }
            };
            found.sort_unstable();
            found.dedup();
            let mut ips = self.ips.lock();
            let next = match ips
                .get(host)
                .and_then(|ip| found.iter().position(|f| f == ip))
            {
                Some(i) if moving_on => found[(i + 1) % found.len()],
                Some(i) => found[i],
                None => found[0],
            };
            ips.insert(host.to_string(), next);
        }
        let next = {
            let ips = self.ips.lock();
            let at = |a: &EdgeAddr| {
                a.literal()
                    .or_else(|| ips.get(a.host()).map(|ip| SocketAddr::new(*ip, a.port())))
            };
            Resolved {
                proxy: at(&entry.addr),
                admin: at(&entry.admin),
                sync: entry.sync.as_ref().and_then(at),
            }
        };
        let mut now = self.now.write();
        if *now != next {
            tracing::info!(edge = %entry.id, from = ?*now, to = ?next, "edge addresses changed");
            *now = next;
        }
    }
}

/// Marks a slot's lookup finished when dropped.
struct Resolving<'a>(&'a AtomicBool);

impl Drop for Resolving<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn endpoints(e: &EdgeEntry) -> impl Iterator<Item = &EdgeAddr> {
    [Some(&e.addr), Some(&e.admin), e.sync.as_ref()]
        .into_iter()
        .flatten()
}

/// The resolved addresses of every edge, by edge index.
pub struct Addresses {
    slots: Vec<Arc<Slot>>,
    lookup: Lookup,
}

impl std::fmt::Debug for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Addresses")
            .field("slots", &self.slots)
            .finish()
    }
}

impl Addresses {
    /// IP literals filled in; names unknown until [`Self::resolve_at_start`] or
    /// [`Self::refresh`].
    pub fn new(edges: &[EdgeEntry]) -> Self {
        Self::with_lookup(
            edges,
            Arc::new(|host: String| {
                Box::pin(async move {
                    let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
                    Ok(found.map(|a| a.ip()).collect())
                })
            }),
        )
    }

    fn with_lookup(edges: &[EdgeEntry], lookup: Lookup) -> Self {
        let slots = edges
            .iter()
            .map(|e| {
                let slot = Slot::default();
                *slot.now.write() = Resolved {
                    proxy: e.addr.literal(),
                    admin: e.admin.literal(),
                    sync: e.sync.as_ref().and_then(EdgeAddr::literal),
                };
                Arc::new(slot)
            })
            .collect();
        Addresses { slots, lookup }
    }

    /// Edge `edge`'s addresses now.
    pub fn get(&self, edge: usize) -> Resolved {
        *self.slots[edge].now.read()
    }

    /// A probe of edge `edge` at `probed` failed: where a name has several addresses, the
    /// next lookup moves on to the next one (unless the edge has moved on already).
    pub fn probe_failed(&self, edge: usize, probed: Resolved) {
        *self.slots[edge].failed_at.lock() = Some(probed);
    }

    /// Resolve every edge's names before serving, all at once, waiting at most `limit`
    /// (names still unresolved then are resolved by the first probes). Must run outside a
    /// tokio runtime (the broker's start-up).
    pub fn resolve_at_start(&self, edges: &[EdgeEntry], limit: Duration) {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(futures::future::join_all(
            edges
                .iter()
                .enumerate()
                .map(|(i, e)| self.refresh(i, e, limit)),
        ));
        rt.shutdown_background();
    }

    /// Resolve edge `edge`'s names again, waiting at most `timeout` for the answer (a slower
    /// one is still taken when it comes); returns the addresses to use now.
    pub async fn refresh(&self, edge: usize, entry: &EdgeEntry, timeout: Duration) -> Resolved {
        let slot = &self.slots[edge];
        let named = endpoints(entry).any(|a| a.literal().is_none());
        if named && !slot.resolving.swap(true, Ordering::AcqRel) {
            let (slot, entry, lookup) = (slot.clone(), entry.clone(), self.lookup.clone());
            let task = tokio::spawn(async move {
                // Cleared however the lookup ends, even dropped with its runtime (start-up).
                let _done = Resolving(&slot.resolving);
                slot.resolve(&entry, &lookup).await;
            });
            let _ = tokio::time::timeout(timeout, task).await;
        }
        self.get(edge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(addr: &str, admin: &str, sync: Option<&str>) -> EdgeEntry {
        EdgeEntry {
            id: "e".into(),
            region: "eu".into(),
            addr: addr.parse().unwrap(),
            admin: admin.parse().unwrap(),
            role: crate::config::Role::Active,
            weight: 1.0,
            sync: sync.map(|s| s.parse().unwrap()),
        }
    }

    /// The answer a fake resolver gives (`None`: the lookup fails).
    type Answer = Arc<Mutex<Option<Vec<IpAddr>>>>;

    /// A resolver whose answer the test sets, counting lookups.
    fn fake() -> (Lookup, Answer, Arc<Mutex<usize>>) {
        let answer = Arc::new(Mutex::new(None::<Vec<IpAddr>>));
        let lookups = Arc::new(Mutex::new(0));
        let (a, n) = (answer.clone(), lookups.clone());
        let lookup: Lookup = Arc::new(move |_host| {
            *n.lock() += 1;
            let got = a.lock().clone();
            Box::pin(async move { got.ok_or_else(|| std::io::ErrorKind::NotFound.into()) })
        });
        (lookup, answer, lookups)
    }

    fn ips(list: &[&str]) -> Option<Vec<IpAddr>> {
        Some(list.iter().map(|i| i.parse().unwrap()).collect())
    }

    #[test]
    fn literals_are_known_at_once_and_names_after_resolution() {
        let edges = [
            edge("127.0.0.1:1", "127.0.0.1:2", None),
            edge("localhost:3", "127.0.0.1:4", Some("localhost:5")),
        ];
        let a = Addresses::new(&edges);
        assert_eq!(a.get(0).proxy, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(a.get(0).sync, None);
        assert_eq!((a.get(1).proxy, a.get(1).sync), (None, None));
        assert_eq!(a.get(1).admin, Some("127.0.0.1:4".parse().unwrap()));

        // `localhost` comes from the hosts file: no DNS server is asked.
        a.resolve_at_start(&edges, Duration::from_secs(5));
        let local = a.get(1);
        assert!(local
            .proxy
            .is_some_and(|p| p.ip().is_loopback() && p.port() == 3));
        assert_eq!(
            local.sync.map(|s| (s.ip(), s.port())),
            local.proxy.map(|p| (p.ip(), 5))
        );
    }

    #[tokio::test]
    async fn a_name_is_followed_when_it_moves_and_kept_through_a_failed_lookup() {
        let named = edge(
            "edge-0.edges:80",
            "edge-0.edges:81",
            Some("edge-0.edges:82"),
        );
        let (lookup, answer, lookups) = fake();
        let a = Addresses::with_lookup(std::slice::from_ref(&named), lookup);
        let t = Duration::from_secs(1);
        *answer.lock() = ips(&["10.0.0.1"]);
        let first = a.refresh(0, &named, t).await;
        assert_eq!(first.proxy, Some("10.0.0.1:80".parse().unwrap()));
        assert_eq!(first.sync, Some("10.0.0.1:82".parse().unwrap()));
        // One lookup per host, not per port.
        assert_eq!(*lookups.lock(), 1);

        *answer.lock() = ips(&["10.0.0.2"]);
        let moved = a.refresh(0, &named, t).await;
        assert_eq!(moved.admin, Some("10.0.0.2:81".parse().unwrap()));
        assert_eq!(a.get(0), moved);

        // The resolver fails: the address in use stays, and the probes judge it.
        *answer.lock() = None;
        assert_eq!(a.refresh(0, &named, t).await, moved);
    }

    #[tokio::test]
    async fn of_several_addresses_the_one_in_use_is_kept_until_a_probe_fails_there() {
        let named = edge("edge-0.edges:80", "edge-0.edges:81", None);
        let (lookup, answer, _) = fake();
        let a = Addresses::with_lookup(std::slice::from_ref(&named), lookup);
        let t = Duration::from_secs(1);
        *answer.lock() = ips(&["::1", "127.0.0.1"]);
        let first = a.refresh(0, &named, t).await;
        assert_eq!(first.proxy, Some("127.0.0.1:80".parse().unwrap()));
        // The resolver shuffles its answer: nothing moves.
        *answer.lock() = ips(&["127.0.0.1", "::1"]);
        assert_eq!(a.refresh(0, &named, t).await, first);
        a.probe_failed(0, first);
        let next = a.refresh(0, &named, t).await;
        assert_eq!(next.proxy, Some("[::1]:80".parse().unwrap()));
        assert_eq!(next.admin, Some("[::1]:81".parse().unwrap()));
        assert_eq!(a.refresh(0, &named, t).await, next);
        // A probe of the old address that ran while the lookup moved on does not move it back.
        a.probe_failed(0, first);
        assert_eq!(a.refresh(0, &named, t).await, next);
        a.probe_failed(0, next);
        assert_eq!(a.refresh(0, &named, t).await, first);
    }

    #[test]
    fn a_lookup_cut_short_at_start_up_does_not_stop_later_ones() {
        let named = edge("edge-0.edges:80", "127.0.0.1:81", None);
        let slow = Arc::new(AtomicBool::new(true));
        let s = slow.clone();
        let lookup: Lookup = Arc::new(move |_| {
            let slow = s.load(Ordering::Relaxed);
            Box::pin(async move {
                if slow {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok(vec!["10.0.0.8".parse().unwrap()])
            })
        });
        let a = Addresses::with_lookup(std::slice::from_ref(&named), lookup);
        a.resolve_at_start(std::slice::from_ref(&named), Duration::from_millis(20));
        assert_eq!(a.get(0).proxy, None);
        slow.store(false, Ordering::Relaxed);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let now = rt.block_on(a.refresh(0, &named, Duration::from_secs(1)));
        assert_eq!(now.proxy, Some("10.0.0.8:80".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_slow_lookup_is_not_waited_for_nor_doubled_and_lands_when_it_answers() {
        let named = edge("edge-0.edges:80", "127.0.0.1:81", None);
        let lookups = Arc::new(Mutex::new(0));
        let n = lookups.clone();
        let lookup: Lookup = Arc::new(move |_| {
            *n.lock() += 1;
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(vec!["10.0.0.7".parse().unwrap()])
            })
        });
        let a = Addresses::with_lookup(std::slice::from_ref(&named), lookup);
        let t = Duration::from_millis(20);
        assert_eq!(a.refresh(0, &named, t).await.proxy, None);
        assert_eq!(a.refresh(0, &named, t).await.proxy, None);
        assert_eq!(*lookups.lock(), 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(a.get(0).proxy, Some("10.0.0.7:80".parse().unwrap()));
    }
}
