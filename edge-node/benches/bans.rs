#![allow(missing_docs)] // criterion_group! generates an undocumented fn
//! What a cache hit pays for the prefix bans of its host: `BanList::is_banned` for an object
//! stored before every ban, with 0 to 10,000 bans on its host (an hour of prefix purges at
//! about 3 per second is 10,000).
//!
//! `cargo bench -p edge-node --bench bans`

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use edge_node::storage::BanList;

fn bans(c: &mut Criterion) {
    let mut group = c.benchmark_group("is_banned");
    let stored = SystemTime::now() - Duration::from_secs(60);
    for n in [0usize, 10, 1_000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bans.log"),
            (0..n)
                .map(|i| format!("ban {} site.example/assets/v{i}/\n", now_ms() - i as u64))
                .collect::<String>(),
        )
        .unwrap();
        let list = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert_eq!(list.len(), n);
        let key = "site.example/assets/current/app.js";
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| assert!(!list.is_banned(std::hint::black_box(key), stored)))
        });
    }
    group.finish();
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

criterion_group!(benches, bans);
criterion_main!(benches);
