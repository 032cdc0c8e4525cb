//! A client's view of one peer: a QUIC connection that is opened on first use, reopened with
//! exponential backoff after it fails, and a request/reply exchange on top of it with a
//! bound on requests in flight (backpressure) and one transparent retry, under the same
//! message id, when the connection dies mid-exchange.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Mutex, Semaphore};

use super::protocol::{read_frame, write_frame, Envelope, FrameError, Reply, Request, VERSION};

/// Longest wait for a QUIC handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff after the first failed connect; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest backoff between connects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why an exchange with a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The handshake failed (unreachable, or a certificate the cluster CA did not issue).
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
    conn: Option<quinn::Connection>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// One peer, reached through a shared client endpoint.
pub struct Link {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    server_name: String,
    state: Mutex<State>,
    next_id: AtomicU64,
    permits: Semaphore,
    connected: AtomicBool,
}

impl Link {
    /// A link to `addr`, whose certificate must be valid for `server_name`, with at most
    /// `max_inflight` requests at once.
    pub fn new(
        endpoint: quinn::Endpoint,
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
            addr,
            server_name,
            state: Mutex::new(State {
                conn: None,
                failures: 0,
                retry_at: None,
            }),
            next_id: AtomicU64::new(seed),
            permits: Semaphore::new(max_inflight.max(1)),
            connected: AtomicBool::new(false),
        }
    }

    /// The peer's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the last connection attempt succeeded and the connection is still open.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The open connection, connecting (or reconnecting, subject to backoff) if needed.
    pub async fn connection(&self) -> Result<quinn::Connection, LinkError> {
        let mut st = self.state.lock().await;
        if let Some(c) = &st.conn {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            st.conn = None;
            self.connected.store(false, Ordering::Relaxed);
        }
        if st.retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(LinkError::Backoff {
                addr: self.addr,
                failures: st.failures,
            });
        }
        let attempt = match self.endpoint.connect(self.addr, &self.server_name) {
            Ok(connecting) => tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .map_err(|_| "handshake timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
            Err(e) => Err(e.to_string()),
        };
        match attempt {
            Ok(c) => {
                st.conn = Some(c.clone());
                st.failures = 0;
                st.retry_at = None;
                self.connected.store(true, Ordering::Relaxed);
                Ok(c)
            }
            Err(message) => {
                st.failures = st.failures.saturating_add(1);
                let wait = FIRST_BACKOFF
                    .saturating_mul(1 << st.failures.min(16))
                    .min(MAX_BACKOFF);
                st.retry_at = Some(Instant::now() + wait);
                self.connected.store(false, Ordering::Relaxed);
                Err(LinkError::Connect {
                    addr: self.addr,
                    message,
                })
            }
        }
    }

    async fn forget(&self, conn: &quinn::Connection) {
        let mut st = self.state.lock().await;
        if st
            .conn
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            st.conn = None;
            self.connected.store(false, Ordering::Relaxed);
        }
    }

    async fn exchange(
        &self,
        env: &Envelope<&Request>,
    ) -> Result<(Reply, quinn::RecvStream), LinkError> {
        let conn = self.connection().await?;
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.forget(&conn).await;
                return Err(LinkError::Stream(e.to_string()));
            }
        };
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

    /// Send `req` and return the reply plus the rest of the stream (a peer fetch's body).
    pub async fn open(
        &self,
        req: &Request,
        timeout: Duration,
    ) -> Result<(Reply, quinn::RecvStream), LinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let _permit = tokio::time::timeout_at(deadline, self.permits.acquire())
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
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) if e.retryable() && !retried => {
                    tracing::debug!(peer = %self.addr, error = %e, "retrying on a new connection");
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

/// A client endpoint presenting `identity`, bound to an ephemeral port of the family of
/// `like` (the peers' address family).
pub fn client_endpoint(
    identity: &super::tls::NodeIdentity,
    like: SocketAddr,
) -> Result<quinn::Endpoint, super::SyncError> {
    let bind: SocketAddr = if like.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| super::SyncError::Bind {
        addr: bind,
        source: e,
    })?;
    endpoint.set_default_client_config(identity.client_config()?);
    Ok(endpoint)
}
