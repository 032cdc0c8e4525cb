//! An axum router served inside the pingora server, so it shares pingora's graceful
//! shutdown: the admin API, the peer-fill bridge, and the broker's provider API.
//!
//! These listeners face operators, providers and peers, and share the process's file
//! descriptors with the proxy: a client that opens connections and sends nothing (or one byte
//! a minute) must not hold them. Each connection gets [`HEADER_READ_TIMEOUT`] to send a request
//! header, also while it sits idle between requests, and at most [`MAX_CONNECTIONS`] are open
//! at once; past that, new ones are closed at once until one ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::Semaphore;

/// Longest a connection may take to send a request's header, counted from when it is ready
/// for one (an idle keep-alive connection is closed after as long).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections one listener holds open at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Longest a stop waits for the requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (out of file descriptors: retrying at once would spin).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Least time between two warnings about connections turned away.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// A router on a listener bound before start-up (a busy port is a clear start-up error).
pub struct AxumService {
    name: &'static str,
    listener: parking_lot::Mutex<Option<std::net::TcpListener>>,
    router: axum::Router,
    max_connections: usize,
    header_read_timeout: Duration,
}

impl AxumService {
    /// Serve `router` on `listener`; `name` appears in logs.
    pub fn new(name: &'static str, listener: std::net::TcpListener, router: axum::Router) -> Self {
        AxumService {
            name,
            listener: parking_lot::Mutex::new(Some(listener)),
            router,
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }

    /// The same with other connection limits (tests use small ones).
    pub fn with_limits(mut self, max_connections: usize, header_read_timeout: Duration) -> Self {
        self.max_connections = max_connections;
        self.header_read_timeout = header_read_timeout;
        self
    }
}

#[async_trait]
impl BackgroundService for AxumService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(std_listener) = self.listener.lock().take() else {
            return;
        };
        let listener = match std_listener
            .set_nonblocking(true)
            .and_then(|_| tokio::net::TcpListener::from_std(std_listener))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(service = self.name, error = %e, "listener unusable");
                return;
            }
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let mut warned: Option<Instant> = None;
        let mut turned_away = 0u64;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.changed() => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(service = self.name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                turned_away += 1;
                if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warned = Some(Instant::now());
                    tracing::warn!(
                        service = self.name,
                        open = self.max_connections,
                        turned_away,
                        "connection limit reached: new connections are closed until one ends"
                    );
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(self.router.clone());
            let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                let _ = conn.await;
                drop(slot);
            });
        }
        drop(listener);
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
                tracing::warn!(service = self.name, "stopped with requests still in flight");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serve a one-route router under `limits` until the returned sender is dropped.
    async fn serve(
        max_connections: usize,
        header_read_timeout: Duration,
    ) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let service = AxumService::new("test", listener, router)
            .with_limits(max_connections, header_read_timeout);
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move { service.start(rx).await });
        (addr, tx)
    }

    async fn get(addr: std::net::SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_header_is_cut_off() {
        let (addr, _stop) = serve(8, Duration::from_millis(300)).await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the connection is closed, not held");
        assert!(get(addr).await.ends_with("ok"));
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_until_one_ends() {
        let (addr, _stop) = serve(2, Duration::from_secs(30)).await;
        let held: Vec<_> =
            futures::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(addr))).await;
        // Past the limit: answered with nothing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(get(addr).await, "");
        drop(held);
        let mut answered = String::new();
        for _ in 0..50 {
            answered = get(addr).await;
            if !answered.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered.ends_with("ok"), "{answered}");
    }

    #[tokio::test]
    async fn a_stop_lets_the_request_in_flight_finish() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route(
            "/",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "late"
            }),
        );
        let service = AxumService::new("test", listener, router);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let served = tokio::spawn(async move { service.start(rx).await });
        let answer = tokio::spawn(get(addr));
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(true).unwrap();
        assert!(answer.await.unwrap().ends_with("late"));
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the service ends once its request is answered")
            .unwrap();
    }
}
