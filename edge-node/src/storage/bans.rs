//! Durable purge-by-prefix, purge-by-tag and key bans.
//!
//! foyer cannot enumerate its disk tier, so a prefix purge cannot find every object it covers.
//! Instead, like Varnish bans, it records "every object under this prefix stored before T is
//! gone". Lookups check an object against the bans newer than it and delete it on a match.
//! Bans are appended to a log and fsynced before the purge is acknowledged, so a restart
//! forgets none of them. Bans older than the retention are dropped; the newest dropped ban's
//! time becomes a floor for its host, and any object of that host stored before the floor is
//! treated as a miss, so dropping a ban can never resurrect what it covered — and an old purge
//! of one host never flushes another's long-lived objects.
//!
//! A tag ban ([`crate::tags`]) is the same with "carrying this tag" for "under this prefix":
//! it covers the objects of its host stored before it whose stored response names the tag.
//!
//! A key ban covers one key exactly. It makes a key purge durable when the disk tier has not
//! written the purge's tombstone in time ([`super::FoyerStorage::settle_purge`]): a crash would
//! otherwise find the object on disk again. Once a later wait covers that tombstone, the ban is
//! no longer needed and the next compaction retires it without raising its host's floor; a key
//! ban read back from the log (a crash came first) stays until the retention, like the others.
//!
//! A refresh record is a key ban that sleeps while the process lives. An edge accepts a
//! refresh of a copy whose origin changed and queues it in memory, serving the held copy until
//! the new one replaces it; a crash before then would leave the replaced version on disk,
//! served as fresh after the restart. So the accepted refresh is logged first, as a `refresh`
//! line that covers nothing here but reads back as a key ban after a restart. Once the refresh
//! has ended (its new copy committed, or the old one purged) and a later wait has shown the
//! disk tier written, the next compaction drops the line
//! ([`BanList::end_refresh`], [`BanList::refreshes_written`]). A record under way or ended when a
//! disk write failed stays until the retention, like a key ban, and raises its host's floor
//! when it expires ([`BanList::keep_for_retention`]).
//!
//! Bans and floors are kept per scope, the key's host part up to the first `/`, so a hit only
//! checks the bans of its own host (a host's tags are its own: one provider's purge never
//! reaches another's objects). A host's floor is also raised when the host is registered
//! anew ([`crate::ownership`]); the log remembers which registration each host last applied
//! (`owner` lines) so that it is applied once.
//!
//! Every log line reads `<kind> <ms> <host>/…` (a prefix ban's prefix may stop inside the
//! host). A line of a kind this version does not know (written by a newer one, read after a
//! downgrade) raises its host's floor to its time: the host's older objects are dropped rather
//! than something a newer purge removed served again.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use parking_lot::{Mutex, RwLock};

use crate::tags;

/// Log lines of bans in force that are not yet known to be on disk ([`BanList::write`]).
#[must_use = "a ban not written is lost at the next restart"]
#[derive(Debug)]
pub struct Unwritten(String);

/// Why the ban log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    /// Filesystem failure.
    #[error("ban log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl BanError {
    /// A blocking task writing the log ended without its answer (it panicked): reported as
    /// the log's failure, which callers answer as the edge's own (500), so it is asked again.
    pub(crate) fn task_failed(e: tokio::task::JoinError) -> Self {
        BanError::Io {
            path: "bans.log".into(),
            source: std::io::Error::other(e),
        }
    }
}

/// Run a write of the ban log (an fsync, which a busy disk can stretch to seconds) off the
/// async runtime: the QUIC service and the admin API each run on one thread, which every
/// other request, probe and peer transfer of theirs shares.
pub(crate) async fn off_runtime<T: Send + 'static>(
    write: impl FnOnce() -> Result<T, BanError> + Send + 'static,
) -> Result<T, BanError> {
    tokio::task::spawn_blocking(write)
        .await
        .unwrap_or_else(|e| Err(BanError::task_failed(e)))
}

/// A refresh's record in the ban log, held by the refresh until it ends; dropping it tells
/// the log ([`BanList::end_refresh`]).
#[derive(Debug)]
pub struct RefreshRecord {
    bans: Arc<BanList>,
    id: u64,
}

impl RefreshRecord {
    /// Record, durably and off the async runtime, that a refresh of `key` was accepted.
    pub(crate) async fn add(bans: Arc<BanList>, key: &str) -> Result<Self, BanError> {
        let (log, key) = (bans.clone(), key.to_string());
        let id = off_runtime(move || log.add_refresh(&key)).await?;
        Ok(RefreshRecord { bans, id })
    }
}

impl PartialEq for RefreshRecord {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for RefreshRecord {}

impl Drop for RefreshRecord {
    fn drop(&mut self) {
        self.bans.end_refresh(self.id);
    }
}

/// A host's floor raised for a registration of the host (see [`crate::ownership`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerChange {
    /// The host's key scope: the host as keys spell it, with its `/`.
    pub scope: String,
    /// Objects of the host stored before this are absent from now on.
    pub floor: SystemTime,
    /// The registration this applies, remembered so it is applied once; `None` leaves the
    /// remembered one as it is.
    pub registered_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct Ban {
    target: Banned,
    /// Milliseconds since the epoch.
    at_ms: u64,
}

/// What a ban covers.
#[derive(Debug, Clone)]
enum Banned {
    /// Keys starting with this.
    Prefix(String),
    /// Objects of scope `scope` whose response carries `tag` (lower-cased).
    Tag { scope: String, tag: String },
    /// This primary key exactly. `mark` is the tombstone count the purge's wait covered in
    /// this process (retired once a completed wait covers it); `None` when read from the log.
    Key { key: String, mark: Option<u64> },
    /// A refresh of this key accepted in this process ([`BanList::add_refresh`]): covers
    /// nothing until read back after a restart, as a key ban.
    Refresh { key: String, id: u64 },
}

/// Where a refresh of this process stands, by its record's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefreshState {
    /// Queued or running: a crash now leaves the replaced copy on disk.
    Live,
    /// Ended; its writes (the new copy, or the old one's tombstone) may still be in flight.
    Ended,
    /// Ended before a completed wait for the disk tier began: the record can go.
    Written,
    /// Under way or ended when a disk write failed: no wait proves its writes, so it stays
    /// until the retention, like a ban ([`BanList::keep_for_retention`]).
    Kept,
}

impl Ban {
    fn scope(&self) -> &str {
        match &self.target {
            Banned::Prefix(p) => scope(p),
            Banned::Tag { scope, .. } => scope,
            Banned::Key { key, .. } | Banned::Refresh { key, .. } => scope(key),
        }
    }

    /// Whether it is a key ban whose tombstone a completed wait covered (`written` tombstones
    /// are on disk), or the record of a refresh whose writes are on disk: nothing left for it
    /// to stand in for.
    fn retired(&self, written: u64, refreshes: &HashMap<u64, RefreshState>) -> bool {
        match &self.target {
            Banned::Key {
                mark: Some(mark), ..
            } => *mark <= written,
            Banned::Refresh { id, .. } => refreshes
                .get(id)
                .is_none_or(|r| *r == RefreshState::Written),
            _ => false,
        }
    }

    /// The ban's log line.
    fn line(&self) -> String {
        match &self.target {
            Banned::Prefix(p) => format!("ban {} {p}\n", self.at_ms),
            Banned::Tag { scope, tag } => format!("tag {} {scope} {tag}\n", self.at_ms),
            Banned::Key { key, .. } => format!("key {} {key}\n", self.at_ms),
            Banned::Refresh { key, .. } => format!("refresh {} {key}\n", self.at_ms),
        }
    }
}

/// The bans of one scope, indexed so that a lookup costs at most one hash probe per distinct
/// ban prefix length, however many bans a host has (an hour of frequent prefix purges on
/// one host would otherwise be scanned on every hit of that host).
#[derive(Debug, Default)]
struct ScopeBans {
    /// Every ban, in the order it was recorded (the log's order).
    all: Vec<Ban>,
    /// The newest ban time of each prefix.
    newest: HashMap<String, u64>,
    /// The distinct lengths of the prefixes in `newest`, ascending.
    lengths: Vec<usize>,
    /// The newest ban time of each tag.
    tags: HashMap<String, u64>,
    /// The newest ban time of each key banned exactly.
    keys: HashMap<String, u64>,
}

impl ScopeBans {
    fn push(&mut self, ban: Ban) {
        match &ban.target {
            Banned::Prefix(prefix) => {
                let at = self.newest.entry(prefix.clone()).or_default();
                *at = (*at).max(ban.at_ms);
                if let Err(i) = self.lengths.binary_search(&prefix.len()) {
                    self.lengths.insert(i, prefix.len());
                }
            }
            Banned::Tag { tag, .. } => {
                let at = self.tags.entry(tag.clone()).or_default();
                *at = (*at).max(ban.at_ms);
            }
            Banned::Key { key, .. } => {
                let at = self.keys.entry(key.clone()).or_default();
                *at = (*at).max(ban.at_ms);
            }
            Banned::Refresh { .. } => {}
        }
        self.all.push(ban);
    }

    /// Drop the bans older than `horizon`, and the key bans whose tombstones a completed wait
    /// covered (`written`: their purges are on disk, nothing for a floor to stand in for);
    /// the times just past each ban dropped for its age.
    fn expire(
        &mut self,
        horizon: u64,
        written: u64,
        refreshes: &HashMap<u64, RefreshState>,
    ) -> Vec<u64> {
        let mut expired = Vec::new();
        let before = self.all.len();
        self.all.retain(|b| {
            if b.retired(written, refreshes) {
                return false;
            }
            // A refresh of this process not yet written stays past the retention: it covers
            // nothing here, and dropping it would raise its host's floor.
            if let Banned::Refresh { id, .. } = &b.target {
                if refreshes.get(id).is_some_and(|r| *r != RefreshState::Kept) {
                    return true;
                }
            }
            let keep = b.at_ms >= horizon;
            if !keep {
                expired.push(b.at_ms + 1);
            }
            keep
        });
        if self.all.len() < before {
            self.newest.clear();
            self.lengths.clear();
            self.tags.clear();
            self.keys.clear();
            for b in std::mem::take(&mut self.all) {
                self.push(b);
            }
        }
        expired
    }

    /// Whether a ban at or after `stored_ms` names `key`, has a prefix of it or a tag of the
    /// stored response's `headers`.
    fn covers(&self, key: &str, stored_ms: u64, headers: &HeaderMap) -> bool {
        if !self.keys.is_empty() && self.keys.get(key).is_some_and(|at| *at >= stored_ms) {
            return true;
        }
        let by_prefix = self
            .lengths
            .iter()
            .take_while(|l| **l <= key.len())
            .any(|&l| {
                key.get(..l)
                    .and_then(|p| self.newest.get(p))
                    .is_some_and(|at| *at >= stored_ms)
            });
        by_prefix
            || (!self.tags.is_empty()
                && tags::any(headers, |t| {
                    self.tags.get(t).is_some_and(|at| *at >= stored_ms)
                }))
    }
}

#[derive(Debug, Default)]
struct State {
    /// Bans by scope (`host/`); bans whose prefix has no `/` apply to every key and sit
    /// under the empty scope.
    bans: HashMap<String, ScopeBans>,
    /// Floors by scope; the empty scope's floor applies to every key.
    floors: HashMap<String, u64>,
    /// The registration time (the broker's `registered_at_ms`) last applied to each host
    /// scope, so that a host's floor moves once per registration, not on every push.
    owners: HashMap<String, u64>,
    /// The refreshes accepted in this process whose records are still in the log.
    refreshes: HashMap<u64, RefreshState>,
}

/// The scope of a key or ban prefix: up to and including its first `/`, or `""` when it has
/// none (a ban prefix that stops inside the host applies everywhere).
fn scope(s: &str) -> &str {
    s.find('/').map_or("", |i| &s[..=i])
}

impl State {
    fn push(&mut self, ban: Ban) {
        self.bans
            .entry(ban.scope().to_string())
            .or_default()
            .push(ban);
    }

    fn raise_floor(&mut self, scope: &str, at_ms: u64) {
        let f = self.floors.entry(scope.to_string()).or_default();
        *f = (*f).max(at_ms);
    }

    fn len(&self) -> usize {
        self.bans.values().map(|b| b.all.len()).sum()
    }
}

/// The ban list and its log.
#[derive(Debug)]
pub struct BanList {
    path: PathBuf,
    state: RwLock<State>,
    writer: Mutex<LogWriter>,
    retention: Duration,
    /// The last refresh record's id.
    last_refresh: std::sync::atomic::AtomicU64,
}

/// The log's append handle.
#[derive(Debug)]
struct LogWriter {
    file: File,
    /// A failed append left a partial line that could not be cut off: the next append starts
    /// on a new line, so it is not glued to that fragment and lost with it.
    torn: bool,
}

fn now_ms() -> u64 {
    millis(SystemTime::now())
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A key, prefix or scope as the log can hold it: every line's last field, so anything but a
/// line break (which would corrupt the log) may stay.
fn one_line(s: &str) -> String {
    s.chars().filter(|c| *c != '\n' && *c != '\r').collect()
}

/// Drop a torn last line (a crash mid-append: never acknowledged) so that the next ban is
/// not appended to it and lost with it; the length of the complete lines.
fn cut_torn_tail(path: &Path) -> std::io::Result<u64> {
    let bytes = fs::read(path)?;
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(complete as u64)?;
        f.sync_all()?;
    }
    Ok(complete as u64)
}

impl BanList {
    /// Open (or create) the ban log in `dir`, dropping bans older than `retention`.
    pub fn open(dir: &Path, retention: Duration) -> Result<Self, BanError> {
        let path = dir.join("bans.log");
        let io = |source| BanError::Io {
            path: path.clone(),
            source,
        };
        let mut state = State::default();
        let mut unknown = 0;
        if path.exists() {
            let complete = cut_torn_tail(&path).map_err(io)?;
            let f = File::open(&path).map_err(io)?;
            for line in BufReader::new(f.take(complete)).lines() {
                let line = line.map_err(io)?;
                let Some((kind, rest)) = line.split_once(' ') else {
                    continue;
                };
                let Some((at, prefix)) = rest.split_once(' ') else {
                    continue;
                };
                let Ok(at_ms) = at.parse::<u64>() else {
                    continue;
                };
                match kind {
                    // `-` is the global floor (also what logs before per-host floors wrote).
                    "floor" if prefix == "-" => state.raise_floor("", at_ms),
                    "floor" => state.raise_floor(prefix, at_ms),
                    "owner" => {
                        state.owners.insert(prefix.to_string(), at_ms);
                    }
                    "ban" => state.push(Ban {
                        target: Banned::Prefix(prefix.to_string()),
                        at_ms,
                    }),
                    // A refresh accepted before a crash: the copy it was to replace is on
                    // disk, and a copy it stored is newer than the line.
                    "key" | "refresh" => state.push(Ban {
                        target: Banned::Key {
                            key: prefix.to_string(),
                            mark: None,
                        },
                        at_ms,
                    }),
                    "tag" => {
                        // Without its tag, a fragment of a failed append (never acknowledged).
                        if let Some((scope, tag)) = prefix.split_once(' ') {
                            state.push(Ban {
                                target: Banned::Tag {
                                    scope: scope.to_string(),
                                    tag: tag.to_string(),
                                },
                                at_ms,
                            });
                        }
                    }
                    _ => {
                        // A newer version's kind of ban: whatever it removed, it removed from
                        // its host at `at_ms`, so the host's objects stored before then go —
                        // too much dropped rather than anything purged served again. A line
                        // without a host is a fragment of a failed append instead.
                        let target = prefix.split(' ').next().unwrap_or_default();
                        if target.contains('/') {
                            state.raise_floor(scope(target), at_ms);
                            unknown += 1;
                        }
                    }
                }
            }
        }
        if unknown > 0 {
            tracing::warn!(
                path = %path.display(),
                lines = unknown,
                "ban log lines of an unknown kind: their hosts' older objects are treated as purged"
            );
        }
        let created = !path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        // A new log's directory entry is made durable now: the first ban's fsync covers the
        // file's content, not its name.
        if created {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let dir = dir.unwrap_or(std::path::Path::new("."));
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        let list = BanList {
            writer: Mutex::new(LogWriter { file, torn: false }),
            path,
            state: RwLock::new(state),
            retention,
            last_refresh: Default::default(),
        };
        list.compact(0)?;
        Ok(list)
    }

    /// Ban every object whose primary key starts with `prefix`, durably ([`Self::ban`], then
    /// [`Self::write`]).
    #[cfg(test)]
    pub fn add(&self, prefix: &str) -> Result<(), BanError> {
        self.write(self.ban(prefix))
    }

    /// Ban every object whose primary key starts with `prefix`: in force from now on,
    /// durable once [`Self::write`] has recorded it.
    pub fn ban(&self, prefix: &str) -> Unwritten {
        self.apply(vec![Banned::Prefix(one_line(prefix))])
    }

    /// Ban every object of host scope `scope` (`host/`) whose response carries one of `tags`:
    /// in force from now on, durable once [`Self::write`] has recorded it (one fsync for all
    /// the tags). The tags must have passed [`tags::check`] (lower-case, no spaces) and the
    /// scope must hold no space: both are log fields.
    pub fn ban_tags(&self, scope: &str, tags: &[String]) -> Unwritten {
        let scope = one_line(scope);
        self.apply(
            tags.iter()
                .map(|tag| Banned::Tag {
                    scope: scope.clone(),
                    tag: one_line(tag),
                })
                .collect(),
        )
    }

    /// Record bans already in force ([`Self::ban`], [`Self::ban_tags`]) durably, with one
    /// fsync. A ban whose write fails stays in force until the next restart (and is recorded
    /// if a compaction rewrites the log before it): it was asked for, and a purge answered
    /// failed is asked again.
    pub fn write(&self, bans: Unwritten) -> Result<(), BanError> {
        self.record(bans.0, |_| {})
    }

    /// Record a ban on the objects stored before `at` under exactly these primary keys,
    /// durably, with one fsync: the purges whose tombstones are not known written. Each key's
    /// mark is the tombstone count its wait was to cover: a compaction after a wait covering
    /// it completed retires the ban ([`Self::compact`]); `None` when no wait ever will (the
    /// cache was closing and dropped the removal, or a disk write failed).
    ///
    /// `marks_hold` is asked once the bans are on disk, under the lock [`Self::keep_for_retention`]
    /// takes: when it says no (a disk write failed since the marks were decided), the marks
    /// are dropped, so a ban recorded while a failure is being taken note of is kept too.
    pub fn add_keys(
        &self,
        keys: &[(&str, Option<u64>)],
        at: SystemTime,
        marks_hold: impl FnOnce() -> bool,
    ) -> Result<(), BanError> {
        let at_ms = millis(at);
        let bans: Vec<Ban> = keys
            .iter()
            .map(|(key, mark)| Ban {
                target: Banned::Key {
                    key: one_line(key),
                    mark: *mark,
                },
                at_ms,
            })
            .collect();
        let lines: String = bans.iter().map(Ban::line).collect();
        self.record(lines, |s| {
            let hold = marks_hold();
            for mut b in bans {
                if let (false, Banned::Key { mark, .. }) = (hold, &mut b.target) {
                    *mark = None;
                }
                s.push(b);
            }
        })
    }

    /// Keep every key ban and refresh record of this process until the retention: a disk
    /// write failed, and the late tombstones the bans stand in for, or the writes of the
    /// refreshes (new copies, old copies' tombstones), may have been among the failures, so
    /// no later wait proves them written.
    pub fn keep_for_retention(&self) {
        let mut s = self.state.write();
        for b in s.bans.values_mut().flat_map(|b| b.all.iter_mut()) {
            if let Banned::Key { mark, .. } = &mut b.target {
                *mark = None;
            }
        }
        // A record a clean wait already proved written stays proved.
        for r in s
            .refreshes
            .values_mut()
            .filter(|r| **r != RefreshState::Written)
        {
            *r = RefreshState::Kept;
        }
    }

    /// Record, durably, that a refresh of primary key `key` was accepted now; the record's id.
    /// Until [`Self::end_refresh`] and [`Self::refreshes_written`], a restart reads it back
    /// as a ban on the copies of `key` stored before now.
    pub fn add_refresh(&self, key: &str) -> Result<u64, BanError> {
        let id = self.last_refresh.fetch_add(1, Ordering::Relaxed) + 1;
        let ban = Ban {
            target: Banned::Refresh {
                key: one_line(key),
                id,
            },
            at_ms: now_ms(),
        };
        self.record(ban.line(), |s| {
            s.refreshes.insert(id, RefreshState::Live);
            s.push(ban);
        })?;
        Ok(id)
    }

    /// Refresh `id` ended: its new copy is committed, or its old one purged.
    pub fn end_refresh(&self, id: u64) {
        if let Some(r) = self.state.write().refreshes.get_mut(&id) {
            if *r == RefreshState::Live {
                *r = RefreshState::Ended;
            }
        }
    }

    /// The refreshes ended so far ([`Self::end_refresh`]), for [`Self::refreshes_written`]
    /// once a wait for the disk tier that starts after this call completes.
    pub fn ended_refreshes(&self) -> Vec<u64> {
        let s = self.state.read();
        s.refreshes
            .iter()
            .filter(|(_, r)| **r == RefreshState::Ended)
            .map(|(id, _)| *id)
            .collect()
    }

    /// A completed wait covered the writes of refreshes `ids`: the next compaction drops
    /// their records.
    pub fn refreshes_written(&self, ids: &[u64]) {
        let mut s = self.state.write();
        for id in ids {
            if let Some(r) = s.refreshes.get_mut(id) {
                *r = RefreshState::Written;
            }
        }
    }

    /// The keys of the key bans a compaction with `tombstones_written` would retire.
    pub fn written_keys(&self, tombstones_written: u64) -> Vec<String> {
        let s = self.state.read();
        s.bans
            .values()
            .flat_map(|b| &b.all)
            .filter(|b| b.retired(tombstones_written, &s.refreshes))
            .filter_map(|b| match &b.target {
                Banned::Key { key, .. } => Some(key.clone()),
                _ => None,
            })
            .collect()
    }

    /// Put prefix or tag bans in force at once, before they are on disk: a disk that stalls
    /// must not keep serving what a purge removed for as long as the stall lasts. (A
    /// compaction that runs before their append records them too; the append then repeats
    /// them, which reads back the same.)
    fn apply(&self, targets: Vec<Banned>) -> Unwritten {
        let at_ms = now_ms();
        let bans: Vec<Ban> = targets
            .into_iter()
            .map(|target| Ban { target, at_ms })
            .collect();
        let lines: String = bans.iter().map(Ban::line).collect();
        let mut s = self.state.write();
        bans.into_iter().for_each(|b| s.push(b));
        Unwritten(lines)
    }

    /// The registration time last applied to host scope `scope` (see [`OwnerChange`]).
    pub fn owner(&self, scope: &str) -> Option<u64> {
        self.state.read().owners.get(scope).copied()
    }

    /// Apply `changes` durably, with one fsync: each raises its scope's floor (never lowers
    /// it) and, when it carries one, records the registration it applies.
    pub fn apply_owner_changes(&self, changes: &[OwnerChange]) -> Result<(), BanError> {
        let changes: Vec<(String, u64, Option<u64>)> = changes
            .iter()
            .map(|c| (one_line(&c.scope), millis(c.floor), c.registered_ms))
            .collect();
        let mut lines = String::new();
        for (scope, floor, registered) in &changes {
            lines.push_str(&format!("floor {floor} {scope}\n"));
            if let Some(r) = registered {
                lines.push_str(&format!("owner {r} {scope}\n"));
            }
        }
        if lines.is_empty() {
            return Ok(());
        }
        self.record(lines, |s| {
            for (scope, floor, registered) in changes {
                s.raise_floor(&scope, floor);
                if let Some(r) = registered {
                    s.owners.insert(scope, r);
                }
            }
        })
    }

    /// Hold every append of the log while the returned guard lives, as a hung fsync does.
    #[cfg(test)]
    pub(crate) fn hold_writes(&self) -> impl Sized + '_ {
        self.writer.lock()
    }

    /// Make every append fail (`broken`), as on a full disk, or work again.
    #[cfg(test)]
    pub(crate) fn break_appends(&self, broken: bool) {
        let mut opts = OpenOptions::new();
        if broken {
            opts.read(true);
        } else {
            opts.append(true);
        }
        self.writer.lock().file = opts.open(&self.path).unwrap();
    }

    /// Append `line` to the log durably, then `apply` it to the state, holding the writer's
    /// lock throughout: a compaction in between would rewrite the log from a state without
    /// it, and it would not survive a restart. (Prefix and tag bans are in the state
    /// already, [`Self::apply`].)
    ///
    /// A failed append is cut off the log again, so the next one does not land on the end of
    /// a partial line (which would read back as one garbled line and lose the next ban).
    fn record(&self, line: String, apply: impl FnOnce(&mut State)) -> Result<(), BanError> {
        let mut w = self.writer.lock();
        let before = w.file.metadata().map(|m| m.len());
        let text = if w.torn { format!("\n{line}") } else { line };
        let written = w
            .file
            .write_all(text.as_bytes())
            .and_then(|_| w.file.sync_data());
        if let Err(source) = written {
            let cut = before.and_then(|len| w.file.set_len(len));
            w.torn = cut.is_err();
            return Err(BanError::Io {
                path: self.path.clone(),
                source,
            });
        }
        w.torn = false;
        apply(&mut self.state.write());
        Ok(())
    }

    /// Whether an object with `key`, stored at `stored` with response `headers` (where its
    /// tags are), is covered by a ban (or predates the floor) and must be treated as absent.
    pub fn is_banned(&self, key: &str, stored: SystemTime, headers: &HeaderMap) -> bool {
        let stored_ms = millis(stored);
        let s = self.state.read();
        if s.bans.is_empty() && s.floors.is_empty() {
            return false;
        }
        let scopes = [scope(key), ""];
        scopes.iter().any(|sc| {
            s.floors.get(*sc).is_some_and(|f| stored_ms < *f)
                || s.bans
                    .get(*sc)
                    .is_some_and(|b| b.covers(key, stored_ms, headers))
        })
    }

    /// Number of bans currently held (refresh records, which ban nothing here, aside).
    pub fn len(&self) -> usize {
        let s = self.state.read();
        s.len().saturating_sub(s.refreshes.len())
    }

    /// Number of refresh records in the log ([`Self::add_refresh`]).
    pub fn refresh_records(&self) -> usize {
        self.state.read().refreshes.len()
    }

    /// Whether there are no bans.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drop expired bans (raising their hosts' floors) and the key bans whose tombstones are
    /// known written (`tombstones_written`, see [`Self::add_keys`]), and rewrite the log
    /// atomically.
    ///
    /// The state's lock, which every cache hit reads, is held only to expire and serialise;
    /// the file work holds the writer's lock alone, which keeps appends out until the new log
    /// is in place. The new log's append handle is opened before the rename, so nothing can
    /// fail between the rename and the swap and leave appends going to the unlinked old file.
    pub fn compact(&self, tombstones_written: u64) -> Result<(), BanError> {
        let io = |source| BanError::Io {
            path: self.path.clone(),
            source,
        };
        let horizon = now_ms().saturating_sub(self.retention.as_millis() as u64);
        let mut w = self.writer.lock();
        let contents = {
            let mut s = self.state.write();
            let before = s.len();
            let mut expired: Vec<(String, u64)> = Vec::new();
            let State {
                bans, refreshes, ..
            } = &mut *s;
            for (sc, bans) in bans.iter_mut() {
                expired.extend(
                    bans.expire(horizon, tombstones_written, refreshes)
                        .into_iter()
                        .map(|at| (sc.clone(), at)),
                );
            }
            s.bans.retain(|_, bans| !bans.all.is_empty());
            let recorded: std::collections::HashSet<u64> = (s.bans.values())
                .flat_map(|b| &b.all)
                .filter_map(|b| match b.target {
                    Banned::Refresh { id, .. } => Some(id),
                    _ => None,
                })
                .collect();
            s.refreshes.retain(|id, _| recorded.contains(id));
            for (sc, at) in expired {
                s.raise_floor(&sc, at);
            }
            if before == s.len() && self.path.exists() {
                return Ok(());
            }
            let mut text = String::new();
            for (sc, at) in &s.floors {
                let sc = if sc.is_empty() { "-" } else { sc.as_str() };
                text.push_str(&format!("floor {at} {sc}\n"));
            }
            for (sc, r) in &s.owners {
                text.push_str(&format!("owner {r} {sc}\n"));
            }
            for b in s.bans.values().flat_map(|b| &b.all) {
                text.push_str(&b.line());
            }
            text
        };
        let tmp = self.path.with_extension("log.tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(contents.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        let appender = OpenOptions::new().append(true).open(&tmp).map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)?;
        *w = LogWriter {
            file: appender,
            torn: false,
        };
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use super::*;

    /// A key ban whose marks no longer hold once it is on disk (a disk write failed since
    /// they were decided) keeps no mark: no wait retires it.
    #[test]
    fn a_key_ban_whose_marks_no_longer_hold_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        b.add_keys(&[("h/a", Some(1))], SystemTime::now(), || false)
            .unwrap();
        b.add_keys(&[("h/b", Some(1))], SystemTime::now(), || true)
            .unwrap();
        b.compact(u64::MAX).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b.written_keys(u64::MAX), Vec::<String>::new());
        assert!(b.is_banned("h/a", SystemTime::now() - Duration::from_secs(1), &NO_TAGS));
    }

    /// A refresh's record covers nothing while its process lives: the held copy is served
    /// until the refresh replaces it. Read back after a crash it is a ban on the copies stored
    /// before it. Once the refresh ended and a wait showed its writes on disk, a compaction
    /// drops it; a live one, or one only ended, stays.
    #[test]
    fn a_refresh_record_sleeps_until_a_restart_and_goes_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(5);
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let (done, live) = (
            b.add_refresh("h/done").unwrap(),
            b.add_refresh("h/live").unwrap(),
        );
        assert_ne!(done, live);
        assert!(
            !b.is_banned("h/done", old, &NO_TAGS),
            "asleep in this process"
        );
        let reopened = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(
            reopened.is_banned("h/done", old, &NO_TAGS),
            "read back after a crash"
        );
        assert!(reopened.is_banned("h/live", old, &NO_TAGS));
        assert!(!reopened.is_banned(
            "h/done",
            SystemTime::now() + Duration::from_secs(5),
            &NO_TAGS
        ));
        drop(reopened);
        b.end_refresh(done);
        b.compact(0).unwrap();
        assert_eq!(
            b.refresh_records(),
            2,
            "ended, but its writes may still be in flight"
        );
        assert_eq!(b.len(), 0, "records ban nothing here");
        assert_eq!(b.ended_refreshes(), [done]);
        b.refreshes_written(&[done]);
        b.compact(0).unwrap();
        assert_eq!(b.refresh_records(), 1);
        assert!(
            b.written_keys(u64::MAX).is_empty(),
            "not a key ban: its copy is the new one"
        );
        let reopened = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(
            !reopened.is_banned("h/done", old, &NO_TAGS),
            "gone from the log"
        );
        assert!(reopened.is_banned("h/live", old, &NO_TAGS));
    }

    static NO_TAGS: LazyLock<HeaderMap> = LazyLock::new(HeaderMap::new);

    fn tagged(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("surrogate-key", value.parse().unwrap());
        h
    }

    /// A key ban covers its key exactly, in objects stored before it. It survives a reopen
    /// (a crash before its tombstone was written). A compaction retires it once a completed
    /// wait covers its mark, without raising its host's floor, durably; one read back from the
    /// log is kept whatever the marks say.
    #[test]
    fn key_bans_cover_one_key_until_their_tombstones_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        let later = SystemTime::now() + Duration::from_secs(1);
        let open = || BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        {
            let b = open();
            b.add_keys(
                &[("h/a?x=1", Some(5)), ("h/b", Some(5))],
                SystemTime::now(),
                || true,
            )
            .unwrap();
            assert!(b.is_banned("h/a?x=1", old, &NO_TAGS));
            assert!(b.is_banned("h/b", old, &NO_TAGS));
            assert!(!b.is_banned("h/b", later, &NO_TAGS), "stored after the ban");
            assert!(!b.is_banned("h/bc", old, &NO_TAGS), "a key, not a prefix");
            assert!(!b.is_banned("h/a", old, &NO_TAGS));
            assert!(!b.is_banned("g/b", old, &NO_TAGS), "another host");
            b.compact(4).unwrap();
            assert_eq!(b.len(), 2, "no wait covered them yet");
        }
        let b = open();
        assert_eq!(b.len(), 2);
        assert!(b.is_banned("h/b", old, &NO_TAGS), "read back after a crash");
        b.compact(u64::MAX).unwrap();
        assert_eq!(b.len(), 2, "read back: not known to be written");
        b.add_keys(&[("h/c", Some(7))], SystemTime::now(), || true)
            .unwrap();
        assert!(b.is_banned("h/c", old, &NO_TAGS));
        assert!(!b.is_banned("h/c", later, &NO_TAGS));
        assert_eq!(b.written_keys(7), ["h/c"]);
        b.compact(7).unwrap();
        assert_eq!(b.len(), 2);
        assert!(!b.is_banned("h/c", old, &NO_TAGS), "retired");
        drop(b);
        let b = open();
        assert_eq!(b.len(), 2, "the retirement was written");
        assert!(!b.is_banned("h/c", old, &NO_TAGS));
        assert!(b.is_banned("h/a?x=1", old, &NO_TAGS));
    }

    /// A key ban retired (its tombstone written) raises no floor, even past the retention; one
    /// whose tombstone is still owed expires into its host's floor like any ban.
    #[test]
    fn a_retired_key_ban_raises_no_floor() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        let b = BanList::open(dir.path(), Duration::from_millis(20)).unwrap();
        b.add_keys(&[("a/k", Some(7))], SystemTime::now(), || true)
            .unwrap();
        b.add_keys(&[("b/k", Some(9))], SystemTime::now(), || true)
            .unwrap();
        std::thread::sleep(Duration::from_millis(40));
        b.compact(7).unwrap();
        assert!(b.is_empty());
        assert!(!b.is_banned("a/other", old, &NO_TAGS), "retired: no floor");
        assert!(b.is_banned("b/other", old, &NO_TAGS), "expired: a floor");
    }

    /// A tag ban covers the older objects of its own host whose response names the tag, in
    /// any case, through a reopen and a compaction; its expiry raises the host's floor as a
    /// prefix ban's does.
    #[test]
    fn tag_bans_cover_their_hosts_tagged_objects_only() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        let later = SystemTime::now() + Duration::from_secs(1);
        let (product, other) = (tagged("Home product-42"), tagged("product-7"));
        let check = |b: &BanList| {
            assert!(b.is_banned("h/p/42", old, &product));
            assert!(
                !b.is_banned("h/p/42", later, &product),
                "stored after the ban"
            );
            assert!(!b.is_banned("h/p/7", old, &other), "another tag");
            assert!(!b.is_banned("h/p/none", old, &NO_TAGS), "untagged");
            assert!(!b.is_banned("g/p/42", old, &product), "another host");
        };
        {
            let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
            b.write(b.ban_tags("h/", &["product-42".into(), "gone".into()]))
                .unwrap();
            assert_eq!(b.len(), 2);
            check(&b);
        }
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        check(&b);
        b.add("h/unrelated/").unwrap();
        b.compact(0).unwrap();
        drop(b);
        check(&BanList::open(dir.path(), Duration::from_secs(3600)).unwrap());
        std::thread::sleep(Duration::from_millis(5));
        let b = BanList::open(dir.path(), Duration::from_millis(1)).unwrap();
        assert!(b.is_empty(), "expired");
        assert!(
            b.is_banned("h/p/7", old, &other),
            "the floor covers the host"
        );
        assert!(!b.is_banned("g/p/42", old, &product));
    }

    /// The prefix index answers exactly as scanning every ban would, for prefixes of many
    /// lengths (some not on a character boundary of the key), before and after expiry.
    #[test]
    fn the_index_agrees_with_a_scan_of_every_ban() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let keys = [
            "h/",
            "h/a",
            "h/a/b",
            "h/ab/c?x=1",
            "h/é/x",
            "h/éa",
            "g/a/b",
            "h",
            "hx/a",
        ];
        let mut state = State::default();
        let mut plain: Vec<Ban> = Vec::new();
        for _ in 0..300 {
            let key = keys[rng.gen_range(0..keys.len())];
            let cut = rng.gen_range(0..=key.len());
            let prefix = String::from_utf8_lossy(&key.as_bytes()[..cut]).into_owned();
            let target = if rng.gen_range(0..3) == 0 {
                Banned::Key {
                    key: key.to_string(),
                    mark: rng.gen_bool(0.5).then(|| rng.gen_range(0..10)),
                }
            } else {
                Banned::Prefix(prefix)
            };
            let ban = Ban {
                target,
                at_ms: rng.gen_range(0..1_000),
            };
            plain.push(ban.clone());
            state.push(ban);
        }
        let scan = |plain: &[Ban], key: &str, at: u64| {
            plain.iter().any(|b| {
                b.at_ms >= at
                    && match &b.target {
                        Banned::Prefix(p) => key.starts_with(p.as_str()),
                        Banned::Key { key: k, .. } => k == key,
                        Banned::Tag { .. } | Banned::Refresh { .. } => false,
                    }
            })
        };
        let indexed = |state: &State, key: &str, at: u64| {
            [scope(key), ""].iter().any(|sc| {
                state
                    .bans
                    .get(*sc)
                    .is_some_and(|b| b.covers(key, at, &NO_TAGS))
            })
        };
        let agree = |state: &State, plain: &[Ban]| {
            for key in keys {
                for at in (0..1_050).step_by(7) {
                    assert_eq!(indexed(state, key, at), scan(plain, key, at), "{key} {at}");
                }
            }
        };
        agree(&state, &plain);
        for b in state.bans.values_mut() {
            b.expire(500, 5, &HashMap::new());
        }
        plain.retain(|b| {
            b.at_ms >= 500 && !matches!(b.target, Banned::Key { mark: Some(m), .. } if m <= 5)
        });
        assert_eq!(state.len(), plain.len());
        agree(&state, &plain);
    }

    #[test]
    fn a_torn_last_line_does_not_swallow_the_next_ban() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        let at = now_ms();
        fs::write(
            dir.path().join("bans.log"),
            format!("ban {at} h/x/\nban 12"),
        )
        .unwrap();
        {
            let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
            assert!(b.is_banned("h/x/1", old, &NO_TAGS));
            b.add("h/y/").unwrap();
        }
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(b.is_banned("h/x/1", old, &NO_TAGS));
        assert!(
            b.is_banned("h/y/1", old, &NO_TAGS),
            "the ban after the torn line survives"
        );
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn a_ban_of_an_unknown_kind_drops_its_hosts_older_objects() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        let at = now_ms();
        fs::write(
            dir.path().join("bans.log"),
            format!("header {at} h/ x-y\ntag {at} g/\nhead {at} exa\nban {at} k/a/\n"),
        )
        .unwrap();
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(b.is_banned("h/any", old, &NO_TAGS), "unknown kind");
        // Fragments of failed appends: a tag line without its tag, a line without a host.
        assert!(!b.is_banned("g/any", old, &NO_TAGS));
        assert!(!b.is_banned("exa/any", old, &NO_TAGS));
        let fresh = SystemTime::now() + Duration::from_secs(1);
        assert!(!b.is_banned("h/any", fresh, &NO_TAGS));
        assert!(!b.is_banned("k/b", old, &NO_TAGS), "other hosts untouched");
        assert!(b.is_banned("k/a/1", old, &NO_TAGS));
        // The floor outlives a compaction that rewrites the log (the prefix ban expires).
        drop(b);
        std::thread::sleep(Duration::from_millis(5));
        drop(BanList::open(dir.path(), Duration::from_millis(1)).unwrap());
        let log = fs::read_to_string(dir.path().join("bans.log")).unwrap();
        assert!(!log.contains("header"), "{log}");
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(b.is_banned("h/any", old, &NO_TAGS) && !b.is_banned("g/any", old, &NO_TAGS));
    }

    #[test]
    fn ban_covers_older_objects_only_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        {
            let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
            assert!(!b.is_banned("h/a/1", old, &NO_TAGS));
            b.add("h/a/").unwrap();
            assert!(b.is_banned("h/a/1", old, &NO_TAGS));
            assert!(!b.is_banned("h/b/1", old, &NO_TAGS));
            let fresh = SystemTime::now() + Duration::from_secs(1);
            assert!(!b.is_banned("h/a/1", fresh, &NO_TAGS));
        }
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert_eq!(b.len(), 1);
        assert!(b.is_banned("h/a/1", old, &NO_TAGS));
    }

    #[test]
    fn expired_bans_become_a_floor() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        {
            let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
            b.add("h/a/").unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
        let b = BanList::open(dir.path(), Duration::from_millis(1)).unwrap();
        assert_eq!(b.len(), 0);
        // Still gone: it predates its host's floor.
        assert!(b.is_banned("h/zzz", old, &NO_TAGS));
        assert!(!b.is_banned(
            "h/zzz",
            SystemTime::now() + Duration::from_secs(1),
            &NO_TAGS
        ));
        // Another host's old objects are untouched by it, also after a reopen.
        assert!(!b.is_banned("other/x", old, &NO_TAGS));
        drop(b);
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(b.is_banned("h/zzz", old, &NO_TAGS) && !b.is_banned("other/x", old, &NO_TAGS));
    }

    #[test]
    fn owner_changes_raise_floors_of_their_host_only_and_survive_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let before = SystemTime::now() - Duration::from_secs(10);
        let at = SystemTime::now() - Duration::from_secs(5);
        let after = SystemTime::now();
        let change = |scope: &str, floor, registered_ms| OwnerChange {
            scope: scope.into(),
            floor,
            registered_ms,
        };
        {
            let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
            assert_eq!(b.owner("h/"), None);
            b.apply_owner_changes(&[change("h/", at, Some(7)), change("g/", before, None)])
                .unwrap();
            b.apply_owner_changes(&[change("h/", before, None)])
                .unwrap();
            assert_eq!(b.owner("h/"), Some(7));
            assert_eq!(b.owner("g/"), None);
            assert!(b.is_banned("h/x", before, &NO_TAGS), "never lowered");
            assert!(!b.is_banned("h/x", after, &NO_TAGS));
            assert!(!b.is_banned("other/x", before, &NO_TAGS));
            assert!(b.is_empty(), "a floor is not a ban");
        }
        let check = |b: &BanList| {
            assert_eq!(b.owner("h/"), Some(7));
            assert!(b.is_banned("h/x", before, &NO_TAGS) && !b.is_banned("h/x", after, &NO_TAGS));
            assert!(!b.is_banned("other/x", before, &NO_TAGS));
        };
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        check(&b);
        drop(b);
        // A compaction that rewrites the log keeps floors and owners.
        {
            let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
            b.add("g/old/").unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
        let b = BanList::open(dir.path(), Duration::from_millis(1)).unwrap();
        assert_eq!(b.len(), 0, "the ban expired and the log was rewritten");
        check(&b);
        drop(b);
        check(&BanList::open(dir.path(), Duration::from_secs(3600)).unwrap());
    }

    /// Bans recorded after a compaction rewrote the log land in the new log, not in the
    /// unlinked old one.
    #[test]
    fn bans_after_a_compaction_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        {
            let b = BanList::open(dir.path(), Duration::from_millis(20)).unwrap();
            b.add("h/gone/").unwrap();
            std::thread::sleep(Duration::from_millis(30));
            b.compact(0).unwrap();
            assert_eq!(b.len(), 0, "expired and rewritten");
            b.add("h/kept/").unwrap();
        }
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(b.is_banned("h/kept/x", old, &NO_TAGS));
    }

    /// An append that fails part-way is cut off again (or, if that fails too, the next one
    /// starts a new line), so the next acknowledged ban reads back whole.
    #[test]
    fn a_failed_append_does_not_swallow_the_next_ban() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bans.log");
        let old = SystemTime::now() - Duration::from_secs(10);
        {
            let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
            // A handle that cannot write (nor be cut): the append fails.
            *b.writer.lock() = LogWriter {
                file: File::open(&path).unwrap(),
                torn: false,
            };
            assert!(b.add("h/failed/").is_err());
            assert!(b
                .add_keys(&[("h/key", Some(1))], SystemTime::now(), || true)
                .is_err());
            assert!(
                !b.is_banned("h/key", old, &NO_TAGS),
                "a key ban is applied once written"
            );
            assert!(
                b.is_banned("h/failed/x", old, &NO_TAGS),
                "a prefix ban is in force before it is written, failed or not"
            );
            // What a write that failed half-way leaves behind.
            let mut raw = OpenOptions::new().append(true).open(&path).unwrap();
            raw.write_all(b"ban 17 h/fail").unwrap();
            b.writer.lock().file = raw;
            b.add("h/next/").unwrap();
        }
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(
            b.is_banned("h/next/x", old, &NO_TAGS),
            "{}",
            fs::read_to_string(&path).unwrap()
        );
        assert!(!b.is_banned("h/failed/x", old, &NO_TAGS), "never written");
    }

    /// A prefix ban holds while its append waits for the disk (here: for the writer's lock,
    /// as behind a hung fsync), and is on disk once the append returns.
    #[test]
    fn a_prefix_ban_is_in_force_before_its_append() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        let b = Arc::new(BanList::open(dir.path(), Duration::from_secs(3600)).unwrap());
        let held = b.writer.lock();
        let ban = b.ban("h/a/");
        assert!(b.is_banned("h/a/x", old, &NO_TAGS));
        let writing = std::thread::spawn({
            let b = b.clone();
            move || b.write(ban)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!writing.is_finished(), "the append waits for the disk");
        assert!(b.is_banned("h/a/x", old, &NO_TAGS));
        drop(held);
        writing.join().unwrap().unwrap();
        drop(b);
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(b.is_banned("h/a/x", old, &NO_TAGS));
    }

    #[test]
    fn a_log_with_a_global_floor_still_reads_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let t = millis(SystemTime::now());
        fs::write(dir.path().join("bans.log"), format!("floor {t} -\n")).unwrap();
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        assert!(b.is_banned("any/x", old, &NO_TAGS));
    }

    #[test]
    fn a_prefix_inside_the_host_covers_every_scope() {
        let dir = tempfile::tempdir().unwrap();
        let b = BanList::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let old = SystemTime::now() - Duration::from_secs(10);
        b.add("ho").unwrap();
        assert!(b.is_banned("host/a", old, &NO_TAGS) && b.is_banned("hob/b", old, &NO_TAGS));
        assert!(!b.is_banned("x/a", old, &NO_TAGS));
    }

    #[test]
    fn torn_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("bans.log"), "ban 123 h/x\nban 12").unwrap();
        let b = BanList::open(dir.path(), Duration::from_secs(1 << 40)).unwrap();
        assert_eq!(b.len(), 1);
    }
}
