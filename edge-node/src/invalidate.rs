//! Purges, whether an operator asks over HTTP or the broker over QUIC: one object with every
//! Vary variant, every key under a prefix, or every object of a host carrying a tag (both
//! durable bans). An object purged is no longer a shadow either: its mark ends with it (a mark
//! knows the tags its fill saw).

use crate::metrics::EdgeMetrics;
use crate::origin::{normalize_host, OriginTable};
use crate::proxy::primary_key;
use crate::shadow::{self, ShadowTable};
use crate::storage::{BanError, FoyerStorage, NotDurable};
use crate::tags;

/// Why a purge is not final; the caller answers it as the edge's own failure (500), so the
/// purge is sent again.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// A prefix or tag ban could not be written durably.
    #[error(transparent)]
    Ban(#[from] BanError),
    /// A key's tombstone was not on disk in time, and no key ban could stand in for it.
    #[error(transparent)]
    NotDurable(#[from] NotDurable),
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
        // Checked as normalized: `:80` or `.` would otherwise become an empty host, whose
        // ban matches nothing yet answers as a purge.
        let host = normalize_host(host);
        if host.is_empty() {
            return Err("key has an empty host".into());
        }
        let key = primary_key(&host, &format!("/{rest}"));
        Ok(match key.strip_suffix('*') {
            Some(prefix) => Target::Prefix(prefix.to_string()),
            None => Target::Key(key),
        })
    }

    /// A tag purge of `host`'s objects.
    pub fn tags(host: &str, tags: &[String]) -> Result<Self, String> {
        let host = normalize_host(host).into_owned();
        if host.is_empty() || host.bytes().any(|b| !b.is_ascii_graphic() || b == b'/') {
            return Err(format!("host {host:?} is not a host name"));
        }
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
        Target::Prefix(prefix) => match off_runtime({
            let prefix = prefix.clone();
            move || storage.purge_prefix(&prefix)
        })
        .await
        {
            Ok(()) => {
                shadows.remove_prefix(prefix);
                metrics
                    .purges
                    .with_label_values(&["prefix", "banned"])
                    .inc();
                Ok(true)
            }
            Err(e) => {
                metrics.purges.with_label_values(&["prefix", "error"]).inc();
                Err(e)
            }
        },
        Target::Tags { host, tags } => {
            let host = format!("{host}/");
            let outcome = off_runtime({
                let (host, tags) = (host.clone(), tags.clone());
                move || storage.purge_tags(&host, &tags)
            })
            .await;
            if outcome.is_ok() {
                shadows.remove_tagged(&host, tags);
            }
            let label = if outcome.is_ok() { "banned" } else { "error" };
            metrics.purges.with_label_values(&["tag", label]).inc();
            outcome.map(|()| true)
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

/// A ban's durable write, off the async runtime ([`crate::storage::off_runtime`]).
async fn off_runtime(
    write: impl FnOnce() -> Result<(), BanError> + Send + 'static,
) -> Result<(), PurgeError> {
    Ok(crate::storage::off_runtime(write).await?)
}

/// A purge task that ended without its answer (it panicked): reported as the ban log's
/// failure ([`BanError::task_failed`]).
pub(crate) fn task_failed(e: tokio::task::JoinError) -> PurgeError {
    PurgeError::Ban(BanError::task_failed(e))
}

#[cfg(test)]
mod tests {
    use super::*;

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
