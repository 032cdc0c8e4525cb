//! Which bytes of a cached answer a `Range` request gets: pingora-cache's range filter, given
//! the request as RFC 9110 says to read it where pingora reads it otherwise.

use http::header;
use pingora_http::{RequestHeader, ResponseHeader};

/// Most ranges one request may ask for (pingora's default); past it the whole object is sent.
pub const MAX_RANGES: Option<usize> = Some(200);

/// The request pingora's range filter should judge instead of `req`, when that differs:
/// - `If-Range` is compared strongly (RFC 9110 §13.1.5): a weak entity tag on either side
///   never matches, so the whole object is sent.
/// - A suffix range that selects no byte (`-0`, or any suffix of an empty object) is
///   unsatisfiable (RFC 9110 §14.1.1) and left out. Pingora would answer it with an empty
///   206 whose `Content-Range` ends before it starts; when no range is left the answer is a 416.
///
/// `None`, without allocating, for requests without such parts (nearly all).
pub fn adjusted(req: &RequestHeader, resp: &ResponseHeader) -> Option<RequestHeader> {
    let range = req.headers.get(header::RANGE)?;
    if let Some(if_range) = req.headers.get(header::IF_RANGE) {
        let given = if_range.as_bytes();
        let tag = given.last() == Some(&b'"');
        let stored_weak = resp
            .headers
            .get(header::ETAG)
            .is_some_and(|e| e.as_bytes().starts_with(b"W/"));
        if tag && (given.starts_with(b"W/") || stored_weak) {
            let mut whole = req.clone();
            whole.remove_header(&header::RANGE);
            return Some(whole);
        }
    }
    let length: usize = resp
        .headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let (unit, specs) = range.to_str().ok()?.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let selects_nothing = |spec: &str| {
        spec.trim().strip_prefix('-').is_some_and(|n| {
            let n = n.trim();
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && (length == 0 || n.bytes().all(|b| b == b'0'))
        })
    };
    if !specs.split(',').any(selects_nothing) {
        return None;
    }
    let kept: Vec<&str> = specs.split(',').filter(|s| !selects_nothing(s)).collect();
    let mut narrowed = req.clone();
    narrowed
        .insert_header(header::RANGE, format!("bytes={}", kept.join(",")))
        .ok()?;
    Some(narrowed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_proxy::{range_header_filter, RangeType};

    fn req(fields: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for (n, v) in fields {
            r.insert_header(n.to_string(), *v).unwrap();
        }
        r
    }

    fn resp(length: usize, etag: &str) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.insert_header("content-length", length).unwrap();
        r.insert_header("etag", etag).unwrap();
        r
    }

    /// What the edge answers: the status and `Content-Range`.
    fn answer(fields: &[(&str, &str)], length: usize, etag: &str) -> (u16, Option<String>) {
        let req = req(fields);
        let mut resp = resp(length, etag);
        let judged = adjusted(&req, &resp);
        range_header_filter(judged.as_ref().unwrap_or(&req), &mut resp, MAX_RANGES);
        let range = resp
            .headers
            .get("content-range")
            .map(|v| v.to_str().unwrap().to_string());
        (resp.status.as_u16(), range)
    }

    #[test]
    fn suffixes_that_select_nothing_are_unsatisfiable() {
        let e = "\"e\"";
        assert_eq!(
            answer(&[("range", "bytes=-0")], 100, e),
            (416, Some("bytes */100".into()))
        );
        assert_eq!(
            answer(&[("range", "bytes=-5")], 0, e),
            (416, Some("bytes */0".into()))
        );
        assert_eq!(
            answer(&[("range", "bytes=0-")], 0, e),
            (416, Some("bytes */0".into()))
        );
        assert_eq!(
            answer(&[("range", "bytes=0-9, -0")], 100, e),
            (206, Some("bytes 0-9/100".into()))
        );
        assert_eq!(
            answer(&[("range", "bytes=-5")], 100, e),
            (206, Some("bytes 95-99/100".into()))
        );
        assert!(adjusted(&req(&[("range", "bytes=-5")]), &resp(100, e)).is_none());
        assert!(adjusted(&req(&[]), &resp(100, e)).is_none());
    }

    #[test]
    fn if_range_matches_only_strong_tags() {
        let strong = [("range", "bytes=0-9"), ("if-range", "\"e\"")];
        assert_eq!(
            answer(&strong, 100, "\"e\""),
            (206, Some("bytes 0-9/100".into()))
        );
        let weak = [("range", "bytes=0-9"), ("if-range", "W/\"e\"")];
        assert_eq!(answer(&weak, 100, "W/\"e\""), (200, None));
        assert_eq!(answer(&strong, 100, "W/\"e\""), (200, None));
        let judged = adjusted(&req(&weak), &resp(100, "W/\"e\"")).unwrap();
        let mut r = resp(100, "W/\"e\"");
        assert_eq!(
            range_header_filter(&judged, &mut r, MAX_RANGES),
            RangeType::None
        );
    }
}
