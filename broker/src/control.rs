//! The broker's QUIC control channel to the edges (mutual TLS with the cluster CA): shadow,
//! unshadow and invalidate orders, and a stats poll that keeps each edge's counters (shadow
//! hits, wasted shadows, fill sources, capacity) for metrics and the planner's budget.
//!
//! One [`Link`] per edge reconnects with backoff and bounds the orders in flight; an edge
//! that configures no QUIC address is reached over its HTTP admin API instead
//! ([`crate::sync::EdgeSync`] chooses).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use edge_node::shadow::LOST_KEPT;
use edge_node::sync::protocol::{ErrorCode, Reply, Request, StatsReport};
use edge_node::sync::tls::edge_name;
use edge_node::sync::{
    client_endpoint, ClientEndpoint, Link, LinkError, NodeIdentity, SyncError, TlsPaths,
};
use parking_lot::RwLock;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::{Deserialize, Serialize};

use crate::cost::Ledger;
use crate::edge_certs::{EdgeCertificates, EdgeCertsError};
use crate::metrics::BrokerMetrics;
use crate::routing::{Fleet, Health, Holders};

/// Longest wait for an edge's answer to an order.
const ORDER_TIMEOUT: Duration = Duration::from_secs(3);
/// Orders in flight to one edge; beyond it senders wait (backpressure), then fail busy.
const MAX_INFLIGHT: usize = 256;

/// `[control]`: the broker's identity in the cluster PKI.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    /// The cluster CA certificate (PEM).
    pub ca_cert: std::path::PathBuf,
    /// The broker's certificate (PEM), issued for `broker.shadowcdn`.
    pub cert: std::path::PathBuf,
    /// The broker's private key (PEM).
    pub key: std::path::PathBuf,
    /// The cluster CA's revocation list (PEM; `edge-node certs ca` makes it, `certs revoke`
    /// adds to it), read again every 30 s: edges it names are refused at the handshake, and
    /// the broker's open connection to one is closed at its next message.
    #[serde(default)]
    pub crl: Option<std::path::PathBuf>,
    /// Seconds between stats polls (which also re-establish lost connections; fractions
    /// allowed, as for the planner's tick).
    #[serde(default = "default_stats_interval")]
    pub stats_interval_secs: f64,
}

fn default_stats_interval() -> f64 {
    5.0
}

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The edge has no QUIC address.
    #[error("edge has no QUIC address")]
    NoLink,
    /// The name of the edge's QUIC address does not resolve now.
    #[error("edge's QUIC address does not resolve")]
    Unresolved,
    /// The client endpoint could not start.
    #[error(transparent)]
    Start(#[from] SyncError),
    /// The state kept in `data_dir` is unusable (at start).
    #[error(transparent)]
    State(#[from] EdgeCertsError),
    /// Transport failure.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The edge refused, or failed, with `code`.
    #[error("edge refused: {code:?}: {message}")]
    Refused {
        /// The edge's class of refusal.
        code: ErrorCode,
        /// What it said.
        message: String,
    },
}

/// QUIC links to the edges.
pub struct Control {
    identity: NodeIdentity,
    fleet: Arc<Fleet>,
    links: OnceLock<Vec<Option<Arc<Link>>>>,
    endpoint: OnceLock<ClientEndpoint>,
    stats: RwLock<Vec<Option<StatsReport>>>,
    /// Edges seen restarting (a new boot id) since the planner last asked.
    restarted: parking_lot::Mutex<Vec<usize>>,
    /// Woken when an edge is found restarted, so the planner acts before its next tick.
    restart_seen: tokio::sync::Notify,
    /// Per edge, the last shadow-outcome batch received (acknowledged with the next poll).
    received: parking_lot::Mutex<Vec<u64>>,
    /// Per edge, the processes of [`StatsReport::lost_boots`] priced ([`Ledger::lost`]).
    lost_priced: parking_lot::Mutex<Vec<Vec<u64>>>,
    interval: Duration,
    ledger: Arc<Ledger>,
    metrics: BrokerMetrics,
    /// Edges whose certificate the broker's revocation list names are held out of routing.
    health: Arc<Health>,
    /// The certificate each edge last presented, kept across restarts.
    certs: Arc<EdgeCertificates>,
    /// Recent holders of keys (peer fill on): an edge back with an empty cache holds none.
    holders: Option<Arc<Holders>>,
    /// True once the first round of stats polls has ended (each edge answered or failed).
    polled: tokio::sync::watch::Sender<bool>,
}

/// In the broker's `data_dir`: the CRL number of the revocation list last enforced.
pub const CRL_NUMBER_FILE: &str = "quic-crl-number.json";
/// In the broker's `data_dir`: the QUIC certificate each edge last presented.
pub const EDGE_CERTIFICATES_FILE: &str = "quic-edge-certificates.json";

impl ControlSection {
    /// What [`Control::new`] would refuse, without writing to `state_dir`: the identity, a
    /// revocation list older than the one enforced before, a damaged file of the
    /// certificates `edges` presented (for `broker run --preflight`).
    pub fn check<'a>(
        &self,
        state_dir: &std::path::Path,
        edges: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ControlError> {
        let identity = self.identity()?;
        identity
            .check_list_number(&state_dir.join(CRL_NUMBER_FILE))
            .map_err(SyncError::from)?;
        EdgeCertificates::open(&state_dir.join(EDGE_CERTIFICATES_FILE), edges)?;
        Ok(())
    }

    /// The broker's QUIC identity from these files, checked usable as a client's.
    pub fn identity(&self) -> Result<NodeIdentity, SyncError> {
        let identity = NodeIdentity::load(&TlsPaths {
            ca_cert: self.ca_cert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            crl: self.crl.clone(),
        })?;
        identity.client_config()?;
        Ok(identity)
    }
}

impl Control {
    /// Load the broker's identity, and the state it keeps in `state_dir` (the list's CRL
    /// number, the certificates the edges presented); links open on first use.
    pub fn new(
        section: &ControlSection,
        state_dir: &std::path::Path,
        fleet: Arc<Fleet>,
        ledger: Arc<Ledger>,
        metrics: BrokerMetrics,
        health: Arc<Health>,
    ) -> Result<Self, ControlError> {
        let identity = section.identity()?;
        identity
            .remember_list_number(&state_dir.join(CRL_NUMBER_FILE))
            .map_err(SyncError::from)?;
        let certs = Arc::new(EdgeCertificates::open(
            &state_dir.join(EDGE_CERTIFICATES_FILE),
            fleet.edges.iter().map(|e| e.id.as_str()),
        )?);
        // Out of routing from the start, not from the first stats poll.
        for (e, edge) in fleet.edges.iter().enumerate() {
            let kept = certs.get(&edge.id).filter(|_| edge.sync.is_some());
            if kept.is_some_and(|c| identity.trust().revokes_dialled(&edge_name(&edge.id), &c)) {
                health.set_revoked(e, true);
                tracing::warn!(edge = %edge.id,
                    "the certificate this edge last presented is revoked: it takes no traffic until it presents another");
            }
        }
        let n = fleet.edges.len();
        Ok(Control {
            identity,
            fleet,
            links: OnceLock::new(),
            endpoint: OnceLock::new(),
            stats: RwLock::new(vec![None; n]),
            restarted: parking_lot::Mutex::new(Vec::new()),
            restart_seen: tokio::sync::Notify::new(),
            received: parking_lot::Mutex::new(vec![0; n]),
            lost_priced: parking_lot::Mutex::new(vec![Vec::new(); n]),
            interval: Duration::from_secs_f64(
                section
                    .stats_interval_secs
                    .max(crate::planner::MIN_INTERVAL_SECS),
            ),
            ledger,
            metrics,
            health,
            certs,
            holders: None,
            polled: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Forget an edge's holders in `holders` when it restarts with an empty cache.
    pub fn forgetting_holders(mut self, holders: Option<Arc<Holders>>) -> Self {
        self.holders = holders;
        self
    }

    /// Export the QUIC certificate's end and the revocation list's size
    /// (`shadowcdn_broker_quic_*`), read at each scrape.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        self.identity.register_metrics(
            registry,
            edge_node::sync::tls::IdentityMetricNames {
                expiry: "shadowcdn_broker_quic_cert_expiry_timestamp_seconds",
                revoked: "shadowcdn_broker_quic_revoked_certificates",
                list_refused: "shadowcdn_broker_quic_revocation_list_refused",
            },
        )
    }

    /// The links, created inside the calling tokio runtime on first use.
    fn links(&self) -> Result<&[Option<Arc<Link>>], SyncError> {
        if let Some(l) = self.links.get() {
            return Ok(l);
        }
        let like = (0..self.fleet.edges.len())
            .find_map(|e| self.fleet.addresses.get(e).sync)
            .unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
        let endpoint = match self.endpoint.get() {
            Some(e) => e.clone(),
            None => {
                let e = client_endpoint(&self.identity, like)?;
                self.endpoint.get_or_init(|| e).clone()
            }
        };
        let links = self
            .fleet
            .edges
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.sync.as_ref().map(|configured| {
                    // Pointed at the edge's current address before every call.
                    let addr = self.fleet.addresses.get(i).sync;
                    let link = Link::new(
                        endpoint.clone(),
                        addr.unwrap_or_else(|| (like.ip(), configured.port()).into()),
                        edge_name(&e.id),
                        MAX_INFLIGHT,
                    );
                    if let Some(cert) = self.certs.get(&e.id) {
                        link.assume_peer_certificate(cert);
                    }
                    Arc::new(link)
                })
            })
            .collect();
        Ok(self.links.get_or_init(|| links))
    }

    /// Close the links' endpoint, if it was ever opened (shutdown, after the drain): the
    /// edges drop their connections now, not at their idle timeout.
    pub async fn close(&self) {
        if let Some(e) = self.endpoint.get() {
            edge_node::sync::close_endpoint(e).await;
        }
    }

    /// Whether edge `edge` is reached over QUIC.
    pub fn covers(&self, edge: usize) -> bool {
        self.fleet.edges.get(edge).is_some_and(|e| e.sync.is_some())
    }

    /// Send `req` to edge `edge` and wait for its reply; refusals are errors.
    pub async fn call(&self, edge: usize, req: &Request) -> Result<Reply, ControlError> {
        self.call_within(edge, req, ORDER_TIMEOUT).await
    }

    /// [`Self::call`], waiting at most `patience` (a redelivered purge waits longer than an
    /// order whose caller is waiting).
    pub async fn call_within(
        &self,
        edge: usize,
        req: &Request,
        patience: Duration,
    ) -> Result<Reply, ControlError> {
        let link = self
            .links()?
            .get(edge)
            .and_then(|l| l.clone())
            .ok_or(ControlError::NoLink)?;
        let result = match self.fleet.addresses.get(edge).sync {
            Some(addr) => {
                // One deadline for both: moving the link waits for a handshake under way.
                let deadline = tokio::time::Instant::now() + patience;
                let sent = async {
                    tokio::time::timeout_at(deadline, link.retarget(addr))
                        .await
                        .map_err(|_| LinkError::Timeout)?;
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    link.request(req, left).await
                };
                match sent.await {
                    Ok(Reply::Error { code, message }) => {
                        Err(ControlError::Refused { code, message })
                    }
                    Ok(r) => Ok(r),
                    Err(e) => Err(ControlError::Link(e)),
                }
            }
            None => Err(ControlError::Unresolved),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(ControlError::Refused { .. }) => "refused",
            Err(_) => "failed",
        };
        let id = &self.fleet.edges[edge].id;
        self.metrics
            .quic_messages
            .with_label_values(&[req.kind(), outcome])
            .inc();
        self.metrics
            .quic_connected
            .with_label_values(&[id])
            .set(i64::from(link.is_connected()));
        result
    }

    /// The edges that restarted since the last call: their shadow marks are gone, so what
    /// the planner holds live on them is not.
    pub fn take_restarted(&self) -> Vec<usize> {
        std::mem::take(&mut *self.restarted.lock())
    }

    /// Stop hinting edge `e` as a holder of what it served so far (peer fill on).
    fn forget_holders_of(&self, e: usize) {
        if let Some(h) = &self.holders {
            h.forget_edge(e, crate::clock::now_secs());
        }
    }

    /// Wait until the first round of stats polls has ended: from then on the edges that
    /// answered have named their processes, so what they hold can be listed and adopted.
    pub async fn first_poll_done(&self) {
        let mut rx = self.polled.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Wait until an edge is found restarted (at once if one was since the last wait).
    pub async fn restart_seen(&self) {
        self.restart_seen.notified().await;
    }

    /// Whether edge `edge` is held out for a revoked certificate.
    pub fn revoked(&self, edge: usize) -> bool {
        self.health.is_revoked(edge)
    }

    /// The latest stats report of edge `edge`.
    pub fn stats(&self, edge: usize) -> Option<StatsReport> {
        self.stats.read().get(edge).cloned().flatten()
    }

    /// Hold edge `e` out of routing while its link says the broker's revocation list names
    /// its certificate, and release it once it presents another. Only the stats poll notes
    /// it, one call per edge at a time, so orders racing a redial cannot note a stale state.
    fn note_revoked(&self, e: usize) {
        let Some(link) = self.links().ok().and_then(|l| l.get(e).cloned().flatten()) else {
            return;
        };
        let id = &self.fleet.edges[e].id;
        let revoked = link.peer_revoked();
        if self.health.set_revoked(e, revoked) == revoked {
            return;
        }
        if revoked {
            tracing::warn!(edge = %id,
                "edge's QUIC certificate is revoked: it takes no traffic until it presents another");
        } else {
            tracing::info!(edge = %id, "edge presents a certificate not revoked: it takes traffic again");
        }
        self.metrics
            .edge_up
            .with_label_values(&[id])
            .set(i64::from(self.health.is_up(e)));
    }

    /// Keep the certificates the edges presented that changed since they were last kept, in
    /// one write off the async workers.
    async fn keep_certificates(&self) {
        let Ok(links) = self.links() else {
            return;
        };
        let changed: Vec<_> = links
            .iter()
            .zip(&self.fleet.edges)
            .filter_map(|(l, e)| Some((e.id.clone(), l.as_ref()?.peer_certificate()?)))
            .filter(|(id, c)| self.certs.differs(id, c))
            .collect();
        if changed.is_empty() {
            return;
        }
        let certs = self.certs.clone();
        let kept = tokio::task::spawn_blocking(move || certs.note_all(&changed)).await;
        if let Some(e) = match kept {
            Ok(r) => r.err().map(|e| e.to_string()),
            Err(e) => Some(e.to_string()),
        } {
            tracing::warn!(error = %e,
                "cannot keep the edges' QUIC certificates; a restart would judge them by handshakes only");
        }
    }

    async fn poll(&self) {
        let polls = (0..self.fleet.edges.len())
            .filter(|e| self.covers(*e))
            .map(|e| async move {
                let ack = Some(self.received.lock()[e]);
                (e, self.call(e, &Request::Stats { ack }).await)
            });
        for (e, r) in futures::future::join_all(polls).await {
            let id = self.fleet.edges[e].id.as_str();
            self.note_revoked(e);
            match r {
                Ok(Reply::Stats(mut s)) => {
                    let (before, cache_before) = self.stats.read()[e]
                        .as_ref()
                        .map_or((0, 0), |p| (p.boot_id, p.cache_id));
                    // Its cache is empty when the new process started with other content: a
                    // cache id is new at every start without a disk tier, and whenever the
                    // disk tier is new (a process after one without a disk tier finds none
                    // that one wrote).
                    let emptied =
                        cache_before != 0 && s.cache_id != 0 && s.cache_id != cache_before;
                    if before == 0 {
                        // First heard of since this broker started: holders read back name
                        // the cache they were kept with, and a process before this one may
                        // have served what the broker recorded while the link was down.
                        if let Some(h) = &self.holders {
                            h.edge_heard_again(
                                e,
                                s.cache_id,
                                s.memory_only,
                                crate::clock::now_secs(),
                            );
                        }
                    }
                    if before != 0 && s.boot_id != 0 && s.boot_id != before {
                        let cache = if emptied { "emptied" } else { "kept" };
                        tracing::info!(
                            edge = id,
                            cache,
                            "edge restarted: its shadows are placed again"
                        );
                        // Its misses elsewhere would be hinted to copies it no longer holds.
                        if emptied {
                            self.forget_holders_of(e);
                        }
                        self.metrics
                            .edge_restarts
                            .with_label_values(&[id, cache])
                            .inc();
                        self.restarted.lock().push(e);
                        self.restart_seen.notify_one();
                    }
                    if first_receipt(&mut self.received.lock()[e], s.outcomes_seq) {
                        self.ledger.settle(e, &s.outcomes);
                    }
                    // After what it did report: the orders of the processes it says will not
                    // report are priced here, once per process (the edge keeps telling).
                    let now_ms = edge_node::sync::protocol::unix_ms_now();
                    // An edge keeps the last few; a longer list is not one to price.
                    let told = s.lost_boots.len().saturating_sub(LOST_KEPT);
                    for boot in &s.lost_boots[told..] {
                        let priced = &mut self.lost_priced.lock()[e];
                        if !priced.contains(boot) {
                            self.ledger.lost(e, *boot, now_ms);
                            priced.push(*boot);
                            // The edge tells the last 16; more than that are long gone.
                            let excess = priced.len().saturating_sub(64);
                            priced.drain(..excess);
                        }
                    }
                    s.outcomes = Vec::new();
                    let g = &self.metrics.edge_stats;
                    for (stat, v) in [
                        ("shadows", s.shadows),
                        ("shadow_bytes", s.shadow_bytes),
                        ("shadow_hits", s.shadow_hits),
                        ("shadows_wasted", s.shadows_wasted),
                        ("shadows_used", s.shadows_used),
                        ("fills_peer", s.fills_peer),
                        ("fills_origin", s.fills_origin),
                        ("fills_failed", s.fills_failed),
                        ("fill_bytes", s.fill_bytes),
                        ("cache_capacity_bytes", s.cache_capacity_bytes),
                    ] {
                        g.with_label_values(&[id, stat]).set(v as i64);
                    }
                    self.stats.write()[e] = Some(s);
                }
                Ok(other) => tracing::warn!(edge = id, reply = ?other, "unexpected stats reply"),
                Err(err) => tracing::debug!(edge = id, error = %err, "stats poll failed"),
            }
        }
        self.keep_certificates().await;
        let (first, misses) = self
            .stats
            .read()
            .iter()
            .flatten()
            .fold((0u64, 0u64), |(f, m), s| {
                (
                    f.saturating_add(s.shadow_first_hits),
                    m.saturating_add(s.misses),
                )
            });
        if first.saturating_add(misses) > 0 {
            self.metrics
                .shadow_recall
                .set(first as f64 / (first as f64 + misses as f64));
        }
    }
}

/// Whether a stats reply's outcome batch `seq` is new, noting it as the last received
/// (`last`): a batch resent because its acknowledgement was lost is settled once. Unnumbered
/// batches (0: an edge that does not number them) are always new.
fn first_receipt(last: &mut u64, seq: u64) -> bool {
    if seq == 0 {
        return true;
    }
    let new = seq != *last;
    *last = seq;
    new
}

/// Background service: polls stats and keeps the links up.
pub struct ControlService(pub Arc<Control>);

#[async_trait]
impl BackgroundService for ControlService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.0.interval);
        // A round that overran is not followed by a burst of catch-up rounds.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.0.poll().await;
                    self.0.polled.send_replace(true);
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resent_outcome_batch_is_settled_once() {
        let mut last = 0;
        assert!(first_receipt(&mut last, 7), "a new batch");
        assert!(!first_receipt(&mut last, 7), "sent again: its ack was lost");
        assert!(first_receipt(&mut last, 8));
        assert!(
            first_receipt(&mut last, 0) && first_receipt(&mut last, 0),
            "unnumbered"
        );
        assert_eq!(last, 8);
    }
}
