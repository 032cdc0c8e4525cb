//! The operator listener: purge, metrics, health.
//!
//! - `GET /healthz` — liveness, open: the process answers.
//! - `GET /readyz` — readiness, open: 503 `disk_stalled` or `disk_failing` while the cache
//!   disk does not answer its probe ([`crate::storage::DiskHealth`]). The broker's health
//!   checks ask it, so clients go to another edge meanwhile; a restart would not help a disk
//!   that hangs, so liveness does not depend on it.
//! - `GET /metrics` — Prometheus text format, open (bind the admin listener privately).
//! - `PURGE` or `DELETE /cache/{host}/{path}[?query]` — remove one object and all its Vary
//!   variants, from memory and disk (a key ban stands in for a tombstone the disk tier did not
//!   write in time); 500 `not_durable` when neither could be made durable (the object is gone
//!   from memory; purge again to make it final).
//! - `PURGE` or `DELETE /cache/{host}/{prefix}*` — remove every object whose key starts with
//!   the prefix (durable ban, see [`crate::storage::BanList`]).
//! - `POST` or `PURGE /tags/{host}` — `{"tags": ["a", …]}` (1 to 64): remove every object of
//!   the host whose response carried one of the tags (`Surrogate-Key`/`Cache-Tag`, see
//!   [`crate::tags`]; durable ban).
//! - Every purge: 503 `disk_stalled` when the disk stalls while it waits for it (in force,
//!   durable once the disk answers), or when too many already wait for a stalled disk (not
//!   applied): [`crate::invalidate::purge_answered`].
//!
//! - `POST /shadows` — `{"key": "host/path", "ttl_secs", "priority"?}`: pre-position an object
//!   (202; filled in the background with bounded concurrency; 503 when the queue is full).
//! - `GET /shadows/{host}/{path}` — the shadow mark of one object; `DELETE` removes the mark
//!   (and the object, unless a client asked for it or the edge held it before).
//! - `GET /origins` — configured and pushed origin rows.
//! - `PUT /origins` — `{"origins": [{"host", "path_prefix"?, "upstream", "forward_host"?,
//!   "strip_set_cookie"?, "cache_key_ignore_query"?, "registered_at_ms"?}],
//!   "allow_private_upstreams"?, "sent_at_ms"?}` replaces the rows
//!   pushed by the broker. Each row is judged on its own: the answer is `{"origins": n,
//!   "rejected": [{"index", "host", "error"}], "ignored"?: [{"index", "host", "fields"}]}`
//!   (see [`crate::origin::SharedOrigins`]); a row's fields this edge does not know (a newer
//!   broker's options) are left out of it, not a reason to refuse the push.
//!   Registration times raise host floors first ([`crate::ownership`]); 500 `ban_log` when
//!   they cannot be made durable; `"not_saved": <why>` in the answer when the table applied
//!   but could not be saved for a restart.
//! - `GET /peers` — the other edges a hinted miss may be filled from.
//! - `PUT /peers` — `{"peers": [{"id", "addr"}]}` (QUIC addresses) replaces them; pushed by
//!   the broker with the origins. A bad row rejects the whole push.
//!
//! Every route but `/healthz`, `/readyz` and `/metrics` needs
//! `Authorization: Bearer <admin.token>`.
//! Every error is JSON.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::{Encoder, TextEncoder};
use serde::Deserialize;
use serde_json::json;

use crate::config::{OriginEntry, ORIGIN_ENTRY_FIELDS};
use crate::drain::{detached, InflightCounter};
use crate::invalidate::{purge_answered, PurgeError, PurgeParts, Target};
use crate::metrics::EdgeMetrics;
use crate::origin::{normalize_host, IgnoredFields, SharedOrigins};
use crate::ownership::{self, Registration};
use crate::proxy::token_matches;
use crate::shadow::{unshadow, FillRequest, Filler, ShadowTable};
use crate::storage::{DiskHealth, DiskVerdict, FoyerStorage, OwnerChange};
use crate::sync::protocol::PeerRef;
use crate::sync::PeerDirectory;

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
    peers: Arc<PeerDirectory>,
    /// The cache disk's watchdog; none in tests that start no storage probe.
    disk: Option<DiskHealth>,
    /// The drain's count of work in flight: a task a handler leaves running (a purge, an
    /// origin push) counts until it ends, not only until its caller hangs up.
    inflight: InflightCounter,
    /// Origin pushes read or being applied ([`MAX_PUSHES`]).
    pushes: Arc<AtomicUsize>,
}

/// Origin pushes an edge takes at once: one applying and one waiting. The broker gives up
/// on a push after 2 s and pushes again every 3 s, while one push's floor fsyncs behind a
/// stalled disk may take longer; the pushes it left would otherwise pile up, each holding its
/// table. A push refused for it is answered 503: the next brings the newest table anyway.
const MAX_PUSHES: usize = 2;

/// An origin push's place among [`MAX_PUSHES`], given back when dropped.
struct PushSlot(Arc<AtomicUsize>);

impl PushSlot {
    fn take(pushes: &Arc<AtomicUsize>) -> Option<PushSlot> {
        let slot = PushSlot(pushes.clone());
        (pushes.fetch_add(1, Ordering::AcqRel) < MAX_PUSHES).then_some(slot)
    }
}

impl Drop for PushSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
            peers: Arc::new(PeerDirectory::new(node_id)),
            disk: None,
            inflight: InflightCounter::default(),
            pushes: Arc::default(),
        }
    }

    /// Serve and update `peers` (the directory the proxy resolves peer hints in).
    pub fn with_peers(mut self, peers: Arc<PeerDirectory>) -> Self {
        self.peers = peers;
        self
    }

    /// Answer readiness by the cache disk's watchdog.
    pub fn watching_disk(mut self, disk: DiskHealth) -> Self {
        self.disk = Some(disk);
        self
    }

    /// Count the tasks handlers leave running in `inflight`, the drain's counter.
    pub fn counting(mut self, inflight: InflightCounter) -> Self {
        self.inflight = inflight;
        self
    }
}

/// Largest origin table the broker may push: the whole fleet's rows in one body (about 150
/// bytes a row: some 200,000 rows), far past axum's 2 MiB default, which about 15,000 rows
/// would outgrow and then no edge would learn a new host.
pub const MAX_ORIGIN_PUSH_BYTES: usize = 32 << 20;

/// The admin HTTP router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/cache/{*key}", any(purge))
        .route("/tags/{host}", any(purge_tags))
        .route("/origins", get(get_origins).put(put_origins))
        .route("/peers", get(get_peers).put(put_peers))
        .route("/shadows", axum::routing::post(post_shadow))
        .route("/shadows/{*key}", get(get_shadow).delete(delete_shadow))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(crate::json_errors::json_errors))
        .with_state(state)
}

/// A 405 naming the methods the route takes, in its `Allow` header too (RFC 9110).
fn not_allowed(allow: &'static str, message: &str) -> Response {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        message,
    );
    r.headers_mut()
        .insert(header::ALLOW, http::HeaderValue::from_static(allow));
    r
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

async fn readyz(State(s): State<AdminState>) -> Response {
    match s.disk.as_ref().map(DiskHealth::verdict) {
        None | Some(DiskVerdict::Ready) => {
            Json(json!({ "status": "ready", "node_id": &*s.node_id })).into_response()
        }
        Some(not) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "not_ready",
                "node_id": &*s.node_id,
                "error": not.code(),
                "message": not.to_string(),
            })),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let disk_ready = s
        .disk
        .as_ref()
        .is_none_or(|d| d.verdict() == DiskVerdict::Ready);
    s.metrics.disk_ready.set(i64::from(disk_ready));
    s.metrics.memory_bytes.set(s.storage.memory_usage() as i64);
    s.metrics.fill_bytes.set(s.storage.fill_bytes() as i64);
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

/// The bearer token of a request; the scheme name is case-insensitive (RFC 9110 §11.1).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    bearer_token(headers).is_some_and(|t| token_matches(t.as_bytes(), token.as_bytes()))
}

/// 401 (JSON) unless the request carries the admin token.
fn authorize(headers: &HeaderMap, token: &str) -> Result<(), Box<Response>> {
    if authorized(headers, token) {
        return Ok(());
    }
    let msg = "missing or wrong bearer token";
    Err(Box::new(error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        msg,
    )))
}

/// Most bytes of a small admin request body: tags, a shadow order, the peer list.
const MAX_SMALL_BODY_BYTES: usize = 2 << 20;

/// Authorize, then read the JSON body (400 when it is not the expected shape): read only once
/// the token is checked, so a caller without it makes this edge buffer nothing.
async fn authorized_json<T: serde::de::DeserializeOwned>(
    s: &AdminState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<T, Box<Response>> {
    authorize(headers, &s.token)?;
    read_json(body, MAX_SMALL_BODY_BYTES).await
}

/// The JSON body, at most `limit` bytes ([`read_body`], [`json_body`]).
async fn read_json<T: serde::de::DeserializeOwned>(
    body: axum::body::Body,
    limit: usize,
) -> Result<T, Box<Response>> {
    json_body(&read_body(body, limit).await?)
}

/// The whole request body, at most `limit` bytes: 413 beyond it, 400 when it cannot be read
/// (the client hung up, malformed chunking).
async fn read_body(
    body: axum::body::Body,
    limit: usize,
) -> Result<axum::body::Bytes, Box<Response>> {
    let read = crate::http_service::read_body_within(body, limit)
        .await
        .map_err(|e| {
            let inner = e.into_inner();
            Box::new(if inner.is::<http_body_util::LengthLimitError>() {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("request body over {limit} bytes"),
                )
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("request body unreadable: {inner}"),
                )
            })
        })?;
    read.ok_or_else(|| {
        Box::new(error(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the request body did not arrive in time".to_string(),
        ))
    })
}

/// A JSON body, or a 400 saying why not.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, "bad_json", e.to_string())))
}

/// The purge a `/cache/…` URI names.
fn parse_target(uri: &Uri) -> Result<Target, String> {
    let raw = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("")
        .strip_prefix("/cache/")
        .unwrap_or("");
    Target::parse(raw)
}

async fn purge(
    State(s): State<AdminState>,
    method: Method,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if method != Method::DELETE && method.as_str() != "PURGE" {
        return not_allowed(
            "PURGE, DELETE",
            "use PURGE or DELETE on /cache/{host}/{path}",
        );
    }
    if let Err(r) = authorize_purge(&s, &headers) {
        return *r;
    }
    let target = match parse_target(&uri) {
        Ok(t) => t,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "bad_key", msg),
    };
    purge_target(&s, target).await
}

/// [`authorize`] a purge, counting a refused one.
fn authorize_purge(s: &AdminState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    authorize(headers, &s.token).inspect_err(|_| {
        s.metrics
            .purges
            .with_label_values(&["any", "unauthorized"])
            .inc();
    })
}

/// Apply an authorized purge and answer it (a key also as the proxy keys it now:
/// [`crate::invalidate::invalidate_named`]); a stalled disk is answered 503 `disk_stalled` without waiting for it
/// ([`purge_answered`]).
async fn purge_target(s: &AdminState, target: Target) -> Response {
    let parts = PurgeParts {
        storage: s.storage,
        shadows: s.shadows.clone(),
        metrics: s.metrics.clone(),
        origins: s.origins.current(),
    };
    let done = purge_answered(parts, &s.inflight, target.clone()).await;
    match (done, target) {
        (Ok(found), Target::Key(key)) => {
            let status = if found {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            (status, Json(json!({ "key": key, "purged": found }))).into_response()
        }
        (Ok(_), Target::Prefix(prefix)) => {
            Json(json!({ "prefix": prefix, "purged": true })).into_response()
        }
        (Ok(_), Target::Tags { host, tags }) => {
            Json(json!({ "host": host, "tags": tags, "purged": true })).into_response()
        }
        (Err(e @ PurgeError::Ban(_)), _) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "ban_log", e.to_string())
        }
        (Err(e @ PurgeError::NotDurable(_)), _) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "not_durable",
            e.to_string(),
        ),
        (Err(e @ (PurgeError::DiskStalled | PurgeError::DiskBacklog)), _) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "disk_stalled",
            e.to_string(),
        ),
    }
}

/// Body of `POST /tags/{host}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagsBody {
    tags: Vec<String>,
}

async fn purge_tags(
    State(s): State<AdminState>,
    method: Method,
    headers: HeaderMap,
    host: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: axum::body::Body,
) -> Response {
    if method != Method::POST && method.as_str() != "PURGE" {
        return not_allowed("POST, PURGE", "use POST or PURGE on /tags/{host}");
    }
    if let Err(r) = authorize_purge(&s, &headers) {
        return *r;
    }
    // The path after the method and the token: a caller without it learns nothing of how
    // its path would be read.
    let host = match host {
        Ok(Path(host)) => host,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_path", e.body_text()),
    };
    let req: TagsBody = match read_json(body, MAX_SMALL_BODY_BYTES).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let target = match Target::tags(&host, &req.tags) {
        Ok(t) => t,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "bad_tags", msg),
    };
    purge_target(&s, target).await
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

async fn post_shadow(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let b: ShadowBody = match authorized_json(&s, &headers, body).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    // Keyed as the proxy keys its requests (the origin's query filter applied), so the mark
    // names the copy the fill stores and the hits it serves.
    let key = s.origins.current().normalize_key(&b.key);
    let key = key.as_deref().unwrap_or(&b.key);
    let req = match FillRequest::validated(key, b.ttl_secs, b.priority, s.max_shadow_ttl) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string()),
    };
    let key = req.key.clone();
    match s.filler.submit(req) {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({ "key": key, "queued": true })),
        )
            .into_response(),
        Err(e) => {
            s.metrics.shadow_fills.with_label_values(&["refused"]).inc();
            let code = match e {
                crate::shadow::FillError::Closed => "shutting_down",
                crate::shadow::FillError::QueueFull => "busy",
            };
            error(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string())
        }
    }
}

/// Authorize a `/shadows/{key}` request and return its normalized key.
fn shadow_key(s: &AdminState, headers: &HeaderMap, uri: &Uri) -> Result<String, Box<Response>> {
    authorize(headers, &s.token)?;
    let raw = uri
        .path_and_query()
        .map_or("", |p| p.as_str())
        .trim_start_matches("/shadows/");
    s.origins.current().normalize_key(raw).ok_or_else(|| {
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
    match unshadow(&s.shadows, s.storage, &key) {
        Some(m) => Json(json!({ "key": key, "removed": true, "hits": m.hits })).into_response(),
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
    /// Rows as sent: fields this edge does not know are split off by [`known_fields`].
    origins: Vec<serde_json::Value>,
    /// The broker lets providers use loopback and private upstreams (its `[admin]
    /// allow_private_upstreams`); otherwise rows resolving there are left out.
    #[serde(default)]
    allow_private_upstreams: bool,
    /// The broker's clock when it sent the push (ms since the epoch): rows'
    /// `registered_at_ms` are read against it ([`crate::ownership`]).
    #[serde(default)]
    sent_at_ms: Option<u64>,
}

async fn get_origins(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&headers, &s.token) {
        return *r;
    }
    let (configured, pushed) = s.origins.rows();
    Json(json!({ "configured": configured, "pushed": pushed })).into_response()
}

async fn put_origins(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    // The token before the body: a caller without it must not make this edge buffer a
    // table-sized body.
    if let Err(r) = authorize(&headers, &s.token) {
        return *r;
    }
    let Some(slot) = PushSlot::take(&s.pushes) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "earlier origin pushes are still being applied",
        );
    };
    let parsed: OriginsBody = match read_json(body, MAX_ORIGIN_PUSH_BYTES).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let (rows, ignored) = match known_fields(parsed.origins) {
        Ok(split) => split,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", e),
    };
    // The rest detached: a caller that hangs up (the broker gives a push 2 s, and here floors
    // are fsynced and names resolved) must not leave the table applied with its ownership
    // floors half raised, or not kept for a restart.
    let push = Push {
        rows,
        ignored,
        sent_at_ms: parsed.sent_at_ms,
        allow_private_upstreams: parsed.allow_private_upstreams,
    };
    let applied = {
        let s = s.clone();
        async move {
            let _slot = slot;
            apply_origins(s, push).await
        }
    };
    detached(&s.inflight, applied).await.unwrap_or_else(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("origin push failed: {e}"),
        )
    })
}

/// An authorized origin push, parsed.
struct Push {
    rows: Vec<OriginEntry>,
    ignored: Vec<IgnoredFields>,
    sent_at_ms: Option<u64>,
    allow_private_upstreams: bool,
}

/// Apply `push`: ownership floors before and after, the rows, and the table kept for a restart.
async fn apply_origins(s: AdminState, push: Push) -> Response {
    let Push {
        rows,
        ignored,
        sent_at_ms,
        allow_private_upstreams,
    } = push;
    let _serial = s.origins.serialize().await;
    s.metrics
        .origin_push_ignored_fields
        .set(ignored.iter().map(|i| i.fields.len() as i64).sum());
    let regs: Vec<Registration> = rows
        .iter()
        .filter_map(|row| {
            Some(Registration {
                scope: format!("{}/", normalize_host(row.host.trim())),
                registered_ms: row.registered_at_ms?,
            })
        })
        .collect();
    let mut plan = ownership::plan(
        &regs,
        |scope| s.storage.host_owner(scope),
        sent_at_ms,
        SystemTime::now(),
    );
    if let Err(r) = apply_owner_changes(s.storage, std::mem::take(&mut plan.before)).await {
        return *r;
    }
    // Rows are judged one by one: the usable ones apply, the others are listed back.
    let kept = rows.clone();
    let mut report = s.origins.push(rows, allow_private_upstreams).await;
    report.ignored = ignored;
    // Kept for a restart before the new owners' registrations are recorded, written (two
    // fsyncs) off the admin API's one thread, which health probes share. A table that could
    // not be kept leaves them unrecorded (their floor still applies): a restart would restore
    // the older table, and the next push must see the change of owner again and floor what
    // that table fetched in between.
    let (origins, allow) = (s.origins.clone(), allow_private_upstreams);
    let kept = match tokio::task::spawn_blocking(move || origins.remember(&kept, allow)).await {
        Ok(saved) => saved.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if !plan.replaced.is_empty() {
        let mut after = plan.after(SystemTime::now());
        if kept.is_err() {
            for change in &mut after {
                change.registered_ms = None;
            }
        }
        if let Err(r) = apply_owner_changes(s.storage, after).await {
            return *r;
        }
    }
    // Applied but not kept: said in the answer, not refused. The table is in force, so the
    // broker may deliver the purges it holds for this edge; a restart restores the table
    // before, and the broker's first push after it brings this one back.
    report.not_saved = kept.err();
    Json(report).into_response()
}

/// Pushed rows without the fields this edge does not know, and those fields per row. A newer
/// broker's option is left out (the row applies without it: a cache key with every query
/// parameter, say) instead of the whole push being refused, so an edge upgraded after its
/// broker keeps learning hosts. A row that is not an object, or whose known fields are
/// malformed, still fails the push.
fn known_fields(
    rows: Vec<serde_json::Value>,
) -> Result<(Vec<OriginEntry>, Vec<IgnoredFields>), String> {
    let mut ignored = Vec::new();
    let mut entries = Vec::with_capacity(rows.len());
    for (index, mut row) in rows.into_iter().enumerate() {
        if let Some(fields) = row.as_object_mut() {
            let unknown: Vec<String> = fields
                .keys()
                .filter(|k| !ORIGIN_ENTRY_FIELDS.contains(&k.as_str()))
                .cloned()
                .collect();
            if !unknown.is_empty() {
                for k in &unknown {
                    fields.remove(k);
                }
                let host = fields.get("host").and_then(|h| h.as_str()).unwrap_or("");
                ignored.push(IgnoredFields {
                    index,
                    host: host.to_string(),
                    fields: unknown,
                });
            }
        }
        let host = row.get("host").and_then(|h| h.as_str()).map(str::to_string);
        let entry = serde_json::from_value(row).map_err(|e| match host {
            Some(host) => format!("origins[{index}] (host {host:?}): {e}"),
            None => format!("origins[{index}]: {e}"),
        })?;
        entries.push(entry);
    }
    Ok((entries, ignored))
}

/// Raise host floors off the async workers (an fsync); a failure answers 500 and the broker
/// pushes again within seconds.
async fn apply_owner_changes(
    storage: &'static FoyerStorage,
    changes: Vec<OwnerChange>,
) -> Result<(), Box<Response>> {
    if changes.is_empty() {
        return Ok(());
    }
    let done = tokio::task::spawn_blocking(move || storage.apply_owner_changes(&changes)).await;
    let why = match done {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::error!(error = %why, "could not record host owner floors");
    Err(Box::new(error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "ban_log",
        format!("origins not fully applied: {why}"),
    )))
}

/// Body of `PUT /peers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersBody {
    peers: Vec<PeerRef>,
}

async fn get_peers(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&headers, &s.token) {
        return *r;
    }
    Json(json!({ "peers": s.peers.list() })).into_response()
}

async fn put_peers(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let parsed: PeersBody = match authorized_json(&s, &headers, body).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    match s.peers.replace(parsed.peers) {
        Ok(n) => Json(json!({ "peers": n })).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, "bad_peer", e.to_string()),
    }
}

/// Compacts the purge-ban log hourly, so it stays proportional to the bans in force.
pub struct BanCompactor(pub &'static FoyerStorage);

#[async_trait]
impl BackgroundService for BanCompactor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            // A compaction may wait for late tombstones: a stop does not wait for it (the log
            // is rewritten atomically, whenever it stops).
            tokio::select! {
                compacted = self.0.compact_bans() => {
                    if let Err(e) = compacted {
                        tracing::warn!(error = %e, "ban log compaction failed");
                    }
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
    fn the_bearer_scheme_is_case_insensitive() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert_eq!(bearer_token(&with("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&with("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&with("BEARER abc")), Some("abc"));
        assert_eq!(bearer_token(&with("Basic abc")), None);
        assert_eq!(bearer_token(&with("Bearerabc")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn purge_paths_parse() {
        let u: Uri = "/cache/Example.com/a/b?x=1".parse().unwrap();
        assert_eq!(
            parse_target(&u).unwrap(),
            Target::Key("example.com/a/b?x=1".into())
        );
        let u: Uri = "/cache/example.com".parse().unwrap();
        assert!(parse_target(&u).is_err());
    }

    #[test]
    fn at_most_two_origin_pushes_are_held() {
        let pushes = Arc::default();
        let first = PushSlot::take(&pushes).unwrap();
        let second = PushSlot::take(&pushes).unwrap();
        assert!(PushSlot::take(&pushes).is_none());
        drop(first);
        let third = PushSlot::take(&pushes).expect("a slot given back is taken again");
        drop((second, third));
        assert_eq!(pushes.load(Ordering::Acquire), 0);
    }

    #[test]
    fn token_compare() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abd", b"abc"));
        assert!(!token_matches(b"ab", b"abc"));
    }
}
