//! The value stored in foyer: an HTTP response's cache metadata and its whole body.
//!
//! The encoding is versioned so that a disk tier written by an older edge is either read
//! correctly or rejected as a miss, never misread.

use std::io::{Read, Write};
use std::sync::{Arc, LazyLock, OnceLock};
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
    /// pingora `CacheMeta` internal part (freshness, timestamps, variance).
    pub meta_internal: Bytes,
    /// pingora `CacheMeta` serialized response header.
    pub meta_header: Bytes,
    /// The complete response body.
    pub body: Bytes,
    /// The metadata decoded once and shared by every hit on this in-memory entry: pingora
    /// stores headers zstd-compressed, and decompressing them on each hit was a measurable
    /// share of the hit path (see bench/RESULTS.md). Never written to disk.
    decoded: Arc<OnceLock<Decoded>>,
}

/// What a hit needs to rebuild its `CacheMeta` without decoding the stored bytes again.
#[derive(Debug)]
struct Decoded {
    header: ResponseHeader,
    /// The internal meta, when `CacheMeta::new` rebuilds it exactly: an object never
    /// revalidated (`updated == created`) without an epoch override. Revalidated objects
    /// take the slower path, which keeps their `updated` time.
    fresh: Option<Fresh>,
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

impl StoredObject {
    /// An object from its serialized meta and body.
    pub fn new(meta_internal: Bytes, meta_header: Bytes, body: Bytes) -> Self {
        StoredObject {
            meta_internal,
            meta_header,
            body,
            decoded: Arc::default(),
        }
    }

    /// The object's `CacheMeta`, decoding the stored bytes only on the first call per entry.
    pub fn meta(&self) -> pingora_error::Result<CacheMeta> {
        if let Some(d) = self.decoded.get() {
            if let Some(fresh) = d.fresh {
                return Ok(fresh.meta(d.header.clone()));
            }
            let mut meta = CacheMeta::deserialize(&self.meta_internal, &EMPTY_HEADER)?;
            *meta.response_header_mut() = d.header.clone();
            return Ok(meta);
        }
        let meta = CacheMeta::deserialize(&self.meta_internal, &self.meta_header)?;
        let _ = self.decoded.set(Decoded {
            header: meta.response_header_copy(),
            fresh: Fresh::of(&meta),
        });
        Ok(meta)
    }

    /// Bytes this object occupies, used as its weight in the memory tier.
    pub fn weight(&self) -> usize {
        self.meta_internal.len() + self.meta_header.len() + self.body.len() + 64
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
        write_blob(w, &self.meta_internal)?;
        write_blob(w, &self.meta_header)?;
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
        Ok(StoredObject::new(meta_internal, meta_header, body))
    }

    fn estimated_size(&self) -> usize {
        1 + 24 + self.meta_internal.len() + self.meta_header.len() + self.body.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let o = StoredObject::new(
            Bytes::from_static(b"internal"),
            Bytes::from_static(b"header"),
            Bytes::from(vec![7u8; 10_000]),
        );
        let mut buf = Vec::new();
        o.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), o.estimated_size());
        let d = StoredObject::decode(&mut buf.as_slice()).unwrap();
        assert_eq!(d.meta_internal, o.meta_internal);
        assert_eq!(d.meta_header, o.meta_header);
        assert_eq!(d.body, o.body);
    }

    #[test]
    fn rejects_unknown_version_and_truncation() {
        assert!(StoredObject::decode(&mut [9u8, 0, 0].as_slice()).is_err());
        let o = StoredObject::new(
            Bytes::from_static(b"i"),
            Bytes::from_static(b"h"),
            Bytes::from_static(b"body"),
        );
        let mut buf = Vec::new();
        o.encode(&mut buf).unwrap();
        buf.truncate(buf.len() - 2);
        assert!(StoredObject::decode(&mut buf.as_slice()).is_err());
    }

    /// Every hit rebuilds the metadata the object was stored with, whether it takes the fast
    /// path (never revalidated) or the slow one (revalidated: `updated` differs).
    #[test]
    fn decoded_meta_is_reused_and_identical() {
        let mut header = ResponseHeader::build(200, None).unwrap();
        header.insert_header("etag", "\"v1\"").unwrap();
        header.insert_header("cache-control", "max-age=60").unwrap();
        let created = SystemTime::now() - std::time::Duration::from_secs(30);
        let until = created + std::time::Duration::from_secs(60);
        let mut fresh = CacheMeta::new(until, created, 5, 7, header);
        fresh.set_variance([3u8; 16]);
        let (i, h) = fresh.serialize().unwrap();
        let mut revalidated = CacheMeta::deserialize(&i, &h).unwrap();
        revalidated.update_freshness(until + std::time::Duration::from_secs(60), 1, 2);
        for meta in [fresh, revalidated] {
            let (i, h) = meta.serialize().unwrap();
            let stored = CacheMeta::deserialize(&i, &h).unwrap();
            let o = StoredObject::new(i.into(), h.into(), Bytes::new());
            let first = o.meta().unwrap();
            let again = o.clone().meta().unwrap();
            let fast_path = o.decoded.get().unwrap().fresh.is_some();
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
