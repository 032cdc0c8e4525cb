//! Where each edge is now: its configured addresses, with DNS names resolved.
//!
//! IP literals are used as they are. Names are resolved once at start and again before every
//! health probe, so an edge that comes back at a new address (a pod restarted elsewhere) is
//! followed within one probe interval. A name that does not resolve leaves that address
//! unknown: the probe fails, routing skips the edge and no peer fill is sent to it — an old
//! address may by then belong to something else. A name with several addresses (`localhost`
//! as `::1` and `127.0.0.1`) uses the first until a probe fails there, then the next.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

use crate::config::{EdgeAddr, EdgeEntry};

/// The current socket addresses of one edge; `None` where a name does not resolve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The HTTP listener clients' requests go to.
    pub proxy: Option<SocketAddr>,
    /// The admin API (health, purge, origin push).
    pub admin: Option<SocketAddr>,
    /// The QUIC listener (control, peer fills), when the edge has one.
    pub sync: Option<SocketAddr>,
}

/// The resolved addresses of every edge, by edge index.
#[derive(Debug)]
pub struct Addresses {
    now: Vec<RwLock<Resolved>>,
    /// Per edge, which of a name's addresses to use: advanced by every failed probe.
    choice: Vec<AtomicUsize>,
}

impl Addresses {
    /// IP literals filled in; names unknown until [`Self::resolve_blocking`] or
    /// [`Self::refresh`].
    pub fn new(edges: &[EdgeEntry]) -> Self {
        let literal = |e: &EdgeEntry| Resolved {
            proxy: e.addr.literal(),
            admin: e.admin.literal(),
            sync: e.sync.as_ref().and_then(EdgeAddr::literal),
        };
        Addresses {
            now: edges.iter().map(|e| RwLock::new(literal(e))).collect(),
            choice: edges.iter().map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Edge `edge`'s addresses now.
    pub fn get(&self, edge: usize) -> Resolved {
        *self.now[edge].read()
    }

    /// A probe of edge `edge` failed: where a name has several addresses, the next refresh
    /// tries the next one.
    pub fn probe_failed(&self, edge: usize) {
        self.choice[edge].fetch_add(1, Ordering::Relaxed);
    }

    /// Resolve every edge's names on the calling thread (start-up, before serving).
    pub fn resolve_blocking(&self, edges: &[EdgeEntry]) {
        use std::net::ToSocketAddrs;
        let lookup = |a: &EdgeAddr| {
            a.literal().or_else(|| {
                (a.host(), a.port())
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut it| it.next())
            })
        };
        for (i, e) in edges.iter().enumerate() {
            *self.now[i].write() = Resolved {
                proxy: lookup(&e.addr),
                admin: lookup(&e.admin),
                sync: e.sync.as_ref().and_then(lookup),
            };
        }
    }

    /// Resolve edge `edge`'s names again, each lookup bounded by `timeout`; returns the new
    /// addresses.
    pub async fn refresh(&self, edge: usize, entry: &EdgeEntry, timeout: Duration) -> Resolved {
        self.refresh_with(edge, entry, |host, port| async move {
            match tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port)))
                .await
            {
                Ok(found) => found.map(Iterator::collect),
                Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
            }
        })
        .await
    }

    async fn refresh_with<F, Fut>(&self, edge: usize, entry: &EdgeEntry, resolve: F) -> Resolved
    where
        F: Fn(String, u16) -> Fut,
        Fut: Future<Output = std::io::Result<Vec<SocketAddr>>>,
    {
        let choice = self.choice[edge].load(Ordering::Relaxed);
        let lookup = |a: &EdgeAddr| {
            let (literal, host, port) = (a.literal(), a.host().to_string(), a.port());
            let shown = a.to_string();
            let resolving = literal.is_none().then(|| resolve(host, port));
            async move {
                let Some(resolving) = resolving else {
                    return literal;
                };
                match resolving.await {
                    Ok(found) if found.is_empty() => None,
                    Ok(found) => Some(found[choice % found.len()]),
                    Err(e) => {
                        tracing::debug!(addr = %shown, error = %e, "edge name does not resolve");
                        None
                    }
                }
            }
        };
        let next = Resolved {
            proxy: lookup(&entry.addr).await,
            admin: lookup(&entry.admin).await,
            sync: match &entry.sync {
                Some(a) => lookup(a).await,
                None => None,
            },
        };
        let mut now = self.now[edge].write();
        if *now != next {
            tracing::info!(edge = %entry.id, from = ?*now, to = ?next, "edge addresses changed");
            *now = next;
        }
        next
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

    #[tokio::test]
    async fn literals_are_known_at_once_and_names_after_resolution() {
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
        a.resolve_blocking(&edges);
        let local = a.get(1);
        assert!(local
            .proxy
            .is_some_and(|p| p.ip().is_loopback() && p.port() == 3));
        assert!(local
            .sync
            .is_some_and(|p| p.ip().is_loopback() && p.port() == 5));
        assert_eq!(a.refresh(1, &edges[1], Duration::from_secs(5)).await, local);
    }

    #[tokio::test]
    async fn a_refresh_follows_a_moved_name_and_forgets_one_that_stopped_resolving() {
        let named = edge(
            "edge-0.edges:80",
            "edge-0.edges:81",
            Some("edge-0.edges:82"),
        );
        let a = Addresses::new(std::slice::from_ref(&named));
        let at = |ip: &'static str| {
            move |_: String, port: u16| async move {
                Ok(vec![SocketAddr::new(ip.parse().unwrap(), port)])
            }
        };
        let first = a.refresh_with(0, &named, at("10.0.0.1")).await;
        assert_eq!(first.sync, Some("10.0.0.1:82".parse().unwrap()));
        let moved = a.refresh_with(0, &named, at("10.0.0.2")).await;
        assert_eq!(moved.proxy, Some("10.0.0.2:80".parse().unwrap()));
        assert_eq!(a.get(0), moved);
        let gone = a
            .refresh_with(0, &named, |_, _| async {
                Err(std::io::ErrorKind::NotFound.into())
            })
            .await;
        assert_eq!(gone, Resolved::default());
        assert_eq!(a.get(0), Resolved::default());

        // Two addresses: the first until a probe fails there, then the other.
        let both = |_: String, port: u16| async move {
            Ok(["[::1]:0", "127.0.0.1:0"]
                .iter()
                .map(|a| SocketAddr::new(a.parse::<SocketAddr>().unwrap().ip(), port))
                .collect())
        };
        let first = a.refresh_with(0, &named, both).await;
        assert_eq!(first.proxy, Some("[::1]:80".parse().unwrap()));
        assert_eq!(a.refresh_with(0, &named, both).await, first);
        a.probe_failed(0);
        let next = a.refresh_with(0, &named, both).await;
        assert_eq!(next.proxy, Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(next.admin, Some("127.0.0.1:81".parse().unwrap()));
    }
}
