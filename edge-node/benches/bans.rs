#![allow(missing_docs)] // criterion_group! generates an undocumented fn
//! What a cache hit pays for the bans of its host: `BanList::is_banned` for an object stored
//! before every ban, with 0 to 10,000 prefix bans, tag bans or key bans (key purges whose
//! tombstones were late) on its host (an hour of purges at about 3 per second is 10,000). The
//! object's response names three tags.
//!
//! `cargo bench -p edge-node --bench bans`

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use edge_node::storage::BanList;
use http::HeaderMap;

/// A ban log line for the i-th ban.
type LogLine = fn(usize) -> String;

fn bans(c: &mut Criterion) {
    let stored = SystemTime::now() - Duration::from_secs(60);
    let mut headers = HeaderMap::new();
    headers.insert(
        "surrogate-key",
        "site-assets app-js release-2026-12".parse().unwrap(),
    );
    let kinds: [(&str, LogLine); 3] = [
        ("is_banned/prefix", |i| {
            format!("ban {} site.example/assets/v{i}/\n", now_ms() - i as u64)
        }),
        ("is_banned/tag", |i| {
            format!("tag {} site.example/ product-{i}\n", now_ms() - i as u64)
        }),
        ("is_banned/key", |i| {
            format!(
                "key {} site.example/assets/v{i}/app.js\n",
                now_ms() - i as u64
            )
        }),
    ];
    for (name, line) in kinds {
        let mut group = c.benchmark_group(name);
        for n in [0usize, 10, 1_000, 10_000] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join("bans.log"),
                (0..n).map(line).collect::<String>(),
            )
            .unwrap();
            let list = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
            assert_eq!(list.len(), n);
            let key = "site.example/assets/current/app.js";
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| assert!(!list.is_banned(std::hint::black_box(key), stored, &headers)))
            });
        }
        group.finish();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

criterion_group!(benches, bans);
criterion_main!(benches);
