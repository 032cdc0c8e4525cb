//! Purges, whether an operator asks over HTTP or the broker over QUIC: one object with every
//! Vary variant, every key under a prefix, or every object of a host carrying a tag (both
//! durable bans). An object purged is no longer a shadow either: its mark ends with it (a mark
//! knows the tags its fill saw).
//!
//! A purge is in force from the moment it is applied; its answer waits until it is also
//! durable. A stalled disk would hold that answer for as long as the stall lasts, so
//! [`purge_answered`] answers [`PurgeError::DiskStalled`] once the disk's watchdog sees the
//! stall, and the purge goes on until the disk takes it. While the stall lasts, at most
//! [`MAX_STALLED_PURGES`] go on that way; the next are refused unapplied
//! ([`PurgeError::DiskBacklog`]): each holds a blocking thread until the disk answers, and
//! the broker sends a purge it has no answer for again every few seconds.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::drain::{detached, InflightCounter};
use crate::metrics::EdgeMetrics;
use crate::origin::{checked_host, OriginTable};
use crate::proxy::primary_key;
use crate::shadow::{self, ShadowTable};
use crate::storage::{BanError, FoyerStorage, NotDurable, RefreshRecord, Unwritten};
use crate::tags;

/// Why a purge is not final; the caller answers it as the edge's own failure (500, or 503
/// for a stalled disk), so the purge is sent again.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// A prefix or tag ban could not be written durably.
    #[error(transparent)]
    Ban(#[from] BanError),
    /// A key's tombstone was not on disk in time, and no key ban could stand in for it.
    #[error(transparent)]
    NotDurable(#[from] NotDurable),
    /// The disk stalled while the purge waited for it ([`purge_answered`]); answered as the
    /// edge's being unavailable (503), so the purge is sent again.
    #[error(
        "the cache disk is stalled: the purge is in force here but not yet on disk, and will \
         be once the disk answers; ask again to confirm"
    )]
    DiskStalled,
    /// The disk is stalled and [`MAX_STALLED_PURGES`] purges already wait for it: this one
    /// was not applied (503 too).
    #[error(
        "the cache disk is stalled and {MAX_STALLED_PURGES} purges already wait for it: this \
         one was not applied; ask again later"
    )]
    DiskBacklog,
}

/// What to purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One primary key, `host/path?query`.
    Key(String),
    /// Every key starting with `host/prefix`.
    Prefix(String),
    /// Every object of `host` whose response carries one of `tags` ([`crate::tags`]).
    Tags {
        /// The host, normalized as the proxy does.
        host: String,
        /// Checked, lower-cased tags.
        tags: Vec<String>,
    },
}

impl Target {
    /// Parse `host/path` or `host/prefix*`, normalizing the host as the proxy does.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (host, rest) = raw
            .split_once('/')
            .ok_or_else(|| "key must be {host}/{path}, e.g. example.com/index.html".to_string())?;
        let host = checked_host(host)?;
        let key = primary_key(&host, &format!("/{rest}"));
        Ok(match key.strip_suffix('*') {
            Some(prefix) => Target::Prefix(prefix.to_string()),
            None => Target::Key(key),
        })
    }

    /// A tag purge of `host`'s objects.
    pub fn tags(host: &str, tags: &[String]) -> Result<Self, String> {
        let host = checked_host(host)?;
        let tags = tags::check(tags).map_err(|e| e.to_string())?;
        Ok(Target::Tags { host, tags })
    }
}

/// Purge `target`; whether anything was found (a prefix ban always counts as found). Returns
/// once the purge is durable and final: a ban is fsynced; a key's tombstone is written to the
/// disk tier (or, when late, a key ban fsynced) and no lookup can bring the object back.
pub async fn invalidate(
    storage: &'static FoyerStorage,
    shadows: &ShadowTable,
    metrics: &EdgeMetrics,
    target: &Target,
) -> Result<bool, PurgeError> {
    match target {
        Target::Key(key) => purge_keys(storage, shadows, metrics, &[key]).await,
        Target::Prefix(prefix) => {
            let bans = storage.purge_prefix(prefix);
            shadows.remove_prefix(prefix);
            write_bans(storage, metrics, "prefix", bans).await
        }
        Target::Tags { host, tags } => {
            let host = format!("{host}/");
            let bans = storage.purge_tags(&host, tags);
            shadows.remove_tagged(&host, tags);
            write_bans(storage, metrics, "tag", bans).await
        }
    }
}

/// [`invalidate`] as the admin API and the broker's QUIC purges mean it: a key is also purged
/// as the proxy keys that request now (`origins`' query filter applied), first, since the
/// caller names the URL, not the edge's key form; found under either counts as found.
pub async fn invalidate_named(
    storage: &'static FoyerStorage,
    shadows: &ShadowTable,
    metrics: &EdgeMetrics,
    origins: &OriginTable,
    target: &Target,
) -> Result<bool, PurgeError> {
    if let Target::Key(key) = target {
        if let Some(keyed) = origins.normalize_key(key).filter(|k| k != key) {
            // Both forms in one purge: out of memory at once, then one wait for the disk tier.
            return purge_keys(storage, shadows, metrics, &[&keyed, key]).await;
        }
    }
    invalidate(storage, shadows, metrics, target).await
}

/// Purge `keys` (the forms of one URL), counted as one key purge.
async fn purge_keys(
    storage: &'static FoyerStorage,
    shadows: &ShadowTable,
    metrics: &EdgeMetrics,
    keys: &[&str],
) -> Result<bool, PurgeError> {
    let found = shadow::purge(storage, shadows, keys).await;
    let outcome = match found {
        Ok(true) => "purged",
        Ok(false) => "not_found",
        Err(_) => "error",
    };
    metrics.purges.with_label_values(&["key", outcome]).inc();
    Ok(found?)
}

/// Write a purge's bans, already in force, off the async runtime
/// ([`crate::storage::off_runtime`]), counting the purge (`kind`) by how that went.
async fn write_bans(
    storage: &'static FoyerStorage,
    metrics: &EdgeMetrics,
    kind: &str,
    bans: Unwritten,
) -> Result<bool, PurgeError> {
    let written = crate::storage::off_runtime(move || storage.write_bans(bans)).await;
    let outcome = if written.is_ok() { "banned" } else { "error" };
    metrics.purges.with_label_values(&[kind, outcome]).inc();
    Ok(written.map(|()| true)?)
}

/// How often a purge waiting for the disk looks at the disk's watchdog.
const STALL_CHECK: Duration = Duration::from_millis(100);

/// Purges that may wait for a stalled disk after their answer.
pub const MAX_STALLED_PURGES: usize = 64;

/// What a purge acts on, owned so that it can outlive the request that asked for it.
#[derive(Clone)]
pub struct PurgeParts {
    /// The cache.
    pub storage: &'static FoyerStorage,
    /// Shadow marks.
    pub shadows: Arc<ShadowTable>,
    /// Metrics.
    pub metrics: EdgeMetrics,
    /// The origin table now ([`invalidate_named`]).
    pub origins: Arc<OriginTable>,
}

/// Apply `target` ([`invalidate_named`]) and answer when it is final, or with
/// [`PurgeError::DiskStalled`] within [`STALL_CHECK`] of the disk's watchdog seeing a stall
/// (`cache.disk_stall_secs` into it) while it waits: the purge is in force by then
/// (everything it does before its first wait is done here, before it is answered) and goes
/// on, counted in `inflight` so a drain waits for it, until the disk takes it. A caller that
/// hangs up does not cut it short either. On a stalled disk that [`MAX_STALLED_PURGES`]
/// purges already wait for, a purge is refused unapplied ([`PurgeError::DiskBacklog`]).
pub async fn purge_answered(
    parts: PurgeParts,
    inflight: &InflightCounter,
    target: Target,
) -> Result<bool, PurgeError> {
    let (storage, metrics) = (parts.storage, parts.metrics.clone());
    let kind = match &target {
        Target::Key(_) => "key",
        Target::Prefix(_) => "prefix",
        Target::Tags { .. } => "tag",
    };
    let stalled = || {
        metrics
            .purges
            .with_label_values(&[kind, "disk_stalled"])
            .inc();
    };
    if storage.disk_stalled() && storage.purges_under_way().count() >= MAX_STALLED_PURGES {
        stalled();
        return Err(PurgeError::DiskBacklog);
    }
    let mut purge = Box::pin(async move {
        let PurgeParts {
            storage,
            shadows,
            metrics,
            origins,
        } = parts;
        invalidate_named(storage, &shadows, &metrics, &origins, &target).await
    });
    // The first poll applies it: in memory, banned, the marks ended.
    if let Poll::Ready(done) = futures::poll!(purge.as_mut()) {
        return done;
    }
    let under_way = storage.purges_under_way().enter();
    let rest = detached(inflight, async move {
        let _under_way = under_way;
        purge.await
    });
    // Polled, the task is spawned and runs on whatever becomes of this wait.
    let mut rest = std::pin::pin!(rest);
    loop {
        match tokio::time::timeout(STALL_CHECK, rest.as_mut()).await {
            Ok(done) => return done.unwrap_or_else(|e| Err(task_failed(e))),
            Err(_) if storage.disk_stalled() => {
                stalled();
                tracing::warn!(
                    "a purge waits for a stalled disk: answered unavailable, in force, made \
                     durable when the disk answers"
                );
                return Err(PurgeError::DiskStalled);
            }
            Err(_) => {}
        }
    }
}

/// A refresh order's record ([`FoyerStorage::record_refresh`]), or `None` when the cache disk
/// is stalled, or stalls while the record waits for it (within [`STALL_CHECK`] of the
/// watchdog seeing it): the order is then refused as busy, to be sent again, rather than held
/// for the stall with its QUIC stream and a blocking thread (the broker's channel to the edge
/// has a stream for each order it waits on). A record the disk takes after that is ended at
/// once: no fill follows it.
pub async fn refresh_recorded(
    storage: &'static FoyerStorage,
    key: &str,
) -> Option<Result<RefreshRecord, BanError>> {
    if storage.disk_stalled() {
        return None;
    }
    let key = key.to_string();
    // Dropped unfinished, the task goes on, and its record is dropped (ended) with its output.
    let mut record = tokio::spawn(async move { storage.record_refresh(&key).await });
    loop {
        match tokio::time::timeout(STALL_CHECK, &mut record).await {
            Ok(done) => return Some(done.unwrap_or_else(|e| Err(BanError::task_failed(e)))),
            Err(_) if storage.disk_stalled() => return None,
            Err(_) => {}
        }
    }
}

/// A purge task that ended without its answer (it panicked): reported as the ban log's
/// failure ([`BanError::task_failed`]).
pub(crate) fn task_failed(e: tokio::task::JoinError) -> PurgeError {
    PurgeError::Ban(BanError::task_failed(e))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use http::HeaderMap;

    use super::*;
    use crate::storage::tests::{small_storage, StalledDisk};

    /// A purge whose ban cannot reach a stalled disk (its append held, as behind a hung
    /// fsync) is answered `DiskStalled` once the watchdog sees the stall, in force all the
    /// while; it goes on, counted for the drain, and is written when the disk answers. Past
    /// [`MAX_STALLED_PURGES`] waiting, a purge is refused unapplied. A purge on a disk that
    /// answers waits for its write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_on_a_stalled_disk_is_answered_in_force_and_written_later() {
        let (dir, probed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = small_storage(dir.path()).await;
        let parts = PurgeParts {
            storage: s,
            shadows: Arc::new(ShadowTable::default()),
            metrics: EdgeMetrics::register(&prometheus::Registry::new()).unwrap(),
            origins: Arc::new(OriginTable::default()),
        };
        let inflight = InflightCounter::default();
        let stored = SystemTime::now() - Duration::from_secs(1);
        let banned = |kind| {
            parts
                .metrics
                .purges
                .with_label_values(&[kind, "banned"])
                .get()
        };

        let held = s.hold_ban_writes();
        let answer = purge_answered(parts.clone(), &inflight, Target::parse("h/a/*").unwrap());
        let stalled = StalledDisk::watch(s, probed.path());
        let answer = tokio::time::timeout(Duration::from_secs(5), answer).await;
        assert!(
            matches!(answer, Ok(Err(PurgeError::DiskStalled))),
            "{answer:?}"
        );
        assert!(
            s.purged_since_admitted("h/a/x", stored, &HeaderMap::new()),
            "in force"
        );
        assert_eq!(inflight.count(), 1, "still under way");
        assert_eq!(banned("prefix"), 0);
        let more = (1..MAX_STALLED_PURGES).map(|i| {
            let target = Target::parse(&format!("h/{i}/*")).unwrap();
            purge_answered(parts.clone(), &inflight, target)
        });
        for answer in futures::future::join_all(more).await {
            assert!(matches!(answer, Err(PurgeError::DiskStalled)), "{answer:?}");
        }
        let answer = purge_answered(parts.clone(), &inflight, Target::parse("h/z/*").unwrap());
        assert!(matches!(answer.await, Err(PurgeError::DiskBacklog)));
        assert!(
            !s.purged_since_admitted("h/z/x", stored, &HeaderMap::new()),
            "not applied"
        );
        assert_eq!(inflight.count(), MAX_STALLED_PURGES);
        let stalled_answers = parts
            .metrics
            .purges
            .with_label_values(&["prefix", "disk_stalled"]);
        assert_eq!(stalled_answers.get(), MAX_STALLED_PURGES as u64 + 1);

        drop(held);
        for _ in 0..500 {
            if inflight.count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(inflight.count(), 0);
        assert_eq!(s.purges_under_way().count(), 0);
        let written = MAX_STALLED_PURGES as u64;
        assert_eq!(banned("prefix"), written, "written once the disk answered");

        stalled.resume().await;
        let tags = Target::tags("h", &["t".into()]).unwrap();
        let held = s.hold_ban_writes();
        let mut answer = Box::pin(purge_answered(parts.clone(), &inflight, tags));
        let waited = tokio::time::timeout(Duration::from_millis(300), answer.as_mut()).await;
        assert!(waited.is_err(), "a disk that answers is waited for");
        drop(held);
        assert!(answer.await.unwrap());
        assert_eq!(banned("tag"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_on_a_stalled_disk_is_refused_not_held() {
        let (dir, probed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = small_storage(dir.path()).await;
        let held = s.hold_ban_writes();
        let mut waiting = Box::pin(refresh_recorded(s, "h/a"));
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "waits for the disk"
        );
        let stalled = StalledDisk::watch(s, probed.path());
        let answer = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(answer, Ok(None)), "{answer:?}");
        assert!(
            refresh_recorded(s, "h/b").await.is_none(),
            "refused at once"
        );
        drop(held);
        // The record the disk took late is ended with nothing to wait for.
        for _ in 0..500 {
            if !s.ended_refreshes().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(s.ended_refreshes().len(), 1);
        stalled.resume().await;
        let record = refresh_recorded(s, "h/c").await;
        assert!(matches!(record, Some(Ok(_))), "{record:?}");
    }

    #[test]
    fn parses_keys_and_prefixes() {
        assert_eq!(
            Target::parse("Example.com/a/b?x=1").unwrap(),
            Target::Key("example.com/a/b?x=1".into())
        );
        assert_eq!(
            Target::parse("example.com/static/*").unwrap(),
            Target::Prefix("example.com/static/".into())
        );
        assert!(Target::parse("example.com").is_err());
        assert!(Target::parse("/a").is_err());
        for empty in [":80/*", "./*", ":443/a"] {
            assert!(Target::parse(empty).is_err(), "{empty}");
        }
        for url in [
            "https://example.com/img/*",
            "user@example.com/x*",
            "a b/x",
            "example.com:/x",
            "example.com:80x/x",
            "[::1/x",
            "[zz]/x",
        ] {
            let e = Target::parse(url).unwrap_err();
            assert!(e.contains("not a host"), "{url}: {e}");
        }
        for (raw, key) in [
            ("example.com:8080/a", "example.com/a"),
            ("[::1]:8080/a", "[::1]/a"),
            ("[::1]/a", "[::1]/a"),
            ("Example.COM./a", "example.com/a"),
        ] {
            assert_eq!(
                Target::parse(raw).unwrap(),
                Target::Key(key.into()),
                "{raw}"
            );
        }
    }

    #[test]
    fn tag_targets_normalize_the_host_and_check_the_tags() {
        let tags = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        assert_eq!(
            Target::tags("Example.com", &tags(&["A", "b"])).unwrap(),
            Target::Tags {
                host: "example.com".into(),
                tags: tags(&["a", "b"]),
            }
        );
        assert!(Target::tags("example.com", &[]).is_err());
        assert!(Target::tags("a b", &tags(&["x"])).is_err());
        assert!(Target::tags("h/x", &tags(&["x"])).is_err());
        assert!(Target::tags("", &tags(&["x"])).is_err());
    }
}
