//! Purges an edge missed are delivered again until it confirms them.
//!
//! A purge fans out to every edge at once; one that is down, unreachable or failing (no
//! answer, or a 5xx) at that moment still holds what the purge removes, and would serve it
//! once it is back. So the purge is queued for that edge, and the edge takes no traffic (it
//! is neither routed to nor named as a peer) until it has confirmed every purge queued for
//! it; the sync loop delivers them again every few seconds. Queues are kept on disk
//! (rewritten atomically on every change), so a broker restart forgets none of them — nor an
//! edge renamed in the configuration meanwhile, found by its admin address. The queue of an
//! edge the configuration no longer names, at no configured address (taken out for
//! maintenance, or renamed while its name did not resolve), stays in the file for
//! [`UNMATCHED_KEEP`], takes every purge sent meanwhile, and goes to the edge when a later
//! start finds it again: it may come back with its cache.
//!
//! A queue is bounded: past [`MAX_PENDING`] purges, an edge's queue collapses into one purge
//! of each host it names (`host/*`): more is removed than asked, nothing less. An edge that
//! refuses a queued purge (a 4xx such as 400: it cannot take it, and never will) gets the
//! purge of its whole host instead; one that refuses that too stays held, logged and counted;
//! a refusal that can pass later — 401/403 (the broker's token not, or no longer, the
//! edge's), 408, 429 — keeps it queued.
//!
//! A purge is written down before it is sent ([`Redelivery::begin`]) and crossed out once
//! every edge has answered or had it queued ([`Redelivery::finish`]): a broker that stops
//! in between finds it on start and queues it for every edge it was going to, rather than
//! losing it for the edges it had not reached yet.
//!
//! Changes are made in memory (with the hold) at once; [`Redelivery::save`] writes them, off
//! the async workers, one writer at a time. A save that finds its change already written by
//! another (which always writes the newest state) returns without writing again, so
//! concurrent purges share writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edge_node::durable::{read_json, write_atomic, FileError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::EdgeAddr;
use crate::metrics::BrokerMetrics;
use crate::routing::{Fleet, Health};

/// Purges kept per edge before its queue collapses into host-wide purges.
pub const MAX_PENDING: usize = 10_000;

/// How long the queue of an edge no longer configured is kept for its return: longer than a
/// machine is out for repair, short enough that a decommissioned edge's queue does not stay
/// in the file for good. An edge back after that serves what it missed: purge its cache.
pub const UNMATCHED_KEEP: std::time::Duration = std::time::Duration::from_secs(14 * 24 * 3600);

/// A purge one edge has not confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PendingPurge {
    /// `host/path` or `host/prefix*`.
    Target {
        /// As sent to the edges.
        target: String,
    },
    /// The host's objects carrying one of the tags.
    Tags {
        /// The host.
        host: String,
        /// The tags, checked by [`edge_node::tags::check`].
        tags: Vec<String>,
    },
}

impl PendingPurge {
    /// The host-wide purge that covers this one (`None` for a prefix that stops inside the
    /// host part, which covers several hosts and is kept as it is).
    pub(crate) fn host_wide(&self) -> Option<String> {
        match self {
            PendingPurge::Target { target } => {
                let (host, _) = target.split_once('/')?;
                Some(format!("{host}/*"))
            }
            PendingPurge::Tags { host, .. } => Some(format!("{host}/*")),
        }
    }

    /// A key for de-duplication.
    pub(crate) fn dedup_key(&self) -> String {
        match self {
            PendingPurge::Target { target } => format!("t {target}"),
            PendingPurge::Tags { host, tags } => format!("g {host} {}", tags.join(" ")),
        }
    }
}

/// A purge being sent, and the edges it is going to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sending {
    purge: PendingPurge,
    /// Edge ids.
    edges: Vec<String>,
}

/// The file's content: queues by edge id, and the purges that were being sent.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    edges: BTreeMap<String, Vec<PendingPurge>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    sending: Vec<Sending>,
    /// The admin address of each edge named above: an edge renamed in the configuration
    /// (same machine, same cache, new id) is found by it and still gets its purges.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    admins: BTreeMap<String, String>,
    /// What each of those admin addresses resolved to when saved (`ip:port`): an edge renamed
    /// whose configuration now spells its address otherwise (its IP for its name, or the other
    /// way round) is still found by it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    admins_resolved: BTreeMap<String, String>,
    /// When each queue of an edge no longer configured was first found so (ms since the
    /// epoch); only written when there is one, so other files stay readable by the version
    /// before it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    unmatched_since: BTreeMap<String, u64>,
}

/// The queue of an edge no longer configured, kept for its return.
#[derive(Debug, Clone)]
struct Unmatched {
    queue: Vec<PendingPurge>,
    admin: Option<String>,
    admin_resolved: Option<String>,
    since_ms: u64,
}

struct Queues {
    by_edge: Vec<Vec<PendingPurge>>,
    /// Per edge, moves when its queue collapses: a delivery of the queue as it was must not
    /// then drop purges by position.
    generation: Vec<u64>,
    /// Purges going out now, by the ticket [`Redelivery::begin`] gave.
    sending: BTreeMap<u64, (PendingPurge, Vec<usize>)>,
    next_ticket: u64,
    /// Moves on every change: a save skips its write when a later or equal version has
    /// been written already.
    version: u64,
    /// Queues of edges no longer configured, by id, written back with every save.
    unmatched: BTreeMap<String, Unmatched>,
}

/// A purge written down as being sent; hand it back to [`Redelivery::finish`].
#[derive(Debug)]
#[must_use = "a purge never finished is queued for every edge at the next start"]
pub struct Ticket(u64);

/// Every edge's unconfirmed purges.
pub struct Redelivery {
    path: PathBuf,
    fleet: Arc<Fleet>,
    health: Arc<Health>,
    metrics: BrokerMetrics,
    queues: Mutex<Queues>,
    /// Held through a write, so writes never interleave and a later one never carries an
    /// older state than an earlier one; holds the version last written.
    writer: Mutex<u64>,
    /// A background write ([`Redelivery::save_in_background`]) is under way.
    retrying: std::sync::atomic::AtomicBool,
}

impl Redelivery {
    /// Whether the queues saved at `path` can be read, as [`Redelivery::open`] reads them
    /// (a missing file is an empty one), without acting on them.
    pub fn check(path: &Path) -> Result<(), FileError> {
        read_json::<Saved>(path).map(drop)
    }

    /// The queues saved at `path` (none when it does not exist). Purges that were being sent
    /// are queued for every edge they were going to. Edges with a queue are held out of
    /// routing at once; the queue of an edge no longer in the fleet goes to the edge now at its
    /// admin address (renamed), else is kept in the file for its return, up to
    /// [`UNMATCHED_KEEP`].
    pub fn open(
        path: PathBuf,
        fleet: Arc<Fleet>,
        health: Arc<Health>,
        metrics: BrokerMetrics,
    ) -> Result<Self, FileError> {
        let saved: Saved = read_json(&path)?.unwrap_or_default();
        let mut by_edge = vec![Vec::new(); fleet.edges.len()];
        let targets = targets(&saved, &fleet);
        let mut unmatched: BTreeMap<String, Vec<PendingPurge>> = BTreeMap::new();
        let mut queue_for = |id: &String, purges: &[PendingPurge]| {
            let to = targets.get(id.as_str()).map_or(&[][..], Vec::as_slice);
            if to.is_empty() {
                unmatched
                    .entry(id.clone())
                    .or_default()
                    .extend_from_slice(purges);
            }
            for &i in to {
                by_edge[i].extend_from_slice(purges);
            }
        };
        for (id, queue) in &saved.edges {
            queue_for(id, queue);
        }
        let interrupted = saved.sending.len();
        for sending in &saved.sending {
            for id in &sending.edges {
                queue_for(id, std::slice::from_ref(&sending.purge));
            }
        }
        for queue in &mut by_edge {
            dedup(queue);
        }
        let unmatched = keep_unmatched(&saved, unmatched, crate::clock::wall_ms());
        // The file does not say since when a queue waits for its edge, or names one dropped
        // or found again: rewritten below.
        let unmatched_moved = unmatched.len() != saved.unmatched_since.len()
            || unmatched
                .keys()
                .any(|id| !saved.unmatched_since.contains_key(id));
        if interrupted > 0 {
            tracing::warn!(
                purges = interrupted,
                "purges the broker was sending when it stopped are delivered again to every \
                 edge they were going to"
            );
        }
        for queue in &mut by_edge {
            bound(queue);
        }
        let edges = by_edge.len();
        let r = Redelivery {
            path,
            fleet,
            health,
            metrics,
            queues: Mutex::new(Queues {
                by_edge,
                generation: vec![0; edges],
                sending: BTreeMap::new(),
                next_ticket: 0,
                version: 0,
                unmatched,
            }),
            writer: Mutex::new(0),
            retrying: std::sync::atomic::AtomicBool::new(false),
        };
        if interrupted > 0 || unmatched_moved {
            // The file still lists them as being sent, or does not say since when a queue
            // waits for its edge: rewrite it.
            r.queues.lock().version += 1;
            r.save_now();
        }
        {
            let q = r.queues.lock();
            for edge in 0..edges {
                r.publish(edge, q.by_edge[edge].len());
            }
        }
        Ok(r)
    }

    /// `purge` is about to go to `edges`; [`Self::save`] makes that durable, and should
    /// before it is sent. The edges keep taking traffic.
    pub fn begin(&self, purge: PendingPurge, edges: &[usize]) -> Ticket {
        let mut q = self.queues.lock();
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.sending.insert(ticket, (purge, edges.to_vec()));
        q.version += 1;
        Ticket(ticket)
    }

    /// The purge of `ticket` has been answered or queued ([`Self::queue`]) on every edge.
    /// [`Self::save`] makes it durable.
    pub fn finish(&self, ticket: Ticket) {
        let mut q = self.queues.lock();
        q.sending.remove(&ticket.0);
        q.version += 1;
    }

    /// `purge` did not reach `edge`: keep it for the edge, and keep the edge out of routing
    /// from now on. [`Self::save`] makes it durable.
    pub fn queue(&self, edge: usize, purge: PendingPurge) {
        let mut q = self.queues.lock();
        q.version += 1;
        let queue = &mut q.by_edge[edge];
        queue.push(purge);
        if bound(queue) {
            let after = queue.len();
            q.generation[edge] += 1;
            tracing::warn!(edge = %self.fleet.edges[edge].id, purges = after,
                "pending purges collapsed into host-wide purges");
        }
        let len = q.by_edge[edge].len();
        self.publish(edge, len);
    }

    /// `purge` went out to the configured edges: the edges no longer configured whose queues
    /// are kept for their return get it too, as a purge they missed, so one back after days
    /// serves nothing purged meanwhile. [`Self::save`] makes it durable.
    ///
    /// Whether a queue took it (then it needs a save); one already queued is not again.
    pub fn queue_unmatched(&self, purge: &PendingPurge) -> bool {
        let mut q = self.queues.lock();
        let key = purge.dedup_key();
        let mut changed = false;
        for u in q.unmatched.values_mut() {
            if u.queue.iter().any(|p| p.dedup_key() == key) {
                continue;
            }
            u.queue.push(purge.clone());
            bound(&mut u.queue);
            changed = true;
        }
        if changed {
            q.version += 1;
        }
        changed
    }

    /// `edge`'s queue as it is now, with the generation to hand back to [`Self::delivered`].
    pub fn pending(&self, edge: usize) -> (u64, Vec<PendingPurge>) {
        let q = self.queues.lock();
        (q.generation[edge], q.by_edge[edge].clone())
    }

    /// Edges with purges to deliver.
    pub fn edges_pending(&self) -> Vec<usize> {
        let q = self.queues.lock();
        (0..q.by_edge.len())
            .filter(|e| !q.by_edge[*e].is_empty())
            .collect()
    }

    /// `edge` is done with the first `n` purges of the queue [`Self::pending`] gave at
    /// `generation` (confirmed, or refused for good); once its queue is empty it takes traffic
    /// again. [`Self::save`] makes it durable.
    pub fn delivered(&self, edge: usize, generation: u64, n: usize) {
        let mut q = self.queues.lock();
        if n == 0 || q.generation[edge] != generation {
            // Nothing done, or collapsed since: the same purges go again next round.
            return;
        }
        q.version += 1;
        let queue = &mut q.by_edge[edge];
        queue.drain(..n.min(queue.len()));
        let len = queue.len();
        self.publish(edge, len);
    }

    /// Hold or release the edge and export its queue length; called under the queues' lock,
    /// so the hold always follows the queue it was computed from.
    fn publish(&self, edge: usize, len: usize) {
        let id = &self.fleet.edges[edge].id;
        let was = self.health.hold(edge, len > 0);
        if was && len == 0 {
            tracing::info!(edge = %id, "edge confirmed every missed purge: it takes traffic again");
        } else if !was && len > 0 {
            tracing::warn!(edge = %id, "edge missed a purge: no traffic until it confirms it");
        }
        self.metrics
            .edge_pending_purges
            .with_label_values(&[id.as_str()])
            .set(len as i64);
    }

    /// Write the queues again in a task of its own, unless such a write is under way: what
    /// a failed write left in memory only, without a disk that hangs holding up the caller.
    pub fn save_in_background(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.retrying.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.save().await;
            this.retrying.store(false, Ordering::Release);
        });
    }

    /// Write every queue to disk, off the async workers; whether what they hold now is on
    /// disk. A failure is logged and counted: the queues still hold in memory, and the next
    /// save (at the latest the redeliverer's next round) writes them again.
    pub async fn save(self: &Arc<Self>) -> bool {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.save_now()).await {
            Ok(saved) => saved,
            Err(e) => {
                tracing::error!(error = %e, "pending purges not saved");
                false
            }
        }
    }

    fn save_now(&self) -> bool {
        let wanted = self.queues.lock().version;
        let mut written = self.writer.lock();
        if *written >= wanted {
            // A write that started after this change carried it.
            return true;
        }
        let (version, saved) = {
            let q = self.queues.lock();
            let id = |e: &usize| self.fleet.edges[*e].id.clone();
            let named: BTreeSet<usize> = (0..q.by_edge.len())
                .filter(|e| !q.by_edge[*e].is_empty())
                .chain(
                    q.sending
                        .values()
                        .flat_map(|(_, edges)| edges.iter().copied()),
                )
                .collect();
            let saved = Saved {
                edges: q
                    .by_edge
                    .iter()
                    .enumerate()
                    .filter(|(_, queue)| !queue.is_empty())
                    .map(|(e, queue)| (id(&e), queue.clone()))
                    .collect(),
                sending: q
                    .sending
                    .values()
                    .map(|(purge, edges)| Sending {
                        purge: purge.clone(),
                        edges: edges.iter().map(id).collect(),
                    })
                    .collect(),
                admins: named
                    .iter()
                    .map(|e| (id(e), self.fleet.edges[*e].admin.to_string()))
                    .collect(),
                // Only for names: an IP's resolution is itself, and a file without the key
                // stays readable by the version before it.
                admins_resolved: named
                    .iter()
                    .filter(|e| self.fleet.edges[**e].admin.literal().is_none())
                    .filter_map(|e| Some((id(e), self.fleet.addresses.get(*e).admin?.to_string())))
                    .collect(),
                unmatched_since: BTreeMap::new(),
            };
            let mut saved = saved;
            for (id, u) in &q.unmatched {
                saved.edges.insert(id.clone(), u.queue.clone());
                if let Some(a) = &u.admin {
                    saved.admins.insert(id.clone(), a.clone());
                }
                if let Some(a) = &u.admin_resolved {
                    saved.admins_resolved.insert(id.clone(), a.clone());
                }
                saved.unmatched_since.insert(id.clone(), u.since_ms);
            }
            (q.version, saved)
        };
        let res = serde_json::to_vec(&saved)
            .map_err(io::Error::other)
            .and_then(|bytes| write_atomic(&self.path, &bytes));
        match res {
            Ok(()) => {
                *written = version;
                true
            }
            Err(e) => {
                self.metrics.pending_purges_save_failures.inc();
                tracing::error!(error = %e, path = %self.path.display(), "pending purges not saved");
                false
            }
        }
    }
}

/// The queues of edges no longer configured (`unmatched`, by id) that are kept for their
/// return: found so less than [`UNMATCHED_KEEP`] before `now_ms`, each collapsed past
/// [`MAX_PENDING`]. Each is logged.
fn keep_unmatched(
    saved: &Saved,
    unmatched: BTreeMap<String, Vec<PendingPurge>>,
    now_ms: u64,
) -> BTreeMap<String, Unmatched> {
    let keep_ms = UNMATCHED_KEEP.as_millis() as u64;
    let mut kept = BTreeMap::new();
    for (id, mut queue) in unmatched {
        let since_ms = saved.unmatched_since.get(&id).copied().unwrap_or(now_ms);
        if now_ms.saturating_sub(since_ms) > keep_ms {
            tracing::warn!(edge = %id, purges = queue.len(), days = UNMATCHED_KEEP.as_secs() / 86_400,
                "pending purges of an edge not configured for that long are dropped: purge its \
                 cache before it serves again");
            continue;
        }
        tracing::warn!(edge = %id, purges = queue.len(),
            "pending purges of an edge no longer configured are kept for its return");
        dedup(&mut queue);
        bound(&mut queue);
        let unmatched = Unmatched {
            queue,
            admin: saved.admins.get(&id).cloned(),
            admin_resolved: saved.admins_resolved.get(&id).cloned(),
            since_ms,
        };
        kept.insert(id, unmatched);
    }
    kept
}

/// The edges each id of `saved` now stands for: the edge configured with that id, and the
/// edge configured at the admin address the id had when saved, if another — an edge renamed
/// (same machine, same cache, new id), or an id given to a new machine while the old one
/// runs under another. Either may hold what the purges remove; sending them to both removes
/// more than asked, never less.
fn targets<'a>(saved: &'a Saved, fleet: &Fleet) -> HashMap<&'a str, Vec<usize>> {
    let ids = saved
        .edges
        .keys()
        .chain(saved.sending.iter().flat_map(|s| s.edges.iter()));
    let mut out: HashMap<&str, Vec<usize>> = HashMap::new();
    for id in ids {
        if out.contains_key(id.as_str()) {
            continue;
        }
        let mut to: Vec<usize> = fleet
            .edges
            .iter()
            .position(|e| e.id == *id)
            .into_iter()
            .collect();
        // Its address as written, and as resolved then: either names the machine.
        let written = saved
            .admins
            .get(id)
            .and_then(|a| a.parse::<EdgeAddr>().ok());
        // An address written as an IP is its own resolution.
        let resolved = saved
            .admins_resolved
            .get(id)
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .or_else(|| written.as_ref().and_then(EdgeAddr::literal));
        let written_at = |i: &usize| {
            written
                .as_ref()
                .is_some_and(|w| w.same_place(&fleet.edges[*i].admin))
        };
        let resolved_at =
            |i: &usize| resolved.is_some_and(|r| fleet.addresses.get(*i).admin == Some(r));
        // Still configured where it was: not renamed, and an address its name resolved to
        // once may be another edge's now.
        let unmoved = to.first().is_some_and(|i| written_at(i) || resolved_at(i));
        // The address as written first: a resolution is older news.
        let n = fleet.edges.len();
        let at = if unmoved {
            None
        } else {
            (0..n).find(written_at).or_else(|| (0..n).find(resolved_at))
        };
        if let Some(i) = at {
            let admin = saved.admins.get(id).map_or("", String::as_str);
            tracing::warn!(edge = %id, now = %fleet.edges[i].id, %admin,
                "pending purges of an edge also go to the edge now at its admin address");
            to.push(i);
        }
        out.insert(id, to);
    }
    out
}

/// Keep the first of each purge in `queue` (queues merged at a start may repeat one).
fn dedup(queue: &mut Vec<PendingPurge>) {
    let mut seen = BTreeSet::new();
    queue.retain(|p| seen.insert(p.dedup_key()));
}

/// Collapse `queue` ([`collapse`]) once it holds more than [`MAX_PENDING`] purges; whether it
/// shrank.
fn bound(queue: &mut Vec<PendingPurge>) -> bool {
    if queue.len() <= MAX_PENDING {
        return false;
    }
    let before = queue.len();
    collapse(queue);
    queue.len() < before
}

/// Replace `queue` with one host-wide purge per host it names, in first-seen order.
fn collapse(queue: &mut Vec<PendingPurge>) {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for p in queue.drain(..) {
        let wide = match p.host_wide() {
            Some(target) => PendingPurge::Target { target },
            None => p,
        };
        if seen.insert(wide.dedup_key()) {
            out.push(wide);
        }
    }
    *queue = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(t: &str) -> PendingPurge {
        PendingPurge::Target {
            target: t.to_string(),
        }
    }

    #[test]
    fn a_full_queue_collapses_into_host_wide_purges() {
        let mut q = vec![
            target("a.com/x"),
            PendingPurge::Tags {
                host: "b.com".into(),
                tags: vec!["t".into()],
            },
            target("a.com/y*"),
            target("ho*"),
            target("ho*"),
        ];
        collapse(&mut q);
        assert_eq!(q, vec![target("a.com/*"), target("b.com/*"), target("ho*")]);
    }

    /// The sample config's fleet and a directory for the queue file.
    fn sample_fleet() -> (Arc<Fleet>, tempfile::TempDir) {
        let cfg = crate::BrokerConfig::from_toml(crate::config::tests::SAMPLE).unwrap();
        (Arc::new(Fleet::new(&cfg)), tempfile::tempdir().unwrap())
    }

    /// The queues at `path`, as a broker (re)starting with `fleet` opens them.
    fn reopen(fleet: &Arc<Fleet>, path: &std::path::Path) -> (Arc<Redelivery>, Arc<Health>) {
        let health = Arc::new(Health::new(fleet.edges.len(), 1, 1));
        let metrics = BrokerMetrics::register(&prometheus::Registry::new()).unwrap();
        let r = Redelivery::open(path.to_path_buf(), fleet.clone(), health.clone(), metrics);
        (Arc::new(r.unwrap()), health)
    }

    /// An edge renamed in the configuration between two starts (same admin address: same
    /// machine, same cache) keeps its queue; one removed, at no configured address, has it kept
    /// for its return.
    #[tokio::test]
    async fn a_renamed_edge_keeps_its_queue() {
        let (fleet, dir) = sample_fleet();
        let path = dir.path().join("pending-purges.json");
        let (r, _) = reopen(&fleet, &path);
        assert_eq!(fleet.edges[1].id, "eu-b");
        r.queue(1, target("a.com/x"));
        r.queue(3, target("a.com/y"));
        r.save().await;
        drop(r);
        let saved_by_first = std::fs::read(&path).unwrap();
        let renamed = crate::config::tests::SAMPLE
            .replace("id = \"eu-b\"", "id = \"eu-b2\"")
            .replace("id = \"us-a\"", "id = \"us-z\"")
            .replace("127.0.0.1:9104", "127.0.0.1:9199");
        let cfg = crate::BrokerConfig::from_toml(&renamed).unwrap();
        let renamed = Arc::new(Fleet::new(&cfg));
        let (r, health) = reopen(&renamed, &path);
        assert_eq!(renamed.edges[1].id, "eu-b2");
        assert_eq!(r.pending(1).1, vec![target("a.com/x")]);
        assert!(!health.is_up(1), "held until it confirms");
        drop(r);
        // The id eu-b given to a new machine while the old one runs as eu-b2, read from the
        // file as the first configuration saved it: both may hold what the purge removes.
        std::fs::write(&path, &saved_by_first).unwrap();
        let swapped = crate::config::tests::SAMPLE
            .replace("id = \"eu-b\"", "id = \"eu-b2\"")
            .replace("id = \"eu-s\"", "id = \"eu-b\"");
        let cfg = crate::BrokerConfig::from_toml(&swapped).unwrap();
        let swapped = Arc::new(Fleet::new(&cfg));
        let (r, _) = reopen(&swapped, &path);
        let [old_machine, new_machine] =
            ["eu-b2", "eu-b"].map(|id| swapped.edges.iter().position(|e| e.id == id).unwrap());
        assert_eq!(r.pending(old_machine).1, vec![target("a.com/x")]);
        assert_eq!(r.pending(new_machine).1, vec![target("a.com/x")]);
        drop(r);
        let (r, _) = reopen(&renamed, &path);
        assert!(
            r.pending(3).1.is_empty(),
            "us-a gone from its address: nothing to give its queue to"
        );
        drop(r);
        // Configured again where it was (back from maintenance), it gets what it missed.
        let (r, health) = reopen(&fleet, &path);
        assert_eq!(r.pending(3).1, vec![target("a.com/y")]);
        assert!(!health.is_up(3));
    }

    /// The queue of an edge no longer configured stays in the file for its return, also the
    /// purges that were being sent to it, until [`UNMATCHED_KEEP`] has passed.
    #[tokio::test]
    async fn an_unconfigured_edges_queue_is_kept_for_a_while() {
        let (fleet, dir) = sample_fleet();
        let path = dir.path().join("pending-purges.json");
        let file = |since: Option<u64>| {
            let mut saved = serde_json::json!({
                "edges": {"gone": [{"kind": "target", "target": "a.com/x"}]},
                "sending": [{"purge": {"kind": "target", "target": "a.com/s"}, "edges": ["gone"]}],
            });
            if let Some(ms) = since {
                saved["unmatched_since"] = serde_json::json!({ "gone": ms });
            }
            std::fs::write(&path, saved.to_string()).unwrap();
        };
        let read = || -> Saved { read_json(&path).unwrap().unwrap() };
        file(None);
        let before = crate::clock::wall_ms();
        drop(reopen(&fleet, &path));
        let kept = read();
        assert_eq!(
            kept.edges["gone"],
            vec![target("a.com/x"), target("a.com/s")]
        );
        let since = kept.unmatched_since["gone"];
        assert!(since >= before);
        let (r, _) = reopen(&fleet, &path);
        r.queue(0, target("b.com/y"));
        assert!(r.queue_unmatched(&target("c.com/z")));
        assert!(!r.queue_unmatched(&target("c.com/z")), "queued once");
        r.save().await;
        drop(r);
        assert_eq!(
            read().unmatched_since["gone"],
            since,
            "found so then, not now"
        );
        assert_eq!(
            read().edges["gone"],
            vec![target("a.com/x"), target("a.com/s"), target("c.com/z")],
            "a purge sent while it is away waits for it too"
        );
        let long_ago = since - UNMATCHED_KEEP.as_millis() as u64 - 1;
        file(Some(long_ago));
        drop(reopen(&fleet, &path));
        let dropped = read();
        assert!(!dropped.edges.contains_key("gone"));
        assert!(dropped.unmatched_since.is_empty());
    }

    /// A renamed edge whose configuration now spells its admin address otherwise — its name
    /// for the IP it was saved under, or the same name with a trailing dot — keeps its queue.
    #[test]
    fn a_renamed_edge_is_found_by_its_address_however_spelled() {
        let (fleet, dir) = sample_fleet();
        let path = dir.path().join("pending-purges.json");
        let (r, _) = reopen(&fleet, &path);
        r.queue(1, target("a.com/x"));
        r.save_now();
        drop(r);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("admins_resolved"),
            "an IP resolves to itself: {text}"
        );
        let config = |id: &str, admin: &str| {
            let toml = crate::config::tests::SAMPLE
                .replace("id = \"eu-b\"", &format!("id = \"{id}\""))
                .replace("127.0.0.1:9102", admin);
            Arc::new(Fleet::new(&crate::BrokerConfig::from_toml(&toml).unwrap()))
        };
        // Saved under 127.0.0.1:9102; now eu-b2 at localhost:9102, which resolves there.
        let by_name = config("eu-b2", "localhost:9102");
        by_name
            .addresses
            .resolve_at_start(&by_name.edges, std::time::Duration::from_secs(5));
        assert_eq!(
            by_name.addresses.get(1).admin,
            Some("127.0.0.1:9102".parse().unwrap())
        );
        let (r, _) = reopen(&by_name, &path);
        assert_eq!(r.pending(1).1, vec![target("a.com/x")]);
        drop(r);
        // Saved under a name (unresolved), now spelled absolute and in capitals.
        let saved = Saved {
            edges: [("eu-b".to_string(), vec![target("a.com/y")])].into(),
            admins: [("eu-b".to_string(), "edge-b.internal:9102".to_string())].into(),
            ..Saved::default()
        };
        std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();
        let (r, _) = reopen(&config("eu-b3", "EDGE-B.internal.:9102"), &path);
        assert_eq!(r.pending(1).1, vec![target("a.com/y")]);
        drop(r);
        // Another port is another edge.
        let (r, _) = reopen(&config("eu-b3", "edge-b.internal:9109"), &path);
        assert!(r.pending(1).1.is_empty());
        drop(r);
        // An edge still configured where it was keeps its queue alone, though the address its
        // name resolved to then is another edge's (eu-a's) now.
        let saved = Saved {
            edges: [("eu-b".to_string(), vec![target("a.com/z")])].into(),
            admins: [("eu-b".to_string(), "127.0.0.1:9102".to_string())].into(),
            admins_resolved: [("eu-b".to_string(), "127.0.0.1:9101".to_string())].into(),
            ..Saved::default()
        };
        std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();
        let (r, _) = reopen(&fleet, &path);
        assert_eq!(r.pending(1).1, vec![target("a.com/z")]);
        assert!(r.pending(0).1.is_empty(), "eu-a has none of eu-b's purges");
    }

    #[tokio::test]
    async fn an_edge_is_held_until_it_confirms_and_queues_survive_a_restart() {
        let (fleet, dir) = sample_fleet();
        let path = dir.path().join("pending-purges.json");
        let open = || reopen(&fleet, &path);
        let (r, health) = open();
        assert!(r.edges_pending().is_empty() && health.is_up(1));
        r.queue(1, target("a.com/x"));
        r.queue(1, target("a.com/y"));
        assert!(
            !health.is_up(1) && health.is_up(0),
            "held before it is saved"
        );
        assert_eq!(r.edges_pending(), vec![1]);
        r.save().await;
        drop(r);

        let (r, health) = open();
        assert!(!health.is_up(1), "held again after a restart");
        let (generation, queue) = r.pending(1);
        assert_eq!(queue, vec![target("a.com/x"), target("a.com/y")]);
        r.delivered(1, generation, 1);
        assert!(!health.is_up(1));
        r.queue(1, target("a.com/z"));
        let (generation, queue) = r.pending(1);
        assert_eq!(queue, vec![target("a.com/y"), target("a.com/z")]);
        r.delivered(1, generation + 1, 2);
        assert_eq!(
            r.pending(1).1.len(),
            2,
            "a stale generation removes nothing"
        );
        r.delivered(1, generation, 2);
        assert!(health.is_up(1) && r.edges_pending().is_empty());
        r.save().await;
        drop(r);
        let (_, health) = open();
        assert!(health.is_up(1));

        std::fs::write(&path, "{\"edges\": 3}").unwrap();
        let health = Arc::new(Health::new(fleet.edges.len(), 1, 1));
        let metrics = BrokerMetrics::register(&prometheus::Registry::new()).unwrap();
        let err = Redelivery::open(path.clone(), fleet.clone(), health, metrics).err();
        assert!(matches!(err, Some(FileError::Format { .. })));
    }

    #[tokio::test]
    async fn a_purge_cut_short_by_a_stop_is_queued_for_every_edge_it_was_going_to() {
        let (fleet, dir) = sample_fleet();
        assert!(fleet.edges.len() >= 3);
        let path = dir.path().join("pending-purges.json");
        let open = || reopen(&fleet, &path);
        let (r, health) = open();
        let finished = r.begin(target("a.com/done"), &[0, 1, 2]);
        let _cut_short = r.begin(target("a.com/x"), &[0, 2]);
        r.save().await;
        assert!(
            (0..3).all(|e| health.is_up(e)),
            "a purge being sent holds nobody"
        );
        r.finish(finished);
        r.save().await;
        drop(r);

        let (r, health) = open();
        assert_eq!(r.edges_pending(), vec![0, 2]);
        assert_eq!(r.pending(0).1, vec![target("a.com/x")]);
        assert!(!health.is_up(0) && health.is_up(1) && !health.is_up(2));
        let saved: Saved = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(
            saved.sending.is_empty() && saved.edges.len() == 2,
            "rewritten as queues at once: {saved:?}"
        );
        drop(r);
        let (r, _) = open();
        assert_eq!(
            r.pending(2).1,
            vec![target("a.com/x")],
            "queued once, not again"
        );
    }

    #[test]
    fn the_file_format_is_tagged_json() {
        let saved = Saved {
            edges: [(
                "eu-a".to_string(),
                vec![
                    target("a.com/x"),
                    PendingPurge::Tags {
                        host: "a.com".into(),
                        tags: vec!["t1".into()],
                    },
                ],
            )]
            .into(),
            sending: Vec::new(),
            admins: BTreeMap::new(),
            admins_resolved: BTreeMap::new(),
            unmatched_since: BTreeMap::new(),
        };
        let text = serde_json::to_string(&saved).unwrap();
        assert_eq!(
            text,
            r#"{"edges":{"eu-a":[{"kind":"target","target":"a.com/x"},{"kind":"tags","host":"a.com","tags":["t1"]}]}}"#
        );
        let back: Saved = serde_json::from_str(&text).unwrap();
        assert_eq!(back.edges["eu-a"].len(), 2);
    }
}
