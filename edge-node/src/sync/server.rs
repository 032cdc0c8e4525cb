//! The edge's QUIC listener. Only certificates from the cluster CA get through the handshake;
//! control messages (shadow, unshadow, invalidate, stats) are further limited to the broker's
//! certificate, while any cluster node may peer-fetch.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Deserialize;

use super::connections::{peer_name, PeerConnections};
use super::handshakes::{HandshakeSlots, Slot, HANDSHAKE_TIMEOUT, SAVE_EVERY};
use super::protocol::{
    read_frame, write_frame, Envelope, EnvelopeHead, ErrorCode, FrameError, LiveShadow, Reply,
    Request, StatsReport, MAX_FRAME, VERSION,
};
use super::tls::{peer_is, BROKER_NAME};
use super::trust::Trust;
use super::{is_hop_header, PEER_FETCH_HEADER};
use crate::drain::InflightCounter;
use crate::invalidate::{purge_answered, PurgeError, PurgeParts, Target};
use crate::metrics::{CacheStatus, EdgeMetrics};
use crate::origin::SharedOrigins;
use crate::proxy::InternalSecret;
use crate::shadow::{split_key, unshadow, FillRequest, Filler, ShadowTable};
use crate::storage::FoyerStorage;

/// Application close code of a connection refused because its peer has too many open.
pub const TOO_MANY_CLOSE_CODE: u32 = 0x544d;
/// Replies remembered for repeated message ids.
const DEDUP_CAPACITY: usize = 4096;
/// How long a stream may take to deliver its request frame.
const REQUEST_WAIT: Duration = Duration::from_secs(10);
/// How long one chunk of a peer-fetch body may wait for the requesting edge to take it.
const CHUNK_WAIT: Duration = Duration::from_secs(30);
/// How long a reply frame may wait for the asking node to take it: one that never grants the
/// stream credit (keep-alives hold its connection open) would otherwise pin the task, and
/// the drain that waits for it, for good.
const REPLY_WAIT: Duration = Duration::from_secs(30);
/// Key bytes per page of a shadow listing: the page stays well inside a frame.
const PAGE_KEY_BYTES: usize = 64 * 1024;
/// Encoded bytes of shadow outcomes per stats reply: the reply stays well inside a frame,
/// and a backlog drains over the following polls.
const OUTCOME_BYTES: usize = MAX_FRAME / 2;

/// What the QUIC handlers act on.
pub struct SyncParts {
    /// This edge's id (reported in stats).
    pub node_id: String,
    /// The cache.
    pub storage: &'static FoyerStorage,
    /// Shadow marks, and the log of ended ones each stats report carries.
    pub shadows: Arc<ShadowTable>,
    /// Shadow fill submission.
    pub filler: Filler,
    /// Metrics.
    pub metrics: EdgeMetrics,
    /// Longest shadow TTL accepted.
    pub max_ttl_secs: u64,
    /// This edge's HTTP listener (peer fetches read the cache through it).
    pub proxy_listen: SocketAddr,
    /// Authenticates the edge's requests to itself.
    pub internal: InternalSecret,
    /// Memory plus disk capacity of the cache.
    pub capacity_bytes: u64,
    /// The cache has no disk tier: a restart empties it ([`StatsReport::memory_only`]).
    pub memory_only: bool,
    /// The content the cache started with ([`StatsReport::cache_id`]).
    pub cache_id: u64,
    /// The origin table: a key purge also purges the key as the proxy keys it now.
    pub origins: Arc<SharedOrigins>,
    /// Work the drain waits for: each message being handled counts, so a shutdown lets an
    /// invalidation answer and a peer-fetch body finish before the endpoint closes.
    pub inflight: InflightCounter,
    /// Longest wait for that work at shutdown (`server.drain_timeout_secs`).
    pub drain_timeout: Duration,
    /// The CA and its revocation list: a connection whose peer it revokes later is closed
    /// when the edge reads the new list.
    pub trust: Trust,
}

/// What identifies one control message across its deliveries: the sender's id and a digest
/// of what it asks. A repeat must be the same message, not only the same id: ids come from
/// the sender's clock, and one reused (a second broker, a clock stepped back) must not be
/// answered with another message's reply — a purge told it was done would be lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MessageKey {
    id: u64,
    digest: u64,
}

impl MessageKey {
    /// The key of message `id` whose body (the envelope's `msg`) is `msg`.
    fn of(id: u64, msg: Option<&serde_json::Value>) -> Self {
        use std::hash::{Hash, Hasher};
        // serde_json's maps are sorted, so a body re-sent or re-encoded prints the same.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        msg.map(ToString::to_string).hash(&mut h);
        MessageKey {
            id,
            digest: h.finish(),
        }
    }
}

/// Replies to recent message ids. A stats reply carries (and drains) the shadow outcomes, so
/// only the latest is kept: a retried poll gets the same outcomes, and memory stays small.
#[derive(Default)]
struct Dedup {
    replies: HashMap<MessageKey, Reply>,
    order: VecDeque<MessageKey>,
    last_stats: Option<(MessageKey, Reply)>,
    /// Ids being handled now, and where their reply will appear: a retry that arrives on a
    /// new connection while the first delivery is still at work (a purge waiting on its
    /// fsync) waits for that reply instead of acting twice (a second fill of a shadow).
    running: HashMap<MessageKey, tokio::sync::watch::Receiver<Option<Reply>>>,
}

/// What a message's delivery is to do.
enum Turn {
    /// Answered before: the same reply again.
    Answered(Reply),
    /// An earlier delivery is handling it: wait for its reply.
    Pending(tokio::sync::watch::Receiver<Option<Reply>>),
    /// New: handle it and publish the reply here.
    Handle(tokio::sync::watch::Sender<Option<Reply>>),
}

impl Dedup {
    /// What a delivery of `id` is to do; one told to handle it holds a [`Running`] until it
    /// has put its reply.
    fn turn(&mut self, id: MessageKey) -> Turn {
        if let Some(r) = self.get(id) {
            return Turn::Answered(r);
        }
        if let Some(rx) = self.running.get(&id) {
            return Turn::Pending(rx.clone());
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        self.running.insert(id, rx);
        Turn::Handle(tx)
    }

    fn get(&self, id: MessageKey) -> Option<Reply> {
        match &self.last_stats {
            Some((i, r)) if *i == id => Some(r.clone()),
            _ => self.replies.get(&id).cloned(),
        }
    }

    fn put(&mut self, id: MessageKey, reply: Reply) {
        // A listing is read-only: a repeat is answered afresh rather than kept in memory.
        if matches!(reply, Reply::ShadowPage { .. }) {
            return;
        }
        if matches!(reply, Reply::Stats(_)) {
            self.last_stats = Some((id, reply));
            return;
        }
        if self.replies.insert(id, reply).is_none() {
            self.order.push_back(id);
            if self.order.len() > DEDUP_CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.replies.remove(&old);
                }
            }
        }
    }
}

/// Removes a message id from [`Dedup::running`] when its delivery ends, with its reply put
/// or without one (its task dropped: a retry then handles the message).
struct Running<'a> {
    seen: &'a parking_lot::Mutex<Dedup>,
    id: MessageKey,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.seen.lock().running.remove(&self.id);
    }
}

struct Handler {
    parts: SyncParts,
    http: reqwest::Client,
    seen: parking_lot::Mutex<Dedup>,
    /// This process's start ([`StatsReport::boot_id`]).
    boot_id: u64,
    /// Set when the edge starts to stop: peer fetches are refused from then on, at once, as
    /// the proxy they read through has stopped accepting (the asking edge goes to the origin).
    stopping: std::sync::atomic::AtomicBool,
}

/// Background service: the QUIC endpoint of an edge.
pub struct SyncService {
    socket: parking_lot::Mutex<Option<UdpSocket>>,
    endpoint: quinn::EndpointConfig,
    config: quinn::ServerConfig,
    handler: Arc<Handler>,
    /// Where the addresses known to the fleet are kept across restarts
    /// ([`super::handshakes`]); `None`: in memory only.
    known_addresses: Option<std::path::PathBuf>,
}

impl SyncService {
    /// Serve on `socket` (bound before start so a busy port is a start-up error) with
    /// `endpoint` settings (see [`super::tls::NodeIdentity::endpoint_config`]).
    pub fn new(
        socket: UdpSocket,
        endpoint: quinn::EndpointConfig,
        config: quinn::ServerConfig,
        parts: SyncParts,
    ) -> Self {
        // Bounded per read, not per transfer: a large object to a distant peer may take
        // minutes whole, and a stall is caught by the gap between reads (and the peer's own
        // read timeout).
        // Redirects are relayed as the copy they are, never followed: an origin's `Location`
        // must not make this edge fetch (and hand a peer) whatever it names.
        let http = crate::internal_http::client()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        let boot_id = parts.shadows.outcomes().boot_id();
        SyncService {
            socket: parking_lot::Mutex::new(Some(socket)),
            endpoint,
            config,
            handler: Arc::new(Handler {
                parts,
                http,
                seen: parking_lot::Mutex::new(Dedup::default()),
                boot_id,
                stopping: std::sync::atomic::AtomicBool::new(false),
            }),
            known_addresses: None,
        }
    }

    /// Keep the addresses known to the fleet in `path` across restarts.
    pub fn remembering_addresses_in(mut self, path: std::path::PathBuf) -> Self {
        self.known_addresses = Some(path);
        self
    }
}

#[async_trait]
impl BackgroundService for SyncService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(socket) = self.socket.lock().take() else {
            return;
        };
        let endpoint = match quinn::Endpoint::new(
            self.endpoint.clone(),
            Some(self.config.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        ) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "QUIC endpoint failed to start");
                return;
            }
        };
        let handshakes = self
            .known_addresses
            .as_deref()
            .map_or_else(HandshakeSlots::default, HandshakeSlots::remembered);
        // Saves run on their own (a synced write must not hold up the accept loop), one at a
        // time.
        let save = |handshakes: &HandshakeSlots| {
            let (slots, path) = (handshakes.clone(), self.known_addresses.clone());
            tokio::task::spawn_blocking(move || {
                let Some(path) = path else { return };
                if let Err(e) = slots.save(&path) {
                    tracing::warn!(error = %e, "known QUIC addresses not saved");
                }
            })
        };
        let mut saving: Option<tokio::task::JoinHandle<()>> = None;
        let mut save_tick = tokio::time::interval(SAVE_EVERY);
        save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let connections = PeerConnections::default();
        loop {
            tokio::select! {
                _ = save_tick.tick() => {
                    if saving.as_ref().is_none_or(|s| s.is_finished()) {
                        saving = Some(save(&handshakes));
                    }
                }
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    // A handshake costs this thread TLS work before the client proves
                    // anything: first its address (a Retry round trip, which a spoofed
                    // source cannot answer), then a bounded number at once.
                    if !incoming.remote_address_validated() && incoming.may_retry() {
                        let _ = incoming.retry();
                        continue;
                    }
                    let Some(slot) = handshakes.admit(incoming.remote_address().ip()) else {
                        self.handler.parts.metrics.sync_handshake_failures.inc();
                        incoming.refuse();
                        continue;
                    };
                    tokio::spawn(self.handler.clone().connection(
                        incoming,
                        slot,
                        connections.clone(),
                    ));
                }
                _ = shutdown.changed() => break,
            }
        }
        self.handler
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        // Saved first: the edge's drain may end the process before this service's own does.
        if let Some(s) = saving.take() {
            let _ = s.await;
        }
        let _ = save(&handshakes).await;
        // No new connections; the open ones keep being served until the edge's in-flight
        // work (these messages and its HTTP requests) is done, then they are closed cleanly.
        endpoint.set_server_config(None);
        let parts = &self.handler.parts;
        let deadline = tokio::time::Instant::now() + parts.drain_timeout;
        while parts.inflight.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        endpoint.close(0u32.into(), b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
}

/// Whether this edge refused the peer's certificate during a handshake: quinn reports it as
/// a transport error carrying a TLS certificate alert (QUIC code 0x100 + alert). The peer
/// refusing *ours* (a closed connection) and other alerts (an ALPN mismatch, a decode
/// error) are not the peer's certificate's fault.
fn certificate_refused(e: &quinn::ConnectionError) -> bool {
    // bad_certificate … certificate_unknown (42–46), unknown_ca (48), certificate_required (116).
    const ALERTS: [u64; 7] = [42, 43, 44, 45, 46, 48, 116];
    super::trust::alert_raised(e).is_some_and(|a| ALERTS.contains(&a))
}

/// Who is on the other end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Broker,
    Peer,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Broker => "broker",
            Role::Peer => "edge",
        }
    }
}

impl Handler {
    async fn connection(
        self: Arc<Self>,
        incoming: quinn::Incoming,
        handshake: Slot,
        connections: PeerConnections,
    ) {
        let m = &self.parts.metrics;
        let mut checked = self.parts.trust.accepting();
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                m.sync_handshake_failures.inc();
                if certificate_refused(&e) {
                    handshake.refused();
                } else {
                    handshake.failed();
                }
                tracing::warn!(error = %e, "QUIC handshake refused");
                return;
            }
            Err(_) => {
                m.sync_handshake_failures.inc();
                handshake.failed();
                tracing::warn!("QUIC handshake timed out");
                return;
            }
        };
        // The endpoint took its certificate: a broker or a peer of this cluster — known to
        // the fleet once it is also within its connection cap.
        let peer = peer_name(&conn);
        let Some(_held) = connections.admit(&peer) else {
            m.sync_handshake_failures.inc();
            handshake.failed();
            tracing::warn!(peer = %peer, addr = %conn.remote_address(),
                "QUIC connection refused: the peer has too many open");
            conn.close(TOO_MANY_CLOSE_CODE.into(), b"too many connections");
            return;
        };
        handshake.authenticated();
        drop(handshake);
        let role = if peer_is(&conn, BROKER_NAME) {
            Role::Broker
        } else {
            Role::Peer
        };
        let gauge = m.sync_connections.with_label_values(&[role.label()]);
        gauge.inc();
        tracing::info!(peer = %conn.remote_address(), role = role.label(), "QUIC peer connected");
        loop {
            let (send, recv) = tokio::select! {
                s = conn.accept_bi() => match s {
                    Ok(s) => s,
                    Err(_) => break,
                },
                // A peer the revocation list now refuses is cut off at once, idle or not.
                () = checked.cut_when_refused(&conn) => break,
            };
            if !checked.still_trusted(&conn) {
                break;
            }
            tokio::spawn(self.clone().stream(role, send, recv));
        }
        gauge.dec();
    }

    async fn stream(
        self: Arc<Self>,
        role: Role,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let m = &self.parts.metrics;
        // Keep-alives hold the connection open, so a stream whose request never comes would
        // pin this task (and one of the connection's stream slots) for good.
        let raw: serde_json::Value = match tokio::time::timeout(REQUEST_WAIT, read_frame(&mut recv))
            .await
            .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()))
        {
            Ok(v) => v,
            Err(e) => {
                m.sync_messages
                    .with_label_values(&["unknown", "malformed"])
                    .inc();
                tracing::debug!(error = %e, "unreadable QUIC frame");
                return;
            }
        };
        // From here to the reply, the message is work the drain waits for.
        let _working = self.parts.inflight.enter();
        let parsed = EnvelopeHead::deserialize(&raw);
        // A head that does not parse is answered as invalid, under the id it gives if any,
        // so the sender learns what was wrong with it rather than a version it did not send.
        let head = parsed.as_ref().map_or_else(
            |_| EnvelopeHead {
                v: VERSION,
                id: raw
                    .get("id")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
            },
            |h| EnvelopeHead { v: h.v, id: h.id },
        );
        let reply_to = |reply: Reply| Envelope {
            v: VERSION,
            id: head.id,
            msg: reply,
        };
        if let Err(e) = &parsed {
            m.sync_messages
                .with_label_values(&["unknown", "malformed"])
                .inc();
            let r = Reply::error(ErrorCode::Invalid, format!("envelope: {e}"));
            let _ = reply_frame(&mut send, &reply_to(r)).await;
            let _ = send.finish();
            return;
        }
        if head.v != VERSION {
            m.sync_messages
                .with_label_values(&["unknown", "version"])
                .inc();
            let r = Reply::error(
                ErrorCode::Version,
                format!("this node speaks version {VERSION}, not {}", head.v),
            );
            let _ = reply_frame(&mut send, &reply_to(r)).await;
            let _ = send.finish();
            return;
        }
        let req = match Envelope::<Request>::deserialize(&raw) {
            Ok(e) => e.msg,
            Err(e) => {
                m.sync_messages
                    .with_label_values(&["unknown", "malformed"])
                    .inc();
                let _ = reply_frame(
                    &mut send,
                    &reply_to(Reply::error(ErrorCode::Invalid, e.to_string())),
                )
                .await;
                let _ = send.finish();
                return;
            }
        };
        let kind = req.kind();
        if let Request::PeerFetch {
            key,
            accept_encoding,
        } = &req
        {
            let ae = accept_encoding.as_deref();
            let outcome = self.peer_fetch(key, ae, head.id, &mut send).await;
            m.sync_messages.with_label_values(&[kind, outcome]).inc();
            let _ = send.finish();
            return;
        }
        let (reply, outcome) = if role != Role::Broker {
            (
                Reply::error(
                    ErrorCode::Forbidden,
                    "control messages are for the broker's certificate",
                ),
                "forbidden",
            )
        } else {
            self.once(MessageKey::of(head.id, raw.get("msg")), req)
                .await
        };
        m.sync_messages.with_label_values(&[kind, outcome]).inc();
        if let Err(e) = reply_frame(&mut send, &reply_to(reply)).await {
            tracing::warn!(kind, error = %e, "control reply not sent");
            m.sync_messages.with_label_values(&[kind, "unsent"]).inc();
        }
        let _ = send.finish();
    }

    /// Handle control message `id` once however often it is delivered: a repeat gets the
    /// first delivery's reply, waiting for it while that delivery is still at work.
    async fn once(&self, id: MessageKey, req: Request) -> (Reply, &'static str) {
        loop {
            let turn = self.seen.lock().turn(id);
            match turn {
                Turn::Answered(r) => return (r, "duplicate"),
                Turn::Pending(mut rx) => {
                    if let Ok(r) = rx.wait_for(Option::is_some).await {
                        if let Some(r) = r.clone() {
                            return (r, "duplicate");
                        }
                    }
                    // The first delivery ended without a reply: this one handles it.
                }
                Turn::Handle(tx) => {
                    // Declared after `tx`, so dropped before it: a retry woken by the
                    // sender's end finds the id free.
                    let _running = Running {
                        seen: &self.seen,
                        id,
                    };
                    let r = self.control(req).await;
                    self.seen.lock().put(id, r.clone());
                    let _ = tx.send(Some(r.clone()));
                    let outcome = if matches!(r, Reply::Error { .. }) {
                        "error"
                    } else {
                        "ok"
                    };
                    return (r, outcome);
                }
            }
        }
    }

    async fn control(&self, req: Request) -> Reply {
        let p = &self.parts;
        match req {
            Request::Shadow(o) => {
                // The source must be a peer: another node, by a name a certificate can carry.
                if let Some(peer) = &o.peer {
                    if !crate::config::valid_node_id(&peer.id) || peer.id == p.node_id {
                        let msg = format!("{:?} is not a peer of this edge", peer.id);
                        return Reply::error(ErrorCode::Invalid, msg);
                    }
                }
                let fill =
                    match FillRequest::validated(&o.key, o.ttl_secs, o.priority, p.max_ttl_secs) {
                        Ok(f) => f
                            .deadline_ms(o.deadline_ms)
                            .from_peer(o.peer)
                            .refreshing(o.refresh),
                        Err(e) => return Reply::error(ErrorCode::Invalid, e.to_string()),
                    };
                // Written down before it is accepted: a crash before the refresh ends must
                // not leave the replaced copy served after the restart.
                let room = if fill.refresh {
                    p.filler.has_room()
                } else {
                    Ok(())
                };
                if let Err(e) = room {
                    p.metrics.shadow_fills.with_label_values(&["refused"]).inc();
                    return Reply::error(ErrorCode::Busy, e.to_string());
                }
                let fill = if fill.refresh {
                    match crate::invalidate::refresh_recorded(p.storage, &fill.key).await {
                        Some(Ok(record)) => fill.recorded(record),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, key = %fill.key, "refresh not recorded");
                            return Reply::error(ErrorCode::Internal, e.to_string());
                        }
                        None => {
                            p.metrics.shadow_fills.with_label_values(&["refused"]).inc();
                            let msg = "the cache disk is stalled: the refresh was not recorded";
                            return Reply::error(ErrorCode::Busy, msg);
                        }
                    }
                } else {
                    fill
                };
                match p.filler.submit(fill) {
                    Ok(()) => Reply::Done {
                        found: true,
                        boot_id: Some(self.boot_id),
                    },
                    Err(e) => {
                        p.metrics.shadow_fills.with_label_values(&["refused"]).inc();
                        Reply::error(ErrorCode::Busy, e.to_string())
                    }
                }
            }
            Request::Unshadow { key } => match crate::proxy::normalize_key(&key) {
                Some(key) => Reply::Done {
                    found: unshadow(&p.shadows, p.storage, &key).is_some(),
                    boot_id: None,
                },
                None => Reply::error(ErrorCode::Invalid, "key must be {host}/{path}"),
            },
            Request::Invalidate { target } => self.invalidate(Target::parse(&target)).await,
            Request::InvalidateTags { host, tags } => {
                self.invalidate(Target::tags(&host, &tags)).await
            }
            Request::Stats { ack } => Reply::Stats(self.stats(ack)),
            Request::Shadows { after } => {
                let now = Instant::now();
                let (page, more) = p.shadows.page(after.as_deref(), PAGE_KEY_BYTES, now);
                Reply::ShadowPage {
                    shadows: page
                        .into_iter()
                        .map(|(key, m)| LiveShadow {
                            key,
                            ttl_secs: m.expires.saturating_duration_since(now).as_secs(),
                            priority: m.priority,
                        })
                        .collect(),
                    more,
                    boot_id: Some(self.boot_id),
                }
            }
            Request::PeerFetch { .. } => Reply::error(ErrorCode::Invalid, "peer fetch is a stream"),
        }
    }

    /// Apply a purge the broker ordered (`Done { found }`), or say why it is refused.
    async fn invalidate(&self, target: Result<Target, String>) -> Reply {
        let p = &self.parts;
        match target {
            Ok(t) => {
                let parts = PurgeParts {
                    storage: p.storage,
                    shadows: p.shadows.clone(),
                    metrics: p.metrics.clone(),
                    origins: p.origins.current(),
                };
                match purge_answered(parts, &p.inflight, t).await {
                    Ok(found) => Reply::Done {
                        found,
                        boot_id: None,
                    },
                    // The broker sends it again, as it does a busy edge's refusal.
                    Err(e @ (PurgeError::DiskStalled | PurgeError::DiskBacklog)) => {
                        Reply::error(ErrorCode::Busy, e.to_string())
                    }
                    Err(e) => Reply::error(ErrorCode::Internal, e.to_string()),
                }
            }
            Err(e) => Reply::error(ErrorCode::Invalid, e),
        }
    }

    fn stats(&self, ack: Option<u64>) -> StatsReport {
        let p = &self.parts;
        let (outcomes_seq, outcomes) = p.shadows.outcomes().batch(ack, self.boot_id, OUTCOME_BYTES);
        let m = &p.metrics;
        let (shadows, shadow_bytes) = p.shadows.usage();
        StatsReport {
            node_id: p.node_id.clone(),
            shadows: shadows as u64,
            shadow_bytes,
            shadow_hits: m.shadow_hits.get(),
            shadows_wasted: m.shadows_expired.with_label_values(&["wasted"]).get(),
            shadows_used: m.shadows_expired.with_label_values(&["used"]).get(),
            fills_peer: m.shadow_fill_sources.with_label_values(&["peer"]).get(),
            fills_origin: m.shadow_fill_sources.with_label_values(&["origin"]).get(),
            fills_failed: m.shadow_fills.with_label_values(&["failed"]).get(),
            fill_bytes: m.shadow_fill_bytes.get(),
            cache_capacity_bytes: p.capacity_bytes,
            shadow_first_hits: m.shadow_first_hits.get(),
            misses: m.status(CacheStatus::Miss).requests.get(),
            outcomes,
            outcomes_seq,
            boot_id: self.boot_id,
            lost_boots: p.shadows.outcomes().lost_boots_to_tell(),
            memory_only: p.memory_only,
            cache_id: p.cache_id,
        }
    }

    /// Stream a fresh cached copy of `key`; returns the outcome label.
    async fn peer_fetch(
        &self,
        key: &str,
        accept_encoding: Option<&str>,
        id: u64,
        send: &mut quinn::SendStream,
    ) -> &'static str {
        let p = &self.parts;
        let reply = |msg| Envelope {
            v: VERSION,
            id,
            msg,
        };
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            let msg = "this edge is shutting down";
            let _ = reply_frame(send, &reply(Reply::error(ErrorCode::Busy, msg))).await;
            return "busy";
        }
        let Some((host, path)) = split_key(key) else {
            let _ = reply_frame(
                send,
                &reply(Reply::error(
                    ErrorCode::Invalid,
                    "key must be {host}/{path}, spelled as URL parsing keeps it (no . or .. segments, no raw quote, space or non-ASCII byte)",
                )),
            )
            .await;
            return "error";
        };
        let mut req = self
            .http
            .get(format!("http://{}{path}", p.proxy_listen))
            .header("host", host)
            .header(PEER_FETCH_HEADER, p.internal.value());
        // The proxy normalizes it again; a value that is not a header value is left out.
        if let Some(ae) = accept_encoding.filter(|v| http::HeaderValue::from_str(v).is_ok()) {
            req = req.header(http::header::ACCEPT_ENCODING, ae);
        }
        let resp = req.send().await;
        let mut resp = match resp {
            Ok(r) if r.status().is_success() => r,
            // 504: not held (or not fresh); 404: a host this edge does not route. Anything
            // else is this edge failing, which the asking edge counts as an error.
            Ok(r) if matches!(r.status().as_u16(), 404 | 504) => {
                let msg = format!("not cached here (status {})", r.status().as_u16());
                let _ = reply_frame(send, &reply(Reply::error(ErrorCode::NotFound, msg))).await;
                return "not_found";
            }
            Ok(r) => {
                let msg = format!("the cache answered {}", r.status().as_u16());
                let _ = reply_frame(send, &reply(Reply::error(ErrorCode::Internal, msg))).await;
                return "error";
            }
            Err(e) => {
                let _ = reply_frame(
                    send,
                    &reply(Reply::error(ErrorCode::Internal, e.to_string())),
                )
                .await;
                return "error";
            }
        };
        // Values travel as text: UTF-8 ones (a `café` tag) as they are. A copy with a value
        // that is not UTF-8 is not handed over, as one missing a header (its tags, say: a
        // tag purge would miss it there) would be stored by the asking edge.
        let headers: Option<Vec<(String, String)>> = resp
            .headers()
            .iter()
            .filter(|(n, _)| !is_hop_header(n.as_str()))
            .map(|(n, v)| {
                let v = std::str::from_utf8(v.as_bytes()).ok()?;
                Some((n.as_str().to_string(), v.to_string()))
            })
            .collect();
        let Some(headers) = headers else {
            let msg = "a header of the copy is not UTF-8".to_string();
            let _ = reply_frame(send, &reply(Reply::error(ErrorCode::NotFound, msg))).await;
            return "not_found";
        };
        let head = Reply::PeerHead {
            status: resp.status().as_u16(),
            headers,
        };
        if reply_frame(send, &reply(head)).await.is_err() {
            return "reset";
        }
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    match tokio::time::timeout(CHUNK_WAIT, send.write_all(&chunk)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return "reset",
                        Err(_) => {
                            let _ = send.reset(1u32.into());
                            return "stalled";
                        }
                    }
                }
                Ok(None) => return "ok",
                Err(e) => {
                    tracing::warn!(%key, error = %e, "peer fetch body failed");
                    let _ = send.reset(1u32.into());
                    return "error";
                }
            }
        }
    }
}

/// [`write_frame`] of a reply, given [`REPLY_WAIT`]: a stream whose reader does not take it by
/// then is reset.
async fn reply_frame<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), FrameError> {
    match tokio::time::timeout(REPLY_WAIT, write_frame(send, msg)).await {
        Ok(written) => written,
        Err(_) => {
            let _ = send.reset(1u32.into());
            Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Message `id` with an empty body.
    fn key(id: u64) -> MessageKey {
        MessageKey::of(id, None)
    }

    #[test]
    fn only_certificate_alerts_of_this_side_forget_an_address_at_once() {
        let alert = |a: u8| {
            quinn::ConnectionError::TransportError(quinn_proto::TransportError {
                code: quinn_proto::TransportErrorCode::crypto(a),
                frame: None,
                reason: String::new(),
            })
        };
        assert!(certificate_refused(&alert(44)), "certificate_revoked");
        assert!(certificate_refused(&alert(48)), "unknown_ca");
        assert!(certificate_refused(&alert(116)), "certificate_required");
        assert!(!certificate_refused(&alert(120)), "no_application_protocol");
        assert!(!certificate_refused(&alert(50)), "decode_error");
        assert!(!certificate_refused(&quinn::ConnectionError::TimedOut));
    }

    #[test]
    fn dedup_remembers_recent_ids_only() {
        let mut d = Dedup::default();
        for id in 0..(DEDUP_CAPACITY as u64 + 10) {
            d.put(
                key(id),
                Reply::Done {
                    found: true,
                    boot_id: None,
                },
            );
        }
        assert!(d.get(key(0)).is_none());
        assert!(d.get(key(DEDUP_CAPACITY as u64 + 9)).is_some());
        assert_eq!(d.replies.len(), DEDUP_CAPACITY);
        d.put(key(1), Reply::Stats(Default::default()));
        d.put(key(2), Reply::Stats(Default::default()));
        assert!(d.get(key(1)).is_none() && d.get(key(2)).is_some());
    }

    /// An id seen before, carrying another message, is that other message: handled, not
    /// answered with the first one's reply.
    #[test]
    fn a_reused_id_with_another_message_is_not_a_repeat() {
        let purge = |target: &str| {
            serde_json::to_value(Request::Invalidate {
                target: target.into(),
            })
            .unwrap()
        };
        let (a, b) = (purge("h/a"), purge("h/b"));
        let mut d = Dedup::default();
        d.put(
            MessageKey::of(5, Some(&a)),
            Reply::Done {
                found: false,
                boot_id: None,
            },
        );
        assert!(matches!(
            d.turn(MessageKey::of(5, Some(&a.clone()))),
            Turn::Answered(_)
        ));
        assert!(matches!(
            d.turn(MessageKey::of(5, Some(&b))),
            Turn::Handle(_)
        ));
    }

    /// A retry that arrives while the first delivery is still at work waits for its reply
    /// instead of acting again; one whose first delivery was abandoned acts itself.
    #[tokio::test]
    async fn a_retry_waits_for_the_delivery_at_work() {
        let seen = parking_lot::Mutex::new(Dedup::default());
        let id = key(7);
        let Turn::Handle(tx) = seen.lock().turn(id) else {
            panic!("a new id is handled");
        };
        let running = Running { seen: &seen, id };
        let Turn::Pending(mut rx) = seen.lock().turn(id) else {
            panic!("a retry waits");
        };
        let reply = Reply::Done {
            found: true,
            boot_id: None,
        };
        seen.lock().put(id, reply.clone());
        tx.send(Some(reply.clone())).unwrap();
        drop(running);
        let got = rx.wait_for(Option::is_some).await.unwrap().clone();
        assert_eq!(got, Some(reply.clone()));
        assert!(matches!(seen.lock().turn(id), Turn::Answered(r) if r == reply));
        assert!(seen.lock().running.is_empty());

        let Turn::Handle(abandoned) = seen.lock().turn(key(8)) else {
            panic!("a new id is handled");
        };
        let running = Running {
            seen: &seen,
            id: key(8),
        };
        let Turn::Pending(mut rx) = seen.lock().turn(key(8)) else {
            panic!("a retry waits");
        };
        // The delivery's task is dropped: its guard, then its sender.
        drop(running);
        drop(abandoned);
        assert!(rx.wait_for(Option::is_some).await.is_err());
        assert!(
            matches!(seen.lock().turn(key(8)), Turn::Handle(_)),
            "handled afresh"
        );
    }
}
