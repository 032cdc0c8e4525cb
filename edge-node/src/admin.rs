//! The operator listener: purge, metrics, health.
//!
//! - `GET /healthz` — liveness, open.
//! - `GET /metrics` — Prometheus text format, open (bind the admin listener privately).
//! - `PURGE` or `DELETE /cache/{host}/{path}[?query]` — remove one object and all its Vary
//!   variants, from memory and disk.
//! - `PURGE` or `DELETE /cache/{host}/{prefix}*` — remove every object whose key starts with
//!   the prefix (durable ban, see [`crate::storage::BanList`]).
//!
//! - `POST /shadows` — `{"key": "host/path", "ttl_secs", "priority"?}`: pre-position an object
//!   (202; filled in the background with bounded concurrency; 503 when the queue is full).
//! - `GET /shadows/{host}/{path}` — the shadow mark of one object; `DELETE` removes the mark
//!   (and the object, if it never served a request).
//! - `GET /origins` — configured and pushed origin rows.
//! - `PUT /origins` — `{"origins": [{"host", "path_prefix"?, "upstream"}]}` replaces the rows
//!   pushed by the broker; a bad row rejects the whole push and changes nothing.
//!
//! Purge and origin endpoints need `Authorization: Bearer <admin.token>`. Every error is JSON.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::{Encoder, TextEncoder};
use serde::Deserialize;
use serde_json::json;

use crate::config::OriginEntry;
use crate::metrics::EdgeMetrics;
use crate::origin::{normalize_host, SharedOrigins};
use crate::proxy::primary_key;
use crate::shadow::{FillRequest, Filler, ShadowTable};
use crate::storage::FoyerStorage;

/// Shared state of the admin handlers.
#[derive(Clone)]
pub struct AdminState {
    node_id: Arc<str>,
    token: Arc<str>,
    storage: &'static FoyerStorage,
    origins: Arc<SharedOrigins>,
    registry: prometheus::Registry,
    metrics: EdgeMetrics,
    shadows: Arc<ShadowTable>,
    filler: Filler,
    max_shadow_ttl: u64,
}

/// The shadowing parts of the admin API.
pub struct ShadowAdmin {
    /// Live marks.
    pub table: Arc<ShadowTable>,
    /// Fill submission.
    pub filler: Filler,
    /// Longest TTL accepted.
    pub max_ttl_secs: u64,
}

impl AdminState {
    /// Bundle what the handlers need.
    pub fn new(
        node_id: &str,
        token: &str,
        storage: &'static FoyerStorage,
        origins: Arc<SharedOrigins>,
        registry: prometheus::Registry,
        metrics: EdgeMetrics,
        shadow: ShadowAdmin,
    ) -> Self {
        AdminState {
            node_id: node_id.into(),
            token: token.into(),
            storage,
            origins,
            registry,
            metrics,
            shadows: shadow.table,
            filler: shadow.filler,
            max_shadow_ttl: shadow.max_ttl_secs,
        }
    }
}

/// The admin HTTP router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/cache/{*key}", any(purge))
        .route("/origins", get(get_origins).put(put_origins))
        .route("/shadows", axum::routing::post(post_shadow))
        .route("/shadows/{*key}", get(get_shadow).delete(delete_shadow))
        .fallback(not_found)
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": code, "message": message.into() })),
    )
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no admin endpoint at {}", uri.path()),
    )
}

async fn healthz(State(s): State<AdminState>) -> Response {
    Json(json!({ "status": "ok", "node_id": &*s.node_id })).into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    s.metrics.memory_bytes.set(s.storage.memory_usage() as i64);
    s.metrics.bans.set(s.storage.ban_count() as i64);
    let (n, bytes) = s.shadows.usage();
    s.metrics.shadows.set(n as i64);
    s.metrics.shadow_bytes.set(bytes as i64);
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&s.registry.gather(), &mut buf) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "metrics", e.to_string());
    }
    Response::builder()
        .header(header::CONTENT_TYPE, TextEncoder::new().format_type())
        .body(Body::from(buf))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "metrics", e.to_string()))
}

/// Constant-time comparison so the token cannot be guessed byte by byte from timing.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| token_matches(t.trim().as_bytes(), token.as_bytes()))
}

/// A purge target parsed from `/cache/...`.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Key(String),
    Prefix(String),
}

fn parse_target(uri: &Uri) -> Result<Target, String> {
    let raw = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("")
        .strip_prefix("/cache/")
        .unwrap_or("");
    let (host, rest) = raw
        .split_once('/')
        .ok_or_else(|| "key must be {host}/{path}, e.g. example.com/index.html".to_string())?;
    if host.is_empty() {
        return Err("key has an empty host".into());
    }
    let key = primary_key(&normalize_host(host), &format!("/{rest}"));
    match key.strip_suffix('*') {
        Some(prefix) => Ok(Target::Prefix(prefix.to_string())),
        None => Ok(Target::Key(key)),
    }
}

async fn purge(
    State(s): State<AdminState>,
    method: Method,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if method != Method::DELETE && method.as_str() != "PURGE" {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use PURGE or DELETE on /cache/{host}/{path}",
        );
    }
    if !authorized(&headers, &s.token) {
        s.metrics
            .purges
            .with_label_values(&["any", "unauthorized"])
            .inc();
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        );
    }
    match parse_target(&uri) {
        Err(msg) => error(StatusCode::BAD_REQUEST, "bad_key", msg),
        Ok(Target::Key(key)) => {
            // A purged object is no longer a shadow either.
            let found = s.storage.purge_key(&key) | s.shadows.remove(&key).is_some();
            s.metrics
                .purges
                .with_label_values(&["key", if found { "purged" } else { "not_found" }])
                .inc();
            let status = if found {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            (status, Json(json!({ "key": key, "purged": found }))).into_response()
        }
        Ok(Target::Prefix(prefix)) => match s.storage.purge_prefix(&prefix) {
            Ok(()) => {
                s.shadows.remove_prefix(&prefix);
                s.metrics
                    .purges
                    .with_label_values(&["prefix", "banned"])
                    .inc();
                Json(json!({ "prefix": prefix, "purged": true })).into_response()
            }
            Err(e) => {
                s.metrics
                    .purges
                    .with_label_values(&["prefix", "error"])
                    .inc();
                error(StatusCode::INTERNAL_SERVER_ERROR, "ban_log", e.to_string())
            }
        },
    }
}

/// Body of `POST /shadows`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowBody {
    key: String,
    ttl_secs: u64,
    #[serde(default = "default_priority")]
    priority: u8,
}

fn default_priority() -> u8 {
    5
}

/// Normalize a `host/path` key as the proxy does.
fn normalize_key(key: &str) -> Option<String> {
    let (host, rest) = key.split_once('/')?;
    (!host.is_empty()).then(|| primary_key(host, &format!("/{rest}")))
}

async fn post_shadow(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&headers, &s.token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        );
    }
    let b: ShadowBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", e.to_string()),
    };
    let Some(key) = normalize_key(&b.key) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_key",
            "key must be {host}/{path}",
        );
    };
    if b.ttl_secs == 0 || b.ttl_secs > s.max_shadow_ttl {
        let msg = format!("ttl_secs must be between 1 and {}", s.max_shadow_ttl);
        return error(StatusCode::UNPROCESSABLE_ENTITY, "bad_ttl", msg);
    }
    if b.priority > 10 {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_priority",
            "priority must be 0..=10",
        );
    }
    let req = FillRequest {
        key: key.clone(),
        ttl: Duration::from_secs(b.ttl_secs),
        priority: b.priority,
    };
    match s.filler.submit(req) {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({ "key": key, "queued": true })),
        )
            .into_response(),
        Err(e) => {
            s.metrics.shadow_fills.with_label_values(&["refused"]).inc();
            error(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
        }
    }
}

/// Authorize a `/shadows/{key}` request and return its normalized key.
fn shadow_key(s: &AdminState, headers: &HeaderMap, uri: &Uri) -> Result<String, Box<Response>> {
    if !authorized(headers, &s.token) {
        let msg = "missing or wrong bearer token";
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            msg,
        )));
    }
    let raw = uri
        .path_and_query()
        .map_or("", |p| p.as_str())
        .trim_start_matches("/shadows/");
    normalize_key(raw).ok_or_else(|| {
        let msg = "key must be {host}/{path}";
        Box::new(error(StatusCode::BAD_REQUEST, "bad_key", msg))
    })
}

async fn get_shadow(State(s): State<AdminState>, headers: HeaderMap, uri: Uri) -> Response {
    let key = match shadow_key(&s, &headers, &uri) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    match s.shadows.get(&key) {
        Some(m) => Json(json!({
            "key": key,
            "expires_in_secs": m.expires.saturating_duration_since(std::time::Instant::now()).as_secs_f64(),
            "priority": m.priority,
            "hits": m.hits,
            "bytes": m.bytes,
        }))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, "not_shadowed", format!("{key} has no shadow mark")),
    }
}

async fn delete_shadow(State(s): State<AdminState>, headers: HeaderMap, uri: Uri) -> Response {
    let key = match shadow_key(&s, &headers, &uri) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    match s.shadows.remove(&key) {
        Some(m) => {
            if m.hits == 0 {
                s.storage.purge_key(&key);
            }
            Json(json!({ "key": key, "removed": true, "hits": m.hits })).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "not_shadowed",
            format!("{key} has no shadow mark"),
        ),
    }
}

/// Body of `PUT /origins`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OriginsBody {
    origins: Vec<OriginEntry>,
}

async fn get_origins(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &s.token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        );
    }
    let (configured, pushed) = s.origins.rows();
    Json(json!({ "configured": configured, "pushed": pushed })).into_response()
}

async fn put_origins(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&headers, &s.token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        );
    }
    let parsed: OriginsBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", e.to_string()),
    };
    match s.origins.replace_pushed(parsed.origins) {
        Ok(n) => Json(json!({ "origins": n })).into_response(),
        Err(e) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_origin",
            e.to_string(),
        ),
    }
}

/// Runs the admin router inside the pingora server so it shares its graceful shutdown.
pub struct AdminService {
    listener: parking_lot::Mutex<Option<std::net::TcpListener>>,
    state: AdminState,
}

impl AdminService {
    /// `listener` is bound before the server starts so a busy port fails start-up clearly.
    pub fn new(listener: std::net::TcpListener, state: AdminState) -> Self {
        AdminService {
            listener: parking_lot::Mutex::new(Some(listener)),
            state,
        }
    }
}

#[async_trait]
impl BackgroundService for AdminService {
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
                tracing::error!(error = %e, "admin listener unusable");
                return;
            }
        };
        let storage = self.state.storage;
        let mut shutdown_bans = shutdown.clone();
        let compactor = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = storage.compact_bans() {
                            tracing::warn!(error = %e, "ban log compaction failed");
                        }
                    }
                    _ = shutdown_bans.changed() => break,
                }
            }
        });
        let app = router(self.state.clone());
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener failed");
        }
        compactor.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_and_prefixes() {
        let u: Uri = "/cache/Example.com/a/b?x=1".parse().unwrap();
        assert_eq!(
            parse_target(&u).unwrap(),
            Target::Key("example.com/a/b?x=1".into())
        );
        let u: Uri = "/cache/example.com/static/*".parse().unwrap();
        assert_eq!(
            parse_target(&u).unwrap(),
            Target::Prefix("example.com/static/".into())
        );
        let u: Uri = "/cache/example.com".parse().unwrap();
        assert!(parse_target(&u).is_err());
    }

    #[test]
    fn token_compare() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
    }
}
