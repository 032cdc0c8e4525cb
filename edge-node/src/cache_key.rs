//! Query parameters left out of the cache key, per origin: tracking parameters
//! (`utm_source`, `fbclid`, …) make every shared link a new URL, and a site whose pages do not
//! depend on them would otherwise get a cache miss (and an origin fetch) per click.
//!
//! The origin still receives the request's whole query; only the key that the edges cache
//! under, and the broker routes by, leaves the named parameters out. Names match the raw
//! parameter name (before `=`, not percent-decoded, case-sensitive); a trailing `*` matches a
//! prefix (`utm_*`) and a lone `*` drops the whole query string. A parameter with a `;` in
//! it is kept unless the whole query is dropped: an origin that also splits on `;` would
//! read another parameter in it.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Most names one origin may list.
pub const MAX_NAMES: usize = 32;
/// Longest name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// The query parameters an origin leaves out of its cache keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct QueryFilter {
    names: Vec<String>,
}

impl TryFrom<Vec<String>> for QueryFilter {
    type Error = String;

    fn try_from(names: Vec<String>) -> Result<Self, String> {
        QueryFilter::parse(&names)
    }
}

impl From<QueryFilter> for Vec<String> {
    fn from(f: QueryFilter) -> Self {
        f.names
    }
}

impl QueryFilter {
    /// Check a list of names (see the module doc); the message says what is wrong.
    pub fn parse(names: &[String]) -> Result<Self, String> {
        if names.len() > MAX_NAMES {
            return Err(format!("at most {MAX_NAMES} names, got {}", names.len()));
        }
        for n in names {
            if n.is_empty() || n.len() > MAX_NAME_LEN {
                return Err(format!("{n:?} must be 1 to {MAX_NAME_LEN} bytes long"));
            }
            let body = n.strip_suffix('*').unwrap_or(n);
            if body.contains('*') {
                return Err(format!("{n:?}: '*' may only end a name"));
            }
            if !body
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"&=#?".contains(&b))
            {
                return Err(format!(
                    "{n:?} may hold only visible ASCII characters other than & = # ?"
                ));
            }
        }
        Ok(QueryFilter {
            names: names.to_vec(),
        })
    }

    /// Whether nothing is left out.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether `param` (one `&`-separated segment) is left out. A segment holding a `;` is
    /// kept unless the whole query is dropped: origins that also split on `;` (older Rack,
    /// Python and Go parsers) would read `utm_source=x;id=9` as `id=9`, and caching that
    /// page under the key without it would serve it for every `id`.
    fn drops(&self, param: &str) -> bool {
        let name = param.split('=').next().unwrap_or(param);
        let hides_another = param.contains(';');
        self.names.iter().any(|n| match n.strip_suffix('*') {
            Some("") => true,
            Some(prefix) => !hides_another && name.starts_with(prefix),
            None => !hides_another && name == n,
        })
    }

    /// `path_and_query` as the cache key spells it: the named parameters removed (the others
    /// keep their order), and the `?` too when none is left. Borrowed when nothing changes,
    /// so an origin without names costs nothing.
    pub fn apply<'a>(&self, path_and_query: &'a str) -> Cow<'a, str> {
        if self.names.is_empty() {
            return Cow::Borrowed(path_and_query);
        }
        let Some((path, query)) = path_and_query.split_once('?') else {
            return Cow::Borrowed(path_and_query);
        };
        let kept: Vec<&str> = query.split('&').filter(|p| !self.drops(p)).collect();
        if kept.len() == query.split('&').count() {
            return Cow::Borrowed(path_and_query);
        }
        if kept.is_empty() {
            return Cow::Borrowed(path);
        }
        Cow::Owned(format!("{path}?{}", kept.join("&")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(names: &[&str]) -> QueryFilter {
        QueryFilter::parse(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn drops_named_and_prefixed_parameters_only() {
        let f = filter(&["utm_*", "fbclid", "gclid"]);
        assert_eq!(f.apply("/a?utm_source=x&id=7&fbclid=abc"), "/a?id=7");
        assert_eq!(f.apply("/a?utm_source=x&fbclid"), "/a");
        assert_eq!(f.apply("/a?id=7&v=2"), "/a?id=7&v=2");
        assert!(matches!(f.apply("/a?id=7"), Cow::Borrowed(_)));
        assert_eq!(f.apply("/a"), "/a");
        assert_eq!(
            f.apply("/a?fbclidx=1&UTM_source=2"),
            "/a?fbclidx=1&UTM_source=2"
        );
        assert_eq!(filter(&["*"]).apply("/a?x=1&y=2"), "/a");
        assert_eq!(filter(&[]).apply("/a?utm_source=1"), "/a?utm_source=1");
        let once = f.apply("/p?utm_medium=m&q=1").into_owned();
        assert_eq!(f.apply(&once), once, "idempotent");
    }

    #[test]
    fn a_parameter_hidden_behind_a_semicolon_stays_in_the_key() {
        let f = filter(&["utm_*", "fbclid"]);
        for kept in [
            "/a?utm_source=x;id=9",
            "/a?utm_x;id=7",
            "/a?fbclid=1;callback=f",
        ] {
            assert_eq!(f.apply(kept), kept);
        }
        assert_eq!(f.apply("/a?utm_source=x&b=1;c=2"), "/a?b=1;c=2");
        assert_eq!(filter(&["*"]).apply("/a?utm_source=x;id=9"), "/a");
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        let parse = |n: &str| QueryFilter::parse(&[n.to_string()]);
        for bad in ["", "a=b", "a&b", "#", "a b", "u*x", "**", "é"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse("utm_*").is_ok() && parse("*").is_ok());
        let many: Vec<String> = (0..=MAX_NAMES).map(|i| format!("p{i}")).collect();
        assert!(QueryFilter::parse(&many).is_err());
        let json: QueryFilter = serde_json::from_str(r#"["utm_*"]"#).unwrap();
        assert_eq!(serde_json::to_string(&json).unwrap(), r#"["utm_*"]"#);
        assert!(serde_json::from_str::<QueryFilter>(r#"["a=b"]"#).is_err());
    }
}
