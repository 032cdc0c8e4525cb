//! The value stored in foyer: an HTTP response's cache metadata and its whole body.
//!
//! The encoding is versioned so that a disk tier written by an older edge is either read
//! correctly or rejected as a miss, never misread.

use std::io::{Read, Write};
use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use bytes::Bytes;
use foyer::{Code, Error as FoyerError};
use pingora_cache::CacheMeta;
use pingora_http::ResponseHeader;

/// Format version written in front of every object.
const VERSION: u8 = 1;
/// Refuse to decode metadata blobs larger than this (a corrupt length must not allocate GiBs).
const MAX_META: u32 = 1024 * 1024;

/// One cached response.
#[derive(Debug, Clone)]
pub struct StoredObject {
    /// Its cache metadata, serialized and decoded.
    pub meta: ObjectMeta,
    /// The complete response body.
    pub body: Bytes,
    /// When the disk holds this object under older headers (refreshes written to memory
    /// only), the end of that copy's stale-if-error window; `None` when the disk copy, if
    /// any, has these headers. Never written to disk.
    pub disk_stale_until: Option<SystemTime>,
}

/// A response's cache metadata: pingora's serialized form, which the disk tier stores, and
/// the same decoded once. Hits rebuild their `CacheMeta` from the decoded header (pingora
/// stores headers zstd-compressed, and decompressing them on each hit was a measurable share
/// of the hit path, see bench/RESULTS.md), and the memory tier weighs what an entry really
/// holds, decoded header included.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    internal: Bytes,
    header: Bytes,
    decoded: Arc<Decoded>,
}

/// What a hit needs to rebuild its `CacheMeta` without decoding the stored bytes again.
#[derive(Debug)]
struct Decoded {
    header: ResponseHeader,
    /// The internal meta, when `CacheMeta::new` rebuilds it exactly: an object never
    /// revalidated (`updated == created`) without an epoch override. Revalidated objects
    /// take the slower path, which keeps their `updated` time.
    fresh: Option<Fresh>,
    /// Heap bytes `header` holds (estimated, see [`header_heap_bytes`]).
    heap: usize,
}

#[derive(Debug, Clone, Copy)]
struct Fresh {
    fresh_until: SystemTime,
    created: SystemTime,
    stale_while_revalidate_sec: u32,
    stale_if_error_sec: u32,
    variance: Option<[u8; 16]>,
}

impl Fresh {
    fn of(meta: &CacheMeta) -> Option<Fresh> {
        let exact = meta.updated() == meta.created()
            && meta.provenance() == meta.created()
            && meta.epoch_override().is_none();
        exact.then(|| Fresh {
            fresh_until: meta.fresh_until(),
            created: meta.created(),
            stale_while_revalidate_sec: meta.stale_while_revalidate_sec(),
            stale_if_error_sec: meta.stale_if_error_sec(),
            variance: meta.variance(),
        })
    }

    fn meta(self, header: ResponseHeader) -> CacheMeta {
        let mut meta = CacheMeta::new(
            self.fresh_until,
            self.created,
            self.stale_while_revalidate_sec,
            self.stale_if_error_sec,
            header,
        );
        if let Some(v) = self.variance {
            meta.set_variance(v);
        }
        meta
    }
}

/// The serialized form of an empty header: decoding it costs next to nothing, and the real
/// header is put in place afterwards.
static EMPTY_HEADER: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let header = ResponseHeader::build(200, Some(0)).expect("static status code is valid");
    let now = SystemTime::now();
    CacheMeta::new(now, now, 0, 0, header)
        .serialize()
        .map(|(_, h)| h)
        .unwrap_or_default()
});

impl ObjectMeta {
    /// Metadata from pingora's serialized form; fails if it does not decode.
    pub fn decode(internal: Bytes, header: Bytes) -> pingora_error::Result<Self> {
        let meta = CacheMeta::deserialize(&internal, &header)?;
        let compact = compact(meta.response_header());
        let decoded = Decoded {
            heap: header_heap_bytes(&compact),
            fresh: Fresh::of(&meta),
            header: compact,
        };
        Ok(ObjectMeta {
            internal,
            header,
            decoded: Arc::new(decoded),
        })
    }

    /// `meta` as it will be stored. It goes through the serialized form, so that what a hit
    /// sees from memory is exactly what it would see read back from disk.
    pub fn of(meta: &CacheMeta) -> pingora_error::Result<Self> {
        let (internal, header) = meta.serialize()?;
        Self::decode(internal.into(), header.into())
    }

    /// The `CacheMeta` it describes, without decompressing the header.
    pub fn meta(&self) -> pingora_error::Result<CacheMeta> {
        let d = &self.decoded;
        if let Some(fresh) = d.fresh {
            return Ok(fresh.meta(d.header.clone()));
        }
        let mut meta = CacheMeta::deserialize(&self.internal, &EMPTY_HEADER)?;
        *meta.response_header_mut() = d.header.clone();
        Ok(meta)
    }

    /// The same metadata stating a body of `length` bytes, when the origin sent the body
    /// chunked: pingora cuts ranges only out of objects whose header states their length, and
    /// a stored object's length is known (a chunked body cut short never completes its fill).
    /// `None` otherwise: the length is stated already, the status carries no representation
    /// to cut, or the body was delimited by the connection's close, which cannot tell a whole
    /// body from a cut one.
    pub fn with_length(&self, length: usize) -> pingora_error::Result<Option<Self>> {
        let header = &self.decoded.header;
        let chunked = header
            .headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("chunked"))
            });
        if !chunked
            || header.headers.contains_key(http::header::CONTENT_LENGTH)
            || !matches!(header.status.as_u16(), 200 | 203)
        {
            return Ok(None);
        }
        let mut meta = self.meta()?;
        let header = meta.response_header_mut();
        header.remove_header(&http::header::TRANSFER_ENCODING);
        header.insert_header(http::header::CONTENT_LENGTH, length)?;
        Self::of(&meta).map(Some)
    }

    /// Bytes it holds: both serialized parts and the decoded header.
    fn weight(&self) -> usize {
        self.internal.len() + self.header.len() + self.decoded.heap
    }
}

/// The header hits serve, held without pingora's second map of each name's original case
/// (`From<Parts>` builds none), in a map copied at its length: the case map doubled what an
/// entry holds and what each hit copies. Field names are case-insensitive (RFC 9110 §5.1); on
/// HTTP/1 pingora writes common names in their usual case and the others in lower case, as
/// Envoy does by default (HTTP/2 lower-cases all of them).
fn compact(header: &ResponseHeader) -> ResponseHeader {
    let mut out = ResponseHeader::from(header.as_owned_parts());
    // Cannot fail: the phrase was valid in the header it came from.
    let _ = out.set_reason_phrase(header.get_reason_phrase());
    out
}

/// Heap bytes the decoded metadata holds, an upper estimate checked against a counting
/// allocator in `edge-node/tests/memory_weight.rs` (measured there: 368 B for an empty header,
/// 1.6 KB for a typical one of 8 fields, at most ~170 B per field beside the names' and values'
/// bytes). Most of it is per field: http's `HeaderMap` keeps a bucket of about 100 B and a few
/// index slots for each, and each value's shared buffer has a small header of its own.
fn header_heap_bytes(header: &ResponseHeader) -> usize {
    const BASE: usize = 512;
    const PER_FIELD: usize = 192;
    let map = &header.headers;
    let bytes: usize = map
        .iter()
        .map(|(n, v)| 2 * n.as_str().len() + v.len())
        .sum();
    BASE + PER_FIELD * map.len() + bytes
}

impl StoredObject {
    /// An object from its metadata and body.
    pub fn new(meta: ObjectMeta, body: Bytes) -> Self {
        StoredObject {
            meta,
            body,
            disk_stale_until: None,
        }
    }

    /// The object's `CacheMeta`.
    pub fn meta(&self) -> pingora_error::Result<CacheMeta> {
        self.meta.meta()
    }

    /// Bytes this object occupies, used as its weight in the memory tier.
    pub fn weight(&self) -> usize {
        size_of::<Self>() + self.meta.weight() + self.body.len()
    }
}

fn write_blob(w: &mut impl Write, b: &[u8]) -> Result<(), FoyerError> {
    w.write_all(&(b.len() as u64).to_le_bytes())
        .and_then(|_| w.write_all(b))
        .map_err(FoyerError::io_error)
}

fn read_blob(r: &mut impl Read, limit: u64) -> Result<Bytes, FoyerError> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(FoyerError::io_error)?;
    let len = u64::from_le_bytes(len);
    if len > limit {
        return Err(FoyerError::io_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("stored blob of {len} bytes exceeds limit {limit}"),
        )));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).map_err(FoyerError::io_error)?;
    Ok(Bytes::from(buf))
}

impl Code for StoredObject {
    fn encode(&self, w: &mut impl Write) -> Result<(), FoyerError> {
        w.write_all(&[VERSION]).map_err(FoyerError::io_error)?;
        write_blob(w, &self.meta.internal)?;
        write_blob(w, &self.meta.header)?;
        write_blob(w, &self.body)
    }

    fn decode(r: &mut impl Read) -> Result<Self, FoyerError> {
        let mut v = [0u8; 1];
        r.read_exact(&mut v).map_err(FoyerError::io_error)?;
        if v[0] != VERSION {
            return Err(FoyerError::io_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown stored object version {}", v[0]),
            )));
        }
        let meta_internal = read_blob(r, MAX_META as u64)?;
        let meta_header = read_blob(r, MAX_META as u64)?;
        let body = read_blob(r, u32::MAX as u64)?;
        // Decoded here, where a block that does not decode is an unreadable entry (a miss),
        // and so that the memory tier weighs the header it will hold.
        let meta = ObjectMeta::decode(meta_internal, meta_header).map_err(|e| {
            FoyerError::io_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stored metadata does not decode: {e}"),
            ))
        })?;
        Ok(StoredObject::new(meta, body))
    }

    fn estimated_size(&self) -> usize {
        1 + 24 + self.meta.internal.len() + self.meta.header.len() + self.body.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn meta_with(header: ResponseHeader) -> CacheMeta {
        let created = SystemTime::now() - Duration::from_secs(30);
        CacheMeta::new(created + Duration::from_secs(60), created, 5, 7, header)
    }

    fn object(body: &[u8]) -> StoredObject {
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.insert_header("etag", "\"v1\"").unwrap();
        let meta = ObjectMeta::of(&meta_with(header)).unwrap();
        StoredObject::new(meta, Bytes::copy_from_slice(body))
    }

    #[test]
    fn roundtrip() {
        let o = object(&[7u8; 10_000]);
        let mut buf = Vec::new();
        o.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), o.estimated_size());
        let d = StoredObject::decode(&mut buf.as_slice()).unwrap();
        assert_eq!(d.meta.internal, o.meta.internal);
        assert_eq!(d.meta.header, o.meta.header);
        assert_eq!(d.body, o.body);
        assert_eq!(d.meta().unwrap().headers()["etag"], "\"v1\"");
        assert_eq!(d.weight(), o.weight());
    }

    #[test]
    fn a_hit_serves_every_field_in_order_without_the_case_map() {
        let mut header = ResponseHeader::build(203, None).unwrap();
        for (n, v) in [
            ("Link", "</a>"),
            ("X-Thing", "1"),
            ("link", "</b>"),
            ("ETag", "\"e\""),
        ] {
            header.append_header(n.to_string(), v).unwrap();
        }
        let meta = ObjectMeta::of(&meta_with(header)).unwrap().meta().unwrap();
        let served = meta.response_header();
        assert!(!served.has_case());
        assert_eq!(served.status.as_u16(), 203);
        let fields: Vec<(&str, &[u8])> = served
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            fields,
            [
                ("link", &b"</a>"[..]),
                ("link", b"</b>"),
                ("x-thing", b"1"),
                ("etag", b"\"e\""),
            ]
        );
    }

    #[test]
    fn rejects_unknown_version_truncation_and_undecodable_meta() {
        assert!(StoredObject::decode(&mut [9u8, 0, 0].as_slice()).is_err());
        let o = object(b"body");
        let mut buf = Vec::new();
        o.encode(&mut buf).unwrap();
        buf.truncate(buf.len() - 2);
        assert!(StoredObject::decode(&mut buf.as_slice()).is_err());

        let mut buf = vec![VERSION];
        for blob in [&b"internal"[..], b"header", b"body"] {
            write_blob(&mut buf, blob).unwrap();
        }
        let err = StoredObject::decode(&mut buf.as_slice()).unwrap_err();
        assert!(err.to_string().contains("does not decode"), "{err}");
    }

    /// The memory tier's weight grows with the header it holds decoded, not only with the
    /// serialized bytes.
    #[test]
    fn weight_counts_the_decoded_header() {
        let small = object(b"x");
        let mut header = ResponseHeader::build(200, None).unwrap();
        for i in 0..20 {
            header
                .insert_header(format!("x-extra-{i}"), "v".repeat(40))
                .unwrap();
        }
        let big = StoredObject::new(ObjectMeta::of(&meta_with(header)).unwrap(), "x".into());
        let serialized = |o: &StoredObject| o.meta.internal.len() + o.meta.header.len();
        let overhead = |o: &StoredObject| o.weight() - serialized(o) - o.body.len();
        assert!(overhead(&big) > overhead(&small) + 20 * (40 + 9));
    }

    /// Every hit rebuilds the metadata the object was stored with, whether it takes the fast
    /// path (never revalidated) or the slow one (revalidated: `updated` differs).
    #[test]
    fn decoded_meta_is_reused_and_identical() {
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.insert_header("etag", "\"v1\"").unwrap();
        header.insert_header("cache-control", "max-age=60").unwrap();
        let mut fresh = meta_with(header);
        fresh.set_variance([3u8; 16]);
        let (i, h) = fresh.serialize().unwrap();
        let mut revalidated = CacheMeta::deserialize(&i, &h).unwrap();
        revalidated.update_freshness(fresh.fresh_until() + Duration::from_secs(60), 1, 2);
        for meta in [fresh, revalidated] {
            let (i, h) = meta.serialize().unwrap();
            let stored = CacheMeta::deserialize(&i, &h).unwrap();
            let o = StoredObject::new(ObjectMeta::of(&meta).unwrap(), Bytes::new());
            let first = o.meta().unwrap();
            let again = o.clone().meta().unwrap();
            let fast_path = o.meta.decoded.fresh.is_some();
            assert_eq!(fast_path, stored.updated() == stored.created());
            for m in [&first, &again] {
                assert_eq!(m.headers()["etag"], "\"v1\"");
                assert_eq!(m.response_header().status, 200);
                assert_eq!(m.fresh_until(), stored.fresh_until());
                assert_eq!(m.created(), stored.created());
                assert_eq!(m.updated(), stored.updated());
                assert_eq!(m.provenance(), stored.provenance());
                assert_eq!(m.epoch(), stored.epoch());
                assert_eq!(
                    m.stale_while_revalidate_sec(),
                    stored.stale_while_revalidate_sec()
                );
                assert_eq!(m.stale_if_error_sec(), stored.stale_if_error_sec());
                assert_eq!(m.variance(), Some([3u8; 16]));
            }
        }
    }

    #[test]
    fn rejects_huge_meta_length() {
        let mut buf = vec![VERSION];
        buf.extend_from_slice(&(u64::MAX).to_le_bytes());
        assert!(StoredObject::decode(&mut buf.as_slice()).is_err());
    }
}
