//! A client's view of one peer: a QUIC connection that is opened on first use, reopened with
//! exponential backoff after it fails, and a request/reply exchange on top of it with a
//! bound on requests in flight (backpressure) and one transparent retry, under the same
//! message id, when the connection dies mid-exchange.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use tokio::sync::{Mutex, Semaphore};

use super::protocol::{read_frame, write_frame, Envelope, FrameError, Reply, Request, VERSION};
use super::trust::{Checked, Trust};

/// Longest wait for a QUIC handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff after the first failed connect; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest backoff between connects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why an exchange with a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The handshake failed (unreachable, or a certificate the cluster CA did not issue), or
    /// the peer closed the connection with a TLS alert right after it (TLS 1.3 lets a client
    /// finish its handshake before the server has checked the client's certificate).
    #[error("connect to {addr}: {message}")]
    Connect {
        /// Peer address.
        addr: SocketAddr,
        /// Cause.
        message: String,
    },
    /// Recent connects failed; the next attempt is not due yet.
    #[error("peer {addr} is backing off after {failures} failed connects")]
    Backoff {
        /// Peer address.
        addr: SocketAddr,
        /// Consecutive failures.
        failures: u32,
    },
    /// Too many requests in flight to this peer.
    #[error("too many requests in flight")]
    Busy,
    /// No reply in time.
    #[error("timed out")]
    Timeout,
    /// The connection or stream broke.
    #[error("stream: {0}")]
    Stream(String),
    /// The reply could not be read.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The reply does not answer the request.
    #[error("reply id {got} does not match request id {sent}")]
    Mismatch {
        /// Id sent.
        sent: u64,
        /// Id received.
        got: u64,
    },
}

impl LinkError {
    /// Whether a fresh connection might succeed where this one failed.
    fn retryable(&self) -> bool {
        matches!(
            self,
            LinkError::Stream(_) | LinkError::Frame(FrameError::Io(_))
        )
    }
}

struct State {
    /// The connection and its standing against the revocation list.
    conn: Option<(quinn::Connection, Checked)>,
    retry_at: Option<Instant>,
}

/// A client endpoint and the trust its handshakes verify peers with: a link checks its
/// connection against the revocation list again when the list changes.
#[derive(Clone)]
pub struct ClientEndpoint {
    endpoint: quinn::Endpoint,
    trust: Trust,
}

impl std::ops::Deref for ClientEndpoint {
    type Target = quinn::Endpoint;

    fn deref(&self) -> &quinn::Endpoint {
        &self.endpoint
    }
}

/// One peer, reached through a shared client endpoint.
pub struct Link {
    endpoint: ClientEndpoint,
    addr: parking_lot::RwLock<SocketAddr>,
    server_name: String,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// One per request under way, its reply's stream (a peer body) included.
    permits: Arc<Semaphore>,
    /// Longest wait for a permit, when shorter than a request's timeout.
    permit_wait: Option<Duration>,
    connected: AtomicBool,
    /// Connects failed since the last successful exchange. Outside the state lock, so a
    /// successful exchange resets it without waiting for a connect under way.
    failures: AtomicU32,
    /// The peer's certificate was refused as revoked by this node's last handshake with it,
    /// or refused at a re-check that cut its connection; a successful handshake clears it,
    /// other failures leave it as it was.
    peer_revoked: AtomicBool,
    /// The certificate the peer presented at the last handshake that succeeded (or, before
    /// one, the one it was last known by): a peer whose list entry came while it made no
    /// handshake — or that stopped presenting its certificate — is judged by it.
    peer_cert: parking_lot::Mutex<Option<CertificateDer<'static>>>,
}

impl Link {
    /// A link to `addr`, whose certificate must be valid for `server_name`, with at most
    /// `max_inflight` requests at once.
    pub fn new(
        endpoint: ClientEndpoint,
        addr: SocketAddr,
        server_name: String,
        max_inflight: usize,
    ) -> Self {
        // Ids start from the clock so a restarted sender does not repeat recent ids.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Link {
            endpoint,
            addr: parking_lot::RwLock::new(addr),
            server_name,
            state: Mutex::new(State {
                conn: None,
                retry_at: None,
            }),
            next_id: AtomicU64::new(seed),
            permits: Arc::new(Semaphore::new(max_inflight.max(1))),
            permit_wait: None,
            connected: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            peer_revoked: AtomicBool::new(false),
            peer_cert: parking_lot::Mutex::new(None),
        }
    }

    /// Give up on a request after `wait` when all `max_inflight` slots stay taken (a peer
    /// fetch has the origin to fall back on, sooner than its whole timeout).
    pub fn with_permit_wait(mut self, wait: Duration) -> Self {
        self.permit_wait = Some(wait);
        self
    }

    /// The peer's address.
    pub fn addr(&self) -> SocketAddr {
        *self.addr.read()
    }

    /// Point the link at `addr`, where the peer's name resolves now: the connection to the
    /// old address is closed, and the next exchange connects to the new one without waiting
    /// out the old address's backoff.
    pub async fn retarget(&self, addr: SocketAddr) {
        if self.addr() == addr {
            return;
        }
        let mut st = self.state.lock().await;
        *self.addr.write() = addr;
        if let Some((c, _)) = st.conn.take() {
            c.close(0u32.into(), b"peer moved");
        }
        self.failures.store(0, Ordering::Relaxed);
        st.retry_at = None;
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Whether the last connection attempt succeeded and the connection is still open.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Whether this node's revocation list names the peer's certificate: its connection was
    /// cut over it, the last handshake refused it as revoked, or the list in use names the
    /// certificate it last presented ([`Link::peer_certificate`]). A new handshake that
    /// succeeds (a renewed certificate) clears it.
    pub fn peer_revoked(&self) -> bool {
        self.peer_revoked.load(Ordering::Relaxed)
            || self
                .peer_cert
                .lock()
                .as_ref()
                .is_some_and(|c| self.endpoint.trust.revokes_dialled(&self.server_name, c))
    }

    /// The certificate the peer presented at the last successful handshake, or the one
    /// [`Link::assume_peer_certificate`] gave before any.
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        self.peer_cert.lock().clone()
    }

    /// Take `cert` as the peer's until a handshake shows its own: the certificate it was seen
    /// with before this process started, so a revocation of it holds before (and without) a
    /// new handshake.
    pub fn assume_peer_certificate(&self, cert: CertificateDer<'static>) {
        self.peer_cert.lock().get_or_insert(cert);
    }

    /// The open connection, connecting (or reconnecting, subject to backoff) if needed.
    pub async fn connection(&self) -> Result<quinn::Connection, LinkError> {
        let mut st = self.state.lock().await;
        if let Some((c, checked)) = st.conn.as_mut() {
            let c = c.clone();
            let reason = c.close_reason();
            let trusted = reason.is_some() || checked.still_trusted(&c);
            match reason {
                None if trusted => return Ok(c),
                // A peer the revocation list now names: its connection was closed, and the
                // redial below fails its handshake like any refused one.
                None => {
                    st.conn = None;
                    self.connected.store(false, Ordering::Relaxed);
                    self.peer_revoked.store(true, Ordering::Relaxed);
                }
                Some(reason) => {
                    if let Some(refused) = self.drop_closed(&mut st, &c, &reason) {
                        return Err(refused);
                    }
                }
            }
        }
        if st.retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(LinkError::Backoff {
                addr: self.addr(),
                failures: self.failures.load(Ordering::Relaxed),
            });
        }
        let checked = self.endpoint.trust.dialling(&self.server_name);
        let attempt = match self.endpoint.connect(self.addr(), &self.server_name) {
            Ok(connecting) => tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .map_err(|_| "handshake timed out".to_string())
                .and_then(|r| {
                    r.map_err(|e| {
                        if revoked_by_us(&e) {
                            self.peer_revoked.store(true, Ordering::Relaxed);
                        }
                        e.to_string()
                    })
                }),
            Err(e) => Err(e.to_string()),
        };
        match attempt {
            // The failure count stays until an exchange succeeds: with TLS 1.3 a peer that
            // refuses our certificate does so only after our side of the handshake is done.
            Ok(c) => {
                self.peer_revoked.store(false, Ordering::Relaxed);
                if let Some(leaf) = super::trust::peer_leaf(&c) {
                    *self.peer_cert.lock() = Some(leaf);
                }
                st.conn = Some((c.clone(), checked));
                st.retry_at = None;
                self.connected.store(true, Ordering::Relaxed);
                Ok(c)
            }
            Err(message) => Err(self.failed(&mut st, message)),
        }
    }

    /// Count a failed connect and schedule the next attempt.
    fn failed(&self, st: &mut State, message: String) -> LinkError {
        let (Ok(before) | Err(before)) =
            self.failures
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_add(1))
                });
        let failures = before.saturating_add(1);
        let wait = FIRST_BACKOFF
            .saturating_mul(1 << failures.min(16))
            .min(MAX_BACKOFF);
        st.retry_at = Some(Instant::now() + wait);
        self.connected.store(false, Ordering::Relaxed);
        LinkError::Connect {
            addr: self.addr(),
            message,
        }
    }

    /// An exchange succeeded: the peer accepts us, so the next failure backs off from the start.
    fn answered(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// After `error` on `conn`: drop the connection if it is closed, and if the peer refused
    /// us with a TLS alert, count a failed connect instead of `error` — a peer that rejects our
    /// certificate after the handshake must not be redialled on every request.
    async fn broken(&self, conn: &quinn::Connection, error: LinkError) -> LinkError {
        let Some(reason) = conn.close_reason() else {
            return error;
        };
        let mut st = self.state.lock().await;
        self.drop_closed(&mut st, conn, &reason).unwrap_or(error)
    }

    /// Forget `conn`, closed for `reason`, if it is still the current connection; a failed
    /// connect when the peer refused us. Only the first caller to see it closed counts the
    /// failure; any other close (a restart, a graceful shutdown, an idle timeout) leaves the
    /// caller's error as it was, retried on a new connection.
    fn drop_closed(
        &self,
        st: &mut State,
        conn: &quinn::Connection,
        reason: &quinn::ConnectionError,
    ) -> Option<LinkError> {
        let current = st
            .conn
            .as_ref()
            .is_some_and(|(c, _)| c.stable_id() == conn.stable_id());
        if !current {
            return None;
        }
        st.conn = None;
        self.connected.store(false, Ordering::Relaxed);
        refused(reason).then(|| self.failed(st, format!("refused by the peer: {reason}")))
    }

    async fn exchange(
        &self,
        env: &Envelope<&Request>,
    ) -> Result<(Reply, quinn::RecvStream), LinkError> {
        let conn = self.connection().await?;
        match Self::exchange_on(&conn, env).await {
            Ok(r) => {
                self.answered();
                Ok(r)
            }
            Err(e) => Err(self.broken(&conn, e).await),
        }
    }

    async fn exchange_on(
        conn: &quinn::Connection,
        env: &Envelope<&Request>,
    ) -> Result<(Reply, quinn::RecvStream), LinkError> {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| LinkError::Stream(e.to_string()))?;
        write_frame(&mut send, env).await?;
        send.finish()
            .map_err(|e| LinkError::Stream(e.to_string()))?;
        let reply: Envelope<Reply> = read_frame(&mut recv).await?;
        if reply.id != env.id {
            return Err(LinkError::Mismatch {
                sent: env.id,
                got: reply.id,
            });
        }
        Ok((reply.msg, recv))
    }

    /// Send `req` and return the reply plus the rest of the stream (a peer fetch's body),
    /// which holds its slot on the link until dropped: a body still streaming counts
    /// against `max_inflight`, so requests never queue for the peer's stream credit.
    pub async fn open(&self, req: &Request, timeout: Duration) -> Result<(Reply, Rest), LinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let permit_by = self
            .permit_wait
            .map_or(deadline, |w| deadline.min(tokio::time::Instant::now() + w));
        let permit = tokio::time::timeout_at(permit_by, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| LinkError::Busy)?
            .map_err(|_| LinkError::Busy)?;
        let env = Envelope {
            v: VERSION,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            msg: req,
        };
        let mut retried = false;
        loop {
            match tokio::time::timeout_at(deadline, self.exchange(&env)).await {
                Err(_) => return Err(LinkError::Timeout),
                Ok(Ok((reply, recv))) => {
                    let rest = Rest {
                        recv,
                        _permit: permit,
                    };
                    return Ok((reply, rest));
                }
                Ok(Err(e)) if e.retryable() && !retried => {
                    tracing::debug!(peer = %self.addr(), error = %e, "retrying on a new connection");
                    retried = true;
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Send `req` and return the reply.
    pub async fn request(&self, req: &Request, timeout: Duration) -> Result<Reply, LinkError> {
        self.open(req, timeout).await.map(|(reply, _)| reply)
    }
}

/// The stream after a reply, holding the request's slot on its link.
pub struct Rest {
    /// The stream.
    pub recv: quinn::RecvStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Whether the peer refused us: it closed the connection with a TLS alert (QUIC codes
/// 0x100–0x1ff; alerts only happen during a handshake, e.g. over our certificate), or because
/// its revocation list names our certificate, or because we hold too many connections to it.
/// Redialling at once would be refused the same way.
fn refused(reason: &quinn::ConnectionError) -> bool {
    match reason {
        quinn::ConnectionError::ConnectionClosed(close) => {
            (0x100..=0x1ff).contains(&u64::from(close.error_code))
        }
        quinn::ConnectionError::ApplicationClosed(close) => [
            super::trust::REVOKED_CLOSE_CODE,
            super::server::TOO_MANY_CLOSE_CODE,
        ]
        .iter()
        .any(|c| u64::from(close.error_code) == u64::from(*c)),
        _ => false,
    }
}

/// Whether a handshake failed because this side found the peer's certificate revoked: the
/// TLS alert certificate_revoked (44) this side raised, as a QUIC transport error.
fn revoked_by_us(e: &quinn::ConnectionError) -> bool {
    super::trust::alert_raised(e) == Some(44)
}

/// A client endpoint presenting `identity`, bound to an ephemeral port: dual-stack where the
/// host has IPv6, so one endpoint reaches IPv4 and IPv6 peers alike; else IPv4 (enough for
/// `like`, the first peer's address, when that is IPv4).
pub fn client_endpoint(
    identity: &super::tls::NodeIdentity,
    like: SocketAddr,
) -> Result<ClientEndpoint, super::SyncError> {
    let v6: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
    let v4: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
    let bind_error = |addr| move |e| super::SyncError::Bind { addr, source: e };
    let socket = match dual_stack_socket(v6) {
        Ok(s) => s,
        Err(_) if like.is_ipv4() => std::net::UdpSocket::bind(v4).map_err(bind_error(v4))?,
        Err(e) => return Err(bind_error(v6)(e)),
    };
    let bind = socket.local_addr().map_err(bind_error(v6))?;
    let bind_error = bind_error(bind);
    let mut endpoint = quinn::Endpoint::new(
        identity.endpoint_config(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)?;
    endpoint.set_default_client_config(identity.client_config()?);
    Ok(ClientEndpoint {
        endpoint,
        trust: identity.trust().clone(),
    })
}

/// Close a client endpoint on shutdown and give its peers up to 2 s to hear it: they drop
/// the connections now instead of holding them until their idle timeout.
pub async fn close_endpoint(endpoint: &quinn::Endpoint) {
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// A UDP socket on `addr` (IPv6) that also sends to and receives from IPv4 peers.
fn dual_stack_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;
    use crate::sync::pki::{create_ca, issue, NodeRole};
    use crate::sync::tls::{edge_name, NodeIdentity, TlsPaths};

    /// A network path that outlives a server process: datagrams from the client go to
    /// whichever of `servers` `current` names, and only that server's datagrams reach the
    /// client.
    async fn relay(
        sock: tokio::net::UdpSocket,
        servers: Vec<SocketAddr>,
        current: Arc<parking_lot::Mutex<SocketAddr>>,
    ) {
        let mut buf = vec![0u8; 65536];
        let mut client = None;
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let to = if servers.contains(&from) {
                (from == *current.lock()).then_some(client).flatten()
            } else {
                client = Some(from);
                Some(*current.lock())
            };
            if let Some(to) = to {
                let _ = sock.send_to(&buf[..n], to).await;
            }
        }
    }

    /// Answer every request on `server` with an error naming `name`, after closing the first
    /// `close_first` connections (as a peer shutting down would) at their first request.
    fn serve(server: quinn::Endpoint, name: &'static str, close_first: usize) -> Arc<AtomicU64> {
        let accepted = Arc::new(AtomicU64::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let n = counted.fetch_add(1, Ordering::Relaxed) as usize;
                let Ok(conn) = incoming.await else { continue };
                tokio::spawn(async move {
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        if n < close_first {
                            conn.close(0u32.into(), b"shutting down");
                            return;
                        }
                        let req: Envelope<Request> = read_frame(&mut recv).await.unwrap();
                        let reply = Reply::Error {
                            code: crate::sync::protocol::ErrorCode::NotFound,
                            message: name.into(),
                        };
                        let env = Envelope {
                            v: VERSION,
                            id: req.id,
                            msg: reply,
                        };
                        write_frame(&mut send, &env).await.unwrap();
                        let _ = send.finish();
                    }
                });
            }
        });
        accepted
    }

    fn answered_by(r: Result<Reply, LinkError>) -> String {
        match r.unwrap() {
            Reply::Error { message, .. } => message,
            other => panic!("{other:?}"),
        }
    }

    /// A cluster CA in `dir` and the identities it issues to edge `e1` and to a broker.
    fn edge_and_broker(dir: &std::path::Path) -> (NodeIdentity, NodeIdentity) {
        create_ca(dir).unwrap();
        let edge = issue(dir, "e1", NodeRole::Edge, dir).unwrap();
        let broker = issue(dir, "b", NodeRole::Broker, dir).unwrap();
        (
            NodeIdentity::load(&edge).unwrap(),
            NodeIdentity::load(&broker).unwrap(),
        )
    }

    fn server(identity: &NodeIdentity) -> quinn::Endpoint {
        server_on(identity, "127.0.0.1:0")
    }

    /// A link from `from` to edge `e1` at `addr`, with `max_inflight` requests at once.
    fn link_to(from: &NodeIdentity, addr: SocketAddr, max_inflight: usize) -> Link {
        Link::new(
            client_endpoint(from, addr).unwrap(),
            addr,
            edge_name("e1"),
            max_inflight,
        )
    }

    /// A CA in `dir`, edge `e1` served (answering "here") and the broker's identity: the
    /// edge's files, the broker, the edge's address and its count of accepted connections.
    fn edge_serving_broker(
        dir: &std::path::Path,
    ) -> (TlsPaths, NodeIdentity, SocketAddr, Arc<AtomicU64>) {
        create_ca(dir).unwrap();
        let edge = issue(dir, "e1", NodeRole::Edge, dir).unwrap();
        let broker = NodeIdentity::load(&issue(dir, "b", NodeRole::Broker, dir).unwrap()).unwrap();
        let server = server(&NodeIdentity::load(&edge).unwrap());
        let addr = server.local_addr().unwrap();
        let accepted = serve(server, "here", 0);
        (edge, broker, addr, accepted)
    }

    fn server_on(identity: &NodeIdentity, addr: &str) -> quinn::Endpoint {
        let socket = UdpSocket::bind(addr).unwrap();
        quinn::Endpoint::new(
            identity.endpoint_config(),
            Some(identity.server_config().unwrap()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_reply_stream_holds_its_slot_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (edge, broker) = edge_and_broker(dir.path());
        let server = server(&edge);
        let addr = server.local_addr().unwrap();
        serve(server, "here", 0);
        let link = link_to(&broker, addr, 1).with_permit_wait(Duration::from_millis(50));
        let stats = Request::Stats { ack: None };
        let (_, body) = link.open(&stats, Duration::from_secs(5)).await.unwrap();
        // Its body still held, the one slot is taken: the next request gives up after the
        // permit wait, not its whole timeout.
        let t = Instant::now();
        let second = link.open(&stats, Duration::from_secs(5)).await;
        assert!(matches!(second, Err(LinkError::Busy)));
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        drop(body);
        let reply = link.request(&stats, Duration::from_secs(5)).await;
        assert_eq!(answered_by(reply), "here");
    }

    #[tokio::test]
    async fn one_client_endpoint_reaches_ipv4_and_ipv6_peers() {
        if UdpSocket::bind("[::1]:0").is_err() {
            return; // no IPv6 on this host: the endpoint is IPv4 only, by design
        }
        let dir = tempfile::tempdir().unwrap();
        let (edge, broker) = edge_and_broker(dir.path());
        let (v4, v6) = (server(&edge), server_on(&edge, "[::1]:0"));
        let v4_addr = v4.local_addr().unwrap();
        let client = client_endpoint(&broker, v4_addr).unwrap();
        for (server, addr) in [(&v4, v4_addr), (&v6, v6.local_addr().unwrap())] {
            let connecting = client.connect(addr, &edge_name("e1")).unwrap();
            let (conn, accepted) =
                tokio::join!(connecting, async { server.accept().await.unwrap().await });
            assert!(conn.is_ok() && accepted.is_ok(), "{addr}");
        }
    }

    #[tokio::test]
    async fn a_restarted_node_resets_its_predecessors_connections_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (edge, broker) = edge_and_broker(dir.path());
        // The same identity twice: the node before and after its restart.
        let (before, after) = (server(&edge), server(&edge));
        let servers = vec![before.local_addr().unwrap(), after.local_addr().unwrap()];
        let current = Arc::new(parking_lot::Mutex::new(servers[0]));
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let path = sock.local_addr().unwrap();
        tokio::spawn(relay(sock, servers.clone(), current.clone()));

        let client = client_endpoint(&broker, path).unwrap();
        let connecting = client.connect(path, &edge_name("e1")).unwrap();
        // The old node keeps its side open: it is gone from the path, not closed.
        let (conn, held) = tokio::join!(connecting, async {
            before.accept().await.unwrap().await.unwrap()
        });
        let conn = conn.unwrap();
        // One exchange confirms the handshake: from then on only short-header packets flow,
        // the kind a stateless reset answers.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"ping").await.unwrap();
        send.finish().unwrap();
        let (mut back, mut got) = held.accept_bi().await.unwrap();
        assert_eq!(got.read_to_end(16).await.unwrap(), b"ping");
        back.write_all(b"pong").await.unwrap();
        back.finish().unwrap();
        assert_eq!(recv.read_to_end(16).await.unwrap(), b"pong");
        *current.lock() = servers[1];

        // The next keep-alive reaches the new node, whose reset the client can verify; the
        // idle timeout (10 s) would be the only way out otherwise.
        let closed = tokio::time::timeout(Duration::from_secs(6), conn.closed())
            .await
            .expect("the connection outlived its peer's restart");
        assert!(
            matches!(closed, quinn::ConnectionError::Reset),
            "{closed:?}"
        );
    }

    #[tokio::test]
    async fn a_renewed_certificate_is_presented_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, other) = (dir.path().join("cluster"), dir.path().join("other"));
        let out = dir.path().join("broker");
        for d in [&cluster, &other, &out] {
            std::fs::create_dir_all(d).unwrap();
        }
        create_ca(&cluster).unwrap();
        create_ca(&other).unwrap();
        let edge = issue(&cluster, "e1", NodeRole::Edge, &cluster).unwrap();
        let server = server(&NodeIdentity::load(&edge).unwrap());
        let addr = server.local_addr().unwrap();
        // The broker's files hold a certificate the cluster does not trust...
        let mut paths = issue(&other, "b", NodeRole::Broker, &out).unwrap();
        paths.ca_cert = cluster.join("ca.pem");
        paths.crl = None;
        let broker = NodeIdentity::load(&paths).unwrap();
        let client = client_endpoint(&broker, addr).unwrap();
        let handshake = || async {
            let dial = client.connect(addr, &edge_name("e1")).unwrap();
            let (accepted, _dialled) =
                tokio::join!(async { server.accept().await.unwrap().await.is_ok() }, dial);
            accepted
        };
        assert!(!handshake().await, "refused: another CA issued it");
        assert!(!broker.reload_if_changed().unwrap(), "nothing changed yet");
        // ...until a renewal from the cluster CA lands in the same files.
        let renewed = issue(&cluster, "b", NodeRole::Broker, &out).unwrap();
        assert_eq!((&renewed.cert, &renewed.key), (&paths.cert, &paths.key));
        assert!(broker.reload_if_changed().unwrap());
        assert!(handshake().await, "the same endpoint presents the renewal");
        // A half-written renewal keeps the certificate in use, and so does one the cluster
        // would refuse (another CA's).
        std::fs::write(&paths.cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
        assert!(broker.reload_if_changed().is_err());
        assert!(handshake().await);
        issue(&other, "b", NodeRole::Broker, &out).unwrap();
        let refused = broker.reload_if_changed().unwrap_err().to_string();
        assert!(refused.contains("refuse"), "{refused}");
        assert!(handshake().await);
    }

    #[tokio::test]
    async fn a_peer_that_refuses_our_certificate_is_backed_off_not_redialled() {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, other) = (dir.path().join("cluster"), dir.path().join("other"));
        for ca in [&cluster, &other] {
            std::fs::create_dir_all(ca).unwrap();
            create_ca(ca).unwrap();
        }
        let edge = issue(&cluster, "e1", NodeRole::Edge, &cluster).unwrap();
        let server = server(&NodeIdentity::load(&edge).unwrap());
        let addr = server.local_addr().unwrap();
        let handshakes = Arc::new(AtomicU64::new(0));
        let counted = handshakes.clone();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    if let Ok(c) = incoming.await {
                        c.closed().await;
                    }
                });
            }
        });
        // Trusts the cluster CA, but another CA issued its certificate: with TLS 1.3 its
        // side of the handshake completes, and the edge refuses it right after.
        let mut rogue = issue(&other, "b", NodeRole::Broker, &other).unwrap();
        rogue.ca_cert = cluster.join("ca.pem");
        let rogue = NodeIdentity::load(&rogue).unwrap();
        let link = link_to(&rogue, addr, 4);

        let timeout = Duration::from_secs(3);
        let first = link
            .request(&Request::Stats { ack: None }, timeout)
            .await
            .unwrap_err();
        assert!(matches!(first, LinkError::Connect { .. }), "{first}");
        let second = link
            .request(&Request::Stats { ack: None }, timeout)
            .await
            .unwrap_err();
        assert!(
            matches!(second, LinkError::Backoff { failures: 1, .. }),
            "{second}"
        );
        assert!(!link.is_connected());
        assert_eq!(handshakes.load(Ordering::Relaxed), 1);
        // Past the backoff the handshake completes again and is refused again: the backoff
        // grows rather than starting over at every completed handshake.
        tokio::time::sleep(FIRST_BACKOFF * 3).await;
        let third = link
            .request(&Request::Stats { ack: None }, timeout)
            .await
            .unwrap_err();
        assert!(matches!(third, LinkError::Connect { .. }), "{third}");
        let fourth = link
            .request(&Request::Stats { ack: None }, timeout)
            .await
            .unwrap_err();
        assert!(
            matches!(fourth, LinkError::Backoff { failures: 2, .. }),
            "{fourth}"
        );
        assert_eq!(handshakes.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_link_to_a_peer_revoked_since_it_connected_is_refused_at_its_next_request() {
        let dir = tempfile::tempdir().unwrap();
        let (edge, broker, addr, accepted) = edge_serving_broker(dir.path());
        let link = link_to(&broker, addr, 4);
        let stats = Request::Stats { ack: None };
        let timeout = Duration::from_secs(3);
        assert_eq!(answered_by(link.request(&stats, timeout).await), "here");
        assert!(!link.peer_revoked());
        crate::sync::pki::revoke(dir.path(), std::slice::from_ref(&edge.cert)).unwrap();
        assert!(broker.reload_revocations().unwrap());
        let refused = link.request(&stats, timeout).await.unwrap_err();
        assert!(
            matches!(&refused, LinkError::Connect { message, .. } if message.to_lowercase().contains("revoked")),
            "{refused}"
        );
        assert!(!link.is_connected());
        assert!(link.peer_revoked());
        assert_eq!(accepted.load(Ordering::Relaxed), 2, "one redial, refused");
        // Past the backoff the redial is refused at the handshake, still as revoked.
        tokio::time::sleep(FIRST_BACKOFF * 3).await;
        assert!(link.request(&stats, timeout).await.is_err());
        assert!(link.peer_revoked());
        // So is a new link's first handshake (a broker that restarted since).
        let fresh = link_to(&broker, addr, 4);
        assert!(!fresh.peer_revoked());
        assert!(fresh.request(&stats, timeout).await.is_err());
        assert!(fresh.peer_revoked(), "refused as revoked at the handshake");
    }

    /// A peer revoked while this node made no handshake with it (a broker that restarted, a
    /// revoked edge that drops its packets) is known revoked by the certificate it last showed.
    #[tokio::test]
    async fn a_peer_is_judged_by_the_certificate_it_last_presented() {
        use rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        let (edge, broker, addr, _) = edge_serving_broker(dir.path());
        let link = link_to(&broker, addr, 4);
        assert!(link.peer_certificate().is_none());
        let stats = Request::Stats { ack: None };
        assert_eq!(
            answered_by(link.request(&stats, Duration::from_secs(3)).await),
            "here"
        );
        let shown = link.peer_certificate().expect("kept at the handshake");
        assert_eq!(shown, CertificateDer::from_pem_file(&edge.cert).unwrap());
        // A new link (a restarted broker) to an address where nothing answers, given the
        // certificate kept from before.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let nowhere = silent.local_addr().unwrap();
        let fresh = link_to(&broker, nowhere, 4);
        fresh.assume_peer_certificate(shown);
        assert!(!fresh.peer_revoked());
        crate::sync::pki::revoke(dir.path(), std::slice::from_ref(&edge.cert)).unwrap();
        assert!(broker.reload_revocations().unwrap());
        assert!(fresh.peer_revoked(), "no handshake needed");
        assert!(link.peer_revoked(), "nor a request on the open connection");
    }

    #[tokio::test]
    async fn a_retargeted_link_reconnects_to_the_new_address_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (edge, broker) = edge_and_broker(dir.path());
        // The peer before and after it moved.
        let (old, new) = (server(&edge), server(&edge));
        let (old_addr, new_addr) = (old.local_addr().unwrap(), new.local_addr().unwrap());
        serve(old, "old", 0);
        serve(new, "new", 0);
        let client = client_endpoint(&broker, old_addr).unwrap();
        let link = Link::new(client, old_addr, edge_name("e1"), 4);
        let timeout = Duration::from_secs(3);
        assert_eq!(
            answered_by(link.request(&Request::Stats { ack: None }, timeout).await),
            "old"
        );
        // Something else at the next address (another node's certificate): refused, and the
        // link backs off.
        let other = issue(dir.path(), "e2", NodeRole::Edge, dir.path()).unwrap();
        let other = server(&NodeIdentity::load(&other).unwrap());
        let other_addr = other.local_addr().unwrap();
        serve(other, "e2", 0);
        link.retarget(other_addr).await;
        let refused = link
            .request(&Request::Stats { ack: None }, timeout)
            .await
            .unwrap_err();
        assert!(matches!(refused, LinkError::Connect { .. }), "{refused}");
        // The name moves on: the new address is tried at once, whatever the backoff.
        link.retarget(new_addr).await;
        assert_eq!(link.addr(), new_addr);
        assert_eq!(
            answered_by(link.request(&Request::Stats { ack: None }, timeout).await),
            "new"
        );
    }

    #[tokio::test]
    async fn a_peer_that_closes_before_replying_is_retried_at_once_not_backed_off() {
        let dir = tempfile::tempdir().unwrap();
        let (edge, broker) = edge_and_broker(dir.path());
        let server = server(&edge);
        let addr = server.local_addr().unwrap();
        let accepted = serve(server, "e1", 1);
        let client = client_endpoint(&broker, addr).unwrap();
        let link = Link::new(client, addr, edge_name("e1"), 4);
        let timeout = Duration::from_secs(3);
        assert_eq!(
            answered_by(link.request(&Request::Stats { ack: None }, timeout).await),
            "e1"
        );
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
        assert!(link.is_connected());
    }
}
