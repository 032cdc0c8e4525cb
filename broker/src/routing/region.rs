//! Client region resolution: a trusted header, else the most specific CIDR, else a default.

use std::net::IpAddr;

use ipnet::IpNet;

use super::Fleet;
use crate::config::ClientRegion;

/// Resolves a request to a region index.
#[derive(Debug)]
pub struct RegionResolver {
    header: Option<String>,
    /// Peers whose `X-Forwarded-For` is believed.
    trusted_proxies: Vec<IpNet>,
    /// Most specific (longest prefix) first.
    cidrs: Vec<(IpNet, usize)>,
    default: usize,
}

impl RegionResolver {
    /// Build from configuration; region names were validated with the config.
    pub fn new(cfg: &ClientRegion, fleet: &Fleet) -> Self {
        let mut cidrs: Vec<(IpNet, usize)> = cfg
            .cidrs
            .iter()
            .filter_map(|c| fleet.region_index(&c.region).map(|r| (c.cidr, r)))
            .collect();
        cidrs.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        RegionResolver {
            header: cfg.trust_header.then(|| cfg.header.to_ascii_lowercase()),
            trusted_proxies: cfg.trusted_proxies.clone(),
            cidrs,
            default: cfg
                .default
                .as_deref()
                .and_then(|d| fleet.region_index(d))
                .unwrap_or(0),
        }
    }

    /// The header to read on a request from `peer`, if trusted: with trusted proxies
    /// configured, only on requests that come from one of them.
    pub fn header_name(&self, peer: Option<IpAddr>) -> Option<&str> {
        let from_proxy = || {
            self.trusted_proxies.is_empty()
                || peer.is_some_and(|p| {
                    let p = p.to_canonical();
                    self.trusted_proxies.iter().any(|n| n.contains(&p))
                })
        };
        self.header.as_deref().filter(|_| from_proxy())
    }

    /// Whether `peer` is one of the configured trusted proxies (none configured: no peer is),
    /// whose forwarding headers (`X-Forwarded-For`, `X-Forwarded-Proto`) are believed.
    pub fn is_trusted_proxy(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|p| {
            let p = p.to_canonical();
            self.trusted_proxies.iter().any(|n| n.contains(&p))
        })
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy; then the
    /// nearest address of its `X-Forwarded-For` chain (`lines`, right to left) outside the
    /// trusted ranges, the leftmost if all are inside, or the last trusted hop before an entry
    /// that is no address.
    pub fn client_addr<'a>(
        &self,
        peer: Option<IpAddr>,
        lines: impl DoubleEndedIterator<Item = &'a str>,
    ) -> Option<IpAddr> {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|n| n.contains(ip));
        let mut hop = peer?.to_canonical();
        if !trusted(&hop) {
            return Some(hop);
        }
        for line in lines.rev() {
            for entry in line.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
                // An entry may carry a port (`ip:port`, `[v6]:port`), or brackets alone
                // (`[v6]`), as some balancers write.
                let bare = entry
                    .strip_prefix('[')
                    .and_then(|e| e.strip_suffix(']'))
                    .unwrap_or(entry);
                let parsed = bare
                    .parse::<IpAddr>()
                    .or_else(|_| entry.parse::<std::net::SocketAddr>().map(|a| a.ip()));
                let Ok(ip) = parsed else {
                    return Some(hop);
                };
                hop = ip.to_canonical();
                if !trusted(&hop) {
                    return Some(hop);
                }
            }
        }
        Some(hop)
    }

    /// Region of a request with this header value and client address.
    pub fn resolve(&self, fleet: &Fleet, header: Option<&str>, ip: Option<IpAddr>) -> usize {
        if let Some(r) = header.and_then(|h| fleet.region_index(h.trim())) {
            return r;
        }
        // A dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`.
        if let Some(ip) = ip.map(|ip| ip.to_canonical()) {
            if let Some((_, r)) = self.cidrs.iter().find(|(n, _)| n.contains(&ip)) {
                return *r;
            }
        }
        self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{tests::SAMPLE, BrokerConfig};

    #[test]
    fn the_client_behind_a_trusted_proxy_is_the_nearest_untrusted_hop() {
        let cfg = BrokerConfig::from_toml(SAMPLE).unwrap();
        let fleet = Fleet::new(&cfg);
        let mut region = cfg.client_region.clone();
        region.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        let r = RegionResolver::new(&region, &fleet);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let lb = ip("10.0.0.7");
        // Not from a trusted proxy: the header is the client's own claim.
        assert_eq!(
            r.client_addr(ip("192.0.2.1"), ["203.0.113.5"].into_iter()),
            ip("192.0.2.1")
        );
        // From the load balancer: the nearest hop it did not add itself.
        assert_eq!(
            r.client_addr(lb, ["6.6.6.6, 203.0.113.5", "10.1.2.3"].into_iter()),
            ip("203.0.113.5"),
            "a forged entry to the left is not believed"
        );
        assert_eq!(r.client_addr(lb, ["10.1.2.3"].into_iter()), ip("10.1.2.3"));
        assert_eq!(r.client_addr(lb, std::iter::empty()), lb);
        assert_eq!(
            r.client_addr(lb, ["junk, 10.1.2.3"].into_iter()),
            ip("10.1.2.3")
        );
        assert_eq!(
            r.client_addr(ip("::ffff:10.0.0.7"), ["::ffff:198.51.100.2"].into_iter()),
            ip("198.51.100.2")
        );
        assert_eq!(
            r.client_addr(lb, ["203.0.113.5:4711, [2001:db8::9]:443"].into_iter()),
            ip("2001:db8::9")
        );
        assert_eq!(
            r.client_addr(lb, ["[2001:db8::7]"].into_iter()),
            ip("2001:db8::7")
        );
        assert_eq!(r.client_addr(None, ["203.0.113.5"].into_iter()), None);
    }

    #[test]
    fn the_region_header_is_believed_only_from_a_trusted_proxy_once_there_are_some() {
        let cfg = BrokerConfig::from_toml(SAMPLE).unwrap();
        let fleet = Fleet::new(&cfg);
        let mut region = cfg.client_region.clone();
        region.trust_header = true;
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let open = RegionResolver::new(&region, &fleet);
        assert!(
            open.header_name(ip("192.0.2.1")).is_some(),
            "no proxies listed"
        );
        region.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        let behind = RegionResolver::new(&region, &fleet);
        assert!(behind.header_name(ip("10.0.0.7")).is_some());
        assert!(behind.header_name(ip("::ffff:10.0.0.7")).is_some());
        assert!(
            behind.header_name(ip("192.0.2.1")).is_none(),
            "past the balancer"
        );
        assert!(behind.header_name(None).is_none());
        region.trust_header = false;
        let off = RegionResolver::new(&region, &fleet);
        assert!(off.header_name(ip("10.0.0.7")).is_none());
        // Forwarding headers are believed from listed proxies only, never by default.
        assert!(off.is_trusted_proxy(ip("::ffff:10.0.0.7")));
        assert!(!off.is_trusted_proxy(ip("192.0.2.1")));
        assert!(!open.is_trusted_proxy(ip("192.0.2.1")), "none listed");
    }

    #[test]
    fn header_then_cidr_then_default() {
        let cfg = BrokerConfig::from_toml(SAMPLE).unwrap();
        let fleet = Fleet::new(&cfg);
        let r = RegionResolver::new(&cfg.client_region, &fleet);
        assert_eq!(r.resolve(&fleet, Some("us"), None), 1);
        assert_eq!(
            r.resolve(&fleet, Some("mars"), Some("10.1.2.3".parse().unwrap())),
            1
        );
        assert_eq!(
            r.resolve(&fleet, None, Some("192.168.1.1".parse().unwrap())),
            0
        );
        assert_eq!(r.resolve(&fleet, None, None), 0);
    }
}
