//! The provider API (JSON over HTTP on the admin listener). See `broker/openapi.yaml`.
//!
//! Every error is `{"error": code, "message": text}` with a 4xx/5xx status; a rejected request
//! changes nothing. Providers only ever see their own hosts and resources (403 otherwise).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use edge_node::admin::bearer_token;
use edge_node::cache_key::QueryFilter;
use edge_node::proxy::token_matches;
use parking_lot::RwLock;
use prometheus::{Encoder, TextEncoder};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::limits::{ApiLimits, CallClass};
use super::model::{
    check_host, check_path, check_public_host, check_upstream, EventBody, EventKind, Invalid,
    NewProvider, Origin, OriginBody, OriginOptions, Provider, PurgeBody, ResourceBody,
    IMMEDIATE_SHADOW_PRIORITY,
};
use super::store::{Claim, Registry, RegistryError};
use crate::metrics::BrokerMetrics;
use crate::monitor::{Series, SeriesStore};
use crate::planner::PlannerState;
use crate::routing::{Fleet, Health, Holders};
use crate::sync::EdgeSync;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The registry.
    pub registry: Arc<Registry>,
    /// The fleet (regions, edges).
    pub fleet: Arc<Fleet>,
    /// Edge health.
    pub health: Arc<Health>,
    /// Edge admin client (purge fan-out, origin push).
    pub sync: Arc<EdgeSync>,
    /// Monitor series.
    pub series: Arc<RwLock<SeriesStore>>,
    /// Operator token.
    pub operator_token: Arc<str>,
    /// Largest accepted body.
    pub max_body: usize,
    /// Whether providers may register loopback or private upstreams.
    pub allow_private_upstreams: bool,
    /// Whether providers may register local or reserved host names.
    pub allow_local_hosts: bool,
    /// Whether a new host waits for the operator's approval (`[admin] approve_new_hosts`).
    pub approve_new_hosts: bool,
    /// Metrics registry (for `/metrics`).
    pub prometheus: prometheus::Registry,
    /// Broker metrics.
    pub metrics: BrokerMetrics,
    /// The planner's latest decisions.
    pub planner: Arc<PlannerState>,
    /// Work counted as in flight, which a graceful shutdown waits for.
    pub inflight: edge_node::drain::InflightCounter,
    /// Shadow cost ledger and threshold tuner.
    pub ledger: Arc<crate::cost::Ledger>,
    /// Per-provider budgets of costly calls.
    pub limits: Arc<ApiLimits>,
    /// The edges that served each key lately (peer hints); `None` with peer fill off.
    pub holders: Option<Arc<Holders>>,
}

/// An API failure.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds for a `Retry-After` header.
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.code, "message": self.message }));
        match self.retry_after {
            Some(secs) => (self.status, [(header::RETRY_AFTER, secs)], body).into_response(),
            None => (self.status, body).into_response(),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let (status, code) = match &e {
            RegistryError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            RegistryError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            RegistryError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            RegistryError::Store(detail) => {
                // The detail names files on the broker's disk: the log's, not a caller's.
                tracing::error!(%detail, "a provider API call failed in the registry's store");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store",
                    "the registry's store failed; the change may or may not have been \
                     applied (read it back before sending it again); the broker's log has \
                     the detail",
                );
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
    }
}

type ApiResult = Result<Response, ApiError>;

/// A query string, read once the caller is authenticated (a request without a token is 401
/// whatever its query), with a JSON 400 when it does not parse.
fn parsed<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))
}

/// Take one `class` call from provider `id`'s budget: 429 with `Retry-After` once it is spent.
fn within_budget(s: &ApiState, class: CallClass, id: &str) -> Result<(), ApiError> {
    rate_limited(class, s.limits.check(class, id))
}

fn rate_limited(
    class: CallClass,
    checked: Result<(), std::time::Duration>,
) -> Result<(), ApiError> {
    checked.map_err(|wait| {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        ApiError {
            retry_after: Some(secs),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many {} calls from this provider; retry in {secs} s",
                    class.as_str()
                ),
            )
        }
    })
}

/// The operator's call: 403 for a provider's token (known, but not allowed here), 401 for
/// none or one nobody holds, as for every endpoint.
fn operator(s: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    match bearer_token(headers) {
        Some(t) if token_matches(t.as_bytes(), s.operator_token.as_bytes()) => Ok(()),
        Some(t) if s.registry.provider_by_token(t).is_some() => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "operator token required",
        )),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown token",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing bearer token",
        )),
    }
}

fn provider(s: &ApiState, headers: &HeaderMap) -> Result<Provider, ApiError> {
    let t = bearer_token(headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing bearer token",
        )
    })?;
    s.registry
        .provider_by_token(t)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token"))
}

/// Read and parse a JSON body within the size limit.
async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes = edge_node::http_service::read_body_within(body, limit)
        .await
        .map_err(|e| {
            let too_large = e
                .into_inner()
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("request body exceeds {limit} bytes"),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    "the request body could not be read",
                )
            }
        })?;
    let bytes = bytes.ok_or_else(|| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the request body did not arrive in time",
        )
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))
}

/// The admin router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/metrics", get(metrics))
        .route("/v1/providers", post(create_provider).get(list_providers))
        .route("/v1/providers/{id}/token", post(rotate_token))
        .route("/v1/origins", get(list_origins))
        .route("/v1/origins/{host}", put(put_origin).delete(delete_origin))
        .route("/v1/host-claims", get(list_claims))
        .route(
            "/v1/host-claims/{host}",
            axum::routing::delete(reject_claim),
        )
        .route("/v1/host-claims/{host}/approve", post(approve_claim))
        .route("/v1/resources", post(create_resource).get(list_resources))
        .route(
            "/v1/resources/{id}",
            get(get_resource)
                .put(update_resource)
                .delete(delete_resource),
        )
        .route("/v1/purge", post(purge))
        .route("/v1/events", post(event))
        .route("/v1/series", get(series))
        .route("/v1/routes", get(routes))
        .route("/v1/shadows/explain", get(explain))
        .route("/v1/cost", get(cost))
        .route("/v1/anomalies", get(anomalies))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_calls,
        ))
        .layer(axum::middleware::from_fn(
            edge_node::json_errors::json_errors,
        ))
        .with_state(state)
}

async fn count_calls(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let who = match bearer_token(req.headers()) {
        Some(t) if token_matches(t.as_bytes(), s.operator_token.as_bytes()) => {
            "operator".to_string()
        }
        Some(t) => s
            .registry
            .provider_by_token(t)
            .map_or_else(|| "unknown".to_string(), |p| p.id),
        None => "anonymous".to_string(),
    };
    let is_api = req.uri().path().starts_with("/v1/");
    let resp = next.run(req).await;
    if is_api {
        s.metrics
            .api_calls
            .with_label_values(&[who.as_str(), resp.status().as_str()])
            .inc();
    }
    resp
}

/// `/metrics` on the API listener, which providers reach: operator only.
async fn metrics(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(e) = operator(&s, &headers) {
        return e.into_response();
    }
    exposition(&s.prometheus)
}

/// The listener of `admin.metrics_listen`: `/metrics` and `/healthz` without a token, for a
/// scraper on a network the providers do not reach.
pub fn metrics_router(prometheus: prometheus::Registry) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route(
            "/metrics",
            get(move || {
                let p = prometheus.clone();
                async move { exposition(&p) }
            }),
        )
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(axum::middleware::from_fn(
            edge_node::json_errors::json_errors,
        ))
}

/// The registry's metrics in Prometheus text format.
fn exposition(prometheus: &prometheus::Registry) -> Response {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&prometheus.gather(), &mut buf) {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "metrics", e.to_string())
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            TextEncoder::new().format_type().to_string(),
        )],
        buf,
    )
        .into_response()
}

async fn create_provider(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> ApiResult {
    operator(&s, &headers)?;
    let req: NewProvider = read_json(body, s.max_body).await?;
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 128 {
        return Err(Invalid {
            field: "name",
            message: "must be 1 to 128 characters".into(),
        }
        .into());
    }
    // Names reach logs and terminals (the CLI's listings): no control characters or
    // direction overrides, which could rewrite what an operator sees.
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if name.chars().any(hidden) {
        return Err(Invalid {
            field: "name",
            message: "must not contain control or text-direction characters".into(),
        }
        .into());
    }
    let name = name.to_string();
    let (p, token) = write_registry(&s, move |r| r.create_provider(&name)).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": p.id, "name": p.name, "token": token })),
    )
        .into_response())
}

async fn rotate_token(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    operator(&s, &headers)?;
    let token = {
        let id = id.clone();
        write_registry(&s, move |r| r.rotate_token(&id)).await?
    };
    Ok(Json(json!({ "id": id, "token": token })).into_response())
}

async fn list_providers(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    operator(&s, &headers)?;
    Ok(Json(json!({ "providers": s.registry.providers() })).into_response())
}

/// How long registering an origin waits for its name to resolve.
const UPSTREAM_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The upstream's name resolves, and (unless private upstreams are allowed) to no private
/// address: the edges check the same when the row is pushed and drop a row that fails, and a
/// host whose only row was dropped answers 404 everywhere while its owner was told the change
/// succeeded. A name not resolvable yet (a DNS cutover) is refused now, to be sent again.
async fn check_upstream_resolves(upstream: &str, allow_private: bool) -> Result<(), Invalid> {
    use crate::proxy::UpstreamLookupError as E;
    let resolved =
        crate::proxy::resolve_upstream(upstream, allow_private, UPSTREAM_LOOKUP_TIMEOUT).await;
    let message = match resolved {
        Ok(_) => return Ok(()),
        Err(e @ E::Private { .. }) => {
            format!("{e} (the operator can allow that with [admin] allow_private_upstreams)")
        }
        Err(e @ (E::TimedOut { .. } | E::Failed { .. })) => {
            format!("{e}; send it again once it does")
        }
        Err(e) => e.to_string(),
    };
    Err(Invalid {
        field: "upstream",
        message,
    })
}

async fn list_origins(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    let p = provider(&s, &headers)?;
    Ok(Json(json!({
        "origins": s.registry.origins_of(&p.id),
        "claims": s.registry.claims_of(&p.id),
    }))
    .into_response())
}

/// `GET /v1/host-claims` (operator): the hosts providers asked for that await approval.
async fn list_claims(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    operator(&s, &headers)?;
    Ok(Json(json!({ "claims": s.registry.claims() })).into_response())
}

/// `POST /v1/host-claims/{host}/approve` (operator): the claim becomes the host's origin.
/// As for any new host, the host's old copies are purged from every edge first (207 naming
/// the edges that missed it, which get it before they serve again).
async fn approve_claim(
    State(s): State<ApiState>,
    Path(host): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    operator(&s, &headers)?;
    let host = check_host(&host)?;
    let claim = s
        .registry
        .claim(&host)
        .ok_or_else(|| RegistryError::NotFound(format!("claim on host {host}")))?;
    // Judged again as a registration now: the claim may predate a stricter configuration,
    // and its upstream's name may have moved since (the edges would drop a row that fails,
    // leaving the host answering 404 everywhere after a reported success).
    check_public_host(&host, s.allow_local_hosts)?;
    let upstream = check_upstream(&claim.upstream, s.allow_private_upstreams)?;
    check_upstream_resolves(&upstream, s.allow_private_upstreams).await?;
    to_the_end(&s, |s| approve(s, host, claim)).await
}

/// The rest of an approval, run to its end: the host's old copies purged, then the claim
/// registered, pushed and counted.
async fn approve(s: ApiState, host: String, claim: Origin) -> ApiResult {
    s.planner.forget_host(&host);
    let target = format!("{host}/*");
    let purged = purge_and_forget(&s, &target).await;
    let origin = {
        let host = host.clone();
        write_registry(&s, move |r| r.approve_claim(&host, &claim)).await?
    };
    note_claims(&s);
    s.sync.origins_changed();
    tracing::info!(%host, provider = %origin.provider, "host claim approved");
    let mut body = serde_json::to_value(&origin).unwrap_or_default();
    let status = if with_missed_purge(&mut body, &target, &purged) {
        StatusCode::MULTI_STATUS
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(body)).into_response())
}

/// `DELETE /v1/host-claims/{host}` (operator): reject the claim.
async fn reject_claim(
    State(s): State<ApiState>,
    Path(host): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    operator(&s, &headers)?;
    let host = check_host(&host)?;
    to_the_end(&s, |s| async move {
        write_registry(&s, move |r| r.drop_claim(&host, None)).await?;
        note_claims(&s);
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

async fn put_origin(
    State(s): State<ApiState>,
    Path(host): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let p = provider(&s, &headers)?;
    within_budget(&s, CallClass::Write, &p.id)?;
    let req: OriginBody = read_json(body, s.max_body).await?;
    let host = check_host(&host)?;
    // A host new to the registry may still have copies on an edge that missed the purge when
    // its previous owner deleted it; they go before any edge learns the new origin.
    // Someone else's host is refused before any lookup: the API neither spends DNS on it nor
    // lets a caller compare a guess with its owner's upstream.
    let unregistered = match s.registry.check_host_owner(&p.id, &host) {
        Ok(()) => false,
        Err(RegistryError::NotFound(_)) => true,
        Err(e) => return Err(e.into()),
    };
    // New registrations only: the owner of a host registered before the rule (or before the
    // operator turned local names off) can still update it (the broker warns at start).
    if unregistered {
        check_public_host(&host, s.allow_local_hosts)?;
    }
    let upstream = check_upstream(&req.upstream, s.allow_private_upstreams)?;
    // An unchanged upstream (an update of options alone) is not looked up again: the edges
    // keep its last address through a resolver's blip, and so must the API.
    let unchanged = s
        .registry
        .origin(&host)
        .is_some_and(|o| o.upstream == upstream);
    if !unchanged {
        check_upstream_resolves(&upstream, s.allow_private_upstreams).await?;
    }
    let cache_key_ignore_query =
        QueryFilter::parse(&req.cache_key_ignore_query).map_err(|message| Invalid {
            field: "cache_key_ignore_query",
            message,
        })?;
    // Asked again after the upstream's lookup (seconds, at worst): a host another provider
    // registered meanwhile is theirs, and so are its fresh copies and plans; one this
    // provider's own other request registered is updated as its own.
    let unregistered = unregistered
        && match s.registry.check_host_owner(&p.id, &host) {
            Err(RegistryError::NotFound(_)) => true,
            Ok(()) => false,
            Err(e) => return Err(e.into()),
        };
    if unregistered && s.approve_new_hosts {
        return claim_host(&s, &p.id, host, upstream, req, cache_key_ignore_query).await;
    }
    // The rest to its end even if the caller hangs up: the purge's fan-out, the write, and
    // the push and claim bookkeeping that follow it.
    let owner = p.id;
    to_the_end(&s, move |s| async move {
        let target = format!("{host}/*");
        let purged = if unregistered {
            s.registry.check_origin_quota(&owner, &host)?;
            // The purge of the host's old copies leaves a ban on every edge, like any purge.
            within_budget(&s, CallClass::Purge, &owner)?;
            // A previous owner's plans, should its delete have been cut short.
            s.planner.forget_host(&host);
            purge_and_forget(&s, &target).await
        } else {
            Vec::new()
        };
        let options = OriginOptions {
            forward_host: req.forward_host,
            strip_set_cookie: req.strip_set_cookie,
            cache_key_ignore_query,
        };
        let claim = if unregistered {
            Claim::New
        } else {
            Claim::Owned
        };
        let created = {
            let (provider, host, upstream) = (owner.clone(), host.clone(), upstream.clone());
            write_registry(&s, move |r| {
                r.put_origin(&provider, &host, &upstream, options, claim)
            })
            .await?
        };
        s.sync.origins_changed();
        // A claim left from while approvals were on is settled by the registration.
        note_claims(&s);
        let mut body = json!({
            "host": host,
            "upstream": upstream,
            "forward_host": req.forward_host,
            "strip_set_cookie": req.strip_set_cookie,
            "cache_key_ignore_query": req.cache_key_ignore_query,
        });
        let status = if with_missed_purge(&mut body, &target, &purged) {
            StatusCode::MULTI_STATUS
        } else if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok((status, Json(body)).into_response())
    })
    .await
}

/// A provider's `PUT /v1/origins/{host}` of a host new to the registry while new hosts
/// await approval: the claim is kept (202, `"status": "pending_approval"`); nothing routes,
/// pushes or purges until the operator approves it.
async fn claim_host(
    s: &ApiState,
    provider: &str,
    host: String,
    upstream: String,
    req: OriginBody,
    cache_key_ignore_query: QueryFilter,
) -> ApiResult {
    let options = OriginOptions {
        forward_host: req.forward_host,
        strip_set_cookie: req.strip_set_cookie,
        cache_key_ignore_query,
    };
    {
        let (provider, host, upstream) = (provider.to_string(), host.clone(), upstream.clone());
        to_the_end(s, |s| async move {
            write_registry(&s, move |r| {
                r.put_claim(&provider, &host, &upstream, options)
            })
            .await?;
            note_claims(&s);
            Ok(())
        })
        .await?;
    }
    tracing::info!(%host, %provider, "host claimed: awaiting the operator's approval");
    let body = json!({
        "host": host,
        "upstream": upstream,
        "forward_host": req.forward_host,
        "strip_set_cookie": req.strip_set_cookie,
        "cache_key_ignore_query": req.cache_key_ignore_query,
        "status": "pending_approval",
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

async fn delete_origin(
    State(s): State<ApiState>,
    Path(host): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let p = provider(&s, &headers)?;
    // Checked before any budget is spent: a rejected request changes nothing.
    let host = check_host(&host)?;
    within_budget(&s, CallClass::Write, &p.id)?;
    // The provider's claim still awaiting approval is withdrawn: nothing was served, nothing
    // to purge. One approved meanwhile is deleted below, as any host.
    let claimed = Some(host.clone()).filter(|h| {
        !s.registry.has_origin(h) && s.registry.claim(h).is_some_and(|c| c.provider == p.id)
    });
    if let Some(host) = claimed {
        let provider = p.id.clone();
        let withdrawn = to_the_end(&s, |s| async move {
            let registry = s.registry.clone();
            let dropped =
                off_the_api_thread(move || registry.drop_claim(&host, Some(&provider))).await?;
            note_claims(&s);
            Ok(dropped)
        })
        .await?;
        match withdrawn {
            Ok(()) => return Ok(StatusCode::NO_CONTENT.into_response()),
            // Approved (or rejected and claimed by another) meanwhile: the normal delete
            // answers, without revealing another provider's claim.
            Err(RegistryError::NotFound(_) | RegistryError::Forbidden(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Its purge of every copy leaves a ban on every edge, like any purge.
    within_budget(&s, CallClass::Purge, &p.id)?;
    to_the_end(&s, |s| delete_host(s, p.id, host)).await
}

/// The rest of `DELETE /v1/origins/{host}`, run to its end: the registry row, then the
/// host's plans, history and copies on every edge.
async fn delete_host(s: ApiState, provider: String, host: String) -> ApiResult {
    {
        let host = host.clone();
        write_registry(&s, move |r| r.delete_origin(&provider, &host)).await?;
    }
    s.sync.origins_changed();
    // The host's plans go first, at once.
    s.planner.forget_host(&host);
    // Its history goes in a task started before the purge (the store may be held by a
    // snapshot for a while). Should it end after someone registered the host again, what it
    // erased is that provider's first seconds; the series API shows nobody what was
    // recorded before their registration anyway.
    let (store, prefix) = (s.series.clone(), format!("{host}/"));
    let forgotten = off_the_api_thread(move || store.write().forget_prefix(&prefix));
    // The edges' copies go with the host: whoever registers it next must not be served this
    // provider's content, nor get shadows planned from its history.
    let target = format!("{host}/*");
    let results = purge_and_forget(&s, &target).await;
    if let Ok(series) = forgotten.await {
        tracing::info!(%host, series, "host deleted: its request history dropped");
    }
    if results.iter().all(|r| r.ok) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        let body = json!({ "host": host, "target": target, "edges": results });
        Ok((StatusCode::MULTI_STATUS, Json(body)).into_response())
    }
}

async fn create_resource(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> ApiResult {
    let p = provider(&s, &headers)?;
    within_budget(&s, CallClass::Write, &p.id)?;
    let req: ResourceBody = read_json(body, s.max_body).await?;
    let r = req.into_resource(s.registry.new_resource_id(), &p.id, &s.fleet.regions)?;
    {
        let r = r.clone();
        write_registry(&s, move |reg| reg.put_resource(r)).await?;
    }
    Ok((StatusCode::CREATED, Json(r)).into_response())
}

async fn list_resources(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    let p = provider(&s, &headers)?;
    Ok(Json(json!({ "resources": s.registry.resources_of(&p.id) })).into_response())
}

async fn get_resource(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let p = provider(&s, &headers)?;
    Ok(Json(s.registry.resource(&p.id, &id)?).into_response())
}

async fn update_resource(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let p = provider(&s, &headers)?;
    within_budget(&s, CallClass::Write, &p.id)?;
    s.registry.resource(&p.id, &id)?;
    let req: ResourceBody = read_json(body, s.max_body).await?;
    let r = req.into_resource(id, &p.id, &s.fleet.regions)?;
    {
        let r = r.clone();
        write_registry(&s, move |reg| reg.update_resource(r)).await?;
    }
    Ok(Json(r).into_response())
}

async fn delete_resource(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let p = provider(&s, &headers)?;
    within_budget(&s, CallClass::Write, &p.id)?;
    write_registry(&s, move |r| r.delete_resource(&p.id, &id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A validated purge.
enum PurgeOrder {
    /// `host/path` or `host/prefix*`.
    Target(String),
    /// The host's objects carrying one of the (checked) tags.
    Tags(String, Vec<String>),
}

impl PurgeOrder {
    /// What it costs of the purge budget: one per tag, else one.
    fn cost(&self) -> u32 {
        match self {
            PurgeOrder::Target(_) => 1,
            PurgeOrder::Tags(_, tags) => tags.len() as u32,
        }
    }
}

/// Read and check a purge call of provider `provider`.
async fn purge_order(s: &ApiState, provider: &str, body: Body) -> Result<PurgeOrder, ApiError> {
    let req: PurgeBody = read_json(body, s.max_body).await?;
    let host = check_host(&req.host)?;
    s.registry.check_host_owner(provider, &host)?;
    Ok(match (&req.path, &req.prefix, &req.tags) {
        (Some(path), None, None) => {
            check_path("path", path)?;
            PurgeOrder::Target(exact_key(s, &host, path)?)
        }
        (None, Some(prefix), None) => {
            check_path("prefix", prefix)?;
            PurgeOrder::Target(format!("{host}{prefix}*"))
        }
        (None, None, Some(tags)) => {
            let tags = edge_node::tags::check(tags).map_err(|e| Invalid {
                field: "tags",
                message: e.to_string(),
            })?;
            PurgeOrder::Tags(host, tags)
        }
        _ => return Err(one_purge_target().into()),
    })
}

async fn purge(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> ApiResult {
    let p = provider(&s, &headers)?;
    // Charged in one step, so that the wait a 429 names is the wait that makes the call
    // pass; a refused call costs one purge, as every refused call does.
    let order = match purge_order(&s, &p.id, body).await {
        Ok(order) => order,
        Err(e) => {
            within_budget(&s, CallClass::Purge, &p.id)?;
            return Err(e);
        }
    };
    rate_limited(
        CallClass::Purge,
        s.limits.check_n(CallClass::Purge, &p.id, order.cost()),
    )?;
    // Run to its end: a caller hanging up during the edges' fan-out must not leave the
    // broker's plans and hints of what it purged behind.
    let (results, report) = to_the_end(&s, |s| async move {
        Ok(match order {
            PurgeOrder::Tags(host, tags) => {
                let results = s.sync.purge_tags_everywhere(&host, &tags).await;
                // The edges end the marks of the shadows the tags ban, which the broker
                // cannot tell: it forgets the host's live shadows (those still held are kept
                // on the edges and renewed by the next order), so it neither counts purged
                // ones against budgets nor refreshes copies that are gone; and, for the same
                // reason, the holders of all the host's keys.
                forget_purged(&s, &format!("{host}/*"));
                let report = json!({ "host": host, "tags": tags, "edges": results });
                (results, report)
            }
            PurgeOrder::Target(target) => {
                let results = purge_and_forget(&s, &target).await;
                let report = json!({ "target": target, "edges": results });
                (results, report)
            }
        })
    })
    .await?;
    let status = if results.iter().all(|r| r.ok) {
        StatusCode::OK
    } else {
        StatusCode::MULTI_STATUS
    };
    Ok((status, Json(report)).into_response())
}

/// Purge `target` on every edge, then forget the planner's live shadows under it: after the
/// purge, so that an order placed while it ran is forgotten too (the edge may have taken it
/// before the purge removed its copy).
async fn purge_and_forget(s: &ApiState, target: &str) -> Vec<crate::sync::EdgeResult> {
    let results = s.sync.purge_everywhere(target).await;
    forget_purged(s, target);
    results
}

/// After the edges purged `target` (a key, or a prefix ending in `*`): the planner forgets
/// its live shadows under it (what [`crate::planner::PlannerState::forget`] returns is
/// returned), and no miss elsewhere is hinted to a peer whose copy went. A key's holders
/// are forgotten; a prefix's keys are not known by name, so every holder of its host
/// recorded until now is.
fn forget_purged(s: &ApiState, target: &str) -> u64 {
    let since = s.planner.forget(target);
    if let Some(h) = &s.holders {
        let now = crate::clock::now_secs();
        if target.ends_with('*') {
            h.forget_host(crate::routing::host_of(target), now);
        } else {
            h.forget(Holders::key_of(target), now);
        }
    }
    since
}

/// The cache key of an exact path (the host's query filter applied). A key ending in `*`
/// would read as a prefix at the edges, so it is refused: `prefix` says that.
fn exact_key(s: &ApiState, host: &str, path: &str) -> Result<String, Invalid> {
    let key = s.registry.cache_key(host, path);
    if key.ends_with('*') {
        return Err(Invalid {
            field: "path",
            message: "an exact path must not end in '*' (give a prefix instead)".into(),
        });
    }
    Ok(key)
}

fn one_purge_target() -> Invalid {
    Invalid {
        field: "path",
        message: "give exactly one of path, prefix or tags".into(),
    }
}

#[derive(Deserialize)]
struct SeriesQuery {
    resource: String,
}

async fn series(
    State(s): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<SeriesQuery>, QueryRejection>,
) -> ApiResult {
    let p = provider(&s, &headers)?;
    let q = parsed(q)?;
    let (host, path) = q
        .resource
        .split_once('/')
        .unwrap_or((q.resource.as_str(), ""));
    let host = check_host(host)?;
    s.registry.check_host_owner(&p.id, &host)?;
    // Series are recorded under the cache key, so the query is keyed the same way: host
    // lower-cased, the host's ignored query parameters dropped.
    let key = s.registry.cache_key(&host, &format!("/{path}"));
    // Only what was recorded since this registration: a host deleted and registered again
    // (by another provider, say) starts a new history.
    let registered = s.registry.registered_since(&host);
    let store = s.series.clone();
    let body = off_the_api_thread(move || {
        let store = store.read();
        let since = store.bucket_of(registered);
        let regions: HashMap<&String, Series> = store
            .query(&key)
            .into_iter()
            .flatten()
            .map(|(region, series)| (region, series.since(since)))
            .collect();
        json!({ "resource": key, "regions": regions })
    })
    .await?;
    Ok(Json(body).into_response())
}

/// Run `work` to its end even if the caller hangs up (axum then drops the handler's
/// future): the steps after a registry write — a deleted host's purge, plans and history, the
/// origin push, the claims gauge — must not stop between them. A graceful stop waits for it
/// ([`edge_node::drain::detached`]); `work` is given its own copy of the state.
async fn to_the_end<T, W>(s: &ApiState, work: impl FnOnce(ApiState) -> W) -> Result<T, ApiError>
where
    T: Send + 'static,
    W: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
{
    edge_node::drain::detached(&s.inflight, work(s.clone()))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "API task failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?
}

/// Whether some edge missed the purge of a new host's old copies; if so, `body` names them
/// under `purge` (answered 207).
fn with_missed_purge(
    body: &mut serde_json::Value,
    target: &str,
    purged: &[crate::sync::EdgeResult],
) -> bool {
    let missed = purged.iter().any(|r| !r.ok);
    if missed {
        body["purge"] = json!({ "target": target, "edges": purged });
    }
    missed
}

/// Export how many host claims await approval, after a change of them.
fn note_claims(s: &ApiState) {
    s.metrics.host_claims.set(s.registry.claim_count() as i64);
}

/// Run a registry write (a redb commit, and its fsync) on the blocking pool: the API has one
/// thread, which a disk slow to sync would otherwise stall for every caller meanwhile. The
/// write completes whether or not its caller waits for it.
async fn write_registry<T: Send + 'static>(
    s: &ApiState,
    write: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, ApiError> {
    let registry = s.registry.clone();
    Ok(off_the_api_thread(move || write(&registry)).await??)
}

/// Run `f`, which takes the series store's lock, on the blocking pool: the API has one
/// thread, and the monitor holds the store for as long as a snapshot takes to serialize.
/// It starts at once, whether or not the result is awaited.
fn off_the_api_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = Result<T, ApiError>> {
    let task = tokio::task::spawn_blocking(f);
    async move {
        task.await.map_err(|e| {
            tracing::error!(error = %e, "API task failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })
    }
}

#[derive(Deserialize)]
struct RouteQuery {
    key: String,
    region: String,
}

async fn routes(
    State(s): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<RouteQuery>, QueryRejection>,
) -> ApiResult {
    operator(&s, &headers)?;
    let q = parsed(q)?;
    let region = s.fleet.region_index(&q.region).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "unknown region",
        )
    })?;
    // Routed as the proxy routes it: the host's query filter applied.
    let key = match q.key.split_once('/') {
        Some((host, rest)) => s.registry.cache_key(
            &edge_node::origin::normalize_host(host),
            &format!("/{rest}"),
        ),
        None => q.key.clone(),
    };
    let plan: Vec<_> = s
        .fleet
        .plan(&key, region, &s.health)
        .into_iter()
        .map(|c| {
            json!({
                "edge": c.edge.map(|e| s.fleet.edges[e].id.clone()),
                "region": s.fleet.regions[c.region],
                "reason": c.reason.as_str(),
            })
        })
        .collect();
    Ok(Json(json!({ "key": key, "plan": plan })).into_response())
}

#[derive(Deserialize)]
struct ExplainQuery {
    key: String,
}

async fn explain(
    State(s): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<ExplainQuery>, QueryRejection>,
) -> ApiResult {
    let p = provider(&s, &headers)?;
    let q = parsed(q)?;
    let (host, path) = q.key.split_once('/').unwrap_or((q.key.as_str(), ""));
    let host = check_host(host)?;
    s.registry.check_host_owner(&p.id, &host)?;
    let key = s.registry.cache_key(&host, &format!("/{path}"));
    let resource = s.registry.resource_for_key(&key);
    match s.planner.explain(&key) {
        Some(decisions) => Ok(Json(json!({
            "key": key,
            "resource": resource,
            "decisions": decisions,
        }))
        .into_response()),
        None => Ok(Json(json!({
            "key": key,
            "resource": resource,
            "decisions": [],
            "why": "no demand was recorded for this key in the monitored history, so the planner had nothing to forecast",
        }))
        .into_response()),
    }
}

/// `GET /v1/cost` (operator): prices, spend and savings per provider, region and priority
/// class, thresholds in force and the log of their moves with reasons.
async fn cost(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    operator(&s, &headers)?;
    Ok(Json(s.ledger.report()).into_response())
}

/// `GET /v1/anomalies` (operator): series that entered or left a surge or drop, newest last.
async fn anomalies(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult {
    operator(&s, &headers)?;
    Ok(Json(json!({ "events": s.planner.anomalies() })).into_response())
}

/// `POST /v1/events`: the origin changed. `updated` refreshes the live shadows in place
/// (revalidate with the origin, then swap) and invalidates every other copy; `deleted` removes every copy; `created` of a resource registered with high
/// priority is shadowed at once on the owning edge of each region its policy allows (up to
/// `max_copies`). Answers when every edge has answered; the time is a metric.
async fn event(State(s): State<ApiState>, headers: HeaderMap, body: Body) -> ApiResult {
    let started = std::time::Instant::now();
    let p = provider(&s, &headers)?;
    within_budget(&s, CallClass::Event, &p.id)?;
    let req: EventBody = read_json(body, s.max_body).await?;
    let host = check_host(&req.host)?;
    s.registry.check_host_owner(&p.id, &host)?;
    // `route`: the path without its query, as resources are registered.
    let (target, route) = match (&req.path, &req.prefix, req.kind) {
        (Some(path), None, _) => {
            check_path("path", path)?;
            let route = path.split('?').next().unwrap_or(path);
            (exact_key(&s, &host, path)?, route.to_string())
        }
        (None, Some(prefix), EventKind::Updated | EventKind::Deleted) => {
            check_path("prefix", prefix)?;
            (format!("{host}{prefix}*"), prefix.clone())
        }
        _ => {
            return Err(Invalid {
                field: "path",
                message: "give exactly one of path or prefix (created takes a path)".into(),
            }
            .into())
        }
    };
    // An update or delete purges on every edge (a prefix one leaves a ban there), like a
    // purge call: it spends the purge budget too, or events would be a purge budget five
    // times the size.
    if matches!(req.kind, EventKind::Updated | EventKind::Deleted) {
        within_budget(&s, CallClass::Purge, &p.id)?;
    }
    // The work runs in a task of its own, counted as in flight: neither a caller hanging up
    // nor a drain may cut it short between skipping the edges that refresh their copy and
    // their refresh (or purge).
    let kind = req.kind;
    let exact = req.prefix.is_none();
    let work = {
        let s = s.clone();
        let target = target.clone();
        async move { apply_event(&s, kind, exact, &host, &route, &target).await }
    };
    let task = edge_node::drain::detached(&s.inflight, work);
    let (mut report, incomplete) = task.await.map_err(|e| {
        tracing::error!(error = %e, "event task failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    })?;
    let kind = match kind {
        EventKind::Created => "created",
        EventKind::Updated => "updated",
        EventKind::Deleted => "deleted",
    };
    s.metrics
        .event_propagation
        .with_label_values(&[kind])
        .observe(started.elapsed().as_secs_f64());
    report.insert("target".into(), json!(target));
    report.insert("kind".into(), json!(kind));
    let status = if incomplete {
        StatusCode::MULTI_STATUS
    } else {
        StatusCode::OK
    };
    Ok((status, Json(serde_json::Value::Object(report))).into_response())
}

/// The effect of a provider's event on the edges; the report, and whether some edge may still
/// serve the old version (its purge failed).
async fn apply_event(
    s: &ApiState,
    kind: EventKind,
    exact: bool,
    host: &str,
    route: &str,
    target: &str,
) -> (serde_json::Map<String, serde_json::Value>, bool) {
    let mut report = serde_json::Map::new();
    let mut incomplete = false;
    match kind {
        EventKind::Updated | EventKind::Deleted => {
            let refill: Vec<usize> = if kind == EventKind::Updated && exact {
                s.planner.live_edges(target)
            } else {
                Vec::new()
            };
            // Edges holding a live shadow refresh it in place (revalidate, then swap: no
            // window without a copy); every other copy is invalidated.
            let refreshing = s.sync.refreshing(target, &refill).await;
            let purged = s.sync.purge_all_but(target, &refill).await;
            // The refreshing edges hold the new version, but which of them answers when is
            // theirs to say: each is hinted again once it serves the key.
            let since = forget_purged(s, target);
            let ttl = s
                .registry
                .resource_for(host, route)
                .map_or(super::model::DEFAULT_SHADOW_TTL_SECS, |r| r.shadow_ttl_secs);
            let mut refilled = Vec::new();
            let mut not_refreshed = Vec::new();
            for e in refill {
                let mut order = asap_order(target, ttl, 5);
                order.refresh = true;
                let ok = s.sync.shadow(e, order).await.is_some();
                if ok {
                    // Not live if a purge of it came while the refresh was under way.
                    s.planner
                        .record_placed(target, e, crate::clock::wall(ttl), since);
                } else {
                    not_refreshed.push(e);
                }
                refilled.push(json!({ "edge": s.fleet.edges[e].id, "ok": ok }));
            }
            // An edge that could not refresh its copy must not keep serving the old one.
            let mut purged = purged;
            purged.extend(s.sync.purge_on(target, &not_refreshed).await);
            s.sync.sent(refreshing).await;
            incomplete = purged.iter().any(|r| !r.ok);
            report.insert("purged".into(), json!(purged));
            report.insert("refilled".into(), json!(refilled));
        }
        EventKind::Created => {
            let resource = s.registry.resource_for(host, route);
            let mut shadowed = Vec::new();
            if let Some(r) = resource.filter(|r| r.priority >= IMMEDIATE_SHADOW_PRIORITY) {
                let regions: Vec<usize> = if r.policy.allowed_regions.is_empty() {
                    (0..s.fleet.regions.len()).collect()
                } else {
                    r.policy
                        .allowed_regions
                        .iter()
                        .filter_map(|n| s.fleet.region_index(n))
                        .collect()
                };
                // Regions without a usable edge are skipped before the copies are counted:
                // they would take a copy of the policy's limit and place none.
                let placeable = regions
                    .into_iter()
                    .filter_map(|region| {
                        Some((region, s.fleet.edge_in_region(target, region, &s.health)?))
                    })
                    .take(r.policy.max_copies as usize);
                for (region, e) in placeable {
                    let order = asap_order(target, r.shadow_ttl_secs, r.priority);
                    let info = crate::cost::OrderInfo {
                        provider: r.provider.clone(),
                        region,
                        class: crate::cost::Class::of(r.priority),
                        // Not known before its first fill: a loss prices the fill's compute.
                        bytes: 0,
                    };
                    let ok =
                        crate::planner::place(&s.sync, &s.planner, &s.ledger, e, order, info).await;
                    shadowed.push(json!({ "edge": s.fleet.edges[e].id, "region": s.fleet.regions[region], "ok": ok }));
                }
            }
            report.insert("shadowed".into(), json!(shadowed));
        }
    }
    (report, incomplete)
}

/// A shadow order for an event: needed now, filled from the origin (no peer holds the new
/// version yet).
fn asap_order(key: &str, ttl_secs: u64, priority: u8) -> edge_node::sync::protocol::ShadowOrder {
    edge_node::sync::protocol::ShadowOrder {
        key: key.to_string(),
        ttl_secs,
        priority,
        deadline_ms: 0,
        peer: None,
        refresh: false,
    }
}
