//! An axum router served inside the pingora server, so it shares pingora's graceful
//! shutdown: the admin API, the peer-fill bridge, and the broker's provider API.
//!
//! These listeners face operators, providers and peers, and share the process's file
//! descriptors with the proxy: a client that opens connections and sends nothing (or one byte
//! a minute) must not hold them. Each connection gets [`HEADER_READ_TIMEOUT`] to send a request
//! header, also while it sits idle between requests; at most [`MAX_CONNECTIONS`] are open at
//! once, and at most [`MAX_PER_SOURCE`] from one address (one IPv6 /64), so that one client
//! cannot hold them all and lock the others out (the broker's health probes among them).
//! Past either, new connections are closed at once until one ends.
//!
//! A request over the size limits is answered in JSON like any other bad input ([`field_limits`]):
//! hyper's own answers to a header it refuses to parse (431, 414) have no body, so its limits are
//! set well above ours and only a request far past them gets one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::per_key::{PerKey, Slot};

/// Longest a connection may take to send a request's header, counted from when it is ready
/// for one (an idle keep-alive connection is closed after as long).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a request body may take to arrive, for the handlers that read one whole
/// ([`read_body_within`]): a client trickling a body must not hold its connection for good.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Read `body` whole, at most `limit` bytes, within [`BODY_READ_TIMEOUT`]; `Ok(None)` when it
/// took longer.
pub async fn read_body_within(
    body: axum::body::Body,
    limit: usize,
) -> Result<Option<axum::body::Bytes>, axum::Error> {
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Ok(read) => read.map(Some),
        Err(_) => Ok(None),
    }
}

/// Most header fields a request may carry; more get a JSON 431.
pub const MAX_FIELDS: usize = 100;
/// Most bytes a request's header fields may take (names, values and their separators); more
/// get a JSON 431.
pub const MAX_FIELD_BYTES: usize = 64 * 1024;
/// Longest request target (path and query) in bytes; longer ones get a JSON 414. Room for a
/// purge of the longest key the broker routes, percent-encoded.
pub const MAX_TARGET_BYTES: usize = 32 * 1024;
/// Most header lines hyper parses before answering 431 itself, without a body.
const HYPER_MAX_FIELDS: usize = 1024;

/// Answer a request over [`MAX_FIELDS`], [`MAX_FIELD_BYTES`] or [`MAX_TARGET_BYTES`] with a
/// JSON error before any handler sees it.
pub async fn field_limits(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_TARGET_BYTES {
        let msg = format!("the request target is {target} bytes; at most {MAX_TARGET_BYTES}");
        return too_large(StatusCode::URI_TOO_LONG, "uri_too_long", msg);
    }
    let fields = req.headers().len();
    if fields > MAX_FIELDS {
        let msg = format!("the request has {fields} header fields; at most {MAX_FIELDS}");
        return too_large(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            msg,
        );
    }
    let bytes: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if bytes > MAX_FIELD_BYTES {
        let msg =
            format!("the request's header fields take {bytes} bytes; at most {MAX_FIELD_BYTES}");
        return too_large(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            msg,
        );
    }
    next.run(req).await
}

/// A JSON refusal that also closes the connection: the client sent more than it may, and a
/// connection kept open would read its next request after a header it cannot trust.
fn too_large(status: StatusCode, code: &str, message: String) -> Response {
    let mut resp = (status, Json(json!({ "error": code, "message": message }))).into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Most connections one listener holds open at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most connections one listener holds open from one address (IPv6: one /64).
pub const MAX_PER_SOURCE: usize = 256;
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
    max_per_source: usize,
    header_read_timeout: Duration,
    field_limits: bool,
}

impl AxumService {
    /// Serve `router` on `listener`; `name` appears in logs.
    pub fn new(name: &'static str, listener: std::net::TcpListener, router: axum::Router) -> Self {
        AxumService {
            name,
            listener: parking_lot::Mutex::new(Some(listener)),
            router,
            field_limits: true,
            max_connections: MAX_CONNECTIONS,
            max_per_source: MAX_PER_SOURCE,
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }

    /// Without [`field_limits`]: for a listener only this process calls (the peer bridge,
    /// which carries client requests the proxy already accepted and reads a few of their
    /// fields), where they would only turn such requests away.
    pub fn without_field_limits(mut self) -> Self {
        self.field_limits = false;
        self
    }

    /// The same with other connection limits (tests use small ones).
    pub fn with_limits(
        mut self,
        max_connections: usize,
        max_per_source: usize,
        header_read_timeout: Duration,
    ) -> Self {
        self.max_connections = max_connections;
        self.max_per_source = max_per_source;
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
        let router = if self.field_limits {
            self.router
                .clone()
                .layer(axum::middleware::from_fn(field_limits))
        } else {
            self.router.clone()
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_headers(HYPER_MAX_FIELDS);
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let sources = Sources::default();
        let mut warned: Option<Instant> = None;
        let mut turned_away = 0u64;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.changed() => break,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(service = self.name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let slot = sources
                .admit(peer.ip(), self.max_per_source)
                .and_then(|source| Some((source, slots.clone().try_acquire_owned().ok()?)));
            let Some(slot) = slot else {
                turned_away += 1;
                if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warned = Some(Instant::now());
                    tracing::warn!(
                        service = self.name,
                        max = self.max_connections,
                        max_per_source = self.max_per_source,
                        source = %peer.ip(),
                        turned_away,
                        "connection limit reached: new connections are closed until one ends"
                    );
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(router.clone());
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

/// Open connections per source (an IPv4 address, an IPv6 /64).
#[derive(Clone, Default)]
struct Sources(PerKey<std::net::IpAddr>);

impl Sources {
    /// Count a connection from `ip`, unless its source holds `max` already.
    fn admit(&self, ip: std::net::IpAddr, max: usize) -> Option<Slot<std::net::IpAddr>> {
        let source = match ip.to_canonical() {
            std::net::IpAddr::V6(v6) => {
                let s = v6.segments();
                std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).into()
            }
            v4 => v4,
        };
        self.0.admit(source, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serve a one-route router under these limits until the returned sender is dropped.
    async fn serve(
        max_connections: usize,
        max_per_source: usize,
        header_read_timeout: Duration,
    ) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let service = AxumService::new("test", listener, router).with_limits(
            max_connections,
            max_per_source,
            header_read_timeout,
        );
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

    /// Send `head` (a request line and fields, without the blank line) and read the answer.
    async fn send(addr: std::net::SocketAddr, head: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("{head}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out));
        let _ = read
            .await
            .expect("the connection is closed after the answer");
        out
    }

    #[tokio::test]
    async fn requests_over_the_size_limits_get_json_errors() {
        let (addr, _stop) = serve(8, 8, Duration::from_secs(30)).await;
        let fields =
            |n: usize, len: usize| (0..n).map(move |i| format!("\r\nx-f{i}: {}", "a".repeat(len)));
        let many: String = fields(MAX_FIELDS + 50, 1).collect();
        let big: String = fields(4, MAX_FIELD_BYTES / 3).collect();
        let long = "a".repeat(MAX_TARGET_BYTES + 10);
        for (head, status, code) in [
            (
                format!("GET / HTTP/1.1\r\nHost: x{many}"),
                431,
                "headers_too_large",
            ),
            (
                format!("GET / HTTP/1.1\r\nHost: x{big}"),
                431,
                "headers_too_large",
            ),
            (
                format!("GET /?{long} HTTP/1.1\r\nHost: x"),
                414,
                "uri_too_long",
            ),
        ] {
            let out = send(addr, &head).await;
            assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
            let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(body).expect(&out);
            assert_eq!(v["error"], code, "{out}");
            assert!(v["message"].as_str().unwrap().contains("at most"), "{out}");
        }
        // A listener without them (the peer bridge) takes what hyper parses.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let service = AxumService::new("test", listener, router).without_field_limits();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move { service.start(rx).await });
        let out = send(
            open,
            &format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: close{many}"),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        // Within them, served as before.
        let within: String = fields(MAX_FIELDS - 10, 100).collect();
        let out = send(
            addr,
            &format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: close{within}"),
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 200 ") && out.ends_with("ok"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_header_is_cut_off() {
        let (addr, _stop) = serve(8, 8, Duration::from_millis(300)).await;
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
        let (addr, _stop) = serve(2, 8, Duration::from_secs(30)).await;
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
    async fn one_source_cannot_hold_every_connection() {
        let (addr, _stop) = serve(8, 2, Duration::from_secs(30)).await;
        let held: Vec<_> =
            futures::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(addr))).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(get(addr).await, "", "a third from the same address");
        drop(held);
        let sources = Sources::default();
        let v6 = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let a = sources.admit(v6("2001:db8::1"), 1).unwrap();
        assert!(sources.admit(v6("2001:db8::2"), 1).is_none(), "one /64");
        assert!(sources.admit(v6("2001:db8:0:1::1"), 1).is_some());
        drop(a);
        assert!(sources.admit(v6("2001:db8::2"), 1).is_some());
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
