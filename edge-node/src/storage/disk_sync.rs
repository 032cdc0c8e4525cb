//! Making the disk tier's writes survive a power loss.
//!
//! foyer writes through the page cache and never syncs: a write it reports ended is in the
//! kernel's memory, which survives a crash of the process but not one of the host (a power
//! loss, a kernel panic). For cached objects that only costs misses; for a key purge's
//! tombstone it would bring the purged object back. So before the edge counts a tombstone
//! written ([`super::FoyerStorage::settle_purge`], the ban compaction, the close), it syncs the
//! filesystem under foyer's files: one `syncfs`, not one `fsync` per file, since foyer keeps a
//! file per block and a large disk tier has thousands. Concurrent purges share a sync (group
//! commit): a sync that starts after a caller asked covers it.
//!
//! `syncfs` flushes everything dirty on that filesystem, so the cache directory belongs on a
//! filesystem of its own, as a cache disk usually is. A memory-only cache has nothing to sync.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The disk tier's sync, shared by every purge.
#[derive(Debug)]
pub struct DiskSync {
    /// foyer's directory; `None` for a memory-only cache.
    dir: Option<PathBuf>,
    /// Syncs asked for so far.
    asked: AtomicU64,
    /// Every sync asked for up to this number is done.
    done: AtomicU64,
    /// One sync at a time: the callers behind it mostly find themselves covered.
    running: tokio::sync::Mutex<()>,
    /// `shadowcdn_edge_disk_sync_seconds`.
    seconds: prometheus::Histogram,
    /// `shadowcdn_edge_disk_sync_failures_total`.
    failures: prometheus::IntCounter,
}

impl DiskSync {
    /// Syncs of the filesystem under `dir` (`None`: nothing to sync); its metrics go to
    /// `registry`.
    pub fn new(dir: Option<PathBuf>, registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "shadowcdn_edge_disk_sync_seconds",
                "Time of each sync of the disk tier's filesystem, which key purges wait for \
                 before they count their tombstones written",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let failures = prometheus::IntCounter::new(
            "shadowcdn_edge_disk_sync_failures_total",
            "Syncs of the disk tier's filesystem that failed (the tombstones they covered are \
             made durable by key bans)",
        )?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        Ok(DiskSync {
            dir,
            asked: AtomicU64::new(0),
            done: AtomicU64::new(0),
            running: tokio::sync::Mutex::new(()),
            seconds,
            failures,
        })
    }

    /// Return once everything the disk tier was told to write before this call is on the
    /// device: a sync that starts after the call covers it.
    pub async fn sync(&self) -> std::io::Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let mine = self.asked.fetch_add(1, Ordering::AcqRel) + 1;
        let _one = self.running.lock().await;
        if self.done.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        // Asked for by now, so covered by the sync that starts now.
        let covers = self.asked.load(Ordering::Acquire);
        let dir = dir.clone();
        let began = Instant::now();
        let synced = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&dir)?;
            rustix::fs::syncfs(&f).map_err(std::io::Error::from)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        self.seconds.observe(began.elapsed().as_secs_f64());
        match synced {
            Ok(()) => {
                self.done.fetch_max(covers, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                self.failures.inc();
                tracing::error!(error = %e, "the disk tier's filesystem did not sync: key purges \
                    waiting for it are made durable by key bans");
                Err(e)
            }
        }
    }

    /// Syncs done so far.
    #[cfg(test)]
    fn count(&self) -> u64 {
        self.seconds.get_sample_count()
    }

    /// Syncs failed so far.
    #[cfg(test)]
    pub(super) fn failures(&self) -> u64 {
        self.failures.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_syncs_and_each_is_covered() {
        let dir = tempfile::tempdir().unwrap();
        let sync = std::sync::Arc::new(
            DiskSync::new(Some(dir.path().to_path_buf()), &prometheus::Registry::new()).unwrap(),
        );
        sync.sync().await.unwrap();
        assert_eq!(sync.count(), 1);
        let callers: Vec<_> = (0..32)
            .map(|_| {
                let sync = sync.clone();
                tokio::spawn(async move { sync.sync().await })
            })
            .collect();
        for c in callers {
            c.await.unwrap().unwrap();
        }
        let n = sync.count();
        assert!((2..=33).contains(&n), "{n} syncs");
        assert_eq!(
            sync.done.load(Ordering::Acquire),
            33,
            "every caller covered"
        );
    }

    #[tokio::test]
    async fn a_sync_that_fails_is_counted_and_covers_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let sync = DiskSync::new(Some(gone.clone()), &prometheus::Registry::new()).unwrap();
        assert!(sync.sync().await.is_err());
        assert_eq!(sync.failures.get(), 1);
        assert_eq!(sync.done.load(Ordering::Acquire), 0);
        std::fs::create_dir(&gone).unwrap();
        sync.sync().await.unwrap();
        assert_eq!(sync.done.load(Ordering::Acquire), 2);
    }

    #[tokio::test]
    async fn a_memory_only_cache_has_nothing_to_sync() {
        let sync = DiskSync::new(None, &prometheus::Registry::new()).unwrap();
        sync.sync().await.unwrap();
        assert_eq!(sync.count(), 0);
    }
}
