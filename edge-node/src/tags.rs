//! Cache tags (surrogate keys): names an origin gives its responses so that a provider can
//! purge every object carrying one, whatever its URL (all pages showing product 42, say).
//!
//! Tags come from the origin's `Surrogate-Key` (space-separated, as Fastly reads it) and
//! `Cache-Tag` (comma-separated, as Cloudflare reads it) headers; both are read, split on
//! either separator. They are matched without regard to ASCII case. The headers stay in the
//! stored copy (a tag purge reads them from it, and a peer edge filled from this one needs
//! them) and are removed from what clients receive.

use std::borrow::Cow;

use http::HeaderMap;

/// `Surrogate-Key`, one of the [`HEADERS`].
pub const SURROGATE_KEY: &str = "surrogate-key";
/// Response headers that carry tags.
pub const HEADERS: [&str; 2] = [SURROGATE_KEY, "cache-tag"];
/// Most tags one purge may name.
pub const MAX_PER_PURGE: usize = 64;
/// Longest tag accepted in a purge (a longer one in a response can never be purged).
pub const MAX_LEN: usize = 256;

/// Why a tag given to a purge is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// No tags given.
    #[error("give at least one tag")]
    None,
    /// More than [`MAX_PER_PURGE`].
    #[error("at most {MAX_PER_PURGE} tags per purge, got {0}")]
    TooMany(usize),
    /// Empty or longer than [`MAX_LEN`].
    #[error("tag {0:?} must be 1 to {MAX_LEN} bytes long")]
    Length(String),
    /// Holds a byte a tag header cannot carry as one tag.
    #[error("tag {0:?} may hold only visible ASCII characters other than ','")]
    Character(String),
}

/// A purge's tags, validated, lower-cased and without repeats (in the order first given).
pub fn check(tags: &[String]) -> Result<Vec<String>, TagError> {
    if tags.is_empty() {
        return Err(TagError::None);
    }
    if tags.len() > MAX_PER_PURGE {
        return Err(TagError::TooMany(tags.len()));
    }
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for t in tags {
        if t.is_empty() || t.len() > MAX_LEN {
            return Err(TagError::Length(t.clone()));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            return Err(TagError::Character(t.clone()));
        }
        let t = t.to_ascii_lowercase();
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// Whether any tag of a response with `headers` satisfies `hit`, which is given each tag
/// lower-cased. Cheap when the response has no tag headers (two map probes).
pub fn any(headers: &HeaderMap, mut hit: impl FnMut(&str) -> bool) -> bool {
    HEADERS.iter().any(|name| {
        headers.get_all(*name).iter().any(|value| {
            value
                .as_bytes()
                .split(|b| b.is_ascii_whitespace() || *b == b',')
                .filter(|t| !t.is_empty())
                .filter_map(|t| std::str::from_utf8(t).ok())
                .any(|t| {
                    let t = if t.bytes().any(|b| b.is_ascii_uppercase()) {
                        Cow::Owned(t.to_ascii_lowercase())
                    } else {
                        Cow::Borrowed(t)
                    };
                    hit(&t)
                })
        })
    })
}

/// Remove the tag headers from a response on its way to a client. Runs on every hit, so it
/// walks the few headers once and removes only when a tag header is there.
pub fn strip(resp: &mut pingora_http::ResponseHeader) {
    let tagged = resp.headers.keys().any(|k| HEADERS.contains(&k.as_str()));
    if tagged {
        for name in HEADERS {
            resp.remove_header(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags_of(pairs: &[(&'static str, &'static str)]) -> Vec<String> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        let mut seen = Vec::new();
        any(&h, |t| {
            seen.push(t.to_string());
            false
        });
        seen
    }

    #[test]
    fn reads_both_headers_and_separators() {
        assert_eq!(
            tags_of(&[
                ("surrogate-key", "  Product-42 cat:shoes\tHome "),
                ("cache-tag", "a,b , c"),
                ("cache-tag", "d"),
            ]),
            ["product-42", "cat:shoes", "home", "a", "b", "c", "d"]
        );
        assert!(tags_of(&[("content-type", "text/html")]).is_empty());
        let mut h = HeaderMap::new();
        h.insert("surrogate-key", "x y".parse().unwrap());
        assert!(any(&h, |t| t == "y"));
        assert!(!any(&h, |t| t == "z"));
    }

    #[test]
    fn purge_tags_are_checked_and_folded() {
        let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        assert_eq!(check(&s(&["A", "a", "b:1"])).unwrap(), ["a", "b:1"]);
        assert_eq!(check(&[]), Err(TagError::None));
        assert!(matches!(check(&s(&[""])), Err(TagError::Length(_))));
        assert!(matches!(
            check(&["x".repeat(MAX_LEN + 1)]),
            Err(TagError::Length(_))
        ));
        for bad in ["a b", "a,b", "é", "a\n"] {
            assert!(
                matches!(check(&s(&[bad])), Err(TagError::Character(_))),
                "{bad:?}"
            );
        }
        let many: Vec<String> = (0..=MAX_PER_PURGE).map(|i| i.to_string()).collect();
        assert_eq!(check(&many), Err(TagError::TooMany(MAX_PER_PURGE + 1)));
    }
}
