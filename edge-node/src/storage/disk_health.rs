//! Whether the cache's disk still answers: a watchdog thread writes and syncs a small file in
//! the cache directory every [`PROBE_INTERVAL`].
//!
//! A disk that stops answering (a hung device, a network volume whose server went away) does
//! not fail foyer's reads and writes, it holds them: a request for an object on that disk
//! waits with its read, and a purge with its ban log's fsync, for as long as the stall lasts,
//! while the memory tier and the admin API look healthy. The edge's readiness (`GET /readyz`,
//! what the broker's health checks ask) says no while a probe has been under way longer than
//! `cache.disk_stall_secs`, or the last one failed, so the broker sends the edge's clients to
//! the next edge of the region and back once a probe passes again. Requests that reach the
//! edge meanwhile (already routed, or from clients that ask it directly) do not read the disk
//! while it stalls ([`DiskHealth::stalled`]): the memory tier answers, or the origin.
//!
//! The probe opens the file anew each time (a network volume can hang on the lookup too),
//! overwrites blocks it already has and `fdatasync`s: it waits for the device, not for space.
//! A full disk answers (`ENOSPC` counts as an answer, as foyer's own failed writes are counted
//! elsewhere, [`super::disk_io`]); a device error or a filesystem remounted read-only does
//! not; a process out of file descriptors or memory says nothing of the disk either way. The
//! thread is a plain OS thread, not a runtime's blocking task, so a probe stuck in the kernel
//! holds up no runtime's shutdown (only the kernel's end of the process, as foyer's own stuck
//! I/O would).

use std::fs::OpenOptions;
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// The probe's file, in the cache directory.
pub const PROBE_FILE: &str = "disk-probe";

/// Time between the end of one probe and the start of the next.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Bytes each probe overwrites: one sector.
const PROBE_BYTES: usize = 512;

/// The probe's metrics (owned by [`crate::metrics::EdgeMetrics`]).
#[derive(Clone)]
pub struct ProbeMetrics {
    /// `shadowcdn_edge_disk_probe_seconds`: how long each finished probe took.
    pub seconds: prometheus::Histogram,
    /// `shadowcdn_edge_disk_probe_failures_total`.
    pub failures: prometheus::IntCounter,
}

/// The cache disk's readiness as the watchdog last saw it; cheap to clone and to ask.
#[derive(Clone)]
pub struct DiskHealth(Arc<Shared>);

struct Shared {
    path: PathBuf,
    stall_after: Duration,
    /// The origin of `under_way_ms`.
    epoch: Instant,
    /// When the probe under way began, in milliseconds from `epoch` plus one; 0 while none
    /// is. An atomic rather than part of `state`: every read of the disk asks it.
    under_way_ms: AtomicU64,
    state: Mutex<State>,
    metrics: ProbeMetrics,
}

#[derive(Default)]
struct State {
    /// Why the last finished probe failed; `None` when it passed.
    failed: Option<String>,
    /// The stall of the probe under way has been logged.
    stall_logged: bool,
}

/// What [`DiskHealth::verdict`] says of the disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskVerdict {
    /// The last probe passed, and none has been under way for too long.
    #[error("the cache disk answers")]
    Ready,
    /// A probe has been under way this long, past `cache.disk_stall_secs`.
    #[error("a write and fsync in the cache directory has not finished for {} s", .0.as_secs())]
    Stalled(Duration),
    /// The last probe failed with this error.
    #[error("a write and fsync in the cache directory failed: {0}")]
    Failing(String),
}

impl DiskVerdict {
    /// The JSON error code of a disk that is not ready.
    pub fn code(&self) -> &'static str {
        match self {
            DiskVerdict::Ready => "ready",
            DiskVerdict::Stalled(_) => "disk_stalled",
            DiskVerdict::Failing(_) => "disk_failing",
        }
    }
}

impl DiskHealth {
    /// Probe `dir` every [`PROBE_INTERVAL`] from now on, until the last clone is dropped. The
    /// first probe's verdict is waited for (at most `stall_after`), so an edge whose disk fails
    /// or hangs at start-up starts not ready rather than not at all.
    pub fn start(dir: &Path, stall_after: Duration, metrics: ProbeMetrics) -> io::Result<Self> {
        Self::start_every(dir, stall_after, PROBE_INTERVAL, metrics)
    }

    fn start_every(
        dir: &Path,
        stall_after: Duration,
        interval: Duration,
        metrics: ProbeMetrics,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            path: dir.join(PROBE_FILE),
            stall_after,
            epoch: Instant::now(),
            under_way_ms: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            metrics,
        });
        // Under way from now: a first probe that hangs reads as a stall from the start.
        shared.began_probe();
        let (first, first_done) = std::sync::mpsc::sync_channel(1);
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("disk-probe".into())
            .spawn(move || watch(weak, interval, first))?;
        if first_done.recv_timeout(stall_after).is_err() {
            tracing::error!(
                path = %shared.path.display(),
                secs = stall_after.as_secs(),
                "the first probe of the cache disk has not finished: this edge starts not ready"
            );
        }
        Ok(DiskHealth(shared))
    }

    /// Whether a probe has been under way for `cache.disk_stall_secs` or longer: a read from
    /// the disk now would wait as long as the stall lasts. Cheap enough for every read.
    pub fn stalled(&self) -> bool {
        self.0.waited().is_some_and(|w| w >= self.0.stall_after)
    }

    /// `cache.disk_stall_secs`: also the longest a read from the disk is waited for.
    pub fn stall_after(&self) -> Duration {
        self.0.stall_after
    }

    /// The disk's readiness now. A stall is logged once, when first seen here.
    pub fn verdict(&self) -> DiskVerdict {
        let (verdict, first_seen) = {
            let mut st = self.0.state.lock();
            match self.0.waited() {
                Some(waited) if waited >= self.0.stall_after => (
                    DiskVerdict::Stalled(waited),
                    !std::mem::replace(&mut st.stall_logged, true),
                ),
                _ => match &st.failed {
                    Some(e) => (DiskVerdict::Failing(e.clone()), false),
                    None => (DiskVerdict::Ready, false),
                },
            }
        };
        if first_seen {
            tracing::error!(
                path = %self.0.path.display(),
                error = %verdict,
                "the cache disk stalls: this edge answers not ready until it answers"
            );
        }
        verdict
    }
}

/// Probe at once, say so on `first`, then every `interval` until the [`DiskHealth`] is gone.
fn watch(shared: Weak<Shared>, interval: Duration, first: std::sync::mpsc::SyncSender<()>) {
    if let Some(s) = shared.upgrade() {
        s.probe();
    }
    let _ = first.send(());
    loop {
        std::thread::sleep(interval);
        match shared.upgrade() {
            Some(s) => s.probe(),
            None => return,
        }
    }
}

/// What a finished probe changed, logged once the state's lock is released.
enum Change {
    None,
    Recovered,
    Failed(String),
}

impl Shared {
    /// Mark a probe under way from now, unless one is already: the first probe keeps the
    /// start-up's mark, so a disk that hangs at start-up is stalled once `start` returns.
    fn began_probe(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        let _ = self
            .under_way_ms
            .compare_exchange(0, ms + 1, Ordering::AcqRel, Ordering::Acquire);
    }

    /// How long the probe under way has been waited for; `None` when none is under way.
    fn waited(&self) -> Option<Duration> {
        match self.under_way_ms.load(Ordering::Acquire) {
            0 => None,
            began => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(began - 1)),
            ),
        }
    }

    fn probe(&self) {
        let began = Instant::now();
        self.began_probe();
        let outcome = overwrite_and_sync(&self.path);
        let took = began.elapsed();
        self.metrics.seconds.observe(took.as_secs_f64());
        let change = {
            let mut st = self.state.lock();
            // Under the lock with `failed`, so a verdict never sees the probe ended without
            // its outcome.
            self.under_way_ms.store(0, Ordering::Release);
            let was_stalled = std::mem::take(&mut st.stall_logged);
            match outcome {
                Ok(()) if st.failed.take().is_some() || was_stalled => Change::Recovered,
                Ok(()) => Change::None,
                // Out of descriptors or memory: the process's trouble, not the disk's.
                Err(e) if says_nothing_of_the_disk(&e) => {
                    tracing::warn!(error = %e, "the cache disk could not be probed");
                    Change::None
                }
                Err(e) => {
                    self.metrics.failures.inc();
                    let first = st.failed.is_none();
                    st.failed = Some(e.to_string());
                    if first {
                        Change::Failed(e.to_string())
                    } else {
                        Change::None
                    }
                }
            }
        };
        match change {
            Change::None => {}
            Change::Recovered => tracing::info!(
                secs = took.as_secs_f64(),
                "the cache disk answers again: this edge is ready"
            ),
            Change::Failed(error) => tracing::error!(
                path = %self.path.display(),
                %error,
                "the cache disk fails: this edge answers not ready until a probe passes"
            ),
        }
    }
}

/// An error of the probing process rather than of the disk.
fn says_nothing_of_the_disk(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

/// Overwrite the probe file's first sector and wait for the device to have it.
fn overwrite_and_sync(path: &Path) -> io::Result<()> {
    let mut block = [b' '; PROBE_BYTES];
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let line = format!("shadowcdn disk probe {ms}");
    block[..line.len()].copy_from_slice(line.as_bytes());
    block[PROBE_BYTES - 1] = b'\n';
    // Not through a symlink: a link put in the cache directory must not have the probe
    // overwrite the start of whatever it points to (it fails the probe instead).
    let answered = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|f| {
            f.write_all_at(&block, 0)?;
            f.sync_data()
        });
    match answered {
        Err(e) if matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Metrics registered nowhere.
    pub(crate) fn metrics() -> ProbeMetrics {
        ProbeMetrics {
            seconds: prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("s", "s"))
                .unwrap(),
            failures: prometheus::IntCounter::new("f", "f").unwrap(),
        }
    }

    /// A FIFO at `path`: a probe of it, while nobody reads it, hangs in its open as a write
    /// to a hung device would.
    pub(crate) fn make_fifo(path: &Path) {
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(made.success());
    }

    fn wait_for(health: &DiskHealth, want: impl Fn(&DiskVerdict) -> bool) -> DiskVerdict {
        for _ in 0..200 {
            let v = health.verdict();
            if want(&v) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("verdict still {:?}", health.verdict());
    }

    #[test]
    fn a_disk_that_answers_is_ready_and_its_probe_file_stays_one_sector() {
        let dir = tempfile::tempdir().unwrap();
        let m = metrics();
        let health = DiskHealth::start(dir.path(), Duration::from_secs(10), m.clone()).unwrap();
        assert_eq!(health.verdict(), DiskVerdict::Ready);
        assert!(!health.stalled());
        assert_eq!(m.seconds.get_sample_count(), 1, "probed before it answers");
        let file = std::fs::read(dir.path().join(PROBE_FILE)).unwrap();
        assert_eq!(file.len(), PROBE_BYTES);
        assert!(file.starts_with(b"shadowcdn disk probe "));
    }

    /// A probe that does not come back (here: its file is a FIFO nobody reads, so opening it
    /// blocks as a write to a hung device would) makes the disk stalled; one that comes back
    /// with an error (a positioned write to a pipe) failing; a probe that passes, ready again.
    #[test]
    fn a_probe_that_hangs_is_a_stall_one_that_fails_a_failure_and_a_pass_clears_both() {
        let dir = tempfile::tempdir().unwrap();
        let m = metrics();
        let stall = Duration::from_millis(300);
        let health =
            DiskHealth::start_every(dir.path(), stall, Duration::from_millis(20), m.clone())
                .unwrap();
        assert_eq!(health.verdict(), DiskVerdict::Ready);
        let probe = dir.path().join(PROBE_FILE);
        let fifo = dir.path().join("fifo");
        make_fifo(&fifo);
        std::fs::rename(&fifo, &probe).unwrap();
        let stalled = wait_for(&health, |v| matches!(v, DiskVerdict::Stalled(_)));
        assert_eq!(stalled.code(), "disk_stalled");
        assert!(health.stalled(), "reads skip the disk");
        assert_eq!(m.failures.get(), 0, "a stall is no failure yet");

        // A directory in the file's place fails every probe from now on; reading the FIFO
        // (under another name) lets the stuck probe open it, and its write to a pipe fails.
        std::fs::rename(&probe, &fifo).unwrap();
        std::fs::create_dir(&probe).unwrap();
        let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
        let failing = wait_for(&health, |v| matches!(v, DiskVerdict::Failing(_)));
        assert_eq!(failing.code(), "disk_failing");
        assert!(m.failures.get() >= 1);
        reader.join().unwrap();

        std::fs::remove_dir(&probe).unwrap();
        wait_for(&health, |v| *v == DiskVerdict::Ready);
        assert!(!health.stalled());
    }

    /// A disk that hangs at start-up holds the start for `stall_after` at most: the edge
    /// starts, not ready, and becomes ready once the disk answers.
    #[test]
    fn a_disk_that_hangs_at_start_up_starts_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let probe = dir.path().join(PROBE_FILE);
        make_fifo(&probe);
        let stall = Duration::from_millis(200);
        let health =
            DiskHealth::start_every(dir.path(), stall, Duration::from_millis(20), metrics())
                .unwrap();
        assert!(matches!(health.verdict(), DiskVerdict::Stalled(_)));
        let fifo = dir.path().join("fifo");
        std::fs::rename(&probe, &fifo).unwrap();
        let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
        wait_for(&health, |v| *v == DiskVerdict::Ready);
        reader.join().unwrap();
    }

    /// A symlink in the probe file's place fails the probe; what it points to is left alone.
    #[test]
    fn the_probe_does_not_write_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(PROBE_FILE)).unwrap();
        let err = overwrite_and_sync(&dir.path().join(PROBE_FILE)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }

    #[test]
    fn running_out_of_descriptors_or_memory_is_no_verdict_on_the_disk() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM] {
            assert!(says_nothing_of_the_disk(&io::Error::from_raw_os_error(
                errno
            )));
        }
        for errno in [libc::EIO, libc::EROFS, libc::ENOENT] {
            assert!(!says_nothing_of_the_disk(&io::Error::from_raw_os_error(
                errno
            )));
        }
    }

    #[test]
    fn the_watchdog_thread_ends_with_the_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let health = DiskHealth::start_every(
            dir.path(),
            Duration::from_secs(1),
            Duration::ZERO,
            metrics(),
        )
        .unwrap();
        let weak = Arc::downgrade(&health.0);
        drop(health);
        for _ in 0..200 {
            if weak.upgrade().is_none() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the watchdog still holds the shared state");
    }
}
