//! A response's freshness lifetime given more than once. RFC 9111 §4.2.1: when a lifetime
//! field has more than one value (two `Expires` lines, `max-age` twice) a cache uses the first
//! or treats the response as stale. pingora-cache does neither: its `Cache-Control` parser
//! keeps the last `max-age` / `s-maxage`, so `max-age=0, max-age=86400` is fresh for a day,
//! and it reads two `Expires` lines as no `Expires` at all, which leaves the edge's heuristic
//! lifetime in charge of a response the origin dated.
//!
//! Repeats with the same value say nothing new (a proxy that added the field again): they
//! read as one. Repeats that differ make the response stale from the start (revalidated before
//! every use), the reading that cannot serve longer than the origin meant; a stale window
//! (`stale-while-revalidate`, `stale-if-error`) given twice differently grants none.

use http::header;
use pingora_http::ResponseHeader;

/// How the field that sets a response's lifetime is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Once, or not at all: pingora-cache reads it right.
    Single,
    /// More than one `Expires` line, all with the same value: read as one.
    RepeatedExpires,
    /// More than once with different values: stale from the start.
    Conflicting,
}

/// How `resp` gives its lifetime, judged on the field a shared cache reads: `s-maxage` if
/// present, else `max-age`, else `Expires` (RFC 9111 §4.2.1).
pub fn of(resp: &ResponseHeader) -> Lifetime {
    for name in ["s-maxage", "max-age"] {
        let values = directive_values(resp, name);
        // Given only bare (no value), pingora reads it as absent and goes on to the next.
        if values.iter().any(|v| !v.is_empty()) {
            return if same(&values) {
                Lifetime::Single
            } else {
                Lifetime::Conflicting
            };
        }
    }
    let expires: Vec<&[u8]> = resp
        .headers
        .get_all(header::EXPIRES)
        .iter()
        .map(|v| v.as_bytes().trim_ascii())
        .collect();
    match expires.len() {
        0 | 1 => Lifetime::Single,
        _ if same(&expires) => Lifetime::RepeatedExpires,
        _ => Lifetime::Conflicting,
    }
}

/// Whether `Cache-Control` directive `name` appears in `resp` with different values (a stale
/// window given twice: RFC 9111 §4.2.1 reads such a response as stale, which grants none).
pub fn conflicts(resp: &ResponseHeader, name: &str) -> bool {
    !same(&directive_values(resp, name))
}

/// `resp` with one line of its repeated `Expires` (see [`Lifetime::RepeatedExpires`]).
pub fn with_one_expires(resp: &ResponseHeader) -> ResponseHeader {
    let mut one = resp.clone();
    if let Some(first) = resp.headers.get(header::EXPIRES).cloned() {
        one.remove_header(&header::EXPIRES);
        // Re-inserting a field this header just held cannot fail.
        let _ = one.insert_header(header::EXPIRES, first);
    }
    one
}

/// The values of `Cache-Control` directive `name` across all of the field's lines, unquoted,
/// in order. Split as pingora-cache splits (at `,` and `;`), so that both read the same
/// directives; a directive without a value counts as the empty value.
fn directive_values<'a>(resp: &'a ResponseHeader, name: &str) -> Vec<&'a [u8]> {
    resp.headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .flat_map(|line| line.as_bytes().split(|b| *b == b',' || *b == b';'))
        .filter_map(|d| {
            let d = d.trim_ascii();
            let (key, value) = match d.iter().position(|b| *b == b'=') {
                Some(i) => (d[..i].trim_ascii(), d[i + 1..].trim_ascii()),
                None => (d, &[][..]),
            };
            key.eq_ignore_ascii_case(name.as_bytes())
                .then(|| unquoted(value))
        })
        .collect()
}

fn unquoted(v: &[u8]) -> &[u8] {
    match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    }
}

fn same(values: &[&[u8]]) -> bool {
    values.windows(2).all(|w| w[0] == w[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(fields: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).unwrap();
        for (n, v) in fields {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn a_lifetime_given_once_or_repeated_alike_is_single() {
        assert_eq!(of(&resp(&[])), Lifetime::Single);
        assert_eq!(
            of(&resp(&[("cache-control", "max-age=60")])),
            Lifetime::Single
        );
        let alike = [
            ("cache-control", "max-age=60, public"),
            ("cache-control", "MAX-AGE=\"60\""),
        ];
        assert_eq!(of(&resp(&alike)), Lifetime::Single);
        // Another directive repeated (a field list) is not the lifetime.
        let lists = [("cache-control", "no-cache=\"a, b\", max-age=5, no-cache")];
        assert_eq!(of(&resp(&lists)), Lifetime::Single);
    }

    #[test]
    fn different_values_of_the_field_a_shared_cache_reads_conflict() {
        let twice = [("cache-control", "max-age=0, max-age=86400")];
        assert_eq!(of(&resp(&twice)), Lifetime::Conflicting);
        let lines = [
            ("cache-control", "s-maxage=10"),
            ("cache-control", "s-maxage=3600"),
        ];
        assert_eq!(of(&resp(&lines)), Lifetime::Conflicting);
        // pingora reads `;` as a separator too.
        let semi = [("cache-control", "max-age=1; max-age=2")];
        assert_eq!(of(&resp(&semi)), Lifetime::Conflicting);
        // `s-maxage` given once decides; `max-age` is not read by a shared cache.
        let shared = [("cache-control", "s-maxage=60, max-age=0, max-age=9")];
        assert_eq!(of(&resp(&shared)), Lifetime::Single);
        // A directive without a value beside one with a value differs from it.
        let bare = [("cache-control", "max-age, max-age=60")];
        assert_eq!(of(&resp(&bare)), Lifetime::Conflicting);
        let windows = resp(&[
            ("cache-control", "max-age=1, stale-if-error=60"),
            (
                "cache-control",
                "stale-if-error=86400, stale-while-revalidate=5",
            ),
        ]);
        assert!(conflicts(&windows, "stale-if-error"));
        assert!(!conflicts(&windows, "stale-while-revalidate"));
        assert_eq!(of(&windows), Lifetime::Single);
    }

    #[test]
    fn expires_counts_only_without_a_max_age() {
        let a = "Thu, 01 Dec 2033 16:00:00 GMT";
        let b = "Fri, 02 Dec 2033 16:00:00 GMT";
        let same = [("expires", a), ("expires", a)];
        assert_eq!(of(&resp(&same)), Lifetime::RepeatedExpires);
        let different = [("expires", a), ("expires", b)];
        assert_eq!(of(&resp(&different)), Lifetime::Conflicting);
        let with_max_age = [
            ("expires", a),
            ("expires", b),
            ("cache-control", "max-age=5"),
        ];
        assert_eq!(of(&resp(&with_max_age)), Lifetime::Single);
        // A bare `max-age` sets no lifetime: the `Expires` lines still decide.
        let bare = [("expires", a), ("expires", b), ("cache-control", "max-age")];
        assert_eq!(of(&resp(&bare)), Lifetime::Conflicting);
        let one = with_one_expires(&resp(&same));
        let lines: Vec<_> = one.headers.get_all(header::EXPIRES).iter().collect();
        assert_eq!(lines, [a]);
    }
}
