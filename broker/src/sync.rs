//! The broker's orders to the edges: shadows and purges go over the QUIC control channel
//! ([`crate::control`]) to edges that have a QUIC address, else over their admin API; the
//! origin table (so a newly registered host works on every edge without a restart) and the
//! list of peer edges (the only peers an edge fills a hinted miss from) are pushed over the
//! admin API.
//!
//! Pushes happen on every registry change and every few seconds, so an edge that was down
//! during a change converges when it comes back. Purges an edge missed are delivered again
//! by a round per edge, and the edge takes no traffic until it has them ([`crate::redelivery`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use edge_node::sync::protocol::{ErrorCode, LiveShadow, Reply, Request, ShadowOrder};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Notify;

use crate::control::{Control, ControlError};
use crate::metrics::BrokerMetrics;
use crate::origin_gaps::HostRows;
use crate::redelivery::{PendingPurge, Redelivery, Ticket};
use crate::registry::Registry;
use crate::routing::{Fleet, Health};
use crate::taken_tables::TakenTables;
use edge_node::drain::{InflightCounter, InflightGuard};
use edge_node::shadow::MAX_KEY_BYTES;

/// Most shadows one edge's listing may return (far beyond any edge's shadow budget).
const MAX_LISTED_SHADOWS: usize = 1 << 20;
/// Key bytes of one edge's shadow listing, at most (a million keys of 256 bytes).
const MAX_LISTED_KEY_BYTES: usize = 256 << 20;

/// Outcome of a purge on one edge.
#[derive(Debug, Clone, Serialize)]
pub struct EdgeResult {
    /// Edge id.
    pub edge: String,
    /// Whether the edge confirmed (200, or for a key or prefix 404: an object it did not hold).
    pub ok: bool,
    /// HTTP status from the edge (QUIC answers map to 200 / 404), 0 when unreachable.
    pub status: u16,
    /// Not confirmed for a passing reason (unreachable, 5xx): delivered again until the edge
    /// confirms, and the edge takes no traffic meanwhile ([`crate::redelivery`]), across a
    /// broker restart too. False also when that queue could not be written down: the edge is
    /// then held while this broker runs, but the purge is best sent again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
}

/// What a purge removes on an edge.
enum Purge<'a> {
    /// `host/path` or `host/prefix*`.
    Target(&'a str),
    /// The host's objects carrying one of the tags.
    Tags { host: &'a str, tags: &'a [String] },
}

/// Talks to every edge's admin listener.
pub struct EdgeSync {
    fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    token: String,
    client: reqwest::Client,
    changed: Notify,
    metrics: BrokerMetrics,
    control: Option<Arc<Control>>,
    /// Sent with every origin push: whether edges may use rows on private addresses.
    allow_private_upstreams: bool,
    /// The hosts of the rows each edge left out at its last origin push, to log only changes.
    rejected: parking_lot::Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// Where hosts an edge's origin table routes otherwise than the registry are kept off it
    /// ([`crate::origin_gaps`]); `None` leaves routing to health alone.
    health: Option<Arc<Health>>,
    /// Per edge refusing the table, when its own table was last read and against which of
    /// the registry's ([`GapCheck`]).
    gaps_checked: parking_lot::Mutex<std::collections::HashMap<usize, GapCheck>>,
    /// The tables edges took, for when an edge refusing one does not let its own be read
    /// either; `None` compares with what the edge says only.
    taken: Option<Arc<TakenTables>>,
    /// The last table pushed: its fingerprint and rows by host, worked out once for every edge.
    pushed: parking_lot::Mutex<Option<(u64, Arc<HostRows>)>>,
    /// Per edge, tables it took so far: a comparison that started before one is not applied
    /// after it.
    tables_taken: Vec<std::sync::atomic::AtomicU64>,
    /// Purges edges missed, delivered again by the push loop.
    redelivery: Option<Arc<Redelivery>>,
    /// Edges with a redelivery round running.
    rounds: parking_lot::Mutex<std::collections::HashSet<usize>>,
    /// Missed purges an edge refused whose refusal was logged (bounded: cleared when full).
    refusals_logged: parking_lot::Mutex<std::collections::HashSet<(usize, String)>>,
    /// Where a round counts as in flight, so that a graceful stop waits for it to record
    /// what it delivered.
    inflight: InflightCounter,
    /// An empty origin table may be pushed: the registry was not created by this start, or
    /// a table with hosts was pushed since. A registry that is new and empty (its data
    /// directory not mounted, or mistyped) must not wipe the tables every edge holds and
    /// keeps for its restarts; a new fleet's edges have none to lose.
    empty_push_allowed: std::sync::atomic::AtomicBool,
}

impl EdgeSync {
    /// A client for the fleet's admin APIs.
    pub fn new(
        fleet: Arc<Fleet>,
        registry: Arc<Registry>,
        token: String,
        metrics: BrokerMetrics,
        control: Option<Arc<Control>>,
    ) -> Self {
        let client = edge_node::internal_http::client()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        let empty_push_allowed = (!registry.created()).into();
        let tables_taken = (0..fleet.edges.len()).map(|_| Default::default()).collect();
        EdgeSync {
            empty_push_allowed,
            tables_taken,
            fleet,
            registry,
            token,
            client,
            changed: Notify::new(),
            metrics,
            control,
            allow_private_upstreams: false,
            rejected: Default::default(),
            health: None,
            gaps_checked: Default::default(),
            taken: None,
            pushed: Default::default(),
            redelivery: None,
            rounds: Default::default(),
            refusals_logged: Default::default(),
            inflight: InflightCounter::default(),
        }
    }

    /// Count each redelivery round in `inflight`, the drain's counter.
    pub fn counting_in(mut self, inflight: InflightCounter) -> Self {
        self.inflight = inflight;
        self
    }

    /// Queue the purges an edge misses for a passing reason and deliver them again (see
    /// [`crate::redelivery`]).
    pub fn redelivering(mut self, redelivery: Arc<Redelivery>) -> Self {
        self.redelivery = Some(redelivery);
        self
    }

    /// Let edges use provider origins on loopback and private addresses (`[admin]
    /// allow_private_upstreams`): the broker checks literal addresses at registration, the
    /// edges check what names resolve to.
    pub fn allowing_private_upstreams(mut self, allow: bool) -> Self {
        self.allow_private_upstreams = allow;
        self
    }

    /// Keep hosts off the edges whose origin tables route them otherwise than the registry
    /// ([`crate::origin_gaps`]).
    pub fn keeping_hosts_off(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// Remember in `taken` the table each edge takes, to compare against when an edge
    /// refusing a later one does not let its own be read.
    pub fn remembering_tables(mut self, taken: Arc<TakenTables>) -> Self {
        self.taken = Some(taken);
        self
    }

    /// Ask for an origin push now.
    pub fn origins_changed(&self) {
        self.changed.notify_one();
    }

    async fn push_origins(&self) {
        use std::sync::atomic::Ordering;
        let table = self.origin_table();
        let empty = table.body["origins"]
            .as_array()
            .is_none_or(|rows| rows.is_empty());
        if empty && !self.empty_push_allowed.load(Ordering::Acquire) {
            return;
        }
        if !empty {
            self.empty_push_allowed.store(true, Ordering::Release);
        }
        self.push_all(&Push::Origins(table)).await;
    }

    /// The origin table to push: the registry's, with its fingerprint and rows by host
    /// (worked out again only when it changed).
    fn origin_table(&self) -> OriginTable {
        self.table_of(self.origins_body())
    }

    /// `body` as an [`OriginTable`].
    fn table_of(&self, body: serde_json::Value) -> OriginTable {
        let fingerprint = xxhash_rust::xxh3::xxh3_64(body["origins"].to_string().as_bytes());
        let mut last = self.pushed.lock();
        let rows = match &*last {
            Some((f, rows)) if *f == fingerprint => rows.clone(),
            _ => {
                let rows = body["origins"].as_array().map(Vec::as_slice);
                let rows = Arc::new(crate::origin_gaps::host_rows(rows.unwrap_or_default()));
                *last = Some((fingerprint, rows.clone()));
                rows
            }
        };
        OriginTable {
            body,
            fingerprint,
            rows,
        }
    }

    /// The origin table as pushed to the edges.
    fn origins_body(&self) -> serde_json::Value {
        let rows: Vec<_> = self
            .registry
            .origins()
            .into_iter()
            .map(|o| {
                let mut row = json!({ "host": o.host, "upstream": o.upstream });
                // Only when set: an edge older than the field refuses rows that carry it.
                if o.forward_host {
                    row["forward_host"] = json!(true);
                }
                if o.strip_set_cookie {
                    row["strip_set_cookie"] = json!(true);
                }
                if !o.cache_key_ignore_query.is_empty() {
                    row["cache_key_ignore_query"] = json!(o.cache_key_ignore_query);
                }
                // The edges' floor for the host: what they cached before it is a previous
                // owner's (an edge down through both the delete's purge and the one at
                // registration would otherwise serve it).
                if o.registered_at_ms > 0 {
                    row["registered_at_ms"] = json!(o.registered_at_ms);
                }
                row
            })
            .collect();
        let registrations = rows.iter().any(|r| r.get("registered_at_ms").is_some());
        let mut body = json!({ "origins": rows });
        // The clock the registration times are read against: edges translate them by age,
        // so an offset between this clock and theirs does not move a host's floor.
        if registrations {
            body["sent_at_ms"] = json!(crate::clock::wall_ms());
        }
        // Only when set, like `forward_host`.
        if self.allow_private_upstreams {
            body["allow_private_upstreams"] = json!(true);
        }
        body
    }

    /// Every edge reachable over QUIC at its current address, so each edge knows which peers
    /// it may fill from (and follows a peer that moved within one push). An edge whose
    /// certificate is revoked is left out: no hint or shadow names it as a source, and its
    /// peers need not keep its address.
    async fn push_peers(&self) {
        let reachable: Vec<_> = self
            .fleet
            .edges
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i, e, self.fleet.addresses.get(i).sync?)))
            .collect();
        // A fleet without QUIC has no peers to announce; one whose every peer is revoked
        // announces none, so the edges drop the ones they were given.
        if reachable.is_empty() {
            return;
        }
        let rows: Vec<_> = reachable
            .into_iter()
            .filter(|(i, _, _)| !self.control.as_ref().is_some_and(|c| c.revoked(*i)))
            .map(|(_, e, addr)| json!({ "id": e.id, "addr": addr }))
            .collect();
        self.push_all(&Push::Peers(json!({ "peers": rows }))).await;
    }

    /// `http://<admin>/<path>` on edge `edge`: at the address its probes use (a name with
    /// several addresses must not send a purge to another instance than the one serving), or
    /// by its configured name while that has never resolved.
    fn admin_url(&self, edge: usize, path: &str) -> String {
        match self.fleet.addresses.get(edge).admin {
            Some(a) => format!("http://{a}/{path}"),
            None => format!("http://{}/{path}", self.fleet.edges[edge].admin),
        }
    }

    /// `push` on every edge's admin API.
    async fn push_all(&self, push: &Push) {
        let pushes = (0..self.fleet.edges.len()).map(|i| self.push_to(i, push));
        futures::future::join_all(pushes).await;
    }

    /// `push` on edge `edge`'s admin API; the outcome: `ok`, `partial` (origin rows left
    /// out), `rejected` or `unreachable`.
    async fn push_to(&self, edge: usize, push: &Push) -> &'static str {
        let e = &self.fleet.edges[edge];
        let (what, body, table) = match push {
            Push::Origins(t) => ("origins", &t.body, Some(t)),
            Push::Peers(body) => ("peers", body, None),
        };
        let r = self
            .client
            .put(self.admin_url(edge, what))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await;
        let outcome = match (r, table) {
            (Ok(resp), Some(table)) if resp.status().is_success() => {
                let report = resp.json::<serde_json::Value>().await.unwrap_or_default();
                if crate::origin_gaps::not_applied(&report["rejected"]) {
                    // Answered, but its old table stays in force: as good as refused, and
                    // said so like a refusal (its missed purges wait for a table it takes).
                    if self.table_refused(edge, table).await {
                        tracing::warn!(edge = %e.id, rejected = %report["rejected"],
                            "edge answered the origin table but applied none of it");
                    }
                    "rejected"
                } else {
                    let outcome = self.note_rejected_origins(edge, table, &report["rejected"]);
                    self.save_taken().await;
                    outcome
                }
            }
            (Ok(resp), _) if resp.status().is_success() => "ok",
            (Ok(resp), table) => {
                let status = resp.status();
                tracing::warn!(edge = %e.id, %status, what, "edge rejected push");
                if let Some(table) = table.filter(|_| !transient(status)) {
                    self.table_refused(edge, table).await;
                }
                "rejected"
            }
            (Err(_), _) => "unreachable",
        };
        if table.is_some() && matches!(outcome, "ok" | "partial") {
            self.metrics
                .edge_origin_table_refused
                .with_label_values(&[e.id.as_str()])
                .set(0);
        }
        self.metrics
            .edge_pushes
            .with_label_values(&[what, outcome])
            .inc();
        outcome
    }

    /// Edge `edge` took `table` less the rows it reports `rejected`: remember that, record
    /// the rows left out, logged when the set of their hosts changes (not on every push), and
    /// keep their hosts off it; the push's outcome: `ok`, or `partial` when rows were left
    /// out.
    fn note_rejected_origins(
        &self,
        edge: usize,
        table: &OriginTable,
        rejected: &serde_json::Value,
    ) -> &'static str {
        let edge_id = self.fleet.edges[edge].id.as_str();
        let left_out = crate::origin_gaps::rejected_hosts(rejected);
        let took = if left_out.is_empty() {
            table.rows.clone()
        } else {
            let kept = table
                .rows
                .iter()
                .filter(|(host, _)| !left_out.contains(*host));
            Arc::new(kept.map(|(host, r)| (host.clone(), *r)).collect())
        };
        {
            // Under the lock a comparison applies its result under: one that started before
            // this table was taken cannot overwrite what it says.
            let mut checked = self.gaps_checked.lock();
            self.tables_taken[edge].fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            checked.remove(&edge);
            if let Some(taken) = &self.taken {
                taken.took(edge_id, took);
            }
            self.set_hosts_off(edge, left_out);
        }
        let rows = rejected.as_array().map(Vec::as_slice).unwrap_or_default();
        let n = rows.len();
        self.metrics
            .edge_rejected_origins
            .with_label_values(&[edge_id])
            .set(n as i64);
        let mut hosts: Vec<String> = rows
            .iter()
            .map(|r| r["host"].as_str().unwrap_or_default().to_string())
            .collect();
        hosts.sort();
        let mut last = self.rejected.lock();
        if last.get(edge_id).map_or(n > 0, |h| *h != hosts) {
            if n > 0 {
                // The first few reasons; the rest are in the edge's answer and its GET /origins.
                let sample: Vec<&str> = rows
                    .iter()
                    .take(5)
                    .filter_map(|r| r["error"].as_str())
                    .collect();
                let shown = &hosts[..n.min(20)];
                tracing::warn!(edge = %edge_id, rows = n, hosts = ?shown, ?sample, "edge left out pushed origin rows");
            } else {
                tracing::info!(edge = %edge_id, "edge accepts every pushed origin row again");
            }
            last.insert(edge_id.to_string(), hosts);
        }
        if n > 0 {
            "partial"
        } else {
            "ok"
        }
    }

    /// Write the tables the edges took, when they changed since the last write.
    async fn save_taken(&self) {
        if let Some(taken) = &self.taken {
            taken.save().await;
        }
    }

    /// Edge `edge` refuses `table`, or takes it but applies none of it: its routing stays by the
    /// table it last took. Said by `shadowcdn_broker_edge_origin_table_refused`, and the hosts
    /// that table routes otherwise are kept off it; whether it was not refusing before.
    async fn table_refused(&self, edge: usize, table: &OriginTable) -> bool {
        let refused =
            (self.metrics.edge_origin_table_refused)
                .with_label_values(&[self.fleet.edges[edge].id.as_str()]);
        let newly = refused.get() == 0;
        refused.set(1);
        self.keep_stale_hosts_off(edge, table).await;
        newly
    }

    /// While edge `edge` refuses the origin table `table`, keep off it the hosts that the table
    /// it holds (its `GET /origins`) routes otherwise. Read again when the registry's table
    /// changes and at least every [`GAP_RECHECK`] (the edge may have restarted on another
    /// table, or its name now reach another instance); what it reads is remembered as the
    /// table the edge took. When its table cannot be read (it refuses the broker's credentials
    /// too) the table it last took stands for it; when that is not known either, the hosts
    /// kept off stay as they were. A table that cannot be read is not asked for again before
    /// [`GAP_RECHECK`].
    async fn keep_stale_hosts_off(&self, edge: usize, table: &OriginTable) {
        use std::sync::atomic::Ordering;
        if self.health.is_none() {
            return;
        }
        let (fingerprint, current) = (table.fingerprint, &table.rows);
        let last = self.gaps_checked.lock().get(&edge).copied();
        if last.is_some_and(|c| c.fingerprint == fingerprint && c.at.elapsed() < GAP_RECHECK) {
            return;
        }
        let taken = self.tables_taken[edge].load(Ordering::Acquire);
        let id = &self.fleet.edges[edge].id;
        let held = self
            .client
            .get(self.admin_url(edge, "origins"))
            .bearer_auth(&self.token)
            // A table near the push limit takes longer than a push's answer; the push round
            // waits for it, so not much longer.
            .timeout(GAP_READ_TIMEOUT)
            .send()
            .await
            .and_then(|r| r.error_for_status());
        let held = match held {
            Ok(r) => r.json::<serde_json::Value>().await,
            Err(e) => Err(e),
        };
        let found = held.is_ok();
        let check = GapCheck {
            fingerprint,
            at: std::time::Instant::now(),
            found,
        };
        let read = {
            let mut checked = self.gaps_checked.lock();
            if self.tables_taken[edge].load(Ordering::Acquire) != taken {
                // It took a table meanwhile: this comparison is out of date.
                return;
            }
            checked.insert(edge, check);
            match held {
                Ok(held) => {
                    let pushed = held["pushed"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    let held = Arc::new(crate::origin_gaps::host_rows(pushed));
                    self.set_hosts_off(edge, crate::origin_gaps::differing(current, &held));
                    if let Some(taken) = &self.taken {
                        taken.took(id, held);
                    }
                    true
                }
                Err(e) => {
                    self.keep_off_since_taken(edge, current, &e, last.is_some_and(|c| !c.found));
                    false
                }
            }
        };
        if read {
            self.save_taken().await;
        }
    }

    /// Edge `edge`'s own table could not be read (`error`): keep off it the hosts of
    /// `current` that differ from the table it last took, if that is known; `said` when the
    /// last read failed too (its warning was logged then).
    fn keep_off_since_taken(
        &self,
        edge: usize,
        current: &HostRows,
        error: &reqwest::Error,
        said: bool,
    ) {
        let id = &self.fleet.edges[edge].id;
        match self.taken.as_ref().and_then(|t| t.get(id)) {
            Some(took) => {
                self.set_hosts_off(edge, crate::origin_gaps::differing(current, &took));
                if !said {
                    tracing::warn!(edge = %id, %error,
                        "edge refuses the origin table and its own cannot be read: hosts changed since the table it last took are kept off it");
                }
            }
            None if !said => {
                tracing::warn!(edge = %id, %error,
                    "edge refuses the origin table, its own cannot be read and none it took is known: the hosts kept off it stay as they were");
            }
            None => {}
        }
    }

    /// Keep `hosts` (and only those) off edge `edge`, logged when the set changes.
    fn set_hosts_off(&self, edge: usize, hosts: std::collections::HashSet<String>) {
        let Some(health) = &self.health else {
            return;
        };
        let n = hosts.len();
        let id = self.fleet.edges[edge].id.as_str();
        if n > 0 {
            let sample: Vec<&String> = hosts.iter().take(20).collect();
            let shown = format!("{sample:?}");
            if health.set_hosts_off(edge, hosts) {
                tracing::warn!(edge = %id, hosts = n, sample = %shown,
                    "hosts kept off the edge: its origin table routes them otherwise");
            }
        } else if health.set_hosts_off(edge, hosts) {
            tracing::info!(edge = %id, "every host routed to the edge again");
        }
        self.metrics
            .edge_hosts_off
            .with_label_values(&[id])
            .set(n as i64);
    }

    /// Cache capacity edge `edge` last reported over QUIC.
    pub fn capacity(&self, edge: usize) -> Option<u64> {
        self.quic(edge)
            .and_then(|c| c.stats(edge))
            .map(|s| s.cache_capacity_bytes)
    }

    /// The shadow bytes `edge` last reported holding (0 when it has not reported).
    pub fn shadow_bytes(&self, edge: usize) -> u64 {
        self.quic(edge)
            .and_then(|c| c.stats(edge))
            .map_or(0, |s| s.shadow_bytes)
    }

    /// The QUIC control channel, when it reaches `edge`.
    fn quic(&self, edge: usize) -> Option<&Control> {
        self.control.as_deref().filter(|c| c.covers(edge))
    }

    /// Ask edge `edge` to shadow an object; when it accepted, the process that did (its boot
    /// id; 0 when not told: an older edge, or the admin API). The deadline and peer only
    /// travel over QUIC (the admin API fills from the origin, first come first served).
    pub async fn shadow(&self, edge: usize, mut order: ShadowOrder) -> Option<u64> {
        let e = &self.fleet.edges[edge];
        // Edges live on the wall clock.
        order.ttl_secs = crate::clock::wall_secs(order.ttl_secs);
        if let Some(c) = self.quic(edge) {
            // An edge writes an accepted refresh down before it answers, so a crash before the
            // refresh runs does not leave the replaced copy served after its restart.
            let key = order.key.clone();
            return match c.call(edge, &Request::Shadow(order)).await {
                Ok(Reply::Done { boot_id, .. }) => Some(boot_id.unwrap_or(0)),
                // Not an acceptance: no shadow is counted live on its word.
                Ok(other) => {
                    tracing::warn!(edge = %e.id, reply = ?other, %key, "shadow order answered out of protocol");
                    None
                }
                Err(err) => {
                    tracing::warn!(edge = %e.id, error = %err, %key, "shadow order failed");
                    None
                }
            };
        }
        let key = order.key.as_str();
        // The admin API cannot revalidate in place: drop the old copy, then refill. A purge
        // the edge did not confirm fails the refresh (the caller then purges it the way that
        // reports and queues a miss), or the refill would be a hit on the old copy.
        if order.refresh {
            let purge = Purge::Target(key);
            let status = self.purge(edge, &purge, FAN_OUT_PATIENCE).await;
            if !purge.confirmed(status) {
                tracing::warn!(edge = %e.id, %key, status, "refresh's purge not confirmed");
                return None;
            }
        }
        let body = json!({ "key": key, "ttl_secs": order.ttl_secs, "priority": order.priority });
        match self
            .client
            .post(self.admin_url(edge, "shadows"))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Some(0),
            Ok(r) => {
                tracing::warn!(edge = %e.id, status = %r.status(), %key, "edge refused a shadow");
                None
            }
            Err(err) => {
                tracing::warn!(edge = %e.id, error = %err, %key, "edge unreachable for a shadow");
                None
            }
        }
    }

    /// Edges that restarted since the last call ([`Control::take_restarted`]); none without
    /// QUIC control.
    pub fn take_restarted(&self) -> Vec<usize> {
        self.control
            .as_ref()
            .map_or_else(Vec::new, |c| c.take_restarted())
    }

    /// Wait until the edges' first stats were polled (at once without QUIC control).
    pub async fn first_stats_polled(&self) {
        if let Some(c) = &self.control {
            c.first_poll_done().await;
        }
    }

    /// Wait until an edge is found restarted; never, without QUIC control.
    pub async fn restart_seen(&self) {
        match &self.control {
            Some(c) => c.restart_seen().await,
            None => std::future::pending().await,
        }
    }

    /// The live shadows edge `edge` holds, listed page by page over QUIC, and the process
    /// that holds them (its boot id); `None` when it cannot be asked (no QUIC link,
    /// unreachable, an edge that does not list, or one whose stats this broker has not read
    /// yet), or it restarted while it was listed (its pages name two processes; an older edge
    /// that names none: a poll saw it restart meanwhile).
    pub async fn live_shadows(&self, edge: usize) -> Option<(Vec<LiveShadow>, u64)> {
        let c = self.quic(edge)?;
        // A listing describes one edge process. Until a stats report has named it (its boot
        // id), a restart right after the listing would go unnoticed and the shadows listed
        // would be counted live after the restart dropped them.
        let polled = c.stats(edge)?.boot_id;
        // The process each page names (an older edge names none: the last poll's is taken).
        let mut listed_by: Option<u64> = None;
        let mut unnamed = false;
        let mut out = Vec::new();
        let mut listed_bytes = 0usize;
        let mut after = None;
        loop {
            let req = Request::Shadows {
                after: after.clone(),
            };
            match c.call(edge, &req).await {
                Ok(Reply::ShadowPage {
                    shadows,
                    more,
                    boot_id,
                }) => {
                    unnamed |= boot_id.is_none();
                    let page_by = boot_id.unwrap_or(polled);
                    if listed_by.is_some_and(|b| b != page_by) {
                        // The edge restarted while listing: the pages are of two processes.
                        return None;
                    }
                    listed_by = Some(page_by);
                    let last = shadows.last().map(|s| s.key.clone());
                    // Pages come in key order; a cursor that does not advance (or a listing
                    // past any edge's capacity) would page forever.
                    if last.is_some() && last <= after || out.len() >= MAX_LISTED_SHADOWS {
                        let e = &self.fleet.edges[edge];
                        tracing::warn!(edge = %e.id, listed = out.len(), "edge's shadow listing does not advance; ignored");
                        return None;
                    }
                    after = last;
                    // Keys no order could name, or more key bytes than any edge's capacity
                    // of shadows, are not a listing to adopt.
                    listed_bytes += shadows.iter().map(|s| s.key.len()).sum::<usize>();
                    let bad_key = shadows.iter().any(|s| s.key.len() > MAX_KEY_BYTES);
                    if bad_key || listed_bytes > MAX_LISTED_KEY_BYTES {
                        let e = &self.fleet.edges[edge];
                        tracing::warn!(edge = %e.id, listed = out.len(), listed_bytes, "edge's shadow listing has keys too long or too many; ignored");
                        return None;
                    }
                    out.extend(shadows);
                    if !more || after.is_none() {
                        let polled_since = c.stats(edge).map(|s| s.boot_id);
                        let same = !unnamed || polled_since == Some(polled);
                        return same.then_some((out, page_by));
                    }
                }
                other => {
                    let e = &self.fleet.edges[edge];
                    tracing::debug!(edge = %e.id, reply = ?other, "edge did not list its shadows");
                    return None;
                }
            }
        }
    }

    /// Ask edge `edge` to drop its shadow of `key`; whether it confirmed (it dropped it, or
    /// held none).
    pub async fn unshadow(&self, edge: usize, key: &str) -> bool {
        if let Some(c) = self.quic(edge) {
            let req = Request::Unshadow {
                key: key.to_string(),
            };
            return matches!(c.call(edge, &req).await, Ok(Reply::Done { .. }));
        }
        self.client
            .delete(self.admin_url(edge, &format!("shadows/{key}")))
            .bearer_auth(&self.token)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND)
    }

    /// Apply `purge` on edge `edge`, waiting at most `patience` for each way of reaching it;
    /// the HTTP status (or its QUIC equivalent), 0 when unreachable or out of time.
    async fn purge(&self, edge: usize, purge: &Purge<'_>, patience: Duration) -> u16 {
        if let Some(c) = self.quic(edge) {
            let req = match purge {
                Purge::Target(target) => Request::Invalidate {
                    target: target.to_string(),
                },
                Purge::Tags { host, tags } => Request::InvalidateTags {
                    host: host.to_string(),
                    tags: tags.to_vec(),
                },
            };
            match c.call_within(edge, &req, patience).await {
                Ok(Reply::Done { found: true, .. }) => return 200,
                Ok(Reply::Done { found: false, .. }) => return 404,
                // Any other answer to a purge is a protocol fault, not a confirmation: the
                // purge is tried again.
                Ok(other) => {
                    tracing::error!(edge = %self.fleet.edges[edge].id, reply = ?other,
                        "edge answers a purge with something else than done");
                    return 502;
                }
                // The channel refused the broker itself (its certificate is not the broker's
                // name, the edge speaks another protocol version): not the purge's fault, and
                // the admin API, authenticated by token, may take it.
                Err(ControlError::Refused {
                    code: code @ (ErrorCode::Forbidden | ErrorCode::Version),
                    ..
                }) => {
                    tracing::error!(edge = %self.fleet.edges[edge].id, ?code,
                        "edge refuses the broker on the control channel; purging over its admin API");
                }
                // As the admin API would answer: an edge's own failure is not a bad request.
                Err(ControlError::Refused { code, .. }) => {
                    return match code {
                        ErrorCode::Invalid => 400,
                        ErrorCode::NotFound => 404,
                        ErrorCode::Busy => 503,
                        ErrorCode::Forbidden
                        | ErrorCode::Version
                        | ErrorCode::Internal
                        | ErrorCode::Unknown => 500,
                    }
                }
                // The QUIC link is down (a certificate, a firewall): the admin API may still
                // reach the edge, and a purge must not wait for the link.
                Err(_) => {}
            }
        }
        let req = match purge {
            Purge::Target(target) => {
                let method =
                    reqwest::Method::from_bytes(b"PURGE").unwrap_or(reqwest::Method::DELETE);
                self.client
                    .request(method, self.admin_url(edge, &format!("cache/{target}")))
            }
            Purge::Tags { host, tags } => self
                .client
                .post(self.admin_url(edge, &format!("tags/{host}")))
                .json(&json!({ "tags": tags })),
        };
        let Ok(resp) = req.bearer_auth(&self.token).timeout(patience).send().await else {
            return 0;
        };
        let status = resp.status().as_u16();
        if status == 404 && matches!(purge, Purge::Target(_)) {
            // Only the edge's own "not held" (`"purged": false`) confirms a key purge: a 404
            // from a route it lacks or another service at its address purged nothing.
            let not_held = resp
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|v| v.get("purged").and_then(serde_json::Value::as_bool) == Some(false));
            if !not_held {
                tracing::error!(edge = %self.fleet.edges[edge].id,
                    "edge admin API answers a purge 404 without saying the key is not held");
                return 502;
            }
        }
        status
    }

    /// Purge `target` (`host/path` or `host/prefix*`) on every edge.
    pub async fn purge_everywhere(self: &Arc<Self>, target: &str) -> Vec<EdgeResult> {
        self.purge_all_but(target, &[]).await
    }

    /// Purge `target` on every edge except `spare` (edges about to refresh it instead).
    pub async fn purge_all_but(self: &Arc<Self>, target: &str, spare: &[usize]) -> Vec<EdgeResult> {
        let edges: Vec<usize> = (0..self.fleet.edges.len())
            .filter(|e| !spare.contains(e))
            .collect();
        self.purge_on(target, &edges).await
    }

    /// `target` changed and is about to be refreshed on `edges` instead of purged there. Until
    /// [`Self::sent`], a purge of it for those edges is written down as being sent: a
    /// broker that crashes before their refresh orders are accepted purges their copies when
    /// it restarts, instead of leaving the old version served for the rest of its TTL.
    pub async fn refreshing(&self, target: &str, edges: &[usize]) -> Option<Ticket> {
        let purge = PendingPurge::Target {
            target: target.to_string(),
        };
        self.sending(purge, edges).await
    }

    /// Write `purge` down (durably) as being sent to `edges`, until [`Self::sent`]: a broker
    /// that stops in between queues it for them at its next start. `None` without redelivery
    /// or edges.
    async fn sending(&self, purge: PendingPurge, edges: &[usize]) -> Option<Ticket> {
        let r = self.redelivery.as_ref().filter(|_| !edges.is_empty())?;
        let ticket = r.begin(purge, edges);
        r.save().await;
        Some(ticket)
    }

    /// What [`Self::sending`] wrote down was delivered, queued, or (for
    /// [`Self::refreshing`]) ordered refreshed instead; whether the queues are on disk.
    pub async fn sent(&self, ticket: Option<Ticket>) -> bool {
        match (&self.redelivery, ticket) {
            (Some(r), Some(t)) => {
                r.finish(t);
                r.save().await
            }
            _ => true,
        }
    }

    /// Purge `target` on `edges`, concurrently.
    pub async fn purge_on(self: &Arc<Self>, target: &str, edges: &[usize]) -> Vec<EdgeResult> {
        let purge = PendingPurge::Target {
            target: target.to_string(),
        };
        self.apply_purge(purge, edges.to_vec()).await
    }

    /// Purge every object of `host` tagged with one of `tags` (checked by
    /// [`edge_node::tags::check`]) on every edge.
    pub async fn purge_tags_everywhere(
        self: &Arc<Self>,
        host: &str,
        tags: &[String],
    ) -> Vec<EdgeResult> {
        let purge = PendingPurge::Tags {
            host: host.to_string(),
            tags: tags.to_vec(),
        };
        self.apply_purge(purge, (0..self.fleet.edges.len()).collect())
            .await
    }

    /// Fan `purge` out to `edges` in a task of its own: a caller that goes away (a client
    /// hanging up on the API) must not cut it short between reaching some edges and queueing
    /// it for those it missed.
    async fn apply_purge(
        self: &Arc<Self>,
        purge: PendingPurge,
        edges: Vec<usize>,
    ) -> Vec<EdgeResult> {
        let this = self.clone();
        let ids: Vec<String> = edges
            .iter()
            .map(|e| self.fleet.edges[*e].id.clone())
            .collect();
        let task = tokio::spawn(async move { this.fan_out(&purge, &edges).await });
        task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "purge fan-out failed");
            ids.into_iter()
                .map(|edge| EdgeResult {
                    edge,
                    ok: false,
                    status: 0,
                    queued: false,
                })
                .collect()
        })
    }

    async fn fan_out(&self, pending: &PendingPurge, edges: &[usize]) -> Vec<EdgeResult> {
        // Edges no longer configured whose queues are kept get it too, written down with it
        // being sent (or on its own when it goes to no configured edge).
        let unmatched = (self.redelivery.as_ref()).is_some_and(|r| r.queue_unmatched(pending));
        let ticket = self.sending(pending.clone(), edges).await;
        if let (true, None, Some(r)) = (unmatched, &ticket, &self.redelivery) {
            r.save().await;
        }
        let purge = Purge::from_pending(pending);
        let calls = edges
            .iter()
            .map(|e| self.purge(*e, &purge, FAN_OUT_PATIENCE));
        let mut results: Vec<EdgeResult> = edges
            .iter()
            .zip(futures::future::join_all(calls).await)
            .map(|(e, status)| {
                let ok = purge.confirmed(status);
                let queued = match &self.redelivery {
                    Some(r) if !ok && passing(status) => {
                        r.queue(*e, pending.clone());
                        true
                    }
                    _ => false,
                };
                EdgeResult {
                    edge: self.fleet.edges[*e].id.clone(),
                    ok,
                    status,
                    queued,
                }
            })
            .collect();
        // A purge queued for an edge is a promise that it gets it before serving again,
        // across a broker restart too: not made when the queue could not be written down (a
        // full or failing disk). The edges stay held while this broker runs; the caller hears
        // they missed it, and may send it again.
        if !self.sent(ticket).await {
            for r in &mut results {
                r.queued = false;
            }
        }
        results
    }

    /// Start a redelivery round ([`Self::redeliver_to`]) for every edge with missed purges
    /// and none running. Each edge's round is a task of its own, so one edge slow to answer
    /// holds up neither the other edges' rounds nor the next tick. A round ends early when
    /// `stop` says the server is stopping, keeping what it delivered.
    pub fn redeliver(self: &Arc<Self>, stop: &ShutdownWatch) {
        let Some(r) = &self.redelivery else {
            return;
        };
        for edge in r.edges_pending() {
            if !self.rounds.lock().insert(edge) {
                continue;
            }
            let round = Round {
                sync: self.clone(),
                edge,
                _working: self.inflight.enter(),
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                round.sync.redeliver_to(round.edge, stop).await;
            });
        }
    }

    /// Deliver `edge`'s missed purges again, in order, up to the first one that fails for a
    /// passing reason (the rest wait for the next round) and at most
    /// [`REDELIVERIES_PER_ROUND`]. One the edge refuses for good (a 4xx other than those
    /// [`passing`] retries) is replaced by the purge of its whole host, once per host and
    /// round; refused too, the edge stays held, out of routing, for the operator (logged once).
    /// Each purge gets
    /// [`REDELIVERY_PATIENCE`], not the fan-out's few seconds: an edge whose ban log's fsync
    /// waits behind a busy disk for longer would otherwise time out on every round and never
    /// take traffic again. A stop cuts the purge in flight short (it is sent again after a
    /// restart; purges are idempotent) and records the ones confirmed before it.
    async fn redeliver_to(&self, edge: usize, stop: ShutdownWatch) {
        let Some(r) = &self.redelivery else {
            return;
        };
        let stop = stopping(stop);
        tokio::pin!(stop);
        let (generation, queue) = r.pending(edge);
        // The origin table first: an edge back from a stop restored the table it last had,
        // which may route a host deleted (and registered again by another provider) since to
        // its old origin. It is released only with the current one.
        let origins = Push::Origins(self.origin_table());
        let pushed = tokio::select! {
            pushed = self.push_to(edge, &origins) => pushed,
            _ = &mut stop => return,
        };
        if !matches!(pushed, "ok" | "partial") {
            return;
        }
        let mut done = 0;
        let mut widened = std::collections::HashSet::new();
        for p in queue.iter().take(REDELIVERIES_PER_ROUND) {
            let purge = Purge::from_pending(p);
            let status = tokio::select! {
                status = self.purge(edge, &purge, REDELIVERY_PATIENCE) => status,
                _ = &mut stop => break,
            };
            let mut outcome = if purge.confirmed(status) {
                "confirmed"
            } else if passing(status) {
                "failed"
            } else {
                "refused"
            };
            // A purge the edge refuses outright (one it cannot read: a tag purge on an edge
            // from before tags) was acknowledged to its provider all the same: the host-wide
            // purge that covers it goes instead, and only once that is confirmed is it done.
            // Refused too, the edge stays held, out of routing, for the operator.
            if outcome == "refused" {
                let id = &self.fleet.edges[edge].id;
                // Logged once per edge and purge, not at every round it stays held for it.
                let first_refusal = {
                    let mut logged = self.refusals_logged.lock();
                    if logged.len() >= 1024 {
                        logged.clear();
                    }
                    logged.insert((edge, p.dedup_key()))
                };
                let wider = p.host_wide().filter(|w| {
                    !matches!(p, crate::redelivery::PendingPurge::Target { target } if target == w)
                });
                match wider {
                    // One host-wide purge per host and round covers all its refused ones.
                    Some(target) if widened.contains(&target) => outcome = "widened",
                    Some(target) => {
                        let pending = crate::redelivery::PendingPurge::Target {
                            target: target.clone(),
                        };
                        let wide = Purge::from_pending(&pending);
                        let wide_status = tokio::select! {
                            status = self.purge(edge, &wide, REDELIVERY_PATIENCE) => status,
                            _ = &mut stop => break,
                        };
                        if wide.confirmed(wide_status) {
                            tracing::warn!(edge = %id, status, purge = ?p,
                                "edge refuses a purge it missed: its host was purged whole instead");
                            widened.insert(target);
                            outcome = "widened";
                        } else if passing(wide_status) {
                            // Not refused, only not done: tried again next round.
                            outcome = "failed";
                        } else if first_refusal {
                            tracing::error!(edge = %id, status, wide_status, purge = ?p,
                                "edge refuses a purge it missed, and the host-wide purge too: it stays out of routing");
                        }
                    }
                    None if first_refusal => {
                        tracing::error!(edge = %id, status, purge = ?p,
                            "edge refuses a host-wide purge it missed: it stays out of routing");
                    }
                    None => {}
                }
            }
            self.metrics
                .purge_redeliveries
                .with_label_values(&[outcome])
                .inc();
            if matches!(outcome, "failed" | "refused") {
                break;
            }
            done += 1;
        }
        r.delivered(edge, generation, done);
        if done > 0 {
            r.save().await;
        }
    }
}

/// Resolves once `stop` says the server is stopping, or can no longer say.
async fn stopping(mut stop: ShutdownWatch) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// An edge's redelivery round in progress: another is not started until it ends (or its task
/// is dropped), and a graceful stop waits for it.
struct Round {
    sync: Arc<EdgeSync>,
    edge: usize,
    _working: InflightGuard,
}

impl Drop for Round {
    fn drop(&mut self) {
        self.sync.rounds.lock().remove(&self.edge);
    }
}

/// What a push sends an edge.
enum Push {
    /// The origin table (`PUT /origins`).
    Origins(OriginTable),
    /// The peers it may fill from (`PUT /peers`).
    Peers(serde_json::Value),
}

/// An origin table as pushed, with what comparing it with an edge's takes, worked out once
/// for every edge.
struct OriginTable {
    body: serde_json::Value,
    /// Of its rows: tells a table the registry changed from the last.
    fingerprint: u64,
    /// Its rows by host.
    rows: Arc<HostRows>,
}

/// How long a purge fanned out from the API waits for each edge: the caller waits for the
/// slowest, and an edge that has not answered by then is queued for redelivery (and held out
/// of routing until it confirms).
const FAN_OUT_PATIENCE: Duration = Duration::from_secs(3);

/// An edge refusing the origin table has its own read again at least this often.
const GAP_RECHECK: Duration = Duration::from_secs(60);

/// Longest a read of an edge's own origin table may take.
const GAP_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The last read of an edge's own origin table while it refuses the broker's.
#[derive(Debug, Clone, Copy)]
struct GapCheck {
    /// Of the broker's table it was compared against.
    fingerprint: u64,
    at: std::time::Instant,
    /// Whether the edge's table could be read.
    found: bool,
}

/// How long a redelivered purge waits for its edge: long enough for a ban log's fsync on a
/// busy disk. Only that edge's round waits.
const REDELIVERY_PATIENCE: Duration = Duration::from_secs(15);

/// Most missed purges one redelivery round sends one edge; the rest go in its next round.
const REDELIVERIES_PER_ROUND: usize = 1_000;

/// Whether an edge's refusal says only that it could not take the push now (busy, timed
/// out, throttled): it takes a later one. Any other would come again.
fn transient(status: reqwest::StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 503)
}

/// Whether a purge an edge did not confirm may pass on a later try: it was unreachable,
/// failed (5xx), timed out or was throttled (408, 429), or refused the broker's credentials
/// (401, 403: a token rotated on one side only). Until it passes the edge is held out of
/// routing — an edge that cannot be told to purge may serve what a provider removed. Any other
/// refusal (a 4xx: a request it cannot take, an edge too old to know tags) would be refused
/// again, so it is dropped.
fn passing(status: u16) -> bool {
    status == 0 || status >= 500 || matches!(status, 401 | 403 | 408 | 429)
}

impl Purge<'_> {
    /// Whether the edge's answer confirms the purge. A key an edge does not hold is purged
    /// there too (404); a tag ban is always recorded, so anything but 200 (an edge too old to
    /// know tags) is a failure.
    fn confirmed(&self, status: u16) -> bool {
        match self {
            Purge::Target(_) => status == 200 || status == 404,
            Purge::Tags { .. } => status == 200,
        }
    }

    fn from_pending(p: &PendingPurge) -> Purge<'_> {
        match p {
            PendingPurge::Target { target } => Purge::Target(target),
            PendingPurge::Tags { host, tags } => Purge::Tags { host, tags },
        }
    }
}

/// The ticks of the pushes and redeliveries: every 3 s, and a round that overran is not
/// followed by a burst of catch-up rounds.
fn rounds() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Background service running the push loop.
pub struct OriginPusher(pub Arc<EdgeSync>);

#[async_trait]
impl BackgroundService for OriginPusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = rounds();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.0.changed.notified() => {}
                _ = shutdown.changed() => return,
            }
            self.0.push_origins().await;
            self.0.push_peers().await;
        }
    }
}

/// Background service delivering missed purges again ([`crate::redelivery`]), every 3 s, apart
/// from the origin pushes so that a long queue does not hold them up.
pub struct PurgeRedeliverer(pub Arc<EdgeSync>);

#[async_trait]
impl BackgroundService for PurgeRedeliverer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = rounds();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            // Queues a failed write left in memory only are written again.
            if let Some(r) = &self.0.redelivery {
                r.save_in_background();
            }
            self.0.redeliver(&shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::{any, put};

    use super::*;
    use crate::routing::Health;

    /// A broker's fleet from the sample config (its first two edges' admin APIs at `edges`),
    /// with its pending-purge file in `dir`.
    struct Setup {
        fleet: Arc<Fleet>,
        health: Arc<Health>,
        metrics: BrokerMetrics,
        dir: std::path::PathBuf,
    }

    impl Setup {
        fn new(dir: &std::path::Path, edges: &[std::net::SocketAddr]) -> Setup {
            let mut cfg = crate::config::tests::SAMPLE.to_string();
            for (sample, edge) in ["127.0.0.1:9101", "127.0.0.1:9102"].iter().zip(edges) {
                cfg = cfg.replace(sample, &edge.to_string());
            }
            let cfg = crate::BrokerConfig::from_toml(&cfg).unwrap();
            let fleet = Arc::new(Fleet::new(&cfg));
            Setup {
                health: Arc::new(Health::new(fleet.edges.len(), 1, 1)),
                fleet,
                metrics: BrokerMetrics::register(&prometheus::Registry::new()).unwrap(),
                dir: dir.to_path_buf(),
            }
        }

        /// The pending purges as saved (opened again after a stop).
        fn redelivery(&self) -> Arc<Redelivery> {
            let path = self.dir.join("pending-purges.json");
            let r = Redelivery::open(
                path,
                self.fleet.clone(),
                self.health.clone(),
                self.metrics.clone(),
            );
            Arc::new(r.unwrap())
        }

        /// The tables the edges took, as saved (opened again after a stop).
        fn taken(&self) -> Arc<TakenTables> {
            let path = self.dir.join("edge-tables.json");
            let ids: Vec<&str> = self.fleet.edges.iter().map(|e| e.id.as_str()).collect();
            Arc::new(TakenTables::open(path, &ids, self.metrics.clone()))
        }

        fn sync(&self, redelivery: Arc<Redelivery>) -> EdgeSync {
            let registry = Arc::new(Registry::open(&self.dir.join("registry.redb")).unwrap());
            EdgeSync::new(
                self.fleet.clone(),
                registry,
                "token".into(),
                self.metrics.clone(),
                None,
            )
            .redelivering(redelivery)
        }
    }

    impl EdgeSync {
        /// Push the origin table `body` to edge `edge`.
        async fn push_table(&self, edge: usize, body: &serde_json::Value) -> &'static str {
            self.push_to(edge, &Push::Origins(self.table_of(body.clone())))
                .await
        }
    }

    /// An edge admin API that takes every origin push and confirms every purge after `delay`
    /// (a ban log's fsync behind a busy disk); its address.
    async fn edge_admin(delay: Duration) -> std::net::SocketAddr {
        let app = axum::Router::new()
            .route("/origins", put(|| async { axum::Json(json!({})) }))
            .route(
                "/cache/{*key}",
                any(move || async move {
                    tokio::time::sleep(delay).await;
                    "purged"
                }),
            );
        serve(app).await
    }

    /// Serve `app` on a loopback port of its own; its address.
    async fn serve(app: axum::Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// An edge that refuses the origin table for good is named until it takes one; a busy
    /// one, or a refused peer list, is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_edge_refusing_the_origin_table_is_named_until_it_takes_one() {
        use std::sync::atomic::{AtomicU16, Ordering};
        let answer = Arc::new(AtomicU16::new(401));
        let status = answer.clone();
        let app = axum::Router::new().route(
            "/{table}",
            put(move || async move {
                let code = status.load(Ordering::Acquire);
                // 299: a 200 whose report says none of the table was applied.
                let rejected = if code == 299 {
                    json!([{ "host": "", "reason": "unknown field" }])
                } else {
                    json!([])
                };
                let body = axum::Json(json!({ "origins": 1, "rejected": rejected }));
                let code = if code == 299 { 200 } else { code };
                (axum::http::StatusCode::from_u16(code).unwrap(), body)
            }),
        );
        let edge = serve(app).await;
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup::new(dir.path(), &[edge]);
        let sync = setup.sync(setup.redelivery());
        let refused = || {
            setup
                .metrics
                .edge_origin_table_refused
                .with_label_values(&[setup.fleet.edges[0].id.as_str()])
                .get()
        };
        let table = json!({ "origins": [] });
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!(refused(), 1, "a token rotated on one side");
        answer.store(503, Ordering::Release);
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!(refused(), 1, "still on the table it last took");
        answer.store(200, Ordering::Release);
        assert_eq!(sync.push_table(0, &table).await, "ok");
        assert_eq!(refused(), 0);
        answer.store(503, Ordering::Release);
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!(refused(), 0, "busy is no refusal");
        answer.store(400, Ordering::Release);
        assert_eq!(
            sync.push_to(0, &Push::Peers(table.clone())).await,
            "rejected"
        );
        assert_eq!(refused(), 0, "the peer list is another table");
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!(refused(), 1);
        answer.store(200, Ordering::Release);
        assert_eq!(sync.push_table(0, &table).await, "ok");
        answer.store(299, Ordering::Release);
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!(refused(), 1, "answered, but none of it applied");
    }

    /// While an edge refuses the origin table, the hosts its own table routes otherwise
    /// (changed or registered since) are kept off it, and only those; the edge's table is read
    /// again only when the registry's changes. Rows it leaves out of a table it takes keep
    /// their hosts off it; a table taken whole brings every host back. When its table cannot
    /// be read either (a token rotated on one side only), the one it last took stands for it,
    /// also after the broker restarts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hosts_an_edge_routes_otherwise_are_kept_off_it() {
        use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
        let answer = Arc::new(AtomicU16::new(413));
        let readable = Arc::new(AtomicU16::new(200));
        let reads = Arc::new(AtomicUsize::new(0));
        // The rows the fake edge routes by: those of the last table it took.
        let held = Arc::new(parking_lot::Mutex::new(json!([
            { "host": "same.test", "upstream": "http://a:80" },
            { "host": "moved.test", "upstream": "http://old:80" },
        ])));
        let (status, counted, held_status) = (answer.clone(), reads.clone(), readable.clone());
        let (taking, listing) = (held.clone(), held.clone());
        let app = axum::Router::new().route(
            "/origins",
            put(
                move |axum::Json(table): axum::Json<serde_json::Value>| async move {
                    let code = status.load(Ordering::Acquire);
                    let mut rows = table["origins"].as_array().cloned().unwrap_or_default();
                    let rejected = if code == 207 {
                        rows.retain(|r| r["host"] != "moved.test");
                        json!([{ "index": 1, "host": "moved.test", "error": "unresolvable" }])
                    } else {
                        json!([])
                    };
                    if matches!(code, 200 | 207) {
                        *taking.lock() = json!(rows);
                    }
                    let code = if code == 207 { 200 } else { code };
                    let body = axum::Json(json!({ "origins": 1, "rejected": rejected }));
                    (axum::http::StatusCode::from_u16(code).unwrap(), body)
                },
            )
            .get(move || async move {
                counted.fetch_add(1, Ordering::AcqRel);
                let code = held_status.load(Ordering::Acquire);
                let body = axum::Json(json!({ "configured": [], "pushed": *listing.lock() }));
                (axum::http::StatusCode::from_u16(code).unwrap(), body)
            }),
        );
        let edge = serve(app).await;
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup::new(dir.path(), &[edge]);
        let sync = setup
            .sync(setup.redelivery())
            .keeping_hosts_off(setup.health.clone())
            .remembering_tables(setup.taken());
        let gauge = || {
            let id = setup.fleet.edges[0].id.as_str();
            setup.metrics.edge_hosts_off.with_label_values(&[id]).get()
        };
        let health = &setup.health;
        let mut table = json!({ "origins": [
            { "host": "same.test", "upstream": "http://a:80" },
            { "host": "moved.test", "upstream": "http://new:80" },
            { "host": "added.test", "upstream": "http://c:80" },
        ]});
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert!(health.serves_host(0, "same.test"));
        assert!(!health.serves_host(0, "moved.test"));
        assert!(!health.serves_host(0, "added.test"));
        assert_eq!((gauge(), reads.load(Ordering::Acquire)), (2, 1));
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!(
            reads.load(Ordering::Acquire),
            1,
            "the same table: not read again"
        );
        table["origins"][2]["upstream"] = json!("http://a:80");
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!(reads.load(Ordering::Acquire), 2);
        assert!(!health.serves_host(0, "added.test") && !health.serves_host(0, "moved.test"));
        answer.store(503, Ordering::Release);
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!(gauge(), 2, "busy: as it was");
        answer.store(207, Ordering::Release);
        assert_eq!(sync.push_table(0, &table).await, "partial");
        assert!(!health.serves_host(0, "moved.test"), "left out");
        assert!(health.serves_host(0, "added.test"));
        assert_eq!(gauge(), 1);
        answer.store(200, Ordering::Release);
        assert_eq!(sync.push_table(0, &table).await, "ok");
        assert!(health.serves_host(0, "moved.test"));
        assert_eq!(gauge(), 0);
        // Refused again after taking one: its table is read again, whatever the registry's.
        // It lost a row since (a name that no longer resolved when it restarted, say).
        held.lock().as_array_mut().unwrap().pop();
        answer.store(413, Ordering::Release);
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!((reads.load(Ordering::Acquire), gauge()), (3, 1));
        assert!(!health.serves_host(0, "added.test"));
        // Its table cannot be read: the one last read stands for it (added.test is still
        // missing there), and it is not asked again at once.
        readable.store(401, Ordering::Release);
        table["origins"][0]["upstream"] = json!("http://z:80");
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!((reads.load(Ordering::Acquire), gauge()), (4, 2));
        assert!(!health.serves_host(0, "same.test"), "changed since");
        assert!(!health.serves_host(0, "added.test"));
        assert!(health.serves_host(0, "moved.test"));
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!(reads.load(Ordering::Acquire), 4);
        // A broker restarted with the other token still knows which table the edge holds.
        drop(sync);
        let setup = Setup::new(dir.path(), &[edge]);
        let sync = setup
            .sync(setup.redelivery())
            .keeping_hosts_off(setup.health.clone())
            .remembering_tables(setup.taken());
        table["origins"][1]["upstream"] = json!("http://newer:80");
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert_eq!(reads.load(Ordering::Acquire), 5);
        for host in ["same.test", "added.test", "moved.test"] {
            assert!(!setup.health.serves_host(0, host), "{host}");
        }
        // Without that memory (its file lost) nothing is known to keep off.
        drop(sync);
        std::fs::remove_file(dir.path().join("edge-tables.json")).unwrap();
        let setup = Setup::new(dir.path(), &[edge]);
        let sync = setup
            .sync(setup.redelivery())
            .keeping_hosts_off(setup.health.clone())
            .remembering_tables(setup.taken());
        assert_eq!(sync.push_table(0, &table).await, "rejected");
        assert!(setup.health.serves_host(0, "same.test"));
    }

    /// A stop ends a redelivery round at once, and the purges it delivered before stay
    /// delivered, on disk too; the one cut short stays queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_ends_a_round_keeping_what_it_delivered() {
        let (reached, mut hanging) = tokio::sync::mpsc::unbounded_channel::<()>();
        let app = axum::Router::new()
            .route("/origins", put(|| async { axum::Json(json!({})) }))
            .route(
                "/cache/{*key}",
                any(
                    move |axum::extract::Path(key): axum::extract::Path<String>| async move {
                        if key.contains("hangs") {
                            let _ = reached.send(());
                            tokio::time::sleep(Duration::from_secs(60)).await;
                        }
                        "purged"
                    },
                ),
            );
        let edge = serve(app).await;
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup::new(dir.path(), &[edge]);
        let redelivery = setup.redelivery();
        for target in ["a.com/first", "a.com/hangs", "a.com/last"] {
            let target = target.to_string();
            redelivery.queue(0, PendingPurge::Target { target });
        }
        redelivery.save().await;
        let inflight = InflightCounter::default();
        let sync = setup.sync(redelivery.clone()).counting_in(inflight.clone());
        let sync = Arc::new(sync);
        let (running, stop) = tokio::sync::watch::channel(false);
        let service = PurgeRedeliverer(sync.clone());
        let service = tokio::spawn(async move { service.start(stop).await });
        // The first tick starts the round; it confirms the first purge and waits on the next.
        tokio::time::timeout(Duration::from_secs(10), hanging.recv())
            .await
            .expect("the round reaches the second purge");
        assert_eq!(inflight.count(), 1, "the round counts as in flight");
        let stopped = Instant::now();
        running.send(true).unwrap();
        service.await.unwrap();
        // What a graceful stop waits for: the round ends, having saved its progress.
        while inflight.count() > 0 {
            assert!(
                stopped.elapsed() < Duration::from_secs(5),
                "the round goes on"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(sync.rounds.lock().is_empty());
        let left = |r: &Redelivery| r.pending(0).1;
        let expect = ["a.com/hangs", "a.com/last"].map(|target| PendingPurge::Target {
            target: target.to_string(),
        });
        assert_eq!(left(&redelivery), expect);
        drop(redelivery);
        assert_eq!(left(&setup.redelivery()), expect, "as saved");
    }

    /// A missed purge the edge refuses outright is replaced by its host-wide purge, and the
    /// edge released once that is confirmed; refused too, the edge stays held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_missed_purge_is_widened_to_its_host_not_dropped() {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let app = axum::Router::new()
            .route("/origins", put(|| async { axum::Json(json!({})) }))
            .route(
                "/cache/{*key}",
                any(
                    |axum::extract::Path(key): axum::extract::Path<String>| async move {
                        if key == "a.com/*" {
                            axum::Json(json!({ "purged": true })).into_response()
                        } else {
                            StatusCode::BAD_REQUEST.into_response()
                        }
                    },
                ),
            );
        let edge = serve(app).await;
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup::new(dir.path(), &[edge]);
        let redelivery = setup.redelivery();
        let sync = Arc::new(setup.sync(redelivery.clone()));
        let (_running, stop) = tokio::sync::watch::channel(false);
        redelivery.queue(
            0,
            PendingPurge::Target {
                target: "a.com/odd".into(),
            },
        );
        assert!(!setup.health.is_up(0), "held");
        sync.redeliver_to(0, stop.clone()).await;
        assert!(redelivery.pending(0).1.is_empty(), "delivered as a.com/*");
        assert!(setup.health.is_up(0));
        // A host-wide purge the edge refuses has nothing wider: the edge stays held.
        redelivery.queue(
            0,
            PendingPurge::Target {
                target: "b.com/*".into(),
            },
        );
        sync.redeliver_to(0, stop).await;
        assert_eq!(redelivery.pending(0).1.len(), 1);
        assert!(!setup.health.is_up(0), "still held");
    }

    /// A refresh ordered in place of a purge is written down as that purge until it is
    /// ordered: a broker that stops in between purges the copies when it starts again.
    #[tokio::test]
    async fn a_refresh_cut_short_by_a_crash_is_queued_as_a_purge() {
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup::new(dir.path(), &[]);
        let sync = setup.sync(setup.redelivery());
        let done = sync.refreshing("a.com/done", &[1]).await;
        sync.sent(done).await;
        let _crashed = sync.refreshing("a.com/cut", &[1]).await;
        assert!(sync.refreshing("a.com/none", &[]).await.is_none());
        drop(sync);
        let reopened = setup.redelivery();
        assert_eq!(reopened.edges_pending(), vec![1]);
        assert_eq!(
            reopened.pending(1).1,
            vec![PendingPurge::Target {
                target: "a.com/cut".into()
            }]
        );
    }

    /// How an edge's answer to a purge is read: only its own "not held" 404 confirms, and a
    /// refusal that can pass later (its token not the broker's, throttling) queues the purge
    /// and holds the edge instead of dropping it; a bad request is dropped.
    #[tokio::test]
    async fn only_a_confirmed_purge_releases_an_edge() {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let app = axum::Router::new().route(
            "/cache/{*key}",
            any(
                |axum::extract::Path(key): axum::extract::Path<String>| async move {
                    let not_held = axum::Json(json!({ "key": key, "purged": false }));
                    match key.rsplit('/').next().unwrap_or_default() {
                        "absent" => (StatusCode::NOT_FOUND, not_held).into_response(),
                        "bare404" => StatusCode::NOT_FOUND.into_response(),
                        "token" => StatusCode::UNAUTHORIZED.into_response(),
                        "throttled" => StatusCode::TOO_MANY_REQUESTS.into_response(),
                        _ => StatusCode::BAD_REQUEST.into_response(),
                    }
                },
            ),
        );
        let edge = serve(app).await;
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup::new(dir.path(), &[edge]);
        let redelivery = setup.redelivery();
        let sync = Arc::new(setup.sync(redelivery.clone()));
        let outcome = |target: &'static str| {
            let sync = sync.clone();
            async move {
                let r = sync.purge_on(target, &[0]).await.remove(0);
                (r.ok, r.queued)
            }
        };
        assert_eq!(outcome("a.com/absent").await, (true, false));
        assert!(setup.health.is_up(0));
        assert_eq!(outcome("a.com/invalid").await, (false, false), "dropped");
        assert!(setup.health.is_up(0));
        for target in ["a.com/bare404", "a.com/token", "a.com/throttled"] {
            assert_eq!(outcome(target).await, (false, true), "{target}");
        }
        assert!(!setup.health.is_up(0), "held until they pass");
        let queued: Vec<_> = redelivery.pending(0).1;
        assert_eq!(queued.len(), 3, "{queued:?}");
    }

    /// A purge an edge confirms only after longer than the fan-out waits is confirmed by
    /// redelivery, which waits longer, so the edge takes traffic again; meanwhile the other
    /// edge's rounds are not held up behind it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_edge_is_redelivered_to_without_holding_up_the_others() {
        let slow = edge_admin(FAN_OUT_PATIENCE + Duration::from_secs(1)).await;
        let fast = edge_admin(Duration::ZERO).await;
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup::new(dir.path(), &[slow, fast]);
        let redelivery = setup.redelivery();
        let health = setup.health.clone();
        let sync = Arc::new(setup.sync(redelivery.clone()));

        let results = sync.purge_on("a.com/x", &[0, 1]).await;
        assert!(!results[0].ok && results[0].queued, "{results:?}");
        assert!(results[1].ok, "{results:?}");
        assert!(!health.is_up(0) && health.is_up(1));

        let (_running, stop) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        sync.redeliver(&stop);
        // The fast edge misses a purge while the slow edge's round is still running: the next
        // tick delivers it at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        redelivery.queue(
            1,
            PendingPurge::Target {
                target: "a.com/y".into(),
            },
        );
        assert!(!health.is_up(1));
        sync.redeliver(&stop);
        while !health.is_up(1) {
            assert!(
                started.elapsed() < FAN_OUT_PATIENCE,
                "held up behind the slow edge"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while !health.is_up(0) {
            assert!(
                started.elapsed() < REDELIVERY_PATIENCE,
                "the slow edge never confirmed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(started.elapsed() > FAN_OUT_PATIENCE);
        assert!(redelivery.edges_pending().is_empty());
    }
}
