//! A scriptable origin: each request's query string says how to answer, and every request is
//! counted, so tests can assert exactly how often the edge went to the origin.
//!
//! Query parameters (all optional):
//! - `size=N` body length (default 64); the body is deterministic in path and size
//! - `cc=...` Cache-Control value (default `public, max-age=60`; `none` sends no header)
//! - `age=N` send `Age: N`, as a response that aged in another cache would
//! - `etag=...` ETag value; `If-None-Match` with it gets a 304
//! - `lm=1` send a fixed Last-Modified and honour `If-Modified-Since`
//! - `vary=header` send `Vary: header` and echo that request header's lines in the body
//! - `delay_ms=N` wait before answering
//! - `status=N` answer with this status
//! - `chunked=1` stream the body without Content-Length
//! - `chunk_delay_ms=N` with `chunked=1`: pause before each 16 KiB chunk
//! - `fail_after=N` with `chunked=1`: abort the connection after N chunks; `fail_from=K`:
//!   only from the path's Kth request on (the earlier ones complete)
//! - `with_length=1` with `chunked=1`: stream the chunks under a Content-Length
//! - `errors_at=2,3` answer the path's 2nd and 3rd requests with 500; `error_cc=...` is
//!   their Cache-Control
//! - `set_cookie=...` send `Set-Cookie`
//! - `gen=1` end the body with `;gen=N`, N the version [`TestOrigin::bump`] publishes
//! - `personal=1` answer a request carrying a `Cookie` with `private` and a `Set-Cookie`
//! - `skey=...` send `Surrogate-Key`; `ctag=...` send `Cache-Tag` (cache tags);
//!   `skey_gen=1` send `Surrogate-Key: gen-N`, N the version [`TestOrigin::bump`] publishes
//! - `ct=...` send this `Content-Type` (none otherwise)
//! - `location=...` send this `Location`
//! - `https_redirect=1` a cacheable 301 to https for requests not forwarded as https
//! - `hdr=name:value|name:value` send these header lines (in a 304 too)
//! - `hdr_gen=name` send `name: gen-N` (in a 304 too), N the version [`TestOrigin::bump`]
//!   publishes

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use parking_lot::Mutex;

const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";

#[derive(Default)]
struct Counters {
    total: AtomicUsize,
    not_modified: AtomicUsize,
    by_path: Mutex<HashMap<String, usize>>,
    last_headers: Mutex<HashMap<String, HeaderMap>>,
    last_query: Mutex<HashMap<String, String>>,
    /// Per path: requests being answered now, and the most ever at once.
    in_flight: Mutex<HashMap<String, (usize, usize)>>,
    /// The content's version, for `gen=1` ([`TestOrigin::bump`]).
    generation: AtomicUsize,
}

/// Counts a request as in flight until its handler returns.
struct InFlight {
    counters: Arc<Counters>,
    path: String,
}

impl InFlight {
    fn start(counters: &Arc<Counters>, path: &str) -> InFlight {
        let mut m = counters.in_flight.lock();
        let (now, most) = m.entry(path.to_string()).or_default();
        *now += 1;
        *most = (*most).max(*now);
        InFlight {
            counters: counters.clone(),
            path: path.to_string(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some((now, _)) = self.counters.in_flight.lock().get_mut(&self.path) {
            *now -= 1;
        }
    }
}

/// A running test origin.
pub struct TestOrigin {
    /// Where it listens.
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    handle: OriginHandle,
}

/// Stops the origin; its port then refuses connections.
pub struct OriginHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl OriginHandle {
    /// Stop accepting and close the listener.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Deterministic body for `path` of `size` bytes.
pub fn body_for(path: &str, size: usize) -> Vec<u8> {
    let seed = path
        .bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    (0..size)
        .map(|i| b'a' + ((i as u8).wrapping_add(seed) % 26))
        .collect()
}

impl TestOrigin {
    /// Start on a free loopback port (`port` 0) or a given one (to restart at the same address).
    pub async fn start_on(port: u16) -> TestOrigin {
        let counters = Arc::new(Counters::default());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind test origin");
        let addr = listener.local_addr().expect("origin addr");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(counters.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        TestOrigin {
            addr,
            counters,
            handle: OriginHandle {
                stop: Some(tx),
                task: Some(task),
            },
        }
    }

    /// Start on a free port.
    pub async fn start() -> TestOrigin {
        Self::start_on(0).await
    }

    /// Requests received in total.
    pub fn total(&self) -> usize {
        self.counters.total.load(Ordering::SeqCst)
    }

    /// 304 answers given.
    pub fn not_modified(&self) -> usize {
        self.counters.not_modified.load(Ordering::SeqCst)
    }

    /// Publish a new version of every `gen=1` object.
    pub fn bump(&self) {
        self.counters.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Requests received for `path` (without query).
    pub fn hits(&self, path: &str) -> usize {
        self.counters.by_path.lock().get(path).copied().unwrap_or(0)
    }

    /// The most requests for `path` (without query) the origin was answering at once.
    pub fn max_in_flight(&self, path: &str) -> usize {
        self.counters
            .in_flight
            .lock()
            .get(path)
            .map_or(0, |(_, most)| *most)
    }

    /// Headers of the last request for `path`.
    pub fn last_headers(&self, path: &str) -> Option<HeaderMap> {
        self.counters.last_headers.lock().get(path).cloned()
    }

    /// The query string of the last request for `path` ("" without one).
    pub fn last_query(&self, path: &str) -> Option<String> {
        self.counters.last_query.lock().get(path).cloned()
    }

    /// Stop serving.
    pub async fn stop(&mut self) {
        self.handle.stop().await;
    }
}

async fn handle(
    State(c): State<Arc<Counters>>,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let path = uri.path().to_string();
    c.total.fetch_add(1, Ordering::SeqCst);
    // This request's position among the path's, taken on arrival: concurrent requests each
    // get their own whatever their delays.
    let nth = {
        let mut by_path = c.by_path.lock();
        let n = by_path.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    c.last_headers.lock().insert(path.clone(), headers.clone());
    c.last_query
        .lock()
        .insert(path.clone(), uri.query().unwrap_or("").to_string());
    let _in_flight = InFlight::start(&c, &path);

    if let Some(ms) = q.get("delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let size: usize = q.get("size").and_then(|v| v.parse().ok()).unwrap_or(64);
    let mut status: u16 = q.get("status").and_then(|v| v.parse().ok()).unwrap_or(200);
    // `errors_at=2,3`: the path's 2nd and 3rd requests are answered 500 (a flaky origin).
    let mut cc = q.get("cc").map(String::as_str);
    if q.get("errors_at")
        .is_some_and(|v| v.split(',').any(|n| n.parse() == Ok(nth)))
    {
        status = 500;
        // `error_cc`: the errors' own Cache-Control ("none": without one).
        if let Some(v) = q.get("error_cc") {
            cc = Some(v);
        }
    }
    let mut resp = Response::builder().status(status);
    // `https_redirect`: a cacheable 301 to https for requests that did not come over https
    // (by X-Forwarded-Proto), without a Vary, as many origins answer.
    if q.contains_key("https_redirect")
        && headers
            .get("x-forwarded-proto")
            .is_none_or(|v| v != "https")
    {
        let host = headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        return resp
            .status(StatusCode::MOVED_PERMANENTLY)
            .header("cache-control", "public, max-age=60")
            .header("location", format!("https://{host}{uri}"))
            .body(Body::empty())
            .expect("static response parts");
    }
    match cc {
        Some("none") => {}
        Some(v) => resp = resp.header("cache-control", v),
        None => resp = resp.header("cache-control", "public, max-age=60"),
    }
    if let Some(age) = q.get("age") {
        resp = resp.header("age", age);
    }
    if let Some(cookie) = q.get("set_cookie") {
        resp = resp.header("set-cookie", cookie);
    }
    // `personal=1`: a request with a `Cookie` is answered as a logged-in user's page.
    if q.contains_key("personal") && headers.contains_key("cookie") {
        resp = resp
            .header("cache-control", "private")
            .header("set-cookie", "seen=1");
    }
    if let Some(ct) = q.get("ct") {
        resp = resp.header("content-type", ct);
    }
    if let Some(to) = q.get("location") {
        resp = resp.header("location", to);
    }
    // `headers=N`: N extra header lines (`x-pad-<i>: 1`), to reach header-count limits.
    if let Some(n) = q.get("headers").and_then(|v| v.parse::<usize>().ok()) {
        for i in 0..n {
            resp = resp.header(format!("x-pad-{i}"), "1");
        }
    }
    if let Some(tags) = q.get("skey") {
        resp = resp.header("surrogate-key", tags);
    }
    if q.contains_key("skey_gen") {
        let g = c.generation.load(Ordering::SeqCst);
        resp = resp.header("surrogate-key", format!("gen-{g}"));
    }
    if let Some(tags) = q.get("ctag") {
        resp = resp.header("cache-tag", tags);
    }
    for line in q.get("hdr").map(|v| v.split('|')).into_iter().flatten() {
        if let Some((name, value)) = line.split_once(':') {
            resp = resp.header(name, value);
        }
    }
    if let Some(name) = q.get("hdr_gen") {
        let g = c.generation.load(Ordering::SeqCst);
        resp = resp.header(name.as_str(), format!("gen-{g}"));
    }
    if let Some(etag) = q.get("etag") {
        let tag = format!("\"{etag}\"");
        resp = resp.header("etag", &tag);
        if headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains(&tag))
        {
            c.not_modified.fetch_add(1, Ordering::SeqCst);
            return resp
                .status(StatusCode::NOT_MODIFIED)
                .body(Body::empty())
                .expect("static response parts");
        }
    }
    if q.contains_key("lm") {
        resp = resp.header("last-modified", LAST_MODIFIED);
        if headers
            .get("if-modified-since")
            .is_some_and(|v| v == LAST_MODIFIED)
        {
            c.not_modified.fetch_add(1, Ordering::SeqCst);
            return resp
                .status(StatusCode::NOT_MODIFIED)
                .body(Body::empty())
                .expect("static response parts");
        }
    }
    let mut body = body_for(&path, size);
    if let Some(h) = q.get("vary") {
        resp = resp.header("vary", h.as_str());
        let lines: Vec<&str> = headers
            .get_all(h.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let v = if lines.is_empty() {
            "-".to_string()
        } else {
            lines.join(" | ")
        };
        body = format!("variant={v}").into_bytes();
    }
    if q.contains_key("gen") {
        let g = c.generation.load(Ordering::SeqCst);
        body.extend_from_slice(format!(";gen={g}").as_bytes());
    }
    if q.contains_key("chunked") {
        let pause: u64 = q
            .get("chunk_delay_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let failing = q
            .get("fail_from")
            .and_then(|v| v.parse().ok())
            .is_none_or(|k| nth >= k);
        let fail_after: Option<usize> = q
            .get("fail_after")
            .and_then(|v| v.parse().ok())
            .filter(|_| failing);
        // `with_length`: stream the chunks under a Content-Length, as a file server does.
        if q.contains_key("with_length") {
            resp = resp.header("content-length", body.len());
        }
        let chunks: Vec<Bytes> = body.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
        let stream = futures::stream::unfold(
            (chunks.into_iter(), 0usize),
            move |(mut it, sent)| async move {
                if sent == usize::MAX {
                    return None;
                }
                if fail_after == Some(sent) {
                    let cut = std::io::Error::other("origin cut the body off");
                    return Some((Err(cut), (it, usize::MAX)));
                }
                let c = it.next()?;
                if pause > 0 {
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Some((Ok(c), (it, sent.saturating_add(1))))
            },
        );
        return resp
            .body(Body::from_stream(stream))
            .expect("static response parts");
    }
    resp.header("content-length", body.len())
        .body(Body::from(body))
        .expect("static response parts")
}
