//! The memory tier's weight of an object must not understate what the object holds: foyer
//! evicts by weight, so an understated weight lets the tier grow past its configured size.
//! Measured here with a counting allocator (its own test binary: it replaces the global
//! allocator).

use std::alloc::System;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use edge_node::storage::{ObjectMeta, StoredObject};
use pingora_cache::CacheMeta;
use pingora_http::ResponseHeader;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn serialized(headers: &[(String, String)]) -> (Vec<u8>, Vec<u8>) {
    let mut header = ResponseHeader::build(200, None).unwrap();
    for (name, value) in headers {
        header.append_header(name.clone(), value.as_str()).unwrap();
    }
    let now = SystemTime::now();
    CacheMeta::new(now + Duration::from_secs(60), now, 5, 7, header)
        .serialize()
        .unwrap()
}

/// Heap bytes kept by decoding the metadata, and the weight's share for them.
fn measure(headers: &[(String, String)]) -> (isize, usize) {
    let (internal, header) = serialized(headers);
    let (internal, header) = (Bytes::from(internal), Bytes::from(header));
    let serialized = internal.len() + header.len();
    let region = Region::new(GLOBAL);
    let obj = StoredObject::new(ObjectMeta::decode(internal, header).unwrap(), Bytes::new());
    let change = region.change();
    // stats_alloc already counts a realloc's growth in `bytes_allocated` and its shrinking
    // in `bytes_deallocated` (`bytes_reallocated` is the same change again).
    let kept = change.bytes_allocated as isize - change.bytes_deallocated as isize;
    let weighed = obj.weight() - serialized - std::mem::size_of::<StoredObject>();
    drop(obj);
    (kept, weighed)
}

#[test]
fn the_weight_covers_the_decoded_header() {
    let typical: Vec<(String, String)> = [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Length", "1024"),
        ("Cache-Control", "public, max-age=3600"),
        ("ETag", "\"5f2b-1a2b3c4d\""),
        ("Last-Modified", "Wed, 21 Oct 2026 07:28:00 GMT"),
        ("Date", "Fri, 04 Dec 2026 16:00:00 GMT"),
        ("Vary", "Accept-Encoding"),
        ("X-Request-Id", "0b8c7d6e5f4a3b2c1d0e"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    let many: Vec<(String, String)> = (0..40)
        .map(|i| (format!("X-Custom-{i}"), "v".repeat(i * 3)))
        .collect();
    let repeated: Vec<(String, String)> = (0..12)
        .map(|i| ("Link".to_string(), format!("</asset/{i}.css>; rel=preload")))
        .collect();
    // Short names and values, so the map's own slots weigh most, at field counts where http
    // sizes its maps with the largest share of slots unused.
    let short = |n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("X-H{i}"), "1".to_string()))
            .collect()
    };
    let long = vec![("Content-Security-Policy".to_string(), "x".repeat(4000))];
    for (name, headers) in [
        ("none", Vec::new()),
        ("typical", typical),
        ("many", many),
        ("repeated", repeated),
        ("13 short", short(13)),
        ("25 short", short(25)),
        ("49 short", short(49)),
        ("97 short", short(97)),
        ("193 short", short(193)),
        ("long", long),
    ] {
        let (kept, weighed) = measure(&headers);
        println!("{name}: decoded header keeps {kept} B, weighed {weighed} B");
        assert!(kept > 0, "{name}: nothing measured");
        assert!(weighed as isize >= kept, "{name}: {weighed} < {kept}");
        assert!(
            weighed as isize <= 2 * kept + 512,
            "{name}: {weighed} >> {kept}"
        );
    }
}
