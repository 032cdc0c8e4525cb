//! Failed writes of the disk tier, which foyer reports only in its log.
//!
//! foyer answers a wait for its disk tier once every write submitted before it has *ended*,
//! written or failed: a write that fails (a full disk, a device error) is logged at error
//! level by its flusher and dropped, and the waiters are told all the same. A key purge trusts
//! that wait to mean its tombstone is on disk ([`super::FoyerStorage::settle_purge`]); after a
//! failed write it may not be, and a restart would recover the purged object.
//!
//! foyer 0.22 keeps its I/O engine's buffer and partition types private, so no engine of the
//! edge's own can sit under it to see the failures. Its flusher's error events are what there
//! is: [`layer`] goes into the edge's log subscriber and counts them ([`DiskErrors::count`]).
//! The flusher logs a failure before it tells the waiters of that flush, so a purge that reads
//! the count before its removal and again when its wait ends sees any failure of the flushes
//! in between, its tombstone's among them; it is then made durable by a key ban instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use tracing::{Level, Subscriber};
use tracing_subscriber::filter::{Filtered, Targets};
use tracing_subscriber::layer::{Context, Layer};

/// Where foyer's flusher logs from: every error event of it is a write that did not happen
/// (a failed write, a failed tombstone log append, a flusher that stopped).
const FLUSHER_TARGET: &str = "foyer_storage::engine::block::flusher";

/// Failed writes of the disk tier.
#[derive(Debug)]
pub struct DiskErrors {
    /// `shadowcdn_edge_disk_write_errors_total`.
    writes: prometheus::IntCounter,
    /// The same count, read by purges (the metric may be reset by nobody, but is a float).
    failed: AtomicU64,
}

/// The process's disk tier failures: the edge has one storage and one log subscriber.
static PROCESS: LazyLock<Arc<DiskErrors>> = LazyLock::new(DiskErrors::new);

/// The failures the edge's own storage checks ([`super::FoyerStorage::open`]).
pub(crate) fn process() -> Arc<DiskErrors> {
    PROCESS.clone()
}

/// The log layer that counts the failed disk writes foyer logs; the edge's log subscriber
/// must carry it (`main` adds it beside the formatter). It has its own filter, so an
/// operator's `RUST_LOG` that silences foyer does not blind it.
pub fn layer<S>() -> Filtered<FlusherErrors, Targets, S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    FlusherErrors(process()).with_filter(Targets::new().with_target(FLUSHER_TARGET, Level::ERROR))
}

impl DiskErrors {
    fn new() -> Arc<Self> {
        let writes = prometheus::IntCounter::new(
            "shadowcdn_edge_disk_write_errors_total",
            "Writes of the disk tier that failed (a full disk, a device error), as foyer's \
             flusher logged them, or syncs of it that failed; a key purge whose wait saw one is \
             made durable by a key ban",
        )
        .expect("a valid metric");
        Arc::new(DiskErrors {
            writes,
            failed: AtomicU64::new(0),
        })
    }

    /// Failed writes of the disk tier since the process started. A wait for the disk tier
    /// proves the tombstones submitted before it written only if this did not move between
    /// their submission and the wait's end: foyer ends the wait all the same.
    pub(crate) fn count(&self) -> u64 {
        self.failed.load(Ordering::Acquire)
    }

    /// The failure counter, for the storage's metrics registry.
    pub(crate) fn counter(&self) -> prometheus::IntCounter {
        self.writes.clone()
    }

    /// Count a failed write: one foyer's flusher logged, or a sync of the disk tier that
    /// failed. No log line here: the layer runs inside the log dispatch, which drops events
    /// raised from it (foyer's own event says it; a failed sync logs its own).
    pub(crate) fn record_failure(&self) {
        self.writes.inc();
        self.failed.fetch_add(1, Ordering::AcqRel);
    }
}

/// Counts the error events of foyer's flusher ([`layer`]).
#[derive(Debug)]
pub struct FlusherErrors(Arc<DiskErrors>);

impl<S: Subscriber> Layer<S> for FlusherErrors {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == Level::ERROR && meta.target().starts_with(FLUSHER_TARGET) {
            self.0.record_failure();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// Failures of one test's own, apart from the process's.
    pub(crate) fn own() -> Arc<DiskErrors> {
        DiskErrors::new()
    }

    #[test]
    fn only_the_flushers_errors_count_as_failed_writes() {
        let errors = own();
        let filter = Targets::new().with_target(FLUSHER_TARGET, Level::ERROR);
        let subscriber =
            tracing_subscriber::registry().with(FlusherErrors(errors.clone()).with_filter(filter));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "foyer_storage::engine::block::flusher", "slow");
            tracing::error!(target: "foyer_storage::engine::block::engine", "load error");
            tracing::error!(target: "edge_node::storage", "a disk tier write failed");
            assert_eq!(errors.count(), 0);
            tracing::error!(
                target: "foyer_storage::engine::block::flusher",
                "[block engine flusher]: io task error"
            );
        });
        assert_eq!(errors.count(), 1);
        assert_eq!(errors.counter().get(), 1);
    }
}
