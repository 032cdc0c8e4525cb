//! Where an upstream response's header fields may go, which pingora-cache leaves to us:
//! - connection-specific fields stop at this edge (RFC 9110 §7.6.1, RFC 9111 §3.1);
//! - fields the origin kept out of the shared copy (`no-cache="…"`, `private="…"`), and a
//!   304's `Set-Cookie`, still reach the one client whose request brought them;
//! - a 304's fields update the stored copy (RFC 9111 §3.2, §4.3.4), where pingora merges
//!   only the validators and freshness fields.

use http::header::{self, HeaderName};
use http::{HeaderValue, StatusCode};
use pingora_cache::cache_control::CacheControl;
use pingora_http::ResponseHeader;

/// Fields that describe one connection, not the response: never forwarded or stored. The
/// framing fields (`Transfer-Encoding`, `Content-Length`) are pingora's to rewrite.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

/// A proxy's own challenge, for the client that chose that proxy (RFC 9110 §11.7).
const PROXY_AUTHENTICATION_INFO: HeaderName = HeaderName::from_static("proxy-authentication-info");

/// Remove the connection-specific fields of an upstream response: the fixed ones and those
/// its `Connection` lists. A protocol switch keeps them: pingora needs them to hand the
/// connection over.
pub fn strip_hop_by_hop(resp: &mut ResponseHeader) {
    if resp.status == StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    if resp.headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = resp
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| *n != header::CONTENT_LENGTH && *n != header::TRANSFER_ENCODING)
            .collect();
        for name in listed {
            resp.remove_header(&name);
        }
    }
    for name in &HOP_BY_HOP {
        resp.remove_header(name);
    }
    resp.remove_header(&PROXY_AUTHENTICATION_INFO);
}

/// Fields of `resp` that the stored copy leaves out but the client whose request fetched it
/// is owed: those its `Cache-Control` names under `no-cache` or `private` (a session cookie
/// named `no-cache="Set-Cookie"`), and a 304's `Set-Cookie` (one client's, never merged into
/// the shared copy). Empty, without allocating, for most responses.
pub fn withheld(resp: &ResponseHeader) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    let mut take = |name: &HeaderName| {
        if out.iter().any(|(n, _)| n == name) {
            return;
        }
        for v in resp.headers.get_all(name) {
            out.push((name.clone(), v.clone()));
        }
    };
    if resp.status == StatusCode::NOT_MODIFIED {
        take(&header::SET_COOKIE);
    }
    if let Some(cc) = CacheControl::from_resp_headers(resp) {
        let named = cc
            .private_field_names()
            .into_iter()
            .flatten()
            .chain(cc.no_cache_field_names().into_iter().flatten());
        for name in named.filter_map(|n| HeaderName::from_bytes(n).ok()) {
            take(&name);
        }
    }
    out
}

/// Give `resp` the fields in `withheld` it does not carry (it does when pingora passes the
/// upstream response on as it came, uncached).
pub fn restore(resp: &mut ResponseHeader, withheld: &[(HeaderName, HeaderValue)]) {
    let missing: Vec<&(HeaderName, HeaderValue)> = withheld
        .iter()
        .filter(|(n, _)| !resp.headers.contains_key(n))
        .collect();
    for (name, value) in missing {
        // Cannot fail: the name and value are already valid header parts.
        let _ = resp.append_header(name.clone(), value.clone());
    }
}

/// Whether a 304's field may replace the stored copy's. Left alone: the framing and coding of
/// the stored body (RFC 9111 §3.2: `Content-Length`; a 304 has no body to describe), `Vary`
/// (the variant was chosen by the stored one, as pingora does), `Age` (handled as the
/// response's age), a `Set-Cookie` (one client's, see [`withheld`]) and fields the edges
/// exchange among themselves.
fn updates_stored(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::CONTENT_LENGTH
            | header::TRANSFER_ENCODING
            | header::CONTENT_ENCODING
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::VARY
            | header::AGE
            | header::SET_COOKIE
    ) && !name.as_str().starts_with("x-shadowcdn-")
}

/// The stored header `stored` (as pingora merged it) updated with every field of the 304
/// `not_modified` that describes the representation: each field the 304 carries replaces the
/// stored field of that name. `None` when the 304 changes nothing pingora has not merged.
pub fn merge_not_modified(
    stored: &ResponseHeader,
    not_modified: &ResponseHeader,
) -> Option<ResponseHeader> {
    let names: Vec<&HeaderName> = not_modified
        .headers
        .keys()
        .filter(|n| updates_stored(n))
        .filter(|n| {
            let new = not_modified.headers.get_all(*n).iter();
            !new.eq(stored.headers.get_all(*n).iter())
        })
        .collect();
    if names.is_empty() {
        return None;
    }
    let mut merged = stored.clone();
    for name in names {
        merged.remove_header(name);
        for v in not_modified.headers.get_all(name) {
            // Cannot fail: the name and value are already valid header parts.
            let _ = merged.append_header(name.clone(), v.clone());
        }
    }
    Some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, fields: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (n, v) in fields {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    fn values(r: &ResponseHeader, name: &str) -> Vec<String> {
        r.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn connection_specific_fields_stop_here() {
        let mut r = resp(
            200,
            &[
                ("connection", "X-Secret, close"),
                ("x-secret", "hop"),
                ("keep-alive", "timeout=5"),
                ("proxy-authenticate", "Basic"),
                ("proxy-authentication-info", "x"),
                ("upgrade", "h2c"),
                ("content-length", "5"),
                ("x-kept", "1"),
            ],
        );
        strip_hop_by_hop(&mut r);
        let left: Vec<&str> = r.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["content-length", "x-kept"]);

        let mut framing = resp(
            200,
            &[("connection", "content-length"), ("content-length", "5")],
        );
        strip_hop_by_hop(&mut framing);
        assert_eq!(values(&framing, "content-length"), ["5"]);

        let mut switching = resp(101, &[("connection", "upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut switching);
        assert_eq!(values(&switching, "upgrade"), ["websocket"]);
    }

    #[test]
    fn fields_kept_from_the_shared_copy_are_owed_to_the_fetching_client() {
        let r = resp(
            200,
            &[
                (
                    "cache-control",
                    "max-age=60, no-cache=\"Set-Cookie\", private=\"X-User\"",
                ),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
                ("x-user", "u"),
            ],
        );
        let owed = withheld(&r);
        let names: Vec<&str> = owed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-user", "set-cookie", "set-cookie"]);

        let mut served = resp(200, &[("cache-control", "max-age=60"), ("x-user", "kept")]);
        restore(&mut served, &owed);
        assert_eq!(values(&served, "set-cookie"), ["a=1", "b=2"]);
        assert_eq!(
            values(&served, "x-user"),
            ["kept"],
            "present fields are not doubled"
        );

        assert!(withheld(&resp(
            200,
            &[("cache-control", "max-age=60"), ("set-cookie", "a=1")]
        ))
        .is_empty());
        let not_modified = withheld(&resp(304, &[("set-cookie", "s=1")]));
        assert_eq!(not_modified.len(), 1);
    }

    #[test]
    fn a_304_updates_the_fields_it_carries() {
        let stored = resp(
            200,
            &[
                ("content-length", "10"),
                ("content-type", "text/plain"),
                ("x-ver", "1"),
                ("link", "</a>"),
                ("link", "</b>"),
                ("etag", "\"e2\""),
            ],
        );
        let nm = resp(
            304,
            &[
                ("x-ver", "2"),
                ("link", "</c>"),
                ("content-length", "0"),
                ("age", "5"),
                ("set-cookie", "s=1"),
                ("etag", "\"e2\""),
            ],
        );
        let merged = merge_not_modified(&stored, &nm).unwrap();
        assert_eq!(values(&merged, "x-ver"), ["2"]);
        assert_eq!(values(&merged, "link"), ["</c>"]);
        assert_eq!(values(&merged, "content-length"), ["10"]);
        assert_eq!(values(&merged, "content-type"), ["text/plain"]);
        assert!(values(&merged, "age").is_empty());
        assert!(values(&merged, "set-cookie").is_empty());

        let same = resp(304, &[("etag", "\"e2\""), ("x-ver", "1")]);
        let stored = resp(200, &[("etag", "\"e2\""), ("x-ver", "1")]);
        assert!(merge_not_modified(&stored, &same).is_none());
    }
}
