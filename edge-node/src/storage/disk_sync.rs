//! Making the disk tier's writes survive a power loss.
//!
//! foyer writes through the page cache and never syncs: a write it reports ended is in the
//! kernel's memory, which survives a crash of the process but not one of the host (a power
//! loss, a kernel panic). For cached objects that only costs misses; for a key purge's
//! tombstone it would bring the purged object back. So before the edge counts a tombstone
//! written, it syncs:
//! - a key purge ([`super::FoyerStorage::settle_purge`]) syncs foyer's tombstone log alone
//!   ([`DiskSync::tombstones`]): recovery drops every entry older than a tombstone it reads
//!   there, so that file is what makes a purge last, and syncing it does not write out the
//!   fills waiting in the page cache. Purges waiting at once share one `fdatasync` (a sync
//!   that starts after a caller asked covers it).
//! - the ban compaction and the close sync the whole filesystem ([`DiskSync::everything`],
//!   one `syncfs` however many block files): they also retire the records of refreshes,
//!   whose new copies live in the block files.
//!
//! Both files are opened once, at start: Linux reports a failed write-back to every open file
//! of the failure once, so an error of the kernel's own background write-back reaches the
//! next sync too (Linux 5.8 or later for `syncfs`). A failed sync counts as a failed disk
//! write ([`super::disk_io`]): the purges it covered, and every key ban standing in for a late
//! tombstone, are then kept by key bans until the retention. A memory-only cache has nothing
//! to sync.

use std::fs::File;
use std::io;
use std::path::Path;
#[cfg(test)]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::disk_io::DiskErrors;

use super::tombstone_log::FILE as TOMBSTONE_LOG;

/// The disk tier's syncs, shared by every purge.
#[derive(Debug, Clone)]
pub struct DiskSync(Option<Arc<Inner>>);

#[derive(Debug)]
struct Inner {
    /// foyer's directory, for `syncfs`.
    dir: File,
    /// foyer's tombstone log; `None` when it is not where foyer 0.22 puts it (then a purge
    /// syncs the whole filesystem).
    tombstones: Option<File>,
    /// Tombstone syncs asked for so far.
    asked: AtomicU64,
    /// Every tombstone sync asked for up to this number is done.
    done: AtomicU64,
    /// Every tombstone sync asked for up to this number was covered by one that failed.
    failed_upto: AtomicU64,
    /// One sync at a time; held by the task that runs it, not by a caller who may give up.
    running: tokio::sync::Mutex<()>,
    errors: Arc<DiskErrors>,
    /// `shadowcdn_edge_disk_sync_seconds`, by `scope`.
    seconds: prometheus::HistogramVec,
    /// `shadowcdn_edge_disk_sync_failures_total`.
    failures: prometheus::IntCounter,
    /// Tests make syncs fail.
    #[cfg(test)]
    broken: AtomicBool,
}

/// What a sync covers, for its metric.
#[derive(Debug, Clone, Copy)]
enum Scope {
    Tombstones,
    Everything,
}

impl DiskSync {
    /// Syncs of foyer's files under `foyer_dir` (`None`: a memory-only cache), counting
    /// failures in `errors`; metrics go to `registry`.
    pub fn open(
        foyer_dir: Option<&Path>,
        errors: Arc<DiskErrors>,
        registry: &prometheus::Registry,
    ) -> Result<Self, super::StorageError> {
        let seconds = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "shadowcdn_edge_disk_sync_seconds",
                "Time of each sync of the disk tier: scope tombstones (foyer's tombstone log, \
                 which a key purge waits for) or everything (its filesystem: compaction, close)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["scope"],
        )?;
        let failures = prometheus::IntCounter::new(
            "shadowcdn_edge_disk_sync_failures_total",
            "Syncs of the disk tier that failed; each also counts as a failed disk write, so \
             the purges it covered are made durable by key bans kept until the retention",
        )?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        let Some(dir_path) = foyer_dir else {
            return Ok(DiskSync(None));
        };
        // foyer created its files without syncing the directory.
        let dir = File::open(dir_path)
            .and_then(|dir| dir.sync_all().map(|()| dir))
            .map_err(|source| super::StorageError::Dir {
                path: dir_path.to_path_buf(),
                source,
            })?;
        let log = dir_path.join(TOMBSTONE_LOG);
        let tombstones = match File::open(&log) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(path = %log.display(), error = %e,
                    "foyer's tombstone log is not where this build expects it: each key purge \
                     syncs the whole cache filesystem instead");
                None
            }
        };
        Ok(DiskSync(Some(Arc::new(Inner {
            dir,
            tombstones,
            asked: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed_upto: AtomicU64::new(0),
            running: tokio::sync::Mutex::new(()),
            errors,
            seconds,
            failures,
            #[cfg(test)]
            broken: AtomicBool::new(false),
        }))))
    }

    /// Return once every tombstone foyer was told to write before this call is on the
    /// device, or the error of the sync that covered it. The sync runs in a task of its own,
    /// so a caller that gives up (a timeout) neither cuts it short nor loses its outcome.
    pub async fn tombstones(&self) -> io::Result<()> {
        let Some(inner) = &self.0 else {
            return Ok(());
        };
        let mine = inner.asked.fetch_add(1, Ordering::AcqRel) + 1;
        let inner = inner.clone();
        tokio::spawn(async move { inner.tombstones_upto(mine).await })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    }

    /// Sync the disk tier's whole filesystem: every block foyer was told to write before this
    /// call, tombstones included, is on the device once it returns Ok.
    pub async fn everything(&self) -> io::Result<()> {
        let Some(inner) = &self.0 else {
            return Ok(());
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let _one = inner.running.lock().await;
            inner.run(Scope::Everything, None).await
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
    }

    /// Make every sync fail (`true`) or pass again.
    #[cfg(test)]
    pub(super) fn break_syncs(&self, broken: bool) {
        if let Some(inner) = &self.0 {
            inner.broken.store(broken, Ordering::Release);
        }
    }

    /// Whether a purge syncs foyer's tombstone log itself (not the whole filesystem).
    #[cfg(test)]
    pub(super) fn syncs_the_log(&self) -> bool {
        self.0.as_ref().is_some_and(|i| i.tombstones.is_some())
    }

    /// Syncs failed so far.
    #[cfg(test)]
    pub(super) fn failures(&self) -> u64 {
        self.0.as_ref().map_or(0, |i| i.failures.get())
    }
}

impl Inner {
    async fn tombstones_upto(self: &Arc<Self>, mine: u64) -> io::Result<()> {
        let _one = self.running.lock().await;
        if self.failed_upto.load(Ordering::Acquire) >= mine {
            return Err(io::Error::other(
                "a sync covering this purge's tombstone failed",
            ));
        }
        if self.done.load(Ordering::Acquire) >= mine {
            return Ok(());
        }
        // Asked for by now, so covered by the sync that starts now.
        let covers = self.asked.load(Ordering::Acquire);
        self.run(Scope::Tombstones, Some(covers)).await
    }

    /// One sync, under `running`, covering tombstone syncs up to `covers`. Run and accounted
    /// for whole on a blocking thread: a sync under way when its task is dropped (its runtime
    /// shutting down) still records what it found, since the kernel reports a failed
    /// write-back once.
    async fn run(self: &Arc<Self>, scope: Scope, covers: Option<u64>) -> io::Result<()> {
        let inner = self.clone();
        tokio::task::spawn_blocking(move || inner.run_blocking(scope, covers))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    }

    fn run_blocking(&self, scope: Scope, covers: Option<u64>) -> io::Result<()> {
        let began = Instant::now();
        let synced = self.sync_now(scope);
        let label = match scope {
            Scope::Tombstones => "tombstones",
            Scope::Everything => "everything",
        };
        self.seconds
            .with_label_values(&[label])
            .observe(began.elapsed().as_secs_f64());
        match (synced, covers) {
            (Ok(()), Some(covers)) => {
                self.done.fetch_max(covers, Ordering::AcqRel);
                Ok(())
            }
            (Ok(()), None) => Ok(()),
            (Err(e), covers) => {
                if let Some(covers) = covers {
                    self.failed_upto.fetch_max(covers, Ordering::AcqRel);
                }
                self.failed(scope, e)
            }
        }
    }

    fn sync_now(&self, scope: Scope) -> io::Result<()> {
        #[cfg(test)]
        if self.broken.load(Ordering::Acquire) {
            return Err(io::Error::other("syncs broken by the test"));
        }
        match (scope, &self.tombstones) {
            (Scope::Tombstones, Some(log)) => log.sync_data(),
            _ => rustix::fs::syncfs(&self.dir).map_err(io::Error::from),
        }
    }

    fn failed(&self, scope: Scope, e: io::Error) -> io::Result<()> {
        self.failures.inc();
        self.errors.record_failure();
        tracing::error!(error = %e, ?scope, "the disk tier did not sync: key purges it covered \
            are made durable by key bans kept until the retention");
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync_in(dir: &Path) -> (DiskSync, Arc<DiskErrors>) {
        std::fs::write(dir.join(TOMBSTONE_LOG), b"log").unwrap();
        let errors = super::super::disk_io::tests::own();
        let sync = DiskSync::open(Some(dir), errors.clone(), &prometheus::Registry::new());
        (sync.unwrap(), errors)
    }

    fn inner(s: &DiskSync) -> &Arc<Inner> {
        s.0.as_ref().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_purges_share_syncs_and_each_is_covered() {
        let dir = tempfile::tempdir().unwrap();
        let (sync, _) = sync_in(dir.path());
        assert!(sync.syncs_the_log());
        let callers: Vec<_> = (0..32)
            .map(|_| {
                let sync = sync.clone();
                tokio::spawn(async move { sync.tombstones().await })
            })
            .collect();
        for c in callers {
            c.await.unwrap().unwrap();
        }
        assert_eq!(inner(&sync).done.load(Ordering::Acquire), 32);
        sync.everything().await.unwrap();
        let m = &inner(&sync).seconds;
        let runs = m.with_label_values(&["tombstones"]).get_sample_count();
        assert!((1..=32).contains(&runs), "{runs}");
        assert_eq!(m.with_label_values(&["everything"]).get_sample_count(), 1);
    }

    /// A failed sync fails every purge it covered, also one that asks after it and would
    /// pass a sync of its own, and counts as a failed disk write; later purges pass.
    #[tokio::test]
    async fn a_failed_sync_fails_the_purges_it_covered_and_counts_as_a_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        let (sync, errors) = sync_in(dir.path());
        let i = inner(&sync);
        i.asked.fetch_add(1, Ordering::AcqRel);
        sync.break_syncs(true);
        assert!(i.tombstones_upto(1).await.is_err());
        sync.break_syncs(false);
        assert!(
            i.tombstones_upto(1).await.is_err(),
            "covered by the failure"
        );
        assert_eq!((sync.failures(), errors.count()), (1, 1));
        sync.tombstones().await.unwrap();
        sync.break_syncs(true);
        assert!(sync.everything().await.is_err());
        assert_eq!(errors.count(), 2);
    }

    #[tokio::test]
    async fn without_the_log_a_purge_syncs_the_filesystem_and_without_a_disk_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let errors = super::super::disk_io::tests::own();
        let r = prometheus::Registry::new();
        let sync = DiskSync::open(Some(dir.path()), errors.clone(), &r).unwrap();
        assert!(!sync.syncs_the_log());
        sync.tombstones().await.unwrap();
        let none = DiskSync::open(None, errors, &prometheus::Registry::new()).unwrap();
        none.tombstones().await.unwrap();
        none.everything().await.unwrap();
    }
}
