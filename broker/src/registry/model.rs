//! What providers register, and the rules a registration must satisfy.
//!
//! Request types deny unknown fields and are validated before anything is written, so a bad
//! request changes nothing.

use edge_node::cache_key::QueryFilter;
use edge_node::origin::is_private_ip;
use serde::{Deserialize, Serialize};

/// A content provider (tenant).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Provider {
    /// Stable id (`p-…`).
    pub id: String,
    /// Display name.
    pub name: String,
}

/// A host a provider serves, and where its origin is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Origin {
    /// Host name clients use (lower-case).
    pub host: String,
    /// `http(s)://host[:port]` of the origin.
    pub upstream: String,
    /// Owning provider.
    pub provider: String,
    /// Whether edges send the site's Host to the origin instead of the upstream's name.
    #[serde(default)]
    pub forward_host: bool,
    /// Whether edges drop `Set-Cookie` from the origin's responses, so responses that set
    /// cookies are cached (without them) instead of never.
    #[serde(default)]
    pub strip_set_cookie: bool,
    /// Query parameters left out of the cache key (see [`edge_node::cache_key`]).
    #[serde(default)]
    pub cache_key_ignore_query: QueryFilter,
    /// When this provider registered the host (ms since the Unix epoch; kept through updates).
    /// Edges treat what they cached for the host before then as a previous owner's and never
    /// serve it. 0 for hosts registered before the field existed.
    #[serde(default)]
    pub registered_at_ms: u64,
}

/// How a resource's path matches request paths.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PathMatch {
    /// The path exactly.
    #[default]
    Exact,
    /// Every path starting with it.
    Prefix,
}

/// Where and how much a resource may be shadowed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShadowPolicy {
    /// Most shadow copies across all edges.
    #[serde(default = "default_copies")]
    pub max_copies: u32,
    /// Regions allowed to hold shadows; empty means all.
    #[serde(default)]
    pub allowed_regions: Vec<String>,
}

impl Default for ShadowPolicy {
    fn default() -> Self {
        ShadowPolicy {
            max_copies: default_copies(),
            allowed_regions: Vec::new(),
        }
    }
}

fn default_copies() -> u32 {
    2
}

/// A registered resource (path or prefix under a host).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resource {
    /// Stable id (`r-…`).
    pub id: String,
    /// Owning provider.
    pub provider: String,
    /// Host (must be one of the provider's origins).
    pub host: String,
    /// Path or prefix, starting with `/`.
    pub path: String,
    /// Exact path or prefix.
    pub r#match: PathMatch,
    /// 0 (lowest) to 10.
    pub priority: u8,
    /// How long a shadow copy lives.
    pub shadow_ttl_secs: u64,
    /// Placement limits.
    pub policy: ShadowPolicy,
}

/// Body of `POST /v1/providers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProvider {
    /// Display name.
    pub name: String,
}

/// Body of `PUT /v1/origins/{host}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginBody {
    /// `http(s)://host[:port]`.
    pub upstream: String,
    /// Send the site's Host to the origin (default: the upstream's own name).
    #[serde(default)]
    pub forward_host: bool,
    /// Drop `Set-Cookie` from the origin's responses (default false).
    #[serde(default)]
    pub strip_set_cookie: bool,
    /// Query parameters left out of the cache key (default none).
    #[serde(default)]
    pub cache_key_ignore_query: Vec<String>,
}

/// How edges treat an origin, beside where it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginOptions {
    /// [`Origin::forward_host`].
    pub forward_host: bool,
    /// [`Origin::strip_set_cookie`].
    pub strip_set_cookie: bool,
    /// [`Origin::cache_key_ignore_query`].
    pub cache_key_ignore_query: QueryFilter,
}

/// Body of `POST /v1/resources` and `PUT /v1/resources/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceBody {
    /// Host.
    pub host: String,
    /// Path or prefix.
    pub path: String,
    /// Exact or prefix (default exact).
    #[serde(default)]
    pub r#match: PathMatch,
    /// 0–10 (default 5).
    #[serde(default = "default_priority")]
    pub priority: i64,
    /// Shadow TTL in seconds (default 3600).
    #[serde(default = "default_ttl")]
    pub shadow_ttl_secs: i64,
    /// Placement limits.
    #[serde(default)]
    pub policy: ShadowPolicy,
}

fn default_priority() -> i64 {
    5
}
/// Shadow TTL when neither the provider nor the operator chose one: the forecast horizon
/// (one hour), so a shadow placed for demand predicted within the hour lives that hour.
pub const DEFAULT_SHADOW_TTL_SECS: u64 = 3600;

fn default_ttl() -> i64 {
    DEFAULT_SHADOW_TTL_SECS as i64
}

/// Body of `POST /v1/purge`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeBody {
    /// Host.
    pub host: String,
    /// Exact path (with query) to purge.
    #[serde(default)]
    pub path: Option<String>,
    /// Prefix to purge.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Cache tags: every object of the host whose response carried one of them
    /// (`Surrogate-Key` / `Cache-Tag`).
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

/// A validation failure naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        field,
        message: message.into(),
    }
}

/// Validate and normalize a host name.
pub fn check_host(host: &str) -> Result<String, Invalid> {
    let h = host.trim().to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !ok {
        return Err(invalid(
            "host",
            format!("{host:?} is not a valid host name"),
        ));
    }
    // A last label in digits, or hexadecimal after `0x`, makes the name an IPv4 address in
    // one of the forms resolvers accept (`203.0.113.7`, `2130706433`, `127.0.0.0x1`): a
    // provider claiming one would capture every request that reaches the broker by that
    // address (no top-level domain starts with a digit).
    let numeric = |l: &str| {
        l.bytes().all(|b| b.is_ascii_digit())
            || l.strip_prefix("0x")
                .is_some_and(|x| x.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    if h.rsplit('.').next().is_some_and(numeric) {
        return Err(invalid(
            "host",
            format!("{host:?} is an IP address; register the site's name"),
        ));
    }
    Ok(h)
}

/// Top-level names that are never a public site's: special-use (RFC 6761, 6762, 7686, 8375,
/// 9476, ICANN's `.internal`) or withheld from delegation and common on intranets (`home`,
/// `corp`, `lan`, `localdomain`). Such a host resolves only inside some private network or
/// nowhere.
const LOCAL_TLDS: [&str; 13] = [
    "localhost",
    "local",
    "internal",
    "test",
    "invalid",
    "example",
    "arpa",
    "onion",
    "alt",
    "home",
    "corp",
    "lan",
    "localdomain",
];

/// The rule for a host (already through [`check_host`]) a provider registers as its site:
/// unless the operator allows local names (a local or private cluster), it must be a public
/// DNS name, with a dot and outside the special-use domains. Otherwise a tenant could claim
/// `localhost` or a single-label intranet name, and capture the requests that reach the broker
/// under it (a load balancer's probes, an internal client resolving a short name).
pub fn check_public_host(host: &str, allow_local: bool) -> Result<(), Invalid> {
    let tld = host.rsplit('.').next().unwrap_or("");
    if !allow_local && (!host.contains('.') || LOCAL_TLDS.contains(&tld)) {
        return Err(invalid(
            "host",
            format!(
                "{host:?} is a local or reserved name; register the site's public name \
                 (admin.allow_local_hosts permits local names)"
            ),
        ));
    }
    Ok(())
}

/// Whether an upstream host names this machine or a private network: edges fetch from it on
/// every miss, so a provider could otherwise reach the operator's internal services through
/// them (the broker's own admin API, a cloud metadata endpoint). Host names are not resolved
/// here: the edges judge what they resolve to when the origins are pushed (and get
/// `allow_private_upstreams` with them), the broker's origin fallback when it connects; IP
/// literals and `localhost` are judged.
fn is_private_host(host: &str) -> bool {
    let host = host.trim_matches(|c| c == '[' || c == ']');
    let lower = host.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return true;
    }
    if let Ok(ip) = host.parse::<std::net::Ipv6Addr>() {
        return is_private_ip(ip.into());
    }
    // A name whose last label is numeric is an address, possibly in a form the resolver
    // (inet_aton) accepts but `Ipv4Addr` does not: `127.1`, `2130706433`, `0x7f000001`,
    // `0177.0.0.1`. No top-level domain is numeric, so such a host is an address: a plain
    // dotted quad is judged, any other form refused.
    let last = lower.rsplit('.').next().unwrap_or(&lower);
    let numeric =
        !last.is_empty() && (last.bytes().all(|b| b.is_ascii_digit()) || last.starts_with("0x"));
    if !numeric {
        return false;
    }
    let leading_zero = host.split('.').any(|o| o.len() > 1 && o.starts_with('0'));
    match host.parse::<std::net::Ipv4Addr>() {
        Ok(ip) if !leading_zero => is_private_ip(ip.into()),
        _ => true,
    }
}

/// Validate an upstream URL: absolute http(s), a host, no path, query or credentials, and —
/// unless `allow_private` — not a loopback or private address.
pub fn check_upstream(upstream: &str, allow_private: bool) -> Result<String, Invalid> {
    let uri: http::Uri = upstream
        .parse()
        .map_err(|_| invalid("upstream", format!("{upstream:?} is not a URL")))?;
    if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
        return Err(invalid("upstream", "scheme must be http or https"));
    }
    let auth = uri
        .authority()
        .ok_or_else(|| invalid("upstream", "missing host"))?;
    if auth.as_str().contains('@') {
        return Err(invalid(
            "upstream",
            "credentials are not allowed in the URL",
        ));
    }
    if !(uri.path().is_empty() || uri.path() == "/") || uri.query().is_some() {
        return Err(invalid("upstream", "must not have a path or query"));
    }
    // `http::Uri` keeps any port text; an unparsable one would silently mean 80/443.
    let port = auth.as_str()[auth.host().len()..].strip_prefix(':');
    if port.is_some_and(|p| !matches!(p.parse::<u16>(), Ok(1..))) {
        return Err(invalid("upstream", "port must be a number from 1 to 65535"));
    }
    if !allow_private && is_private_host(auth.host()) {
        return Err(invalid(
            "upstream",
            "points at a loopback or private address (the operator can allow that with [admin] allow_private_upstreams)",
        ));
    }
    Ok(format!("{}://{}", uri.scheme_str().unwrap_or("http"), auth))
}

/// Validate a path or prefix.
pub fn check_path(field: &'static str, path: &str) -> Result<(), Invalid> {
    if !path.starts_with('/') {
        return Err(invalid(field, "must start with '/'"));
    }
    if path.len() > 2048 || path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(invalid(
            field,
            "too long or contains spaces/control characters",
        ));
    }
    // A purge reaches an edge's admin API as a URL; URL parsers resolve `.`/`..` segments
    // (also `%2e`-encoded, and `\` as `/`) and drop a `#` fragment, so such a path could name
    // another host's objects.
    if path.contains(['#', '\\']) {
        return Err(invalid(field, "must not contain '#' or '\\'"));
    }
    // URL parsers percent-encode these on the way to an edge's admin API, which would then
    // purge a different key; clients' requests carry them percent-encoded too.
    if !path.is_ascii() || path.contains(['"', '\'', '<', '>', '`', '{', '}']) {
        return Err(invalid(
            field,
            "must be ASCII without \" ' < > ` { } (write them percent-encoded, as clients send them)",
        ));
    }
    let route = path.split('?').next().unwrap_or(path);
    let dot_segment = |seg: &str| {
        let seg = seg.to_ascii_lowercase().replace("%2e", ".");
        seg == "." || seg == ".."
    };
    if route.split('/').any(dot_segment) {
        return Err(invalid(field, "must not contain '.' or '..' segments"));
    }
    Ok(())
}

impl ResourceBody {
    /// Validate into a resource owned by `provider` with id `id`.
    pub fn into_resource(
        self,
        id: String,
        provider: &str,
        regions: &[String],
    ) -> Result<Resource, Invalid> {
        let host = check_host(&self.host)?;
        check_path("path", &self.path)?;
        // Resources select requests by path: a query here would never match one, and the
        // resource's policy would silently not apply.
        if self.path.contains('?') {
            return Err(invalid(
                "path",
                "must not hold a query: a resource selects requests by path, whatever their query",
            ));
        }
        if !(0..=10).contains(&self.priority) {
            return Err(invalid(
                "priority",
                format!("{} is outside 0..=10", self.priority),
            ));
        }
        if !(1..=30 * 24 * 3600).contains(&self.shadow_ttl_secs) {
            return Err(invalid("shadow_ttl_secs", "must be between 1 and 2592000"));
        }
        if self.policy.max_copies == 0 || self.policy.max_copies > 64 {
            return Err(invalid("policy.max_copies", "must be between 1 and 64"));
        }
        for (i, r) in self.policy.allowed_regions.iter().enumerate() {
            if !regions.iter().any(|x| x == r) {
                return Err(invalid(
                    "policy.allowed_regions",
                    format!("unknown region {r:?}"),
                ));
            }
            // A region named twice says nothing more, and a list of thousands would be held
            // (and cloned by the planner) for every resource.
            if self.policy.allowed_regions[..i].contains(r) {
                return Err(invalid(
                    "policy.allowed_regions",
                    format!("region {r:?} named twice"),
                ));
            }
        }
        Ok(Resource {
            id,
            provider: provider.to_string(),
            host,
            path: self.path,
            r#match: self.r#match,
            priority: self.priority as u8,
            shadow_ttl_secs: self.shadow_ttl_secs as u64,
            policy: self.policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(priority: i64) -> ResourceBody {
        ResourceBody {
            host: "Example.com".into(),
            path: "/a".into(),
            r#match: PathMatch::Prefix,
            priority,
            shadow_ttl_secs: 60,
            policy: ShadowPolicy::default(),
        }
    }

    #[test]
    fn paths_that_a_url_parser_would_rewrite_are_refused() {
        for ok in [
            "/",
            "/a/b.css",
            "/a/..b",
            "/a/.well-known/x",
            "/q?x=../y",
            "/v1.2/",
            "/x%7B1%7D?q=%27a%27|b^c",
        ] {
            assert!(check_path("path", ok).is_ok(), "{ok}");
        }
        for bad in [
            "/../other.com/",
            "/a/..",
            "/a/./b",
            "/%2e%2E/other.com/",
            "/.%2e/x",
            "/a#frag",
            "/a\\..\\b",
            "/x{1}",
            "/q?name='a'",
            "/q?\"a\"",
            "/a<b>",
            "/a`b",
            "/café",
        ] {
            let e = check_path("prefix", bad).unwrap_err();
            assert_eq!(e.field, "prefix", "{bad}");
        }
    }

    #[test]
    fn validates_fields() {
        let regions = vec!["eu".to_string()];
        let r = body(3)
            .into_resource("r-1".into(), "p-1", &regions)
            .unwrap();
        assert_eq!(r.host, "example.com");
        assert_eq!(
            body(11)
                .into_resource("r".into(), "p", &regions)
                .unwrap_err()
                .field,
            "priority"
        );
        assert_eq!(
            body(-1)
                .into_resource("r".into(), "p", &regions)
                .unwrap_err()
                .field,
            "priority"
        );
        let mut b = body(1);
        b.policy.allowed_regions = vec!["mars".into()];
        assert_eq!(
            b.into_resource("r".into(), "p", &regions)
                .unwrap_err()
                .field,
            "policy.allowed_regions"
        );
        let mut b = body(1);
        let known = regions[0].clone();
        b.policy.allowed_regions = vec![known.clone(), known];
        let err = b.into_resource("r".into(), "p", &regions).unwrap_err();
        assert_eq!(err.field, "policy.allowed_regions");
        assert!(err.to_string().contains("twice"), "{err}");
        let mut b = body(1);
        b.path = "/api/config?v=2".into();
        let err = b.into_resource("r".into(), "p", &regions).unwrap_err();
        assert_eq!(err.field, "path");
        assert!(err.to_string().contains("query"), "{err}");
    }

    #[test]
    fn hosts_and_upstreams() {
        assert!(check_host("a-b.example.com").is_ok());
        assert!(check_host("bad host").is_err());
        assert!(check_host("-x.com").is_err());
        for address in [
            "203.0.113.7",
            "2130706433",
            "0x7f.1",
            "127.1",
            "127.0.0.0x1",
            "10.0xA",
        ] {
            let e = check_host(address).unwrap_err();
            assert!(e.message.contains("IP address"), "{address}: {}", e.message);
        }
        assert!(check_host("localhost").is_ok(), "the local cluster's host");
        for local in [
            "localhost",
            "intranet",
            "app.localhost",
            "printer.local",
            "x.internal",
            "site.test",
        ] {
            let e = check_public_host(local, false).unwrap_err();
            assert!(
                e.message.contains("allow_local_hosts"),
                "{local}: {}",
                e.message
            );
            assert!(check_public_host(local, true).is_ok());
        }
        assert!(check_public_host("www.example.com", false).is_ok());
        assert!(check_host("1.example.com").is_ok());
        assert_eq!(
            check_upstream("http://127.0.0.1:9000", true).unwrap(),
            "http://127.0.0.1:9000"
        );
        assert!(check_upstream("ftp://x", true).is_err());
        assert!(check_upstream("http://u:p@x", true).is_err());
        assert!(check_upstream("http://x/path", true).is_err());
        assert!(check_upstream("not a url", true).is_err());
        for port in ["99999", "8o80", "0"] {
            let e = check_upstream(&format!("http://o.example.com:{port}"), true).unwrap_err();
            assert!(
                e.message.contains("port") || e.message.contains("not a URL"),
                "{port}: {}",
                e.message
            );
        }
        assert!(check_upstream("http://o.example.com:65535", true).is_ok());
        for private in [
            "http://127.0.0.1:9000",
            "http://localhost",
            "http://10.1.2.3",
            "http://169.254.169.254",
            "http://100.64.0.1",
            "http://[::1]:8080",
            "http://[fd00::1]",
            "http://[::ffff:192.168.0.1]",
            "http://127.1",
            "http://2130706433:7081",
            "http://0x7f000001",
            "http://0177.0.0.1",
            "http://8.8.8.010",
        ] {
            let e = check_upstream(private, false).unwrap_err();
            assert!(e.message.contains("allow_private_upstreams"), "{private}");
        }
        for public in [
            "https://origin.example.com",
            "http://93.184.215.14:8080",
            "http://[2001:db8::1]",
        ] {
            assert!(check_upstream(public, false).is_ok(), "{public}");
        }
    }
}

/// Kind of an origin change event.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// New content: shadowed at once where the policy allows, if high priority.
    Created,
    /// Changed content: every copy is invalidated and live shadows are refilled.
    Updated,
    /// Removed content: every copy is removed.
    Deleted,
}

/// Body of `POST /v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBody {
    /// What happened.
    pub kind: EventKind,
    /// Host.
    pub host: String,
    /// Exact path (with query), or…
    #[serde(default)]
    pub path: Option<String>,
    /// …a prefix (not with `created`).
    #[serde(default)]
    pub prefix: Option<String>,
}

/// Priority from which a `created` event shadows immediately.
pub const IMMEDIATE_SHADOW_PRIORITY: u8 = 8;
