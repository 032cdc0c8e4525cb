//! Client region resolution: a trusted header, else the most specific CIDR, else a default.

use std::net::IpAddr;

use ipnet::IpNet;

use super::Fleet;
use crate::config::ClientRegion;

/// Resolves a request to a region index.
#[derive(Debug)]
pub struct RegionResolver {
    header: Option<String>,
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
            cidrs,
            default: cfg
                .default
                .as_deref()
                .and_then(|d| fleet.region_index(d))
                .unwrap_or(0),
        }
    }

    /// The header to read, if trusted.
    pub fn header_name(&self) -> Option<&str> {
        self.header.as_deref()
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
