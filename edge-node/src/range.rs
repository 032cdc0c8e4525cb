//! Which bytes of a cached answer a `Range` request gets: pingora-cache's range filter, given
//! the request as RFC 9110 says to read it where pingora reads it otherwise.

use http::header;
use pingora_http::{RequestHeader, ResponseHeader};

/// Most ranges one request may ask for (pingora's default); past it the whole object is sent.
pub const MAX_RANGES: Option<usize> = Some(200);

/// The request pingora's range filter should judge instead of `req`, when that differs:
/// - `If-Range` is compared strongly (RFC 9110 §13.1.5): a weak entity tag on either side
///   never matches, so the whole object is sent.
/// - A suffix range of length zero (`-0`) is unsatisfiable (RFC 9110 §14.1.1) and left out;
///   pingora would answer it with an empty 206 whose `Content-Range` ends before it starts.
///   When no range is left the answer is a 416.
/// - Of an empty object, a suffix range of non-zero length is the only satisfiable form, and
///   selects the whole (empty) object: the `Range` is dropped and the object sent (pingora's
///   arithmetic underflows there).
///
/// Only a `Range` pingora itself would parse is rewritten (one it does not parse is ignored:
/// the whole object is sent). `None`, without allocating, for requests without such parts
/// (nearly all).
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
    if !unit.eq_ignore_ascii_case("bytes") || !specs.split(',').all(well_formed) {
        return None;
    }
    // Of a `-N` spec: whether N is zero.
    let suffix_zero = |spec: &str| {
        spec.trim()
            .strip_prefix('-')
            .filter(|n| !n.is_empty())
            .map(|n| n.bytes().all(|b| b == b'0'))
    };
    if length == 0 && specs.split(',').any(|s| suffix_zero(s) == Some(false)) {
        let mut whole = req.clone();
        whole.remove_header(&header::RANGE);
        return Some(whole);
    }
    let empty = |spec: &str| suffix_zero(spec) == Some(true);
    if !specs.split(',').any(empty) {
        return None;
    }
    let kept: Vec<&str> = specs.split(',').filter(|s| !empty(s)).collect();
    let mut narrowed = req.clone();
    narrowed
        .insert_header(header::RANGE, format!("bytes={}", kept.join(",")))
        .ok()?;
    Some(narrowed)
}

/// Whether `spec` is a range spec as pingora parses it: optional digits, a dash, optional
/// digits, with spaces only around them.
fn well_formed(spec: &str) -> bool {
    spec.trim().split_once('-').is_some_and(|(first, last)| {
        first.bytes().all(|b| b.is_ascii_digit()) && last.bytes().all(|b| b.is_ascii_digit())
    })
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
        assert_eq!(answer(&[("range", "bytes=-5")], 0, e), (200, None));
        assert_eq!(
            answer(&[("range", "bytes=-0")], 0, e),
            (416, Some("bytes */0".into()))
        );
        // Not pingora's syntax: ignored, as pingora ignores it.
        for odd in ["bytes =-0", "bytes=- 0", "bytes=-0x"] {
            assert!(
                adjusted(&req(&[("range", odd)]), &resp(100, e)).is_none(),
                "{odd}"
            );
        }
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
