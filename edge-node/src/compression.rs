//! On-the-fly compression of text responses for clients that accept it, as nginx's `gzip`
//! or a CDN's automatic compression does.
//!
//! The cache keeps what the origin sent; pingora's downstream compression module encodes
//! each response on its way out (gzip, brotli or zstd: the first of the client's
//! `Accept-Encoding` it knows), adds `Vary: Accept-Encoding` and weakens the ETag (weak
//! comparison still answers `If-None-Match` with 304, and that 304 carries the same `Vary`
//! and ETag as its 200 would). This module decides which responses
//! it may touch: only text-like types, never a range (its offsets are of the identity body),
//! never a response marked `no-transform` (RFC 9111 §5.2.2.6), never a copy handed to a peer
//! edge or a shadow fill (those are stored, not shown).

use std::time::Duration;

use http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG, RANGE, VARY,
};
use http::HeaderValue;
use pingora_core::modules::http::compression::ResponseCompression;
use pingora_core::protocols::http::compression::Algorithm;
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

/// Highest level accepted (the gzip scale; the same number is given to brotli and zstd).
pub const MAX_LEVEL: u32 = 9;

/// What compression does to one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Sent as stored, headers untouched: compression is off, or the copy goes to a peer edge
    /// or into this cache (a `Vary` added there would split the cache entry).
    AsStored,
    /// Not compressed for this client (no `Accept-Encoding`, one that refuses a coding with
    /// `q=0`, or a range), but a text response says `Vary: Accept-Encoding`, since another
    /// client would get it compressed.
    Identity,
    /// Compressed if the response allows it.
    Compress,
    /// A 304 standing for a text response: it carries the `Vary` the 200 would have, and
    /// the weak ETag when the 200 would have been compressed (RFC 9110 §15.4.5). pingora
    /// strips the type from the 304, so this is decided from the stored response first.
    NotModified {
        /// The 200 would have been compressed for this client.
        compressed: bool,
    },
}

impl Plan {
    /// The plan for a client's request, with compression on: compress when it accepts an
    /// encoding and asks for the whole body. pingora's encoder picks the first coding it knows
    /// and does not weigh quality values, so a client that refuses one (`gzip;q=0`) gets the
    /// body as stored rather than possibly the coding it refused.
    /// `accept_encoding` is the client's field as sent (the request's own may be normalized).
    pub fn for_request(accept_encoding: Option<&HeaderValue>, req: &RequestHeader) -> Plan {
        let accepts = accept_encoding.is_some_and(|v| !refuses_a_coding(v.as_bytes()));
        if accepts && !req.headers.contains_key(RANGE) {
            Plan::Compress
        } else {
            Plan::Identity
        }
    }
}

/// The plan for a 304 answering a client whose `Accept-Encoding` (as sent) was
/// `accept_encoding` in place of `stored` (the full response, before pingora turns it into the
/// 304): unchanged unless `stored` is text this edge compresses.
pub fn not_modified(
    plan: Plan,
    accept_encoding: Option<&HeaderValue>,
    stored: &ResponseHeader,
) -> Plan {
    if plan == Plan::AsStored || !Scan::of(stored).may_compress(stored) {
        return plan;
    }
    let compressed = plan == Plan::Compress
        && accept_encoding.is_some_and(|v| compressing_coding(v.as_bytes()).is_some())
        && encoder_takes(stored);
    Plan::NotModified { compressed }
}

/// The coding pingora's encoder would compress with for this `Accept-Encoding`, read as it
/// reads it: a structured-field list (one it cannot parse, `gzip;q=.5` say, counts as no
/// coding at all), of which it takes the first coding it knows; of those it compresses with
/// gzip, brotli and zstd only (the dictionary codings need a dictionary this edge never sets).
fn compressing_coding(value: &[u8]) -> Option<Algorithm> {
    let first = if value == b"gzip" {
        Some(Algorithm::Gzip)
    } else {
        sfv::Parser::parse_list(value).ok().and_then(|list| {
            list.iter().find_map(|entry| match entry {
                sfv::ListEntry::Item(i) => i
                    .bare_item
                    .as_token()
                    .map(Algorithm::from)
                    .filter(|a| *a != Algorithm::Other),
                _ => None,
            })
        })
    };
    first.filter(|a| matches!(a, Algorithm::Gzip | Algorithm::Brotli | Algorithm::Zstd))
}

/// Whether pingora's encoder takes `resp` at all, by its own rules besides ours: a body of
/// at least 20 bytes, a `Content-Type` (matched case-sensitively) in its list and without
/// "zip" in it. Where it declines, the 200 goes out with its strong ETag.
fn encoder_takes(resp: &ResponseHeader) -> bool {
    let short = resp
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n < 20);
    let Some(ct) = resp.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    !short
        && !ct.contains("zip")
        && [
            "text/",
            "application/",
            "font/",
            "image/x-icon",
            "image/svg+xml",
            "image/nd.microsoft.icon",
            "binary/octet-stream",
        ]
        .iter()
        .any(|p| ct.starts_with(p))
}

/// Whether an `Accept-Encoding` value gives some coding a quality of zero.
fn refuses_a_coding(value: &[u8]) -> bool {
    let Ok(value) = std::str::from_utf8(value) else {
        return true;
    };
    value
        .split(',')
        .any(|item| crate::accept_encoding::zero_weight(item.split(';').skip(1)))
}

/// Apply `plan` to a response about to be written (before the compression module sees it).
/// A text response says `Vary: Accept-Encoding` whether or not this one is compressed (a
/// HEAD or a 304 is not, but the GET it stands for may be).
///
/// A HEAD gets the header its GET would: the encoder sees no body to encode and leaves a HEAD's
/// header alone, so its coding, length and ETag are set here as the encoder sets a GET's (RFC
/// 9110 §9.3.2). `accept_encoding` is the client's as sent.
pub fn response_filter(
    plan: Plan,
    accept_encoding: Option<&HeaderValue>,
    session: &mut Session,
    resp: &mut ResponseHeader,
) -> pingora_error::Result<()> {
    if plan == Plan::AsStored || resp.status.is_informational() {
        return Ok(());
    }
    let scan = Scan::of(resp);
    if let Plan::NotModified { compressed } = plan {
        if compressed {
            weaken_etag(resp)?;
        }
        return vary_on_encoding(resp, &scan);
    }
    if resp.status == http::StatusCode::NOT_MODIFIED && !session.cache.enabled() {
        // The origin's own 304, to a conditional request that bypassed the cache: what its
        // 200 was is not known here, but a client that asked with the weak form of the
        // origin's strong tag holds the copy this edge compressed, which said `Vary` too
        // (RFC 9110 §15.4.5). Any other 304 goes out as the origin sent it.
        disable(session);
        if plan == Plan::Compress && holds_compressed_copy(session.req_header(), resp) {
            weaken_etag(resp)?;
            return vary_on_encoding(resp, &scan);
        }
        return Ok(());
    }
    if !scan.may_compress(resp) {
        disable(session);
        return Ok(());
    }
    if plan == Plan::Compress && session.req_header().method == http::Method::HEAD {
        head_as_compressed(accept_encoding, resp)?;
    }
    vary_on_encoding(resp, &scan)
}

/// Whether `req`'s `If-None-Match` names the weak form of `resp`'s strong ETag: the tag this
/// edge's encoder gave the compressed copy the client holds.
fn holds_compressed_copy(req: &RequestHeader, resp: &ResponseHeader) -> bool {
    let Some(tag) = resp.headers.get(ETAG).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    if !tag.starts_with('"') {
        return false;
    }
    let weak = format!("W/{tag}");
    req.headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(&weak))
}

/// Give a HEAD's header what the encoder gives its GET's, when it would compress the GET.
fn head_as_compressed(
    accept_encoding: Option<&HeaderValue>,
    resp: &mut ResponseHeader,
) -> pingora_error::Result<()> {
    let coding = accept_encoding.and_then(|v| compressing_coding(v.as_bytes()));
    let Some(coding) = coding.filter(|_| encoder_takes(resp)) else {
        return Ok(());
    };
    resp.insert_header(CONTENT_ENCODING, coding.as_str())?;
    resp.remove_header(&CONTENT_LENGTH);
    resp.remove_header(&ACCEPT_RANGES);
    weaken_etag(resp)
}

/// Add `Accept-Encoding` to the response's `Vary` unless `scan` found it there (or `*`).
fn vary_on_encoding(resp: &mut ResponseHeader, scan: &Scan) -> pingora_error::Result<()> {
    if !scan.varies_on_encoding {
        resp.append_header(VARY, ACCEPT_ENCODING_NAME.clone())?;
    }
    Ok(())
}

/// Make a strong ETag weak, as pingora's encoder does to the 200 it compresses.
fn weaken_etag(resp: &mut ResponseHeader) -> pingora_error::Result<()> {
    let Some(etag) = resp.headers.get(ETAG) else {
        return Ok(());
    };
    if etag.as_bytes().starts_with(b"\"") {
        let weak = [b"W/", etag.as_bytes()].concat();
        resp.insert_header(ETAG, weak)?;
    } else if !etag.as_bytes().starts_with(b"W/") {
        // Not a valid ETag: the encoder drops it.
        resp.remove_header(&ETAG);
    }
    Ok(())
}

/// `Vary`'s value for [`response_filter`].
static ACCEPT_ENCODING_NAME: HeaderValue = HeaderValue::from_static("Accept-Encoding");

/// What one pass over a response's headers says about compressing it (this runs on every
/// cache hit: one walk over a few headers instead of a hash lookup per header name).
#[derive(Debug, Default)]
struct Scan {
    encoded: bool,
    no_transform: bool,
    text: bool,
    varies_on_encoding: bool,
}

impl Scan {
    fn of(resp: &ResponseHeader) -> Scan {
        let mut scan = Scan::default();
        // Values are read only for the four names that matter (not a long CSP or cookie).
        for (name, value) in resp.headers.iter() {
            if name == CONTENT_ENCODING {
                scan.encoded = true;
            } else if name == CONTENT_TYPE {
                scan.text = value.to_str().is_ok_and(text_like);
            } else if name == CACHE_CONTROL {
                scan.no_transform |= value.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
                });
            } else if name == VARY {
                scan.varies_on_encoding |= value.to_str().is_ok_and(|v| {
                    v.split(',').any(|n| {
                        let n = n.trim();
                        n == "*" || n.eq_ignore_ascii_case("accept-encoding")
                    })
                });
            }
        }
        scan
    }

    /// A text-like type, not already encoded, not `no-transform`, and a full body (200 or an
    /// error page, never a 206).
    fn may_compress(&self, resp: &ResponseHeader) -> bool {
        self.text && !self.encoded && !self.no_transform && resp.status.as_u16() != 206
    }
}

/// Media types that compress well; everything else (images, video, archives, fonts already
/// in woff/woff2) is left alone.
fn text_like(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    let ends =
        |suffix: &str| sub.len() >= suffix.len() && is(&sub[sub.len() - suffix.len()..], suffix);
    if is(kind, "text") {
        // Streams: an encoder holds bytes back until its buffer fills.
        !is(sub, "event-stream")
    } else if is(kind, "application") {
        [
            "javascript",
            "x-javascript",
            "ecmascript",
            "json",
            "xml",
            "wasm",
        ]
        .iter()
        .any(|t| is(sub, t))
            || ends("+json")
            || ends("+xml")
    } else if is(kind, "image") {
        is(sub, "svg+xml") || is(sub, "x-icon")
    } else if is(kind, "font") {
        ["ttf", "otf", "collection"].iter().any(|t| is(sub, t))
    } else {
        false
    }
}

/// Turn compression off for this response (before its header is written).
pub fn disable(session: &mut Session) {
    if let Some(c) = session
        .downstream_modules_ctx
        .get_mut::<ResponseCompression>()
    {
        if c.is_header_phase() {
            c.adjust_level(0);
        }
    }
}

/// What compression did for a finished response: algorithm, bytes in and out, time spent.
pub fn outcome(session: &Session) -> Option<(&'static str, usize, usize, Duration)> {
    session
        .downstream_modules_ctx
        .get::<ResponseCompression>()
        .and_then(|c| c.get_info())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::ACCEPT_ENCODING;

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn text_like_types_only() {
        for ct in [
            "text/html; charset=utf-8",
            "TEXT/CSS",
            "application/javascript",
            "application/json",
            "application/ld+json",
            "application/rss+xml",
            "image/svg+xml",
        ] {
            assert!(text_like(ct), "{ct}");
        }
        for ct in [
            "image/png",
            "video/mp4",
            "application/zip",
            "application/octet-stream",
            "text/event-stream",
            "application/x-ndjson",
            "font/woff2",
            "nonsense",
            "",
        ] {
            assert!(!text_like(ct), "{ct}");
        }
    }

    fn response_may_compress(resp: &ResponseHeader) -> bool {
        Scan::of(resp).may_compress(resp)
    }

    #[test]
    fn ranges_encoded_bodies_and_no_transform_are_left_alone() {
        let html = ("content-type", "text/html");
        assert!(response_may_compress(&resp(200, &[html])));
        assert!(response_may_compress(&resp(404, &[html])));
        assert!(!response_may_compress(&resp(206, &[html])));
        assert!(!response_may_compress(&resp(
            200,
            &[html, ("content-encoding", "br")]
        )));
        assert!(!response_may_compress(&resp(
            200,
            &[html, ("cache-control", "public, No-Transform")]
        )));
        assert!(!response_may_compress(&resp(200, &[])));

        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        assert_eq!(
            Plan::for_request(req.headers.get(ACCEPT_ENCODING), &req),
            Plan::Identity
        );
        req.insert_header("accept-encoding", "gzip").unwrap();
        assert_eq!(
            Plan::for_request(req.headers.get(ACCEPT_ENCODING), &req),
            Plan::Compress
        );
        req.insert_header("range", "bytes=0-9").unwrap();
        assert_eq!(
            Plan::for_request(req.headers.get(ACCEPT_ENCODING), &req),
            Plan::Identity
        );
        for (ae, plan) in [
            ("gzip, deflate, br, zstd", Plan::Compress),
            ("br;q=1.0, gzip;q=0.8", Plan::Compress),
            ("gzip;q=0, br", Plan::Identity),
            ("br, gzip; Q=0.000", Plan::Identity),
            ("br, gzip;q=-1", Plan::Identity),
        ] {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            req.insert_header("accept-encoding", ae).unwrap();
            assert_eq!(
                Plan::for_request(req.headers.get(ACCEPT_ENCODING), &req),
                plan,
                "{ae}"
            );
        }
    }

    #[test]
    fn a_304_stands_for_the_200_it_replaces() {
        let html = resp(200, &[("content-type", "text/html"), ("etag", "\"v1\"")]);
        let png = resp(200, &[("content-type", "image/png")]);
        let tiny = resp(
            200,
            &[("content-type", "text/html"), ("content-length", "10")],
        );
        let shouting = resp(200, &[("content-type", "TEXT/HTML")]);
        let req = |ae: Option<&str>| {
            let mut r = RequestHeader::build("GET", b"/", None).unwrap();
            if let Some(ae) = ae {
                r.insert_header("accept-encoding", ae).unwrap();
            }
            r
        };
        for (plan, ae, stored, expected) in [
            (
                Plan::Compress,
                Some("gzip, br"),
                &html,
                Plan::NotModified { compressed: true },
            ),
            (
                Plan::Compress,
                Some("deflate, BR;q=0.5"),
                &html,
                Plan::NotModified { compressed: true },
            ),
            (
                Plan::Compress,
                Some("dcz, gzip"),
                &html,
                Plan::NotModified { compressed: false },
            ),
            (
                Plan::Compress,
                Some("deflate"),
                &html,
                Plan::NotModified { compressed: false },
            ),
            (
                Plan::Identity,
                None,
                &html,
                Plan::NotModified { compressed: false },
            ),
            // pingora's encoder leaves these uncompressed, so the 200 kept its strong ETag:
            // a coding list it cannot parse, a body under 20 bytes, a type it matches only
            // in lower case.
            (
                Plan::Compress,
                Some("gzip;q=.5"),
                &html,
                Plan::NotModified { compressed: false },
            ),
            (
                Plan::Compress,
                Some("gzip"),
                &tiny,
                Plan::NotModified { compressed: false },
            ),
            (
                Plan::Compress,
                Some("gzip"),
                &shouting,
                Plan::NotModified { compressed: false },
            ),
            (Plan::Compress, Some("gzip"), &png, Plan::Compress),
            (Plan::AsStored, Some("gzip"), &html, Plan::AsStored),
        ] {
            let req = req(ae);
            let ae = req.headers.get(ACCEPT_ENCODING);
            assert_eq!(not_modified(plan, ae, stored), expected, "{ae:?}");
        }
    }

    #[test]
    fn etags_are_weakened_as_the_encoder_does() {
        for (etag, expected) in [
            (Some("\"v1\""), Some("W/\"v1\"")),
            (Some("W/\"v1\""), Some("W/\"v1\"")),
            (Some("v1"), None),
            (None, None),
        ] {
            let mut r = resp(304, &[]);
            if let Some(e) = etag {
                r.insert_header("etag", e).unwrap();
            }
            weaken_etag(&mut r).unwrap();
            let got = r.headers.get(ETAG).map(|v| v.to_str().unwrap());
            assert_eq!(got, expected, "{etag:?}");
        }
    }

    #[test]
    fn a_vary_naming_accept_encoding_is_seen() {
        for (vary, seen) in [
            ("Origin", false),
            ("accept-encoding", true),
            ("*", true),
            ("Origin, Accept-Encoding", true),
        ] {
            let mut r = resp(200, &[("vary", vary), ("content-type", "text/html")]);
            assert_eq!(Scan::of(&r).varies_on_encoding, seen, "{vary}");
            for _ in 0..2 {
                let scan = Scan::of(&r);
                vary_on_encoding(&mut r, &scan).unwrap();
            }
            let all: Vec<&str> = r
                .headers
                .get_all(VARY)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            let expected = if seen {
                vec![vary]
            } else {
                vec![vary, "Accept-Encoding"]
            };
            assert_eq!(all, expected, "added once, the old value kept");
        }
    }
}
