//! Edge health: active HTTP probes of each edge's `/readyz` plus passive failure reports
//! from the proxy. A passive failure marks an edge down at once (the next request must not
//! wait for a probe); only probes bring it back, after `rise` consecutive successes — more
//! for an edge that keeps going down ([`FLAP_WINDOW`]): a crash-looping edge would otherwise
//! come back between crashes and fail the requests sent to it each time. Each probe first
//! resolves the edge's names again ([`super::Addresses`]).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::Fleet;
use crate::config::{HealthSection, Role};
use crate::metrics::BrokerMetrics;
use edge_node::proxy::PROBE_PATH;

/// Up/down state of every edge.
#[derive(Debug)]
pub struct Health {
    up: Vec<AtomicBool>,
    /// Held out of routing whatever the probes say: it missed a purge
    /// ([`crate::redelivery`]).
    held: Vec<AtomicBool>,
    /// Cut off the cluster: the broker's QUIC revocation list names its certificate. A node
    /// revoked as compromised must not be sent clients either.
    revoked: Vec<AtomicBool>,
    /// Hosts each edge must not be sent: its origin table routes them otherwise than the
    /// registry ([`Self::set_hosts_off`]). `hosts_off_any` says without a lock that there is
    /// none, as for almost every edge almost always.
    hosts_off: Vec<parking_lot::RwLock<HashSet<String>>>,
    hosts_off_any: Vec<AtomicBool>,
    fails: Vec<AtomicU32>,
    oks: Vec<AtomicU32>,
    /// Passive mark-downs so far: a probe that passed before one says nothing after it.
    downs: Vec<AtomicU64>,
    /// When each edge last went from up to down, within [`FLAP_WINDOW`].
    flaps: Vec<parking_lot::Mutex<VecDeque<Instant>>>,
    fall: u32,
    rise: u32,
}

/// How far back an edge's falls count towards holding it down longer.
pub const FLAP_WINDOW: Duration = Duration::from_secs(300);
/// Most times `rise` an edge that keeps falling must pass before it is up again.
const MAX_RISE_FACTOR: u32 = 16;

impl Health {
    /// All edges start up: a fresh broker routes at once, and probes correct it within one
    /// interval.
    pub fn new(edges: usize, fall: u32, rise: u32) -> Self {
        Health {
            up: (0..edges).map(|_| AtomicBool::new(true)).collect(),
            held: (0..edges).map(|_| AtomicBool::new(false)).collect(),
            revoked: (0..edges).map(|_| AtomicBool::new(false)).collect(),
            hosts_off: (0..edges).map(|_| Default::default()).collect(),
            hosts_off_any: (0..edges).map(|_| AtomicBool::new(false)).collect(),
            fails: (0..edges).map(|_| AtomicU32::new(0)).collect(),
            oks: (0..edges).map(|_| AtomicU32::new(0)).collect(),
            downs: (0..edges).map(|_| AtomicU64::new(0)).collect(),
            flaps: (0..edges).map(|_| Default::default()).collect(),
            fall: fall.max(1),
            rise: rise.max(1),
        }
    }

    /// Whether an edge may receive requests: probes find it up, and it is neither held nor
    /// revoked.
    pub fn is_up(&self, edge: usize) -> bool {
        self.up[edge].load(Ordering::Acquire)
            && !self.held[edge].load(Ordering::Acquire)
            && !self.revoked[edge].load(Ordering::Acquire)
    }

    /// Note whether the edge's QUIC certificate is revoked (out of routing while it is);
    /// whether it was.
    pub fn set_revoked(&self, edge: usize, revoked: bool) -> bool {
        self.revoked[edge].swap(revoked, Ordering::AcqRel)
    }

    /// Whether the edge's QUIC certificate is revoked ([`Self::set_revoked`]).
    pub fn is_revoked(&self, edge: usize) -> bool {
        self.revoked[edge].load(Ordering::Acquire)
    }

    /// Keep requests for `hosts` off edge `edge`, and only those: its origin table left their
    /// rows out, or (while it refuses the table) still routes them as before a change in the
    /// registry. Whether the set changed.
    pub fn set_hosts_off(&self, edge: usize, hosts: HashSet<String>) -> bool {
        let mut off = self.hosts_off[edge].write();
        if *off == hosts {
            return false;
        }
        self.hosts_off_any[edge].store(!hosts.is_empty(), Ordering::Release);
        *off = hosts;
        true
    }

    /// Whether requests for `host` may go to edge `edge` ([`Self::set_hosts_off`]).
    pub fn serves_host(&self, edge: usize, host: &str) -> bool {
        !self.hosts_off_any[edge].load(Ordering::Acquire)
            || !self.hosts_off[edge].read().contains(host)
    }

    /// How many hosts are kept off edge `edge`.
    pub fn hosts_off(&self, edge: usize) -> usize {
        self.hosts_off[edge].read().len()
    }

    /// Hold an edge out of routing, or release it; whether it was held.
    pub fn hold(&self, edge: usize, held: bool) -> bool {
        self.held[edge].swap(held, Ordering::AcqRel)
    }

    /// Passive failure (connection refused, reset before a response): down now.
    pub fn mark_down(&self, edge: usize) -> bool {
        self.downs[edge].fetch_add(1, Ordering::AcqRel);
        self.oks[edge].store(0, Ordering::Release);
        let was_up = self.up[edge].swap(false, Ordering::AcqRel);
        if was_up {
            self.fell(edge);
        }
        was_up
    }

    /// Edge `edge` went from up to down now.
    fn fell(&self, edge: usize) {
        let now = Instant::now();
        let mut f = self.flaps[edge].lock();
        while f
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) > FLAP_WINDOW)
        {
            f.pop_front();
        }
        if f.len() < 32 {
            f.push_back(now);
        }
    }

    /// Consecutive passes edge `edge` needs to come back: `rise`, doubled for each other
    /// fall within [`FLAP_WINDOW`], at most [`MAX_RISE_FACTOR`] times `rise`.
    pub fn rise_needed(&self, edge: usize) -> u32 {
        let now = Instant::now();
        let recent = self.flaps[edge]
            .lock()
            .iter()
            .filter(|at| now.saturating_duration_since(**at) <= FLAP_WINDOW)
            .count() as u32;
        let factor = 1u32 << recent.saturating_sub(1).min(MAX_RISE_FACTOR.ilog2());
        self.rise * factor
    }

    /// Taken when a probe of `edge` starts, for [`Self::probe_result`].
    pub fn probe_started(&self, edge: usize) -> u64 {
        self.downs[edge].load(Ordering::Acquire)
    }

    /// Record the result of a probe that started at `started` ([`Self::probe_started`]);
    /// returns `Some(new_state)` when the state flipped. A pass is ignored when the edge was
    /// marked down since the probe started: it was measured before the failure.
    pub fn probe_result(&self, edge: usize, ok: bool, started: u64) -> Option<bool> {
        if ok && self.downs[edge].load(Ordering::Acquire) != started {
            return None;
        }
        if ok {
            self.fails[edge].store(0, Ordering::Release);
            let n = self.oks[edge].fetch_add(1, Ordering::AcqRel) + 1;
            if n >= self.rise_needed(edge) && !self.up[edge].swap(true, Ordering::AcqRel) {
                // A mark-down between the check above and the swap wins.
                if self.downs[edge].load(Ordering::Acquire) != started {
                    self.up[edge].store(false, Ordering::Release);
                    return None;
                }
                return Some(true);
            }
        } else {
            self.oks[edge].store(0, Ordering::Release);
            let n = self.fails[edge].fetch_add(1, Ordering::AcqRel) + 1;
            if n >= self.fall && self.up[edge].swap(false, Ordering::AcqRel) {
                self.fell(edge);
                return Some(false);
            }
        }
        None
    }
}

/// Shortest time an edge's proxy is given to answer a probe ([`probe`]).
const MIN_PROXY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a readiness answer comes from edge `id`: an address that now belongs to another
/// node (a recycled pod address kept through a failed lookup) must not pass for this edge,
/// or its keys and purges would go to the wrong cache. An answer naming no node is taken.
fn same_node(answer: &serde_json::Value, id: &str) -> Result<(), String> {
    match answer.get("node_id").and_then(|v| v.as_str()) {
        Some(n) if n != id => Err(format!("the admin API is node {n:?}, not {id:?}")),
        _ => Ok(()),
    }
}

/// Whether edge `id`'s admin API says it is ready: `/readyz` (503 while its cache disk
/// stalls, with the reason in the body), or `/healthz` on an edge from before `/readyz`,
/// which answers it 404.
async fn ready(client: &reqwest::Client, admin: SocketAddr, id: &str) -> Result<(), String> {
    let mut path = "/readyz";
    let ask = |path: &str| client.get(format!("http://{admin}{path}")).send();
    let mut answer = ask(path).await.map_err(|e| format!("{path}: {e}"))?;
    if answer.status() == reqwest::StatusCode::NOT_FOUND {
        // Read to the end, so the connection serves the next request.
        let _ = answer.bytes().await;
        path = "/healthz";
        answer = ask(path).await.map_err(|e| format!("{path}: {e}"))?;
    }
    let status = answer.status();
    let body = answer.json::<serde_json::Value>().await.unwrap_or_default();
    if !status.is_success() {
        // Bounded: whatever answers at the address writes this into the broker's log.
        let why = body
            .get("message")
            .and_then(|m| m.as_str())
            .map(|m| format!(": {}", m.chars().take(200).collect::<String>()))
            .unwrap_or_default();
        return Err(format!("{path} answered {status}{why}"));
    }
    same_node(&body, id)
}

/// Probes every edge periodically and tracks standby promotion per region.
pub struct HealthChecker {
    fleet: Arc<Fleet>,
    health: Arc<Health>,
    cfg: HealthSection,
    metrics: BrokerMetrics,
    client: reqwest::Client,
}

impl HealthChecker {
    /// A checker over `fleet`; fails when its HTTP client cannot be made (the broker must not
    /// start without health checks: its routing would never see an edge die).
    pub fn new(
        fleet: Arc<Fleet>,
        health: Arc<Health>,
        cfg: HealthSection,
        metrics: BrokerMetrics,
    ) -> Result<Self, reqwest::Error> {
        let client = edge_node::internal_http::client()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .build()?;
        Ok(HealthChecker {
            fleet,
            health,
            cfg,
            metrics,
            client,
        })
    }

    fn promoted(&self, region: usize) -> bool {
        let in_region = |role: Role| {
            self.fleet
                .edges
                .iter()
                .enumerate()
                .filter(move |(i, e)| self.fleet.edge_region(*i) == region && e.role == role)
        };
        // As routing sees them: up, with a proxy address.
        let usable = |i: usize| self.health.is_up(i) && self.fleet.addresses.get(i).proxy.is_some();
        !in_region(Role::Active).any(|(i, _)| usable(i))
            && in_region(Role::Standby).any(|(i, _)| usable(i))
    }

    /// Probe edge `i` every interval, on its own schedule: an edge whose probes wait out
    /// their timeouts (a stuck proxy takes [`MIN_PROXY_PROBE_TIMEOUT`]) delays no other
    /// edge's probes, so the rest of the fleet is judged as often as configured.
    async fn probe_loop(&self, i: usize, promoted: &parking_lot::Mutex<Vec<bool>>) {
        let e = &self.fleet.edges[i];
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let proxy_timeout = timeout.max(MIN_PROXY_PROBE_TIMEOUT);
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.interval_ms));
        // A probe that overran is not followed by a burst of catch-up probes.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let started = self.health.probe_started(i);
            let probed = self.fleet.addresses.refresh(i, e, timeout).await;
            let outcome = match (probed.admin, probed.proxy) {
                (Some(admin), Some(proxy)) => {
                    probe(&self.client, admin, proxy, &e.id, proxy_timeout).await
                }
                _ => Err("address unresolved".to_string()),
            };
            if outcome.is_err() {
                self.fleet.addresses.probe_failed(i, probed);
            }
            if let Some(up) = self.health.probe_result(i, outcome.is_ok(), started) {
                match outcome {
                    Ok(()) => tracing::info!(edge = %e.id, up, "edge health changed"),
                    Err(why) => tracing::warn!(edge = %e.id, up, %why, "edge health changed"),
                }
            }
            // Whether it takes traffic: probed up, not held for missed purges, not revoked.
            self.metrics
                .edge_up
                .with_label_values(&[&e.id])
                .set(i64::from(self.health.is_up(i)));
            self.note_promotions(&mut promoted.lock());
        }
    }

    /// Log and count each region whose standby was promoted or demoted since `promoted`.
    fn note_promotions(&self, promoted: &mut [bool]) {
        for (r, was) in promoted.iter_mut().enumerate() {
            let now = self.promoted(r);
            if now != *was {
                let region = &self.fleet.regions[r];
                if now {
                    tracing::warn!(%region, "no healthy active edge: standby promoted");
                    self.metrics
                        .standby_promotions
                        .with_label_values(&[region])
                        .inc();
                } else {
                    tracing::info!(%region, "standby demoted");
                }
                *was = now;
            }
        }
    }
}

/// One probe of edge `id`. Its admin API says the process is ready ([`ready`]) and is the
/// edge configured here; clients use the proxy port, so its workers must answer too: a dead
/// proxy listener behind a live admin API would otherwise flap between probes and passive
/// failures, and a stuck one, whose connections the kernel still accepts, would hold its keys'
/// requests until they time out (a broker-side read timeout does not mark an edge down). Any
/// HTTP answer counts: an edge from before the probe path answers 404. The proxy has
/// `proxy_timeout`: its workers also serve clients, and a busy edge answering a little late
/// must not be taken out (its keys would only load the next edge more).
async fn probe(
    client: &reqwest::Client,
    admin: SocketAddr,
    proxy: SocketAddr,
    id: &str,
    proxy_timeout: Duration,
) -> Result<(), String> {
    ready(client, admin, id).await?;
    client
        .get(format!("http://{proxy}{PROBE_PATH}"))
        .timeout(proxy_timeout)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| format!("proxy port: {e}"))
}

#[async_trait]
impl BackgroundService for HealthChecker {
    /// Probes until the process exits, not only until shutdown starts: pingora keeps serving
    /// in-flight requests and open connections through its grace period, and their failover
    /// needs current health. The loops end when pingora drops the service's runtime.
    async fn start(&self, _shutdown: ShutdownWatch) {
        let promoted = parking_lot::Mutex::new(vec![false; self.fleet.regions.len()]);
        let loops = (0..self.fleet.edges.len()).map(|i| self.probe_loop(i, &promoted));
        futures::future::join_all(loops).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_edge_takes_no_traffic_until_it_is_not() {
        let h = Health::new(2, 1, 1);
        assert!(!h.set_revoked(0, true));
        assert!(!h.is_up(0) && h.is_up(1));
        assert!(!h.hold(0, false), "a revocation is not a purge hold");
        assert!(!h.is_up(0));
        assert!(h.set_revoked(0, false));
        assert!(h.is_up(0));
    }

    #[test]
    fn a_healthz_of_another_node_fails_the_probe() {
        let ok = serde_json::json!({"status": "ok", "node_id": "eu-1"});
        assert_eq!(same_node(&ok, "eu-1"), Ok(()));
        let other = serde_json::json!({"status": "ok", "node_id": "eu-2"});
        assert!(same_node(&other, "eu-1").unwrap_err().contains("eu-2"));
        assert_eq!(
            same_node(&serde_json::json!({"status": "ok"}), "eu-1"),
            Ok(())
        );
    }

    /// A proxy port whose connections the kernel accepts but nobody serves fails the probe;
    /// one that answers anything passes.
    #[tokio::test]
    async fn a_proxy_that_accepts_but_never_answers_fails_the_probe() {
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"node_id": "e1"})) }),
        );
        tokio::spawn(async move { axum::serve(admin, app).await });
        // Listening, never accepting: connects complete in the backlog.
        let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let answering = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let answering_addr = answering.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut c, _)) = answering.accept().await {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).await;
                let _ = c
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let half = Duration::from_millis(500);
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(half)
            .build()
            .unwrap();
        let err = probe(&client, admin_addr, stuck.local_addr().unwrap(), "e1", half)
            .await
            .unwrap_err();
        assert!(err.starts_with("proxy port"), "{err}");
        assert_eq!(
            probe(&client, admin_addr, answering_addr, "e1", half).await,
            Ok(())
        );
        let err = probe(&client, admin_addr, answering_addr, "e2", half)
            .await
            .unwrap_err();
        assert!(err.contains("e2"), "{err}");
    }

    /// An edge whose disk stalls answers `/readyz` 503 and fails the probe with its reason;
    /// one from before `/readyz` (404) is asked `/healthz`, which the test above covers.
    #[tokio::test]
    async fn an_edge_not_ready_fails_the_probe_with_its_reason() {
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/readyz",
            axum::routing::get(|| async {
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(serde_json::json!({
                        "node_id": "e1",
                        "error": "disk_stalled",
                        "message": "a write and fsync has not finished for 12 s",
                    })),
                )
            }),
        );
        tokio::spawn(async move { axum::serve(admin, app).await });
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let err = ready(&client, admin_addr, "e1").await.unwrap_err();
        assert!(err.starts_with("/readyz answered 503"), "{err}");
        assert!(err.contains("has not finished for 12 s"), "{err}");
    }

    #[test]
    fn fall_and_rise() {
        let h = Health::new(1, 2, 2);
        let at = h.probe_started(0);
        assert_eq!(h.probe_result(0, false, at), None);
        assert_eq!(h.probe_result(0, false, at), Some(false));
        assert!(!h.is_up(0));
        assert_eq!(h.probe_result(0, true, at), None);
        assert_eq!(h.probe_result(0, true, at), Some(true));
        assert!(h.mark_down(0));
        assert!(!h.is_up(0));
    }

    /// An edge that keeps falling needs more passes each time before it is up again.
    #[test]
    fn a_flapping_edge_is_held_down_longer_each_time() {
        let h = Health::new(1, 1, 2);
        let mut needed = Vec::new();
        for _ in 0..7 {
            assert!(h.mark_down(0));
            needed.push(h.rise_needed(0));
            let mut passes = 0;
            while !h.is_up(0) {
                h.probe_result(0, true, h.probe_started(0));
                passes += 1;
            }
            assert_eq!(passes, *needed.last().unwrap());
        }
        assert_eq!(needed, [2, 4, 8, 16, 32, 32, 32]);
        // A mark-down of an edge already down is no new fall.
        assert!(h.mark_down(0));
        assert!(!h.mark_down(0));
        assert_eq!(h.flaps[0].lock().len(), 8);
    }

    /// A probe that passed before a passive mark-down (the edge crashed while the round's
    /// other probes ran) does not count towards bringing the edge back.
    #[test]
    fn a_pass_measured_before_a_mark_down_is_ignored() {
        let h = Health::new(1, 2, 1);
        let before = h.probe_started(0);
        assert!(h.mark_down(0));
        assert_eq!(h.probe_result(0, true, before), None);
        assert!(!h.is_up(0));
        let after = h.probe_started(0);
        assert_eq!(h.probe_result(0, true, after), Some(true));
        // A failure counts whenever it was measured.
        assert!(h.mark_down(0));
        while !h.is_up(0) {
            h.probe_result(0, true, h.probe_started(0));
        }
        let stale = h.probe_started(0) - 1;
        assert_eq!(h.probe_result(0, false, stale), None);
        assert_eq!(h.probe_result(0, false, stale), Some(false));
    }
}
